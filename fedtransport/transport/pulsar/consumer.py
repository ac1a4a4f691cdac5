"""The receiving side of the Pulsar backend: a consumer per lane and its receive loop.

``Consumers.listen`` subscribes to a lane's topic with the party's durable Shared
subscription, from the earliest message (what was sent before the receiver subscribed is
delivered too), with a small receiver queue (``receiver_queue_size``, 1 by default: big
messages are not hoarded), on the next of the session's receive connections, and starts a
thread that hands each message to the caller. Messages are acknowledged only when the
caller says so (``ack``): a receiver that dies mid-transfer gets everything again.

``redeliver`` asks the broker to deliver the lane's unacknowledged messages again; when a
lane stays silent through a second request in a row, its consumer is replaced by a new one
on the same subscription (once per silence): what the broker holds for the subscription is
dispatched to the new consumer, which gets a lane going again that a broker stopped
dispatching to (seen with pulsar-lite). ``unsubscribe_all`` drops the party's
subscriptions, the cleanup there is without the admin API.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pulsar

from ...errors import BackendError
from ...party import Party
from ..base import BROADCAST_LANE, DeliverFn, Delivery
from .connection import PulsarClients, close_client, exiting, inside_client, retrying, subscribe
from .naming import PulsarNames

__all__ = ["BROADCAST_TO", "CONSUMER_TYPE", "Consumers"]

log = logging.getLogger("fedtransport.pulsar")

# Shared: the only type on which pulsar-lite honours redelivery requests, and a restarted
# receiver may attach before a real broker has noticed that the old one is gone.
CONSUMER_TYPE = pulsar.ConsumerType.Shared
BROADCAST_TO = "ft-to"  # property of a broadcast message: the destinations, "role:id" joined by ","
_RECEIVE_POLL_MS = 200  # how often a receive loop looks up to notice close()

_Lane = tuple[Party, int]


class Consumers:
    """The lane consumers of one session, receiving as ``me`` (see the module docstring)."""

    def __init__(
        self,
        clients: PulsarClients,
        names: PulsarNames,
        me: Party,
        options: Mapping[str, Any],
        *,
        closed: threading.Event,
    ) -> None:
        self._clients = clients
        self._names = names
        self._me = me
        self._closed = closed
        self._subscribe_timeout = float(options["subscribe_timeout"])
        self._queue_size = int(options["receiver_queue_size"])
        self._consumer_kwargs = dict(options["consumer"])
        self._lock = threading.Lock()
        self._consumers: dict[_Lane, pulsar.Consumer] = {}
        self._receivers: list[threading.Thread] = []
        self._listened: set[_Lane] = set()  # kept past close(): cleanup drops their subscriptions
        # per listened lane: how to subscribe again, and the redelivery requests since its last message
        self._subscriptions: dict[_Lane, tuple[pulsar.Client, str, dict[str, Any]]] = {}
        self._silent: dict[_Lane, int] = {}

    def listen(self, src: Party, lane: int, deliver: DeliverFn) -> None:
        key = (src, lane)
        with self._lock:
            if key in self._consumers:
                return
        client = self._clients.receive_client()
        topic = self._names.topic(src, self._me, lane)
        kwargs = {
            "consumer_type": CONSUMER_TYPE,
            "initial_position": pulsar.InitialPosition.Earliest,
            "receiver_queue_size": self._queue_size,
            **self._consumer_kwargs,
        }
        consumer = self._subscribe(client, topic, kwargs)
        with self._lock:
            self._consumers[key] = consumer
            self._listened.add(key)
            self._subscriptions[key] = (client, topic, kwargs)
        t = threading.Thread(target=self._receive_loop, args=(src, lane, deliver),
                             name=f"ft-pulsar-{src}-{lane}", daemon=True)  # fmt: skip
        self._receivers.append(t)
        t.start()

    def _subscribe(self, client: pulsar.Client, topic: str, kwargs: dict[str, Any]) -> pulsar.Consumer:
        """Subscribe, retrying for up to ``subscribe_timeout`` seconds.

        Brokers refuse a subscription for a while after a consumer of it died: a real
        Pulsar while a topic is being unloaded ("temporarily unavailable"), pulsar-lite
        until it notices the dead connection (it then rejects our consumer id as taken).
        """

        def attach() -> pulsar.Consumer:
            with inside_client():
                return subscribe(client, topic, self._names.subscription(self._me), **kwargs)

        try:
            return retrying(
                attach,
                retryable=lambda _exc: True,
                timeout=self._subscribe_timeout,
                closed=self._closed,
                note=lambda exc, delay: log.warning(
                    "subscribing to %s failed (%s); retrying in %.1f s", topic, exc, delay
                ),
            )
        except Exception as exc:
            raise BackendError(f"Pulsar: subscribing to {topic} failed: {exc}", broker_message=str(exc)) from exc

    def _receive_loop(self, src: Party, lane: int, deliver: DeliverFn) -> None:
        key = (src, lane)
        while not self._closed.is_set() and not exiting():  # at exit: out of the client, promptly
            consumer = self._consumers.get(key)
            if consumer is None:  # dropped by cleanup
                return
            try:
                with inside_client():
                    msg = consumer.receive(timeout_millis=_RECEIVE_POLL_MS)
            except pulsar.Timeout:
                continue
            except Exception as exc:  # closed: by the session (the loop ends), or replaced (it goes on)
                if exiting():
                    return
                if self._closed.is_set() or self._consumers.get(key) is consumer:
                    if not self._closed.is_set():
                        log.warning("receiving from %s lane %d stopped: %s", src, lane, exc)
                    return
                continue
            self._silent[key] = 0
            if lane >= BROADCAST_LANE and not self._addressed_to_me(msg):
                self._skip(consumer, msg)  # another destination's broadcast, on the source's shared topic
                continue
            deliver(Delivery(src, lane, msg.data(), msg.message_id()))

    def _addressed_to_me(self, msg: pulsar.Message) -> bool:
        """Whether a broadcast message's ``ft-to`` property names this party."""
        return str(self._me) in msg.properties().get(BROADCAST_TO, "").split(",")

    def _skip(self, consumer: pulsar.Consumer, msg: pulsar.Message) -> None:
        try:
            with inside_client():
                consumer.acknowledge(msg)
        except Exception as exc:  # delivered again, and skipped again (or the process is exiting)
            log.debug("acknowledging a broadcast for others failed: %s", exc)

    def ack(self, deliveries: Sequence[tuple[int, Party, Any]]) -> None:
        for lane, src, msg_id in deliveries:
            consumer = self._consumers.get((src, lane))
            if consumer is None:
                continue
            try:
                with inside_client():
                    consumer.acknowledge(msg_id)
            except Exception as exc:
                raise BackendError(f"acknowledging on lane {lane} from {src} failed: {exc}") from exc

    def redeliver(self, src: Party, lane: int) -> None:
        key = (src, lane)
        consumer = self._consumers.get(key)
        if consumer is None or self._closed.is_set() or exiting():
            return
        silent = self._silent[key] = self._silent.get(key, 0) + 1
        if silent != 2:  # the second request in a row without a message: a new consumer, once
            with inside_client():
                consumer.redeliver_unacknowledged_messages()
            return
        client, topic, kwargs = self._subscriptions[key]
        log.info("lane %d from %s is still silent: subscribing again to %s", lane, src, topic)
        try:
            fresh = self._subscribe(client, topic, kwargs)
        except BackendError as exc:
            log.warning("subscribing again to %s failed: %s", topic, exc)
            return
        with self._lock:
            replaced = self._consumers.get(key) is consumer  # else closed or cleaned up meanwhile
            if replaced:
                self._consumers[key] = fresh
        if not replaced:
            with inside_client():
                fresh.close()
            return
        # Its unacknowledged messages go back to the subscription: the fresh consumer gets them,
        # and acknowledgements of what it delivered before, refused now, only bring duplicates.
        try:
            with inside_client():
                consumer.close()
        except Exception as exc:
            log.debug("closing the replaced consumer of %s: %s", topic, exc)

    def stop(self) -> None:
        """At close (the closed event is set): let the receive loops end, forget the consumers;
        closing their clients closes them."""
        for t in self._receivers:
            t.join(timeout=5)
        with self._lock:
            self._consumers.clear()

    def forget_subscriptions(self) -> None:
        """The subscriptions went with the job's topics: re-attaching would recreate them."""
        with self._lock:
            self._listened.clear()

    def unsubscribe_all(self) -> None:
        """Drop this party's durable subscriptions on every lane it received on."""
        with self._lock:
            lanes = sorted(self._listened)
            open_consumers = dict(self._consumers)
            self._consumers.clear()
            self._listened.clear()
        if not lanes:
            return
        subscription = self._names.subscription(self._me)
        client = None
        try:
            for src, lane in lanes:
                topic = self._names.topic(src, self._me, lane)
                consumer = open_consumers.get((src, lane))
                try:
                    if consumer is None:  # the session is closed: attach once more to drop it
                        if client is None:
                            client = self._clients.new(str(self._clients.service_url))
                        with inside_client():
                            consumer = client.subscribe(topic, subscription, consumer_type=CONSUMER_TYPE)
                    with inside_client():
                        consumer.unsubscribe()
                except Exception as exc:
                    log.warning("could not drop the subscription on %s: %s", topic, exc)
        finally:
            if client is not None:
                close_client(client)
