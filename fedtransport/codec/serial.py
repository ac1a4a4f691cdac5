"""Objects <-> bytes: pickle protocol 5 with out-of-band buffers, and a safe unpickler.

An encoded object is a *unit*: a list of buffers whose concatenation is

    preamble | main pickle | pad | buffer 0 | pad | buffer 1 | ...

The preamble records the lengths, so the receiver can rebuild the out-of-band
buffers as slices of one contiguous receive buffer: a numpy array's data is never
copied into a pickle stream on the way out, and is used in place on the way in.
Every buffer starts on a 64-byte boundary so arrays come back aligned.

Table records are encoded in batches, units of the same layout: the main pickle is
a sequence of pickles of ``(key, value)`` written by one ``Pickler`` (each record
serialised once, no hex, no JSON). A run of records whose values are arrays of one
dtype and shape is written as one row batch instead (arrays.py), its rows copied
into one block as they are taken and the block sent out of band: the usual table of
feature vectors costs one copy per row on the way out and none on the way in (the
received rows are views of the message), not a pickle call per record. Any other
array is pickled in band, copied when its record is taken.
"""

from __future__ import annotations

import functools
import io
import logging
import pickle
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import IntegrityError, SerializationError, UnsafePayload
from .arrays import REBUILDERS, RowBatch, RowBlock, can_start_rows, reduce_numpy
from .guard import Allowance, GuardedUnpickler, needs_guard

__all__ = [
    "SAFE_GLOBALS",
    "EncodedUnit",
    "UnpicklePolicy",
    "decode_object",
    "decode_records",
    "encode_object",
    "encode_records",
]

log = logging.getLogger("fedtransport.codec")

ALIGN = 64
_PREAMBLE = struct.Struct("<4sIQ")  # magic, buffer count, main pickle length
_PREAMBLE_MAGIC = b"FTO1"
_LEN = struct.Struct("<Q")

# (module, qualname) pairs a peer may name without any option. Constructors only:
# nothing here runs code, imports modules or reaches attributes by name.
SAFE_GLOBALS: frozenset[str] = frozenset(
    [
        *(
            f"builtins:{n}"
            for n in (
                "bool",
                "int",
                "float",
                "complex",
                "str",
                "bytes",
                "bytearray",
                "list",
                "tuple",
                "dict",
                "set",
                "frozenset",
                "range",
                "slice",
                "Ellipsis",
                "NotImplemented",
            )
        ),
        "collections:OrderedDict",
        "collections:defaultdict",
        "collections:deque",
        "collections:Counter",
        "datetime:date",
        "datetime:time",
        "datetime:datetime",
        "datetime:timedelta",
        "datetime:timezone",
        "decimal:Decimal",
        "fractions:Fraction",
        "uuid:UUID",
        "numpy:dtype",
        "numpy:ndarray",
        "numpy._core.multiarray:_reconstruct",
        "numpy._core.multiarray:scalar",
        "numpy._core.numeric:_frombuffer",
        # numpy 1.x peers name the same functions under numpy.core
        "numpy.core.multiarray:_reconstruct",
        "numpy.core.multiarray:scalar",
        "numpy.core.numeric:_frombuffer",
        "fedtransport.table:Table",
        *REBUILDERS,  # our senders' numpy arrays, scalars and dtypes (arrays.py)
    ]
)

# numpy 2 keeps numpy.core only as a deprecated alias: resolve the old names directly.
_RENAMED_MODULES = {"numpy.core.multiarray": "numpy._core.multiarray", "numpy.core.numeric": "numpy._core.numeric"}


@dataclass(frozen=True)
class UnpicklePolicy:
    """What a receiver will unpickle.

    ``mode="report"`` still refuses, but logs every refused name at WARNING so an
    operator can collect an allow-list from a trial run.
    """

    allow: frozenset[str] = frozenset()
    trust_remote_code: bool = False
    mode: str = "enforce"
    refused: list[str] = field(default_factory=list, compare=False, repr=False)

    def admits(self, name: str) -> bool:
        return self.trust_remote_code or name in SAFE_GLOBALS or name in self.allow


