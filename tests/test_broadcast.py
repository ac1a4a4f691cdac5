"""Broadcast once (fedtransport/broadcast.py) on real RabbitMQ nodes and the real Pulsar broker.

A ``remote`` to several parties publishes the object's messages once; what the sender put on
the wire is read back from the broker's own statistics (RabbitMQ management API, Pulsar admin
topic stats), never from the client under test. The attacks come from another party of the
job, or from anyone who can write to the broker's queues and topics (a Pulsar without
authorisation; on RabbitMQ the test publishes as the node's administrator, since a party's
data user cannot write to another party's queues at all).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pika
import pulsar
import pytest
from conftest import ARBITER, GUEST, HOST
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from standalone_fixtures import admin_read

import fedtransport as ft
import fedtransport.broadcast as bc
from fedtransport.brokers import RabbitNode
from fedtransport.brokers.standalone import PulsarStandalone
from fedtransport.codec import Compressor, PayloadCodec, encode_object
from fedtransport.framing import (
    BROADCAST,
    FrameWriter,
    UnitChunker,
    frame_units,
    job_fingerprint,
    parse_frame,
    transfer_id,
)
from fedtransport.identity import public_key_text
from fedtransport.transfer import KIND_BROADCAST
from fedtransport.transport import JobContext
from fedtransport.transport.base import BROADCAST_LANE
from fedtransport.transport.pulsar import PulsarTransport
from fedtransport.transport.pulsar.admin import PulsarAdmin
from fedtransport.transport.pulsar.options import PULSAR_OPTIONS
from fedtransport.transport.rabbitmq import RabbitTransport

try:
    from tests.rabbit_fixtures import (  # fixtures are used by parameter name
        admin_of,
        rabbit_certs,
        rabbit_node,
        rabbit_opts,
        rabbit_pool,
        rabbit_trio,
        requires_rabbitmq,
    )
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from rabbit_fixtures import (  # type: ignore[no-redef]  # noqa: F401
        admin_of,
        rabbit_certs,
        rabbit_node,
        rabbit_opts,
        rabbit_pool,
        rabbit_trio,
        requires_rabbitmq,
    )

pytestmark = pytest.mark.timeout(600)

GUARD = ft.Party("guard", "10002")  # a fourth party
SECRET = "a job secret every party of the test job sets"
MIB = 1 << 20
PULSAR_DEFAULTS = PULSAR_OPTIONS.validate({}, "test")
CHUNK = 1 * MIB  # max_message_size of these tests: an 8 MiB object is ~9 messages


def big_value(seed: int, mib: int = 8) -> np.ndarray:
    """Half random (incompressible), half runs: compression and striping both happen."""
    rng = np.random.default_rng(seed)
    n = mib * MIB // 8
    return np.concatenate([rng.random(n // 2), np.repeat(np.arange(n // 2 // 64, dtype=np.float64), 64)])


def settled(what: str, read: Callable[[], int], at_least: int, timeout: float = 60.0) -> int:
    """A broker statistic once it reached ``at_least`` and then stayed put for over a stats
    interval: a sample taken while the counters were still rising would undercount."""
    value = poll(what, lambda: (v := read()) >= at_least and v)
    deadline = time.monotonic() + timeout
    while True:
        since, start = value, time.monotonic()
        while time.monotonic() - start < 6.0:
            time.sleep(0.5)
            value = read()
            if value != since:
                break
        else:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never settled within {timeout} s")


def poll(what: str, check: Callable[[], Any], timeout: float = 45.0) -> Any:
    """``check()``'s first truthy answer: broker statistics lag by up to their interval (5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


# RabbitMQ -------------------------------------------------------------------------------------


KEYS = {p: X25519PrivateKey.generate() for p in (GUEST, HOST, ARBITER, GUARD)}


def sealing(sealed: bool | str, party: ft.Party) -> dict[str, Any]:
    """Options sealing a job: ``True`` with the job secret, ``"pair"`` with pair keys as well."""
    if not sealed:
        return {}
    if sealed == "pair":
        peers = {p.party_id: public_key_text(k) for p, k in KEYS.items() if p != party}
        return {"secret": SECRET, "identity": KEYS[party], "peer_keys": peers}
    return {"secret": SECRET}


def rconnect(job_id: str, party: ft.Party, node: RabbitNode, sealed: bool | str = False, **extra: Any) -> ft.Federation:
    opts = rabbit_opts(node, max_message_size=CHUNK, **sealing(sealed, party), **extra)
    return ft.Federation.connect("rabbitmq", job_id=job_id, party=party, options=opts)


