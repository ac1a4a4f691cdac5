"""Connection options: one declarative spec per backend that checks them and documents them.

An :class:`Option` says what a key accepts (its type, range or choices, or a parser of its
own), its default and one line of documentation. An :class:`OptionSpec` groups the options of
one backend (or the common ones, :data:`COMMON_OPTIONS`) and

* validates a mapping of given options: defaults applied, every value checked, and a
  ``ConfigError`` that names the key, what it accepts and the value given; a key it does not
  know is refused with the list of valid ones, so a typo never silently falls back to a default;
* renders the markdown table of docs/backends.md (``scripts/option_docs.py`` writes the tables
  between ``<!-- options:NAME -->`` markers, and a test fails when one differs from its spec).

An ``OptionSpec`` is also the read-only mapping of its defaults, so a backend sets it as its
``Transport.option_defaults``; :func:`split_options` then checks that backend's keys too. A
third-party backend may still declare a plain dict of defaults, whose values are passed on
unchecked.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .framing import DEFAULT_MAX_STREAMS, HEADER_SIZE
from .identity import X25519PrivateKey, X25519PublicKey, parse_identity, parse_peer_keys

__all__ = [
    "COMMON_DEFAULTS",
    "COMMON_OPTIONS",
    "CommonOptions",
    "Option",
    "OptionSpec",
    "doc_tables",
    "split_options",
]

KiB = 1 << 10
MiB = 1 << 20
_DAY = 86400


@dataclass(frozen=True)
class Option:
    """One option key: what it accepts, its default and what it does.

    ``type`` is ``int`` (bounded by ``range``), ``float`` (a positive number, int or float,
    given back as float), ``bool``, ``str`` (non-empty, or matching ``pattern`` in full) or
    ``object`` with ``choices`` or a ``parse`` function. ``parse`` takes the value and returns
    what the backend gets; it raises ``ValueError`` saying what is wrong, and ``accepted``
    says what it takes, for the docs and the error.
    """

    name: str
    type: type
    default: Any
    doc: str
    range: tuple[int, int] | None = None
    choices: tuple[Any, ...] = ()
    pattern: str | None = None
    nullable: bool = False  # None is accepted as well
    unit: str = ""  # "bytes" or "seconds": how numbers are shown in the docs
    parse: Callable[[Any], Any] | None = None
    accepted: str = ""
    sensitive: bool = False  # an error never shows the value (passwords, tokens, secrets)
    _regex: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pattern is not None:
            object.__setattr__(self, "_regex", re.compile(self.pattern))
        if self.type is int and self.range is None:
            raise TypeError(f"option {self.name!r}: an int option needs a range")
        if self.type is object and not (self.choices or self.parse):
            raise TypeError(f"option {self.name!r}: say what it accepts with choices or parse")
        try:
            self.check(self.default)
        except ConfigError as exc:
            raise TypeError(f"the default of {exc}") from None

    def expected(self) -> str:
        """What the option accepts, in the words of an error message."""
        if self.accepted:
            what = self.accepted.replace("`", "")
        elif self.choices:
            what = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.type is int:
            lo, hi = self.range or (0, 0)
            what = f"an integer in [{lo}, {hi}]"
        elif self.type is float:
            what = "a positive number of seconds" if self.unit == "seconds" else "a positive number"
        elif self.type is bool:
            what = "True or False"
        elif self.pattern is not None:
            what = f"a string matching {self.pattern}"
        else:
            what = "a non-empty string"
        return f"{what}, or None" if self.nullable else what

    def check(self, value: Any) -> Any:
        """The value the backend gets; ``ConfigError`` naming the key, what it takes and the value."""
        if value is None and self.nullable:
            return None
        reason = ""
        try:
            ok, value = self._convert(value)
        except ValueError as exc:
            ok, reason = False, f" ({exc})"
        if not ok:
            raise ConfigError(f"option {self.name!r} must be {self.expected()}{reason}, got {self._shown(value)}")
        return value

    def _convert(self, value: Any) -> tuple[bool, Any]:
        if self.parse is not None:
            return True, self.parse(value)
        if self.choices:
            return value in self.choices, value
        if self.type is bool:
            return isinstance(value, bool), value
        if isinstance(value, bool):  # an int to Python, never one here: True is not 1 second
            return False, value
        if self.type is int:
            lo, hi = self.range or (0, 0)
            return isinstance(value, int) and lo <= value <= hi, value
        if self.type is float:  # finite: inf or nan would wait for ever (or overflow a deadline)
            ok = isinstance(value, (int, float)) and value > 0 and math.isfinite(_as_float(value))
            return ok, float(value) if ok else value
        if self._regex is not None:
            return isinstance(value, str) and self._regex.fullmatch(value) is not None, value
        return isinstance(value, str) and value != "", value

    def _shown(self, value: Any) -> str:
        if not self.sensitive:
            return repr(value)
        size = f" of length {len(value)}" if isinstance(value, (str, bytes)) else ""
        return f"<{type(value).__name__}{size}, not shown>"

    # docs ------------------------------------------------------------------------------------

    def default_cell(self) -> str:
        value = self.default
        text = f'`"{value}"`' if isinstance(value, str) else f"`{value!r}`"
        if isinstance(value, int) and not isinstance(value, bool):
            if self.unit == "bytes" and value >= MiB:
                text += f" ({_quantity(value, 'bytes')})"
            elif self.unit == "seconds" and value >= _DAY and value % _DAY == 0:
                text += f" ({value // _DAY} days)"
        return text

    def accepted_cell(self) -> str:
        if self.accepted:
            what = self.accepted
        elif self.choices:
            what = ", ".join(f'`"{c}"`' if isinstance(c, str) else f"`{c!r}`" for c in self.choices)
        elif self.type is int:
            lo, hi = self.range or (0, 0)
            what = f"int, {_quantity(lo, self.unit)} to {_quantity(hi, self.unit)}"
        elif self.type is float:
            what = "seconds, > 0" if self.unit == "seconds" else "number, > 0"
        elif self.type is bool:
            what = "bool"
        elif self.pattern is not None:
            what = f"str matching `{self.pattern}`"
        else:
            what = "non-empty str"
        return f"{what}, or `None`" if self.nullable else what


def _as_float(value: float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        return math.inf


def _quantity(n: int, unit: str) -> str:
    """A bound as the docs write it: 64 KiB, 512 MiB, 2³⁰."""
    if unit == "bytes" and n >= KiB:
        for size, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
            if n % size == 0:
                return f"{n // size} {name}"
    if n >= 1 << 16 and n & (n - 1) == 0:
        return "2" + str(n.bit_length() - 1).translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))
    return str(n)


def _refuse_unknown(given: Iterable[str], known: Iterable[str], owner: str) -> None:
    unknown = set(given) - set(known)
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)} for {owner}; known options: {', '.join(sorted(known))}")


class OptionSpec(Mapping[str, Any]):
    """The declared options of one backend; as a mapping, each key's default (a fresh copy)."""

    def __init__(self, *options: Option) -> None:
        self._options = {o.name: o for o in options}
        if len(self._options) != len(options):
            raise TypeError("an option is declared twice")

    def __getitem__(self, key: str) -> Any:
        return copy.deepcopy(self._options[key].default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._options)

    def __len__(self) -> int:
        return len(self._options)

    def __contains__(self, key: object) -> bool:  # without copying a default, as Mapping's would
        return key in self._options

    def option(self, key: str) -> Option:
        return self._options[key]

    def validate(self, given: Mapping[str, Any] | None, owner: str = "these options") -> dict[str, Any]:
        """Every declared key with its checked value (the default where none is given), as the
        backend gets it: parsed (``allow`` a frozenset, ``secret`` bytes, seconds floats)."""
        given = dict(given or {})
        _refuse_unknown(given, self, owner)
        return {k: o.check(given[k] if k in given else self[k]) for k, o in self._options.items()}

    def table(self) -> str:
        """The markdown table of docs/backends.md: key, default, what it accepts, what it does."""
        rows = ["| key | default | accepted | what it does |", "|---|---|---|---|"]
        for o in self._options.values():
            cells = (f"`{o.name}`", o.default_cell(), o.accepted_cell(), o.doc)
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(rows) + "\n"