def _admit(policy: UnpicklePolicy, source: str, module: str, name: str) -> str:
    """The module to import for ``module:name``, or :class:`UnsafePayload` if the policy refuses it."""
    full = f"{module}:{name}"
    if not policy.admits(full):
        policy.refused.append(full)
        if policy.mode == "report":
            log.warning("refused to unpickle %s from %s (report mode)", full, source)
        raise UnsafePayload(
            f"refused to unpickle {full!r} from {source}: it is not on the safe allow-list. "
            f"If you trust it, add it with options={{'allow': [{full!r}]}}; "
            "options={'trust_remote_code': True} lifts the check entirely and must only be "
            "used between parties that trust each other's code",
            global_name=full,
        )
    return _RENAMED_MODULES.get(module, module)


class _NeedsGuard(Exception):
    """The stream names numpy or a copying constructor: decode it again with the guarded
    unpickler (guard.py)."""


class _SafeUnpickler(pickle.Unpickler):
    """The fast (C) unpickler, for pickles that name nothing :func:`needs_guard` flags."""

    def __init__(self, file: io.BytesIO, policy: UnpicklePolicy, source: str, **kw: Any) -> None:
        super().__init__(file, **kw)
        self._policy = policy
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        real = _admit(self._policy, self._source, module, name)
        if needs_guard(module, name) and not self._policy.trust_remote_code:
            raise _NeedsGuard
        return super().find_class(real, name)


def _guarded(
    file: io.BytesIO, policy: UnpicklePolicy, source: str, allowance: Allowance, buffers: Iterable[Any] = ()
) -> GuardedUnpickler:
    return GuardedUnpickler(file, lambda module, name: _admit(policy, source, module, name), source, allowance, buffers)


def _loads(data: memoryview | bytes, policy: UnpicklePolicy, source: str, buffers: Sequence[Any] = ()) -> Any:
    try:
        try:
            return _SafeUnpickler(io.BytesIO(data), policy, source, buffers=buffers).load()
        except _NeedsGuard:
            size = len(data) + sum(memoryview(b).nbytes for b in buffers)
            return _guarded(io.BytesIO(data), policy, source, Allowance(size, source), buffers).load()
    except UnsafePayload:
        raise
    except Exception as exc:  # a malformed stream can raise nearly anything from inside pickle
        raise IntegrityError(f"malformed payload from {source}: {type(exc).__name__}: {exc}") from exc


def _pad(n: int) -> int:
    return -n % ALIGN


@dataclass(frozen=True)
class EncodedUnit:
    """A byte string held as a list of buffers; ``size`` is the sum of their lengths."""

    parts: tuple[memoryview, ...]
    size: int

    @classmethod
    def of(cls, parts: Iterable[bytes | bytearray | memoryview]) -> EncodedUnit:
        views = tuple(memoryview(p).cast("B") for p in parts)
        return cls(views, sum(v.nbytes for v in views))

    def tobytes(self) -> bytes:
        return b"".join(self.parts)


class _Pickler(pickle.Pickler):
    """The C pickler, writing simple numpy values as our checked constructors (arrays.py)."""

    def reducer_override(self, obj: Any) -> Any:
        return reduce_numpy(obj)


def _pickler(buf: io.BytesIO | _Frames, buffer_callback: Any = None) -> pickle.Pickler:
    return _Pickler(buf, protocol=5, buffer_callback=buffer_callback)


def _dumps(obj: Any, buffer_callback: Any) -> bytes:
    buf = io.BytesIO()
    _pickler(buf, buffer_callback).dump(obj)
    return buf.getvalue()