def rtransport(fed: ft.Federation) -> RabbitTransport:
    t = fed.transport
    assert isinstance(t, RabbitTransport)
    return t


def published(node: RabbitNode, fed: ft.Federation) -> int:
    """Messages ``fed``'s party published into its exchange, as the broker counts them."""
    t = rtransport(fed)
    ex = admin_of(node).request("GET", f"/api/exchanges/{_seg(t.vhost)}/{_seg(t.exchange(fed.party))}")
    return int((ex.get("message_stats") or {}).get("publish_in", 0))


def received_bytes(node: RabbitNode, fed: ft.Federation) -> int:
    """Bytes the broker received on ``fed``'s party's connections (its data user's)."""
    t = rtransport(fed)
    conns = admin_of(node).request("GET", "/api/connections")
    return sum(int(c.get("recv_oct", 0)) for c in conns if c.get("user") == t.user_name)


def _seg(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


class Raw:
    """A pika connection to a job's vhost as the node's administrator: reads and writes any queue."""

    def __init__(self, node: RabbitNode, vhost: str) -> None:
        admin_of(node).set_permissions(vhost, node.user, ".*", ".*", ".*")
        creds = pika.PlainCredentials(node.user, node.password)
        params = pika.ConnectionParameters("127.0.0.1", node.port, vhost, creds)
        self.conn = pika.BlockingConnection(params)
        self.ch = self.conn.channel()

    def take(self, queue: str) -> list[bytes]:
        """Every message in ``queue``, removed from it."""
        out = []
        self.ch.queue_declare(queue, durable=True)  # a lane the broadcast did not use may not exist
        while True:
            method, _props, body = self.ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append(body)

    def put(self, queue: str, bodies: list[bytes]) -> None:
        for body in bodies:
            self.ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))

    def depth(self, queue: str) -> int:
        return int(self.ch.queue_declare(queue, durable=True).method.message_count)

    def close(self) -> None:
        self.conn.close()


def bqueues(fed: ft.Federation, src: ft.Party, dst: ft.Party) -> list[str]:
    t = rtransport(fed)
    return [t.queue(src, dst, BROADCAST_LANE + i) for i in range(t.broadcast_lanes)]


@pytest.fixture
def rjob(rabbit_node: RabbitNode, job_id: str) -> Iterator[str]:
    yield job_id
    admin_of(rabbit_node).delete_vhost(f"fedtransport-{job_id}")


@requires_rabbitmq
def test_rabbitmq_queue_names_keep_broadcast_lanes_apart(rabbit_node, rjob):
    with rconnect(rjob, GUEST, rabbit_node) as g:
        t = rtransport(g)
        assert t.queue(GUEST, HOST, 0).endswith(":0")
        assert t.queue(GUEST, HOST, BROADCAST_LANE).endswith(":b0")
        assert t.queue(GUEST, HOST, BROADCAST_LANE + 3).endswith(":b3")
        import re

        incoming = t.names.queue_pattern(GUEST, HOST)
        assert re.fullmatch(incoming, t.queue(GUEST, HOST, BROADCAST_LANE + 3))
        assert t.can_broadcast([HOST, ARBITER])


@requires_rabbitmq
@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_rabbitmq_three_parties_get_one_upload(rabbit_node, rjob, sealed):
    """Three receivers, one upload: the broker counts ~1x the messages and bytes, not 3x."""
    value = big_value(1)
    dsts = [HOST, ARBITER, GUARD]
    with rconnect(rjob, GUEST, rabbit_node, sealed) as g:
        rx = {p: rconnect(rjob, p, rabbit_node, sealed) for p in dsts}
        try:
            early: list[Any] = []  # one receiver waits before the send: the data may come before its head
            waiter = threading.Thread(target=lambda: early.append(rx[HOST].get("w", "0", GUEST, timeout=120)))
            waiter.start()
            g.remote(value, "one", "0", ARBITER)  # one copy, to compare with
            one_msgs, one_bytes = g.stats["messages_sent"], g.stats["bytes_sent"]
            base_msgs = settled("publish stats", lambda: published(rabbit_node, g), one_msgs)
            base_bytes = settled("byte stats", lambda: received_bytes(rabbit_node, g), one_bytes)
            g.remote(value, "w", "0", dsts)
            # The broker's own count of what the sender published: the data once, a head per party.
            msgs = settled("publish stats", lambda: published(rabbit_node, g), base_msgs + one_msgs) - base_msgs
            assert msgs == one_msgs + len(dsts), f"{msgs} messages published for {one_msgs} of data"
            wire = settled("byte stats", lambda: received_bytes(rabbit_node, g), base_bytes + one_bytes) - base_bytes
            assert wire < 1.2 * one_bytes, f"the sender put {wire / one_bytes:.2f}x one copy on the wire"
            rx[ARBITER].get("one", "0", GUEST, timeout=120)
            for p in (ARBITER, GUARD):
                [got] = rx[p].get("w", "0", GUEST, timeout=120)
                np.testing.assert_array_equal(got, value)
            waiter.join(120)
            np.testing.assert_array_equal(early[0][0], value)
            assert all(f.stats["forged_refused"] == 0 for f in rx.values())
        finally:
            for f in rx.values():
                f.close()


