"""The checking unpickler: numpy data and copying constructors from a peer, held to account.

Two things a peer can do through the safe allow-list alone, which the fast C unpickler
cannot stop because it offers no hook on REDUCE or BUILD:

**Corrupt memory through numpy.** numpy's own reconstructors are on the allow-list, but
numpy trusts what a pickle tells it. Naming only allow-listed numpy functions, a peer can:

- call ``numpy.ndarray(shape, dtype("O"), buffer)``: an object array over raw bytes, so
  every element is a pointer the peer chose (a crash at best);
- give a dtype a pickled state whose flags deny the object field it declares (BUILD on
  a ``numpy.dtype``), then build an array of it from raw bytes (``_frombuffer``, or an
  array's own state): the same pointers, through a dtype numpy thinks is plain;
- change a dtype's state after an array or another dtype took it (BUILD twice).

**Exhaust memory through constructors that copy or expand their argument.** A few bytes
of pickle can call ``bytearray(1 << 40)``, ``list(range(10**9))``, or ``bytearray(x)``
again and again on one memoised ``x``: unbounded memory from a bounded message. Pickles
that our senders (and Python's own pickler) write never pass such arguments, but any
stream may name these constructors (a ``defaultdict(list)`` names ``list``).

So a pickle that names anything from numpy, or a constructor of :data:`COPYING_GLOBALS`,
is decoded by :class:`GuardedUnpickler`, a subclass of the pure-Python unpickler that
checks those opcodes (other pickles keep the fast C path; see ``serial.py``):

- numpy types (arrays, dtypes, scalars) are never called or instantiated directly:
  arrays come only from numpy's reconstructors, dtypes only through ``numpy.dtype``;
- ``numpy.dtype(...)`` always returns a private copy, and its state may be set once, before
  anything used it. That state never reaches numpy's ``dtype.__setstate__`` (which trusts
  flags and offsets, and crashes on some states): the dtype is rebuilt from it with numpy's
  public constructors, pickled flags that contradict the fields are refused, and the copy
  is given the state numpy itself writes for the rebuilt dtype;
- an array's state may be set once, only on an array ``_reconstruct`` just made, and only
  once it is checked to match its shape and dtype (numpy swaps the dtype in before it
  checks the data, and an array left half-way crashes when it is freed);
- ``_frombuffer`` reads only the pickle's own byte strings and out-of-band buffers;
- every call of a copying constructor is charged, before it runs, the length of its
  arguments (an int's value for ``bytes``/``bytearray``) against an :class:`Allowance` of
  twice the unit's own size plus 1 MiB; a unit that would exceed it is refused with
  :class:`IntegrityError`, having built nothing big. ``_reconstruct`` is charged the
  elements of the shape it is asked for (numpy's own pickles ask for none).

**Spend CPU time superlinear in the bytes sent.** Converting between a number's binary and
decimal forms, and a gcd, take time quadratic in the digits: ``int(Decimal("1e300000"))``
is 2 s of CPU from a 272-byte pickle, ``Fraction("1e10000000")`` 6 s and a 4 MB int. So
the numeric constructors (``int``, ``str``, ``Decimal``, ``Fraction``) are refused, with
:class:`UnsafePayload`, an argument worth more than :data:`MAX_BITS` bits (a Decimal's
digits and exponent counted, a string's length, a Fraction's exponent), and a pickle that
names ``Decimal`` may not also carry an int of more than :data:`MAX_BITS` bits: a set or
dict holding both compares them on a hash collision, converting the int to a Decimal.
Honest values never come close: pickle writes a Decimal as its string and a Fraction as
``"n/d"``, each within Python's own 4300-digit bound on int/str conversions.

Every numpy object the stream hands to numpy code is marked as used: it can no longer be
given a state. Refusals are :class:`UnsafePayload` naming the numpy global involved.
"""

from __future__ import annotations

import decimal
import fractions
import functools
import io
import pickle
import re
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import IntegrityError, UnsafePayload

__all__ = ["COPYING_GLOBALS", "MAX_BITS", "Allowance", "GuardedUnpickler", "needs_guard"]

_MAX_DEPTH = 64
_LIFTED_BY = "only options={'trust_remote_code': True} lifts this check"


#: allow-listed constructors that copy or expand what they are given (``module:qualname``)
COPYING_GLOBALS = frozenset(
    [
        *(f"builtins:{n}" for n in ("str", "bytes", "bytearray", "int", "list", "tuple", "dict", "set", "frozenset")),
        "collections:OrderedDict",
        "collections:defaultdict",
        "collections:deque",
        "collections:Counter",
        "decimal:Decimal",
        "fractions:Fraction",
        "fedtransport.table:Table",  # copies its list of partitions
    ]
)


