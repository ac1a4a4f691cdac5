"""RabbitMQ backend against real nodes (tests/rabbit_fixtures.py): shared, federated, TLS, SNI proxy."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pika
import pika.exceptions
import pytest
from conftest import ARBITER, GUEST, HOST
from party_proc import big_array, digest, gate, receiver, wait_for
from relay import Relay, ipv6_loopback

import fedtransport as ft
from fedtransport.brokers import HAProxy, RabbitNode
from fedtransport.brokers._process import port_open
from fedtransport.transport import JobContext
from fedtransport.transport.rabbitmq import RabbitTransport

try:
    from tests.rabbit_fixtures import (  # fixtures are used by parameter name
        BootingNode,
        admin_of,
        rabbit_certs,
        rabbit_node,
        rabbit_opts,
        rabbit_pair,
        rabbit_pool,
        rabbit_trio,
        requires_rabbitmq,
    )
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from rabbit_fixtures import (  # type: ignore[no-redef]  # noqa: F401
        BootingNode,
        admin_of,
        rabbit_certs,
        rabbit_node,
        rabbit_opts,
        rabbit_pair,
        rabbit_pool,
        rabbit_trio,
        requires_rabbitmq,
    )

pytestmark = [pytest.mark.rabbitmq, requires_rabbitmq]

SPAWN = mp.get_context("spawn")
SECRET = "a job secret shared by every party"
PARTY_OF = {GUEST: 0, HOST: 1, ARBITER: 2}  # which pool node each party runs in federated tests


def connect(job_id: str, party: ft.Party, node: RabbitNode, routes: Any = None, **extra: Any) -> ft.Federation:
    return ft.Federation.connect(
        "rabbitmq", job_id=job_id, party=party, route_table=routes, options=rabbit_opts(node, **extra)
    )


def route_table(nodes: tuple[RabbitNode, ...]) -> dict[str, dict[str, Any]]:
    """Each party's own node, as operators would list it."""
    return {
        p.party_id: {
            "host": "127.0.0.1",
            "port": nodes[i].port,
            "mng_port": nodes[i].mng_port,
            "ssl_port": nodes[i].ssl_port,
        }
        for p, i in PARTY_OF.items()
        if i < len(nodes)
    }


def federated(job_id: str, party: ft.Party, nodes: tuple[RabbitNode, ...], **extra: Any) -> ft.Federation:
    node = nodes[PARTY_OF[party]]
    return connect(job_id, party, node, route_table(nodes), mode="federated", **extra)


def transport(fed: ft.Federation) -> RabbitTransport:
    t = fed.transport
    assert isinstance(t, RabbitTransport)
    return t


def job_leftovers(node: RabbitNode, vhost: str) -> dict[str, list[str]]:
    """Whatever of a job the management API still shows on ``node``."""
    a = admin_of(node)
    return {
        "vhosts": [v["name"] for v in a.list_vhosts() if v["name"] == vhost],
        "users": [u["name"] for u in a.list_users() if u["name"].startswith(f"{vhost}:")],
        "upstreams": [u["name"] for u in a.list_federation_upstreams() if u["vhost"] == vhost],
        "policies": [p["name"] for p in a.list_policies() if p["vhost"] == vhost],
    }


def connection_users(node: RabbitNode, vhost: str, *, tls: bool | None = None) -> set[str]:
    conns = admin_of(node).request("GET", "/api/connections")
    return {c["user"] for c in conns if c["vhost"] == vhost and (tls is None or c.get("ssl") == tls)}


@pytest.fixture(scope="module")
def booting_node(rabbit_pool) -> Iterator[BootingNode]:
    boot = BootingNode("restart")  # a node of its own for the test that restarts it
    try:
        yield boot
    finally:
        boot.stop()


@pytest.fixture(scope="module")
def pool_nodes(
    booting_node: BootingNode, rabbit_trio: tuple[RabbitNode, RabbitNode, RabbitNode]
) -> tuple[RabbitNode, RabbitNode, RabbitNode]:
    """The three pool nodes; the restart test's own node boots alongside them."""
    return rabbit_trio


@pytest.fixture(scope="module")
def lonely_node(booting_node: BootingNode) -> RabbitNode:
    return booting_node.ready()


# ---------------------------------------------------------------------------- round trips