@requires_rabbitmq
def test_rabbitmq_broadcast_stored_once_in_queues_named_b(rabbit_node, rjob):
    """Each destination's ``...:b{lane}`` queues hold the data; pair queues hold only the heads."""
    value = big_value(2, 4)
    with rconnect(rjob, GUEST, rabbit_node) as g, rconnect(rjob, HOST, rabbit_node) as h:
        g.remote(value, "w", "0", [HOST, ARBITER])
        raw = Raw(rabbit_node, rtransport(g).vhost)
        try:
            for dst in (HOST, ARBITER):
                assert sum(raw.depth(q) for q in bqueues(g, GUEST, dst)) == g.stats["messages_sent"] - 2
                assert raw.depth(rtransport(g).queue(GUEST, dst, 0)) == 1  # the head
        finally:
            raw.close()
        [got] = h.get("w", "0", GUEST, timeout=60)
        np.testing.assert_array_equal(got, value)


@requires_rabbitmq
def test_rabbitmq_broadcast_larger_than_the_prefetch(rabbit_node, rjob):
    """More unacknowledged data messages per lane than the qos lets through: the receiver holds
    them until the get takes the data, so it must raise the lane's qos rather than stall."""
    value = big_value(14, 40)  # ~10 messages per lane, prefetch 4
    with rconnect(rjob, GUEST, rabbit_node, True) as g, rconnect(rjob, HOST, rabbit_node, True) as h:
        g.remote(value, "w", "0", [HOST, ARBITER])
        [got] = h.get("w", "0", GUEST, timeout=120)
        np.testing.assert_array_equal(got, value)


@requires_rabbitmq
def test_rabbitmq_what_stays_per_destination(rabbit_node, rjob):
    """One destination, a table, an abort: no broadcast queue is ever made."""
    table = ft.Table.from_partitions([[(i, i * 2) for i in range(50)] for _ in range(3)])
    g, h, a = (rconnect(rjob, p, rabbit_node) for p in (GUEST, HOST, ARBITER))
    with g, h, a:
        g.remote(big_value(3, 2), "one", "0", HOST)
        g.remote(table, "t", "0", [HOST, ARBITER])
        h.get("one", "0", GUEST, timeout=60)
        for f in (h, a):
            [t] = f.get("t", "0", GUEST, timeout=60)
            assert t.collect() == table.collect()
        queues = [q["name"] for q in admin_of(rabbit_node).list_queues(rtransport(g).vhost)]
        assert not any(q.rsplit(":", 1)[-1].startswith("b") for q in queues)


@requires_rabbitmq
def test_rabbitmq_cleanup_removes_broadcast_queues(rabbit_node, rjob):
    with rconnect(rjob, GUEST, rabbit_node) as g, rconnect(rjob, HOST, rabbit_node) as h:
        g.remote([1, 2, 3] * 1000, "w", "0", [HOST, ARBITER])
        assert h.get("w", "0", GUEST, timeout=60) == [[1, 2, 3] * 1000]
        made = set(bqueues(g, GUEST, HOST) + bqueues(g, GUEST, ARBITER))
        inventory = set(rtransport(g).inventory())
        assert {f"queue {q}" for q in made if ":b0" in q} <= inventory
    g.cleanup()
    a = admin_of(rabbit_node)
    assert a.get_vhost(rtransport(g).vhost) is None
    assert not [q for q in a.list_queues() if q["name"] in made]


