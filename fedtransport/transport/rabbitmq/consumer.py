"""The RabbitMQ consumers: one channel per (source, lane), manual acks, an adaptive qos.

Each lane's consumer has a channel of its own and a thread of its own: deliveries are handed
to that thread, so checking and placing a message (CRC, copy, decompress) runs in parallel
across lanes and never holds up pika's single I/O thread, which keeps reading sockets and
sending acks meanwhile. The hand-off is bounded by the channel's qos: the broker sends no
more until acked.

The qos keeps about ``prefetch_bytes`` in flight per lane (``_adapt_qos``) and grows by what
the receiver holds unacknowledged (``make_room``), so a lane never stalls behind data nobody
asked for yet. ``redeliver`` is ``basic.recover(requeue=True)`` on the lane's channel; the
acks of deliveries made before it are dropped (their messages come again and are
deduplicated above). A channel the broker closes is opened again with back-off; after a
reconnect every consumer starts again.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from queue import SimpleQueue
from typing import Any

from pika.channel import Channel
from pika.spec import BasicProperties

from ...errors import BackendError
from ...party import Party
from ..base import DeliverFn, Delivery
from .connection import RETRY_FIRST, RabbitConnection, reason, safe

__all__ = ["Consumers"]

log = logging.getLogger("fedtransport.rabbitmq")


class _Consumer:
    """One (source, lane) consumer; its channel and epoch live on the I/O thread."""

    def __init__(self, src: Party, lane: int, queue: str, deliver: DeliverFn) -> None:
        self.src = src
        self.lane = lane
        self.queue = queue
        self.deliver = deliver
        self.handoff: SimpleQueue[Delivery | None] = SimpleQueue()
        self.worker = threading.Thread(target=self._work, name=f"ft-rabbit-recv-{src}-{lane}", daemon=True)
        self.worker.start()
        self.channel: Channel | None = None
        self.epoch = 0  # tokens of any other epoch are stale: their channel closed or recovered
        self.recovering = False  # basic.recover sent, recover-ok not yet received
        self.ready = threading.Event()  # consume-ok received at least once, or failed
        self.error: str | None = None
        self.retry = RETRY_FIRST
        self.timer: Any = None
        self.qos = 0  # the prefetch count for the traffic (see _adapt_qos)
        self.held = 0  # deliveries the inbox holds unacknowledged, allowed on top (make_room)
        self.mean_size = 0.0  # recent message size, for the qos

    def _work(self) -> None:
        while (d := self.handoff.get()) is not None:
            try:
                self.deliver(d)
            except Exception:  # the inbox never raises; a bug must not kill the lane
                log.exception("delivering a message from %s on lane %d failed", self.src, self.lane)

    def stop(self) -> None:
        self.handoff.put(None)

    def qos_limit(self) -> int:
        # Set as the channel's limit (global): RabbitMQ fixes a per-consumer limit when the consumer
        # starts, while the channel's limit can be changed under a running consumer. One consumer
        # per channel, so the two mean the same.
        return min(65535, self.qos + self.held)


class Consumers:
    """Every lane consumer of a session (see the module docstring)."""

    def __init__(
        self, connection: RabbitConnection, *, prefetch: int, prefetch_max: int, prefetch_bytes: int, max_size: int
    ) -> None:
        self._io = connection
        self._prefetch = prefetch
        self._prefetch_max = prefetch_max
        self._prefetch_bytes = prefetch_bytes
        self._max_size = max_size  # max_message_size: what a new channel assumes messages are
        self._lock = threading.Lock()
        self.lanes: dict[tuple[Party, int], _Consumer] = {}
        self._epochs = itertools.count(1)
        connection.add_listener(self)

    # caller threads ------------------------------------------------------------------------

    def listen(self, src: Party, lane: int, queue: str, deliver: DeliverFn) -> _Consumer | None:
        """Register the lane's consumer; None when it was registered already."""
        with self._lock:
            if (src, lane) in self.lanes:
                return None
            c = _Consumer(src, lane, queue, deliver)
            self.lanes[(src, lane)] = c
            return c

    def start(self, c: _Consumer, wait_if: Callable[[], bool], timeout: float) -> None:
        """Start consuming; when ``wait_if()`` (connected), report the broker's refusal now."""
        self._io.post(functools.partial(self._start, c))
        if wait_if():
            c.ready.wait(timeout)
            if c.error is not None:
                raise BackendError(f"RabbitMQ: consuming {c.queue} failed: {c.error}", broker_message=c.error)

    def ack(self, deliveries: Sequence[tuple[int, Party, Any]]) -> None:
        self._io.post(functools.partial(self._do_acks, list(deliveries)))

    def make_room(self, src: Party, lane: int, held: int) -> None:
        c = self.lanes.get((src, lane))
        if c is not None:
            self._io.post(functools.partial(self._do_make_room, c, held))

    def redeliver(self, src: Party, lane: int) -> None:
        c = self.lanes.get((src, lane))
        if c is not None:
            self._io.post(functools.partial(self._do_recover, c))

    def stop_all(self) -> None:
        for c in list(self.lanes.values()):
            c.stop()  # what it still holds is unacknowledged: the broker delivers it again

    # I/O thread: connection events ---------------------------------------------------------

    def connection_opened(self) -> None:
        for c in list(self.lanes.values()):
            self._start(c)

    def connection_lost(self) -> None:
        for c in self.lanes.values():
            c.channel = None

    def shutting_down(self) -> None:
        for c in self.lanes.values():
            if c.timer is not None:
                self._io.remove_timeout(c.timer)
                c.timer = None

    # I/O thread: channels ------------------------------------------------------------------

    def _start(self, c: _Consumer) -> None:
        c.timer = None
        if not self._io.is_open or c.channel is not None:
            return
        self._io.open_channel(functools.partial(self._on_channel, c))

    def _on_channel(self, c: _Consumer, ch: Channel) -> None:
        if self._io.stopping or c.channel is not None:
            ch.close()
            return
        c.channel, c.epoch, c.recovering = ch, next(self._epochs), False
        c.qos, c.mean_size = self._prefetch, float(self._max_size)
        c.held = 0  # what the old channel delivered unacknowledged is requeued
        ch.add_on_close_callback(safe(functools.partial(self._on_closed, c)))
        # The queue was deleted under us (or similar): start over on a fresh channel.
        ch.add_on_cancel_callback(safe(lambda _frame: ch.close() if ch.is_open else None))
        # pika sends these RPCs one after another, in this order
        ch.basic_qos(prefetch_count=c.qos_limit(), global_qos=True)
        ch.queue_declare(c.queue, durable=True)
        ch.basic_consume(c.queue, safe(functools.partial(self._on_message, c)), auto_ack=False,
                         callback=safe(lambda _frame: self._on_consuming(c, ch)))  # fmt: skip

    def _on_consuming(self, c: _Consumer, ch: Channel) -> None:
        if ch is c.channel:
            c.retry = RETRY_FIRST
            c.error = None
            c.ready.set()

    def _on_message(self, c: _Consumer, ch: Channel, method: Any, props: BasicProperties, body: bytes) -> None:
        if ch is not c.channel:
            return  # a straggler from a channel we gave up
        # Deliveries made before a basic.recover took effect were requeued: their tags are void.
        epoch = -1 if c.recovering else c.epoch
        c.handoff.put(Delivery(c.src, c.lane, body, (epoch, method.delivery_tag)))
        self._adapt_qos(c, ch, len(body))

    def _adapt_qos(self, c: _Consumer, ch: Channel, size: int) -> None:
        """Keep about ``prefetch_bytes`` in flight per lane: a few big messages or many small ones.

        RabbitMQ counts prefetch in messages only. Starting from ``prefetch`` (sized for full
        messages), the count rises as small messages keep coming, which is what lets many small
        transfers stream; one big message brings it straight back down.
        """
        c.mean_size = 0.9 * c.mean_size + 0.1 * size if size < c.mean_size else float(size)
        want = max(self._prefetch, min(self._prefetch_max, int(self._prefetch_bytes // max(c.mean_size, 1.0))))
        bound = want in (self._prefetch, self._prefetch_max)
        if want != c.qos and (bound or want >= 2 * c.qos or 2 * want <= c.qos):  # hysteresis: no qos chatter
            c.qos = want
            ch.basic_qos(prefetch_count=c.qos_limit(), global_qos=True)

    def _do_make_room(self, c: _Consumer, held: int) -> None:
        ch = c.channel
        if ch is None or not ch.is_open or held <= c.held:
            return
        c.held = held
        ch.basic_qos(prefetch_count=c.qos_limit(), global_qos=True)

    def _on_closed(self, c: _Consumer, ch: Channel, exc: BaseException) -> None:
        if ch is not c.channel:
            return
        c.channel = None
        if not self._io.is_open:
            return  # the connection went: every consumer starts again when it is back
        why = reason(exc)
        if not c.ready.is_set():
            c.error = why
            c.ready.set()  # listen() reports the first failure
        log.warning("consuming %s stopped: %s; again in %.1f s", c.queue, why, c.retry)
        c.timer = self._io.call_later(c.retry, functools.partial(self._start, c))
        c.retry = min(c.retry * 2, 5.0)

    def _do_acks(self, tokens: list[tuple[int, Party, Any]]) -> None:
        for lane, src, (epoch, tag) in tokens:
            c = self.lanes.get((src, lane))
            if c is None or c.channel is None or not c.channel.is_open:
                continue
            if epoch == c.epoch and not c.recovering:  # else: requeued already, comes again
                c.channel.basic_ack(tag)

    def _do_recover(self, c: _Consumer) -> None:
        ch = c.channel
        if ch is None or not ch.is_open or c.recovering:
            if ch is None and c.timer is None:
                self._start(c)
            return
        c.recovering = True

        def recovered(_frame: Any) -> None:
            if ch is c.channel:
                c.epoch, c.recovering = next(self._epochs), False

        ch.basic_recover(requeue=True, callback=safe(recovered))
