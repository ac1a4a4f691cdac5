"""What one ``remote`` sends, lane by lane, and how a received transfer becomes a value.

Object transfer: one stream holding one unit (the encoded object). Its chunks
are striped over the lanes (chunk ``i`` on lane ``i % lanes``), so a large
object moves over several topics or queues in parallel.

Table transfer: stream 0 is an empty head whose LAST message says "table";
partition ``p`` is stream ``p + 1`` on lane ``p % lanes``, a sequence of record
batches whose LAST message carries the partition's record count. An empty
table is just the head. The kind travels in stream 0's ``aux`` field.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from .codec import EncodedUnit, UnpicklePolicy, decode_object, decode_records, encode_object, encode_records
from .errors import IntegrityError
from .framing import FrameWriter, TransferAssembly, UnitChunker, frame_units
from .table import Table

__all__ = ["KIND_OBJECT", "KIND_TABLE", "Outgoing", "decode_transfer"]

KIND_OBJECT = 0
KIND_TABLE = 1


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
                records = encode_records(self.table.raw_partition(p), max_chunk)
                per_lane.setdefault(p % lanes, []).append(frame_units(writer, p + 1, records, max_chunk))
        return {lane: _chain(its) for lane, its in per_lane.items()}

    def _object_chunks(self, writer: FrameWriter, chunker: UnitChunker, indices: range, n: int) -> Iterator[bytes]:
        assert self.unit is not None
        for i in indices:
            offset, data = chunker.chunk(i)
            yield writer.frame(
                stream=0, unit=0, seq=i, offset=offset, unit_len=self.unit.size, chunk=data,
                last=i == n - 1, aux=KIND_OBJECT,
            )  # fmt: skip


def _chain(iterables: list[Iterable[bytes]]) -> Iterator[bytes]:
    for it in iterables:
        yield from it


def decode_transfer(assembly: TransferAssembly, policy: UnpicklePolicy, source: str) -> Any:
    """Turn a complete assembly into the value that was sent."""
    kind = assembly.stream_aux(0)
    if kind == KIND_OBJECT:
        if assembly.nstreams != 1:
            raise IntegrityError(f"object transfer from {source} has {assembly.nstreams} streams")
        units = assembly.stream_units(0)
        if len(units) != 1:
            raise IntegrityError(f"object transfer from {source} has {len(units)} units, expected 1")
        return decode_object(units[0], policy, source)
    if kind == KIND_TABLE:
        partitions = []
        for stream in range(1, assembly.nstreams or 1):
            records = [rec for unit in assembly.stream_units(stream) for rec in decode_records(unit, policy, source)]
            expected = assembly.stream_aux(stream)
            if len(records) != expected:
                raise IntegrityError(
                    f"table partition {stream - 1} from {source} holds {len(records)} records, "
                    f"the sender counted {expected}"
                )
            partitions.append(records)
        return Table(partitions)
    raise IntegrityError(f"transfer from {source} is of unknown kind {kind}")
