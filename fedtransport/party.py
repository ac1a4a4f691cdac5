"""Parties and job identifiers."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["Party", "as_parties", "as_party", "check_job_id", "key_part"]

_JOB_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


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
    """A transfer's ``name`` or ``tag``: a str (an int is taken as its decimal form)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"{what} must be a str, got {value!r}")
    return str(value)
