"""The public API end to end on the in-process backend: every layer above the transport."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
from typing import ClassVar

import numpy as np
import pytest
from conftest import ARBITER, GUEST, HOST

import fedtransport as ft
from fedtransport.transfer import cheap_to_encode
from fedtransport.transport.base import Delivery
from fedtransport.transport.memory import MemoryTransport, hub


class _Bytes(bytes):
    """A subclass: its pickling is its own business."""


def connect(job_id, party, **options):
    return ft.Federation.connect("memory", job_id=job_id, party=party, options=options or None)


@pytest.mark.parametrize(
    "obj",
    [b"bytes", "str", {"nested": [1, (2, {3})]}, 2**10000, np.arange(10.0), np.array(3), None],
    ids=["bytes", "str", "nested", "bigint", "array", "0d", "none"],
)
def test_object_roundtrip(memory_pair, obj):
    g, h = memory_pair
    g.remote(obj, name="x", tag="0", parties=[HOST])
    [back] = h.get(name="x", tag="0", parties=[GUEST], timeout=10)
    if isinstance(obj, np.ndarray):
        np.testing.assert_array_equal(back, obj)
    else:
        assert back == obj


def test_64mib_array_roundtrip_over_many_messages(job_id):
    with connect(job_id, GUEST) as g, connect(job_id, HOST) as h:
        a = np.random.default_rng(1).random(8 << 20)
        g.remote(a, "big", "0", [HOST])
        [b] = h.get("big", "0", [GUEST], timeout=60)
        assert np.array_equal(a, b)
        assert g.stats["messages_sent"] >= 16 and h.stats["messages_received"] == g.stats["messages_sent"]


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_a_read_only_array_arrives(job_id, sealed):
    # np.frombuffer over bytes is read-only; pickle hands its out-of-band buffer back as a
    # read-only memoryview, which the array decoder once refused as malformed
    opts = {"secret": "s" * 32} if sealed else {}
    a = np.frombuffer(np.random.default_rng(3).random(1 << 21).tobytes(), dtype=np.float64)
    assert not a.flags.writeable
    with connect(job_id, GUEST, **opts) as g, connect(job_id, HOST, **opts) as h:
        g.remote(a, "ro", "0", [HOST])
        [b] = h.get("ro", "0", [GUEST], timeout=60)
        assert np.array_equal(a, b)


def test_messages_never_exceed_max_message_size(job_id):
    seen = []

    class Spy(MemoryTransport):
        name = "memory-spy"

        def send(self, dst, lane, messages):
            return super().send(dst, lane, (seen.append(len(m)) or m for m in messages))

    ft.register("memory-spy", Spy)
    opts = {"max_message_size": 65536}
    g = ft.Federation.connect("memory-spy", job_id=job_id, party=GUEST, options=opts)
    h = ft.Federation.connect("memory-spy", job_id=job_id, party=HOST, options=opts)
    with g, h:
        g.remote(np.random.default_rng(2).random(100_000), "a", "0", [HOST])
        g.remote(ft.Table.from_partitions([[(i, "v" * 100) for i in range(5000)]]), "t", "0", [HOST])
        h.get("a", "0", [GUEST], timeout=10)
        h.get("t", "0", [GUEST], timeout=10)
    assert len(seen) > 10 and max(seen) <= 65536


def test_tables_empty_and_eight_partitions(memory_pair):
    g, h = memory_pair
    empty = ft.Table.from_partitions([])
    eight = ft.Table.from_partitions([[(f"k{p}-{i}", np.full(3, i)) for i in range(p * 10)] for p in range(8)])
    g.remote(empty, "t", "empty", [HOST])
    g.remote(eight, "t", "eight", [HOST])
    [e] = h.get("t", "empty", [GUEST], timeout=10)
    [t] = h.get("t", "eight", [GUEST], timeout=10)
    assert isinstance(e, ft.Table) and e.num_partitions == 0 and e.collect() == []
    assert t.num_partitions == 8
    for got, sent in zip(t.partitions, eight.partitions, strict=True):
        assert [k for k, _ in got] == [k for k, _ in sent]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, sent, strict=True))
    assert len(t.collect()) == sum(p * 10 for p in range(8))


def test_generator_partitions_are_streamed(memory_pair):
    g, h = memory_pair
    consumed = []

    def part(n):
        for i in range(n):
            consumed.append(i)
            yield (i, i * i)

    g.remote(ft.Table.from_partitions([part(100), part(0), part(7)]), "gen", "0", [HOST])
    [t] = h.get("gen", "0", [GUEST], timeout=10)
    assert [len(p) for p in t.partitions] == [100, 0, 7] and t.partitions[2][6] == (6, 36)


def test_get_before_remote(memory_pair):
    g, h = memory_pair
    result = {}
    waiter = threading.Thread(target=lambda: result.update(v=h.get("late", "0", [GUEST], timeout=10)))
    waiter.start()
    threading.Event().wait(0.2)
    g.remote({"a": 1}, "late", "0", [HOST])
    waiter.join(10)
    assert result["v"] == [{"a": 1}]


def test_200_interleaved_transfers_got_in_random_order(memory_pair):
    g, h = memory_pair
    rng = random.Random(7)
    sent = {}
    for i in range(200):
        value = np.full(rng.randint(0, 5000), i) if i % 3 else {"i": i, "pad": b"x" * rng.randint(0, 10000)}
        name, tag = f"var{i % 13}", f"iter-{i}"
        sent[(name, tag)] = value
        g.remote(value, name, tag, [HOST])
    order = list(sent)
    rng.shuffle(order)
    for name, tag in order:
        [v] = h.get(name, tag, [GUEST], timeout=10)
        expected = sent[(name, tag)]
        assert np.array_equal(v, expected) if isinstance(expected, np.ndarray) else v == expected


def test_three_parties_remote_to_two_at_once(job_id):
    with connect(job_id, GUEST) as g, connect(job_id, HOST) as h, connect(job_id, ARBITER) as a:
        a.remote("pubkey", "key", "0", [GUEST, HOST])
        assert g.get("key", "0", [ARBITER], timeout=5) == ["pubkey"]
        assert h.get("key", "0", [ARBITER], timeout=5) == ["pubkey"]
        g.remote(1, "grad", "0", [ARBITER])
        h.remote(2, "grad", "0", [ARBITER])
        assert a.get("grad", "0", [HOST, GUEST], timeout=5) == [2, 1]  # in the order asked


def test_duplicate_remote_and_get(memory_pair):
    g, h = memory_pair
    g.remote(1, "d", "0", [HOST])
    with pytest.raises(ft.DuplicateTransfer, match="host:10000"):
        g.remote(1, "d", "0", [HOST])
    assert h.get("d", "0", [GUEST], timeout=5) == [1]
    with pytest.raises(ft.DuplicateTransfer):
        h.get("d", "0", [GUEST], timeout=5)
    g.remote(2, "d", "1", [HOST])  # another tag is another transfer
    assert h.get("d", "1", [GUEST], timeout=5) == [2]


class RefusesFirstListen(MemoryTransport):
    """Refuses the first listen of each session, as a broker denying access for a moment would."""

    name = "memory-refusing"

    def listen(self, src, lane, deliver):
        if not getattr(self, "refused", False):
            self.refused = True
            raise ft.BackendError("access refused for a moment")
        super().listen(src, lane, deliver)


def test_a_get_whose_listen_failed_can_be_retried(job_id):
    ft.register("memory-refusing", RefusesFirstListen)
    g = connect(job_id, GUEST)
    h = ft.Federation.connect("memory-refusing", job_id=job_id, party=HOST)
    with g, h:
        g.remote("hello", "r", "0", [HOST])
        with pytest.raises(ft.BackendError, match="refused"):
            h.get("r", "0", [GUEST], timeout=5)
        assert h.get("r", "0", [GUEST], timeout=5) == ["hello"]  # neither claimed nor deaf


def test_timeout_names_the_missing_party_and_can_be_retried(job_id):
    with connect(job_id, GUEST) as g, connect(job_id, HOST) as h, connect(job_id, ARBITER) as a:
        h.remote("from-host", "v", "0", [GUEST])
        with pytest.raises(ft.TransferTimeout) as err:
            g.get("v", "0", [HOST, ARBITER], timeout=0.5)
        assert isinstance(err.value, TimeoutError)
        assert "arbiter:10001" in str(err.value) and "host:10000" not in err.value.missing
        a.remote("from-arbiter", "v", "0", [GUEST])
        assert g.get("v", "0", [HOST, ARBITER], timeout=5) == ["from-host", "from-arbiter"]


class Lossy(MemoryTransport):
    """Drops every message after the first ``keep`` of each send: a sender that died mid-remote."""

    name = "memory-lossy"
    keep = 3

    def send(self, dst, lane, messages):
        return super().send(dst, lane, (m for i, m in enumerate(messages) if i < self.keep))


def test_timeout_on_partial_transfer_says_how_much_arrived(job_id):
    ft.register("memory-lossy", Lossy)
    opts = {"max_message_size": 65536, "lanes": 1}
    g = ft.Federation.connect("memory-lossy", job_id=job_id, party=GUEST, options=opts)
    h = ft.Federation.connect("memory", job_id=job_id, party=HOST, options=opts)
    with g, h:
        g.remote(bytes(np.random.default_rng(0).bytes(1 << 20)), "big", "0", [HOST])
        with pytest.raises(ft.TransferTimeout) as err:
            h.get("big", "0", [GUEST], timeout=1)
        assert err.value.missing == {"guest:9999": "3 messages so far"}


def test_sends_cut_short_are_kept_apart_at_most_two_at_a_time_and_never_mixed(job_id):
    """Each send of a transfer (incarnation) is assembled apart; a third partial send replaces the
    one that went longest without news; the first complete send is the value, whole."""
    from fedtransport.framing import transfer_id
    from fedtransport.inbox import MAX_INCARNATIONS

    ft.register("memory-lossy", Lossy)
    opts = {"max_message_size": 65536, "lanes": 1}
    n = (1 << 20) // 8  # 16 messages a send; Lossy lets through the first 3
    with connect(job_id, HOST, **opts) as h:
        with pytest.raises(ft.TransferTimeout):
            h.get("w", "0", [GUEST], timeout=0.1)
        inc = h._inbox.entry(GUEST, transfer_id(job_id, "w", "0", str(GUEST), str(HOST)))
        for fill in (1.0, 2.0, 3.0):  # three sends, each killed after 3 messages
            with ft.Federation.connect("memory-lossy", job_id=job_id, party=GUEST, options=opts) as g:
                g.remote(np.full(n, fill), "w", "0", [HOST])
            with pytest.raises(ft.TransferTimeout) as err:
                h.get("w", "0", [GUEST], timeout=0.1)
            assert err.value.missing == {"guest:9999": "3 messages so far"}  # the latest send's count
            assert 1 + len(inc.rivals) <= MAX_INCARNATIONS
        assert len(inc.dropped) == 1 and inc.assembly.messages == 3
        with connect(job_id, GUEST, **opts) as g2:
            g2.remote(np.full(n, 4.0), "w", "0", [HOST])
            sent = g2.stats["messages_sent"]
        [value] = h.get("w", "0", [GUEST], timeout=10)
        assert np.array_equal(value, np.full(n, 4.0))
        assert h.stats["messages_received"] == sent > 3  # the value's own send, not the dropped ones'


def four_partitions(value):
    return ft.Table.from_partitions([[(f"k{p}", value)] for p in range(4)])


def test_a_table_whose_send_died_gives_way_to_a_new_send_until_it_is_read(job_id):
    """A table's head arrives from a send that dies (its other partitions never come). The table
    the get returned is made of the first send; while none of it is read, a new send of as many
    partitions takes its place whole; once the caller has read part of it, the new send fails the
    transfer and is left on the broker, which gives it, whole, to the party's next session."""
    import gc

    from party_proc import wait_for

    ft.register("memory-lossy", Lossy)
    opts = {"lanes": 1}  # one lane: the head, partitions 0 and 1 arrive (Lossy keeps 3 messages)
    with connect(job_id, HOST, **opts) as h:
        for tag, read_first in (("untouched", False), ("read", True)):
            with ft.Federation.connect("memory-lossy", job_id=job_id, party=GUEST, options=opts) as g:
                g.remote(four_partitions("first"), "t", tag, [HOST])
            [t] = h.get("t", tag, [GUEST], timeout=10)
            if read_first:
                assert list(t.iter_partition(0)) == [("k0", "first")]
            with connect(job_id, GUEST, **opts) as g2:
                g2.remote(four_partitions("second"), "t", tag, [HOST])
            wait_for(lambda t=tag: arrived(h, "t", t, GUEST), "the new send to take the table's place or fail it", 10)
            if not read_first:
                assert t.partitions == [[(f"k{p}", "second")] for p in range(4)]
                continue
            assert list(t.iter_partition(1)) == [("k1", "first")]  # arrived whole from the first send
            with pytest.raises(ft.FederationError, match="sent again"):
                list(t.iter_partition(2))
            del t
            gc.collect()  # the table is let go: the first send is acknowledged, not the second
    with connect(job_id, HOST, **opts) as h2:
        [t] = h2.get("t", "read", [GUEST], timeout=10)
        assert t.partitions == [[(f"k{p}", "second")] for p in range(4)]
        with pytest.raises(ft.TransferTimeout):
            h2.get("t", "untouched", [GUEST], timeout=0.2)  # handed over whole in the first session