#: the largest number, in bits, a numeric constructor converts: ~19,700 decimal digits, a few
#: milliseconds of conversion or gcd, and well above CPython's own bound of 4300 digits
MAX_BITS = 1 << 16
_MAX_CHARS = 2 * 4300 + 64  # a "n/d" string within CPython's bound, with sign, point and spaces
_BITS_PER_DIGIT = 3.33  # log2(10), rounded up
_EXPONENT = re.compile(r"[eE]\s*[-+]?([0-9_]+)")
_NUMERIC = (int, str, decimal.Decimal, fractions.Fraction)


def _number_bits(x: Any) -> int:
    """About how many bits a numeric conversion of ``x`` handles (0: nothing to convert)."""
    if isinstance(x, int):
        return x.bit_length()
    if isinstance(x, fractions.Fraction):
        return max(x.numerator.bit_length(), x.denominator.bit_length())
    if isinstance(x, decimal.Decimal):
        if not x.is_finite():
            return 0
        _, digits, exponent = x.as_tuple()
        return int((len(digits) + abs(int(exponent))) * _BITS_PER_DIGIT)
    return 0


def _superlinear(func: Any, args: Iterable[Any]) -> str | None:
    """Why calling numeric ``func`` on ``args`` would cost superlinear time, or None."""
    for arg in args:
        if isinstance(arg, (str, bytes, bytearray)):
            if len(arg) > _MAX_CHARS and func in (int, fractions.Fraction):  # Decimal and str(b) are linear
                return f"a {len(arg)}-character number"
            if func is fractions.Fraction:
                text = arg.decode("latin-1") if isinstance(arg, (bytes, bytearray)) else arg
                m = _EXPONENT.search(text)
                if m and (len(m[1]) > 6 or int(m[1].replace("_", "") or 0) * _BITS_PER_DIGIT > MAX_BITS):
                    return f"an exponent of {m[1][:12]}"
        elif (bits := _number_bits(arg)) > MAX_BITS:
            return f"a number of about {bits} bits"
    return None


def _elements(shape: Any) -> int:
    """The element count of a numpy shape argument (an int or a tuple of them)."""
    count = 1
    for n in shape if type(shape) is tuple else (shape,):
        if type(n) is not int or n < 0:
            return 0  # numpy refuses it, having allocated nothing
        count *= n
        if count > 1 << 62:
            break
    return count


def _is_numpy_module(module: str) -> bool:
    return module == "numpy" or module.startswith("numpy.")


def needs_guard(module: str, name: str) -> bool:
    """True if a pickle naming ``module:name`` must be decoded by :class:`GuardedUnpickler`."""
    return _is_numpy_module(module) or f"{module}:{name}" in COPYING_GLOBALS


class Allowance:
    """What the copying constructors of one unit may still build (elements or bytes)."""

    __slots__ = ("left", "source")

    def __init__(self, unit_size: int, source: str) -> None:
        self.left = 2 * unit_size + (1 << 20)
        self.source = source

    def charge(self, func: Any, args: tuple[Any, ...]) -> None:
        cost = 0
        for arg in args:
            if type(arg) is int:
                cost += arg if func in (bytes, bytearray) and arg > 0 else 0
            elif isinstance(arg, pickle.PickleBuffer):
                with memoryview(arg) as view:
                    cost += view.nbytes
            else:
                try:
                    cost += len(arg)
                except TypeError:  # no length: nothing it could expand into
                    pass
                except OverflowError:  # range(10**20)
                    cost = self.left + 1
        self.take(cost, _qualname(func))

    def take(self, cost: int, what: str) -> None:
        if cost > self.left:
            raise IntegrityError(
                f"pickle from {self.source} would build {cost} elements or bytes with {what}, more than "
                "its own size allows: refused before building it"
            )
        self.left -= cost


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__name__)}"


def _refuse(name: str, why: str, source: str) -> UnsafePayload:
    return UnsafePayload(f"refused {name!r} from {source}: {why}; {_LIFTED_BY}", global_name=name)


