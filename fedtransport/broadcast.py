"""Broadcast once: one ``remote`` to several parties encodes and uploads the object once.

Without it, ``remote(obj, parties=[p1..pN])`` compresses, seals and publishes N copies. Where
the transport can fan out (``Transport.can_broadcast``: RabbitMQ in both modes, Pulsar
``shared`` and ``replication``), the sender instead

1. encodes the object once and frames it once under a random *data id*, each message
   flagged ``BROADCAST``: compressed like any payload and, when the job is sealed, sealed with
   AES-256-GCM under a fresh random *data key* (the frame header as associated data, as for
   pair messages);
2. publishes those messages once, striped over the *broadcast lanes* (lane ids from
   ``BROADCAST_LANE`` up, never a pair lane), and the broker hands them to every destination
   (RabbitMQ: one publish with a ``CC`` header, stored once; Pulsar: one topic per source and
   lane, the destinations in a message property, and in replication mode every destination's
   cluster in the message's replication clusters: stored once on the sender's cluster, its
   replicators make the copies);
3. sends each destination, on the ordinary sealed pair channel and under the ordinary
   transfer id of ``(name, tag, src, dst)``, a small *head* (transfer kind ``KIND_BROADCAST``)
   naming the data id, the send's incarnation, the size, the SHA-256 of the encoded object
   and the data key.

The receiver's ``get`` finds the head like any transfer, then takes the data of that id and
incarnation from the sender's broadcast lanes and accepts it only if its SHA-256 is the head's.
The head comes over the pair channel, which only the sender can seal: another party of the job,
even one that got the same broadcast and so holds its data key, can neither forge a head nor
make data that passes for the head's (docs/security.md, "Broadcasts").

What stays per destination (``Broadcasts.applies`` is false): a single destination, tables
(streamed per partition and never held whole, where a broadcast is checked whole against its
head's digest and held until its get: docs/architecture.md#broadcasts), the session's own
notices (abort), and transports that cannot fan out (Pulsar ``direct``, where each destination
reads its own broker and only the sender can put data there, and the memory backend).

Data that waits for its head is bounded per source (``max_held``, option ``max_broadcast_held``):
a party of the job could otherwise publish data under ids no head ever names and make the
receiver hold it until the session closes. The broadcast whose frame would pass the bound is
dropped whole (acknowledged, counted in ``forged``), its later frames too, and a ``get`` of its
head raises ``IntegrityError`` saying so.

Broadcast frames and pair frames never stand in for each other: the inbox refuses a
``BROADCAST`` frame on a pair lane, this module refuses any other frame on a broadcast lane;
both count it in ``Federation.stats["forged_refused"]``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .codec import Compressor, PayloadCodec, UnpicklePolicy
from .errors import BackendError, FederationError, IntegrityError, TransferTimeout
from .framing import BROADCAST, FrameWriter, PayloadTransform, TransferAssembly, frame_units, parse_frame
from .party import Party
from .transfer import KIND_BROADCAST, Outgoing, decode_object_transfer
from .transport import Delivery, Transport
from .transport.base import BROADCAST_LANE

__all__ = ["BroadcastHead", "Broadcasts"]

log = logging.getLogger("fedtransport.broadcast")

_HEAD = struct.Struct("<4s16s8sQ32sB")  # magic, data id, incarnation, size, SHA-256, key length
_HEAD_MAGIC = b"FTB1"
_KEY = 32  # AES-256
_TICK = 0.5  # seconds between a waiting get's checks for a closed session or a stall
_Token = tuple[int, Party, Any]


@dataclass(frozen=True)
class BroadcastHead:
    """What a destination learns over the sealed pair channel about one broadcast."""

    data_id: bytes  # 16 random bytes: the transfer id of the data frames
    incarnation: bytes  # of the data frames (framing): frames of another send are not this one
    size: int  # bytes of the encoded object
    digest: bytes  # SHA-256 of the encoded object
    key: bytes  # the data key; empty when the job is not sealed

    def pack(self) -> bytes:
        fixed = _HEAD.pack(_HEAD_MAGIC, self.data_id, self.incarnation, self.size, self.digest, len(self.key))
        return fixed + self.key

    @classmethod
    def unpack(cls, data: bytes | memoryview, source: str) -> BroadcastHead:
        raw = bytes(data)
        if len(raw) < _HEAD.size:
            raise IntegrityError(f"broadcast head from {source} is {len(raw)} bytes, shorter than {_HEAD.size}")
        magic, data_id, incarnation, size, digest, key_len = _HEAD.unpack_from(raw)
        if magic != _HEAD_MAGIC or key_len not in (0, _KEY) or len(raw) != _HEAD.size + key_len:
            raise IntegrityError(f"malformed broadcast head from {source}")
        return cls(data_id, incarnation, size, digest, raw[_HEAD.size :])


def digest_of(parts: Iterable[bytes | memoryview]) -> bytes:
    """SHA-256 of the concatenation of ``parts`` (never joined: hashlib lets go of the GIL)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