def arrived(fed, name, tag, src):
    """True once the transfer's head is complete in ``fed``'s inbox (test probe)."""
    from fedtransport.framing import transfer_id

    inc = fed._inbox.entry(src, transfer_id(fed.job_id, name, tag, str(src), str(fed.party)))
    return inc is not None and inc.done.done()


def test_a_get_of_what_has_arrived_never_times_out(job_id):
    """Issue 14: ``get(timeout=0)`` of data that has fully arrived returns it (it raised a
    TransferTimeout whose "not complete" list was empty)."""
    from party_proc import wait_for

    table = ft.Table.from_partitions([[("a", 1)], [("b", 2), ("c", 3)]])
    with connect(job_id, GUEST) as g, connect(job_id, HOST) as h:
        with pytest.raises(ft.TransferTimeout) as err:
            h.get("x", "0", [GUEST], timeout=0)  # nothing yet: a timeout naming the guest
        assert err.value.missing == {"guest:9999": "nothing"}
        g.remote(np.arange(5.0), "x", "0", [HOST])
        g.remote(table, "t", "0", [HOST])
        g.remote("async", "y", "0", [HOST])
        for name in ("x", "t", "y"):
            wait_for(lambda n=name: arrived(h, n, "0", GUEST), f"{name} to arrive", 10)
        [x] = h.get("x", "0", [GUEST], timeout=0)
        assert np.array_equal(x, np.arange(5.0))
        [t] = h.get("t", "0", [GUEST], timeout=0)
        assert [list(p) for p in t.partitions] == [[("a", 1)], [("b", 2), ("c", 3)]]
        assert asyncio.run(h.get_async("y", "0", [GUEST], timeout=0)) == ["async"]