def test_shared_object_and_table_roundtrip(pool_nodes, job_id):
    node = pool_nodes[0]
    with connect(job_id, GUEST, node) as g, connect(job_id, HOST, node) as h:
        obj = {"w": np.arange(1000.0), "meta": ("lr", 0.1)}
        table = ft.Table.from_partitions([[(f"k{p}{i}", i * p) for i in range(500)] for p in range(4)])
        g.remote(obj, "w", "0", [HOST])
        g.remote(table, "t", "0", [HOST])
        [w] = h.get("w", "0", [GUEST], timeout=30)
        [t] = h.get("t", "0", [GUEST], timeout=30)
        assert np.array_equal(w["w"], obj["w"]) and w["meta"] == ("lr", 0.1)
        assert t == table
        vhost = transport(g).vhost
        queues = {q["name"]: q for q in admin_of(node).list_queues(vhost)}
        present = {f"{job_id}:present:guest:9999", f"{job_id}:present:host:10000"}  # auto-delete, see presence.py
        assert set(queues) == {f"{job_id}:guest:9999:host:10000:{lane}" for lane in range(4)} | present
        assert all(q["durable"] for name, q in queues.items() if name not in present)
        # the data plane runs as the job's own users, not as the admin
        users = {f"{vhost}:guest:9999", f"{vhost}:host:10000"}
        wait_for(lambda: connection_users(node, vhost) == users, "the job users' connections")
    g.cleanup()


def test_lane_qos_rises_for_small_messages_and_falls_for_big_ones(pool_nodes, job_id):
    """Prefetch is in messages: many in flight while they are small, few once they are 4 MiB."""
    node = pool_nodes[0]
    with connect(job_id, GUEST, node) as g, connect(job_id, HOST, node) as h:
        for i in range(60):
            g.remote(i, "small", str(i), [HOST])
        assert [h.get("small", str(i), [GUEST], timeout=30)[0] for i in range(60)] == list(range(60))
        lane0 = transport(h).consumers.lanes[(GUEST, 0)]
        wait_for(lambda: lane0.qos == 64, "prefetch_max")  # reached from prefetch 4
        big = np.random.default_rng(0).random(1 << 20)  # 8 MiB: two full messages on lanes 0 and 1
        g.remote(big, "big", "0", [HOST])
        [back] = h.get("big", "0", [GUEST], timeout=60)
        assert np.array_equal(back, big)
        wait_for(lambda: lane0.qos == 4, "prefetch back at 4")
    g.cleanup()


def test_a_small_remote_wakes_the_io_thread_once(pool_nodes, job_id, monkeypatch):
    """A one-message remote hands its message to the I/O thread and nothing else: the books are
    kept and cleared without hops of their own (each hop was a share of a small transfer's time)."""
    node = pool_nodes[0]
    with connect(job_id, GUEST, node) as g, connect(job_id, HOST, node) as h:
        g.remote(b"warm", "warm", "0", [HOST])  # declares the lane's queue and binding
        io = transport(g).connection
        posted: list[Any] = []
        real_post = io.post

        def counting_post(fn: Any) -> None:
            if threading.get_ident() != io._io_ident:
                posted.append(fn)
            real_post(fn)

        monkeypatch.setattr(io, "post", counting_post)
        for i in range(20):
            before = len(posted)
            g.remote(bytes(1024) + bytes([i]), "small", str(i), [HOST])
            # the message; and, only when its confirm overtook the caller's last step, a forget
            assert len(posted) - before <= 2, [getattr(fn, "func", fn) for fn in posted[before:]]
            wait_for(lambda: transport(g).publisher.in_flight == 0, "the books cleared")
        assert len(posted) <= 25, [getattr(fn, "func", fn) for fn in posted]  # was 3 hops each
        got = [h.get("small", str(i), [GUEST], timeout=30)[0] for i in range(20)]
        assert got == [bytes(1024) + bytes([i]) for i in range(20)]
    g.cleanup()


def test_small_remote_asyncs_are_submitted_without_a_thread_each(pool_nodes, job_id, monkeypatch):
    """300 small remote_async calls at once: each message handed to the I/O thread from the event
    loop and settled at its confirm, never a blocking send; all arrive, and the books are empty."""
    node = pool_nodes[0]
    with connect(job_id, GUEST, node) as g, connect(job_id, HOST, node) as h:
        blocking: list[Any] = []
        real_send = transport(g).publisher.send
        monkeypatch.setattr(transport(g).publisher, "send", lambda *a: blocking.append(a) or real_send(*a))

        async def send_all() -> None:
            values = [{"i": i, "blob": bytes([i % 256]) * 1000} for i in range(300)]
            await asyncio.gather(*(g.remote_async(v, "s", str(v["i"]), [HOST]) for v in values))

        asyncio.run(send_all())
        assert blocking == []
        assert transport(g).publisher.in_flight == 0 and not transport(g).publisher._submitted
        got = [h.get("s", str(i), [GUEST], timeout=60)[0] for i in range(300)]
        assert got == [{"i": i, "blob": bytes([i % 256]) * 1000} for i in range(300)]
    g.cleanup()