@requires_rabbitmq
def test_rabbitmq_federated_broadcast(rabbit_trio, job_id):
    """Federated mode: one publish on the sender's broker, each destination's broker pulls its copy."""
    nodes = rabbit_trio
    party_of = {GUEST: 0, HOST: 1, ARBITER: 2}
    routes = {
        p.party_id: {"host": "127.0.0.1", "port": n.port, "mng_port": n.mng_port}
        for p, n in ((p, nodes[i]) for p, i in party_of.items())
    }

    def fconnect(p: ft.Party) -> ft.Federation:
        opts = rabbit_opts(nodes[party_of[p]], mode="federated", secret=SECRET, max_message_size=CHUNK)
        return ft.Federation.connect("rabbitmq", job_id=job_id, party=p, route_table=routes, options=opts)

    value = big_value(4, 4)
    feds = {p: fconnect(p) for p in party_of}
    try:
        g = feds[GUEST]
        g.remote(value, "w", "0", [HOST, ARBITER])
        for p in (HOST, ARBITER):
            [got] = feds[p].get("w", "0", GUEST, timeout=120)
            np.testing.assert_array_equal(got, value)
        sent = g.stats["messages_sent"]
        poll("publish stats", lambda: published(nodes[0], g) >= sent)
        assert published(nodes[0], g) == sent  # data once plus two heads, not the data twice
    finally:
        for f in feds.values():
            f.close()
        for f in feds.values():
            f.cleanup()


# attacks (RabbitMQ: written as the node's administrator, see the module docstring) -----------


def forged_frames(like: bytes, value: Any, job_id: str, key: bytes = b"") -> list[bytes]:
    """Broadcast frames of ``value`` under the data id and incarnation of the frame ``like``."""
    header, _ = parse_frame(like)
    unit = encode_object(value)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    codec = PayloadCodec(Compressor(False), AESGCM(key) if key else None)
    w = FrameWriter(job_fingerprint(job_id), header.transfer, 1, codec, header.incarnation, flags=BROADCAST)
    chunker = UnitChunker(unit.parts, unit.size, CHUNK - 200)
    n = len(chunker)
    out = []
    for i in range(n):
        offset, data = chunker.pieces(i)
        out.append(w.frame(stream=0, unit=0, seq=i, offset=offset, unit_len=unit.size, chunk=data, last=i == n - 1))
    return out


def capture_heads(fed: ft.Federation) -> list[bc.BroadcastHead]:
    """The heads ``fed`` is given (a party of the job that got the broadcast knows its head)."""
    heads: list[bc.BroadcastHead] = []
    expect = fed._broadcasts._expect

    def spy(src: ft.Party, head: bc.BroadcastHead) -> Any:
        heads.append(head)
        return expect(src, head)

    fed._broadcasts._expect = spy  # type: ignore[method-assign]
    return heads


@requires_rabbitmq
@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_rabbitmq_swapped_data_is_refused(rabbit_node, rjob, sealed):
    """Another destination of the broadcast (it holds the data key) swaps the data in a peer's
    queues for its own: the digest from the sender's sealed head refuses it."""
    value, evil = big_value(5, 2), {"evil": "value"}
    g, h, attacker = (rconnect(rjob, p, rabbit_node, sealed) for p in (GUEST, HOST, ARBITER))
    with g, h, attacker:
        heads = capture_heads(attacker)
        g.remote(value, "w", "0", [HOST, ARBITER])
        [mine] = attacker.get("w", "0", GUEST, timeout=60)
        np.testing.assert_array_equal(mine, value)
        raw = Raw(rabbit_node, rtransport(g).vhost)
        try:
            real = [m for q in bqueues(g, GUEST, HOST) for m in raw.take(q)]
            assert real
            raw.put(bqueues(g, GUEST, HOST)[0], forged_frames(real[0], evil, rjob, heads[0].key))
        finally:
            raw.close()
        with pytest.raises(ft.IntegrityError, match="SHA-256"):
            h.get("w", "0", GUEST, timeout=60)
        assert h.stats["forged_refused"] >= 1


def junk_frames(job_id: str, nbytes: int) -> list[bytes]:
    """Broadcast frames of ``nbytes`` of random data under a fresh data id that no head names."""
    data = os.urandom(nbytes)
    w = FrameWriter(job_fingerprint(job_id), os.urandom(16), 1, PayloadCodec(Compressor(False), None), flags=BROADCAST)
    chunker = UnitChunker([memoryview(data)], nbytes, CHUNK - 200)
    n = len(chunker)
    out = []
    for i in range(n):
        offset, chunk = chunker.pieces(i)
        out.append(w.frame(stream=0, unit=0, seq=i, offset=offset, unit_len=nbytes, chunk=chunk, last=i == n - 1))
    return out