class Forgetful(MemoryTransport):
    """Loses the first delivery of every lane (kept unacked, like a stalled broker)."""

    name = "memory-forgetful"
    redelivered: ClassVar[list] = []

    def listen(self, src, lane, deliver):
        first = []

        def lossy(d: Delivery):
            if not first:
                first.append(d)
                return
            deliver(d)

        super().listen(src, lane, lossy)

    def redeliver(self, src, lane):
        self.redelivered.append((src, lane))
        super().redeliver(src, lane)


def test_stalled_transfer_is_redelivered_by_the_watchdog(job_id):
    ft.register("memory-forgetful", Forgetful)
    g = connect(job_id, GUEST)
    h = ft.Federation.connect("memory-forgetful", job_id=job_id, party=HOST, options={"redelivery_after": 0.3})
    with g, h:
        g.remote("hello", "s", "0", [HOST])
        assert h.get("s", "0", [GUEST], timeout=10) == ["hello"]
    assert Forgetful.redelivered


class Prefetch(MemoryTransport):
    """Stops delivering a lane while it holds its limit of unacked messages (RabbitMQ prefetch);
    ``make_room`` raises the limit by what the receiver holds, as RabbitMQ's qos does."""

    name = "memory-prefetch"
    max_unacked_per_lane = 4
    acked: ClassVar[list[int]] = []

    def _pump(self, src, lane_no, deliver):
        q = self._hub.lane(self._key(src, self.ctx.party, lane_no))
        while not self._closed.is_set():
            with q.cond:
                while (not q.ready or len(q.unacked) >= self._limit(lane_no)) and not self._closed.is_set():
                    q.cond.wait(0.1)
                if self._closed.is_set():
                    return
                msg_id, data = q.ready.popleft()
                q.unacked[msg_id] = data
            deliver(Delivery(src, lane_no, data, msg_id))

    def _limit(self, lane_no):
        return self.max_unacked_per_lane + getattr(self, "_room", {}).get(lane_no, 0)

    def make_room(self, src, lane, held):
        self.__dict__.setdefault("_room", {})[lane] = held
        q = self._hub.lane(self._key(src, self.ctx.party, lane))
        with q.cond:
            q.cond.notify_all()

    def ack(self, deliveries):
        super().ack(deliveries)
        for lane_no, src, token in deliveries:
            self.acked.append(token)
            q = self._hub.lane(self._key(src, self.ctx.party, lane_no))
            with q.cond:
                q.cond.notify_all()


