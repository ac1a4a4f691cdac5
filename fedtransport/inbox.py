"""The receiving side of a session: demultiplexes lanes into per-transfer assemblies.

Every message on every lane lands here through the transport's delivery
callback. The frame header names its transfer, so transfers that share a lane
are separated without unpickling anything, and a ``get`` finds its transfer
whether it started before, during or after the messages arrived.

One value per transfer: every send of a transfer carries its own random
*incarnation* in each frame (a sender killed part-way and restarted sends a new
one, perhaps of a recomputed value). Each incarnation is assembled apart, so
frames of two sends are never mixed into one value. The first incarnation whose
head is complete (all of an object; stream 0 of a table) is the one handed over;
frames of every other are dropped from then on, and acknowledged with the
transfer. A table's chosen send that stalls gives way to a new send while
nothing of it was read; once something was, the new send fails the transfer and
is left unacknowledged for the party's next session. At most
``MAX_INCARNATIONS`` sends of a transfer are assembled side by side: a further
one replaces the one that went longest without a new message (the send of a
killed sender; never a chosen one), and frames of a replaced send are dropped.

Acknowledgement: a transfer's messages are acknowledged when the transfer is
handed to the caller, so a receiver that dies mid-transfer gets everything again.
Where the broker stops delivering once a lane holds too many unacknowledged
messages (``Transport.max_unacked_per_lane``), the inbox asks the transport to
let more through (``Transport.make_room``: RabbitMQ raises the lane's qos by
what it holds) rather than wait: the alternative is a deadlock between a ``get``
and data nobody asked for yet. Nothing is acknowledged before its transfer is
handed over, so what a session never claimed is delivered again to the next.

Flow control for tables: a table partition is read by the caller while it
streams in, so the bytes of partition streams placed here and not yet read are
counted per lane, and a lane's delivery thread waits while its count is above
``window`` bytes: the broker then holds the rest. A lane is let through anyway
while a caller waits for something that may be queued behind it (the head or
chunks of another transfer, a partition not yet seen), so a caller reading out
of order trades memory for liveness, never deadlocks.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .errors import FederationError, IntegrityError, TransferTimeout
from .framing import BROADCAST, DEFAULT_MAX_STREAMS, PayloadTransform, TransferAssembly, parse_frame
from .party import Party
from .transport import Delivery, Transport

__all__ = ["Inbox", "Incoming"]

log = logging.getLogger("fedtransport.inbox")

_Token = tuple[int, Party, Any]


MAX_INCARNATIONS = 2  # sends of one transfer assembled side by side (see the module docstring)
_READ_TICK = 0.5  # seconds between a waiting reader's checks for stalls and a closed session


@dataclass(eq=False)
class Incoming:
    """One transfer being received."""

    transfer: bytes
    src: Party
    assembly: TransferAssembly  # the incarnation handed over once ``head`` is done; until then the latest
    done: Future[None] = field(default_factory=Future)  # every stream complete, or failed
    head: Future[None] = field(default_factory=Future)  # stream 0 complete (enough for a table), or failed
    tokens: list[_Token] = field(default_factory=list)
    last_progress: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    arrived: threading.Condition = field(init=False)  # on ``lock``: something was placed or failed
    stream_lanes: dict[int, int] = field(default_factory=dict)  # partition stream -> lane it is charged to
    handed: bool = False
    control: bool = False  # the session's own notice (an abort), not a caller's transfer
    on_progress: Callable[[], None] | None = None  # called (on a delivery thread) after each new message
    # the transfer's other incarnations (sends), assembled apart until one is chosen
    rivals: dict[bytes, TransferAssembly] = field(default_factory=dict)
    seen_at: dict[bytes, float] = field(default_factory=dict)  # incarnation -> when its last frame came
    dropped: set[bytes] = field(default_factory=set)  # incarnations replaced or not chosen
    spared: set[bytes] = field(default_factory=set)  # sends left unacknowledged for the next session
    kept: list[_Token] = field(default_factory=list)  # their deliveries: never acknowledged by this session

    def __post_init__(self) -> None:
        self.arrived = threading.Condition(self.lock)

    def fail(self, error: FederationError) -> None:
        for fut in (self.head, self.done):
            if not fut.done():
                fut.set_exception(error)

    def error(self) -> BaseException | None:
        return self.done.exception() if self.done.done() else None


def _unread_alike(chosen: TransferAssembly, new: TransferAssembly) -> bool:
    """May a table's chosen send, stalled, give way to ``new``? Only while the caller has read
    nothing of it and the new one has as many partitions (the caller's table was made for that)."""
    return not chosen.complete and not chosen.units_taken and new.nstreams == chosen.nstreams


class Inbox:
    def __init__(
        self,
        transport: Transport,
        job_fingerprint: bytes,
        transform_for: Callable[[Party], PayloadTransform],
        lanes: int,
        window: int,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        self._transport = transport
        self._job = job_fingerprint
        self._transform_for = transform_for
        self._lanes = lanes
        self._max_streams = max_streams
        self._lock = threading.Lock()
        # Filed by (lane's sender, transfer id): frames another party sends under a transfer's id
        # land in an entry of their own and never touch the real one.
        self._incoming: dict[tuple[Party, bytes], Incoming] = {}
        self._finished: set[bytes] = set()
        # The true source of each transfer a get or a notice waits for: transfer ids hash the
        # source (framing.transfer_id), so that id on any other party's lane is a forgery.
        self._owner: dict[bytes, Party] = {}
        self.forged = 0  # frames and entries refused as another party's forgery
        self._listening: set[Party] = set()
        self._unacked: dict[tuple[Party, int], int] = {}  # deliveries held unacknowledged, per lane
        self._room: dict[tuple[Party, int], int] = {}  # what make_room last allowed beyond the limit
        self._limit = transport.max_unacked_per_lane
        # flow control of table partitions (see the module docstring), under _flow
        self._window = window
        self._flow = threading.Condition()
        self._held: dict[tuple[Party, int], int] = {}  # partition bytes placed and not read, per lane
        self._waiting: dict[Incoming, int] = {}  # claims a get waits for
        # (src, lane or None: any) -> the (transfer, stream)s readers wait for there
        self._reading: dict[tuple[Party, int | None], list[tuple[Incoming, int]]] = {}
        self._closed = False
        self._aborted: dict[Party, FederationError] = {}  # peers that gave up, and what their gets raise

    def listen(self, src: Party) -> None:
        with self._lock:
            if src in self._listening:
                return
            self._listening.add(src)
        try:
            for lane in range(self._lanes):
                self._transport.listen(src, lane, self.on_delivery)
        except BaseException:
            with self._lock:  # a retried get listens again (a transport's listen is idempotent)
                self._listening.discard(src)
            raise

    def claim(self, transfer: bytes, src: Party) -> Incoming:
        """The entry of ``transfer`` from ``src``; raises what ``src``'s abort left (``fail_source``)."""
        with self._lock:
            if src in self._aborted:
                raise self._aborted[src]
            inc, forged = self._own(transfer, src)
            inc.last_progress = time.monotonic()
        self._refuse(forged)
        return inc

    def _own(self, transfer: bytes, src: Party) -> tuple[Incoming, list[Incoming]]:
        """Under ``_lock``: record ``src`` as the source of ``transfer``. Returns its entry, and
        the entries filed under that id from other parties' lanes: forgeries, for ``_refuse``."""
        self._owner[transfer] = src
        others = [(p, transfer) for p in self._listening if p != src]
        forged = [self._incoming[key] for key in others if key in self._incoming]
        return self._incoming.get((src, transfer)) or self._new(transfer, src), forged

    def _refuse(self, forged: list[Incoming]) -> None:
        """Drop (acknowledge) entries filed from lanes whose sender is not their transfer's source."""
        for inc in forged:
            error = IntegrityError(
                f"frames of transfer {inc.transfer.hex()} arrived on the lanes of {inc.src}, which is not "
                "its source: a forgery, dropped"
            )
            with inc.lock:
                inc.fail(error)
                count = len(inc.tokens)
                inc.arrived.notify_all()
            if self.hand_over(inc, final=False):
                with self._lock:
                    self.forged += count
                log.warning("%s: %s (%d messages)", type(error).__name__, error, count)

    def _new(self, transfer: bytes, src: Party) -> Incoming:
        inc = Incoming(transfer, src, TransferAssembly(transfer, self._transform_for(src), self._max_streams))
        self._incoming[(src, transfer)] = inc
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
        if header.flags & BROADCAST:  # broadcast data (broadcast.py) is only ever taken from a broadcast lane
            with self._lock:
                self.forged += 1
            log.warning("IntegrityError: a broadcast frame from %s on pair lane %d; dropped", d.src, d.lane)
            self._ack([token])
            return
        with self._lock:
            owner = self._owner.get(header.transfer)
            forged = owner is not None and owner != d.src
            if forged:
                self.forged += 1
            if forged or header.transfer in self._finished:  # a forgery, or a late duplicate
                late = True
            else:
                late = False
                inc = self._incoming.get((d.src, header.transfer)) or self._new(header.transfer, d.src)
                key = (d.src, d.lane)
                self._unacked[key] = self._unacked.get(key, 0) + 1
        if late:
            if forged:
                log.warning(
                    "IntegrityError: a forged message from %s on lane %d: transfer %s comes from %s; dropped",
                    d.src, d.lane, header.transfer.hex(), owner,
                )  # fmt: skip
            self._ack([token])
            return
        grew, charged = 0, d.lane
        freed: list[tuple[int, int]] = []
        with inc.lock:
            if inc.handed:  # handed over while this message was on its way here
                late = True
            elif header.incarnation in inc.spared:
                inc.kept.append(token)
            else:
                inc.tokens.append(token)
            if late:
                pass
            elif inc.done.done():
                pass  # failed earlier: keep the token so the handover acks it
            elif (asm := self._route(inc, header.incarnation, freed)) is not None:
                stream = header.stream
                before = asm.held(stream) if stream else 0
                try:
                    if asm.add(header, payload):
                        inc.last_progress = time.monotonic()
                        if stream:  # a table partition: counted against its lane until read
                            charged = inc.stream_lanes.setdefault(stream, d.lane)
                            grew = asm.held(stream) - before
                except FederationError as exc:
                    inc.fail(exc)
                else:
                    if not inc.head.done() and asm.stream_complete(0):
                        self._choose(inc, asm, freed)
                        inc.head.set_result(None)
                    elif asm is not inc.assembly and asm.stream_complete(0) and _unread_alike(inc.assembly, asm):
                        log.warning(
                            "transfer %s from %s: a new send replaces the chosen one, stalled after %s, "
                            "before any of it was read", inc.transfer.hex(), inc.src, inc.assembly.describe(),
                        )  # fmt: skip
                        self._choose(inc, asm, freed)
                    if asm is inc.assembly and asm.complete:
                        inc.done.set_result(None)
            if header.incarnation in inc.spared and inc.tokens and inc.tokens[-1] is token:
                inc.kept.append(inc.tokens.pop())  # the new send that failed the transfer: not ours to ack
            inc.arrived.notify_all()
        for lane, nbytes in freed:  # partitions of incarnations dropped just now
            self._refund(d.src, lane, nbytes)
        if late:
            with self._lock:
                self._unacked[key] = max(0, self._unacked.get(key, 0) - 1)
            self._ack([token])
            return
        if inc.on_progress is not None:
            try:
                inc.on_progress()
            except Exception:  # the caller's callback is guarded in api._Rising: this is a bug of
                log.exception("reporting the progress of a get failed")  # ours, and must not stop the lane
        if grew:
            with self._flow:
                key = (d.src, charged)
                self._held[key] = self._held.get(key, 0) + grew
        if self._limit is not None:
            self._make_room(d.src, d.lane)
        if grew:
            self._throttle(d.src, charged)

    def _route(self, inc: Incoming, incarnation: bytes, freed: list[tuple[int, int]]) -> TransferAssembly | None:
        """The assembly of ``incarnation`` in ``inc`` (under ``inc.lock``); ``None``: drop the frame.

        Partition bytes of an incarnation replaced here are added to ``freed`` as ``(lane, bytes)``.
        """
        now = time.monotonic()
        current = inc.assembly
        if current.incarnation is None or current.incarnation == incarnation:
            inc.seen_at[incarnation] = now
            return current
        if incarnation in inc.dropped or incarnation in inc.spared:
            return None
        chosen = inc.head.done()
        if chosen and current.complete:
            return None
        if chosen and current.units_taken:
            # The caller has read part of the chosen send, so it cannot become another, and
            # the chosen one's sender is gone. Fail it; leave the new send on the broker.
            inc.spared.add(incarnation)
            inc.fail(
                FederationError(
                    f"transfer {inc.transfer.hex()} from {inc.src} was sent again (a restarted sender?) while "
                    f"its first send, incomplete ({current.describe()}), was being read: the first send is "
                    "dropped, the new one is left for the party's next session"
                )
            )
            return None
        asm = inc.rivals.get(incarnation)
        if asm is None:
            if 1 + len(inc.rivals) >= MAX_INCARNATIONS:  # replace the send that went longest without news
                live = list(inc.rivals.values()) if chosen else [current, *inc.rivals.values()]
                gone = min(live, key=lambda a: inc.seen_at.get(a.incarnation or b"", 0.0))
                log.warning(
                    "transfer %s from %s: a new send replaces one that stalled after %s",
                    inc.transfer.hex(), inc.src, gone.describe(),
                )  # fmt: skip
                inc.rivals.pop(gone.incarnation or b"", None)
                self._drop(inc, gone, freed)
            asm = TransferAssembly(inc.transfer, self._transform_for(inc.src), self._max_streams)
            inc.rivals[incarnation] = asm
        if not chosen:  # until a send is chosen, the latest to make progress is the one timeouts describe
            del inc.rivals[incarnation]
            if current.incarnation not in inc.dropped:
                inc.rivals[current.incarnation] = current
            inc.assembly = asm
        inc.seen_at[incarnation] = now
        return asm

    def _choose(self, inc: Incoming, asm: TransferAssembly, freed: list[tuple[int, int]]) -> None:
        """``asm``'s head is complete first: it is the incarnation handed over; drop the others."""
        if inc.assembly is not asm:
            self._drop(inc, inc.assembly, freed)
        inc.assembly = asm
        for other in inc.rivals.values():
            if other is not asm:
                self._drop(inc, other, freed)
        inc.rivals.clear()

    def _drop(self, inc: Incoming, asm: TransferAssembly, freed: list[tuple[int, int]]) -> None:
        if asm.incarnation is not None:
            inc.dropped.add(asm.incarnation)
            inc.seen_at.pop(asm.incarnation, None)
        freed.extend((lane, asm.held(s)) for s, lane in inc.stream_lanes.items() if asm.held(s))

    # notices between sessions ------------------------------------------------------------------

    def expect_notice(self, transfer: bytes, src: Party, on_arrival: Callable[[Incoming], None]) -> None:
        """Call ``on_arrival(entry)`` (on a thread of its own) once the notice ``transfer`` from
        ``src`` is complete. It arrives on ``src``'s lanes like a transfer, whenever it comes."""
        with self._lock:
            inc, forged = self._own(transfer, src)
            inc.control = True
        self._refuse(forged)

        def arrived(_: Future[None]) -> None:
            # Called where the last message was placed, under the entry's lock: hand off.
            threading.Thread(target=on_arrival, args=(inc,), name="ft-notice", daemon=True).start()

        inc.done.add_done_callback(arrived)

    def fail_source(self, src: Party, error: FederationError) -> None:
        """Every pending and later claim of a transfer from ``src`` fails with ``error``.

        Nothing of ``src``'s is acknowledged for it: what the broker holds stays there.
        """
        with self._lock:
            self._aborted.setdefault(src, error)
            incs = [inc for inc in self._incoming.values() if inc.src == src and not inc.control]
        self._fail(incs, error)

    def _fail(self, incs: list[Incoming], error: FederationError) -> None:
        for inc in incs:
            with inc.lock:
                inc.fail(error)
                inc.arrived.notify_all()
        with self._flow:
            self._flow.notify_all()

    # flow control ------------------------------------------------------------------------------

    def _throttle(self, src: Party, lane: int) -> None:
        """Hold this lane's delivery thread while its unread partition bytes exceed the window."""
        key = (src, lane)
        with self._flow:
            while self._held.get(key, 0) > self._window and not self._closed and not self._let_through(src, lane):
                self._flow.wait(_READ_TICK)

    def _let_through(self, src: Party, lane: int) -> bool:
        # Evaluated on what is waited for, not on who waits: a waiter woken by one message
        # may not run before this thread brings the next one.
        for key in ((src, lane), (src, None)):
            if any(not inc.assembly.ready(stream) for inc, stream in self._reading.get(key, ())):
                return True
        # A get waits on a head (always on lane 0) or on an object, whose chunks use every lane.
        return any(
            inc.src == src
            and (not inc.head.done() if lane == 0 else inc.assembly.nstreams == 1 and not inc.done.done())
            for inc in self._waiting
        )

    def _refund(self, src: Party, lane: int, nbytes: int) -> None:
        if nbytes:
            with self._flow:
                self._held[(src, lane)] = self._held.get((src, lane), 0) - nbytes
                self._flow.notify_all()

    @contextlib.contextmanager
    def waiting(self, claims: list[Incoming]) -> Iterator[None]:
        """While a get waits for ``claims``, lanes that may hold what it needs are let through."""
        with self._flow:
            for inc in claims:
                self._waiting[inc] = self._waiting.get(inc, 0) + 1
            self._flow.notify_all()
        try:
            yield
        finally:
            with self._flow:
                for inc in claims:
                    n = self._waiting.pop(inc, 1) - 1
                    if n:
                        self._waiting[inc] = n

    def read_units(
        self, inc: Incoming, stream: int, timeout: float | None, watch: Callable[[Incoming], None]
    ) -> tuple[list[memoryview], bool]:
        """Take the next complete units of a partition stream, waiting for them if needed.

        Returns ``(units, finished)``. Raises the transfer's failure,
        :class:`TransferTimeout` after ``timeout`` seconds without a new unit, or
        :class:`FederationError` once the session is closed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        registered: tuple[Party, int | None] | None = None
        quiet = False  # the last wait ended without news
        try:
            while True:
                with inc.lock:
                    before = inc.assembly.held(stream)
                    units, finished = inc.assembly.take(stream)
                    freed = before - inc.assembly.held(stream)
                    lane = inc.stream_lanes.get(stream)
                    error = inc.error()
                    if units or finished or error is not None or self._closed:
                        break
                    # Let the stream's lane through. Before its first message the lane is a guess
                    # (the sender's rule, if it has as many lanes as we do); every lane, if that
                    # guess brought nothing for a tick.
                    want: tuple[Party, int | None] = (inc.src, (stream - 1) % self._lanes if lane is None else lane)
                    if lane is None and quiet and registered == want:
                        want = (inc.src, None)
                    if registered != want:
                        self._unregister(registered, inc, stream)
                        registered = want
                        with self._flow:
                            self._reading.setdefault(want, []).append((inc, stream))
                            self._flow.notify_all()
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        what = inc.assembly.describe()
                        raise TransferTimeout(
                            f"partition {stream - 1} from {inc.src}: nothing new for {timeout} s ({what})",
                            {str(inc.src): what},
                        )
                    quiet = not inc.arrived.wait(_READ_TICK if left is None else min(_READ_TICK, left))
                if quiet:
                    watch(inc)  # the watchdog asks for redelivery once the transfer stalls long enough
        finally:
            self._unregister(registered, inc, stream)
        if lane is not None:
            self._refund(inc.src, lane, freed)
        if units or finished:
            return units, finished
        if error is not None:
            raise error
        raise FederationError("the federation session was closed while a table was being read")

    def _unregister(self, key: tuple[Party, int | None] | None, inc: Incoming, stream: int) -> None:
        if key is not None:
            with self._flow:
                readers = self._reading.get(key, [])
                readers.remove((inc, stream))
                if not readers:
                    del self._reading[key]

    def close(self) -> None:
        """Wake every waiting reader, get and held delivery: the session is going away.

        A waiting get raises :class:`FederationError`; nothing is acknowledged for it, so
        the broker gives what had arrived to the party's next session.
        """
        with self._flow:
            self._closed = True
            self._flow.notify_all()
        with self._lock:
            incs = [inc for inc in self._incoming.values() if not inc.control]  # a notice nobody waits on
        self._fail(incs, FederationError("the federation session was closed while a get waited for this transfer"))

    def _make_room(self, src: Party, lane: int) -> None:
        """Before the broker's per-lane limit stops this lane, let it hold what it holds and more."""
        assert self._limit is not None
        key = (src, lane)
        with self._lock:
            held = self._unacked.get(key, 0)
            if held < self._limit + self._room.get(key, 0):
                return
            self._room[key] = held
        log.debug("lane %d from %s holds %d unacknowledged messages: letting in more", lane, src, held)
        try:
            self._transport.make_room(src, lane, held)
        except FederationError as exc:
            log.warning("could not raise the delivery limit of lane %d from %s: %s", lane, src, exc)

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

    def hand_over(self, inc: Incoming, *, final: bool = True) -> bool:
        """The caller is done with the transfer: forget it and acknowledge its messages.

        Idempotent; returns ``True`` the first time. What a streamed table still
        held (its reader stopped early) is dropped and its lanes' credit returned.
        With ``final=False`` the id stays open: its real messages may still come.
        """
        with self._lock:
            if inc.handed:
                return False
            inc.handed = True
            if self._incoming.get((inc.src, inc.transfer)) is inc:
                del self._incoming[(inc.src, inc.transfer)]
            if final and not inc.kept:  # with a new send left for the next session, its frames stay
                self._finished.add(inc.transfer)
            with inc.lock:
                tokens, inc.tokens = inc.tokens, []
                live = [inc.assembly, *inc.rivals.values()]
                unread = [(lane, a.held(s)) for s, lane in inc.stream_lanes.items() for a in live]
                inc.stream_lanes, inc.rivals = {}, {}
            for lane, src, _ in tokens:
                key = (src, lane)
                self._unacked[key] = max(0, self._unacked.get(key, 0) - 1)
        for lane, nbytes in unread:
            self._refund(inc.src, lane, nbytes)
        self._ack(tokens)
        return True

    def _ack(self, tokens: list[_Token]) -> None:
        if not tokens:
            return
        try:
            self._transport.ack(tokens)
        except FederationError as exc:
            # Not fatal: an unacknowledged message is delivered again and dropped as a duplicate.
            log.warning("acknowledging %d messages failed: %s", len(tokens), exc)

    def entry(self, src: Party, transfer: bytes) -> Incoming | None:
        """The entry of ``transfer`` from ``src``, if one is held (for diagnostics and tests)."""
        with self._lock:
            return self._incoming.get((src, transfer))

    def pending(self) -> int:
        with self._lock:
            return sum(not inc.control for inc in self._incoming.values())
