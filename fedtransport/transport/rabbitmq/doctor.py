"""What ``fedtransport doctor`` and ``fedtransport cleanup`` know of a RabbitMQ node.

:class:`RabbitOperatorHooks` is the base of ``RabbitTransport`` that answers the operator
hooks of ``Transport`` (see transport/base.py). Doctor's checks, in order:

``AMQP listener``
    TCP (and the TLS handshake with the ``ssl`` options), then the AMQP 0-9-1 protocol
    header, which the broker must answer with ``connection.start``.
``management API``
    ``GET /api/overview`` with ``user``/``password``: the plugin is on and the credentials
    are accepted.
``administrator``
    the user is tagged ``administrator``: jobs create vhosts, users, policies and upstreams.
``plugins``
    ``rabbitmq_federation`` and ``rabbitmq_federation_management`` are enabled (only a
    warning in shared mode, which never federates).

Cleanup goes through the management API of this party's node; ``inventory`` lists the job's
vhost, queues, policies, upstreams and users there.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any, ClassVar

from ...errors import BackendError, ConfigError
from ...party import Party
from ...routing import Endpoint, RouteTable, url_host
from ..base import Transport
from ..checks import Check, connect, read_exactly, socket_problem, tls_context
from .admin import RabbitAdmin
from .management import RabbitManagement

__all__ = ["RabbitOperatorHooks", "rabbit_checks"]

_PLUGINS = ("rabbitmq_federation", "rabbitmq_federation_management")


class RabbitOperatorHooks(Transport):
    """The operator hooks of the ``rabbitmq`` backend (doctor checks, route options, cleanup)."""

    route_kind: ClassVar[str | None] = "rabbitmq"

    @classmethod
    def local_broker(cls, options: dict[str, Any], stack: ExitStack) -> str:
        if options.get("port"):
            return "configured broker"
        from ...brokers import RabbitNode

        node = stack.enter_context(RabbitNode(name="demo"))
        options.update(host="127.0.0.1", port=node.port, mng_port=node.mng_port, user=node.user,
                       password=node.password)  # fmt: skip
        return f"local node on port {node.port}"

    management: RabbitManagement  # made by RabbitTransport.__init__

    @classmethod
    def options_from_route(cls, options: Mapping[str, Any], endpoint: Endpoint) -> dict[str, Any]:
        """``host``, ``port`` (the ssl_port when ``ssl`` is set) and ``mng_port``; explicit keys win."""
        opts = dict(options)
        opts.setdefault("host", endpoint.host)
        if "port" not in opts:
            opts["port"] = endpoint.ssl_port if opts.get("ssl") and endpoint.ssl_port else endpoint.port
        if "mng_port" not in opts and endpoint.mng_port:
            opts["mng_port"] = endpoint.mng_port
        return opts

    @classmethod
    def describe_options(cls, options: Mapping[str, Any]) -> str:
        o = {**cls.option_defaults, **options}
        return (
            f"RabbitMQ at {o['host']}: AMQP{'S' if o['ssl'] else ''} port {o['port']}, "
            f"management port {o['mng_port']}, user {o['user']!r}"
        )

    @classmethod
    def doctor_checks(
        cls, options: Mapping[str, Any], *, routes: RouteTable | None, party: Party | None, timeout: float
    ) -> list[Check]:
        # Only a party that says it never federates (mode=shared given) can do without the plugins.
        shared_only = options.get("mode") == "shared"
        return rabbit_checks({**cls.option_defaults, **options}, timeout, shared_only=shared_only)

    @classmethod
    def probe_options(
        cls, options: Mapping[str, Any], *, routes: RouteTable | None, party: Party | None
    ) -> dict[str, Any]:
        return {**options, "mode": "shared"}  # both probe parties live on this one node

    def cleanup_target(self) -> str:
        return f"RabbitMQ management API at {self.management.admin().base_url}"

    def inventory(self) -> list[str]:
        return self.management.inventory()


def rabbit_checks(o: Mapping[str, Any], timeout: float, *, shared_only: bool) -> list[Check]:
    """Doctor's checks of the node that the options ``o`` (defaults applied) point at."""
    host, port, mng_port, user = str(o["host"]), int(o["port"]), int(o["mng_port"]), str(o["user"])
    checks = [_amqp_check(host, port, o.get("ssl"), timeout)]
    admin = RabbitAdmin(f"http://{url_host(host)}:{mng_port}", user, str(o["password"]), timeout=timeout)
    try:
        overview = admin.overview()
    except BackendError as exc:
        checks.append(_management_failure(admin, user, exc))
        skipped = "not checked: the management API did not answer"
        return [*checks, Check("administrator", "skip", skipped), Check("plugins", "skip", skipped)]
    version, node = overview.get("rabbitmq_version", "?"), overview.get("node", "?")
    checks.append(
        Check("management API", "ok", f"{admin.base_url}: RabbitMQ {version} on node {node}, user {user!r} accepted")
    )
    checks.append(_administrator_check(admin, user))
    checks.append(_plugins_check(admin, shared_only, timeout))
    return checks


