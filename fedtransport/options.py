"""Option keys common to every backend, their defaults and their checks.

A backend declares its own keys in ``Transport.option_defaults``; a key that
neither knows is refused with the list of valid ones, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .framing import HEADER_SIZE

__all__ = ["COMMON_DEFAULTS", "CommonOptions", "split_options"]

MiB = 1 << 20

COMMON_DEFAULTS: dict[str, Any] = {
    "max_message_size": 4 * MiB,  # PowerFL's figure; Pulsar's default broker limit is 5 MB
    "compression": "lz4",
    "allow": (),
    "allow_mode": "enforce",
    "trust_remote_code": False,
    "secret": None,
    "lanes": 4,
    "lane_offset": 0,  # first lane number on the broker; gives a Spark task lanes of its own
    "send_workers": 4,
    "redelivery_after": 10.0,
}


@dataclass(frozen=True)
class CommonOptions:
    max_message_size: int
    compression: str
    allow: frozenset[str]
    allow_mode: str
    trust_remote_code: bool
    secret: bytes | None
    lanes: int
    lane_offset: int
    send_workers: int
    redelivery_after: float


def _int(key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"option {key!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def split_options(
    options: Mapping[str, Any] | None, backend: str, backend_defaults: Mapping[str, Any]
) -> tuple[CommonOptions, dict[str, Any]]:
    """Validate ``options``; return the common ones and the backend's (defaults applied)."""
    options = dict(options or {})
    unknown = set(options) - set(COMMON_DEFAULTS) - set(backend_defaults)
    if unknown:
        known = ", ".join(sorted({*COMMON_DEFAULTS, *backend_defaults}))
        raise ConfigError(f"unknown option(s) {sorted(unknown)} for backend {backend!r}; known options: {known}")
    merged = {**COMMON_DEFAULTS, **{k: v for k, v in options.items() if k in COMMON_DEFAULTS}}

    size = _int("max_message_size", merged["max_message_size"], 64 * 1024, 512 * MiB)
    if merged["compression"] not in ("lz4", "none", None):
        raise ConfigError(f"option 'compression' must be 'lz4' or 'none', got {merged['compression']!r}")
    allow = merged["allow"] or ()
    if isinstance(allow, str):
        allow = [allow]
    for name in allow:
        if not isinstance(name, str) or name.count(":") != 1 or not all(name.split(":")):
            raise ConfigError(f"option 'allow' takes 'module:qualname' strings, got {name!r}")
    if merged["allow_mode"] not in ("enforce", "report"):
        raise ConfigError(f"option 'allow_mode' must be 'enforce' or 'report', got {merged['allow_mode']!r}")
    if not isinstance(merged["trust_remote_code"], bool):
        raise ConfigError("option 'trust_remote_code' must be True or False")
    secret = merged["secret"]
    if secret is not None:
        if isinstance(secret, str):
            secret = secret.encode()
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ConfigError("option 'secret' must be bytes or str of at least 16 bytes")
    redelivery = merged["redelivery_after"]
    if isinstance(redelivery, bool) or not isinstance(redelivery, (int, float)) or redelivery <= 0:
        raise ConfigError(f"option 'redelivery_after' must be a positive number of seconds, got {redelivery!r}")
    common = CommonOptions(
        max_message_size=size,
        compression="none" if merged["compression"] in (None, "none") else "lz4",
        allow=frozenset(allow),
        allow_mode=merged["allow_mode"],
        trust_remote_code=merged["trust_remote_code"],
        secret=secret,
        lanes=_int("lanes", merged["lanes"], 1, 256),
        lane_offset=_int("lane_offset", merged["lane_offset"], 0, 1 << 30),
        send_workers=_int("send_workers", merged["send_workers"], 1, 256),
        redelivery_after=float(redelivery),
    )
    backend_opts = {**backend_defaults, **{k: v for k, v in options.items() if k in backend_defaults}}
    return common, backend_opts


def max_chunk(common: CommonOptions, overhead: int) -> int:
    """Payload bytes per message: what is left of the message after header and seal."""
    return common.max_message_size - HEADER_SIZE - overhead
