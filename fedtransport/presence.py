"""What a session has seen of its peers' connections to the broker, for its timeout messages.

A process killed outright (SIGKILL, power loss) cannot send an abort notice, but its TCP
connections close, and a broker notices that at once. A backend that can ask its broker
whether a party has a session connected right now implements ``Transport.peer_present``
(RabbitMQ: a presence queue per party that each of its sessions consumes from, deleted by
the broker when the last one's connection closes; Pulsar: a presence producer per session,
listed live in the topic's stats). A waiting ``get`` polls it about once a second for the
parties it still waits for, and a timeout says what was seen: connected, never connected, or
connected and then gone (when it was first seen gone). A peer that connects again (restarted)
is present again. A peer seen gone for ``peer_gone_after`` seconds ends the wait with
``PeerGone``; one never seen connected is waited for (it may start later).

``None`` from the backend means it cannot tell (memory backend, Pulsar without ``admin_url``,
RabbitMQ federated mode): the message then says nothing about it.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .party import Party

__all__ = ["PeerWatch"]

POLL_EVERY = 1.0  # seconds between two checks of one party
FRESH_WAIT = 2.0  # seconds a timeout waits for a fresh answer before saying what it knew


@dataclass
class _Seen:
    present: bool | None = None  # at the last check; None: the backend cannot tell
    checked: float = 0.0  # monotonic time of the last check
    seen_at: float | None = None  # wall time it was last seen connected
    gone_at: float | None = None  # wall time it was first seen gone after being connected
    gone_mono: float | None = None


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(t))


class PeerWatch:
    """Per-party presence as last seen through ``probe`` (``Transport.peer_present``)."""

    def __init__(self, probe: Callable[[Party], bool | None]) -> None:
        self._probe = probe
        self._seen: dict[Party, _Seen] = {}
        self._lock = threading.Lock()
        # Probes run on a thread of their own, made on first use: a broker slow to answer
        # never holds a get past its deadline.
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    def poll(self, parties: Iterable[Party], *, fresh: bool = False) -> None:
        """Have each party not checked in the last second checked; with ``fresh``, check every one
        and wait up to ``FRESH_WAIT`` seconds for the answers."""
        now = time.monotonic()
        due = []
        with self._lock:
            if self._closed:
                return
            for party in parties:
                seen = self._seen.setdefault(party, _Seen())
                if fresh or now - seen.checked >= POLL_EVERY:
                    seen.checked = now
                    due.append((party, seen))
            if not due:
                return
            if self._worker is None:
                self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ft-presence")
            job = self._worker.submit(self._check, due)
        if fresh:
            concurrent.futures.wait([job], FRESH_WAIT)

    def _check(self, due: list[tuple[Party, _Seen]]) -> None:
        for party, seen in due:
            present = self._probe(party)
            with self._lock:
                self._update(seen, present)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _update(seen: _Seen, present: bool | None) -> None:
        seen.present = present
        if present:
            seen.seen_at, seen.gone_at, seen.gone_mono = time.time(), None, None  # (again) connected
        elif present is False and seen.seen_at is not None and seen.gone_at is None:
            seen.gone_at, seen.gone_mono = time.time(), time.monotonic()

    def state(self, party: Party) -> str:
        """``"connected"``, ``"gone"`` (seen, then disconnected), ``"absent"`` (never seen), ``"unknown"``."""
        with self._lock:
            seen = self._seen.get(party)
            if seen is None or seen.present is None:
                return "unknown"
            if seen.present:
                return "connected"
            return "gone" if seen.gone_at is not None else "absent"

    def gone_for(self, party: Party) -> float | None:
        """Seconds since ``party`` was seen gone after being connected; None unless it is gone."""
        with self._lock:
            seen = self._seen.get(party)
            if seen is None or seen.present is not False or seen.gone_mono is None:
                return None
            return time.monotonic() - seen.gone_mono

    def note(self, party: Party) -> str:
        """Words for a timeout message; "" when the backend cannot tell."""
        state = self.state(party)
        with self._lock:
            seen = self._seen.get(party) or _Seen()
        if state == "connected":
            return f"{party} is connected to the broker but has not sent it all"
        if state == "gone":
            assert seen.gone_at is not None and seen.seen_at is not None
            return (
                f"{party} is not connected to the broker: it disconnected (connected at {_clock(seen.seen_at)}, "
                f"gone by {_clock(seen.gone_at)}; a process killed outright?)"
            )
        if state == "absent":
            return f"{party} is not connected to the broker (not seen connected by this session)"
        return ""