def test_a_submit_the_broker_never_confirms_fails_after_send_timeout(lonely_node, job_id):
    """The node frozen (SIGSTOP): no confirm comes. A small remote_async fails within send_timeout
    as a remote would, its claim released; a session closed meanwhile fails its pending submits at
    once. Once the node runs again the same remote_async goes through."""
    node = lonely_node
    with connect(job_id, GUEST, node, send_timeout=2.0) as g, connect(job_id, HOST, node) as h:
        g.remote(b"warm", "warm", "0", [HOST])
        os.kill(node.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(ft.BackendError, match="no publisher confirm"):
                asyncio.run(g.remote_async(b"v", "x", "0", [HOST]))
            assert time.monotonic() - started < 10
        finally:
            os.kill(node.pid, signal.SIGCONT)
        asyncio.run(g.remote_async(b"v", "x", "0", [HOST]))
        assert h.get("x", "0", [GUEST], timeout=60) == [b"v"]
    with connect(job_id, GUEST, node, send_timeout=120.0) as g:
        g.remote(b"warm", "warm", "1", [HOST])
        os.kill(node.pid, signal.SIGSTOP)
        try:
            closing = threading.Thread(target=g.close)  # waits up to 15 s for the frozen node

            async def pending_then_closed() -> list[Any]:
                sends = [asyncio.ensure_future(g.remote_async(i, "p", str(i), [HOST])) for i in range(5)]
                await asyncio.to_thread(wait_for, lambda: len(transport(g).publisher._submitted) == 5, "submitted")
                started = time.monotonic()
                closing.start()
                results = await asyncio.gather(*sends, return_exceptions=True)
                assert time.monotonic() - started < 5
                return results

            results = asyncio.run(pending_then_closed())
            assert all(isinstance(r, ft.BackendError) and "closed" in str(r) for r in results), results
        finally:
            os.kill(node.pid, signal.SIGCONT)
        closing.join(30)
    h2 = connect(job_id, HOST, node)
    h2.cleanup()


def test_federated_object_and_table_roundtrip(pool_nodes, job_id):
    a, b = pool_nodes[0], pool_nodes[1]
    with (
        federated(job_id, GUEST, pool_nodes, secret=SECRET) as g,
        federated(job_id, HOST, pool_nodes, secret=SECRET) as h,
    ):
        table = ft.Table.from_partitions([[(i, str(i) * 10) for i in range(300)] for _ in range(6)])
        for i in range(5):  # several variables: still one upstream and one policy per remote party
            g.remote(np.full(1000, i), "w", str(i), [HOST])
        g.remote(table, "t", "0", [HOST])
        h.remote({"loss": 0.5}, "loss", "0", [GUEST])
        for i in range(5):
            assert np.array_equal(h.get("w", str(i), [GUEST], timeout=60)[0], np.full(1000, i))
        assert h.get("t", "0", [GUEST], timeout=60)[0] == table
        assert g.get("loss", "0", [HOST], timeout=60) == [{"loss": 0.5}]

        vhost = transport(g).vhost
        # guest's messages to host wait on guest's own broker; host's broker pulls them
        assert admin_of(a).get_queue(vhost, f"{job_id}:guest:9999:host:10000:0") is not None
        assert admin_of(b).get_queue(vhost, f"{job_id}:guest:9999:host:10000:0") is not None
        [up] = admin_of(b).list_federation_upstreams(vhost)
        assert up["name"] == "from:guest:9999" and up["value"]["ack-mode"] == "on-confirm"
        assert f"@127.0.0.1:{a.port}/" in up["value"]["uri"]
        # a least-privilege link user on guest's broker, not an admin account
        assert f"{vhost}:link:guest:9999:host:10000" in up["value"]["uri"].replace("%3A", ":")
        fed_policies = [p for p in admin_of(b).list_policies(vhost) if p["name"].startswith("federate:")]
        assert [(p["name"], p["definition"]["federation-upstream"]) for p in fed_policies] == [
            ("federate:guest:9999", "from:guest:9999")
        ]
        links = admin_of(b).wait_federation_links(vhost, upstream="from:guest:9999", count=4, timeout=30)
        assert {link["queue"] for link in links} == {f"{job_id}:guest:9999:host:10000:{lane}" for lane in range(4)}
    g.cleanup()
    h.cleanup()


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine cannot listen on ::1")
def test_federation_between_parties_listed_by_ipv6_address(pool_nodes, job_id):
    """Route hosts "::1" and "[::1]": pika takes the bare address, the management API and the
    federation upstream's URI the bracketed one. The nodes listen on 127.0.0.1; relays on ::1
    are the only way in by the addresses the table lists."""
    a, b = pool_nodes[0], pool_nodes[1]
    with ExitStack() as stack:
        relay = {(n, k): stack.enter_context(Relay("::1", getattr(n, k))) for n in (a, b) for k in ("port", "mng_port")}
        table = {
            p.party_id: {"host": host, "port": relay[n, "port"].port, "mng_port": relay[n, "mng_port"].port}
            for p, n, host in ((GUEST, a, "::1"), (HOST, b, "[::1]"))
        }

        def party(p: ft.Party, node: RabbitNode) -> ft.Federation:
            # its own broker by the address the table lists for it, spelled as the table spells it
            mine = {"host": table[p.party_id]["host"], "port": relay[node, "port"].port,
                    "mng_port": relay[node, "mng_port"].port}  # fmt: skip
            opts = {**mine, "user": node.user, "password": node.password, "mode": "federated", "secret": SECRET}
            return ft.Federation.connect("rabbitmq", job_id=job_id, party=p, route_table=table, options=opts)

        with party(GUEST, a) as g, party(HOST, b) as h:
            assert (transport(g).host, transport(h).host) == ("::1", "::1")
            g.remote(np.arange(1000), "x", "0", [HOST])
            h.remote({"y": 2}, "y", "0", [GUEST])
            assert np.array_equal(h.get("x", "0", [GUEST], timeout=60)[0], np.arange(1000))
            assert g.get("y", "0", [HOST], timeout=60) == [{"y": 2}]
            [up] = admin_of(b).list_federation_upstreams(transport(g).vhost)
            assert f"@[::1]:{relay[a, 'port'].port}/" in up["value"]["uri"]
        g.cleanup()
        h.cleanup()
        # every way in went through the relays: AMQP and HTTP of both parties, and the upstream's link
        assert all(r.accepted for r in relay.values())


def test_federated_three_parties_with_admin_credentials(pool_nodes, job_id):
    # No secret: upstreams use the remote brokers' admin credentials given per party.
    peers = {p.party_id: {"user": n.user, "password": n.password} for p, n in zip(PARTY_OF, pool_nodes, strict=True)}
    feds = [federated(job_id, p, pool_nodes, peer_credentials=peers) for p in (GUEST, HOST, ARBITER)]
    g, h, arb = feds
    try:
        arb.remote({"pubkey": 65537}, "key", "0", [GUEST, HOST])  # one remote to two parties
        g.remote(np.ones(100), "grad", "0", [ARBITER])
        h.remote(np.full(100, 2.0), "grad", "0", [ARBITER])
        assert g.get("key", "0", [ARBITER], timeout=60) == [{"pubkey": 65537}]
        assert h.get("key", "0", [ARBITER], timeout=60) == [{"pubkey": 65537}]
        gg, hg = arb.get("grad", "0", [GUEST, HOST], timeout=60)
        assert gg.sum() == 100 and hg.sum() == 200
        vhost = transport(arb).vhost
        names = sorted(u["name"] for u in admin_of(pool_nodes[2]).list_federation_upstreams(vhost))
        assert names == ["from:guest:9999", "from:host:10000"]
    finally:
        for f in feds:
            f.close()
            f.cleanup()


def test_200_interleaved_transfers_got_in_random_order(pool_nodes, job_id):
    rng = random.Random(11)
    node = pool_nodes[0]
    with connect(job_id, GUEST, node) as g, connect(job_id, HOST, node) as h:
        sent = {}
        for i in range(200):
            value = (
                np.full(rng.randint(0, 3000), i, dtype=np.int32) if i % 2 else {"i": i, "s": "x" * rng.randint(0, 9000)}
            )
            sent[(f"v{i % 7}", str(i))] = value
            g.remote(value, f"v{i % 7}", str(i), [HOST])
        keys = list(sent)
        rng.shuffle(keys)
        for name, tag in keys:
            [v] = h.get(name, tag, [GUEST], timeout=30)
            expected = sent[(name, tag)]
            assert np.array_equal(v, expected) if isinstance(expected, np.ndarray) else v == expected
    g.cleanup()


def test_256_mib_object_over_federation(pool_nodes, job_id):
    arr = big_array(256)
    with (
        federated(job_id, GUEST, pool_nodes, secret=SECRET) as g,
        federated(job_id, HOST, pool_nodes, secret=SECRET) as h,
    ):
        got: dict = {}
        t = threading.Thread(target=lambda: got.update(v=h.get("big", "0", [GUEST], timeout=240)))
        t.start()
        g.remote(arr, "big", "0", [HOST])
        t.join(240)
        assert digest(got["v"][0]) == digest(arr)
    g.cleanup()
    h.cleanup()


def test_get_timeout_names_the_missing_party(pool_nodes, job_id):
    node = pool_nodes[0]
    with connect(job_id, GUEST, node) as g, connect(job_id, HOST, node) as h:
        h.remote(1, "x", "0", [GUEST])
        with pytest.raises(ft.TransferTimeout, match="arbiter:10001") as err:
            g.get("x", "0", [HOST, ARBITER], timeout=1.5)
        assert list(err.value.missing) == ["arbiter:10001"]
    g.cleanup()


# ---------------------------------------------------------------------------- failures


def test_receiver_killed_mid_transfer_gets_it_all_after_restart(pool_nodes, job_id):
    node = pool_nodes[0]
    # One queue per receiver: a process killed while its queue feeder holds the queue's lock
    # would leave that lock taken for every later writer.
    q, q2 = SPAWN.Queue(), SPAWN.Queue()
    args = ("rabbitmq", job_id, ("host", "10000"), ("guest", "9999"), rabbit_opts(node), "w", "0")
    first = SPAWN.Process(target=receiver, args=(*args, q, 8))
    first.start()
    second = None
    a = big_array(96)  # 24 messages, 6 per lane; nothing is acknowledged before the handover
    killed = threading.Event()
    try:
        with connect(job_id, GUEST, node) as g:
            gate(g, 3, killed)  # half of every lane goes out before the receiver dies
            t = threading.Thread(target=g.remote, args=(a, "w", "0", [HOST]))
            t.start()
            kind, n = q.get(timeout=120)
            assert kind == "progress" and n >= 8
            first.kill()  # mid-transfer: nothing acknowledged yet
            first.join(10)
            killed.set()
            t.join(120)
        second = SPAWN.Process(target=receiver, args=(*args, q2))
        second.start()
        kind, got = q2.get(timeout=120)
        second.join(30)
        assert (kind, got) == ("done", digest(a))
    finally:
        killed.set()
        for p in (first, second):
            if p is not None and p.is_alive():
                p.kill()
                p.join(10)
        connect(job_id, GUEST, node).cleanup()


def test_node_restarted_mid_transfer(lonely_node, job_id):
    node = lonely_node
    a = big_array(64)  # 16 messages, 4 per lane
    with connect(job_id, GUEST, node, send_timeout=150.0) as g, connect(job_id, HOST, node, redelivery_after=3.0) as h:
        reached, down = threading.Barrier(5), threading.Event()
        gate(g, 2, down, reached)  # every lane is mid-way when the node goes down
        result: dict = {}
        getter = threading.Thread(target=lambda: result.update(v=h.get("w", "0", [GUEST], timeout=240)))
        getter.start()
        sender = threading.Thread(target=lambda: result.update(sent=g.remote(a, "w", "0", [HOST])))
        sender.start()
        reached.wait(60)
        restarter = threading.Thread(target=node.restart)
        restarter.start()
        deadline = time.monotonic() + 60
        while port_open(node.port) and time.monotonic() < deadline:
            threading.Event().wait(0.05)
        down.set()  # the rest is published while the node is down or booting
        restarter.join(180)
        sender.join(240)
        getter.join(240)
        assert "sent" in result, "remote did not complete after the node came back"
        assert digest(result["v"][0]) == digest(a)
    g.cleanup()


# ---------------------------------------------------------------------------- control plane


def test_job_user_cannot_read_another_jobs_vhost(pool_nodes, job_id):
    node = pool_nodes[0]
    other = f"{job_id}-other"
    with connect(job_id, GUEST, node) as g, connect(other, HOST, node) as h:
        mine, theirs = transport(g), transport(h)
        creds = pika.PlainCredentials(mine.user_name, mine._password)
        params = pika.ConnectionParameters("127.0.0.1", node.port, theirs.vhost, creds, connection_attempts=1)
        with pytest.raises(pika.exceptions.ProbableAccessDeniedError):
            pika.BlockingConnection(params)
        # inside its own vhost it reads only the queues addressed to its party
        params = pika.ConnectionParameters("127.0.0.1", node.port, mine.vhost, creds, connection_attempts=1)
        with pika.BlockingConnection(params) as conn:
            with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="ACCESS_REFUSED"):
                conn.channel().queue_declare(mine.queue(HOST, ARBITER, 0), durable=True)
            ch = conn.channel()
            ch.queue_declare(mine.queue(HOST, GUEST, 0), durable=True)
            ch.basic_get(mine.queue(HOST, GUEST, 0), auto_ack=False)
    g.cleanup()
    h.cleanup()


