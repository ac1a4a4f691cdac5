"""The public face: a federation session for one job, as seen by one party."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .broadcast import Broadcasts
from .claims import ClaimBook
from .codec import Compressor, PayloadCodec, Sealer, UnpicklePolicy
from .errors import (
    BackendError,
    ConfigError,
    FederationError,
    IntegrityError,
    PeerAborted,
    PeerGone,
    TransferTimeout,
)
from .framing import FrameWriter, PayloadTransform, chunk_size, control_id, job_fingerprint, transfer_id
from .identity import pair_keys
from .inbox import Inbox, Incoming
from .options import CommonOptions, max_chunk, split_options
from .party import Party, as_parties, as_party, check_job_id, check_timeout, key_part
from .presence import PeerWatch
from .resume import Digest, RandomIncarnations, incarnation, resume_point, skip_through, table_digest, unit_digest
from .routing import RouteTable
from .table import Table
from .transfer import (
    KIND_BROADCAST,
    KIND_TABLE,
    Outgoing,
    cheap_to_encode,
    decode_object_transfer,
    streamed_table,
    transfer_kind,
)
from .transport import JobContext, Transport, get_backend

__all__ = ["Federation"]

log = logging.getLogger("fedtransport")

RouteSource = str | Path | Mapping[str, Any] | RouteTable | None
#: ``progress(bytes_done, bytes_total)``: uncompressed payload bytes; ``bytes_total`` is None
#: while unknown (tables). Called from the library's threads: keep it quick.
ProgressFn = Callable[[int, int | None], None]
_WAIT_TICK = 1.0  # how often a waiting get checks for stalled transfers
_ASYNC_SENDS = 64  # remote_async transfers in flight at once
_WINDOW_MESSAGES = 2  # messages' worth of unread table partition bytes a lane may hold
_ABORT = "abort"  # the kind of the notice a session sends its peers when it gives up
_REASON_MAX = 4096  # characters of an abort's reason that travel


class Federation:
    """A job session: ``remote``/``get`` values between parties, then ``close``/``cleanup``.

    Create it with :meth:`connect`. Thread-safe: ``remote`` and ``get`` may be
    called from several threads, and their asyncio forms from one event loop.
    """

    def __init__(self, transport: Transport, options: CommonOptions) -> None:
        ctx = transport.ctx
        self.job_id = ctx.job_id
        self.party = ctx.party
        self.backend = transport.name
        self._transport = transport
        self._opts = options
        self._job = job_fingerprint(ctx.job_id)
        self._compressor = Compressor(options.compression == "lz4")
        routes = ctx.route_table
        pairs = pair_keys(
            ctx.job_id, ctx.party, options.identity, options.peer_keys,
            routes.public_keys() if routes is not None else {}, options.secret,
            source=routes.source if routes is not None else "",
        )  # fmt: skip
        self._sealer = Sealer(options.secret, ctx.job_id, pairs) if options.secret or pairs else None
        self._policy = UnpicklePolicy(options.allow, options.trust_remote_code, options.allow_mode)
        self._sent = ClaimBook("remote(name={name!r}, tag={tag!r}) was already sent to {parties}")
        self._got = ClaimBook("get(name={name!r}, tag={tag!r}) from {parties} was already done")
        self._pool = concurrent.futures.ThreadPoolExecutor(options.send_workers, thread_name_prefix="ft-send")
        # remote_async callers keep many transfers in flight; each thread mostly waits for the broker's
        # receipt, so this pool is wider than asyncio's default executor (min(32, cores + 4) threads).
        self._async_pool = concurrent.futures.ThreadPoolExecutor(_ASYNC_SENDS, thread_name_prefix="ft-async")
        # Unread table partitions may hold this much per lane before the lane waits for the reader.
        window = _WINDOW_MESSAGES * options.max_message_size
        self._inbox = Inbox(
            transport, self._job, lambda src: self._transform(src, self.party), options.lanes, window,
            max_streams=options.max_streams,
        )  # fmt: skip
        self._broadcasts = Broadcasts(
            transport, ctx.job_id, self._job, self._compressor, self._sealer is not None, self._transform,
            lambda overhead: max_chunk(options, overhead), self._pool, options.redelivery_after,
            options.max_broadcast_held,
        )  # fmt: skip
        self._presence = PeerWatch(transport.peer_present)  # for timeout messages: is a peer still connected?
        self._closed = False
        self._peers: set[Party] = set()  # parties this session sent to or listened to: they hear an abort
        self._peers_heard: set[Party] = set()  # parties whose abort notice we listen for
        self._peers_lock = threading.Lock()
        self._pid = os.getpid()  # threads and broker connections do not survive a fork
        self._random_incarnation = RandomIncarnations()  # for sends that are not digested (resume.py)
        self._stats = {
            "bytes_sent": 0, "messages_sent": 0, "messages_resumed": 0, "bytes_received": 0, "messages_received": 0,
        }  # fmt: skip

    # lifecycle -------------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        backend: str = "memory",
        job_id: str = "",
        party: Party | tuple[str, str | int] | None = None,
        route_table: RouteSource = None,
        options: Mapping[str, Any] | None = None,
    ) -> Federation:
        """Open a session of ``job_id`` as ``party`` on ``backend``.

        ``options`` holds the common keys (``max_message_size``, ``compression``,
        ``allow``, ``trust_remote_code``, ``secret``, ...) and the backend's own;
        an unknown key is an error. See docs/backends.md.
        """
        if party is None:
            raise ConfigError("connect() needs party=Party(role, party_id)")
        job_id = check_job_id(job_id)
        me = as_party(party)
        if not isinstance(backend, str):
            raise ConfigError(f"backend must be a name, got {backend!r}")
        transport_cls = get_backend(backend)
        common, backend_opts = split_options(options, backend, transport_cls.option_defaults)
        routes = RouteTable.load(route_table, kind=transport_cls.route_kind) if route_table is not None else None
        ctx = JobContext(job_id, me, routes, backend_opts, common.max_message_size, common.lanes, common.lane_offset)
        transport = transport_cls(ctx)
        transport.open()
        log.debug("job %s: %s connected to %s", job_id, me, transport.describe())
        return cls(transport, common)

    def close(self) -> None:
        """Release connections and threads; idempotent. Broker resources stay (see cleanup).

        In a forked child it only marks the session closed: its threads and connections
        are the parent's (see ``_check_open``).
        """
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            return
        self._pool.shutdown(wait=True)
        self._async_pool.shutdown(wait=True)
        self._presence.close()
        self._broadcasts.close()
        self._inbox.close()  # wakes readers of streamed tables and lanes held back for them
        self._transport.close()

    def cleanup(self) -> None:
        """Delete every broker resource of this job; idempotent, also after ``close``."""
        self._check_process()
        self._transport.cleanup()

    def __enter__(self) -> Federation:
        return self

    def abort(self, reason: str) -> None:
        """Tell every peer of the job that this party gives up, then close the session.

        Each peer's pending and later ``get`` from this party raises :class:`PeerAborted` with
        ``reason`` (cut to 4 KiB). The peers are the parties this session sent to or received
        from, and every session of the job on the memory backend. A notice that cannot be
        sent (a broker gone) is logged; the session is closed all the same. Idempotent.
        """
        if not isinstance(reason, str):
            raise TypeError(f"abort(reason) takes a str, got {type(reason).__name__}")
        if self._closed:
            return
        self._check_process()
        with self._peers_lock:
            peers = sorted((self._peers | self._transport.peers()) - {self.party}, key=str)
        if peers:
            log.warning(
                "job %s: %s aborts, telling %s: %s", self.job_id, self.party, ", ".join(map(str, peers)), reason
            )
            try:
                self._send(reason[:_REASON_MAX], "", "", peers, None, notice=_ABORT)
            except FederationError as exc:
                log.warning("job %s: the abort notice did not reach every peer: %s", self.job_id, exc)
        self.close()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._abort_on(exc)
        self.close()

    def _abort_on(self, exc: BaseException | None) -> None:
        """A ``with`` block that raised: the peers learn why instead of waiting out their timeouts."""
        if exc is None or self._closed or os.getpid() != self._pid:
            return
        try:
            self.abort(f"{type(exc).__name__}: {exc}")
        except Exception:  # never hide the caller's own exception behind ours
            log.exception("job %s: telling the peers about %r failed", self.job_id, exc)

    async def __aenter__(self) -> Federation:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        await asyncio.to_thread(self.__exit__, exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"Federation(job_id={self.job_id!r}, party={self.party}, backend={self.backend!r})"

    @property
    def transport(self) -> Transport:
        """The backend's :class:`~fedtransport.transport.Transport` under this session.

        For diagnostics and tests (queue and topic names, the backend's own counters); send
        and receive through the session, which frames, seals and acknowledges.
        """
        return self._transport

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called: a closed session cannot send or receive again."""
        return self._closed

    @property
    def stats(self) -> dict[str, int]:
        """Bytes and messages moved by this session so far, and ``forged_refused``: messages
        refused because they came on the lanes of a party that is not their transfer's source,
        or on the wrong kind of lane, or as broadcast data that fails its head (broadcast.py)."""
        return {**self._stats, "forged_refused": self._inbox.forged + self._broadcasts.forged}

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise FederationError(
                f"the federation session of job {self.job_id} was opened in process {self._pid}, and this is a "
                f"forked child ({os.getpid()}): its I/O threads and broker connections stayed in the parent. "
                "Connect a new session in the child, or start children with the 'spawn' method "
                "(multiprocessing.get_context('spawn'))"
            )

    def _check_open(self) -> None:
        self._check_process()
        if self._closed:
            raise FederationError(f"the federation session of job {self.job_id} is closed")

    def _transform(self, src: Party, dst: Party) -> PayloadTransform:
        aead = self._sealer.for_pair(src, dst) if self._sealer else None
        return PayloadCodec(self._compressor, aead)

    # sending -----------------------------------------------------------------------------------

    def remote(
        self, obj: Any, name: str, tag: str, parties: Party | Sequence[Party], *, progress: ProgressFn | None = None
    ) -> None:
        """Send ``obj`` (any allowed object, or a :class:`Table`) to each of ``parties``.

        Returns once the broker has accepted every message. Sending the same
        ``(name, tag)`` to the same party twice raises :class:`DuplicateTransfer`.
        ``progress(done, total)`` is called as messages go out (bytes over every party).
        """
        name, tag, dsts = self._key(name, tag, parties, progress)
        # A failure releases the claims: nothing was handed over for sure, a retry must be allowed.
        with self._sent.claimed(name, tag, dsts):
            self._send(obj, name, tag, dsts, progress)

    def _send(
        self, obj: Any, name: str, tag: str, dsts: list[Party], progress: ProgressFn | None, *, notice: str = ""
    ) -> None:
        """Frame ``obj`` and send it to ``dsts``; with ``notice``, as the session's own notice of that kind."""
        self._send_outgoing(self._outgoing(obj, dsts), name, tag, dsts, progress, notice=notice)

    def _outgoing(self, obj: Any, dsts: list[Party]) -> Outgoing:
        with self._peers_lock:
            self._peers.update(dsts)
        return Outgoing(obj, fanout=len(dsts), cloudpickle_fallback=self._opts.trust_remote_code)

    def _send_outgoing(
        self, out: Outgoing, name: str, tag: str, dsts: list[Party], progress: ProgressFn | None, *, notice: str = ""
    ) -> None:
        started = time.perf_counter()
        total = None if out.unit is None else out.unit.size * len(dsts)
        counter = _Counting(total, progress)
        if not notice and self._broadcasts.applies(out, dsts):  # encoded and uploaded once (broadcast.py)
            counter.total = out.unit.size if out.unit is not None else None
            tid_of = functools.partial(transfer_id, self.job_id, name, tag, str(self.party))
            self._broadcasts.send(out, self.party, dsts, lambda dst: tid_of(str(dst)), counter.count)
            self._stats["bytes_sent"] += counter.bytes
            self._stats["messages_sent"] += counter.messages
            return
        plan = self._plan(out, name, tag, dsts, counter, notice)
        errors: list[tuple[Party, int, BaseException]] = []
        if len(plan) == 1:  # one lane to one party: no thread hand-off for the common small object
            dst, lane, messages = plan[0]
            try:
                self._transport.send(dst, lane, messages)
            except Exception as exc:
                errors.append((dst, lane, exc))
        else:
            futures = [
                (dst, lane, self._pool.submit(self._transport.send, dst, lane, msgs)) for dst, lane, msgs in plan
            ]
            for dst, lane, fut in futures:
                try:
                    fut.result()
                except Exception as exc:  # FederationError, or a backend bug / a value that cannot be encoded
                    errors.append((dst, lane, exc))
        self._account(name, tag, dsts, counter, errors, started)

    def _plan(
        self, out: Outgoing, name: str, tag: str, dsts: list[Party], counter: _Counting, notice: str
    ) -> list[tuple[Party, int, Iterator[bytes]]]:
        """Each destination's lanes and their lazy message streams."""
        plan: list[tuple[Party, int, Iterator[bytes]]] = []
        digests: list[Digest | None] = []  # the value's digest, computed for the first destination
        for dst in dsts:
            transform = self._transform(self.party, dst)
            if notice:
                tid = control_id(self.job_id, notice, str(self.party), str(dst))
            else:
                tid = transfer_id(self.job_id, name, tag, str(self.party), str(dst))
            if log.isEnabledFor(logging.DEBUG):  # its arguments cost more than a small object's framing
                log.debug(
                    "sending %s/%s %s -> %s: transfer %s, %s, %d streams",
                    name, tag, self.party, dst, tid.hex(),
                    "table" if out.unit is None else f"object of {out.unit.size} bytes",
                    out.nstreams,
                )  # fmt: skip
            limit = max_chunk(self._opts, transform.overhead)
            resumable = not notice and out.resumable(self._opts.lanes, limit, self._opts.resumable_tables)
            incarnation = self._incarnation(out, tid, dst, limit, digests, resumable=resumable)
            writer = FrameWriter(self._job, tid, out.nstreams, transform, incarnation)
            lanes = out.lane_messages(writer, self._opts.lanes, limit)
            for lane, messages in lanes.items():
                # asked on the lane's own send thread, so the lanes' admin calls overlap
                where = functools.partial(self._stored_point, out, dst, lane, tid, incarnation, transform, limit)
                plan.append((dst, lane, counter.count(messages, where if resumable else None)))
        return plan

    def _account(
        self, name: str, tag: str, dsts: list[Party], counter: _Counting,
        errors: list[tuple[Party, int, BaseException]], started: float,
    ) -> None:  # fmt: skip
        """Raise the first failure of a send, else count what it sent."""
        if errors:
            dst, lane, failure = errors[0]
            if isinstance(failure, FederationError):
                raise failure
            raise BackendError(f"sending {name!r}/{tag!r} to {dst} on lane {lane} failed: {failure}") from failure
        nbytes, nmsgs = counter.bytes, counter.messages
        self._stats["bytes_sent"] += nbytes
        self._stats["messages_sent"] += nmsgs
        self._stats["messages_resumed"] += counter.skipped
        if log.isEnabledFor(logging.INFO):
            elapsed = time.perf_counter() - started
            log.info(
                "sent %s/%s to %s: %d bytes in %d messages, %.3f s, %.1f MB/s",
                name, tag, ",".join(map(str, dsts)), nbytes, nmsgs, elapsed, nbytes / 1e6 / max(elapsed, 1e-9),
            )  # fmt: skip

    def _incarnation(
        self, out: Outgoing, tid: bytes, dst: Party, limit: int, digests: list[Digest | None], *, resumable: bool
    ) -> bytes:
        """The incarnation of this send to ``dst`` (resume.py): the value's digest, keyed for the
        direction, for a send that can be resumed; random for any other (a notice, an object of
        fewer than ``MIN_RESUME_MESSAGES`` messages a lane, a table without ``resumable_tables``
        or with one-shot partitions). A random one never merges two sends; the inbox keeps them apart."""
        if not resumable:
            return self._random_incarnation()
        if not digests:  # once per remote: every destination keys the same digest
            if out.unit is not None:
                digests.append(unit_digest(out.unit))
            else:
                assert out.table is not None
                digests.append(table_digest(out.table, limit))
        if digests[0] is None:
            return self._random_incarnation()
        key = self._sealer.digest_key(self.party, dst) if self._sealer else tid
        return incarnation(
            key, tid, digests[0], max_chunk=limit, lanes=self._opts.lanes, nstreams=out.nstreams,
            table=out.table is not None,
        )  # fmt: skip

    def _stored_point(
        self, out: Outgoing, dst: Party, lane: int, tid: bytes, incarnation: bytes, transform: PayloadTransform,
        limit: int,
    ) -> tuple[int, int] | None:  # fmt: skip
        """Where this send stopped on ``lane`` when its sender was killed, if the broker can tell."""
        try:
            stored = self._transport.last_stored(dst, lane)
        except FederationError as exc:  # only an optimisation: send the lane whole
            log.info("cannot read what lane %d to %s stores (%s): sending it whole", lane, dst, exc)
            return None
        point = resume_point(stored, self._job, tid, incarnation, transform)
        if point is None or not out.on_lane(point, lane, self._opts.lanes, limit):
            return None  # nothing of this send, or stored by a sender with other lanes
        log.info("resuming transfer %s to %s on lane %d after message %s", tid.hex(), dst, lane, point)
        return point

    async def remote_async(
        self, obj: Any, name: str, tag: str, parties: Party | Sequence[Party], *, progress: ProgressFn | None = None
    ) -> None:
        """``remote`` for asyncio: the event loop is not blocked while the broker accepts."""
        loop = asyncio.get_running_loop()
        if progress is None and self._transport.submits_without_waiting and cheap_to_encode(obj):
            await self._remote_submitted(loop, obj, name, tag, parties)
            return
        send = functools.partial(self.remote, obj, name, tag, parties, progress=progress)
        await loop.run_in_executor(self._async_pool, send)

    async def _remote_submitted(
        self, loop: asyncio.AbstractEventLoop, obj: Any, name: str, tag: str, parties: Party | Sequence[Party]
    ) -> None:
        """A small object's ``remote_async``: encoded on the event loop (tens of µs) and handed to
        the transport's ``submit``, whose futures are awaited here. A thread per transfer, parked
        on the broker's confirm, cost more than the transfer itself (the handoffs between event
        loop, worker and I/O thread). What does not fit one message per destination, or goes out
        as a broadcast, takes the threaded path after all."""
        started = time.perf_counter()
        name, tag, dsts = self._key(name, tag, parties)
        with self._sent.claimed(name, tag, dsts):
            out = self._outgoing(obj, dsts)
            limit = max_chunk(self._opts, self._transform(self.party, dsts[0]).overhead)
            if self._broadcasts.applies(out, dsts) or out.unit is None or out.unit.size > limit:
                threaded = functools.partial(self._send_outgoing, out, name, tag, dsts, None)
                await loop.run_in_executor(self._async_pool, threaded)
                return
            counter = _Counting(None, None)
            sends: list[tuple[Party, int, concurrent.futures.Future[int], float | None]] = []
            for dst, lane, messages in self._plan(out, name, tag, dsts, counter, ""):
                [message] = messages  # one chunk: one lane, one message, never resumable
                patience = self._transport.submit_patience
                try:
                    future = self._transport.submit(dst, lane, message)
                except FederationError as exc:  # like a failed send: the others still go
                    future = concurrent.futures.Future()
                    future.set_exception(exc)
                if future is None:  # the backend must wait for something first: a thread waits for it
                    future, patience = self._async_pool.submit(self._transport.send, dst, lane, [message]), None
                sends.append((dst, lane, future, patience))
            errors = []
            for dst, lane, future, patience in sends:  # all are in flight: waiting in turn costs nothing
                failure = await _outcome(future, patience)
                if failure is not None:
                    errors.append((dst, lane, failure))
            self._account(name, tag, dsts, counter, errors, started)

    # receiving ---------------------------------------------------------------------------------

    def get(
        self,
        name: str,
        tag: str,
        parties: Party | Sequence[Party],
        timeout: float | None = None,
        *,
        progress: ProgressFn | None = None,
    ) -> list[Any]:
        """Receive ``(name, tag)`` from each of ``parties``; values in party order.

        ``timeout`` (seconds, ``None`` = wait as long as it takes) bounds the
        whole call; :class:`TransferTimeout` names who was not heard from. It must be
        a finite number >= 0 (0: only what is complete already); like a bad name or
        tag, anything else raises :class:`ConfigError` before the session is touched. A table
        is returned once its head is in, its partitions streaming in as they are
        read. ``progress(done, total)`` is called as messages arrive (bytes over
        every party; total None for tables).
        """
        started = time.perf_counter()
        name, tag, srcs = self._key(name, tag, parties, progress)
        timeout = check_timeout(timeout)  # every argument checked before the session is touched
        # Until the handover, a failure releases the claims: the get may be tried again, and
        # what already arrived stays in the inbox for it.
        with self._got.claimed(name, tag, srcs):
            claims = self._incoming(name, tag, srcs, progress)
            deadline = None if timeout is None else time.monotonic() + timeout
            with self._inbox.waiting(claims):
                for inc in claims:
                    while not inc.head.done():  # what has arrived is returned, whatever the timeout
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0 and not inc.head.done():  # timeout=0: what is there
                            raise self._timeout(name, tag, claims, timeout)
                        try:
                            inc.head.result(timeout=_WAIT_TICK if left is None else min(_WAIT_TICK, left))
                            break
                        except concurrent.futures.TimeoutError:
                            self._watch(claims)
                            self._check_peers(name, tag, claims, timeout)
                        except FederationError:
                            break  # surfaced by _finish, after the handover
        return self._finish(name, tag, claims, started, timeout)

    async def get_async(
        self,
        name: str,
        tag: str,
        parties: Party | Sequence[Party],
        timeout: float | None = None,
        *,
        progress: ProgressFn | None = None,
    ) -> list[Any]:
        """``get`` for asyncio: waits on the event loop, decodes on a worker thread."""
        started = time.perf_counter()
        name, tag, srcs = self._key(name, tag, parties, progress)
        timeout = check_timeout(timeout)
        with self._got.claimed(name, tag, srcs):  # released on failure, as in get
            claims = self._incoming(name, tag, srcs, progress)
            deadline = None if timeout is None else time.monotonic() + timeout
            with self._inbox.waiting(claims):
                futures = [asyncio.wrap_future(inc.head) for inc in claims]
                while not all(inc.head.done() for inc in claims):  # as in get: arrived is never late
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise await asyncio.to_thread(self._timeout, name, tag, claims, timeout)  # waits for the broker
                    tick = _WAIT_TICK if left is None else min(_WAIT_TICK, left)
                    _, pending = await asyncio.wait(futures, timeout=tick)
                    if pending:
                        self._watch(claims)
                        self._check_peers(name, tag, claims, timeout)
        return await asyncio.to_thread(self._finish, name, tag, claims, started, timeout)

    def _key(
        self, name: str, tag: str, parties: Party | Sequence[Party], progress: object = None
    ) -> tuple[str, str, list[Party]]:
        """The checked arguments of a transfer; ``progress`` is checked too, since a callback that
        cannot be called would otherwise fail only inside the transfer, where it is logged."""
        self._check_open()
        if progress is not None and not callable(progress):
            raise ConfigError(f"progress must be a function (done, total) or None, got {type(progress).__name__}")
        return key_part("name", name), key_part("tag", tag), as_parties(parties)

    def _incoming(self, name: str, tag: str, srcs: list[Party], progress: ProgressFn | None) -> list[Incoming]:
        """The inbox's entries of the transfers from ``srcs``, their lanes listened to."""
        claims = []
        for src in srcs:
            self._listen(src)
            tid = transfer_id(self.job_id, name, tag, str(src), str(self.party))
            if log.isEnabledFor(logging.DEBUG):
                log.debug("getting %s/%s %s -> %s: transfer %s", name, tag, src, self.party, tid.hex())
            claims.append(self._inbox.claim(tid, src))
        if progress is not None:
            report = _progress_of(claims, progress)
            for inc in claims:
                inc.on_progress = report
            report()  # what arrived before the get
        return claims

    def _listen(self, src: Party) -> None:
        """Listen to ``src``'s lanes, and for its abort notice from the first time on."""
        self._transform(src, self.party)  # with pair keys, a peer without a public key fails here
        self._inbox.listen(src)
        with self._peers_lock:
            if src in self._peers_heard:
                return
            self._peers_heard.add(src)
            self._peers.add(src)
        tid = control_id(self.job_id, _ABORT, str(src), str(self.party))
        self._inbox.expect_notice(tid, src, self._on_abort_notice)

    def _on_abort_notice(self, inc: Incoming) -> None:
        src = inc.src
        error = inc.error()
        if self._closed:  # our own session went away meanwhile: nobody is left to tell
            return
        if error is not None:
            # Frames under the notice's id that failed before it was complete: another party's
            # (on its own lanes), or garbage. Never the peer giving up: drop them, listen again.
            log.warning("job %s: dropped a false abort notice in %s's name: %s", self.job_id, src, error)
            self._inbox.hand_over(inc, final=False)
            self._inbox.expect_notice(inc.transfer, src, self._on_abort_notice)
            return
        try:
            reason = decode_object_transfer(inc.assembly, self._policy, str(src))
            if not isinstance(reason, str):
                raise IntegrityError(f"an abort notice holds a {type(reason).__name__}, not a str")
        except FederationError as exc:  # came on the peer's own lanes: it gave up, whatever it said
            reason = f"(its abort notice could not be read: {exc})"
        self._inbox.hand_over(inc)
        log.warning("job %s: %s aborted: %s", self.job_id, src, reason)
        self._inbox.fail_source(src, PeerAborted(src, reason[:_REASON_MAX]))
        self._broadcasts.fail_source(src, PeerAborted(src, reason[:_REASON_MAX]))

    def _watch(self, claims: list[Incoming]) -> None:
        after = self._opts.redelivery_after
        for src in {inc.src for inc in claims if self._inbox.stalled(inc, after)}:
            self._inbox.redeliver(src)

    def _check_peers(self, name: str, tag: str, claims: list[Incoming], timeout: float | None) -> None:
        """Ask the broker about the parties still waited for; ``PeerGone`` for one gone too long."""
        late = [inc.src for inc in claims if not inc.head.done()]
        self._presence.poll(late)
        after = self._opts.peer_gone_after
        for src in late:
            gone = self._presence.gone_for(src)
            if after is not None and gone is not None and gone >= after:
                raise self._timeout(name, tag, claims, timeout, gone=src)

    def _timeout(
        self, name: str, tag: str, claims: list[Incoming], timeout: float | None, gone: Party | None = None
    ) -> TransferTimeout:
        late = [inc for inc in claims if not inc.head.done()]
        missing = {str(inc.src): ("nothing" if inc.assembly.messages == 0 else inc.assembly.describe()) for inc in late}
        if gone is None:  # as the broker sees it now; timeout=0 (a look at what is there) does not wait for it
            self._presence.poll((inc.src for inc in late), fresh=bool(timeout))
        presence = {str(inc.src): self._presence.state(inc.src) for inc in late}
        notes = {str(inc.src): self._presence.note(inc.src) for inc in late}
        parts = "; ".join(f"from {p}: {what}" + (f" ({notes[p]})" if notes[p] else "") for p, what in missing.items())
        if gone is not None:
            return self._peer_gone(f"get(name={name!r}, tag={tag!r})", gone, parts, missing, presence)
        return TransferTimeout(
            f"get(name={name!r}, tag={tag!r}) in job {self.job_id} timed out after {timeout} s; not complete: {parts}",
            missing,
            presence,
        )

    def _finish(self, name: str, tag: str, claims: list[Incoming], started: float, timeout: float | None) -> list[Any]:
        values: list[Any] = []
        first_error: BaseException | None = None  # a FederationError: the only kind heads fail with
        for inc in claims:
            source = str(inc.src)
            error = inc.head.exception()
            value = None
            if error is None:
                try:
                    kind = transfer_kind(inc.assembly, source)
                    if kind == KIND_TABLE:
                        value = self._streamed_table(name, tag, inc, timeout)
                    elif kind == KIND_BROADCAST:  # the head is acknowledged once its data is taken
                        deadline = (
                            None if timeout is None else time.monotonic() + timeout - (time.perf_counter() - started)
                        )
                        value = self._broadcasts.receive(inc.src, inc.assembly.stream_units(0), self._policy, deadline)
                        self._handed_over(inc)
                    else:
                        self._handed_over(inc)
                        value = decode_object_transfer(inc.assembly, self._policy, source)
                except FederationError as exc:
                    error = exc
            if error is not None:
                # A bad transfer is dropped (acknowledged). One cut short by a closing session or an
                # aborting peer is left to the broker, for the party's next session.
                if not (self._closed or isinstance(error, (PeerAborted, TransferTimeout))):
                    self._handed_over(inc)
                first_error = first_error or error
            values.append(value)
        if first_error is not None:
            raise first_error
        if log.isEnabledFor(logging.INFO):
            elapsed = time.perf_counter() - started
            nbytes = sum(inc.assembly.bytes for inc in claims)
            log.info(
                "got %s/%s from %s: %d bytes in %d messages, %.3f s, %.1f MB/s",
                name, tag, ",".join(str(i.src) for i in claims), nbytes, sum(i.assembly.messages for i in claims),
                elapsed, nbytes / 1e6 / max(elapsed, 1e-9),
            )  # fmt: skip
        return values

    def _streamed_table(self, name: str, tag: str, inc: Incoming, timeout: float | None) -> Table:
        """The received table, its partitions read while they stream in (see transfer.py)."""
        asm = inc.assembly
        assert asm.nstreams is not None

        def read(stream: int) -> tuple[list[memoryview], bool]:
            return self._inbox.read_units(inc, stream, timeout, lambda i: self._watch_partition(name, tag, i, stream))

        def finished() -> None:
            if self._handed_over(inc):
                log.debug("table %s/%s from %s: handed over, %d bytes", name, tag, inc.src, inc.assembly.bytes)

        def count_of(stream: int) -> int:  # of the send chosen when it is read (see inbox: incarnations)
            return inc.assembly.stream_aux(stream)

        return streamed_table(asm.nstreams, read, count_of, self._policy, str(inc.src), finished)

    def _watch_partition(self, name: str, tag: str, inc: Incoming, stream: int) -> None:
        """A partition read that waits: redelivery as for a ``get``, and ``PeerGone`` once its
        sender was seen gone for ``peer_gone_after`` seconds (the get returned at the head, so
        its own check of the peers is over)."""
        self._watch([inc])
        after = self._opts.peer_gone_after
        if after is None:
            return
        self._presence.poll([inc.src])
        gone = self._presence.gone_for(inc.src)
        if gone is not None and gone >= after:
            src, what = str(inc.src), inc.assembly.describe()
            parts = f"from {src}: {what} ({self._presence.note(inc.src)})"
            waiting = f"reading partition {stream - 1} of get(name={name!r}, tag={tag!r})"
            raise self._peer_gone(waiting, inc.src, parts, {src: what}, {src: self._presence.state(inc.src)})

    def _peer_gone(
        self, waiting: str, gone: Party, parts: str, missing: dict[str, str], presence: dict[str, str]
    ) -> PeerGone:
        return PeerGone(
            f"{waiting} in job {self.job_id} stopped waiting: {gone} was gone from the broker for "
            f"{self._opts.peer_gone_after} s (peer_gone_after); not complete: {parts}",
            missing,
            presence,
            gone,
        )

    def _handed_over(self, inc: Incoming) -> bool:
        if not self._inbox.hand_over(inc):
            return False
        self._stats["bytes_received"] += inc.assembly.bytes
        self._stats["messages_received"] += inc.assembly.messages
        return True


async def _outcome(future: concurrent.futures.Future[int], patience: float | None) -> BaseException | None:
    """How a submit ended (``None``: accepted), waited for at most ``patience`` seconds."""
    try:
        await asyncio.wait_for(asyncio.wrap_future(future), patience)
    except asyncio.TimeoutError:
        return BackendError(f"no receipt from the broker within {patience:g} s for a submitted message")
    except Exception as exc:  # as the threaded path: _account raises the first failure
        return exc
    return None


class _Rising:
    """A caller's progress callback, called by several threads (the caller's and each lane's):
    one call at a time, and never a smaller figure after a larger one, which two threads'
    counts taken at once could otherwise be reported as."""

    def __init__(self, progress: ProgressFn, what: str) -> None:
        self._progress = progress
        self._what = what  # "remote" or "get", for the log
        self._lock = threading.Lock()
        self._reported = -1

    def __call__(self, done: int, total: int | None) -> None:
        with self._lock:
            if done > self._reported:
                self._reported = done
                try:
                    self._progress(done, total)
                except Exception:  # a caller's callback must fail neither the transfer nor a lane
                    log.exception("the progress callback of a %s failed", self._what)


def _progress_of(claims: list[Incoming], progress: ProgressFn) -> Callable[[], None]:
    rising = _Rising(progress, "get")

    def report() -> None:
        sizes = [inc.assembly.value_size for inc in claims]
        total = None if None in sizes else sum(sizes)  # type: ignore[arg-type]
        rising(sum(inc.assembly.value_bytes for inc in claims), total)

    return report


class _Counting:
    """Counts what a remote hands to the transport, over every lane, and reports progress."""

    def __init__(self, total: int | None, progress: ProgressFn | None) -> None:
        self.total = total
        self.progress = None if progress is None else _Rising(progress, "remote")
        self.bytes = 0  # as on the wire
        self.messages = 0
        self.done = 0  # uncompressed payload
        self.skipped = 0  # messages not sent again: the broker stores them (resume.skip_through)
        self._lock = threading.Lock()

    def _skipping(self, messages: Iterable[bytes], point: tuple[int, int]) -> Iterator[bytes]:
        def skipped(msg: bytes) -> None:
            with self._lock:
                self.skipped += 1
                self.done += chunk_size(msg)

        return skip_through(messages, point, skipped)

    def count(
        self, messages: Iterable[bytes], resume_after: Callable[[], tuple[int, int] | None] | None = None
    ) -> Iterator[bytes]:
        """``messages`` as sent. ``resume_after`` is asked once, when the lane starts: the
        ``(stream, seq)`` up to which messages are skipped (the broker stores them); they count
        as progress only."""
        point = None if resume_after is None else resume_after()
        if point is not None:
            messages = self._skipping(messages, point)
        for msg in messages:
            with self._lock:
                self.bytes += len(msg)
                self.messages += 1
                self.done += chunk_size(msg)
                done = self.done
            yield msg
            if self.progress is not None:  # the transport took it and asks for the next
                self.progress(done, self.total)