def test_out_of_order_gets_do_not_deadlock_behind_a_prefetch_limit(job_id):
    """The limit is raised by what the receiver holds; nothing is acknowledged before its get."""
    ft.register("memory-prefetch", Prefetch)
    Prefetch.acked.clear()
    g = connect(job_id, GUEST, lanes=1)
    h = ft.Federation.connect("memory-prefetch", job_id=job_id, party=HOST, options={"lanes": 1})
    with g, h:
        for i in range(40):
            g.remote(i, "p", str(i), [HOST])
        for n, i in enumerate(reversed(range(20, 40))):
            assert h.get("p", str(i), [GUEST], timeout=10) == [i]
            assert len(Prefetch.acked) == n + 1  # only what was handed over
    # the 20 never asked for were not acknowledged: the next session gets them
    with ft.Federation.connect("memory-prefetch", job_id=job_id, party=HOST, options={"lanes": 1}) as h2:
        assert [h2.get("p", str(i), [GUEST], timeout=10)[0] for i in range(20)] == list(range(20))
    g.cleanup()


def test_receiver_that_closes_mid_transfer_gets_everything_in_a_new_session(job_id):
    g = connect(job_id, GUEST, lanes=1, max_message_size=65536)
    h1 = connect(job_id, HOST, lanes=1, max_message_size=65536)
    data = np.random.default_rng(3).random(200_000)
    with pytest.raises(ft.TransferTimeout):
        h1.get("w", "0", [GUEST], timeout=0.2)  # starts listening
    g.remote(data, "w", "0", [HOST])
    h1.close()  # nothing acked: the messages go back to the lane
    with connect(job_id, HOST, lanes=1, max_message_size=65536) as h2:
        [back] = h2.get("w", "0", [GUEST], timeout=10)
    assert np.array_equal(back, data)
    g.close()