def test_a_party_cannot_publish_into_another_pairs_queue(pool_nodes, job_id):
    """RabbitMQ checks a publish against its exchange: each party may write only to its own,
    to which only its outgoing queues are bound."""
    node = pool_nodes[0]
    with connect(job_id, GUEST, node) as g, connect(job_id, HOST, node) as h, connect(job_id, ARBITER, node) as a:
        h.remote("to the arbiter", "x", "0", [ARBITER])  # declares host -> arbiter, lane 0, and its binding
        g.remote("to the host", "x", "0", [HOST])  # and guest's exchange
        assert a.get("x", "0", [HOST], timeout=30) == ["to the arbiter"]
        assert h.get("x", "0", [GUEST], timeout=30) == ["to the host"]
        mine = transport(g)
        victim = mine.queue(HOST, ARBITER, 0)
        creds = pika.PlainCredentials(mine.user_name, mine._password)
        params = pika.ConnectionParameters("127.0.0.1", node.port, mine.vhost, creds, connection_attempts=1)
        with pika.BlockingConnection(params) as conn:
            for attempt in (
                lambda ch: ch.basic_publish("", victim, b"forged"),  # the default exchange
                lambda ch: ch.basic_publish(mine.exchange(HOST), victim, b"forged"),  # host's exchange
                lambda ch: ch.queue_bind(victim, mine.exchange(GUEST), routing_key="forged"),  # into our exchange
                lambda ch: ch.exchange_declare(f"{job_id}:forged", "fanout"),
                lambda ch: ch.basic_get(victim),  # reading it
            ):
                ch = conn.channel()
                ch.confirm_delivery()
                with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="ACCESS_REFUSED"):
                    attempt(ch)
            # its own exchange routes only to its own queues: the victim's name is unroutable
            ch = conn.channel()
            ch.confirm_delivery()
            with pytest.raises(pika.exceptions.UnroutableError):
                ch.basic_publish(mine.exchange(GUEST), victim, b"forged", mandatory=True)
        h.remote("again", "x", "1", [ARBITER])
        assert a.get("x", "1", [HOST], timeout=30) == ["again"]  # nothing forged reached the arbiter
    for f in (g, h, a):
        f.cleanup()


