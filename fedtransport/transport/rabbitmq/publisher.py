"""The RabbitMQ publisher: one confirming channel, a bounded window per ``send``.

``send`` (on a caller thread) puts messages into its ``_Send`` window and blocks while the
window is full (``send_window`` messages, ``send_window_bytes``): a lazy message stream is
never buffered. The I/O thread publishes them persistent (delivery mode 2, ``mandatory``)
to the party's own exchange, after declaring the exchange, the queue and their binding once
per channel. A broadcast names more queues: one publish, routed to the others by its ``CC``
header. A confirm frees a slot; a nack, a returned (unroutable) message or a channel
error fails the send with the broker's reply text; no confirm for ``send_timeout`` seconds
fails it naming the last connection problem.

``submit`` publishes one message without waiting: its future completes at the confirm (or
fails as ``send`` would), and a timer on the I/O thread stands in for ``send``'s wait on
``send_timeout``.

When the connection comes back, the new channel publishes again whatever is unconfirmed
(the framing layer above drops the duplicates).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from ...errors import BackendError
from .connection import RETRY_FIRST, RabbitConnection, reason, safe

__all__ = ["Publisher"]

log = logging.getLogger("fedtransport.rabbitmq")

SUBMIT_ROOM = 1024  # unconfirmed submits per session; past it a remote_async waits in a thread


class _Send:
    """One ``send`` call: its window of unconfirmed messages, shared with the I/O thread.

    ``queues``: where each message goes; beyond the first, named in the ``CC`` header (a broadcast).
    ``future``: set for a ``submit``, completed once when the op ends; nobody waits on ``cond``."""

    def __init__(self, op_id: int, queues: tuple[str, ...], future: Future[int] | None = None) -> None:
        self.id = op_id
        self.queue = queues[0]
        self.queues = queues
        self.cond = threading.Condition()
        self.unconfirmed: dict[int, bytes] = {}  # index -> body, until the broker confirms it
        self.sent_on: dict[int, int] = {}  # index -> publisher channel it went out on (I/O thread)
        self.error: str | None = None
        self.progress = time.monotonic()
        self.closed = False  # the caller has handed over every message (under ``cond``)
        self.forgotten = False  # the I/O thread dropped it from its books at its last confirm
        self.future = future
        self.timer: Any = None  # a submit's send_timeout, on the I/O thread

    def fail(self, why: str, exc: BackendError | None = None) -> None:
        """Fail the op with ``why``; a submit's future gets ``exc`` if given, else ``failure()``."""
        with self.cond:
            if self.error is None:
                self.error = why
            self.cond.notify_all()
            self.settle(exc)

    def failure(self) -> BackendError:
        why = self.error or "unknown reason"
        return BackendError(f"RabbitMQ: sending to {self.queue} failed: {why}", broker_message=why)

    def settle(self, exc: BackendError | None = None) -> None:
        """Complete a submit's future once it failed or its message is confirmed (holding ``cond``)."""
        future = self.future
        if future is None or future.done():
            return
        if self.error is not None:
            future.set_exception(exc or self.failure())
        elif self.closed and not self.unconfirmed:
            future.set_result(1)  # a submit is one message


