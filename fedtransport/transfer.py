"""What one ``remote`` sends, lane by lane, and how a received transfer becomes a value.

Object transfer: one stream holding one unit (the encoded object). Its chunks
are striped over the lanes (chunk ``i`` on lane ``i % lanes``), so a large
object moves over several topics or queues in parallel.

Table transfer: stream 0 is an empty head whose LAST message says "table";
partition ``p`` is stream ``p + 1`` on lane ``p % lanes``, a sequence of record
batches whose LAST message carries the partition's record count. An empty
table is just the head. The kind travels in stream 0's ``aux`` field.

A received table is handed out as soon as its head is in: each partition is a
one-shot iterable that decodes record batches as they arrive and lets go of
them once read, so neither side ever holds a whole table unless asked to.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .codec import EncodedUnit, UnpicklePolicy, decode_object, decode_records, encode_object, encode_records
from .errors import FederationError, IntegrityError
from .framing import FrameWriter, TransferAssembly, UnitChunker, frame_units
from .resume import MIN_RESUME_MESSAGES
from .table import Table

__all__ = [
    "KIND_BROADCAST",
    "KIND_OBJECT",
    "KIND_TABLE",
    "Outgoing",
    "cheap_to_encode",
    "decode_object_transfer",
    "streamed_table",
    "transfer_kind",
]

KIND_OBJECT = 0
KIND_TABLE = 1
KIND_BROADCAST = 2  # a head naming broadcast data to fetch (broadcast.py)


CHEAP_BYTES = 64 << 10  # what cheap_to_encode lets through: pickled in tens of µs
_CHEAP_ITEMS = 64
_SCALARS = (type(None), bool, int, float, complex)
_BUFFERS = (str, bytes, bytearray)
_CONTAINERS = (list, tuple, dict)


def cheap_to_encode(value: Any) -> bool:
    """Whether encoding ``value`` is sure to be quick, told without encoding it.

    Exact built-in types only (a subclass may pickle however it likes): scalars, ``str``, ``bytes``,
    ``bytearray`` and ``memoryview`` and numeric numpy arrays of at most ``CHEAP_BYTES``, and
    lists, tuples and dicts of at most 64 of those (not nested further), ``CHEAP_BYTES`` in all.
    ``remote_async`` encodes such a value on the event loop and a thread does any other."""
    budget = CHEAP_BYTES

    def leaf(v: Any) -> bool:
        nonlocal budget
        kind = type(v)
        if kind in _SCALARS:
            return kind is not int or v.bit_length() <= 1024
        if kind in _BUFFERS:
            budget -= len(v) * (4 if kind is str else 1)  # a str is pickled as UTF-8
        elif kind is memoryview:
            budget -= v.nbytes
        elif kind.__module__ == "numpy" and not getattr(getattr(v, "dtype", None), "hasobject", True):
            budget -= v.nbytes  # an ndarray or a numpy scalar of a numeric dtype
        else:
            return False
        return budget >= 0

    kind = type(value)
    if kind in _CONTAINERS:
        if len(value) > _CHEAP_ITEMS:
            return False
        items = [x for kv in value.items() for x in kv] if kind is dict else value
        return all(leaf(v) for v in items)
    return leaf(value)


class Outgoing:
    """A value ready to be framed for any number of destinations."""

    def __init__(self, value: Any, *, fanout: int, cloudpickle_fallback: bool = False) -> None:
        self.table: Table | None = None
        self.unit: EncodedUnit | None = None
        if isinstance(value, Table):
            self.table = value
            if fanout > 1:  # one-shot partitions cannot be read once per destination
                value.partitions  # noqa: B018 - materialises generators
        else:
            self.unit = encode_object(value, cloudpickle_fallback=cloudpickle_fallback)

    @property
    def nstreams(self) -> int:
        return 1 if self.table is None else 1 + self.table.num_partitions

    def lane_messages(self, writer: FrameWriter, lanes: int, max_chunk: int) -> dict[int, Iterator[bytes]]:
        """One lazy message iterator per lane used: memory stays bounded by the send window."""
        per_lane: dict[int, list[Iterable[bytes]]] = {}
        if self.unit is not None:
            chunker = UnitChunker(self.unit.parts, self.unit.size, max_chunk)
            n = len(chunker)
            used = min(lanes, n)
            for lane in range(used):
                per_lane[lane] = [self._object_chunks(writer, chunker, range(lane, n, used), n)]
        else:
            assert self.table is not None
            per_lane[0] = [frame_units(writer, 0, [(b"", 0)], max_chunk, aux=KIND_TABLE)]
            for p in range(self.table.num_partitions):
                units = ((u.parts, n) for u, n in encode_records(self.table.raw_partition(p), max_chunk))
                per_lane.setdefault(p % lanes, []).append(frame_units(writer, p + 1, units, max_chunk))
        return {lane: _chain(its) for lane, its in per_lane.items()}

    def _object_messages(self, lanes: int, max_chunk: int) -> tuple[int, int]:
        """An object's message count and the lanes it uses."""
        assert self.unit is not None
        n = max(1, -(-self.unit.size // max_chunk))
        return n, min(lanes, n)

    def resumable(self, lanes: int, max_chunk: int, tables: bool) -> bool:
        """Is it worth asking the broker where a killed send of this value stopped (resume.py)?
        An object of at least ``MIN_RESUME_MESSAGES`` messages per lane; a table with ``tables``."""
        if self.unit is None:
            return tables
        n, used = self._object_messages(lanes, max_chunk)
        return n >= MIN_RESUME_MESSAGES * used

    def on_lane(self, point: tuple[int, int], lane: int, lanes: int, max_chunk: int) -> bool:
        """Does message ``(stream, seq)`` travel on ``lane`` (see lane_messages)?"""
        stream, seq = point
        if self.unit is not None:
            n, used = self._object_messages(lanes, max_chunk)
            return stream == 0 and seq < n and seq % used == lane
        assert self.table is not None
        if stream == 0:
            return lane == 0
        return stream <= self.table.num_partitions and (stream - 1) % lanes == lane

    def _object_chunks(self, writer: FrameWriter, chunker: UnitChunker, indices: range, n: int) -> Iterator[bytes]:
        assert self.unit is not None
        for i in indices:
            offset, data = chunker.pieces(i)
            yield writer.frame(
                stream=0, unit=0, seq=i, offset=offset, unit_len=self.unit.size, chunk=data,
                last=i == n - 1, aux=KIND_OBJECT,
            )  # fmt: skip


def _chain(iterables: list[Iterable[bytes]]) -> Iterator[bytes]:
    for it in iterables:
        yield from it


def transfer_kind(assembly: TransferAssembly, source: str) -> int:
    """The kind of a transfer whose head (stream 0) is complete."""
    kind = assembly.stream_aux(0)
    if kind not in (KIND_OBJECT, KIND_TABLE, KIND_BROADCAST):
        raise IntegrityError(f"transfer from {source} is of unknown kind {kind}")
    return kind


def decode_object_transfer(assembly: TransferAssembly, policy: UnpicklePolicy, source: str) -> Any:
    """Turn a complete object transfer into the value that was sent."""
    if assembly.nstreams != 1:
        raise IntegrityError(f"object transfer from {source} has {assembly.nstreams} streams")
    units = assembly.stream_units(0)
    if len(units) != 1:
        raise IntegrityError(f"object transfer from {source} has {len(units)} units, expected 1")
    return decode_object(units[0], policy, source)


ReadUnits = Callable[[int], tuple[list[memoryview], bool]]


class _TableReading:
    """What the partitions of one received table share."""

    def __init__(self, read: ReadUnits, count_of: Callable[[int], int], policy: UnpicklePolicy, source: str,
                 nparts: int, finished: Callable[[], None]) -> None:  # fmt: skip
        self.read = read
        self.count_of = count_of
        self.policy = policy
        self.source = source
        self.finished = finished
        self._open = nparts
        self._lock = threading.Lock()

    def partition_done(self) -> None:
        with self._lock:
            self._open -= 1
            last = self._open == 0
        if last:
            self.finished()


class _StreamedPartition:
    """One partition of a received table: iterable once, records decoded as they arrive."""

    __slots__ = ("_index", "_reading", "_started")

    def __init__(self, reading: _TableReading, index: int) -> None:
        self._reading = reading
        self._index = index
        self._started = False

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        self._start()
        return self._records()

    def batches(self) -> Iterator[list[tuple[Any, Any]]]:
        """The partition one received unit at a time, each a list of its records, for a reader
        that stores whole runs at once (FATE's LMDB writer). Once, as iterating it is; the record
        count is checked when the last batch has been taken."""
        self._start()
        return self._batches()

    def _start(self) -> None:
        if self._started:
            raise FederationError(
                f"partition {self._index} of the table from {self._reading.source} was already read: a received "
                "table streams each partition once (use table.partitions first to keep the records)"
            )
        self._started = True

    def _records(self) -> Iterator[tuple[Any, Any]]:
        for batch in self._batches():
            yield from batch

    def _batches(self) -> Iterator[list[tuple[Any, Any]]]:
        r, stream = self._reading, self._index + 1
        count, finished = 0, False
        while not finished:
            units, finished = r.read(stream)
            for unit in units:
                records = decode_records(unit, r.policy, r.source)
                count += len(records)
                yield records
        expected = r.count_of(stream)
        if count != expected:
            raise IntegrityError(
                f"table partition {self._index} from {r.source} holds {count} records, the sender counted {expected}"
            )
        r.partition_done()


def streamed_table(nstreams: int, read: ReadUnits, count_of: Callable[[int], int], policy: UnpicklePolicy,
                   source: str, finished: Callable[[], None]) -> Table:  # fmt: skip
    """A :class:`Table` whose partitions stream in through ``read(stream)``.

    ``finished`` runs once, when every partition has been read to its end or the
    table is garbage-collected, whichever comes first.
    """
    once = _once(finished)
    reading = _TableReading(read, count_of, policy, source, nstreams - 1, once)
    table = Table([_StreamedPartition(reading, p) for p in range(nstreams - 1)])
    weakref.finalize(table, once)
    if nstreams == 1:
        once()
    return table


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    lock, done = threading.Lock(), [False]

    def call() -> None:
        with lock:
            if done[0]:
                return
            done[0] = True
        fn()

    return call