def test_cleanup_leaves_no_vhost_user_upstream_or_policy(pool_nodes, job_id):
    a, b = pool_nodes[0], pool_nodes[1]
    g = federated(job_id, GUEST, pool_nodes, secret=SECRET)
    h = federated(job_id, HOST, pool_nodes, secret=SECRET)
    with g, h:
        g.remote("hello", "x", "0", [HOST])
        assert h.get("x", "0", [GUEST], timeout=60) == ["hello"]
    vhost = transport(g).vhost
    before_a, before_b = job_leftovers(a, vhost), job_leftovers(b, vhost)
    assert before_a["users"] == sorted([f"{vhost}:guest:9999", f"{vhost}:link:guest:9999:host:10000"])
    assert before_b["upstreams"] == ["from:guest:9999"]
    assert sorted(before_b["policies"]) == ["federate:guest:9999", "fedtransport-expiry"]
    for _ in range(2):  # idempotent, and after close()
        g.cleanup()
        h.cleanup()
    empty = {"vhosts": [], "users": [], "upstreams": [], "policies": []}
    assert job_leftovers(a, vhost) == empty
    assert job_leftovers(b, vhost) == empty


def test_management_errors_are_backend_errors_with_the_reason(pool_nodes, job_id):
    node = pool_nodes[0]
    with pytest.raises(ft.BackendError) as err:
        connect(job_id, GUEST, node, password="wrong")
    assert err.value.status == 401 and "401" in str(err.value)