def encode_object(obj: Any, *, cloudpickle_fallback: bool = False) -> EncodedUnit:
    """Pickle ``obj`` with protocol 5; large contiguous buffers stay out of band."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        main = _dumps(obj, buffers.append)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        if not cloudpickle_fallback:
            raise SerializationError(f"cannot encode a {type(obj).__name__}: {exc}") from exc
        import cloudpickle  # lambdas and local classes, only sent when the peers trust code

        buffers = []
        try:
            main = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        except Exception as exc2:
            raise SerializationError(f"cannot encode a {type(obj).__name__}: {exc2}") from exc2
    return _layout([memoryview(main)], [b.raw() for b in buffers])


def _layout(main: Sequence[bytes | bytearray | memoryview], raws: Sequence[memoryview]) -> EncodedUnit:
    """``preamble | main pickle | pad | buffer 0 | pad | ...``, the layout of every unit; ``main`` in pieces."""
    main_len = sum(len(m) for m in main)
    head = bytearray(_PREAMBLE.pack(_PREAMBLE_MAGIC, len(raws), main_len))
    for r in raws:
        head += _LEN.pack(r.nbytes)
    head += bytes(_pad(len(head)))
    parts: list[bytes | bytearray | memoryview] = [head, *main, bytes(_pad(main_len))]
    for r in raws:
        parts.append(r)
        if _pad(r.nbytes):
            parts.append(bytes(_pad(r.nbytes)))
    return EncodedUnit.of(parts)


def _split(data: memoryview | bytes, source: str, what: str) -> tuple[memoryview, list[pickle.PickleBuffer]]:
    """Inverse of :func:`_layout`: the main pickle and the out-of-band buffers, as slices of ``data``."""
    view = memoryview(data).cast("B")
    if view.nbytes < _PREAMBLE.size:
        raise IntegrityError(f"{what} from {source} is truncated ({view.nbytes} bytes)")
    magic, nbuf, main_len = _PREAMBLE.unpack_from(view)
    if magic != _PREAMBLE_MAGIC:
        raise IntegrityError(f"{what} from {source} has an unknown preamble {bytes(magic)!r}")
    lens_end = _PREAMBLE.size + nbuf * _LEN.size
    if lens_end > view.nbytes:
        raise IntegrityError(f"{what} from {source} declares {nbuf} buffers it does not hold")
    lens = [_LEN.unpack_from(view, _PREAMBLE.size + i * _LEN.size)[0] for i in range(nbuf)]
    pos = lens_end + _pad(lens_end)
    slices = []
    for n in (main_len, *lens):
        if pos + n > view.nbytes:
            raise IntegrityError(f"{what} from {source} is shorter than its preamble says")
        slices.append(view[pos : pos + n])
        pos += n + _pad(n)
    return slices[0], [pickle.PickleBuffer(s) for s in slices[1:]]


def decode_object(data: memoryview | bytes, policy: UnpicklePolicy, source: str) -> Any:
    """Inverse of :func:`encode_object`; out-of-band buffers are slices of ``data``."""
    main, bufs = _split(data, source, "object payload")
    return _loads(main, policy, source, bufs)


def encode_records(records: Iterable[Any], target_size: int) -> Iterator[tuple[EncodedUnit, int]]:
    """Batch ``(key, value)`` records into units of at most ``target_size`` bytes.

    Yields ``(unit, record_count)``. A unit is a sequence of pickles, each a
    record, a row batch or a list of records of bytes values. The pickler's memo is cleared after each: a generator
    may yield the same object again, changed, and must not find its first state
    referenced. A record that overflows the unit is taken back and opens the next
    one; a single record larger than the target becomes a unit of its own, which
    framing splits over several messages.
    """
    unit = _UnitWriter(target_size)
    for rec in records:
        if not (isinstance(rec, (tuple, list)) and len(rec) == 2):
            raise SerializationError(f"table records must be (key, value) pairs, got {rec!r:.80}")
        key, value = rec
        run = unit.run
        if run is not None:
            if run.add(key, value):
                continue
            unit.flush_run()
        if type(value) is bytes and type(key) in _ATOM_KEYS:  # serialised records (FATE's): one pickle a run
            need = len(value) + (len(key) + _PAIR_OVERHEAD if type(key) is bytes else _key_size(key))
            if not unit.pairs:
                unit.pairs_room = target_size - unit.size
            if need > unit.pairs_room and (unit.count or unit.pairs):
                unit.flush_pairs()
                yield unit.done()
                unit = _UnitWriter(target_size)
                unit.pairs_room = target_size - unit.size
            unit.pairs.append(rec if type(rec) is tuple else (key, value))
            unit.pairs_room -= need
            continue
        unit.flush_pairs()
        if can_start_rows(value):
            if unit.count and unit.size + value.nbytes > target_size:
                yield unit.done()
                unit = _UnitWriter(target_size)
            unit.start_run(key, value)
            continue
        mark = unit.buf.tell()
        _dump_record(unit.pickler, (key, value))
        if unit.count and unit.size > target_size:
            unit.buf.seek(mark)
            unit.buf.truncate()
            yield unit.done()
            unit = _UnitWriter(target_size)  # the record opens the next unit
            _dump_record(unit.pickler, (key, value))
        unit.count += 1
        unit.seal_if_full()
    unit.flush_run()
    unit.flush_pairs()
    if unit.count:
        yield unit.done()


_RUN_OVERHEAD = 256  # bytes a row batch's call takes besides its keys and rows
_KEY_ALLOWANCE = 16  # bytes a row's key is assumed to take: an int, a short string
_PAIR_OVERHEAD = 16  # pickle opcodes around one record in a run of bytes values
# Keys that may join a run of bytes values: immutable, so the run needs no memo cleared between records.
_ATOM_KEYS = frozenset([bytes, str, int])
# The pickle written so far is sealed into a part of its own at this size: a BytesIO
# grown to megabytes write by write is reallocated, and often copied, again and again.
_SEAL = 1 << 16


def _key_size(key: bytes | str | int) -> int:
    """At least the pickled size of a key in a run, with its record's opcodes."""
    if isinstance(key, int):
        return key.bit_length() // 8 + _PAIR_OVERHEAD
    if isinstance(key, str) and not key.isascii():
        return 4 * len(key) + _PAIR_OVERHEAD  # UTF-8 takes at most 4 bytes a character
    return len(key) + _PAIR_OVERHEAD


