"""Tables that stream: partitions read while they arrive, flow control, memory bounded on both sides.

The first tests run on the memory backend (the layers above the transport); the 1 GiB tests
run sender and receiver in their own processes against real brokers and measure RSS.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import threading
from typing import Any

import pytest
from conftest import GUEST, HOST
from party_proc import expected_table_digests, table_receiver, table_sender

import fedtransport as ft
from fedtransport.transport.pulsar.admin import PulsarAdmin

try:
    from tests.rabbit_fixtures import rabbit_node, rabbit_opts, rabbit_pool, requires_rabbitmq
except ModuleNotFoundError:
    from rabbit_fixtures import (  # type: ignore[no-redef]  # noqa: F401
        rabbit_node,
        rabbit_opts,
        rabbit_pool,
        requires_rabbitmq,
    )

SPAWN = mp.get_context("spawn")
SMALL = {"max_message_size": 65536}  # many messages from little data; lane window = 4 messages


def connect(job_id: str, party: ft.Party, **options: Any) -> ft.Federation:
    return ft.Federation.connect("memory", job_id=job_id, party=party, options={**SMALL, **options})


def blob(p: int, i: int) -> bytes:
    return bytes([p % 256, i % 256]) * 5000  # 10 KB: a unit of 64 KiB holds six


def blobs(p: int, n: int) -> Any:
    return ((i, blob(p, i)) for i in range(n))


def test_partitions_stream_while_the_sender_is_still_sending(job_id):
    """The receiver reads the first records of a partition the sender has not finished producing."""
    gate = threading.Event()

    def partition() -> Any:
        for i in range(50):
            yield i, blob(0, i)
        assert gate.wait(60), "the receiver never read the first records"
        for i in range(50, 100):
            yield i, blob(0, i)

    with connect(job_id, GUEST) as g, connect(job_id, HOST) as h:
        sender = threading.Thread(target=g.remote, args=(ft.Table.from_partitions([partition()]), "t", "0", [HOST]))
        sender.start()
        [t] = h.get("t", "0", [GUEST], timeout=30)
        records = t.iter_partition(0)
        first = [next(records) for _ in range(20)]
        assert first == [(i, blob(0, i)) for i in range(20)]
        gate.set()
        rest = list(records)
        sender.join(30)
        assert rest == [(i, blob(0, i)) for i in range(20, 100)]
        assert h._inbox.pending() == 0  # read to the end: handed over and acknowledged


def test_a_received_partition_is_read_once(job_id):
    with connect(job_id, GUEST) as g, connect(job_id, HOST) as h:
        g.remote(ft.Table.from_partitions([[(1, "a")], [(2, "b")]]), "t", "0", [HOST])
        [t] = h.get("t", "0", [GUEST], timeout=10)
        assert list(t.iter_partition(1)) == [(2, "b")]
        with pytest.raises(ft.FederationError, match=r"partition 1 .* was already read"):
            list(t.iter_partition(1))
        with pytest.raises(ft.FederationError, match="already read"):
            t.partitions  # noqa: B018
        [t2] = [ft.Table.from_partitions([[(1, "a")], [(2, "b")]])]
        g.remote(t2, "t", "1", [HOST])
        [back] = h.get("t", "1", [GUEST], timeout=10)
        assert back.partitions == [[(1, "a")], [(2, "b")]]  # materialised once, then read at will
        assert list(back.iter_partition(0)) == list(back.iter_partition(0)) == [(1, "a")]


def test_an_unread_table_does_not_hold_up_later_transfers(job_id):
    """Its lane fills the window and waits; a get of something behind it lets the lane through."""
    with connect(job_id, GUEST, lanes=1) as g, connect(job_id, HOST, lanes=1) as h:
        table = ft.Table.from_partitions([[(i, blob(p, i)) for i in range(300)] for p in range(3)])
        g.remote(table, "t", "0", [HOST])
        g.remote("after the table", "x", "0", [HOST])
        [t] = h.get("t", "0", [GUEST], timeout=10)
        assert h.get("x", "0", [GUEST], timeout=30) == ["after the table"]
        assert t == table


def test_partitions_read_out_of_order(job_id):
    with connect(job_id, GUEST, lanes=2) as g, connect(job_id, HOST, lanes=2) as h:
        table = ft.Table.from_partitions([[(i, blob(p, i)) for i in range(120)] for p in range(6)])
        g.remote(table, "t", "0", [HOST])
        [t] = h.get("t", "0", [GUEST], timeout=10)
        for p in (5, 0, 3, 1, 4, 2):
            assert list(t.iter_partition(p)) == table.partitions[p]
        assert h._inbox.pending() == 0


def test_a_received_partition_hands_out_whole_units_as_batches(job_id):
    """batches(): each received unit as one list of records, the count checked, once, as iteration."""
    with connect(job_id, GUEST, lanes=2) as g, connect(job_id, HOST, lanes=2) as h:
        table = ft.Table.from_partitions([[(i, blob(p, i)) for i in range(40)] for p in range(2)])
        g.remote(table, "t", "0", [HOST])
        [t] = h.get("t", "0", [GUEST], timeout=10)
        batches = list(t.raw_partition(1).batches())
        assert all(isinstance(b, list) and 0 < len(b) <= 6 for b in batches)  # six 10 KB records a 64 KiB unit
        assert len(batches) >= 7 and [r for b in batches for r in b] == table.partitions[1]
        with pytest.raises(ft.FederationError, match="already read"):
            iter(t.raw_partition(1))
        with pytest.raises(ft.FederationError, match="already read"):
            t.raw_partition(1).batches()
        assert list(t.iter_partition(0)) == table.partitions[0]  # the records of the other, one by one
        assert h._inbox.pending() == 0


def test_the_inbox_holds_at_most_a_window_per_lane_for_a_slow_reader(job_id):
    with connect(job_id, GUEST, lanes=2) as g, connect(job_id, HOST, lanes=2) as h:
        parts, per = 4, 400  # 16 MB of 10 KB records, 64 KiB messages
        table = ft.Table.from_partitions([blobs(p, per) for p in range(parts)])
        sender = threading.Thread(target=g.remote, args=(table, "t", "0", [HOST]))
        sender.start()
        [t] = h.get("t", "0", [GUEST], timeout=30)
        window = h._inbox._window
        peak = 0
        for p in range(parts):
            for n, (i, value) in enumerate(t.iter_partition(p)):
                assert value == blob(p, i) and i == n
                peak = max(peak, *h._inbox._held.values())
        sender.join(30)
        # a lane stops once past its window: at most one message's payload beyond it
        assert 0 < peak <= window + 65536
        assert h.stats["messages_received"] == g.stats["messages_sent"]


def test_a_dropped_table_is_handed_over_and_its_lanes_freed(job_id):
    with connect(job_id, GUEST, lanes=1) as g, connect(job_id, HOST, lanes=1) as h:
        g.remote(ft.Table.from_partitions([[(i, blob(0, i)) for i in range(200)]]), "t", "0", [HOST])
        [t] = h.get("t", "0", [GUEST], timeout=10)
        next(iter(t.iter_partition(0)))
        del t
        gc.collect()
        assert h._inbox.pending() == 0 and sum(h._inbox._held.values()) == 0
        g.remote("next", "x", "0", [HOST])
        assert h.get("x", "0", [GUEST], timeout=10) == ["next"]


def test_a_record_count_mismatch_is_an_integrity_error(job_id):
    from fedtransport import transfer

    real = transfer.frame_units

    def undercount(writer, stream, units, max_chunk, aux=None):
        return real(writer, stream, units, max_chunk, aux=aux if stream == 0 else 1)

    with connect(job_id, GUEST) as g, connect(job_id, HOST) as h:
        transfer.frame_units = undercount
        try:
            g.remote(ft.Table.from_partitions([[(1, "a"), (2, "b")]]), "t", "0", [HOST])
        finally:
            transfer.frame_units = real
        [t] = h.get("t", "0", [GUEST], timeout=10)
        with pytest.raises(ft.IntegrityError, match="holds 2 records, the sender counted 1"):
            list(t.iter_partition(0))


def test_an_empty_table_and_empty_partitions(job_id):
    with connect(job_id, GUEST) as g, connect(job_id, HOST) as h:
        g.remote(ft.Table.from_partitions([]), "t", "0", [HOST])
        g.remote(ft.Table.from_partitions([[], [(1, 2)], []]), "t", "1", [HOST])
        [empty] = h.get("t", "0", [GUEST], timeout=10)
        [sparse] = h.get("t", "1", [GUEST], timeout=10)
        assert empty.num_partitions == 0 and empty.collect() == []
        assert sparse.partitions == [[], [(1, 2)], []]
        assert h._inbox.pending() == 0


# --- 1 GiB through real brokers, each side in its own process --------------------------------

GIB_PARTS, GIB_RECORDS = 8, 2048  # 8 partitions x 2048 records x 64 KiB = 1 GiB
RSS_BOUND = 256 << 20


def run_gib_table(backend: str, job_id: str, options: dict[str, Any]) -> None:
    q = SPAWN.Queue()
    guest, host = (GUEST.role, GUEST.party_id), (HOST.role, HOST.party_id)
    recv = SPAWN.Process(target=table_receiver, args=(backend, job_id, host, guest, options, "t", "0", q))
    send = SPAWN.Process(target=table_sender,
                         args=(backend, job_id, guest, host, options, "t", "0", GIB_PARTS, GIB_RECORDS, q))  # fmt: skip
    recv.start()
    send.start()
    try:
        results = {}
        while len(results) < 2:
            item = q.get(timeout=600)
            results[item[0]] = item[1:]
    finally:
        for proc in (send, recv):
            proc.join(60)
            if proc.is_alive():
                proc.kill()
    [sender_growth] = results["sent"]
    receiver_growth, digests, counts, nbytes = results["got"]
    assert counts == [GIB_RECORDS] * GIB_PARTS
    assert digests == expected_table_digests(GIB_PARTS, GIB_RECORDS)
    assert nbytes > 1 << 30
    assert sender_growth < RSS_BOUND, f"sender RSS grew {sender_growth >> 20} MiB for a 1 GiB table"
    assert receiver_growth < RSS_BOUND, f"receiver RSS grew {receiver_growth >> 20} MiB for a 1 GiB table"


def test_a_1gib_table_over_pulsar_keeps_both_sides_under_256mib(job_id, pulsar_standalone):
    options = {"service_url": pulsar_standalone.service_url, "admin_url": pulsar_standalone.admin_url}
    try:
        run_gib_table("pulsar", job_id, options)
    finally:  # 1 GiB on the shared broker's disk: the job's topics go with its namespace
        PulsarAdmin(pulsar_standalone.admin_url).delete_namespace("fl-tenant", job_id)


@requires_rabbitmq
def test_a_1gib_table_over_rabbitmq_keeps_both_sides_under_256mib(job_id, rabbit_node):
    run_gib_table("rabbitmq", job_id, rabbit_opts(rabbit_node))


def test_a_reader_waiting_on_a_lost_message_asks_for_redelivery(job_id):
    """The watchdog runs while a partition read waits: a delivery that never came is asked for again."""
    from fedtransport.transport.memory import MemoryTransport

    dropped: list[int] = []

    class Lossy(MemoryTransport):
        name = "memory-lossy"

        def listen(self, src, lane, deliver):
            def lose_one(d):
                if not dropped and lane == 1 and self.ctx.party == HOST:
                    dropped.append(d.token)  # never delivered, never acknowledged: as if lost in flight
                    return
                deliver(d)

            super().listen(src, lane, lose_one)

    ft.register("memory-lossy", Lossy)
    opts = {**SMALL, "lanes": 2, "redelivery_after": 0.5}
    g = ft.Federation.connect("memory-lossy", job_id=job_id, party=GUEST, options=opts)
    h = ft.Federation.connect("memory-lossy", job_id=job_id, party=HOST, options=opts)
    with g, h:
        table = ft.Table.from_partitions([[(i, blob(p, i)) for i in range(30)] for p in range(2)])
        g.remote(table, "t", "0", [HOST])
        [t] = h.get("t", "0", [GUEST], timeout=10)
        assert list(t.iter_partition(0)) == table.partitions[0]
        assert list(t.iter_partition(1)) == table.partitions[1]
        assert dropped