def test_a_get_of_what_has_arrived_never_times_out(pool_nodes, job_id):
    """Issue 14: ``get(timeout=0)`` of an object and a table that have fully arrived returns them."""
    from fedtransport.framing import transfer_id

    def arrived(h: ft.Federation, name: str) -> bool:
        inc = h._inbox.entry(GUEST, transfer_id(job_id, name, "0", str(GUEST), str(HOST)))
        return inc is not None and inc.done.done()

    node = pool_nodes[0]
    with connect(job_id, GUEST, node) as g, connect(job_id, HOST, node) as h:
        with pytest.raises(ft.TransferTimeout):
            h.get("x", "0", [GUEST], timeout=0)  # starts listening
        g.remote(big_array(1), "x", "0", [HOST])
        g.remote(ft.Table.from_partitions([[("a", 1)], [("b", 2)]]), "t", "0", [HOST])
        for name in ("x", "t"):
            wait_for(lambda n=name: arrived(h, n), f"{name} to arrive", 60)
        [x] = h.get("x", "0", [GUEST], timeout=0)
        assert digest(x) == digest(big_array(1))
        [t] = h.get("t", "0", [GUEST], timeout=0)
        assert [list(p) for p in t.partitions] == [[("a", 1)], [("b", 2)]]
        g.cleanup()