@dataclass(eq=False)
class _Data:
    """The data of one broadcast from one source, as it arrives."""

    src: Party
    data_id: bytes
    head: BroadcastHead | None = None  # known once a get found the head naming it
    assembly: TransferAssembly | None = None
    early: list[tuple[Any, memoryview]] = field(default_factory=list)  # frames that came before the head
    early_bytes: int = 0  # their payload bytes, counted against the source's max_held
    dropped: bool = False  # taken or refused: a frame that comes now is acknowledged, not held
    tokens: list[_Token] = field(default_factory=list)
    error: FederationError | None = None
    last_progress: float = field(default_factory=time.monotonic)
    cond: threading.Condition = field(default_factory=threading.Condition)


class Broadcasts:
    """One session's broadcasts, both ways (see the module docstring).

    ``transform_for(src, dst)`` is the session's pair transform (for the heads), ``max_chunk(overhead)``
    the payload budget of a message, ``pool`` the session's send threads.
    """

    def __init__(
        self,
        transport: Transport,
        job_id: str,
        job: bytes,
        compressor: Compressor,
        sealing: bool,
        transform_for: Callable[[Party, Party], PayloadTransform],
        max_chunk: Callable[[int], int],
        pool: concurrent.futures.Executor,
        redelivery_after: float,
        max_held: int = 1 << 30,
    ) -> None:
        self._transport = transport
        self._job_id = job_id
        self._job = job
        self._compressor = compressor
        self._sealing = sealing
        self._transform_for = transform_for
        self._max_chunk = max_chunk
        self._pool = pool
        self._redelivery_after = redelivery_after
        self._max_held = max_held
        self._held: dict[Party, int] = {}  # per source: payload bytes of data no get has named yet
        self._overflowed: set[tuple[Party, bytes]] = set()  # data dropped for passing max_held
        self._lock = threading.Lock()
        self._data: dict[tuple[Party, bytes], _Data] = {}
        self._finished: set[tuple[Party, bytes]] = set()  # data ids taken: a replay of one is dropped
        self._listening: set[Party] = set()
        self._failed: dict[Party, FederationError] = {}  # sources that aborted
        self._closed = False
        self.forged = 0  # frames refused: not broadcast data, or not the send the head names

    # sending -----------------------------------------------------------------------------------

    def applies(self, out: Outgoing, dsts: Sequence[Party]) -> bool:
        """Whether ``out`` goes to ``dsts`` as one broadcast."""
        return len(dsts) > 1 and out.unit is not None and self._transport.can_broadcast(dsts)

    def send(
        self, out: Outgoing, me: Party, dsts: Sequence[Party], tid_for: Callable[[Party], bytes],
        count: Callable[[Iterable[bytes]], Iterator[bytes]],
    ) -> None:  # fmt: skip
        """Publish ``out``'s data once, then each destination's head; raises the first failure."""
        unit = out.unit
        assert unit is not None
        data_id = os.urandom(16)
        key = os.urandom(_KEY) if self._sealing else b""
        transform = PayloadCodec(self._compressor, AESGCM(key) if key else None)
        writer = FrameWriter(self._job, data_id, 1, transform, flags=BROADCAST)
        lanes = out.lane_messages(writer, self._transport.broadcast_lanes, self._max_chunk(transform.overhead))
        sends = [
            (lane, self._pool.submit(self._transport.send_broadcast, dsts, BROADCAST_LANE + lane, count(msgs)))
            for lane, msgs in lanes.items()
        ]
        digest = digest_of(unit.parts)  # meanwhile, on this thread
        _results(sends, f"broadcasting to {', '.join(map(str, dsts))} on broadcast lane")
        head = BroadcastHead(data_id, writer.incarnation, unit.size, digest, key).pack()
        heads = []
        for dst in dsts:  # after the data: a head names only data the broker holds
            sealer = self._transform_for(me, dst)
            pair = FrameWriter(self._job, tid_for(dst), 1, sealer)
            msgs = frame_units(pair, 0, [(head, 0)], self._max_chunk(sealer.overhead), aux=KIND_BROADCAST)
            heads.append((dst, self._pool.submit(self._transport.send, dst, 0, count(msgs))))
        _results(heads, "sending a broadcast's head to")

    # receiving ---------------------------------------------------------------------------------

    def listen(self, src: Party) -> None:
        with self._lock:
            if src in self._listening:
                return
            self._listening.add(src)
        try:
            for lane in range(self._transport.broadcast_lanes):
                self._transport.listen(src, BROADCAST_LANE + lane, self.on_delivery)
        except BaseException:
            with self._lock:
                self._listening.discard(src)
            raise

    def on_delivery(self, d: Delivery) -> None:
        """Transport callback for a broadcast lane: file one data frame. Never raises."""
        token = (d.lane, d.src, d.token)
        try:
            header, payload = parse_frame(d.data, self._job)
        except IntegrityError as exc:
            log.warning("dropped a malformed message from %s on broadcast lane %d: %s", d.src, d.lane, exc)
            self._ack([token])
            return
        if not header.flags & BROADCAST:  # a pair frame copied here: it must never count as broadcast data
            self._refuse([token], f"a pair frame on broadcast lane {d.lane} of {d.src}")
            return
        key = (d.src, header.transfer)
        with self._lock:
            entry = None if key in self._finished else self._data.get(key)  # finished: redelivered, or replayed
            if entry is None and key not in self._finished:
                entry = self._data[key] = _Data(d.src, header.transfer)
        if entry is None:
            self._ack([token])
            return
        overflow = False
        with entry.cond:
            late = entry.dropped  # dropped by another thread since it was looked up above
            if not late:
                entry.tokens.append(token)
                if entry.head is not None:
                    self._place(entry, header, payload)
                elif self._hold(entry, len(payload)):
                    entry.early.append((header, payload))
                else:
                    overflow = True
                entry.cond.notify_all()
        if late:
            self._ack([token])
            return
        if overflow:
            self._overflow(entry)
            return
        self._make_room(d.src, d.lane)

    def _hold(self, entry: _Data, nbytes: int) -> bool:
        """Count ``nbytes`` more early data of ``entry`` against its source's bound; False past it."""
        with self._lock:
            held = self._held.get(entry.src, 0)
            if held + nbytes > self._max_held:
                return False
            self._held[entry.src] = held + nbytes
            entry.early_bytes += nbytes
        return True

    def _release(self, entry: _Data) -> None:
        """Under ``entry.cond``: its early data is placed or dropped, no longer held against the bound."""
        with self._lock:
            self._held[entry.src] = self._held.get(entry.src, 0) - entry.early_bytes
            entry.early_bytes = 0

    def _overflow(self, entry: _Data) -> None:
        """The source's unnamed data passed ``max_held``: drop this broadcast whole (and its later frames)."""
        with self._lock:
            self._overflowed.add((entry.src, entry.data_id))
            held = self._held.get(entry.src, 0)
        log.warning(
            "IntegrityError: broadcast data %s from %s came before its head while %d bytes of that party's "
            "broadcast data waited for heads already: more would pass max_broadcast_held (%d); dropped",
            entry.data_id.hex(), entry.src, held, self._max_held,
        )  # fmt: skip
        with self._lock:
            self.forged += 1
        self._drop(entry)

    def _place(self, entry: _Data, header: Any, payload: memoryview) -> None:
        """Under ``entry.cond``, the head known: add one frame to the data's assembly."""
        assert entry.head is not None and entry.assembly is not None
        if entry.error is not None:
            return
        if header.incarnation != entry.head.incarnation:
            with self._lock:
                self.forged += 1
            log.warning("IntegrityError: broadcast data %s from %s of another send; dropped",
                        entry.data_id.hex(), entry.src)  # fmt: skip
            return
        try:
            if entry.assembly.add(header, payload):
                entry.last_progress = time.monotonic()
        except FederationError as exc:
            entry.error = exc

    def receive(self, src: Party, head_bytes: list[memoryview], policy: UnpicklePolicy, deadline: float | None) -> Any:
        """The value a broadcast head from ``src`` names, once its data is in and matches the head.

        ``deadline`` is on ``time.monotonic``; past it :class:`TransferTimeout`, and the data
        stays for a retried ``get``. Data that fails its head is dropped (acknowledged).
        """
        source = str(src)
        if len(head_bytes) != 1:
            raise IntegrityError(f"broadcast head from {source} has {len(head_bytes)} units, expected 1")
        head = BroadcastHead.unpack(head_bytes[0], source)
        if self._sealing and not head.key:
            raise IntegrityError(f"broadcast from {source} is not sealed but this job requires sealing")
        self.listen(src)
        entry = self._expect(src, head)
        with entry.cond:
            while not (entry.error is not None or (entry.assembly is not None and entry.assembly.complete)):
                self._check(src)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    what = entry.assembly.describe() if entry.assembly else "nothing"
                    raise TransferTimeout(f"broadcast data from {source}: not complete ({what})", {source: what})
                if not entry.cond.wait(_TICK if left is None else min(_TICK, left)):
                    self._watch(entry)
            error = entry.error
        try:
            if error is not None:
                raise error
            assert entry.assembly is not None
            units = entry.assembly.stream_units(0)
            if len(units) != 1 or units[0].nbytes != head.size or digest_of(units) != head.digest:
                with self._lock:
                    self.forged += 1
                raise IntegrityError(
                    f"broadcast data {head.data_id.hex()} from {source} does not match the SHA-256 its sender's "
                    "head gave: swapped or forged on the broker; refused"
                )
            return decode_object_transfer(entry.assembly, policy, source)
        finally:
            self._drop(entry)

    def _expect(self, src: Party, head: BroadcastHead) -> _Data:
        key = (src, head.data_id)
        with self._lock:
            if key in self._overflowed:
                raise self._overflow_error(src, head)
            if key in self._finished:
                raise IntegrityError(f"broadcast data {head.data_id.hex()} from {src} was taken already: a replay")
            entry = self._data.get(key)
            if entry is None:
                entry = self._data[key] = _Data(src, head.data_id)
        with entry.cond:
            if entry.dropped:  # dropped between the look-up above and now: it passed max_held, or a replay
                if key in self._overflowed:
                    raise self._overflow_error(src, head)
                raise IntegrityError(f"broadcast data {head.data_id.hex()} from {src} was taken already: a replay")
            if entry.head is None:
                entry.head = head
                aead = AESGCM(head.key) if head.key else None
                entry.assembly = TransferAssembly(head.data_id, PayloadCodec(self._compressor, aead), max_streams=1)
                early, entry.early = entry.early, []
                self._release(entry)
                for header, payload in early:
                    self._place(entry, header, payload)
            elif entry.head != head:  # two heads naming one data id: only a replay makes that
                raise IntegrityError(f"broadcast data {head.data_id.hex()} from {src} is named by another head")
        return entry

    def _overflow_error(self, src: Party, head: BroadcastHead) -> IntegrityError:
        return IntegrityError(
            f"broadcast data {head.data_id.hex()} from {src} was dropped: it came before its head while more "
            f"than max_broadcast_held ({self._max_held} bytes) of that party's broadcast data waited for heads"
        )

    def _check(self, src: Party) -> None:
        if self._closed:
            raise FederationError("the federation session was closed while a get waited for broadcast data")
        failed = self._failed.get(src)
        if failed is not None:
            raise failed

    def _watch(self, entry: _Data) -> None:
        """No new frame for ``redelivery_after``: ask the broker for the lanes' unacknowledged ones."""
        now = time.monotonic()
        if now - entry.last_progress < self._redelivery_after:
            return
        entry.last_progress = now
        log.info("broadcast data from %s stalled: asking the broker to redeliver", entry.src)
        for lane in range(self._transport.broadcast_lanes):
            self._transport.redeliver(entry.src, BROADCAST_LANE + lane)

    def _drop(self, entry: _Data) -> None:
        """The data was taken or refused: forget it and acknowledge its messages."""
        with self._lock:
            self._finished.add((entry.src, entry.data_id))
            self._data.pop((entry.src, entry.data_id), None)
        with entry.cond:
            tokens, entry.tokens = entry.tokens, []
            entry.early = []
            entry.dropped = True
            self._release(entry)
        self._ack(tokens)

    def _refuse(self, tokens: list[_Token], what: str) -> None:
        with self._lock:
            self.forged += len(tokens)
        log.warning("IntegrityError: %s; dropped", what)
        self._ack(tokens)

    def _make_room(self, src: Party, lane: int) -> None:
        """Data is held unacknowledged until the get takes it: let the broker send more meanwhile."""
        limit = self._transport.max_unacked_per_lane
        if limit is None:
            return
        with self._lock:
            held = sum(1 for e in self._data.values() for t in e.tokens if t[0] == lane and t[1] == src)
        if held >= limit:
            try:
                self._transport.make_room(src, lane, held)
            except FederationError as exc:
                log.warning("could not raise the delivery limit of broadcast lane %d from %s: %s", lane, src, exc)

    def _ack(self, tokens: list[_Token]) -> None:
        if not tokens:
            return
        try:
            self._transport.ack(tokens)
        except FederationError as exc:
            log.warning("acknowledging %d broadcast messages failed: %s", len(tokens), exc)

    def fail_source(self, src: Party, error: FederationError) -> None:
        """``src`` aborted: gets waiting for its broadcast data raise ``error``."""
        self._failed.setdefault(src, error)
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            entries = list(self._data.values())
        for entry in entries:
            with entry.cond:
                entry.cond.notify_all()


def _results(futures: list[tuple[Any, concurrent.futures.Future[int]]], what: str) -> None:
    """Wait for every send; raise the first failure."""
    first: tuple[Any, BaseException] | None = None
    for who, fut in futures:
        try:
            fut.result()
        except Exception as exc:
            first = first or (who, exc)
    if first is not None:
        who, failure = first
        if isinstance(failure, FederationError):
            raise failure
        raise BackendError(f"{what} {who} failed: {failure}") from failure