def test_sealed_session_roundtrip_and_mismatched_secret(job_id):
    secret = b"0123456789abcdef0123456789abcdef"
    with connect(job_id, GUEST, secret=secret) as g, connect(job_id, HOST, secret=secret) as h:
        g.remote({"w": np.arange(5)}, "w", "0", [HOST])
        assert np.array_equal(h.get("w", "0", [GUEST], timeout=5)[0]["w"], np.arange(5))
    with connect(job_id + "b", GUEST, secret=secret) as g, connect(job_id + "b", HOST, secret=b"x" * 32) as h:
        g.remote(1, "w", "0", [HOST])
        with pytest.raises(ft.IntegrityError):
            h.get("w", "0", [GUEST], timeout=5)


def test_unsafe_payload_at_get_and_allow_option(job_id):
    import collections

    with connect(job_id, GUEST) as g, connect(job_id, HOST) as h:
        g.remote(collections.ChainMap({"a": 1}), "c", "0", [HOST])
        with pytest.raises(ft.UnsafePayload, match="collections:ChainMap"):
            h.get("c", "0", [GUEST], timeout=5)
    with connect(job_id + "b", GUEST) as g, connect(job_id + "b", HOST, allow=["collections:ChainMap"]) as h:
        g.remote(collections.ChainMap({"a": 1}), "c", "0", [HOST])
        assert h.get("c", "0", [GUEST], timeout=5) == [collections.ChainMap({"a": 1})]