class _UnitWriter:
    """One unit of table records being written, with the row batch it has open.

    The main pickle is a list of sealed parts and the BytesIO being written.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.sealed: list[bytes] = []
        self._sealed_size = 0
        # not a bound method: a pickler -> writer -> pickler cycle would keep every row block of a
        # partition alive until the cyclic garbage collector happened to run
        self.oob = _RowBlocks()
        self.buf = io.BytesIO()
        self.pickler = _pickler(self.buf, self.oob)
        self.count = 0  # records written
        self.run: RowBlock | None = None
        # A run of records of bytes values not yet written, and the room left for it (its
        # size as pickled, about). Such records hold nothing mutable, so they need no memo
        # cleared between them: one pickle of the list costs one pickler and one unpickler
        # call, not one per record.
        self.pairs: list[tuple[Any, bytes]] = []
        self.pairs_room = 0

    @property
    def size(self) -> int:
        """At least the unit's size so far without the pending run, laid out (:func:`_layout`):
        exact but for the main pickle's padding."""
        return self._sealed_size + self.buf.tell() + self.oob.laid_out + ALIGN - 1

    def seal_if_full(self) -> None:
        if self.buf.tell() >= _SEAL:
            self._seal()

    def _seal(self) -> None:
        if not self.buf.tell():
            return
        part = self.buf.getvalue()  # the BytesIO's own bytes, not a copy: it is dropped here
        self.sealed.append(part)
        self._sealed_size += len(part)
        self.buf = io.BytesIO()
        self.pickler = _pickler(self.buf, self.oob)

    def flush_pairs(self) -> None:
        if not self.pairs:
            return
        self._seal()
        # The pickler hands over each 64 KiB frame it fills as a bytes object of its own:
        # kept as parts of the unit, never copied into one growing buffer.
        frames = _Frames()
        _dump_record(_pickler(frames), self.pairs, self.pairs[0][0])
        self.sealed += frames.parts
        self._sealed_size += frames.size
        self.count += len(self.pairs)
        self.pairs = []

    def start_run(self, key: Any, value: Any) -> None:
        # as many rows as the unit has room for (at least this one: an oversized row is a unit of its own)
        room = self.target - self.size - _RUN_OVERHEAD
        self.run = RowBlock(value, room // (value.nbytes + _KEY_ALLOWANCE))
        self.run.add(key, value)

    def flush_run(self) -> None:
        run = self.run
        if run is None:
            return
        reduction = run.reduction()
        self.oob.current = reduction[1][-1]
        _dump_record(self.pickler, _Reduced(reduction), run.keys[0])
        self.oob.current = None
        self.count += run.count
        self.run = None
        self.seal_if_full()

    def done(self) -> tuple[EncodedUnit, int]:
        return _layout([*self.sealed, self.buf.getbuffer()], self.oob.blocks), self.count


class _Frames:
    """A pickler's file that keeps every write as a part: the pickler writes whole frames."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, data: Any) -> int:
        if type(data) is not bytes:  # a view of something the caller may change later
            data = bytes(data)
        self.parts.append(data)
        self.size += len(data)
        return len(data)


class _RowBlocks:
    """A records pickler's buffer callback: row blocks go out of band, every other buffer in band.

    Out of band, the receiver's rows are views of the message that brought them; any other
    buffer (the array of a single record) is copied in band when its record is taken.
    """

    def __init__(self) -> None:
        self.blocks: list[memoryview] = []
        self.current: pickle.PickleBuffer | None = None  # the row block being written
        self.laid_out = _PREAMBLE.size + _pad(_PREAMBLE.size)  # the unit's bytes besides the main pickle
        self._block_bytes = 0  # the blocks with their padding

    def __call__(self, buf: pickle.PickleBuffer) -> bool:
        if buf is not self.current:
            return True  # in band
        raw = buf.raw()
        self.blocks.append(raw)
        self._block_bytes += raw.nbytes + _pad(raw.nbytes)
        head = _PREAMBLE.size + _LEN.size * len(self.blocks)
        self.laid_out = head + _pad(head) + self._block_bytes
        return False


class _Reduced:
    """Pickled as the call its ``reduction`` names (a row batch)."""

    __slots__ = ("reduction",)

    def __init__(self, reduction: tuple[Any, ...]) -> None:
        self.reduction = reduction

    def __reduce__(self) -> tuple[Any, ...]:
        return self.reduction


def _dump_record(pickler: pickle.Pickler, rec: Any, key: Any = None) -> None:
    try:
        pickler.dump(rec)
        pickler.clear_memo()
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        key = rec[0] if isinstance(rec, tuple) else key
        raise SerializationError(f"cannot encode table record with key {key!r:.80}: {exc}") from exc


def decode_records(data: memoryview | bytes, policy: UnpicklePolicy, source: str) -> list[tuple[Any, Any]]:
    """Inverse of :func:`encode_records` for one unit."""
    if not len(data):
        return []  # the empty unit that ends an empty partition
    main, bufs = _split(data, source, "table batch")
    # A class for this unit whose instances cost no Python-level __init__: one per record.
    unpickler = type("_RecordUnpickler", (_SafeUnpickler,),
                     {"__init__": pickle.Unpickler.__init__, "_policy": policy, "_source": source})  # fmt: skip
    try:
        buffers = iter(bufs)
        return _load_records(main, functools.partial(unpickler, buffers=buffers), source)
    except _NeedsGuard:  # decode the whole unit again, the checking way
        buffers, allowance = iter(bufs), Allowance(len(data), source)  # one for all the unit's records
        return _load_records(main, lambda f: _guarded(f, policy, source, allowance, buffers), source)


def _load_records(main: memoryview, unpickler: Callable[[io.BytesIO], Any], source: str) -> list[tuple[Any, Any]]:
    stream, end = io.BytesIO(main), main.nbytes
    out: list[tuple[Any, Any]] = []
    try:
        while stream.tell() < end:
            # One unpickler per record, as the sender clears its memo after each: the memo
            # indices of one record must not find another record's objects.
            rec = unpickler(stream).load()
            if type(rec) is RowBatch:
                out += rec.records()
                continue
            if type(rec) is list:  # a run of serialised records (encode_records)
                if not all(type(pair) is tuple and len(pair) == 2 for pair in rec):
                    raise IntegrityError(f"table batch from {source} holds a run that is not of records")
                out += rec
                continue
            if not isinstance(rec, tuple) or len(rec) != 2:
                raise IntegrityError(f"table batch from {source} holds a {type(rec).__name__}, not a record")
            out.append(rec)
    except (UnsafePayload, IntegrityError, _NeedsGuard):
        raise
    except Exception as exc:
        raise IntegrityError(f"malformed table batch from {source}: {type(exc).__name__}: {exc}") from exc
    return out