@requires_rabbitmq
def test_rabbitmq_data_waiting_for_heads_is_bounded(rabbit_node, rjob):
    """A party of the job broadcasts data that no head ever names: the receiver holds at most
    ``max_broadcast_held`` of it, drops (acknowledges) the rest, counts it in ``forged_refused``;
    honest broadcasts under the bound still arrive, and one over it fails its get clearly."""
    bound = 3 * MIB
    g = rconnect(rjob, GUEST, rabbit_node)
    h = rconnect(rjob, HOST, rabbit_node, max_broadcast_held=bound)
    attacker = rconnect(rjob, ARBITER, rabbit_node)
    with g, h, attacker:
        attacker.remote("hello", "x", "0", [HOST, GUEST])
        assert h.get("x", "0", ARBITER, timeout=60) == ["hello"]  # HOST listens to ARBITER's broadcast lanes
        junk = junk_frames(rjob, 8 * MIB)  # 9 messages, never named by a head
        rtransport(attacker).send_broadcast([HOST, GUEST], BROADCAST_LANE, junk)
        poll("the junk refused", lambda: h.stats["forged_refused"] >= 1)
        # The broker's count, held (unacknowledged) or ready: HOST let go of every junk message.
        mgmt, vhost = admin_of(rabbit_node), rtransport(g).vhost
        queues = bqueues(g, ARBITER, HOST)
        poll(
            "the junk acknowledged",
            lambda: sum((mgmt.get_queue(vhost, q) or {}).get("messages", 1) for q in queues) == 0,
        )
        assert h._broadcasts._held.get(ARBITER, 0) <= bound

        honest = np.random.default_rng(21).integers(
            0, 256, 2 * MIB, dtype=np.uint8
        )  # waits for its get, under the bound
        attacker.remote(honest, "y", "0", [HOST, GUEST])
        [got] = h.get("y", "0", ARBITER, timeout=60)
        np.testing.assert_array_equal(got, honest)

        refused = h.stats["forged_refused"]
        attacker.remote(np.random.default_rng(22).integers(0, 256, 5 * MIB, dtype=np.uint8), "z", "0", [HOST, GUEST])
        poll("the large broadcast dropped", lambda: h.stats["forged_refused"] > refused)
        with pytest.raises(ft.IntegrityError, match="max_broadcast_held"):
            h.get("z", "0", ARBITER, timeout=60)
        assert h._broadcasts._held.get(ARBITER, 0) == 0


@requires_rabbitmq
def test_rabbitmq_wrong_digest_is_refused(rabbit_node, rjob, monkeypatch):
    """A head whose digest does not match the data (a sender bug, or data changed on the way)."""
    with rconnect(rjob, GUEST, rabbit_node, True) as g, rconnect(rjob, HOST, rabbit_node, True) as h:
        real = bc.digest_of
        monkeypatch.setattr(bc, "digest_of", lambda parts: bytes(32))
        g.remote(big_value(6, 1), "w", "0", [HOST, ARBITER])
        monkeypatch.setattr(bc, "digest_of", real)
        with pytest.raises(ft.IntegrityError, match="SHA-256"):
            h.get("w", "0", GUEST, timeout=60)


@requires_rabbitmq
def test_rabbitmq_forged_head_is_refused(rabbit_node, rjob):
    """A head on the sender's pair queue that the sender did not seal fails authentication."""
    g, h, attacker = (rconnect(rjob, p, rabbit_node, "pair") for p in (GUEST, HOST, ARBITER))
    with g, h, attacker:
        # The attacker broadcasts data of its own, and forges GUEST's head naming it, sealed
        # with the only key it has towards HOST (its own pair's).
        heads = capture_heads(attacker)
        g.remote(0, "x", "0", [HOST, ARBITER])
        attacker.get("x", "0", GUEST, timeout=60)
        raw = Raw(rabbit_node, rtransport(g).vhost)
        try:
            evil = forged_frames(raw.take(bqueues(g, GUEST, HOST)[0])[0], {"evil": 1}, rjob)
            raw.put(bqueues(g, GUEST, HOST)[0], evil)
            header, _ = parse_frame(evil[0])
            digest = bc.digest_of(encode_object({"evil": 1}).parts)
            head = bc.BroadcastHead(
                header.transfer,
                header.incarnation,
                len(b"".join(bytes(p) for p in encode_object({"evil": 1}).parts)),
                digest,
                heads[0].key,
            )
            tid = transfer_id(rjob, "w", "0", str(GUEST), str(HOST))
            w = FrameWriter(job_fingerprint(rjob), tid, 1, attacker._transform(ARBITER, HOST))
            forged = list(frame_units(w, 0, [(head.pack(), 0)], CHUNK - 200, aux=KIND_BROADCAST))
            raw.put(rtransport(g).queue(GUEST, HOST, 0), forged)  # on GUEST -> HOST
        finally:
            raw.close()
        with pytest.raises(ft.IntegrityError):
            h.get("w", "0", GUEST, timeout=60)