def everything_listed(node: RabbitNode) -> dict[str, list[str]]:
    a = admin_of(node)
    return {"vhosts": sorted(v["name"] for v in a.list_vhosts()), "users": sorted(u["name"] for u in a.list_users())}


def test_a_connect_that_fails_half_way_removes_what_it_created(pool_nodes, job_id):
    """Issue 14: the management port right, the AMQP port wrong. The vhost and data user made
    before the AMQP connection failed are removed; a peer's vhost and user are left alone."""
    from fedtransport.brokers._process import free_port

    node = pool_nodes[0]
    vhost = f"fedtransport-{job_id}"
    before = everything_listed(node)
    with pytest.raises(ft.BackendError):
        connect(job_id, GUEST, node, port=free_port())
    assert everything_listed(node) == before
    # A peer of the job is connected: the guest's failed connect removes its own user only.
    with connect(job_id, HOST, node) as h:
        with_peer = everything_listed(node)
        assert vhost in with_peer["vhosts"]
        with pytest.raises(ft.BackendError):
            connect(job_id, GUEST, node, port=free_port())
        assert everything_listed(node) == with_peer
        with connect(job_id, GUEST, node) as g:  # the job still works
            g.remote("after", "x", "0", [HOST])
            assert h.get("x", "0", [GUEST], timeout=60) == ["after"]
        h.cleanup()
    assert everything_listed(node) == before


def test_options_are_checked():
    with pytest.raises(ft.ConfigError, match="mode"):
        ft.Federation.connect("rabbitmq", job_id="j", party=GUEST, options={"mode": "multicast"})
    with pytest.raises(ft.ConfigError, match="route_table"):
        ft.Federation.connect("rabbitmq", job_id="j", party=GUEST, options={"mode": "federated"})
    with pytest.raises(ft.ConfigError, match=r"cafile|ca_file"):
        ft.Federation.connect("rabbitmq", job_id="j", party=GUEST, options={"ssl": {"cafile": "x"}})
    with pytest.raises(ft.ConfigError, match="prefetch"):
        ft.Federation.connect("rabbitmq", job_id="j", party=GUEST, options={"prefetch": 0})
    with pytest.raises(ft.ConfigError, match="unknown option"):
        ft.Federation.connect("rabbitmq", job_id="j", party=GUEST, options={"prefech": 4})


