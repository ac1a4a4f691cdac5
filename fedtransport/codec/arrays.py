"""numpy arrays, scalars and dtypes pickled as calls of our own checked constructors.

numpy pickles an array as calls of its reconstructors and a state to set (BUILD), and
those trust what they are given: a receiver must decode any pickle naming numpy with
the slow, checking unpickler of ``npguard.py``. Our sender writes the numpy values it
knows instead as ``_array(dtype, shape, order, data)``, ``_scalar(dtype, data)`` and
``_dtype(dtype)``, whose arguments are plain strings, ints and bytes that these
functions check before numpy sees them. Such pickles name nothing from numpy, so the
receiver keeps the fast C unpickler, and arrays still arrive out of band, in place.

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

__all__ = ["REBUILDERS", "reduce_numpy"]

_SIMPLE_KINDS = frozenset("biufcSU")  # datetimes cannot be exported as a buffer
_ORDERS = ("C", "F")


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
        return _scalar, (obj.dtype.str, obj.tobytes())
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
    if not isinstance(data, (bytes, bytearray, pickle.PickleBuffer)):
        raise IntegrityError(f"numpy array data must be bytes, got {type(data).__name__}")
    with memoryview(data) as view:  # released at once: numpy takes its own export below
        nbytes = view.nbytes
    count = math.prod(shape)
    if count * dtype.itemsize != nbytes:
        raise IntegrityError(f"numpy array of {shape} {spec} needs {count * dtype.itemsize} bytes, got {nbytes}")
    if count == 0:
        return np.empty(shape, dtype=dtype, order=order)
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order=order)


def _scalar(spec: Any, data: Any) -> Any:
    import numpy as np

    dtype = _dtype(spec)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise IntegrityError(f"numpy scalar of {spec} needs {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


#: what the safe unpickler admits for these (``module:qualname``)
REBUILDERS = frozenset(f"{__name__}:{fn.__name__}" for fn in (_array, _scalar, _dtype))
