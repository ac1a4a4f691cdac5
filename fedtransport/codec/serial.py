"""Objects <-> bytes: pickle protocol 5 with out-of-band buffers, and a safe unpickler.

An encoded object is a *unit*: a list of buffers whose concatenation is

    preamble | main pickle | pad | buffer 0 | pad | buffer 1 | ...

The preamble records the lengths, so the receiver can rebuild the out-of-band
buffers as slices of one contiguous receive buffer: a numpy array's data is never
copied into a pickle stream on the way out, and is used in place on the way in.
Every buffer starts on a 64-byte boundary so arrays come back aligned.

Table records are encoded in batches: successive in-band pickles of ``(key, value)``
written by one ``Pickler`` into one unit (each record serialised once, no hex, no JSON).
"""

from __future__ import annotations

import io
import logging
import pickle
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import IntegrityError, SerializationError, UnsafePayload

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


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, policy: UnpicklePolicy, source: str, **kw: Any) -> None:
        super().__init__(file, **kw)
        self._policy = policy
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}:{name}"
        if not self._policy.admits(full):
            self._policy.refused.append(full)
            if self._policy.mode == "report":
                log.warning("refused to unpickle %s from %s (report mode)", full, self._source)
            raise UnsafePayload(
                f"refused to unpickle {full!r} from {self._source}: it is not on the safe allow-list. "
                f"If you trust it, add it with options={{'allow': [{full!r}]}}; "
                "options={'trust_remote_code': True} lifts the check entirely and must only be "
                "used between parties that trust each other's code",
                global_name=full,
            )
        return super().find_class(_RENAMED_MODULES.get(module, module), name)


def _loads(data: memoryview | bytes, policy: UnpicklePolicy, source: str, buffers: Sequence[Any] = ()) -> Any:
    try:
        return _SafeUnpickler(io.BytesIO(data), policy, source, buffers=buffers).load()
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


def encode_object(obj: Any, *, cloudpickle_fallback: bool = False) -> EncodedUnit:
    """Pickle ``obj`` with protocol 5; large contiguous buffers stay out of band."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        main = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        if not cloudpickle_fallback:
            raise SerializationError(f"cannot encode a {type(obj).__name__}: {exc}") from exc
        import cloudpickle  # lambdas and local classes, only sent when the peers trust code

        buffers = []
        try:
            main = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        except Exception as exc2:
            raise SerializationError(f"cannot encode a {type(obj).__name__}: {exc2}") from exc2
    raws = [b.raw() for b in buffers]
    head = bytearray(_PREAMBLE.pack(_PREAMBLE_MAGIC, len(raws), len(main)))
    for r in raws:
        head += _LEN.pack(r.nbytes)
    head += bytes(_pad(len(head)))
    parts: list[bytes | bytearray | memoryview] = [head, main, bytes(_pad(len(main)))]
    for r in raws:
        parts.append(r)
        if _pad(r.nbytes):
            parts.append(bytes(_pad(r.nbytes)))
    return EncodedUnit.of(parts)


def decode_object(data: memoryview | bytes, policy: UnpicklePolicy, source: str) -> Any:
    """Inverse of :func:`encode_object`; out-of-band buffers are slices of ``data``."""
    view = memoryview(data).cast("B")
    if view.nbytes < _PREAMBLE.size:
        raise IntegrityError(f"object payload from {source} is truncated ({view.nbytes} bytes)")
    magic, nbuf, main_len = _PREAMBLE.unpack_from(view)
    if magic != _PREAMBLE_MAGIC:
        raise IntegrityError(f"object payload from {source} has an unknown preamble {bytes(magic)!r}")
    lens_end = _PREAMBLE.size + nbuf * _LEN.size
    if lens_end > view.nbytes:
        raise IntegrityError(f"object payload from {source} declares {nbuf} buffers it does not hold")
    lens = [_LEN.unpack_from(view, _PREAMBLE.size + i * _LEN.size)[0] for i in range(nbuf)]
    pos = lens_end + _pad(lens_end)
    slices = []
    for n in (main_len, *lens):
        if pos + n > view.nbytes:
            raise IntegrityError(f"object payload from {source} is shorter than its preamble says")
        slices.append(view[pos : pos + n])
        pos += n + _pad(n)
    main, bufs = slices[0], [pickle.PickleBuffer(s) for s in slices[1:]]
    return _loads(main, policy, source, bufs)


def encode_records(records: Iterable[Any], target_size: int) -> Iterator[tuple[bytes, int]]:
    """Batch ``(key, value)`` records into units of at most ``target_size`` bytes.

    Yields ``(unit_bytes, record_count)``. Each record is its own small pickle (no
    memo shared across records), so a batch can be closed before the record that
    would overflow it; a single record larger than the target becomes a unit of
    its own, which framing splits over several messages.
    """
    batch: list[bytes] = []
    size = 0
    for rec in records:
        if not (isinstance(rec, (tuple, list)) and len(rec) == 2):
            raise SerializationError(f"table records must be (key, value) pairs, got {rec!r:.80}")
        try:
            data = pickle.dumps(rec if isinstance(rec, tuple) else (rec[0], rec[1]), protocol=5)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise SerializationError(f"cannot encode table record with key {rec[0]!r:.80}: {exc}") from exc
        if batch and size + len(data) > target_size:
            yield b"".join(batch), len(batch)
            batch, size = [], 0
        batch.append(data)
        size += len(data)
    if batch:
        yield b"".join(batch), len(batch)


def decode_records(data: memoryview | bytes, policy: UnpicklePolicy, source: str) -> list[tuple[Any, Any]]:
    """Inverse of :func:`encode_records` for one unit."""
    stream = io.BytesIO(data)
    unpickler = _SafeUnpickler(stream, policy, source)
    end = len(data)
    out: list[tuple[Any, Any]] = []
    try:
        while stream.tell() < end:
            rec = unpickler.load()
            if not isinstance(rec, tuple) or len(rec) != 2:
                raise IntegrityError(f"table batch from {source} holds a {type(rec).__name__}, not a record")
            out.append(rec)
    except (UnsafePayload, IntegrityError):
        raise
    except Exception as exc:
        raise IntegrityError(f"malformed table batch from {source}: {type(exc).__name__}: {exc}") from exc
    return out
