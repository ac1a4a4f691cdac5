"""The receiving side of a session: demultiplexes lanes into per-transfer assemblies.

Every message on every lane lands here through the transport's delivery
callback. The frame header names its transfer, so transfers that share a lane
are separated without unpickling anything, and a ``get`` finds its transfer
whether it started before, during or after the messages arrived.

Acknowledgement: a transfer's messages are acknowledged when the transfer is
handed to the caller, so a receiver that dies mid-transfer gets everything again.
Where the broker stops delivering once a lane holds too many unacknowledged
messages (``Transport.max_unacked_per_lane``), the lane's held messages are
acknowledged early instead: they are safe in this process's memory, and the
alternative is a deadlock between a ``get`` and data nobody asked for yet.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .errors import FederationError, IntegrityError
from .framing import PayloadTransform, TransferAssembly, parse_frame
from .party import Party
from .transport import Delivery, Transport

__all__ = ["Inbox", "Incoming"]

log = logging.getLogger("fedtransport.inbox")

_Token = tuple[int, Party, Any]


@dataclass(eq=False)
class Incoming:
    """One transfer being received."""

    transfer: bytes
    src: Party
    assembly: TransferAssembly
    done: Future[None] = field(default_factory=Future)
    tokens: list[_Token] = field(default_factory=list)
    last_progress: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, error: FederationError) -> None:
        if not self.done.done():
            self.done.set_exception(error)


class Inbox:
    def __init__(
        self,
        transport: Transport,
        job_fingerprint: bytes,
        transform_for: Callable[[Party], PayloadTransform],
        lanes: int,
    ) -> None:
        self._transport = transport
        self._job = job_fingerprint
        self._transform_for = transform_for
        self._lanes = lanes
        self._lock = threading.Lock()
        self._incoming: dict[bytes, Incoming] = {}
        self._finished: set[bytes] = set()
        self._listening: set[Party] = set()
        self._unacked: dict[tuple[Party, int], int] = {}
        self._limit = transport.max_unacked_per_lane

    def listen(self, src: Party) -> None:
        with self._lock:
            if src in self._listening:
                return
            self._listening.add(src)
        for lane in range(self._lanes):
            self._transport.listen(src, lane, self.on_delivery)

    def claim(self, transfer: bytes, src: Party) -> Incoming:
        with self._lock:
            inc = self._incoming.get(transfer)
            if inc is None:
                inc = self._new(transfer, src)
            inc.last_progress = time.monotonic()
            return inc

    def _new(self, transfer: bytes, src: Party) -> Incoming:
        inc = Incoming(transfer, src, TransferAssembly(transfer, self._transform_for(src)))
        self._incoming[transfer] = inc
        return inc

    def on_delivery(self, d: Delivery) -> None:
        """Transport callback: place one message. Never raises into the transport."""
        token = (d.lane, d.src, d.token)
        try:
            header, payload = parse_frame(d.data, self._job)
        except IntegrityError as exc:
            # Cannot be attributed to any transfer: drop it so it does not come back forever.
            log.warning("dropped a malformed message from %s on lane %d: %s", d.src, d.lane, exc)
            self._ack([token])
            return
        with self._lock:
            if header.transfer in self._finished:  # late duplicate of a handed-over transfer
                late = True
            else:
                late = False
                inc = self._incoming.get(header.transfer) or self._new(header.transfer, d.src)
                key = (d.src, d.lane)
                self._unacked[key] = self._unacked.get(key, 0) + 1
        if late:
            self._ack([token])
            return
        with inc.lock:
            inc.tokens.append(token)
            if inc.done.done():
                pass  # failed earlier: keep the token so the handover acks it
            elif inc.src != d.src:
                inc.fail(IntegrityError(f"a message of a transfer from {inc.src} arrived from {d.src}"))
            else:
                try:
                    if inc.assembly.add(header, payload):
                        inc.last_progress = time.monotonic()
                except FederationError as exc:
                    inc.fail(exc)
                else:
                    if inc.assembly.complete:
                        inc.done.set_result(None)
        if self._limit is not None and self._unacked.get((d.src, d.lane), 0) >= self._limit:
            self._relieve(d.src, d.lane)

    def _relieve(self, src: Party, lane: int) -> None:
        """Acknowledge what this lane holds in memory so the broker keeps delivering."""
        held: list[_Token] = []
        with self._lock:
            incs = list(self._incoming.values())
            self._unacked[(src, lane)] = 0
        for inc in incs:
            with inc.lock:
                keep = [t for t in inc.tokens if not (t[0] == lane and t[1] == src)]
                held += [t for t in inc.tokens if t[0] == lane and t[1] == src]
                inc.tokens = keep
        log.debug("lane %d from %s reached %s unacked messages: acknowledged %d held in memory",
                  lane, src, self._limit, len(held))  # fmt: skip
        self._ack(held)

    def stalled(self, inc: Incoming, after: float) -> bool:
        """True (once per ``after`` seconds) when ``inc`` has made no progress for that long."""
        now = time.monotonic()
        if inc.done.done() or now - inc.last_progress < after:
            return False
        inc.last_progress = now
        return True

    def redeliver(self, src: Party) -> None:
        log.info("no progress from %s: asking the broker to redeliver unacknowledged messages", src)
        for lane in range(self._lanes):
            self._transport.redeliver(src, lane)

    def hand_over(self, inc: Incoming) -> None:
        """The caller has the transfer: forget it and acknowledge its messages."""
        with self._lock:
            self._incoming.pop(inc.transfer, None)
            self._finished.add(inc.transfer)
            with inc.lock:
                tokens, inc.tokens = inc.tokens, []
            for lane, src, _ in tokens:
                key = (src, lane)
                self._unacked[key] = max(0, self._unacked.get(key, 0) - 1)
        self._ack(tokens)

    def _ack(self, tokens: list[_Token]) -> None:
        if not tokens:
            return
        try:
            self._transport.ack(tokens)
        except FederationError as exc:
            # Not fatal: an unacknowledged message is delivered again and dropped as a duplicate.
            log.warning("acknowledging %d messages failed: %s", len(tokens), exc)

    def pending(self) -> int:
        with self._lock:
            return len(self._incoming)
