"""Apache Pulsar backend: pulsar-client data plane, Pulsar admin REST v2 control plane.

Features
    * Topics ``persistent://{tenant}/{job_id}/{src_role}-{src_id}-{dst_role}-{dst_id}-{lane}``:
      parties x lanes per job, never one per variable or partition. In ``shared`` and
      ``replication`` modes a broadcast (fedtransport/broadcast.py) is published once on
      ``{src_role}-{src_id}-all-{lane}`` with the property ``ft-to`` naming its destinations
      (replication: on our cluster, every destination's cluster a replication cluster of the
      message); each destination reads that topic on its own subscription (its own cluster's
      copy) and skips (acknowledges) what is not addressed to it. ``direct`` cannot: each
      destination reads its own broker, which only the sender can write to.
    * One ``pulsar.Client`` per broker the session talks to; producers and consumers are
      cached per lane. ``send_async`` with a bounded in-flight window (``send_window``);
      ``remote`` returns once every receipt is in.
    * A durable Shared subscription per receiving party, from the earliest message, so
      what was sent before the receiver subscribed is delivered too. That needs the
      namespace to retain messages nobody is subscribed to yet: the control plane sets
      retention when ``admin_url`` is given (pulsar-lite retains by itself); without it,
      configure retention on the broker. Messages are acknowledged only once their
      transfer is handed to the caller: a receiver that dies mid-transfer gets
      everything again.
    * Receive lanes are spread over ``receive_connections`` connections of their own
      (lane ``i`` of those this session listens on uses connection ``i % n``), apart from
      the producers' connection. pulsar-lite stops dispatching now and then to one of
      several consumers that share a TCP connection (measured: 4 consumers on one
      connection stalled a 256 MiB transfer for a 60 s receive timeout in 9 of 20 runs,
      one connection each in 0 of 20); on a real broker separate connections let a large
      transfer's lanes be served by more than one broker I/O thread.
    * Small receiver queues (``receiver_queue_size`` 1): big messages are not hoarded,
      and brokers that stall or duplicate with deeper queues (pulsar-lite, see
      docs/backends.md) stay correct; the framing layer drops duplicates and the
      inbox's watchdog asks for redelivery when a transfer stops making progress.
      When a lane stays silent through a second request in a row, its consumer is
      replaced by a new one on the same subscription (once per silence): what the
      broker holds for the subscription is dispatched to the new consumer, which gets
      a lane going again that a broker stopped dispatching to (seen with pulsar-lite).
    * Modes: ``shared`` (every party on one broker), ``direct`` (produce to the
      destination's broker from the route table, consume from our own; a producer waits
      up to ``subscribe_timeout`` for the destination to make the namespace there),
      ``replication`` (produce to our own cluster with ``replication_clusters=[the
      destination's cluster]`` on every message; clusters registered from the route table;
      every party makes the job namespace on its own cluster, sessions only ever add
      replication clusters to it, and a lane's first message waits until the broker's
      replicator to the destination exists: a replicator starts at the end of its topic).
    * Control plane (whenever ``admin_url`` is given; required in replication mode):
      tenant, cluster registrations (PUT, then POST when they exist), the job namespace
      with its replication clusters, topic auto-creation (on, non-partitioned), retention
      and message TTL as a safety net, an optional publish-rate limit; ``cleanup()`` turns
      auto-creation off (connected clients would re-create deleted topics), deletes the
      job's topics (partitioned ones too) and namespace.
      Without ``admin_url``, ``cleanup()`` drops this party's subscriptions.
    * ``keep_message_buffers`` (default on): glibc's malloc keeps message-sized buffers in
      its heap for reuse, process-wide, once (``transport/allocator.py``, docs/pulsar.md).
    * TLS (``pulsar+ssl://``, trust certs, hostname validation) and JWT tokens, for the
      data plane and the admin calls alike. ``connect()`` sends the broker one CONNECT of
      its own first (``probe``): a token the broker refuses, or a missing one, is a
      ``BackendError`` saying "authentication failed" at once, where pulsar-client would
      retry until its operation timeout and report ``Timeout``.

Connection options (``options=`` of ``Federation.connect``)
    Declared with their types, ranges and defaults in ``options.py`` (``PULSAR_OPTIONS``); the
    ``pulsar`` table of docs/backends.md is generated from that spec.

Errors
    ``BackendError`` carrying pulsar-client's result or the admin API's reason ("authentication
    failed" for a refused or missing token on either plane);
    ``ConfigError`` for inconsistent options; ``RouteError`` for a party the route table
    cannot resolve.

Modules of this package (each imports only modules listed below it)
    ``__init__``    ``PulsarTransport``: options, open and close, wiring the parts below
    ``doctor``      what ``fedtransport doctor`` checks on a broker; cleanup's target
    ``management``  the control plane: tenant, namespace and its policies, replication
                    clusters and peer registration, waiting for replicators, inventory, cleanup
    ``publisher``   producers per lane, the send window of receipts, producer replacement
    ``presence``    the session's presence producer; is a peer connected right now?
    ``consumer``    lane consumers: subscribe, the receive loops, ack, redeliver
    ``connection``  the pulsar-client connections, their log, the credentials check
    ``admin``       ``PulsarAdmin``, the admin REST v2 client (and reading a token)
    ``probe``       one CONNECT of our own on the binary protocol: the broker's verdict on a token
    ``naming``      names of the job's namespace, topics and subscriptions
    ``options``     the option spec: every key's type, range, default and doc line
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any, ClassVar

from ...errors import BackendError, ConfigError, RouteError
from ...options import OptionSpec
from ...party import Party
from ...routing import url_host
from ..allocator import keep_message_buffers
from ..base import DeliverFn, JobContext
from .admin import PulsarAdmin
from .connection import PulsarClients, check_credentials, inside_client, pulsar_call
from .consumer import BROADCAST_TO, Consumers
from .doctor import PulsarOperatorHooks
from .management import PulsarManagement
from .naming import PulsarNames
from .options import IPV6_UNSUPPORTED, PULSAR_OPTIONS, is_ipv6_literal
from .presence import Presence
from .publisher import Publisher

__all__ = ["PulsarAdmin", "PulsarManagement", "PulsarNames", "PulsarTransport"]

log = logging.getLogger("fedtransport.pulsar")


class PulsarTransport(PulsarOperatorHooks):
    """The ``pulsar`` backend (see the module docstring); doctor and cleanup hooks in doctor.py."""

    name: ClassVar[str] = "pulsar"
    option_defaults: ClassVar[OptionSpec] = PULSAR_OPTIONS
    submits_without_waiting: ClassVar[bool] = True  # a lane's receipts settle its submits

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(ctx)
        # Checked by split_options already; again here (idempotent) for a context made by hand.
        o = PULSAR_OPTIONS.validate(ctx.options, "backend 'pulsar'")
        self.mode: str = o["mode"]
        self._keep_message_buffers = bool(o["keep_message_buffers"])
        self._check_options(o)
        self.tenant = str(o["tenant"])
        self.namespace = ctx.job_id
        self.cluster: str = o["cluster"] or (
            ctx.route_table.cluster_name(ctx.party) if ctx.route_table else "standalone"
        )
        self.names = PulsarNames(self.tenant, self.namespace, ctx.lane_offset)
        self._closed = threading.Event()
        self.clients = PulsarClients(o, o["service_url"])
        self.management = PulsarManagement(
            self.names, o, mode=self.mode, cluster=self.cluster, route_table=ctx.route_table, closed=self._closed
        )
        self.publisher = Publisher(
            self.clients,
            self.names,
            ctx.party,
            o,
            closed=self._closed,
            produce_url=self._produce_url,
            wait_for_namespace=self.mode == "direct",
            # A replicator starts at the end of its topic: the lane's first message waits for it.
            on_new_producer=self.management.await_replicator if self.mode == "replication" else None,
        )
        self.consumers = Consumers(self.clients, self.names, ctx.party, o, closed=self._closed)
        # In direct and replication modes a peer's presence is on its own broker, not ours.
        self.presence = Presence(self.clients, self.names, o, usable=self.mode == "shared")

    def _check_options(self, o: dict[str, Any]) -> None:
        """What depends on more than one option; each value was checked by ``PULSAR_OPTIONS``."""
        if self.mode != "shared" and self.ctx.route_table is None:
            raise ConfigError(f"Pulsar mode {self.mode!r} needs a route_table to find the other parties")
        if self.mode == "replication" and not o["admin_url"]:
            raise ConfigError("Pulsar replication mode needs 'admin_url' to register clusters and the namespace")
        if self.mode != "shared" and not o["service_url"]:
            raise ConfigError(f"Pulsar mode {self.mode!r} needs 'service_url' (this party's own broker)")

    # naming (see naming.py) ----------------------------------------------------------------

    def topic(self, src: Party, dst: Party, lane: int) -> str:
        return self.names.topic(src, dst, lane)

    subscription = staticmethod(PulsarNames.subscription)

    # lifecycle -----------------------------------------------------------------------------

    def open(self) -> None:
        if self._keep_message_buffers:  # process-wide, once (allocator.py); pulsar-client's buffers too
            keep_message_buffers(self.ctx.max_message_size)
        if self.clients.service_url is None:
            from ...brokers.pulsar import shared_embedded_pulsar

            self.clients.service_url = shared_embedded_pulsar().service_url
            log.info("no service_url: using the embedded broker at %s", self.clients.service_url)
        url = self.clients.service_url
        if self.management.enabled:
            self.management.setup_namespace()
        # One round trip now, so a wrong URL, certificate or token fails connect(), not the first send.
        note = check_credentials(url, self.ctx.options)
        own = self.topic(self.ctx.party, self.ctx.party, 0)
        client = self.clients.client(url)
        with inside_client():
            pulsar_call(f"reaching {url}{note}", lambda: client.get_topic_partitions(own))
        self.presence.announce(self.ctx.party, url)  # every session: Spark's tasks' too

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self.consumers.stop()
        self.publisher.close()
        self.clients.close()  # closes its producers and consumers too

    def cleanup(self) -> None:
        if self.management.enabled:
            self.management.cleanup()
            self.consumers.forget_subscriptions()
        # Without the admin API only subscriptions can be dropped, so a broker that keeps
        # topics keeps no backlog for them.
        self.consumers.unsubscribe_all()

    # data plane ----------------------------------------------------------------------------
    # Only replication mode reaches into the control plane here: a destination's cluster is
    # registered on the first send to it, and a lane's first producer waits for its replicator,
    # as the job's parties and lanes are known only then.

    def _produce_url(self, dst: Party) -> str:
        url = self.clients.service_url
        assert url is not None
        if self.mode != "direct":
            return url
        assert self.ctx.route_table is not None
        ep = self.ctx.route_table.resolve(dst)
        if is_ipv6_literal(ep.host):
            raise RouteError(f"route table {self.ctx.route_table.source}: party {dst.party_id}'s host {ep.host}: "
                             f"{IPV6_UNSUPPORTED}")  # fmt: skip
        if url.startswith("pulsar+ssl://"):
            if ep.ssl_port is None:
                raise RouteError(f"route table {self.ctx.route_table.source}: party {dst.party_id} has no sslPort")
            return f"pulsar+ssl://{url_host(ep.host)}:{ep.ssl_port}"
        return f"pulsar://{url_host(ep.host)}:{ep.port}"

    def send(self, dst: Party, lane: int, messages: Iterable[bytes]) -> int:
        if self._closed.is_set():
            raise BackendError("the Pulsar transport is closed")
        cluster = self.management.ensure_peer(dst)  # first: a topic made before would start unreplicated
        return self.publisher.send(dst, lane, messages, replicate_to=[cluster] if cluster else None)

    def submit(self, dst: Party, lane: int, message: bytes) -> Future[int] | None:
        if self._closed.is_set():
            raise BackendError("the Pulsar transport is closed")
        if not self.management.peer_ready(dst):
            return None  # replication mode's first send to dst registers its cluster (admin API)
        cluster = self.management.ensure_peer(dst)  # known by now: no admin call
        return self.publisher.submit(dst, lane, message, [cluster] if cluster else None)

    @property
    def submit_patience(self) -> float:
        return self.publisher.receipt_patience

    def can_broadcast(self, dsts: Sequence[Party]) -> bool:
        # Direct mode: each destination reads its own broker, and nothing but the sender moves
        # data between brokers, so one publish cannot reach them all (docs/pulsar.md, "Modes").
        return self.mode in ("shared", "replication")

    def send_broadcast(self, dsts: Sequence[Party], lane: int, messages: Iterable[bytes]) -> int:
        if self._closed.is_set():
            raise BackendError("the Pulsar transport is closed")
        to = {BROADCAST_TO: ",".join(str(d) for d in dsts)}
        clusters: list[str] | None = None
        if self.mode == "replication":
            # Stored once on our cluster; the replicators copy it to each destination's cluster.
            clusters = sorted({c for d in dsts if (c := self.management.ensure_peer(d))})
            self.publisher.producer(self.ctx.party, lane)  # the topic first: replicators attach to it
            self.management.await_replicating(self.topic(self.ctx.party, self.ctx.party, lane), clusters)
        return self.publisher.send(self.ctx.party, lane, messages, replicate_to=clusters, properties=to)

    def listen(self, src: Party, lane: int, deliver: DeliverFn) -> None:
        self.consumers.listen(src, lane, deliver)

    def last_stored(self, dst: Party, lane: int) -> bytes | None:
        """Through the admin API, in shared mode only: in the other modes the lane's topic the
        receiver reads is on another broker (its own, or a replica)."""
        if self.mode != "shared" or not self.management.enabled:
            return None
        topic = self.topic(self.ctx.party, dst, lane)
        return self.management.admin().last_unacked_message(topic, self.subscription(dst))

    def ack(self, deliveries: Sequence[tuple[int, Party, Any]]) -> None:
        self.consumers.ack(deliveries)

    def redeliver(self, src: Party, lane: int) -> None:
        self.consumers.redeliver(src, lane)

    def peer_present(self, party: Party) -> bool | None:
        return None if self._closed.is_set() else self.presence.present(party)

    def describe(self) -> str:
        return f"pulsar {self.mode} via {self.clients.service_url}"