def _dtype_from_state(np: Any, base: Any, state: Any, source: str) -> Any:
    """The dtype a pickled ``(base, state)`` describes, built only through numpy's public constructors.

    numpy's own ``dtype.__setstate__`` trusts its input (flags, offsets, which fields hold
    objects) and crashes on some states, so a peer's state never reaches it.
    """
    if type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4):
        raise _refuse("numpy:dtype", "a dtype state numpy does not write", source)
    endian, sub, names, fields, elsize, _alignment, flags = state[1:8]
    meta = state[8] if len(state) == 9 else None
    if endian not in ("<", ">", "|", "=") or type(elsize) is not int or type(flags) is not int:
        raise _refuse("numpy:dtype", "a malformed dtype state", source)
    try:
        if names is not None or fields is not None:
            if type(names) is not tuple or type(fields) is not dict or sub is not None:
                raise ValueError("names and fields disagree")
            formats, offsets, titles = [], [], []
            for n in names:
                f = fields.get(n) if type(n) is str else None
                if type(f) is not tuple or len(f) not in (2, 3) or not isinstance(f[0], np.dtype):
                    raise ValueError(f"field {n!r} is not (dtype, offset[, title])")
                formats.append(f[0])
                offsets.append(f[1])
                titles.append(f[2] if len(f) == 3 else None)
            spec: dict[str, Any] = {"names": list(names), "formats": formats, "offsets": offsets, "itemsize": elsize}
            if any(t is not None for t in titles):
                spec["titles"] = titles
            d = np.dtype(spec, align=bool(flags & 0x80))
            if base.type is not np.void:  # numpy.record and other void subclasses
                d = np.dtype((base.type, d))
        elif sub is not None:
            if type(sub) is not tuple or len(sub) != 2 or not isinstance(sub[0], np.dtype):
                raise ValueError("subarray is not (dtype, shape)")
            d = np.dtype((sub[0], sub[1]))
        else:
            d = base
            if base.kind in "Mm" and type(meta) is tuple and len(meta) == 2:
                user, unit = meta
                if type(unit) is not tuple or len(unit) != 4 or type(unit[0]) not in (bytes, str):
                    raise ValueError("datetime unit is not (unit, count, 1, 1)")
                name = unit[0].decode("ascii") if type(unit[0]) is bytes else unit[0]
                count = unit[1]
                if type(count) is not int:
                    raise ValueError("datetime unit count is not an int")
                d = np.dtype(f"{base.char}8" if name == "generic" else f"{base.char}8[{count}{name}]")
                meta = user
            if endian in "<>" and d.byteorder != "|":
                d = d.newbyteorder(endian)
            if elsize not in (-1, d.itemsize):
                raise ValueError(f"item size {elsize} for a {d}")
        if meta is not None:
            if type(meta) is not dict:
                raise ValueError("metadata is not a dict")
            d = np.dtype(d, metadata=meta)
    except UnsafePayload:
        raise
    except Exception as exc:  # numpy refuses the fields themselves (overlapping objects, offsets...)
        why = f"a dtype state numpy cannot rebuild ({type(exc).__name__}: {exc})"
        raise _refuse("numpy:dtype", why, source) from None
    if flags != d.flags:
        raise _refuse(
            "numpy:dtype",
            f"a dtype whose pickled flags ({flags:#x}) contradict its fields (numpy says {d.flags:#x}): "
            "its data would be read as object pointers",
            source,
        )
    return d


def _check_array_state(np: Any, state: Any, source: str) -> None:
    """Refuse an array state numpy would fail on half-way (it replaces the dtype first)."""
    name = "numpy._core.multiarray:_reconstruct"
    if type(state) is not tuple or len(state) != 5 or state[0] != 1:
        raise _refuse(name, "an array state numpy does not write", source)
    _, shape, dtype, fortran, raw = state
    if (
        type(shape) is not tuple
        or len(shape) > 64
        or not all(type(n) is int and n >= 0 for n in shape)
        or not isinstance(dtype, np.dtype)
        or type(fortran) not in (bool, int)
    ):
        raise _refuse(name, "a malformed array state", source)
    count = 1
    for n in shape:
        count *= n
    if dtype.flags & 0x02:  # NPY_LIST_PICKLE: elements come as a list
        ok = type(raw) is list and len(raw) == count
    else:
        ok = type(raw) is bytes and len(raw) == count * dtype.itemsize
    if not ok:
        raise _refuse(name, f"array data that does not match its shape {shape} and dtype {dtype}", source)


if TYPE_CHECKING:

    class _PyUnpickler(pickle._Unpickler):
        """What the pure-Python unpickler has that typeshed's stub leaves out: what we extend."""

        stack: list[Any]
        append: Callable[[Any], None]

        def _instantiate(self, klass: Any, args: Any) -> None: ...
        def load_readonly_buffer(self) -> None: ...
        def load_build(self) -> None: ...

