"""Throw-away RabbitMQ nodes (``RabbitNode``) and the management client (``RabbitAdmin``), on real nodes."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pika
import pika.exceptions
import pytest

from fedtransport.brokers import RabbitNode
from fedtransport.errors import BackendError, ConfigError
from fedtransport.transport.rabbitmq_admin import RabbitAdmin

try:
    from tests.rabbit_fixtures import (  # fixtures are used by parameter name
        admin_of,
        rabbit_certs,
        rabbit_node,
        rabbit_pair,
        rabbit_pool,
        requires_rabbitmq,
        tls_context,
        unique_name,
    )
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from rabbit_fixtures import (  # type: ignore[no-redef]  # noqa: F401
        admin_of,
        rabbit_certs,
        rabbit_node,
        rabbit_pair,
        rabbit_pool,
        requires_rabbitmq,
        tls_context,
        unique_name,
    )

pytestmark = [pytest.mark.rabbitmq, requires_rabbitmq]


def connect(
    node: RabbitNode, vhost: str = "/", user: str | None = None, password: str | None = None
) -> pika.BlockingConnection:
    params = pika.URLParameters(node.uri(vhost, user=user, password=password))
    params.connection_attempts = 1
    params.blocked_connection_timeout = 30
    return pika.BlockingConnection(params)


def publish(ch: pika.adapters.blocking_connection.BlockingChannel, queue: str, body: bytes) -> None:
    ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent))


def get_one(ch: pika.adapters.blocking_connection.BlockingChannel, queue: str) -> bytes | None:
    _, _, body = ch.basic_get(queue, auto_ack=True)
    return body


def consume_one(conn: pika.BlockingConnection, queue: str, timeout: float) -> bytes | None:
    """A consumer (not basic.get): queue federation only moves messages when there is demand."""
    ch = conn.channel()
    deadline = time.monotonic() + timeout
    try:
        for method, _, body in ch.consume(queue, inactivity_timeout=0.5):
            if method is not None:
                ch.basic_ack(method.delivery_tag)
                return body
            if time.monotonic() >= deadline:
                return None
    finally:
        ch.cancel()
    return None


# ---------------------------------------------------------------------------- RabbitNode


def test_nodes_listen_on_their_own_ports_and_move_messages(
    rabbit_pair: tuple[RabbitNode, RabbitNode],
) -> None:
    # Both pool nodes start together here (in parallel): later tests reuse them.
    for n, name in zip(rabbit_pair, ("party-a", "party-b"), strict=True):
        ports = {n.port, n.mng_port, n.dist_port, n.epmd_port, n.ssl_port}
        assert len(ports) == 5 and None not in ports
        assert n.node_name.startswith(f"{name}-") and n.node_name.endswith("@localhost")
        assert n.mng_url == f"http://127.0.0.1:{n.mng_port}"
        assert n.startup_seconds is not None and n.startup_seconds < 120

        overview = admin_of(n).overview()
        # The node answering is ours, not a system RabbitMQ on 5672/15672.
        assert overview["node"] == n.node_name
        listeners = {(x["protocol"], x["port"]) for x in overview["listeners"]}
        assert {("amqp", n.port), ("amqp/ssl", n.ssl_port), ("http", n.mng_port)} <= listeners

        queue = unique_name("q")
        with connect(n) as conn:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.queue_declare(queue, durable=True)
            publish(ch, queue, b"hello " + name.encode())
            assert consume_one(conn, queue, timeout=10) == b"hello " + name.encode()
            ch.queue_delete(queue)


def test_two_nodes_side_by_side(rabbit_pair: tuple[RabbitNode, RabbitNode]) -> None:
    a, b = rabbit_pair
    assert a.node_name != b.node_name
    assert not {a.port, a.mng_port, a.dist_port, a.epmd_port} & {b.port, b.mng_port, b.dist_port, b.epmd_port}
    assert a.data_dir != b.data_dir
    queue = unique_name("only-on-a")
    with connect(a) as conn:
        conn.channel().queue_declare(queue, durable=True)
    assert admin_of(a).get_queue("/", queue) is not None
    assert admin_of(b).get_queue("/", queue) is None
    assert admin_of(b).overview()["node"] == b.node_name
    admin_of(a).delete_queue("/", queue)


def test_tls_listener_checks_host_names(rabbit_node: RabbitNode, rabbit_certs: dict[str, Path]) -> None:
    n = rabbit_node
    assert n.ssl_port is not None and n.amqps_url is not None and n.amqps_url.startswith("amqps://")
    params = pika.URLParameters(n.uri())
    params.port = n.ssl_port
    params.connection_attempts = 1
    params.ssl_options = pika.SSLOptions(tls_context(rabbit_certs), server_hostname="party-a.fate.test")
    with pika.BlockingConnection(params) as conn:
        assert conn.channel().is_open

    params.ssl_options = pika.SSLOptions(tls_context(rabbit_certs), server_hostname="party-z.fate.test")
    with pytest.raises((pika.exceptions.AMQPConnectionError, ssl.SSLError), match=r"(?i)hostname|certificate"):
        pika.BlockingConnection(params)


def test_missing_installation_names_the_apt_package(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="apt-get install -y rabbitmq-server"):
        RabbitNode(name="nope", rabbitmq_home=str(tmp_path))


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        RabbitNode(name="bad name")
    with pytest.raises(ConfigError, match="certfile"):
        RabbitNode(name="x", tls={"keyfile": "k", "cacertfile": "c"})
    with pytest.raises(ConfigError, match="unknown"):
        RabbitNode(name="x", tls={"certfile": "a", "keyfile": "b", "cacertfile": "c", "verify": "x"})


def test_busy_port_is_refused_before_starting() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(BackendError, match="already in use"):
            RabbitNode(name="busy", port=s.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def scratch_boot() -> Iterator[Future[RabbitNode]]:
    """A node of its own for the restart/kill/stop test, booted in the background while the
    shared pair boots (session scope + autouse puts it first; boots are CPU-bound, ~10 s each,
    and overlapping them saves wall time). Applies to this module's tests only.

    Without the management plugin, whose shutdown alone adds ~5 s to every graceful stop.
    """
    node = RabbitNode(name="scratch", plugins=(), stop_timeout=20.0)
    with ThreadPoolExecutor(1) as pool:
        booting = pool.submit(node.start)
        try:
            yield booting
        finally:
            with contextlib.suppress(BaseException):
                booting.result()
            node.stop()


def test_restart_keeps_persistent_messages_and_stop_leaves_nothing(
    scratch_boot: Future[RabbitNode],
) -> None:
    n = scratch_boot.result(timeout=240)
    assert n.mng_port is None and n.mng_url is None
    ports = (n.port, n.dist_port, n.epmd_port)
    name, data_dir = n.node_name, n.data_dir
    assert data_dir is not None and data_dir.is_dir()
    first_pid = n.pid
    assert first_pid is not None and first_pid in n.processes()

    with connect(n) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare("durable-q", durable=True)
        publish(ch, "durable-q", b"before graceful restart")

    n.restart()  # SIGTERM, then start on the same ports, name and data
    assert (n.port, n.dist_port, n.epmd_port) == ports
    assert (n.node_name, n.data_dir) == (name, data_dir)
    assert n.pid != first_pid and first_pid not in n.processes()
    # rabbitmqctl reaches the node (shared cookie, the node's own epmd).
    assert "durable-q\t1" in n.ctl("list_queues", "name", "messages")
    with connect(n) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        assert get_one(ch, "durable-q") == b"before graceful restart"
        publish(ch, "durable-q", b"before crash")

    crashed_pid = n.pid
    n.kill()  # SIGKILL: a crash
    assert not n.running
    assert crashed_pid is not None and crashed_pid not in n.processes()
    n.restart()
    with connect(n) as conn:
        assert get_one(conn.channel(), "durable-q") == b"before crash"

    assert n.processes()  # shell, VM, helpers, epmd
    n.stop()
    assert n.processes() == []
    assert not data_dir.exists()
    assert not n.running
    n.stop()  # idempotent
    with pytest.raises(BackendError):
        n.restart()
    # Nothing of this node is left anywhere: no process mentions its node name.
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert name.encode() not in cmdline


def test_start_failure_reports_the_log_tail() -> None:
    node = RabbitNode(name="doomed", start_timeout=60.0)
    # Take the distribution port between allocation and start: the node refuses to boot.
    with socket.socket() as s:
        s.bind(("127.0.0.1", node.dist_port))
        s.listen()
        with pytest.raises(BackendError) as err:
            node.start()
    text = str(err.value)
    assert "exited before it was ready" in text and "last lines of" in text
    assert "dist_port_already_used" in text
    assert node.processes() == [] and node.data_dir is None


# ---------------------------------------------------------------------------- RabbitAdmin


def test_vhost_user_and_permissions_are_idempotent(rabbit_node: RabbitNode) -> None:
    admin = admin_of(rabbit_node)
    vhost, user = unique_name("job/with slash"), unique_name("job-user")
    for _ in range(2):
        admin.put_vhost(vhost)
        admin.put_user(user, "pw-1")
        admin.set_permissions(vhost, user, "^q\\.", "^q\\.", "^q\\.")
    assert vhost in {v["name"] for v in admin.list_vhosts()}
    assert user in {u["name"] for u in admin.list_users()}
    perm = admin.get_permissions(vhost, user)
    assert perm is not None and perm["configure"] == "^q\\."
    assert [p["user"] for p in admin.list_permissions(vhost)].count(user) == 1
    with connect(rabbit_node, vhost, user, "pw-1") as conn:
        conn.channel().queue_declare("q.ok", durable=True)
    assert admin.get_queue(vhost, "q.ok") is not None
    assert [q["name"] for q in admin.list_queues(vhost)] == ["q.ok"]

    for _ in range(2):
        admin.delete_user(user)
        admin.delete_vhost(vhost)
    assert admin.get_vhost(vhost) is None and admin.get_user(user) is None


def test_user_is_confined_to_its_vhost(rabbit_node: RabbitNode) -> None:
    admin = admin_of(rabbit_node)
    allowed, other, user = unique_name("va"), unique_name("vb"), unique_name("u")
    admin.put_vhost(allowed)
    admin.put_vhost(other)
    admin.put_user(user, "pw")
    admin.set_permissions(allowed, user)
    try:
        with connect(rabbit_node, allowed, user, "pw") as conn:
            assert conn.channel().is_open
        with pytest.raises(pika.exceptions.AMQPConnectionError) as err:
            connect(rabbit_node, other, user, "pw").channel()
        assert "access" in repr(err.value).lower() or "530" in repr(err.value)
    finally:
        admin.delete_user(user)
        admin.delete_vhost(allowed)
        admin.delete_vhost(other)


def test_federation_upstream_and_policy_move_messages(rabbit_pair: tuple[RabbitNode, RabbitNode]) -> None:
    a, b = rabbit_pair  # b pulls from a
    up, down = admin_of(a), admin_of(b)
    vhost, user, queue = unique_name("fed"), unique_name("fed-user"), "job.lane-0"
    for admin in (up, down):
        admin.put_vhost(vhost)
    up.put_user(user, "fed-pw")
    up.set_permissions(vhost, user)
    try:
        for node in (a, b):  # the same durable queue on both sides
            with connect(node, vhost) as conn:
                conn.channel().queue_declare(queue, durable=True)
        sent = down.put_federation_upstream(
            vhost, "from-a", a.uri(vhost, user=user, password="fed-pw"), reconnect_delay=1
        )
        assert sent["ack-mode"] == "on-confirm" and sent["reconnect-delay"] == 1
        upstream = down.get_federation_upstream(vhost, "from-a")
        assert upstream is not None and upstream["value"]["prefetch-count"] == sent["prefetch-count"]
        assert [p["name"] for p in down.list_parameters("federation-upstream", vhost)] == ["from-a"]
        down.put_policy(vhost, "federate-job", r"^job\.", {"federation-upstream": "from-a"})
        assert [p["name"] for p in down.list_policies(vhost)] == ["federate-job"]

        links = down.wait_federation_links(vhost, upstream="from-a", timeout=30)
        assert links[0]["status"] == "running" and links[0]["queue"] == queue
        assert [link["status"] for link in down.federation_links(vhost)] == ["running"]

        with connect(a, vhost) as conn:
            ch = conn.channel()
            ch.confirm_delivery()
            publish(ch, queue, b"from party a")
        with connect(b, vhost) as conn:
            assert consume_one(conn, queue, timeout=30) == b"from party a"
    finally:
        for _ in range(2):  # idempotent
            down.delete_policy(vhost, "federate-job")
            down.delete_federation_upstream(vhost, "from-a")
        assert down.list_policies(vhost) == [] and down.list_federation_upstreams(vhost) == []
        down.delete_vhost(vhost)
        up.delete_vhost(vhost)
        up.delete_user(user)


def test_wait_federation_links_names_the_problem(rabbit_node: RabbitNode) -> None:
    admin = admin_of(rabbit_node)
    vhost = unique_name("nolinks")
    admin.put_vhost(vhost)
    try:
        with pytest.raises(BackendError, match="no links"):
            admin.wait_federation_links(vhost, timeout=0.3)
    finally:
        admin.delete_vhost(vhost)


def test_errors_carry_status_and_broker_reason(rabbit_node: RabbitNode) -> None:
    admin = admin_of(rabbit_node)
    vhost = unique_name("err")
    admin.put_vhost(vhost)
    try:
        with pytest.raises(BackendError) as err:
            admin.set_permissions(vhost, rabbit_node.user, "(", ".*", ".*")
        assert err.value.status == 400
        assert "invalid_regexp" in err.value.broker_message
        assert "PUT /api/permissions/" in str(err.value) and "400" in str(err.value)

        with pytest.raises(BackendError) as err:
            admin.put_policy(vhost, "p", "(", {"federation-upstream": "x"})
        assert err.value.status == 400 and "regular expression" in err.value.broker_message
    finally:
        admin.delete_vhost(vhost)

    missing = unique_name("missing")
    with pytest.raises(BackendError) as err:
        admin.put_federation_upstream(missing, "u", "amqp://127.0.0.1")
    assert err.value.status == 404 and err.value.broker_message == "vhost_not_found"
    assert f"/api/parameters/federation-upstream/{missing}/u" in str(err.value)

    with pytest.raises(BackendError) as err:
        RabbitAdmin(rabbit_node.mng_url or "", rabbit_node.user, "wrong").overview()
    assert err.value.status == 401 and "Login failed" in err.value.broker_message


def test_unreachable_api_names_the_url() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(BackendError, match=f"{url}.*unreachable") as err:
        RabbitAdmin(url, "u", "p", timeout=5).list_vhosts()
    assert err.value.status is None


def test_admin_encodes_the_default_vhost(rabbit_node: RabbitNode) -> None:
    # A base URL ending in /api/ is accepted too.
    admin = RabbitAdmin(f"{rabbit_node.mng_url}/api/", rabbit_node.user, rabbit_node.password)
    assert admin.get_vhost("/") is not None
    assert any(p["user"] == rabbit_node.user for p in admin.list_permissions("/"))
    with pytest.raises(ConfigError):
        admin.put_policy("/", "p", ".*", {}, apply_to="streams")
    with pytest.raises(ConfigError):
        RabbitAdmin("127.0.0.1:15672", "u", "p")


def test_management_reports_plugins(rabbit_node: RabbitNode) -> None:
    # Last in the module: node details (enabled_plugins) need the first ~5 s stats sample.
    admin = admin_of(rabbit_node)
    plugins = admin.enabled_plugins()
    assert {"rabbitmq_management", "rabbitmq_federation", "rabbitmq_federation_management"} <= plugins
    assert {"javascript": "federation.js"} in admin.extensions()
    admin.require_plugins("rabbitmq_federation")
    with pytest.raises(BackendError, match="rabbitmq-plugins enable rabbitmq_shovel"):
        admin.require_plugins("rabbitmq_shovel")