async def test_async_forms(memory_pair):
    g, h = memory_pair
    getter = asyncio.create_task(h.get_async(name="a", tag="0", parties=[GUEST], timeout=10))
    await asyncio.sleep(0)
    await g.remote_async({"v": 1}, name="a", tag="0", parties=[HOST])
    assert await getter == [{"v": 1}]
    with pytest.raises(ft.TransferTimeout):
        await h.get_async(name="never", tag="0", parties=[GUEST], timeout=0.3)
    with pytest.raises(ft.DuplicateTransfer):
        await g.remote_async({"v": 1}, name="a", tag="0", parties=[HOST])


@pytest.mark.parametrize(
    ("value", "cheap"),
    [
        (None, True),
        (3, True),
        (2**5000, False),
        (1.5, True),
        (b"x" * (64 << 10), True),
        (b"x" * ((64 << 10) + 1), False),
        ("é" * (16 << 10), True),
        ("é" * ((16 << 10) + 1), False),
        (memoryview(bytes(1000)), True),
        (np.zeros(8192), True),
        (np.zeros(8193), False),
        (np.array([object()]), False),
        (np.float64(2.0), True),
        ({"loss": 0.5, "step": 3, "grad": np.zeros(100)}, True),
        ([b"x" * (40 << 10)] * 2, False),
        (list(range(64)), True),
        (list(range(65)), False),
        ([[1]], False),
        (_Bytes(b"x"), False),
        (object(), False),
        (ft.Table.from_partitions([[(1, 2)]]), False),
    ],
    ids=repr,
)
def test_what_is_cheap_to_encode_on_an_event_loop(value, cheap):
    """Told from types and sizes alone, without encoding: exact built-ins (a subclass may pickle
    itself however it likes), at most 64 KiB, containers one level deep of at most 64 items."""
    assert cheap_to_encode(value) is cheap


async def test_a_small_remote_async_is_submitted_from_the_event_loop(memory_pair, monkeypatch):
    """No worker thread for a small object: the transport's submit, awaited on the loop. A value
    that is not cheap to encode, or a progress callback, still goes to a thread."""
    g, h = memory_pair
    threaded: list[object] = []
    real = g._async_pool.submit
    monkeypatch.setattr(g._async_pool, "submit", lambda fn, *a, **k: threaded.append(fn) or real(fn, *a, **k))
    await asyncio.gather(*(g.remote_async({"i": i}, "s", str(i), [HOST]) for i in range(50)))
    assert threaded == []
    assert [h.get("s", str(i), [GUEST], timeout=10) for i in range(50)] == [[{"i": i}] for i in range(50)]
    await g.remote_async(bytes(1 << 20), "big", "0", [HOST])
    await g.remote_async(b"small", "p", "0", [HOST], progress=lambda done, total: None)
    assert len(threaded) == 2
    assert h.get("big", "0", [GUEST], timeout=10) == [bytes(1 << 20)]
    assert g.stats["messages_sent"] >= 52


async def test_a_failed_submit_releases_the_claim_and_loses_nothing(memory_pair, monkeypatch):
    g, h = memory_pair
    failed: concurrent.futures.Future[int] = concurrent.futures.Future()
    failed.set_exception(ft.BackendError("refused by the broker"))
    monkeypatch.setattr(g.transport, "submit", lambda dst, lane, message: failed)
    with pytest.raises(ft.BackendError, match="refused by the broker"):
        await g.remote_async(b"v", "x", "0", [HOST])
    monkeypatch.setattr(g.transport, "submit", lambda dst, lane, message: None)  # "cannot now": a thread sends
    await g.remote_async(b"v", "x", "0", [HOST])  # the same name and tag: the claim was released
    assert h.get("x", "0", [GUEST], timeout=10) == [b"v"]
    with pytest.raises(ft.DuplicateTransfer):
        await g.remote_async(b"v", "x", "0", [HOST])


async def test_a_submit_refused_for_one_party_still_sends_to_the_others(job_id, monkeypatch):
    """Two destinations, one refused by the transport: the other gets its copy, the call raises,
    and the refused party can be sent to again."""
    with connect(job_id, GUEST) as g, connect(job_id, HOST) as h, connect(job_id, ARBITER) as a:
        real = g.transport.submit

        def refuse_host(dst, lane, message):
            if dst == HOST:
                raise ft.BackendError("the broker refused this lane")
            return real(dst, lane, message)

        monkeypatch.setattr(g.transport, "submit", refuse_host)
        with pytest.raises(ft.BackendError, match="refused this lane"):
            await g.remote_async([1, 2], "x", "0", [HOST, ARBITER])
        assert a.get("x", "0", [GUEST], timeout=10) == [[1, 2]]
        monkeypatch.undo()
        await g.remote_async([1, 2], "x", "0", [HOST])
        assert h.get("x", "0", [GUEST], timeout=10) == [[1, 2]]