class Publisher:
    """Publishes to ``exchange`` over ``connection``, with confirms (see the module docstring)."""

    def __init__(
        self, connection: RabbitConnection, exchange: str, *, window: int, window_bytes: int, timeout: float
    ) -> None:
        self._io = connection
        self._exchange = exchange
        self._window = window
        self._window_bytes = window_bytes
        self._timeout = timeout
        self._op_ids = itertools.count(1)
        self._ops: dict[int, _Send] = {}
        # Submits not yet ended; filled by callers, emptied by the I/O thread (one dict operation
        # each: safe under the GIL), read when closing.
        self._submitted: dict[int, _Send] = {}
        # The channel and its state: touched only on the I/O thread.
        self._epochs = itertools.count(1)
        self._ch: Channel | None = None
        self._epoch = 0  # of the current channel; callbacks of an older one are ignored
        self.ready = False  # confirm mode is on: messages may go out
        self._tag = 0
        self._retry = RETRY_FIRST
        self._outstanding: dict[int, tuple[_Send, int]] = {}  # delivery tag -> (send, index)
        self._declared: set[str] = set()  # queues declared and bound on the current channel
        self._declaring: set[str] = set()  # queues whose declare-and-bind is under way on it
        connection.add_listener(self)

    # caller threads ------------------------------------------------------------------------

    def send(self, queue: str | Sequence[str], messages: Iterable[bytes], limit: int) -> int:
        """Publish ``messages`` (each at most ``limit`` bytes) in order; return once all are confirmed.

        Several queues: each message is published once, routed to the first and, by the ``CC``
        header, to the others; the broker stores it once (a broadcast, broadcast.py)."""
        op = _Send(next(self._op_ids), (queue,) if isinstance(queue, str) else tuple(queue))
        # One wake-up of the I/O thread per message and none after the last confirm: a small
        # transfer's cost is its round trip, and each extra hop to the I/O thread showed in it.
        pump = functools.partial(self._pump, op)
        count = 0
        try:
            for msg in messages:
                body = msg if isinstance(msg, bytes) else bytes(msg)
                if len(body) > limit:
                    raise BackendError(f"message of {len(body)} bytes exceeds max_message_size {limit}")
                with op.cond:
                    self._wait(op, functools.partial(self._room, op, len(body)))
                    if not op.unconfirmed:  # the confirm clock runs while something is outstanding
                        op.progress = time.monotonic()
                    op.unconfirmed[count] = body
                self._io.post(pump if count else functools.partial(self._register, op))
                count += 1
            with op.cond:
                # From here on the I/O thread drops the op from its books at its last confirm;
                # when none is outstanding any more (or never was), ``finally`` does.
                op.closed = True
                self._wait(op, lambda: not op.unconfirmed)
        finally:
            with op.cond:
                op.closed = True
                forget = count > 0 and not op.forgotten
            if forget:
                with contextlib.suppress(BackendError):  # closed: nothing left to forget it in
                    self._io.post(functools.partial(self._forget, op))
        return count

    def submit(self, queue: str, body: bytes, limit: int) -> Future[int] | None:
        """Publish ``body`` to ``queue`` and return at once: a future of 1 once the broker confirms
        it, or of the ``BackendError`` ``send`` would raise (``send_timeout`` included). ``None``
        while ``SUBMIT_ROOM`` submits are unconfirmed: the caller sends it as ``send`` does."""
        if len(body) > limit:
            raise BackendError(f"message of {len(body)} bytes exceeds max_message_size {limit}")
        if len(self._submitted) >= SUBMIT_ROOM:
            return None
        future: Future[int] = Future()
        op = _Send(next(self._op_ids), (queue,), future)
        op.unconfirmed[0] = body
        op.closed = True  # handed over whole: the last confirm settles it
        op.progress = time.monotonic()
        self._submitted[op.id] = op  # until it ends: closing fails it, registered or not
        try:
            self._io.post(functools.partial(self._register, op))
        except BackendError:
            self._submitted.pop(op.id, None)
            raise
        return future

    def _room(self, op: _Send, size: int) -> bool:
        """The window: ``send_window`` messages and ``send_window_bytes`` unconfirmed at most."""
        if not op.unconfirmed:
            return True
        held = sum(len(b) for b in op.unconfirmed.values())
        return len(op.unconfirmed) < self._window and held + size <= self._window_bytes

    def _wait(self, op: _Send, done: Callable[[], bool]) -> None:
        """Block (holding ``op.cond``) until ``done()``; raise on failure or no progress."""
        while True:
            if op.error is not None:
                raise op.failure()
            if done():
                return
            if self._io.closed:
                raise BackendError("the RabbitMQ transport is closed")
            left = op.progress + self._timeout - time.monotonic()
            if left <= 0:
                raise self._overdue(op)
            op.cond.wait(left)

    def _overdue(self, op: _Send) -> BackendError:
        why = self._io.problem or "the broker is slow or blocked (resource alarm?)"
        return BackendError(
            f"RabbitMQ: no publisher confirm for {op.queue} in {self._timeout:.0f} s "
            f"({len(op.unconfirmed)} messages unconfirmed): {why}",
            broker_message=why,
        )

    @property
    def in_flight(self) -> int:
        """How many ``send`` calls the I/O thread still keeps books for (0 once all returned)."""
        return len(self._ops)

    def fail_all(self, why: str) -> None:
        """Wake every waiting ``send`` and fail every pending submit with ``why`` (the transport was closed)."""
        for op in list(self._ops.values()) + list(self._submitted.values()):
            op.fail(why)

    # I/O thread: connection events ---------------------------------------------------------

    def connection_opened(self) -> None:
        self._io.open_channel(self._on_channel)

    def connection_lost(self) -> None:
        self._ch, self.ready = None, False
        self._outstanding.clear()

    def shutting_down(self) -> None:
        """Nothing to stop: closing the connection closes the channel."""

    # I/O thread: the channel ---------------------------------------------------------------

    def _on_channel(self, ch: Channel) -> None:
        self._epoch = epoch = next(self._epochs)
        self._ch, self.ready, self._tag = ch, False, 0
        self._outstanding.clear()
        self._declared.clear()
        self._declaring.clear()
        ch.add_on_close_callback(safe(functools.partial(self._on_closed, epoch)))
        ch.add_on_return_callback(safe(self._on_return))
        ch.confirm_delivery(
            safe(functools.partial(self._on_confirm, epoch)),
            callback=safe(lambda _frame: self._on_ready(epoch)),
        )

    def _on_ready(self, epoch: int) -> None:
        if epoch != self._epoch:
            return
        self.ready = True
        self._retry = RETRY_FIRST
        self._io.established()
        for op in list(self._ops.values()):  # after a reconnect: publish again what is unconfirmed
            self._pump(op)

    def _on_closed(self, epoch: int, ch: Channel, exc: BaseException) -> None:
        if epoch != self._epoch:
            return
        lost = {op.id: op for op, _ in self._outstanding.values()}
        lost.update({op.id: op for op in self._ops.values() if self._declaring.intersection(op.queues)})
        self._ch, self.ready = None, False
        self._outstanding.clear()
        self._declaring.clear()
        if not self._io.is_open:
            return  # the connection went: it reconnects and everything is published again
        # A channel error (access refused, message too large, ...): the sends it hit fail.
        why = reason(exc)
        for op in lost.values():
            op.fail(f"the broker closed the publishing channel: {why}")
            if op.future is not None:
                self._done(op)
        delay, self._retry = self._retry, min(self._retry * 2, 5.0)
        self._io.call_later(delay, self._reopen)

    def _reopen(self) -> None:
        if self._io.is_open and self._ch is None:
            self._io.open_channel(self._on_channel)

    def _register(self, op: _Send) -> None:
        """``op``'s first message is waiting: keep books for it and publish."""
        if op.future is not None and op.future.done():  # failed before it got here (closing)
            self._submitted.pop(op.id, None)
            return
        self._ops[op.id] = op
        if op.future is not None:  # nobody waits on a submit: its clock runs here
            op.timer = self._io.call_later(self._timeout, functools.partial(self._expire, op))
        self._pump(op)

    def _forget(self, op: _Send) -> None:
        self._ops.pop(op.id, None)

    def _done(self, op: _Send) -> None:
        """A submit ended (confirmed or failed): out of the books, its timer stopped."""
        self._ops.pop(op.id, None)
        self._submitted.pop(op.id, None)
        if op.timer is not None:
            self._io.remove_timeout(op.timer)
            op.timer = None

    def _expire(self, op: _Send) -> None:
        """A submit's ``send_timeout``: restarted by every confirm, as ``send``'s wait is."""
        op.timer = None
        if op.id not in self._ops:
            return
        left = op.progress + self._timeout - time.monotonic()
        if left > 0:
            op.timer = self._io.call_later(left, functools.partial(self._expire, op))
            return
        overdue = self._overdue(op)
        op.fail(overdue.broker_message or str(overdue), overdue)
        self._done(op)

    def _pump(self, op: _Send) -> None:
        """Publish whatever of ``op`` has not gone out on the current channel."""
        ch = self._ch
        if not self.ready or ch is None or op.id not in self._ops or op.error is not None:
            return
        missing = [q for q in op.queues if q not in self._declared]
        if missing:
            for queue in missing:
                self._declare_route(ch, queue)
            return
        with op.cond:
            todo = [(i, body) for i, body in op.unconfirmed.items() if op.sent_on.get(i) != self._epoch]
        for i, body in todo:
            self._tag += 1
            self._outstanding[self._tag] = (op, i)
            op.sent_on[i] = self._epoch
            cc: dict[str, Any] | None = {"CC": list(op.queues[1:])} if len(op.queues) > 1 else None
            props = BasicProperties(delivery_mode=2, message_id=f"{op.id}:{i}", headers=cc)
            ch.basic_publish(self._exchange, op.queue, body, props, mandatory=True)

    def _declare_route(self, ch: Channel, queue: str) -> None:
        """Declare our exchange and ``queue`` and bind them; then publish what waits for it.

        pika holds an RPC back until the one before it is answered, but not a publish, which
        could then overtake the declaration it needs: nothing goes out before the bind is
        confirmed (the RPCs are answered in order, so the last one's reply is enough)."""
        if queue in self._declaring:
            return  # under way: its end pumps every send to this queue
        self._declaring.add(queue)
        epoch = self._epoch

        def bound(_frame: Any) -> None:
            if epoch != self._epoch:
                return
            self._declaring.discard(queue)
            self._declared.add(queue)
            for op in [o for o in self._ops.values() if queue in o.queues]:
                self._pump(op)

        ch.exchange_declare(self._exchange, "direct", durable=True)
        ch.queue_declare(queue, durable=True)
        ch.queue_bind(queue, self._exchange, routing_key=queue, callback=safe(bound))

    def _on_confirm(self, epoch: int, frame: Any) -> None:
        if epoch != self._epoch:
            return
        method = frame.method
        ok = isinstance(method, Basic.Ack)
        tag = method.delivery_tag
        done: list[tuple[_Send, int]] = []
        if method.multiple:
            while self._outstanding:
                first = next(iter(self._outstanding))  # tags are inserted in increasing order
                if first > tag:
                    break
                done.append(self._outstanding.pop(first))
        elif tag in self._outstanding:
            done.append(self._outstanding.pop(tag))
        now = time.monotonic()
        for op, i in done:
            op.sent_on.pop(i, None)
            with op.cond:
                op.unconfirmed.pop(i, None)
                op.progress = now
                if not ok and op.error is None:
                    op.error = f"the broker refused (nacked) message {i} for queue {op.queue}"
                if op.closed and not op.unconfirmed:  # its send returns now: no post to forget it
                    op.forgotten = True
                    self._ops.pop(op.id, None)
                    if op.future is not None:
                        op.settle()
                        self._done(op)
                op.cond.notify_all()

    def _on_return(self, ch: Channel, method: Any, props: BasicProperties, body: bytes) -> None:
        op_id, _, index = (props.message_id or "").partition(":")
        op = self._ops.get(int(op_id)) if op_id.isdigit() else None
        if op is not None:
            op.fail(f"the broker returned message {index} for queue {method.routing_key}: "
                    f"{method.reply_code} {method.reply_text}")  # fmt: skip
            if op.future is not None:
                self._done(op)
