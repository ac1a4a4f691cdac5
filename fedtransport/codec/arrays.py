"""numpy arrays, scalars and dtypes pickled as calls of our own checked constructors.

numpy pickles an array as calls of its reconstructors and a state to set (BUILD), and
those trust what they are given: a receiver must decode any pickle naming numpy with
the slow, checking unpickler of ``guard.py``. Our sender writes the numpy values it
knows instead as ``_array(dtype, shape, order, data)``, ``_scalar(dtype, data)`` and
``_dtype(dtype)``, whose arguments are plain strings, ints and bytes that these
functions check before numpy sees them. Such pickles name nothing from numpy, so the
receiver keeps the fast C unpickler, and arrays still arrive out of band, in place.

Table records whose values are arrays of one simple dtype and shape travel as row
batches: ``_rows(keys, dtype, shape, data)`` carries the keys of a run of records and
their arrays stacked into one block, and the receiver's arrays are rows of that
block (read-only views, as arrays decoded from a pickle are). One copy at C speed
replaces a pickle call per record on each side.

Only simple dtypes take this path (booleans, numbers, fixed-width bytes and text):
datetimes, object, structured and sub-array dtypes, dtypes with metadata and ndarray
subclasses are left to numpy's own reducers, and the receiver checks them the slow way.
"""

from __future__ import annotations

import functools
import math
import pickle
import sys
from typing import Any

from ..errors import IntegrityError, UnsafePayload

__all__ = ["REBUILDERS", "RowBatch", "RowBlock", "can_start_rows", "reduce_numpy"]

_SIMPLE_KINDS = frozenset("biufcSU")  # datetimes cannot be exported as a buffer
_ORDERS = ("C", "F")
# A scalar is copied out of its bytes at each call, and a pickle may call _scalar again and
# again on one memoised string: kept as small as an empty dict's cost per pickle byte. Longer
# scalars (fixed-width strings) go to numpy's reducer, which the receiver's guard charges.
_MAX_SCALAR = 256


def _simple(dtype: Any) -> bool:
    return (
        dtype.kind in _SIMPLE_KINDS
        and dtype.fields is None
        and dtype.subdtype is None
        and dtype.metadata is None
        and not dtype.hasobject
    )


def reduce_numpy(obj: Any) -> Any:
    """``Pickler.reducer_override``: our constructors for simple numpy values, else NotImplemented."""
    np = sys.modules.get("numpy")
    if np is None:
        return NotImplemented
    kind = type(obj)
    if kind is np.ndarray:
        if not _simple(obj.dtype):
            return NotImplemented
        if obj.flags.c_contiguous:
            order = "C"
        elif obj.flags.f_contiguous:
            order = "F"
        else:
            obj, order = np.ascontiguousarray(obj), "C"
        return _array, (obj.dtype.str, obj.shape, order, pickle.PickleBuffer(obj))
    if isinstance(obj, np.generic) and kind.__module__ == "numpy" and _simple(obj.dtype):
        return (_scalar, (obj.dtype.str, obj.tobytes())) if obj.dtype.itemsize <= _MAX_SCALAR else NotImplemented
    if isinstance(obj, np.dtype) and _simple(obj):
        return _dtype, (obj.str,)
    return NotImplemented


def _dtype(spec: Any) -> Any:
    if type(spec) is not str or len(spec) > 32:
        raise IntegrityError(f"malformed numpy dtype {spec!r:.40}")
    return _checked_dtype(spec)


@functools.lru_cache(maxsize=256)  # a table's records share a few dtypes; numpy dtypes are immutable
def _checked_dtype(spec: str) -> Any:
    import numpy as np

    try:
        dtype = np.dtype(spec)
    except (TypeError, ValueError) as exc:
        raise IntegrityError(f"malformed numpy dtype {spec!r}: {exc}") from exc
    if not _simple(dtype):
        raise UnsafePayload(f"refused numpy dtype {spec!r}: only simple dtypes travel this way", global_name=spec)
    return dtype