@requires_rabbitmq
def test_rabbitmq_replayed_data_is_dropped(rabbit_node, rjob):
    """Data of an earlier broadcast, replayed: never taken for a later one, and acknowledged
    (dropped from the queue), not held."""
    first, second = big_value(7, 2), big_value(8, 2)
    with rconnect(rjob, GUEST, rabbit_node, True) as g, rconnect(rjob, HOST, rabbit_node, True) as h:
        raw = Raw(rabbit_node, rtransport(g).vhost)
        try:
            g.remote(first, "w", "1", [HOST, ARBITER])
            queues = bqueues(g, GUEST, HOST)
            copies = {q: raw.take(q) for q in queues}
            for q, bodies in copies.items():
                raw.put(q, bodies)
            [got] = h.get("w", "1", GUEST, timeout=60)
            np.testing.assert_array_equal(got, first)
            for q, bodies in copies.items():  # replayed ahead of the next broadcast
                raw.put(q, bodies)
            g.remote(second, "w", "2", [HOST, ARBITER])
            [got] = h.get("w", "2", GUEST, timeout=60)
            np.testing.assert_array_equal(got, second)
            # Ready or held unacknowledged, as the broker counts them: the replay must be gone.
            mgmt = admin_of(rabbit_node)
            vhost = rtransport(g).vhost
            poll(
                "the replay dropped",
                lambda: sum((mgmt.get_queue(vhost, q) or {}).get("messages", 1) for q in queues) == 0,
            )
        finally:
            raw.close()


@requires_rabbitmq
def test_rabbitmq_frames_on_the_wrong_kind_of_lane_are_refused(rabbit_node, rjob):
    """A broadcast data frame on a pair queue, and a pair frame on a broadcast queue: refused, counted."""
    with rconnect(rjob, GUEST, rabbit_node, True) as g, rconnect(rjob, HOST, rabbit_node, True) as h:
        raw = Raw(rabbit_node, rtransport(g).vhost)
        try:
            g.remote(big_value(9, 1), "w", "0", [HOST, ARBITER])
            data = raw.take(bqueues(g, GUEST, ARBITER)[0])
            g.remote("pair", "p", "0", HOST)
            pair = raw.take(rtransport(g).queue(GUEST, HOST, 0))
            assert len(pair) == 2  # the broadcast's head, and the pair transfer
            raw.put(rtransport(g).queue(GUEST, HOST, 0), [*pair, data[0]])
            raw.put(bqueues(g, GUEST, HOST)[0], [pair[1]])
        finally:
            raw.close()
        h.get("w", "0", GUEST, timeout=60)
        assert h.get("p", "0", GUEST, timeout=60) == ["pair"]
        poll("both refusals counted", lambda: h.stats["forged_refused"] >= 2, timeout=30)


# Pulsar (shared mode) -------------------------------------------------------------------------


@pytest.fixture
def broker(pulsar_standalone: PulsarStandalone, job_id: str) -> Iterator[PulsarStandalone]:
    """The session's broker; the test's namespace is gone afterwards, whatever the test did."""
    yield pulsar_standalone
    PulsarAdmin(pulsar_standalone.admin_url).delete_namespace("fl-tenant", job_id)


def pconnect(job_id: str, party: ft.Party, broker: PulsarStandalone, sealed: bool | str = False) -> ft.Federation:
    opts = {"service_url": broker.service_url, "admin_url": broker.admin_url, "max_message_size": CHUNK}
    opts.update(sealing(sealed, party))
    return ft.Federation.connect("pulsar", job_id=job_id, party=party, options=opts)


def ptopic(job_id: str, name: str) -> str:
    return f"persistent://fl-tenant/{job_id}/{name}"


def produced(broker: PulsarStandalone, job_id: str, src: ft.Party) -> tuple[int, int]:
    """(messages, bytes) published on ``src``'s topics, from the broker's topic statistics."""
    msgs = nbytes = 0
    for topic in admin_read(broker, f"/admin/v2/persistent/fl-tenant/{job_id}") or []:
        if topic.startswith(ptopic(job_id, f"{src.role}-{src.party_id}-")):
            stats = admin_read(broker, f"/admin/v2/persistent/{topic.split('://', 1)[1]}/stats") or {}
            msgs += int(stats.get("msgInCounter", 0))
            nbytes += int(stats.get("bytesInCounter", 0))
    return msgs, nbytes