def test_names_and_permissions():
    ctx = JobContext("job-1.a", GUEST, None, dict(RabbitTransport.option_defaults), 4 << 20, 4)
    t = RabbitTransport(ctx)
    assert t.vhost == "fedtransport-job-1.a"
    assert t.queue(GUEST, HOST, 3) == "job-1.a:guest:9999:host:10000:3"
    assert t.user_name == "fedtransport-job-1.a:guest:9999"
    assert t.max_unacked_per_lane == RabbitTransport.option_defaults["prefetch"]
    configure, write, read = t.names.data_permissions()
    assert t.exchange(GUEST) == "job-1.a:guest:9999"
    assert [bool(re.match(write, r)) for r in ("job-1.a:guest:9999", "amq.default", "job-1.a:host:10000",
                                              t.queue(GUEST, HOST, 0), t.queue(HOST, ARBITER, 0))] == [
        True, False, False, True, False]  # fmt: skip
    assert re.match(read, t.queue(HOST, GUEST, 0)) and not re.match(read, t.queue(GUEST, HOST, 0))
    assert re.match(read, "job-1.a:guest:9999") and not re.match(read, "job-1.a:host:10000")
    assert re.match(configure, t.queue(GUEST, HOST, 0)) and re.match(configure, t.queue(HOST, GUEST, 1))
    assert not re.match(configure, t.queue(HOST, ARBITER, 0))
    presence = t.names.presence(GUEST)  # its own presence queue only
    assert re.match(configure, presence) and re.match(read, presence) and not re.match(write, presence)
    assert not re.match(configure, t.names.presence(HOST)) and not re.match(read, t.names.presence(HOST))
    assert not re.match(read, t.queue(HOST, GUEST, 0).replace("job-1.a", "job-1xa"))  # dots are literal


# ---------------------------------------------------------------------------- TLS and the SNI proxy


def test_amqps_roundtrip_and_wrong_hostname(pool_nodes, rabbit_certs, job_id):
    node = pool_nodes[0]
    tls = {"ca_file": str(rabbit_certs["ca"]), "server_hostname": "party-a.fate.test"}
    with connect(job_id, GUEST, node, port=node.ssl_port, ssl=tls) as g, connect(job_id, HOST, node) as h:
        assert transport(g).describe().startswith("rabbitmq shared via amqps://")
        g.remote(np.arange(5), "x", "0", [HOST])
        assert np.array_equal(h.get("x", "0", [GUEST], timeout=30)[0], np.arange(5))
        vhost = transport(g).vhost
        wait_for(lambda: connection_users(node, vhost, tls=True) == {transport(g).user_name}, "a TLS connection")
    wrong = {**tls, "server_hostname": "party-z.fate.test"}
    with pytest.raises(ft.BackendError, match=r"(?i)hostname|certificate"):
        connect(job_id, GUEST, node, port=node.ssl_port, ssl=wrong)
    g.cleanup()


def test_federation_through_an_sni_proxy(pool_nodes, rabbit_certs, job_id):
    """A star network: brokers reach each other only through the proxy, by TLS server name."""
    a, b = pool_nodes[0], pool_nodes[1]
    names = {GUEST: "party-a.fate.test", HOST: "party-b.fate.test"}
    routes = {names[GUEST]: ("127.0.0.1", a.ssl_port), names[HOST]: ("127.0.0.1", b.ssl_port)}
    with HAProxy(sni_routes=routes) as proxy:
        # host names that do not resolve: only the proxy can get a connection anywhere
        table = {
            p.party_id: {"host": names[p], "port": 5672, "ssl_port": 5671, "proxy": f"127.0.0.1:{proxy.port}"}
            for p in (GUEST, HOST)
        }

        def party(p: ft.Party, node: RabbitNode) -> ft.Federation:
            tls = {"ca_file": str(rabbit_certs["ca"]), "server_hostname": names[p]}
            return ft.Federation.connect("rabbitmq", job_id=job_id, party=p, route_table=table,
                                         options=rabbit_opts(node, mode="federated", port=node.ssl_port, ssl=tls,
                                                      secret=SECRET))  # fmt: skip

        with party(GUEST, a) as g, party(HOST, b) as h:
            g.remote(np.arange(1000), "x", "0", [HOST])
            h.remote({"y": 2}, "y", "0", [GUEST])
            assert np.array_equal(h.get("x", "0", [GUEST], timeout=60)[0], np.arange(1000))
            assert g.get("y", "0", [HOST], timeout=60) == [{"y": 2}]
            vhost = transport(g).vhost
            [up] = admin_of(b).list_federation_upstreams(vhost)
            uri = up["value"]["uri"]
            assert uri.startswith("amqps://") and f"@127.0.0.1:{proxy.port}/" in uri
            assert "server_name_indication=party-a.fate.test" in uri and "verify=verify_peer" in uri
        g.cleanup()
        h.cleanup()  # the links close: haproxy logs a TCP session when it ends

        def routed() -> bool:
            log = Path(proxy.log).read_text()
            return "sni=party-a.fate.test" in log and "sni=party-b.fate.test" in log

        wait_for(routed, "haproxy to log both links")