def _array(spec: Any, shape: Any, order: Any, data: Any) -> Any:
    import numpy as np

    dtype = _dtype(spec)
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)) or len(shape) > 64:
        raise IntegrityError(f"malformed numpy shape {shape!r:.80}")
    if order not in _ORDERS:
        raise IntegrityError(f"malformed numpy order {order!r:.20}")
    # memoryview: an out-of-band buffer marked read-only (a read-only array sent) comes back as one
    if not isinstance(data, (bytes, bytearray, pickle.PickleBuffer, memoryview)):
        raise IntegrityError(f"numpy array data must be bytes, got {type(data).__name__}")
    with memoryview(data) as view:  # released at once: numpy takes its own export below
        nbytes = view.nbytes
    count = math.prod(shape)
    if count * dtype.itemsize != nbytes:
        raise IntegrityError(f"numpy array of {shape} {spec} needs {count * dtype.itemsize} bytes, got {nbytes}")
    if count == 0:
        return np.empty(shape, dtype=dtype, order=order)
    # numpy's stub names the buffer types it takes for Python < 3.12; a PickleBuffer is one as well
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order=order)  # type: ignore[arg-type]


def _scalar(spec: Any, data: Any) -> Any:
    import numpy as np

    dtype = _dtype(spec)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize or dtype.itemsize > _MAX_SCALAR:
        raise IntegrityError(f"numpy scalar of {spec} needs {dtype.itemsize} bytes, at most {_MAX_SCALAR}")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def can_start_rows(value: Any) -> bool:
    """True for an array that may open a row batch: a plain ndarray of a simple dtype, not 0-d or empty."""
    np = sys.modules.get("numpy")
    return np is not None and type(value) is np.ndarray and value.ndim > 0 and value.size > 0 and _simple(value.dtype)


class RowBlock:
    """The arrays of a run of records, copied as they are taken into one block.

    Copied at once, not referenced: a partition generator may reuse an array for
    its next record. Any array of the block's exact type, dtype and shape joins,
    whatever its strides.
    """

    __slots__ = ("block", "count", "dtype", "keys", "shape", "type")

    def __init__(self, value: Any, capacity: int) -> None:
        import numpy as np

        self.type, self.dtype, self.shape = type(value), value.dtype, value.shape
        self.block = np.empty((max(1, capacity), *value.shape), dtype=value.dtype)
        self.keys: list[Any] = []
        self.count = 0

    def add(self, key: Any, value: Any) -> bool:
        """Take one record; False when it does not fit (another kind of value, or the block is full)."""
        if (
            type(value) is not self.type
            or value.shape != self.shape
            or value.dtype != self.dtype
            or self.count == len(self.block)
        ):
            return False
        self.block[self.count] = value
        self.keys.append(key)
        self.count += 1
        return True

    def reduction(self) -> tuple[Any, ...]:
        """What a pickler writes for the run: a call of ``_rows``."""
        rows = self.block[: self.count]
        # an ndarray exports the buffer protocol; numpy's stub says so only for Python 3.12+
        return _rows, (self.keys, rows.dtype.str, rows.shape[1:], pickle.PickleBuffer(rows))  # type: ignore[arg-type]


class RowBatch:
    """A run of table records decoded from one ``_rows`` call.

    Expanded into records only by the record decoder, once per record it reads: a pickle
    that calls ``_rows`` again and again on one memoised key list builds nothing big.
    """

    __slots__ = ("block", "keys")

    def __init__(self, keys: list[Any], block: Any) -> None:
        self.keys, self.block = keys, block

    def records(self) -> list[tuple[Any, Any]]:
        return list(zip(self.keys, self.block, strict=True))  # iterating a block yields its rows as views


def _rows(keys: Any, spec: Any, shape: Any, data: Any) -> RowBatch:
    if type(keys) is not list or not keys:
        raise IntegrityError("a row batch needs a non-empty list of keys")
    if not (isinstance(shape, tuple) and shape and all(type(n) is int and n > 0 for n in shape)) or len(shape) > 63:
        raise IntegrityError(f"malformed row shape {shape!r:.80}")
    return RowBatch(keys, _array(spec, (len(keys), *shape), "C", data))


#: what the safe unpickler admits for these (``module:qualname``)
REBUILDERS = frozenset(f"{__name__}:{fn.__name__}" for fn in (_array, _scalar, _dtype, _rows))
