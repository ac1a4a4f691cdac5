"""The sending side of the Pulsar backend: producers per lane and the send window.

``Publisher.send`` publishes one lane's messages with ``send_async`` and a bounded window of
unconfirmed ones (``_Receipts``: at most ``send_window`` messages and ``send_window_bytes``
in flight), and returns once the broker has confirmed every one. Producers are made on a
lane's first send and kept (batching off: messages are already up to 4 MiB). When receipts
stop coming for longer than the client's own ``send_timeout`` allows, what is unconfirmed is
published once more on a new producer (the receiver drops duplicates); a refusal is a
``BackendError`` with pulsar-client's result.

``submit`` publishes one message on a lane whose producer exists and returns a future that its
receipt settles; it declines (``None``) while the lane has ``SUBMIT_ROOM`` submits in flight, so
that ``send_async`` never waits for room on the caller's event loop.

In direct mode a producer waits, up to ``subscribe_timeout``, for the destination to make
the job namespace on its broker. In replication mode the transport hands in
``on_new_producer``, which waits until the broker replicates the new topic (see
``management``): this module makes no admin calls of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any

import pulsar

from ...errors import BackendError
from ...party import Party
from .connection import PulsarClients, bounded, create_producer, inside_client, pulsar_call, retrying
from .naming import PulsarNames

__all__ = ["Publisher"]

log = logging.getLogger("fedtransport.pulsar")

_RECEIPT_PATIENCE = 1.5  # × send_timeout without any receipt before the missing ones count as lost
SUBMIT_ROOM = 1024  # submits in flight per lane; the producer's queue has this much room beyond send_window


class _Receipts:
    """The messages of one ``send`` that the broker has not confirmed, and the window over them:
    at most ``max_count`` messages and ``max_bytes`` in flight. A wait gives up (``lost``) when
    no receipt came for ``patience`` seconds; ``renew`` then hands back what is unconfirmed, and
    only receipts of the newest round count as failures (an older round may still answer Ok).
    """

    def __init__(self, max_count: int, max_bytes: int, patience: float) -> None:
        self._cond = threading.Condition()
        self._max_count, self._max_bytes, self._patience = max_count, max_bytes, patience
        self._unconfirmed: dict[int, bytes] = {}
        self._bytes = 0
        self._receipts = 0  # receipts so far: progress restarts the patience
        self._round = 0
        self._next_key = 0
        self.failure = ""
        self.lost = False

    def reserve(self, msg: bytes) -> int:
        with self._cond:
            key, self._next_key = self._next_key, self._next_key + 1
            self._unconfirmed[key] = msg
            self._bytes += len(msg)
            return key

    def callback(self, key: int) -> Callable[[pulsar.Result, Any], None]:
        round_ = self._round

        def receipt(result: pulsar.Result, _msg_id: Any) -> None:
            with self._cond:
                self._receipts += 1
                if result == pulsar.Result.Ok:
                    self._settle(key)
                elif round_ == self._round and key in self._unconfirmed:
                    self._settle(key)
                    self.failure = self.failure or str(result)
                self._cond.notify_all()

        return receipt

    def refuse(self, key: int, reason: str) -> None:
        with self._cond:
            self._settle(key)
            self.failure = self.failure or reason

    def _settle(self, key: int) -> None:
        msg = self._unconfirmed.pop(key, None)
        if msg is not None:
            self._bytes -= len(msg)

    def renew(self) -> list[tuple[int, bytes]]:
        """Start a new round: the unconfirmed messages, to be published again."""
        with self._cond:
            self._round += 1
            self.lost = False
            return sorted(self._unconfirmed.items())

    def wait_for_room(self, size: int) -> bool:
        """Wait until one more message of ``size`` bytes fits; False on a failure or a loss."""
        return self._wait(
            lambda: (
                bool(self._unconfirmed)
                and (len(self._unconfirmed) >= self._max_count or self._bytes + size > self._max_bytes)
            )
        )

    def wait_for_all(self) -> bool:
        """Wait until every message is confirmed; False on a failure or a loss."""
        return self._wait(lambda: bool(self._unconfirmed))

    def _wait(self, busy: Callable[[], bool]) -> bool:
        with self._cond:
            seen, deadline = self._receipts, time.monotonic() + self._patience
            while busy() and not self.failure:
                if self._receipts != seen:
                    seen, deadline = self._receipts, time.monotonic() + self._patience
                left = deadline - time.monotonic()
                if left <= 0:
                    self.lost = True
                    return False
                self._cond.wait(left)
            return not self.failure


class Publisher:
    """The producers of one session, one per (destination, lane), and ``send``.

    ``produce_url(dst)`` is the broker a lane towards ``dst`` is produced on; with
    ``wait_for_namespace`` (direct mode) a producer waits for the destination's namespace;
    ``on_new_producer(dst, topic)`` runs once a producer exists, before its first message.
    """

    def __init__(
        self,
        clients: PulsarClients,
        names: PulsarNames,
        me: Party,
        options: Mapping[str, Any],
        *,
        closed: threading.Event,
        produce_url: Callable[[Party], str],
        wait_for_namespace: bool,
        on_new_producer: Callable[[Party, str], None] | None,
    ) -> None:
        self._clients = clients
        self._names = names
        self._me = me
        self._closed = closed
        self._produce_url = produce_url
        self._wait_for_namespace = wait_for_namespace
        self._on_new_producer = on_new_producer
        self._send_timeout = float(options["send_timeout"])
        self._subscribe_timeout = float(options["subscribe_timeout"])
        self._window = int(options["send_window"])
        self._window_bytes = int(options["send_window_bytes"])
        self._producer_kwargs = dict(options["producer"])
        self._lock = threading.Lock()
        self._producers: dict[tuple[Party, int], pulsar.Producer] = {}
        self._submitting: dict[tuple[Party, int], int] = {}  # submits in flight per lane
        #: how long an unsettled submit may wait for its receipt (the caller bounds the wait)
        self.receipt_patience = self._send_timeout * _RECEIPT_PATIENCE

    def close(self) -> None:
        """Forget the producers; closing their clients closes them."""
        with self._lock:
            self._producers.clear()

    def send(
        self,
        dst: Party,
        lane: int,
        messages: Iterable[bytes],
        replicate_to: Sequence[str] | None,
        properties: dict[str, str] | None = None,
    ) -> int:
        """Publish ``messages`` on the lane towards ``dst``; with ``replicate_to``, every message
        names those clusters as its only replication clusters; ``properties`` go on every message.
        Returns the count once all are in."""
        producer = self.producer(dst, lane)
        # The client fails a message send_timeout after it was queued, so a receipt is due by then.
        patience = self._send_timeout * _RECEIPT_PATIENCE
        receipts = _Receipts(self._window, self._window_bytes, patience)
        extra: dict[str, Any] = {"replication_clusters": list(replicate_to)} if replicate_to else {}
        if properties:
            extra["properties"] = properties
        resent = False
        count = 0

        def publish(key: int, msg: bytes) -> bool:
            try:
                with inside_client():  # blocks while the client's own queue is full
                    producer.send_async(msg, receipts.callback(key), **extra)
            except Exception as exc:
                receipts.refuse(key, str(exc))
                return False
            return True

        def send_again() -> bool:
            """After a loss, once: a new producer publishes what was not confirmed."""
            # A receipt lost by the client (seen once across a broker restart) must not hang the
            # transfer; the receiver drops whatever arrives twice.
            nonlocal resent, producer
            if receipts.failure or resent:
                return False
            resent, producer = True, self._replace_producer(dst, lane, producer)
            return all(publish(key, msg) for key, msg in receipts.renew())

        for msg in messages:
            while not receipts.wait_for_room(len(msg)):
                if not send_again():
                    break
            if receipts.failure or receipts.lost:
                break
            if not publish(receipts.reserve(msg), msg):
                break
            count += 1
        while not receipts.wait_for_all():
            if not send_again():
                break
        lost = f"no receipt within {patience:g} s ({_RECEIPT_PATIENCE:g} × send_timeout)" if receipts.lost else ""
        failure = receipts.failure or lost
        if failure:
            raise _refused(self._names.topic(self._me, dst, lane), failure)
        return count

    def submit(self, dst: Party, lane: int, message: bytes, replicate_to: Sequence[str] | None) -> Future[int] | None:
        """Publish one message on an existing producer without waiting: a future settled by its
        receipt. ``None`` when the lane has no producer yet (making one waits for the broker) or
        ``SUBMIT_ROOM`` submits in flight; the caller then uses ``send``."""
        key = (dst, lane)
        producer = self._producers.get(key)
        if producer is None:
            return None
        with self._lock:
            if self._submitting.get(key, 0) >= SUBMIT_ROOM:
                return None
            self._submitting[key] = self._submitting.get(key, 0) + 1
        future: Future[int] = Future()
        topic = self._names.topic(self._me, dst, lane)
        settled = False

        def release() -> bool:
            """Give back the lane's room, once: at the receipt, a refusal or the caller giving up."""
            nonlocal settled
            with self._lock:
                if settled:
                    return False
                settled = True
                self._submitting[key] -= 1
                return True

        def receipt(result: pulsar.Result, _msg_id: Any) -> None:
            if not release():
                return  # refused by send_async and called back as well, or given up on
            try:
                if result == pulsar.Result.Ok:
                    future.set_result(1)
                else:
                    future.set_exception(_refused(topic, str(result)))
            except InvalidStateError:  # cancelled meanwhile
                pass

        # Cancelled (the caller's receipt_patience ran out): a lost receipt must not keep its room.
        future.add_done_callback(lambda f: f.cancelled() and release())

        extra: dict[str, Any] = {"replication_clusters": list(replicate_to)} if replicate_to else {}
        try:
            with inside_client():
                producer.send_async(message, receipt, **extra)
        except Exception as exc:
            receipt(pulsar.Result.UnknownError, None)  # frees the room; nobody holds the future
            raise _refused(topic, str(exc)) from exc
        return future

    def producer(self, dst: Party, lane: int) -> pulsar.Producer:
        """The lane's producer, made (and its topic with it) on first use."""
        key = (dst, lane)
        producer = self._producers.get(key)
        if producer is not None:
            return producer
        client = self._clients.client(self._produce_url(dst))
        topic = self._names.topic(self._me, dst, lane)
        kwargs = {
            "send_timeout_millis": int(self._send_timeout * 1000),
            "max_pending_messages": self._window + SUBMIT_ROOM,  # each send keeps to its own window
            "block_if_queue_full": True,
            "batching_enabled": False,  # messages are already up to 4 MiB; batching would only add latency
            **self._producer_kwargs,
        }
        producer = pulsar_call(f"creating a producer on {topic}", lambda: self._create_producer(client, topic, kwargs))
        if self._on_new_producer is not None:
            self._on_new_producer(dst, topic)
        with self._lock:
            self._producers.setdefault(key, producer)
            return self._producers[key]

    def _create_producer(self, client: pulsar.Client, topic: str, kwargs: dict[str, Any]) -> pulsar.Producer:
        """In direct mode the topic is in the destination's namespace on its broker, which the
        destination makes when it connects: until then Pulsar answers TopicNotFound ("Namespace
        not found"). Wait for it, up to ``subscribe_timeout`` seconds."""
        # Bounded by send_timeout, the bound of the whole send: pulsar-client would wait for its
        # operation timeout (30 s) when the broker does not answer.
        return retrying(
            lambda: bounded(
                lambda: create_producer(client, topic, **kwargs),
                self._send_timeout,
                f"no answer from the broker within send_timeout ({self._send_timeout:g} s)",
                late=_close_quietly,
            ),
            retryable=lambda exc: self._wait_for_namespace and isinstance(exc, pulsar.exceptions.TopicNotFound),
            timeout=self._subscribe_timeout,
            closed=self._closed,
            note=lambda _exc, delay: log.info(
                "no namespace for %s on the destination's broker yet; retrying in %.1f s", topic, delay
            ),
        )

    def _replace_producer(self, dst: Party, lane: int, old: pulsar.Producer) -> pulsar.Producer:
        """A new producer for the lane, in place of ``old`` in the cache. ``old`` stays open (its
        client closes it): another transfer on the lane may still be waiting on its receipts."""
        log.warning(
            "Pulsar: receipts missing on %s lane %d past send_timeout; sending again on a new producer", dst, lane
        )
        with self._lock:
            if self._producers.get((dst, lane)) is old:
                del self._producers[(dst, lane)]
        return self.producer(dst, lane)


def _refused(topic: str, why: str) -> BackendError:
    return BackendError(f"Pulsar refused a message on {topic}: {why}", broker_message=why)


def _close_quietly(producer: pulsar.Producer) -> None:
    """A producer made after its send gave up waiting for it: nobody will use it."""
    try:
        producer.close()
    except Exception as exc:
        log.debug("closing a producer made too late: %s", exc)