class Intruder:
    """Anyone who can reach a Pulsar without authorisation: reads and writes any topic."""

    def __init__(self, broker: PulsarStandalone) -> None:
        self.client = pulsar.Client(broker.service_url)

    def read(self, topic: str, count: int) -> list[pulsar.Message]:
        return self.take(topic, "intruder", count)

    def take(self, topic: str, subscription: str, count: int) -> list[pulsar.Message]:
        """The first ``count`` messages on ``subscription`` (anyone's), acknowledged there."""
        c = self.client.subscribe(
            topic,
            subscription,
            consumer_type=pulsar.ConsumerType.Shared,
            initial_position=pulsar.InitialPosition.Earliest,
        )
        try:
            out = [c.receive(timeout_millis=30000) for _ in range(count)]
            for m in out:
                c.acknowledge(m)
            return out
        finally:
            c.close()

    def write(self, topic: str, bodies: list[bytes], properties: dict[str, str] | None = None) -> None:
        p = self.client.create_producer(topic, batching_enabled=False)
        for body in bodies:
            p.send(body, properties=properties or {})
        p.close()

    def close(self) -> None:
        self.client.close()


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_pulsar_three_parties_get_one_upload(broker, job_id, sealed):
    """Shared mode: one topic per source and lane, published once; each destination reads it."""
    value = big_value(11)
    dsts = [HOST, ARBITER, GUARD]
    feds = {p: pconnect(job_id, p, broker, sealed) for p in [GUEST, *dsts]}
    try:
        g = feds[GUEST]
        g.remote(value, "one", "0", ARBITER)  # one copy, to compare with
        base_msgs, base_bytes = produced(broker, job_id, GUEST)
        g.remote(value, "w", "0", dsts)
        msgs, nbytes = produced(broker, job_id, GUEST)
        assert msgs - base_msgs == base_msgs + len(dsts), "the data once, and a head per destination"
        assert nbytes - base_bytes < 1.2 * base_bytes, f"{(nbytes - base_bytes) / base_bytes:.2f}x one copy"
        assert ptopic(job_id, "guest-9999-all-0") in admin_read(broker, f"/admin/v2/persistent/fl-tenant/{job_id}")
        feds[ARBITER].get("one", "0", GUEST, timeout=120)
        for p in dsts:
            [got] = feds[p].get("w", "0", GUEST, timeout=120)
            np.testing.assert_array_equal(got, value)
    finally:
        for f in feds.values():
            f.close()


def test_pulsar_destinations_skip_broadcasts_for_others(broker, job_id):
    """A party reading the source's broadcast topic takes only what ``ft-to`` addresses to it."""
    feds = {p: pconnect(job_id, p, broker) for p in (GUEST, HOST, ARBITER, GUARD)}
    try:
        g = feds[GUEST]
        g.remote("for host and arbiter", "x", "0", [HOST, ARBITER])
        g.remote("for guard and host", "y", "0", [GUARD, HOST])
        assert feds[GUARD].get("y", "0", GUEST, timeout=60) == ["for guard and host"]
        assert feds[HOST].get("x", "0", GUEST, timeout=60) == ["for host and arbiter"]
        assert feds[HOST].get("y", "0", GUEST, timeout=60) == ["for guard and host"]
        assert feds[ARBITER].get("x", "0", GUEST, timeout=60) == ["for host and arbiter"]
        assert feds[GUARD].stats["forged_refused"] == 0
    finally:
        for f in feds.values():
            f.close()


def test_pulsar_cleanup_removes_broadcast_topics(broker, job_id):
    with pconnect(job_id, GUEST, broker) as g, pconnect(job_id, HOST, broker) as h:
        g.remote(list(range(1000)), "w", "0", [HOST, ARBITER])
        assert h.get("w", "0", GUEST, timeout=60) == [list(range(1000))]
        assert ptopic(job_id, "guest-9999-all-0") in admin_read(broker, f"/admin/v2/persistent/fl-tenant/{job_id}")
    g.cleanup()
    assert admin_read(broker, f"/admin/v2/namespaces/fl-tenant/{job_id}") is None


def test_pulsar_direct_sends_per_destination_replication_broadcasts(job_id):
    """Replication mode broadcasts (tests/test_pulsar_replication.py); direct mode cannot (docs/pulsar.md)."""
    routes = ft.RouteTable.load({p.party_id: {"host": "127.0.0.1", "port": 6650} for p in (GUEST, HOST, ARBITER)})
    for mode, can in (("direct", False), ("replication", True)):
        opts = {"mode": mode, "service_url": "pulsar://127.0.0.1:6650", "admin_url": "http://127.0.0.1:8080"}
        ctx = JobContext(job_id, GUEST, routes, {**PULSAR_DEFAULTS, **opts}, 4 * MIB, 4)
        assert PulsarTransport(ctx).can_broadcast([HOST, ARBITER]) is can, mode