def _management_failure(admin: RabbitAdmin, user: str, exc: BackendError) -> Check:
    name = "management API"
    if exc.status == 401:
        return Check(
            name,
            "fail",
            f"{admin.base_url} refused user {user!r} (HTTP 401): wrong user or password",
            "pass the broker administrator's credentials: --option user=NAME --option password=SECRET",
        )
    if exc.status is None:
        return Check(
            name,
            "fail",
            f"unreachable: {exc}",
            "enable the management plugin (rabbitmq-plugins enable rabbitmq_management) and "
            "check --option mng_port (default 15672)",
        )
    return Check(name, "fail", str(exc), "the broker's reason is in the message")


def _administrator_check(admin: RabbitAdmin, user: str) -> Check:
    tags = admin.whoami().get("tags") or []
    tag_list = [t.strip() for t in tags.split(",")] if isinstance(tags, str) else [str(t) for t in tags]
    if "administrator" in tag_list:
        return Check("administrator", "ok", f"user {user!r} is tagged administrator")
    return Check(
        "administrator",
        "fail",
        f"user {user!r} has tags {tag_list or 'none'}: fedtransport creates a vhost, users, "
        "permissions, policies and federation upstreams per job, which needs administrator",
        f"rabbitmqctl set_user_tags {user} administrator (or use another account)",
    )


def _plugins_check(admin: RabbitAdmin, shared_only: bool, timeout: float) -> Check:
    try:
        plugins = admin.enabled_plugins(wait=max(timeout, 15.0))
    except BackendError as exc:
        return Check("plugins", "fail", str(exc), "enable management statistics on the node")
    missing = [p for p in _PLUGINS if p not in plugins]
    if not missing:
        return Check(
            "plugins", "ok", "rabbitmq_management, rabbitmq_federation and rabbitmq_federation_management are enabled"
        )
    why = (
        "needed by federated mode (each party on its own broker)"
        if "rabbitmq_federation" in missing
        else "needed to show federation link status"
    )
    return Check(
        "plugins",
        "warn" if shared_only else "fail",
        f"not enabled: {', '.join(missing)} ({why})",
        f"rabbitmq-plugins enable {' '.join(missing)}",
    )


def _amqp_check(host: str, port: int, ssl_opts: Any, timeout: float) -> Check:
    name = "AMQP listener"
    tls = None
    sni = None
    if ssl_opts:
        try:
            tls = tls_context(ssl_opts.get("ca_file"), ssl_opts.get("cert_file"), ssl_opts.get("key_file"))
        except ConfigError as exc:
            return Check(name, "fail", str(exc), "correct the paths in --option ssl={...}")
        sni = ssl_opts.get("server_hostname") or host
    try:
        with connect(host, port, timeout, tls, sni) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")  # protocol header of AMQP 0-9-1
            head = read_exactly(sock, 7)
    except OSError as exc:
        detail, fix = socket_problem(host, port, exc, timeout)
        return Check(name, "fail", detail, fix)
    if head[:1] == b"\x01":  # a method frame: connection.start
        return Check(name, "ok", f"{host}:{port} answers AMQP 0-9-1" + (f" over TLS as {sni}" if tls else ""))
    if head.startswith(b"AMQP"):
        return Check(
            name,
            "fail",
            f"{host}:{port} speaks another AMQP version ({head!r})",
            "fedtransport needs RabbitMQ's AMQP 0-9-1 listener",
        )
    return Check(
        name,
        "fail",
        f"{host}:{port} answered {head[:16]!r}, which is not AMQP",
        "is this the AMQP port (5672, or 5671 with --option ssl=...)?",
    )