# The common options --------------------------------------------------------------------------


def _allow(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        names = [value]
    elif isinstance(value, Iterable):
        names = list(value)
    else:
        raise ValueError("not a list")
    for name in names:
        if not isinstance(name, str) or name.count(":") != 1 or not all(name.split(":")):
            raise ValueError(f"{name!r} is not 'module:qualname'")
    return frozenset(names)


def parse_secret(value: Any) -> bytes:
    """The job secret as bytes; shared by the backends that also read it."""
    secret = value.encode() if isinstance(value, str) else value
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise ValueError("too short" if isinstance(secret, bytes) else "not bytes or str")
    return secret


SECRET = Option(
    "secret", object, None,
    "the job secret. When set, every message is sealed with AES-256-GCM, and a receiver refuses unsealed ones. "
    "Every party of the job must set the same value. RabbitMQ also derives its federation link users from it.",
    nullable=True, parse=parse_secret, accepted="bytes or str of at least 16 bytes", sensitive=True,
)  # fmt: skip

IDENTITY = Option(
    "identity", object, None,
    "this party's X25519 private key (`fedtransport keys new`). When set, every message is sealed with a key "
    "only its source and destination can compute, from their key agreement; each peer's public key comes from "
    "its route table entry (`public_key`) or `peer_keys` ([security.md](security.md#pair-keys-identity)). "
    "RabbitMQ also derives its federation link users from these pair keys.",
    nullable=True, parse=parse_identity, sensitive=True,
    accepted="a path to its PEM file, PEM text, the raw 32 bytes, or an `X25519PrivateKey`",
)  # fmt: skip

PEER_KEYS = Option(
    "peer_keys", object, {},
    "the other parties' public keys, for `identity`, where the route table does not list them",
    parse=parse_peer_keys, accepted="`{party_id: base64 of the raw 32-byte X25519 public key}`",
)  # fmt: skip

COMMON_OPTIONS = OptionSpec(
    Option("max_message_size", int, 4 * MiB,  # PowerFL's figure; Pulsar's default broker limit is 5 MB
           "bytes per broker message, the 88-byte header included. Must be below the broker's own limit "
           "(pulsar-lite: 5 MiB; Pulsar: `maxMessageSize`, 5 MB by default). Only the sender's value matters.",
           range=(64 * KiB, 512 * MiB), unit="bytes"),
    Option("compression", object, "lz4",
           "lz4 per message. A 64 KiB sample is tried first, and a chunk travels compressed only if that saves "
           "at least 10 %; a chunk under 4 KiB travels raw. Receivers decompress whatever is flagged, whatever "
           "their own setting.",
           choices=("lz4", "none", None)),
    Option("allow", object, (),
           "classes a receiver may unpickle on top of the built-in allow-list ([security.md](security.md))",
           parse=_allow, accepted='a `"module:qualname"` string or a list of them'),
    Option("allow_mode", object, "enforce",
           '`"report"` still refuses, and also logs the refused name at WARNING, to build an allow-list from '
           "trial runs. Decoding stops at the first refused name, so a refused transfer logs one name; it is "
           "acknowledged and cannot be got again in that session. Repeat the trial run until nothing is refused "
           "([security.md](security.md#admitting-more-allow-allow_mode-trust_remote_code)).",
           choices=("enforce", "report")),
    Option("trust_remote_code", bool, False,
           "`True` lifts the allow-list (unpickle anything), and the sender falls back to cloudpickle for lambdas "
           "and local classes. Only between parties that trust each other."),
    SECRET,
    IDENTITY,
    PEER_KEYS,
    Option("lanes", int, 4,
           "topics/queues per ordered pair of parties ([concepts.md](concepts.md#lane)); the same on every party",
           range=(1, 256)),
    Option("lane_offset", int, 0,  # gives a Spark task lanes of its own
           "added to each lane's index in its topic/queue name, so sessions of one job (Spark tasks) can own "
           "disjoint lanes; sender and receiver of a pair must agree",
           range=(0, 1 << 30)),
    Option("send_workers", int, 4,
           "threads of a session that run the (destination, lane) sends of a `remote` in parallel",
           range=(1, 256)),
    Option("redelivery_after", float, 10.0,
           "a transfer that a `get` waits for and that makes no progress this long makes the receiver ask the "
           "broker to redeliver",
           unit="seconds"),
    Option("peer_gone_after", float, 30.0,
           "a `get` stops waiting with `PeerGone` once a party it waits for was seen connected to the broker "
           "and then not for this long (a process killed outright); `None`: never "
           "([reliability.md](reliability.md#a-peer-killed-outright))",
           unit="seconds", nullable=True),
    Option("max_streams", int, DEFAULT_MAX_STREAMS,
           "the most streams a received transfer may declare (a table: one per partition, plus one), so a "
           "forged header cannot make a `get` build millions of partitions ([security.md](security.md))",
           range=(2, 1 << 24)),
    Option("max_broadcast_held", int, 1 << 30,
           "the most bytes of broadcast data from one party that a receiver holds before a `get` takes the head "
           "naming it; the broadcast that would pass it is dropped and counted in `forged_refused`, and a `get` of "
           "it raises `IntegrityError` ([security.md](security.md#broadcasts))",
           range=(1, 1 << 50), unit="bytes"),
    Option("resumable_tables", bool, False,
           "`True`: a `remote` of a table whose partitions are lists first encodes the whole table once more to "
           "digest it, so a sender killed mid-send and restarted with the same table resumes it (Pulsar with "
           "`admin_url`) or the receiver merges the resend ([reliability.md](reliability.md#resuming-a-send)). "
           "Off: each send of a table is a new one (objects always carry a digest)."),
)  # fmt: skip

COMMON_DEFAULTS: dict[str, Any] = dict(COMMON_OPTIONS)


@dataclass(frozen=True)
class CommonOptions:
    max_message_size: int
    compression: str
    allow: frozenset[str]
    allow_mode: str
    trust_remote_code: bool
    secret: bytes | None
    identity: X25519PrivateKey | None
    peer_keys: dict[str, X25519PublicKey]
    lanes: int
    lane_offset: int
    send_workers: int
    redelivery_after: float
    peer_gone_after: float | None
    max_streams: int
    max_broadcast_held: int
    resumable_tables: bool


def split_options(
    options: Mapping[str, Any] | None, backend: str, backend_defaults: Mapping[str, Any]
) -> tuple[CommonOptions, dict[str, Any]]:
    """Validate ``options``; return the common ones and the backend's (defaults applied).

    ``backend_defaults`` is the backend's ``option_defaults``: when it is an ``OptionSpec``
    the backend's values are checked here too, else passed on as given.
    """
    options = dict(options or {})
    _refuse_unknown(options, {*COMMON_OPTIONS, *backend_defaults}, f"backend {backend!r}")
    c = COMMON_OPTIONS.validate({k: v for k, v in options.items() if k in COMMON_OPTIONS})
    common = CommonOptions(**{**c, "compression": "none" if c["compression"] in (None, "none") else "lz4"})
    mine = {k: v for k, v in options.items() if k in backend_defaults}
    if isinstance(backend_defaults, OptionSpec):
        return common, backend_defaults.validate(mine, f"backend {backend!r}")
    return common, {**backend_defaults, **mine}


def max_chunk(common: CommonOptions, overhead: int) -> int:
    """Payload bytes per message: what is left of the message after header and seal."""
    return common.max_message_size - HEADER_SIZE - overhead


# Generated docs ------------------------------------------------------------------------------

_REGION = re.compile(
    r"(?P<open><!-- options:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(?P<close><!-- /options:(?P=name) -->)", re.S
)


def _spec_named(name: str) -> OptionSpec:
    """``common`` or a backend's spec, looked up in the registry like ``Federation.connect`` does."""
    if name == "common":
        return COMMON_OPTIONS
    from .transport import get_backend

    spec = get_backend(name).option_defaults
    if not isinstance(spec, OptionSpec):
        raise ConfigError(f"backend {name!r} declares no OptionSpec to document")
    return spec


def doc_tables(paths: Iterable[Path], write: bool = False) -> list[str]:
    """The ``<!-- options:NAME -->`` regions of ``paths`` that differ from their spec, as
    ``"file: NAME"``; with ``write``, the regions are rewritten from the specs first."""
    stale: list[str] = []
    for path in paths:
        text = path.read_text(encoding="utf-8")

        def render(m: re.Match[str], path: Path = path) -> str:
            table = _spec_named(m["name"]).table()
            if m["body"] != table:
                stale.append(f"{path.name}: {m['name']}")
            return m["open"] + table + m["close"]

        new = _REGION.sub(render, text)
        if write and new != text:
            path.write_text(new, encoding="utf-8")
    return stale