def test_pulsar_frames_on_the_wrong_kind_of_topic_are_refused(broker, job_id):
    """Anyone writing to the broker copies a broadcast frame onto a pair topic and a pair frame
    onto a broadcast topic: both refused and counted, and the real transfers still arrive."""
    intruder = Intruder(broker)
    try:
        with pconnect(job_id, GUEST, broker, True) as g, pconnect(job_id, HOST, broker, True) as h:
            g.remote(big_value(12, 1), "w", "0", [HOST, ARBITER])
            h.get("w", "0", GUEST, timeout=60)  # HOST listens to GUEST's broadcast topics from now on
            [data] = intruder.read(ptopic(job_id, "guest-9999-all-0"), 1)
            [head] = intruder.read(ptopic(job_id, "guest-9999-host-10000-0"), 1)
            intruder.write(ptopic(job_id, "guest-9999-host-10000-0"), [data.data()])
            intruder.write(ptopic(job_id, "guest-9999-all-1"), [head.data()], {"ft-to": "host:10000"})
            g.remote("after", "p", "0", [HOST, ARBITER])
            assert h.get("p", "0", GUEST, timeout=60) == ["after"]
            poll("both refusals counted", lambda: h.stats["forged_refused"] >= 2, timeout=30)
    finally:
        intruder.close()


def test_pulsar_swapped_data_is_refused(broker, job_id):
    """A destination of the broadcast (it holds the data key) swaps the data a peer will read:
    on a Pulsar without authorisation it takes the real message off the peer's subscription and
    writes its own. The digest in the sender's sealed head refuses the forgery."""
    intruder = Intruder(broker)
    try:
        g, attacker = pconnect(job_id, GUEST, broker, True), pconnect(job_id, ARBITER, broker, True)
        with g, attacker:
            heads = capture_heads(attacker)
            value = np.arange(10_000.0)  # one message: one lane
            g.remote(value, "w", "0", [HOST, ARBITER])
            attacker.get("w", "0", GUEST, timeout=60)
            [real] = intruder.take(ptopic(job_id, "guest-9999-all-0"), "fedtransport-host-10000", 1)
            evil = forged_frames(real.data(), {"evil": 1}, job_id, heads[0].key)
            intruder.write(ptopic(job_id, "guest-9999-all-0"), evil, {"ft-to": "host:10000"})
            with pconnect(job_id, HOST, broker, True) as h:
                with pytest.raises(ft.IntegrityError, match="SHA-256"):
                    h.get("w", "0", GUEST, timeout=60)
                assert h.stats["forged_refused"] >= 1
    finally:
        intruder.close()


@requires_rabbitmq
def test_rabbitmq_a_sender_that_aborts_wakes_a_get_waiting_for_broadcast_data(rabbit_node, rjob):
    """The head is in, the data is not (taken off the queues): the sender's abort ends the wait
    with PeerAborted, as for any transfer, instead of a timeout."""
    with rconnect(rjob, GUEST, rabbit_node, True) as g, rconnect(rjob, HOST, rabbit_node, True) as h:
        g.remote(big_value(15, 1), "w", "0", [HOST, ARBITER])
        raw = Raw(rabbit_node, rtransport(g).vhost)
        try:
            assert sum(len(raw.take(q)) for q in bqueues(g, GUEST, HOST)) > 0
        finally:
            raw.close()
        outcome: list[BaseException] = []

        def get() -> None:
            try:
                h.get("w", "0", GUEST, timeout=90)
            except BaseException as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=get)
        waiter.start()
        poll("the get waiting for the data", lambda: h._broadcasts._data)
        g.abort("the sender gives up")
        waiter.join(120)
        assert len(outcome) == 1 and isinstance(outcome[0], ft.PeerAborted), outcome
        assert outcome[0].reason == "the sender gives up"


def test_a_backend_that_cannot_broadcast_refuses_with_a_federation_error(job_id):
    """The memory backend declares no broadcast: remote() sends per destination, and a direct
    call of the hook (a caller that skipped can_broadcast) gets a BackendError, not a bare error."""
    with ft.Federation.connect("memory", job_id=job_id, party=GUEST) as g:
        assert not g.transport.can_broadcast([HOST, ARBITER])
        with pytest.raises(ft.BackendError, match="cannot broadcast"):
            g.transport.send_broadcast([HOST, ARBITER], 0, [b"x"])