async def test_many_concurrent_async_gets(memory_pair):
    g, h = memory_pair
    gets = [h.get_async(f"n{i}", "0", [GUEST], timeout=20) for i in range(100)]
    for i in range(100):
        await g.remote_async(i, f"n{i}", "0", [HOST])
    assert await asyncio.gather(*gets) == [[i] for i in range(100)]


def test_hubs_isolate(job_id):
    a = ft.Federation.connect("memory", job_id=job_id, party=GUEST, options={"hub": "a"})
    b = ft.Federation.connect("memory", job_id=job_id, party=HOST, options={"hub": "b"})
    with a, b:
        a.remote(1, "x", "0", [HOST])
        with pytest.raises(ft.TransferTimeout):
            b.get("x", "0", [GUEST], timeout=0.3)


def test_cleanup_deletes_the_job_lanes_and_is_idempotent(job_id):
    g, h = connect(job_id, GUEST), connect(job_id, HOST)
    g.remote(1, "x", "0", [HOST])
    assert hub().job_lanes(job_id)
    g.close()
    h.close()
    g.cleanup()
    g.cleanup()
    assert not hub().job_lanes(job_id)


def test_bad_input_gets_clear_errors(job_id):
    with pytest.raises(ft.FederationError, match=r"known backends: .*memory"):
        ft.Federation.connect("carrier-pigeon", job_id=job_id, party=GUEST)
    with pytest.raises(ft.ConfigError, match="max_mesage_size"):
        ft.Federation.connect("memory", job_id=job_id, party=GUEST, options={"max_mesage_size": 1})
    with pytest.raises(ft.ConfigError, match="job_id"):
        ft.Federation.connect("memory", job_id="bad job/id", party=GUEST)
    with pytest.raises(ft.ConfigError):
        ft.Federation.connect("memory", job_id=job_id, party=GUEST, options={"compression": "zstd"})
    with pytest.raises(ft.ConfigError, match="secret"):
        ft.Federation.connect("memory", job_id=job_id, party=GUEST, options={"secret": "short"})
    with connect(job_id, GUEST) as g:
        with pytest.raises(ft.ConfigError):
            g.remote(1, "x", "0", parties=[])
        with pytest.raises(ft.ConfigError):
            g.remote(1, "x", "0", parties="host")
        with pytest.raises(ft.SerializationError, match="pairs"):
            g.remote(ft.Table.from_partitions([[(1, 2, 3)]]), "bad", "0", [HOST])
        with pytest.raises(ft.SerializationError):
            g.remote(threading.Lock(), "bad", "0", [HOST])
        g.remote(1, "bad", "0", [HOST])  # the failed remote did not consume the name
        assert not g.closed
    assert g.closed
    with pytest.raises(ft.FederationError, match="closed"):
        g.remote(1, "x", "1", [HOST])


def test_party_normalises_and_validates():
    assert ft.Party("host", 10000) == ft.Party("host", "10000")
    assert ft.Party("host", 10000).party_id == "10000"
    with pytest.raises(ft.ConfigError):
        ft.Party("ho st", "1")
    p = ft.Party("guest", "9999")
    with pytest.raises(AttributeError):
        p.role = "x"  # frozen


def test_lane_offset_gives_sessions_of_one_job_lanes_of_their_own(job_id):
    """Two receivers of one job (Spark tasks) with disjoint lanes never take each other's messages."""
    with (
        connect(job_id, GUEST, lanes=1, lane_offset=7) as g7,
        connect(job_id, GUEST, lanes=1, lane_offset=8) as g8,
        connect(job_id, HOST, lanes=1, lane_offset=7) as h7,
        connect(job_id, HOST, lanes=1, lane_offset=8) as h8,
    ):
        g7.remote("seven", "p", "0", [HOST])
        g8.remote("eight", "p", "1", [HOST])
        assert h8.get("p", "1", [GUEST], timeout=10) == ["eight"]
        assert h7.get("p", "0", [GUEST], timeout=10) == ["seven"]
        assert h8.stats["messages_received"] == 1 and h7.stats["messages_received"] == 1
    with pytest.raises(ft.ConfigError, match="lane_offset"):
        connect(job_id, GUEST, lane_offset=-1)


