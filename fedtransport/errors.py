"""The one error hierarchy the library raises on purpose.

Every class here is importable from :mod:`fedtransport`. Messages are written for
the person reading a scheduler's log: they name the party, the transfer, the file
or the option involved, so the fix is obvious without reading our source.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .party import Party

__all__ = [
    "BackendError",
    "ConfigError",
    "DuplicateTransfer",
    "FederationError",
    "IntegrityError",
    "PeerAborted",
    "RouteError",
    "SerializationError",
    "TransferTimeout",
    "UnsafePayload",
]


class FederationError(Exception):
    """Base of everything fedtransport raises on purpose."""


class ConfigError(FederationError, ValueError):
    """A bad argument or option: unknown key, wrong type, malformed job id."""


class TransferTimeout(FederationError, TimeoutError):
    """A ``get`` did not complete in time.

    ``missing`` maps each party not fully heard from to a short description of
    what did arrive (``"nothing"`` or ``"12 of 64 messages"``). ``presence`` maps each of them
    to what the broker showed of its connection: ``"connected"``, ``"gone"`` (connected, then
    disconnected: a process killed outright), ``"absent"`` (not seen connected) or
    ``"unknown"`` (the backend cannot tell); see docs/reliability.md.
    """

    def __init__(
        self, message: str, missing: dict[str, str] | None = None, presence: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.missing = dict(missing or {})
        self.presence = dict(presence or {})


class PeerGone(TransferTimeout):
    """A ``get`` stopped waiting: a party it waited for was seen connected to the broker and then
    not, for ``peer_gone_after`` seconds (a process killed outright sends no abort notice).

    A ``TransferTimeout`` (also a ``TimeoutError``), with ``missing`` and ``presence``; ``party`` is
    the peer. Unlike :class:`PeerAborted` nothing is failed for good: what arrived stays, and a
    later ``get`` waits again (for a restarted peer).
    """

    def __init__(
        self,
        message: str,
        missing: dict[str, str] | None = None,
        presence: dict[str, str] | None = None,
        party: Party | None = None,
    ) -> None:
        super().__init__(message, missing, presence)
        self.party = party


class SerializationError(FederationError, TypeError):
    """A value given to ``remote`` cannot be encoded (unpicklable, or a table record that is not a pair)."""


class RouteError(FederationError):
    """Unknown party or malformed route table (names the file and the key)."""


class IntegrityError(FederationError):
    """Checksum or AEAD failure, a frame from another job, a malformed frame."""


class UnsafePayload(FederationError):
    """Deserialisation refused: names ``module:qualname`` and the option that admits it."""

    def __init__(self, message: str, global_name: str = "") -> None:
        super().__init__(message)
        self.global_name = global_name


class DuplicateTransfer(FederationError):
    """The same ``(name, tag, party)`` was sent or got twice in one session."""


class BackendError(FederationError):
    """The broker refused or could not be reached; carries the broker's own message.

    ``status`` is the HTTP status of a control-plane call when there was one.
    """

    def __init__(self, message: str, *, broker_message: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.broker_message = broker_message
        self.status = status


class PeerAborted(FederationError):
    """A peer of the job gave up: it called ``abort(reason)``, or its ``with`` block raised.

    Raised by every pending and later ``get`` from that party in the session. ``party`` is the
    peer, ``reason`` its own words (cut to a few KiB).
    """

    def __init__(self, party: Party, reason: str) -> None:
        super().__init__(f"{party} aborted the job: {reason}")
        self.party = party
        self.reason = reason

    def __reduce__(self) -> tuple[type[PeerAborted], tuple[Party, str]]:
        return type(self), (self.party, self.reason)  # survives a trip between processes
