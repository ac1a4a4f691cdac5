"""RabbitMQ backend: pika data plane, management HTTP API control plane.

Features
    * A virtual host per job, ``{vhost_prefix}{job_id}``, and a user per party and job,
      ``{vhost}:{role}:{party_id}``, whose permissions cover only that vhost and, inside it,
      only the party's own queues and exchange (configure), its exchange
      ``{job_id}:{role}:{party_id}``, to which only its outgoing queues are bound (write: it
      cannot publish into another pair's queue), and the queues addressed to it (read). The data plane connects
      as that user, never as the admin. Its password is derived from the admin password
      (HMAC-SHA256), so every process of a party (Spark executors, a restarted receiver)
      computes the same one without storing it.
    * Queues ``{job_id}:{src_role}:{src_id}:{dst_role}:{dst_id}:{lane}``: parties x lanes per
      job, never one per variable or partition. Broadcast lanes (fedtransport/broadcast.py) are
      ``...:{dst_role}:{dst_id}:b{lane}``: a broadcast is published once to the first
      destination's queue with a ``CC`` header naming the others', and stored once. ``:``
      cannot occur in job ids, roles or party ids, so a name maps back to exactly one (src,
      dst, lane). Durable queues, persistent messages (delivery mode 2). The sender declares
      the destination queue too, so what is sent before the receiver listens is kept.
    * Publisher confirms with a bounded window (``send_window`` unconfirmed messages per
      ``send``): the sender blocks on the window, never buffers a lazy message stream, and
      ``send`` returns once every message is confirmed. A nack, a returned (unroutable)
      message or a channel error raises ``BackendError`` with the broker's reply text.
      ``submit`` (one message) returns at once, its future settled by the I/O thread at the
      confirm or failure, or after ``send_timeout`` without one.
    * Consumers with manual acknowledgement and a per-lane prefetch (the channel's qos), one
      channel per (source, lane), each handing its deliveries to a thread of its own so that
      checking and placing messages runs in parallel across lanes, off pika's I/O thread.
      The qos adapts to message sizes (``prefetch_bytes``) and grows by what the receiver
      holds unacknowledged (``make_room``), so a lane never stalls behind data nobody asked
      for yet and nothing is acknowledged before its transfer is handed over
      (``max_unacked_per_lane`` is ``prefetch``). ``redeliver`` is ``basic.recover(requeue=True)``
      on that lane's channel; acknowledgements of deliveries made before it are dropped
      (their messages come again and are deduplicated above). No cancel-and-requeue per get.
    * One connection per session, owned by one I/O thread running pika's asynchronous
      ``SelectConnection`` IOLoop: every channel operation happens on that thread; ``send``,
      ``ack``, ``listen`` and ``redeliver`` hand work over with ``add_callback_threadsafe``.
    * Reconnects with bounded exponential back-off when the connection drops (node
      restarted): channels, queues and consumers come back and unconfirmed messages are
      published again (duplicates are dropped by the framing layer). A ``send`` that sees no
      confirm for ``send_timeout`` seconds raises ``BackendError`` naming the last
      connection problem.
    * Modes: ``shared`` (every party on one broker) and ``federated``: each party declares
      its queues on its own broker and publishes there; the receiving broker pulls with the
      federation plugin. Per job and remote party, the receiver creates one upstream
      ``from:{role}:{party_id}`` (URI from the route table, ``ack-mode: on-confirm``, bounded
      ``prefetch-count``) and one policy ``federate:{role}:{party_id}`` matching the queues
      from that party to itself. Parties behind an SNI proxy (route table ``proxy``) are
      reached with ``amqps://proxy?...&server_name_indication={party host}``.
    * Upstream credentials: with a job ``secret`` (the common option every party sets for
      sealing), the sender creates on its own broker, per receiving party, a link user
      ``{vhost}:link:{src_role}:{src_id}:{dst_role}:{dst_id}`` that may only read (and
      declare) the queues towards that party; both sides derive its password from the
      secret (HMAC-SHA256), so no admin credential leaves a party. With pair keys
      (``identity``), the password comes from the pair key of the two parties instead
      (fedtransport/identity.py), so a third party of the job cannot compute it. Without either, the
      upstream uses the remote broker's admin credentials from ``peer_credentials``, else
      this party's own admin ``user``/``password`` (FATE's convention of one admin account
      on every broker); a warning says so.
    * TLS: ``ssl`` gives an ``ssl.SSLContext`` (CA, optional client certificate) with host
      name checking against ``server_hostname``; federation upstreams use ``amqps://`` with
      ``verify_peer`` and ``server_name_indication``.
    * ``ttl_seconds``: a policy expires queues unused for that long, the safety net for a
      scheduler that never calls cleanup. ``cleanup()`` (idempotent, also after ``close()``)
      deletes the job's policies, upstreams, vhost and users (its own and every job user
      with permissions on the vhost) on this party's broker.

Connection options (``options=`` of ``Federation.connect``)
    Declared with their types, ranges and defaults in ``options.py`` (``RABBITMQ_OPTIONS``);
    the ``rabbitmq`` table of docs/backends.md is generated from that spec. ``secret``,
    ``identity`` and ``peer_keys`` are common options, also read here (see above).

Errors
    ``BackendError`` carrying the broker's reply text (connection refused, access refused,
    TLS failures, nacks, returns, channel errors) or the management API's status and reason;
    ``ConfigError`` for inconsistent options; ``RouteError`` for a party the route table
    cannot resolve or reach.

Modules of this package (each imports only modules listed below it)
    ``__init__``    ``RabbitTransport``: options, naming, wiring the parts below
    ``doctor``      what ``fedtransport doctor`` checks on a node; cleanup's inventory
    ``management``  the control plane: vhost, users, permissions, federation upstreams and
                    policies, expiry, inventory, cleanup
    ``admin``       ``RabbitAdmin``, the management HTTP API client
    ``publisher``   the confirming publish channel and the send window
    ``consumer``    lane consumers: qos, acks, recover
    ``presence``    the party's presence queue; is a peer connected right now?
    ``connection``  the pika I/O thread, posting work onto it, reconnect with back-off
    ``naming``      names of the job's queues, exchanges, users and their permission patterns
    ``options``     the option spec: every key's type, range, default and doc line
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence, Sized
from concurrent.futures import Future
from typing import Any, ClassVar

from ...errors import BackendError, ConfigError
from ...identity import pair_keys
from ...options import OptionSpec
from ...party import Party
from ..base import DeliverFn, JobContext
from .admin import DEFAULT_FEDERATION_PREFETCH, RabbitAdmin
from .connection import RabbitConnection
from .consumer import Consumers
from .doctor import RabbitOperatorHooks
from .management import RabbitManagement, derive_password
from .naming import RabbitNames
from .options import FED_SSL_KEYS, RABBITMQ_OPTIONS
from .presence import Presence
from .publisher import Publisher

__all__ = ["DEFAULT_FEDERATION_PREFETCH", "RabbitAdmin", "RabbitManagement", "RabbitNames", "RabbitTransport"]

log = logging.getLogger("fedtransport.rabbitmq")


class RabbitTransport(RabbitOperatorHooks):
    """The ``rabbitmq`` backend (see the module docstring); doctor and cleanup hooks in doctor.py."""

    name: ClassVar[str] = "rabbitmq"
    option_defaults: ClassVar[OptionSpec] = RABBITMQ_OPTIONS
    submits_without_waiting: ClassVar[bool] = True  # the I/O thread settles a submit at its confirm

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(ctx)
        # Checked by split_options already; again here (idempotent) for a context made by hand.
        o = RABBITMQ_OPTIONS.validate(ctx.options, "backend 'rabbitmq'")
        self.mode: str = o["mode"]
        self._federated = self.mode == "federated"
        ssl_settings, fed_ssl = self._tls_settings(o)
        secret: bytes | None = o["secret"]
        routes = ctx.route_table
        pairs = pair_keys(
            ctx.job_id, ctx.party, o["identity"], o["peer_keys"],
            routes.public_keys() if routes is not None else {}, secret,
            source=routes.source if routes is not None else "",
        )  # fmt: skip

        self.host: str = o["host"]
        self.port: int = o["port"]
        self.names = RabbitNames(ctx.job_id, ctx.party, f"{o['vhost_prefix']}{ctx.job_id}", ctx.lane_offset)
        self.vhost = self.names.vhost
        self.user_name = self.names.party_user(ctx.party)
        # Derived from the admin password: every process of the party computes the same one.
        self._password = derive_password(str(o["password"]).encode(), "data-user", f"{self.vhost}\0{self.user_name}")
        prefetch: int = o["prefetch"]
        # The qos of a lane only ever rises above `prefetch`, so the broker never stops short of this.
        self.max_unacked_per_lane = prefetch

        self.management = RabbitManagement(
            self.names,
            o,
            route_table=ctx.route_table,
            fed_ssl=fed_ssl,
            peer_credentials={pid: (c["user"], c["password"]) for pid, c in o["peer_credentials"].items()},
            secret=secret,
            pair_keys=pairs,
            data_user=self.user_name,
            data_password=self._password,
        )
        self.connection = RabbitConnection(
            o,
            vhost=self.vhost,
            user=self.user_name,
            password=self._password,
            ssl_settings=ssl_settings,
            job_id=ctx.job_id,
            party=ctx.party,
        )
        # Listeners in this order: after a reconnect the publisher's channel opens first.
        self.publisher = Publisher(
            self.connection,
            self.names.exchange(ctx.party),
            window=o["send_window"],
            window_bytes=o["send_window_bytes"],
            timeout=float(o["send_timeout"]),
        )
        self.consumers = Consumers(
            self.connection,
            prefetch=prefetch,
            prefetch_max=max(o["prefetch_max"], prefetch),
            prefetch_bytes=o["prefetch_bytes"],
            max_size=ctx.max_message_size,
        )

        self.presence = Presence(self.connection, self.names)

    # options -------------------------------------------------------------------------------

    def _tls_settings(self, o: dict[str, Any]) -> tuple[dict[str, str] | None, dict[str, str] | None]:
        """Check what depends on more than one option; return the TLS settings (``ssl``, federation's)."""
        if self._federated and self.ctx.route_table is None:
            raise ConfigError("RabbitMQ mode 'federated' needs a route_table to find the other parties' brokers")
        ssl_settings: dict[str, str] | None = o["ssl"]
        fed_ssl = o["federation_ssl"]
        if fed_ssl is None:  # like ssl: the broker's upstreams get its CA and client certificate
            fed_ssl = None if ssl_settings is None else {k: v for k, v in ssl_settings.items() if k in FED_SSL_KEYS}
        elif fed_ssl is False:
            fed_ssl = None
        if self._federated and fed_ssl is not None and not fed_ssl.get("ca_file"):
            raise ConfigError("federation over TLS needs 'ca_file' (in 'federation_ssl' or 'ssl') for the broker")
        return ssl_settings, fed_ssl

    # naming (see naming.py) ----------------------------------------------------------------

    def queue(self, src: Party, dst: Party, lane: int) -> str:
        return self.names.queue(src, dst, lane)

    def exchange(self, src: Party) -> str:
        return self.names.exchange(src)

    def party_user(self, party: Party) -> str:
        return self.names.party_user(party)

    def link_user(self, src: Party, dst: Party) -> str:
        return self.names.link_user(src, dst)

    upstream_name = staticmethod(RabbitNames.upstream_name)
    policy_name = staticmethod(RabbitNames.policy_name)

    # lifecycle -----------------------------------------------------------------------------

    def open(self) -> None:
        created = self.management.setup_vhost()
        try:
            self.connection.start()
        except BaseException:
            self.close()
            # A connect that fails leaves nothing behind that it made: no session will clean it.
            self.management.undo_setup(created)
            raise

    def close(self) -> None:
        if self.connection.closed:
            return
        # Sends and submits fail now, not after the wait for the I/O thread (up to 15 s).
        self.publisher.fail_all("the RabbitMQ transport was closed")
        if not self.connection.close():
            return
        self.publisher.fail_all("the RabbitMQ transport was closed")  # any submitted meanwhile
        self.consumers.stop_all()

    def cleanup(self) -> None:
        # The vhost goes away with the connection's channels: close ours first.
        self.close()
        self.management.cleanup()

    # data plane (caller threads) -----------------------------------------------------------
    # Only federated mode reaches into the control plane here: the link user for a receiving
    # party and the upstream from a sending one are made on first use, as the job's parties
    # are known only then.

    def send(self, dst: Party, lane: int, messages: Iterable[bytes]) -> int:
        if self.connection.closed:
            raise BackendError("the RabbitMQ transport is closed")
        if self._federated:
            self.management.ensure_link_user(dst)
        return self.publisher.send(self.queue(self.ctx.party, dst, lane), messages, self.ctx.max_message_size)

    def submit(self, dst: Party, lane: int, message: bytes) -> Future[int] | None:
        if self.connection.closed:
            raise BackendError("the RabbitMQ transport is closed")
        if self._federated and not self.management.link_ready(dst):
            return None  # its first send makes the link user (management API): not on an event loop
        return self.publisher.submit(self.queue(self.ctx.party, dst, lane), message, self.ctx.max_message_size)

    def can_broadcast(self, dsts: Sequence[Party]) -> bool:
        return True  # one publish with a CC header, in both modes (the publisher's broker stores it once)

    def send_broadcast(self, dsts: Sequence[Party], lane: int, messages: Iterable[bytes]) -> int:
        if self.connection.closed:
            raise BackendError("the RabbitMQ transport is closed")
        if self._federated:
            for dst in dsts:
                self.management.ensure_link_user(dst)
        queues = [self.queue(self.ctx.party, dst, lane) for dst in dsts]
        return self.publisher.send(queues, messages, self.ctx.max_message_size)

    def listen(self, src: Party, lane: int, deliver: DeliverFn) -> None:
        c = self.consumers.listen(src, lane, self.queue(src, self.ctx.party, lane), deliver)
        if c is None:
            return
        if self._federated:
            self.management.ensure_upstream(src)
        # Connected: a refusal (access, a missing queue) is reported now, not as a timeout later.
        self.consumers.start(c, self._connected, self.connection.connect_timeout)

    def _connected(self) -> bool:
        return self.connection.connected and self.publisher.ready

    def ack(self, deliveries: Sequence[tuple[int, Party, Any]]) -> None:
        if self.connection.closed or not deliveries:
            return  # what was not acknowledged is delivered again and dropped as a duplicate
        self.consumers.ack(deliveries)

    def make_room(self, src: Party, lane: int, held: int) -> None:
        if not self.connection.closed:
            self.consumers.make_room(src, lane, held)

    def redeliver(self, src: Party, lane: int) -> None:
        if self._federated and lane == 0:
            try:
                self.management.ensure_upstream(src)  # in case listen() could not create it
            except BackendError as exc:
                log.warning("federation from %s cannot be set up: %s", src, exc)
            self.management.warn_about_links(src)
        if not self.connection.closed:
            self.consumers.redeliver(src, lane)

    def peer_present(self, party: Party) -> bool | None:
        if self._federated or self.connection.closed:
            return None  # a federated peer is connected to its own node, which we do not ask
        return self.presence.present(party, min(self.connection.connect_timeout, 5.0))

    @property
    def _ops(self) -> Sized:
        # tests/test_load.py counts the sends still in the books here; ``publisher.in_flight``
        # is the same count.
        return self.publisher._ops

    def describe(self) -> str:
        where = f"{self.connection.scheme}://{self.host}:{self.port}/{self.vhost}"
        return f"rabbitmq {self.mode} via {where} as {self.user_name}"