def test_progress_figures_reported_by_several_threads_only_rise():
    """A remote's lanes and a get's delivery threads report progress at once: a caller sees one
    call at a time, each figure above the one before, and the last one."""
    import random

    from fedtransport.api import _Rising

    seen: list[int] = []
    rising = _Rising(lambda done, total: seen.append(done), "get")
    figures = list(range(1, 4001))
    random.Random(7).shuffle(figures)
    threads = [threading.Thread(target=lambda part=figures[i::8]: [rising(f, None) for f in part]) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == sorted(set(seen)) and seen[-1] == 4000


def test_progress_callbacks_report_bytes_done_and_total(job_id):
    sent, got = [], []
    with connect(job_id, GUEST, max_message_size=1 << 20) as g, connect(job_id, HOST, max_message_size=1 << 20) as h:
        a = np.random.default_rng(3).random(1 << 20)  # 8 MiB: nine messages
        g.remote(a, "a", "0", [HOST], progress=lambda done, total: sent.append((done, total)))
        [b] = h.get("a", "0", [GUEST], timeout=30, progress=lambda done, total: got.append((done, total)))
        assert np.array_equal(a, b)
        assert len(sent) == 9 and got  # the get may start after most of it arrived: it reports that first
        if got[0] == (0, None):  # ... or before any of it arrived: the size is not known yet
            got.pop(0)
        for events in (sent, got):
            done = [d for d, _ in events]
            assert done == sorted(set(done)) and done[-1] == events[-1][1]  # rising, never repeated
            assert {t for _, t in events} == {events[-1][1]} and events[-1][1] > a.nbytes
        table = ft.Table.from_partitions([[(i, i)] for i in range(3)])
        g.remote(table, "t", "0", [HOST], progress=lambda done, total: sent.append((done, total)))
        assert sent[-1][1] is None and sent[-1][0] > 0  # a table's size is not known up front


def test_a_progress_that_cannot_be_called_is_refused_before_anything_moves(job_id):
    """A non-callable progress used to be taken, and every call of it logged as a failed callback
    while the transfer went on: it is a ConfigError up front, for remote, get and their async forms."""
    with connect(job_id, GUEST) as g, connect(job_id, HOST) as h:
        for bad in (5, "print"):
            with pytest.raises(ft.ConfigError, match="progress must be a function"):
                g.remote(1, "p", "0", [HOST], progress=bad)
            with pytest.raises(ft.ConfigError, match="progress must be a function"):
                asyncio.run(g.remote_async(1, "p", "0", [HOST], progress=bad))
            with pytest.raises(ft.ConfigError, match="progress must be a function"):
                h.get("p", "0", [GUEST], timeout=0, progress=bad)
            with pytest.raises(ft.ConfigError, match="progress must be a function"):
                asyncio.run(h.get_async("p", "0", [GUEST], timeout=0, progress=bad))
        g.remote(1, "p", "0", [HOST])  # nothing was claimed or sent by the refused calls
        assert h.get("p", "0", [GUEST], timeout=30) == [1]
        assert g.stats["messages_sent"] == h.stats["messages_received"] == 1


def test_a_progress_callback_that_raises_fails_neither_remote_nor_get(job_id, caplog):
    """docs/operations.md: an exception from a progress callback is logged and ignored on both sides."""

    def broken(done: int, total: int | None) -> None:
        raise ZeroDivisionError("a progress bar's bug")

    with connect(job_id, GUEST) as g, connect(job_id, HOST) as h:
        g.remote(np.arange(10), "p", "0", [HOST], progress=broken)
        [got] = h.get("p", "0", [GUEST], timeout=30, progress=broken)
        assert np.array_equal(got, np.arange(10))
    failures = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ZeroDivisionError]
    assert {"remote", "get"} <= {w for r in failures for w in ("remote", "get") if w in r.getMessage()}
