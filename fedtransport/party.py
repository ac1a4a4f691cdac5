"""Parties, job identifiers and the other arguments of ``remote``/``get``: checked up front.

Every check here runs before a call touches the session, so a refused argument leaves the
session as it was (the rules: docs/concepts.md#names-and-limits).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["NAME_MAX_BYTES", "Party", "as_parties", "as_party", "check_job_id", "check_timeout", "key_part"]

#: A transfer's ``name`` and ``tag`` each hold at most this many bytes of UTF-8. They never reach
#: a broker's resource names (transfer ids are hashes), but they do reach logs and errors.
NAME_MAX_BYTES = 4096

_JOB_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Unicode's control characters (C0, DEL, C1) and the surrogate code points.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True, order=True)
class Party:
    """One organisation's role in a job, e.g. ``Party("guest", "9999")``.

    ``party_id`` is normalised to ``str`` so ``Party("host", 10000) == Party("host", "10000")``.
    Both fields end up in broker resource names, so they are restricted to
    ``[A-Za-z0-9_.-]``.
    """

    role: str
    party_id: str

    def __post_init__(self) -> None:
        pid = self.party_id
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise ConfigError(f"party_id must be a str or int, got {pid!r}")
        object.__setattr__(self, "party_id", str(pid))
        for field, value in (("role", self.role), ("party_id", self.party_id)):
            if not isinstance(value, str) or not _NAME.fullmatch(value):
                raise ConfigError(f"Party {field} {value!r} must match [A-Za-z0-9_.-]{{1,64}}")

    def __str__(self) -> str:
        return f"{self.role}:{self.party_id}"


def as_party(value: Any) -> Party:
    """Accept a ``Party`` or a ``(role, party_id)`` pair."""
    if isinstance(value, Party):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return Party(value[0], value[1])
    raise ConfigError(f"expected a Party or a (role, party_id) pair, got {value!r}")


def check_job_id(job_id: Any) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise ConfigError(f"job_id {job_id!r} must match [A-Za-z0-9_.-]{{1,128}}")
    return job_id


def as_parties(parties: Party | Sequence[Any]) -> list[Party]:
    """The ``parties`` argument of remote/get: one Party or a non-empty list without repeats."""
    if isinstance(parties, Party):
        return [parties]
    if isinstance(parties, (str, bytes)) or not isinstance(parties, Sequence):
        raise ConfigError(f"parties must be a Party or a list of them, got {parties!r}")
    out = [as_party(p) for p in parties]
    if not out:
        raise ConfigError("parties is empty")
    if len(set(out)) != len(out):
        raise ConfigError(f"parties lists a party twice: {[str(p) for p in out]}")
    return out


def key_part(what: str, value: Any) -> str:
    """A transfer's ``name`` or ``tag``: a str (an int is taken as its decimal form).

    Any text up to :data:`NAME_MAX_BYTES` bytes of UTF-8, except control characters (NUL, line
    breaks: they would forge lines of a log) and lone surrogates (not text: no UTF-8 for them).
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"{what} must be a str, got {type(value).__name__}")
    try:
        text = str(value)
    except ValueError as exc:  # an int of more digits than Python converts
        raise ConfigError(f"{what} is an int too large to be a name: {exc}") from None
    if len(text) > NAME_MAX_BYTES:  # a char is at least one byte: too long before encoding it
        raise ConfigError(f"{what} is {len(text)} characters long; at most {NAME_MAX_BYTES} bytes of UTF-8 are allowed")
    bad = _FORBIDDEN.search(text)
    if bad is not None:
        kind = "a lone surrogate" if "\ud800" <= bad[0] <= "\udfff" else "a control character"
        raise ConfigError(f"{what} holds {kind} ({bad[0]!a}) at index {bad.start()}, not allowed in a name or tag")
    size = len(text.encode())
    if size > NAME_MAX_BYTES:
        raise ConfigError(f"{what} is {size} bytes of UTF-8; at most {NAME_MAX_BYTES} are allowed")
    return text


def check_timeout(timeout: Any, what: str = "timeout") -> float | None:
    """A timeout in seconds: ``None`` (no limit) or a finite number >= 0 (0: only what is there)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise ConfigError(f"{what} must be a number of seconds or None, got {type(timeout).__name__}")
    try:
        seconds = float(timeout)
    except OverflowError:  # an int beyond float's range
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{what} must be a finite number of seconds >= 0 or None, got {seconds!r}")
    return seconds