else:
    _PyUnpickler = pickle._Unpickler


class GuardedUnpickler(_PyUnpickler):
    """The pure-Python unpickler with REDUCE, BUILD, NEWOBJ and buffers checked (module docstring)."""

    dispatch: ClassVar[dict[int, Any]] = dict(_PyUnpickler.dispatch)

    def __init__(
        self,
        file: io.BytesIO,
        admit: Callable[[str, str], str],
        source: str,
        allowance: Allowance,
        buffers: Iterable[Any] = (),
    ) -> None:
        super().__init__(file, buffers=buffers)
        self._admit = admit
        self._source = source
        self._allowance = allowance
        self._roles: dict[int, str] = {}
        self._fresh: dict[int, Any] = {}  # dtypes/arrays made here whose state is not set yet
        self._used: dict[int, Any] = {}  # numpy objects numpy code has seen (kept alive: ids stay unique)
        self._own_views: dict[int, Any] = {}  # read-only views of our out-of-band buffers
        self._decimal = False  # the stream named decimal.Decimal
        self._huge_int = False  # the stream carried an int of more than MAX_BITS bits

    @property
    def _np(self) -> Any:
        """numpy, once anything imported it (no numpy object can exist before)."""
        return sys.modules.get("numpy")

    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(self._admit(module, name), name)  # the allow-list first
        if f"{module}:{name}" in COPYING_GLOBALS:
            self._roles[id(obj)] = "copying"
            if obj is decimal.Decimal:
                self._decimal = True
                self._mixed()
        elif _is_numpy_module(module):
            np = self._np
            if obj is np.dtype:
                role = "dtype"
            elif isinstance(obj, type) and issubclass(obj, (np.ndarray, np.dtype, np.generic)):
                role = "type"
            elif name == "_reconstruct":
                role = "reconstruct"
            elif name == "_frombuffer":
                role = "frombuffer"
            else:
                role = "numpy"
            self._roles[id(obj)] = role
        return obj

    # -- bookkeeping ------------------------------------------------------------------------

    def _use(self, obj: Any, depth: int = 0) -> None:
        """Mark the numpy objects inside ``obj`` as seen by numpy: their state is final."""
        np = self._np
        if np is not None and isinstance(obj, (np.dtype, np.ndarray)):
            self._used[id(obj)] = obj
            return
        if isinstance(obj, (tuple, list, set, frozenset, dict)):
            if depth > _MAX_DEPTH:
                raise IntegrityError(f"pickle from {self._source} nests numpy arguments too deeply")
            items = obj.items() if isinstance(obj, dict) else obj
            for item in items:
                self._use(item, depth + 1)

    # -- opcodes ----------------------------------------------------------------------------

    def _call(self, func: Any, args: Any) -> Any:
        if type(args) is not tuple:
            raise IntegrityError(f"pickle from {self._source}: REDUCE arguments are a {type(args).__name__}")
        role = self._roles.get(id(func))
        if role is None:
            return func(*args)
        if role == "copying":
            self._check_numeric(func, args)
            self._allowance.charge(func, args)
            return func(*args)
        np = self._np
        if role == "type":
            raise _refuse(_qualname(func), "numpy types are rebuilt only through numpy's reconstructors", self._source)
        if role == "dtype":
            if not 1 <= len(args) <= 3:
                raise IntegrityError(f"pickle from {self._source}: numpy.dtype with {len(args)} arguments")
            self._use(args)
            d = np.dtype(args[0], bool(args[1]) if len(args) > 1 else False, True)  # always a private copy
            self._fresh[id(d)] = d
            return d
        if role == "reconstruct":
            if len(args) != 3 or not (isinstance(args[0], type) and issubclass(args[0], np.ndarray)):
                raise _refuse("numpy._core.multiarray:_reconstruct", "called with unexpected arguments", self._source)
            self._use(args[1:])
            self._allowance.take(_elements(args[1]), "numpy._core.multiarray:_reconstruct")  # shape before data
            arr = func(*args)
            self._fresh[id(arr)] = arr
            return arr
        if role == "frombuffer":
            buf = args[0] if args else None
            own = type(buf) in (bytes, bytearray, pickle.PickleBuffer) or id(buf) in self._own_views
            if len(args) != 4 or not own:
                raise _refuse(
                    "numpy._core.numeric:_frombuffer", "asked to read memory that is not the pickle's own", self._source
                )
            self._use(args)
            return func(*args)
        self._use(args)
        self._allowance.charge(func, args)  # numpy's scalar() copies its bytes
        return func(*args)

    def _mixed(self) -> None:
        """A Decimal compared with an int (dict keys, set members whose hashes collide) converts
        the int to a Decimal, in time quadratic in its digits: one pickle does not get both."""
        if self._decimal and self._huge_int:
            raise _refuse(
                "decimal:Decimal",
                f"a pickle naming Decimal also carries an int of more than {MAX_BITS} bits, which comparing "
                "the two would convert in time superlinear in its size",
                self._source,
            )

    def _load_int(self, load: Callable[[GuardedUnpickler], None]) -> None:
        load(self)
        top = self.stack[-1]
        if type(top) is int and top.bit_length() > MAX_BITS:
            self._huge_int = True
            self._mixed()

    for _op in (pickle.INT, pickle.LONG, pickle.LONG1, pickle.LONG4):  # the opcodes of unbounded ints
        dispatch[_op[0]] = functools.partial(lambda self, load: self._load_int(load), load=dispatch[_op[0]])
    del _op

    def load_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        stack[-1] = self._call(stack[-1], args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def _check_numeric(self, func: Any, args: Iterable[Any]) -> None:
        if func in _NUMERIC and (why := _superlinear(func, args)) is not None:
            raise _refuse(_qualname(func), f"{why} costs time superlinear in the bytes that carry it", self._source)

    def _check_new(self, cls: Any, args: Any, kwargs: Any = None) -> None:
        role = self._roles.get(id(cls))
        if role == "copying" and type(args) is tuple:  # tuple.__new__(tuple, range(...)) expands too
            extra = tuple(kwargs.values()) if type(kwargs) is dict else ()  # Decimal.__new__(value=...)
            self._check_numeric(cls, args + extra)
            self._allowance.charge(cls, args + extra)
        elif role in ("type", "dtype"):
            raise _refuse(_qualname(cls), "numpy types are rebuilt only through numpy's reconstructors", self._source)

    def _instantiate(self, klass: Any, args: Any) -> None:  # INST and OBJ
        self._check_new(klass, tuple(args))
        super()._instantiate(klass, args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_new(cls, args)
        if type(args) is not tuple:
            raise IntegrityError(f"pickle from {self._source}: NEWOBJ arguments are a {type(args).__name__}")
        self.append(cls.__new__(cls, *args))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_new(cls, args, kwargs)
        if type(args) is not tuple or type(kwargs) is not dict:
            raise IntegrityError(f"pickle from {self._source}: malformed NEWOBJ_EX arguments")
        self.append(cls.__new__(cls, *args, **kwargs))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_readonly_buffer(self) -> None:
        if type(self.stack[-1]) is not pickle.PickleBuffer:
            raise IntegrityError(f"pickle from {self._source}: READONLY_BUFFER on a {type(self.stack[-1]).__name__}")
        super().load_readonly_buffer()
        view = self.stack[-1]
        self._own_views[id(view)] = view

    dispatch[pickle.READONLY_BUFFER[0]] = load_readonly_buffer

    def load_build(self) -> None:
        np = self._np
        inst = self.stack[-2]
        if np is None:
            super().load_build()
        elif isinstance(inst, np.dtype):
            self._build_once(inst, "numpy:dtype")
            state = self.stack.pop()
            self._use(state)
            wanted = _dtype_from_state(np, inst, state, self._source)
            _, args, canonical = wanted.__reduce__()
            if args[0] != inst.__reduce__()[1][0]:
                raise _refuse("numpy:dtype", f"a {wanted} state given to a {inst}", self._source)
            inst.__setstate__(canonical)  # the state numpy itself writes for that dtype
            if inst != wanted or inst.flags != wanted.flags:
                raise _refuse("numpy:dtype", f"a dtype numpy did not rebuild as {wanted}", self._source)
        elif isinstance(inst, np.ndarray):
            self._build_once(inst, "numpy._core.multiarray:_reconstruct")
            state = self.stack.pop()
            self._use(state)
            _check_array_state(np, state, self._source)
            self._allowance.take(len(state[4]), "numpy._core.multiarray:_reconstruct")
            inst.__setstate__(state)
        elif isinstance(inst, np.generic):
            raise _refuse(_qualname(type(inst)), "a numpy scalar is never given a state", self._source)
        else:
            super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def _build_once(self, inst: Any, name: str) -> None:
        key = id(inst)
        if self._fresh.get(key) is not inst or key in self._used:
            raise _refuse(name, "a state set twice, after use, or on an object numpy did not just make", self._source)
        del self._fresh[key]
        self._used[key] = inst  # final from now on
