"""Apache Pulsar backend: pulsar-client data plane, Pulsar admin REST v2 control plane.

Features
    * Topics ``persistent://{tenant}/{job_id}/{src_role}-{src_id}-{dst_role}-{dst_id}-{lane}``:
      parties x lanes per job, never one per variable or partition.
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
    * TLS (``pulsar+ssl://``, trust certs, hostname validation) and JWT tokens, for the
      data plane and the admin calls alike. ``connect()`` sends the broker one CONNECT of
      its own first (``pulsar_probe``): a token the broker refuses, or a missing one, is a
      ``BackendError`` saying "authentication failed" at once, where pulsar-client would
      retry until its operation timeout and report ``Timeout``.

Connection options (``options=`` of ``Federation.connect``) and defaults
    ``service_url``               ``None``: an embedded pulsar-lite broker for the process
    ``admin_url``                 ``None``: no control-plane calls
    ``mode``                      ``"shared"`` | ``"direct"`` | ``"replication"``
    ``tenant``                    ``"fl-tenant"``
    ``cluster``                   this party's cluster; default: its route-table name
                                  (``fl-pulsar-{party_id}`` unless listed otherwise), else
                                  ``"standalone"`` without a route table
    ``token``                     ``None``; a JWT (also ``"token:..."`` / ``"file:///path"``)
    ``tls_trust_certs_file_path`` ``None``
    ``tls_validate_hostname``     ``True``
    ``send_window``               ``16`` messages in flight per ``send`` (one lane of one transfer)
    ``send_window_bytes``         ``8 MiB`` in flight per ``send``: what bounds a sender's memory
    ``send_timeout``              ``30.0`` seconds for the broker to confirm a message
    ``receiver_queue_size``       ``1``
    ``receive_connections``       ``4``: connections the receive lanes are spread over
    ``subscribe_timeout``         ``180.0`` seconds of retrying a refused subscription
    ``ttl_seconds``               ``172800``: message TTL and retention of the job namespace
    ``publish_rate``              ``None``, or ``{"messages": N, "bytes": M}`` per second
    ``producer`` / ``consumer``   ``{}``: extra keyword arguments for pulsar-client's
                                  ``create_producer`` / ``subscribe``
    ``client``                    ``{}``: extra keyword arguments for ``pulsar.Client``

Errors
    ``BackendError`` carrying pulsar-client's result or the admin API's reason ("authentication
    failed" for a refused or missing token on either plane);
    ``ConfigError`` for inconsistent options; ``RouteError`` for a party the route table
    cannot resolve.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import pulsar

from ..errors import BackendError, ConfigError, RouteError
from ..party import Party
from .base import DeliverFn, Delivery, JobContext, Transport
from .pulsar_admin import PulsarAdmin, read_token
from .pulsar_probe import probe_connect

__all__ = ["PulsarTransport"]

log = logging.getLogger("fedtransport.pulsar")
_client_log = logging.getLogger("fedtransport.pulsar.client")
if _client_log.level == logging.NOTSET:  # pulsar-client's C++ INFO lines drown everything else
    _client_log.setLevel(logging.WARNING)
_CPP_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING, "ERROR": logging.ERROR}
_log_pipe: tuple[int, int] | None = None  # (pid that made it, write end)
_log_pipe_lock = threading.Lock()


def client_logger() -> pulsar.FileLogger:
    """A logger for pulsar-client that feeds ``logging.getLogger("fedtransport.pulsar.client")``.

    Not a Python logger object: pulsar-client calls such a logger from its C++ threads, and at
    interpreter exit that aborts the process now and then ("terminate called without an
    active exception", exit code 134; measured: 12 of 60 party processes, pulsar-client 3.13,
    0 of 60 with this). Its C++ file logger writes into a pipe instead; a daemon thread turns
    the lines into log records. Its console logger would write to the user's stdout.
    """
    global _log_pipe
    with _log_pipe_lock:
        if _log_pipe is None or _log_pipe[0] != os.getpid():  # a forked child reads its own pipe
            read_fd, write_fd = os.pipe()
            threading.Thread(target=_forward_client_log, args=(read_fd,), name="ft-pulsar-log", daemon=True).start()
            _log_pipe = (os.getpid(), write_fd)
        write_fd = _log_pipe[1]
    level = _client_log.getEffectiveLevel()
    cpp = (
        pulsar.LoggerLevel.Debug if level <= logging.DEBUG else
        pulsar.LoggerLevel.Info if level <= logging.INFO else
        pulsar.LoggerLevel.Warn if level <= logging.WARNING else
        pulsar.LoggerLevel.Error
    )  # fmt: skip
    return pulsar.FileLogger(cpp, f"/proc/self/fd/{write_fd}")


def _forward_client_log(read_fd: int) -> None:
    # A line: "2026-12-05 09:15:14.188 ERROR [140586391697088] ClientConnection:485 | message"
    with open(read_fd, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            parts = line.split(" ", 4)
            level = _CPP_LEVELS.get(parts[2], logging.WARNING) if len(parts) == 5 else logging.WARNING
            message = parts[4].rstrip() if len(parts) == 5 else line.rstrip()
            _client_log.log(level, "%s", message)


_MODES = ("shared", "direct", "replication")
# Shared: the only type on which pulsar-lite honours redelivery requests, and a restarted
# receiver may attach before a real broker has noticed that the old one is gone.
_CONSUMER_TYPE = pulsar.ConsumerType.Shared
_RECEIPT_PATIENCE = 1.5  # × send_timeout without any receipt before the missing ones count as lost
_RECEIVE_POLL_MS = 200  # how often a receive loop looks up to notice close()


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


class PulsarTransport(Transport):
    name: ClassVar[str] = "pulsar"
    option_defaults: ClassVar[dict[str, Any]] = {
        "service_url": None,
        "admin_url": None,
        "mode": "shared",
        "tenant": "fl-tenant",
        "cluster": None,
        "token": None,
        "tls_trust_certs_file_path": None,
        "tls_validate_hostname": True,
        "send_window": 16,
        "send_window_bytes": 8 << 20,
        "send_timeout": 30.0,
        "receiver_queue_size": 1,
        "receive_connections": 4,
        "subscribe_timeout": 180.0,
        "ttl_seconds": 172800,
        "publish_rate": None,
        "producer": {},
        "consumer": {},
        "client": {},
    }

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(ctx)
        o = ctx.options
        self.mode = o["mode"]
        if self.mode not in _MODES:
            raise ConfigError(f"option 'mode' must be one of {_MODES}, got {self.mode!r}")
        if self.mode != "shared" and ctx.route_table is None:
            raise ConfigError(f"Pulsar mode {self.mode!r} needs a route_table to find the other parties")
        if self.mode == "replication" and not o["admin_url"]:
            raise ConfigError("Pulsar replication mode needs 'admin_url' to register clusters and the namespace")
        if self.mode != "shared" and not o["service_url"]:
            raise ConfigError(f"Pulsar mode {self.mode!r} needs 'service_url' (this party's own broker)")
        for key in ("send_window", "send_window_bytes", "receiver_queue_size", "receive_connections", "ttl_seconds"):
            if isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < 1:
                raise ConfigError(f"option {key!r} must be a positive integer, got {o[key]!r}")
        for key in ("send_timeout", "subscribe_timeout"):  # seconds; 0 would make every wait give up at once
            if isinstance(o[key], bool) or not isinstance(o[key], (int, float)) or not o[key] > 0:
                raise ConfigError(f"option {key!r} must be a positive number of seconds, got {o[key]!r}")
        self.tenant = str(o["tenant"])
        self.namespace = ctx.job_id
        self.cluster = o["cluster"] or (ctx.route_table.cluster_name(ctx.party) if ctx.route_table else "standalone")
        self._lock = threading.Lock()
        self._clients: dict[str, pulsar.Client] = {}
        self._receive_clients: list[pulsar.Client] = []  # our own broker, one connection each
        self._lanes_placed = 0
        self._producers: dict[tuple[Party, int], pulsar.Producer] = {}
        self._consumers: dict[tuple[Party, int], pulsar.Consumer] = {}
        self._receivers: list[threading.Thread] = []
        self._peers: set[str] = set()
        self._listened: set[tuple[Party, int]] = set()
        # per listened lane: how to subscribe again, and the redelivery requests since its last message
        self._subscriptions: dict[tuple[Party, int], tuple[pulsar.Client, str, dict[str, Any]]] = {}
        self._silent: dict[tuple[Party, int], int] = {}
        self._closed = threading.Event()
        self._admin: PulsarAdmin | None = None
        self._service_url = o["service_url"]

    # naming --------------------------------------------------------------------------------

    def topic(self, src: Party, dst: Party, lane: int) -> str:
        name = f"{src.role}-{src.party_id}-{dst.role}-{dst.party_id}-{lane + self.ctx.lane_offset}"
        return f"persistent://{self.tenant}/{self.namespace}/{name}"

    @staticmethod
    def subscription(party: Party) -> str:
        return f"fedtransport-{party.role}-{party.party_id}"

    # lifecycle -----------------------------------------------------------------------------

    def open(self) -> None:
        if self._service_url is None:
            from ..brokers.pulsar import shared_embedded_pulsar

            self._service_url = shared_embedded_pulsar().service_url
            log.info("no service_url: using the embedded broker at %s", self._service_url)
        if self.ctx.options["admin_url"]:
            self._admin = self._make_admin()
            self._setup_namespace()
        # One round trip now, so a wrong URL, certificate or token fails connect(), not the first send.
        note = self._check_credentials()
        own = self.topic(self.ctx.party, self.ctx.party, 0)
        self._pulsar_call(
            f"reaching {self._service_url}{note}", lambda: self._client(self._service_url).get_topic_partitions(own)
        )

    def _check_credentials(self) -> str:
        """Ask the broker itself whether it takes our token (or none): pulsar-client would retry a
        refusal until its operation timeout and then say only ``Timeout``. Raises BackendError
        saying authentication failed; else returns a note for a failing round trip (" (why)")."""
        kwargs = self._client_kwargs()
        if "authentication" in dict(self.ctx.options["client"]):
            return ""  # an authentication plugin of the caller's: only pulsar-client can speak it
        answer = probe_connect(
            self._service_url,
            token=read_token(self.ctx.options["token"]),
            tls_trust_certs_file_path=kwargs.get("tls_trust_certs_file_path"),
            tls_validate_hostname=bool(kwargs.get("tls_validate_hostname", True)),
            tls_allow_insecure_connection=bool(kwargs.get("tls_allow_insecure_connection", False)),
            timeout=min(10.0, float(kwargs["operation_timeout_seconds"])),
        )
        if answer.authentication_refused:
            given = "the broker rejected the token" if self.ctx.options["token"] else "no token given"
            raise BackendError(
                f"Pulsar: authentication failed at {self._service_url} ({given}): "
                f"the broker answered {answer.error}: {answer.message}",
                broker_message=answer.message,
            )
        return f" ({answer.problem})" if answer.problem else ""

    def _make_admin(self) -> PulsarAdmin:
        o = self.ctx.options
        return PulsarAdmin(
            o["admin_url"],
            token=o["token"],
            tls_trust_certs_file_path=o["tls_trust_certs_file_path"],
            tls_validate_hostname=o["tls_validate_hostname"],
        )

    def _setup_namespace(self) -> None:
        assert self._admin is not None
        a, o = self._admin, self.ctx.options
        try:
            a.ensure_tenant(self.tenant, [self.cluster])
        except BackendError as exc:
            if exc.status != 412:  # "Clusters do not exist": the tenant must be allowed on the broker's own
                raise
            raise BackendError(
                f"Pulsar: the broker at {o['admin_url']} has no cluster {self.cluster!r} (it has "
                f"{a.get_clusters()}): set option 'cluster', or 'cluster' in the route table, to its name",
                broker_message=exc.broker_message,
                status=exc.status,
            ) from exc
        a.create_namespace(self.tenant, self.namespace)
        # Lanes are made by producing and subscribing, as plain topics, whatever the broker's defaults.
        a.set_auto_topic_creation(self.tenant, self.namespace, True)
        if self.mode == "replication":
            # No global configuration store: every party makes the namespace on its own cluster.
            self._add_replication_clusters([self.cluster])
        # The safety net for a scheduler that never calls cleanup: data expires on the broker.
        ttl = int(o["ttl_seconds"])
        a.set_message_ttl(self.tenant, self.namespace, ttl)
        a.set_retention(self.tenant, self.namespace, max(1, ttl // 60), -1)
        rate = o["publish_rate"]
        if rate:
            if not isinstance(rate, dict) or not set(rate) <= {"messages", "bytes"}:
                raise ConfigError("option 'publish_rate' is {'messages': N, 'bytes': M} (per second)")
            a.set_publish_rate(self.tenant, self.namespace, int(rate.get("messages", -1)), int(rate.get("bytes", -1)))

    def _ensure_peer(self, dst: Party) -> str | None:
        """Replication mode: register ``dst``'s cluster and add it to the namespace, once."""
        if self.mode != "replication":
            return None
        assert self._admin is not None and self.ctx.route_table is not None
        rt = self.ctx.route_table
        cluster = rt.cluster_name(dst)
        with self._lock:
            if cluster in self._peers or cluster == self.cluster:
                return cluster
            self._admin.ensure_cluster(cluster, rt.pulsar_cluster(dst))
            self._admin.ensure_tenant(self.tenant, [self.cluster, *sorted(self._peers | {cluster})])
            self._add_replication_clusters([self.cluster, cluster])
            self._peers.add(cluster)
        return cluster

    def _add_replication_clusters(self, clusters: Sequence[str]) -> None:
        """Add ``clusters`` to the namespace's replication clusters, keeping those already there.

        Other sessions of this party (Spark executors, a retried task) share the namespace on our
        cluster. Writing our own list would drop their destinations, and Pulsar then removes that
        replicator with what it had not sent yet. The REST API has no compare-and-set: we read
        back and add again until the list holds ours, which narrows the window in which two
        sessions adding different clusters at the same moment lose one addition, but does not
        close it (docs/pulsar.md).
        """
        assert self._admin is not None
        for _ in range(5):
            have = self._admin.get_replication_clusters(self.tenant, self.namespace)
            if set(clusters) <= set(have):
                return
            self._admin.set_replication_clusters(self.tenant, self.namespace, sorted({*have, *clusters}))
        raise BackendError(
            f"Pulsar: the replication clusters of {self.tenant}/{self.namespace} keep changing under us; "
            f"{sorted(clusters)} could not be added"
        )

    def _await_replicator(self, topic: str, cluster: str) -> None:
        """Replication mode: return once our broker replicates ``topic`` to ``cluster``.

        A replicator starts reading where the topic ends when it is created (Pulsar's
        ``replicationStartAt=latest``), and the broker creates it asynchronously once the topic
        and the namespace policy are both there: a message written before would never leave.
        """
        assert self._admin is not None
        deadline = time.monotonic() + float(self.ctx.options["send_timeout"])
        delay = 0.05
        while True:
            stats = self._admin.get_topic_stats(topic) or {}
            if cluster in (stats.get("replication") or {}):
                return
            if self._closed.is_set() or time.monotonic() + delay > deadline:
                raise BackendError(
                    f"Pulsar: the broker did not start replicating {topic} to cluster {cluster} "
                    f"within {self.ctx.options['send_timeout']} s (send_timeout)"
                )
            self._closed.wait(delay)
            delay = min(delay * 2, 1.0)

    def _await_replicators_stopped(self, admin: PulsarAdmin, topics: Sequence[str]) -> None:
        """Cleanup in replication mode: wait (up to the admin timeout) until the broker has closed
        the replicators of ``topics`` that the namespace no longer asks for.

        A forced topic delete that lands while a replicator is still closing can hang on a
        standalone broker and is then refused as "already fenced"; waiting first avoids that
        race. Past the bound the deletes go ahead, as they would without the wait.
        """
        deadline = time.monotonic() + admin.timeout
        delay = 0.05
        for topic in topics:
            while True:
                stats = admin.get_topic_stats(topic) or {}
                remote = [c for c in (stats.get("replication") or {}) if c != self.cluster]
                if not remote:
                    break
                if time.monotonic() + delay > deadline:
                    log.info("Pulsar cleanup: %s still replicates to %s; deleting anyway", topic, remote)
                    return
                time.sleep(delay)  # a bounded back-off: the broker gives no event to wait on
                delay = min(delay * 2, 1.0)

    def _client_kwargs(self) -> dict[str, Any]:
        o = self.ctx.options
        kwargs: dict[str, Any] = {
            "operation_timeout_seconds": 30,
            "io_threads": 2,
            "tls_validate_hostname": bool(o["tls_validate_hostname"]),
            **dict(o["client"]),
        }
        if o["token"]:
            kwargs["authentication"] = pulsar.AuthenticationToken(read_token(o["token"]))
        if o["tls_trust_certs_file_path"]:
            kwargs["tls_trust_certs_file_path"] = o["tls_trust_certs_file_path"]
        return kwargs

    def _new_client(self, url: str, **extra: Any) -> pulsar.Client:
        try:
            return pulsar.Client(url, logger=client_logger(), **{**self._client_kwargs(), **extra})
        except Exception as exc:  # pulsar raises its own exception types
            raise BackendError(f"cannot create a Pulsar client for {url}: {exc}", broker_message=str(exc)) from exc

    def _client(self, url: str) -> pulsar.Client:
        with self._lock:
            client = self._clients.get(url)
            if client is None:
                client = self._clients[url] = self._new_client(url)
            return client

    def _receive_client(self) -> pulsar.Client:
        """The connection for the next lane we listen on: round robin over ``receive_connections``."""
        with self._lock:
            index = self._lanes_placed % int(self.ctx.options["receive_connections"])
            self._lanes_placed += 1
            if index == len(self._receive_clients):  # one connection needs one I/O thread
                self._receive_clients.append(self._new_client(self._service_url, io_threads=1))
            return self._receive_clients[index]

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for t in self._receivers:
            t.join(timeout=5)
        with self._lock:
            clients = [*self._clients.values(), *self._receive_clients]
            self._clients.clear()
            self._receive_clients.clear()
            self._producers.clear()
            self._consumers.clear()
        for client in clients:  # closes its producers and consumers too
            try:
                client.close()
            except Exception as exc:
                log.debug("closing a Pulsar client: %s", exc)

    def cleanup(self) -> None:
        admin = self._admin or (self._make_admin() if self.ctx.options["admin_url"] else None)
        if admin is not None:
            try:
                # Clients still connected (the peers' consumers and producers, in replication mode a
                # peer's replicator) would re-create what we delete when they reconnect.
                admin.set_auto_topic_creation(self.tenant, self.namespace, False)
                if self.mode == "replication":
                    # Ours stop; Pulsar refuses (412) to delete a namespace replicated elsewhere.
                    admin.set_replication_clusters(self.tenant, self.namespace, [self.cluster])
                topics = admin.list_topics(self.tenant, self.namespace)
            except BackendError as exc:
                if exc.status != 404:
                    raise
                topics = []  # the namespace is gone already: cleanup is idempotent
            if self.mode == "replication":
                self._await_replicators_stopped(admin, topics)
            for topic in topics:
                admin.delete_topic(topic)
            admin.delete_namespace(self.tenant, self.namespace)
            with self._lock:  # the subscriptions went with the topics: re-attaching would recreate them
                self._listened.clear()
        # Without the admin API only subscriptions can be dropped, so a broker that keeps
        # topics keeps no backlog for them.
        self._unsubscribe_all()

    def _unsubscribe_all(self) -> None:
        """Drop this party's durable subscriptions on every lane it received on."""
        with self._lock:
            lanes = sorted(self._listened)
            open_consumers = dict(self._consumers)
            self._consumers.clear()
            self._listened.clear()
        if not lanes:
            return
        client = None
        try:
            for src, lane in lanes:
                topic = self.topic(src, self.ctx.party, lane)
                consumer = open_consumers.get((src, lane))
                try:
                    if consumer is None:  # the session is closed: attach once more to drop it
                        if client is None:
                            client = pulsar.Client(self._service_url, logger=client_logger(), **self._client_kwargs())
                        consumer = client.subscribe(
                            topic, self.subscription(self.ctx.party), consumer_type=_CONSUMER_TYPE
                        )
                    consumer.unsubscribe()
                except Exception as exc:
                    log.warning("could not drop the subscription on %s: %s", topic, exc)
        finally:
            if client is not None:
                client.close()

    # data plane ----------------------------------------------------------------------------

    def _create_producer(self, client: pulsar.Client, topic: str, kwargs: dict[str, Any]) -> pulsar.Producer:
        """In direct mode the topic is in the destination's namespace on its broker, which the
        destination makes when it connects: until then Pulsar answers TopicNotFound ("Namespace
        not found"). Wait for it, up to ``subscribe_timeout`` seconds."""
        deadline = time.monotonic() + float(self.ctx.options["subscribe_timeout"])
        delay = 0.2
        while True:
            try:
                return client.create_producer(topic, **kwargs)
            except pulsar.exceptions.TopicNotFound:
                if self.mode != "direct" or self._closed.is_set() or time.monotonic() + delay > deadline:
                    raise
                log.info("no namespace for %s on the destination's broker yet; retrying in %.1f s", topic, delay)
                self._closed.wait(delay)
                delay = min(delay * 2, 5.0)

    def _produce_url(self, dst: Party) -> str:
        if self.mode != "direct":
            return self._service_url
        assert self.ctx.route_table is not None
        ep = self.ctx.route_table.resolve(dst)
        secure = str(self._service_url).startswith("pulsar+ssl://")
        if secure:
            if ep.ssl_port is None:
                raise RouteError(f"route table {self.ctx.route_table.source}: party {dst.party_id} has no sslPort")
            return f"pulsar+ssl://{ep.host}:{ep.ssl_port}"
        return f"pulsar://{ep.host}:{ep.port}"

    def _producer(self, dst: Party, lane: int) -> pulsar.Producer:
        key = (dst, lane)
        producer = self._producers.get(key)
        if producer is not None:
            return producer
        client = self._client(self._produce_url(dst))
        topic = self.topic(self.ctx.party, dst, lane)
        o = self.ctx.options
        kwargs = {
            "send_timeout_millis": int(float(o["send_timeout"]) * 1000),
            "max_pending_messages": int(o["send_window"]),
            "block_if_queue_full": True,
            "batching_enabled": False,  # messages are already up to 4 MiB; batching would only add latency
            **dict(o["producer"]),
        }
        producer = self._pulsar_call(
            f"creating a producer on {topic}", lambda: self._create_producer(client, topic, kwargs)
        )
        if self.mode == "replication":
            assert self.ctx.route_table is not None
            cluster = self.ctx.route_table.cluster_name(dst)
            if cluster != self.cluster:
                self._await_replicator(topic, cluster)
        with self._lock:
            self._producers.setdefault(key, producer)
            return self._producers[key]

    def send(self, dst: Party, lane: int, messages: Iterable[bytes]) -> int:
        if self._closed.is_set():
            raise BackendError("the Pulsar transport is closed")
        clusters = self._ensure_peer(dst)  # first: a topic made before would start unreplicated
        producer = self._producer(dst, lane)
        o = self.ctx.options
        # The client fails a message send_timeout after it was queued, so a receipt is due by then.
        patience = float(o["send_timeout"]) * _RECEIPT_PATIENCE
        receipts = _Receipts(int(o["send_window"]), int(o["send_window_bytes"]), patience)
        extra = {"replication_clusters": [clusters]} if clusters else {}
        resent = False
        count = 0

        def publish(key: int, msg: bytes) -> bool:
            try:
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
            topic = self.topic(self.ctx.party, dst, lane)
            raise BackendError(f"Pulsar refused a message on {topic}: {failure}", broker_message=failure)
        return count

    def _replace_producer(self, dst: Party, lane: int, old: pulsar.Producer) -> pulsar.Producer:
        """A new producer for the lane, in place of ``old`` in the cache. ``old`` stays open (its
        client closes it): another transfer on the lane may still be waiting on its receipts."""
        log.warning(
            "Pulsar: receipts missing on %s lane %d past send_timeout; sending again on a new producer", dst, lane
        )
        with self._lock:
            if self._producers.get((dst, lane)) is old:
                del self._producers[(dst, lane)]
        return self._producer(dst, lane)

    def listen(self, src: Party, lane: int, deliver: DeliverFn) -> None:
        key = (src, lane)
        with self._lock:
            if key in self._consumers:
                return
        client = self._receive_client()
        topic = self.topic(src, self.ctx.party, lane)
        o = self.ctx.options
        kwargs = {
            "consumer_type": _CONSUMER_TYPE,
            "initial_position": pulsar.InitialPosition.Earliest,
            "receiver_queue_size": int(o["receiver_queue_size"]),
            **dict(o["consumer"]),
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
        deadline = time.monotonic() + float(self.ctx.options["subscribe_timeout"])
        delay = 0.2
        while True:
            try:
                return client.subscribe(topic, self.subscription(self.ctx.party), **kwargs)
            except Exception as exc:
                if self._closed.is_set() or time.monotonic() + delay > deadline:
                    raise BackendError(
                        f"Pulsar: subscribing to {topic} failed: {exc}", broker_message=str(exc)
                    ) from exc
                log.warning("subscribing to %s failed (%s); retrying in %.1f s", topic, exc, delay)
                self._closed.wait(delay)
                delay = min(delay * 2, 5.0)

    def _receive_loop(self, src: Party, lane: int, deliver: DeliverFn) -> None:
        key = (src, lane)
        while not self._closed.is_set():
            consumer = self._consumers.get(key)
            if consumer is None:  # dropped by cleanup
                return
            try:
                msg = consumer.receive(timeout_millis=_RECEIVE_POLL_MS)
            except pulsar.Timeout:
                continue
            except Exception as exc:  # closed: by the session (the loop ends), or replaced (it goes on)
                if self._closed.is_set() or self._consumers.get(key) is consumer:
                    if not self._closed.is_set():
                        log.warning("receiving from %s lane %d stopped: %s", src, lane, exc)
                    return
                continue
            self._silent[key] = 0
            deliver(Delivery(src, lane, msg.data(), msg.message_id()))

    def ack(self, deliveries: Sequence[tuple[int, Party, Any]]) -> None:
        for lane, src, msg_id in deliveries:
            consumer = self._consumers.get((src, lane))
            if consumer is None:
                continue
            try:
                consumer.acknowledge(msg_id)
            except Exception as exc:
                raise BackendError(f"acknowledging on lane {lane} from {src} failed: {exc}") from exc

    def redeliver(self, src: Party, lane: int) -> None:
        key = (src, lane)
        consumer = self._consumers.get(key)
        if consumer is None or self._closed.is_set():
            return
        silent = self._silent[key] = self._silent.get(key, 0) + 1
        if silent != 2:  # the second request in a row without a message: a new consumer, once
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
            if self._consumers.get(key) is not consumer:  # closed or cleaned up meanwhile
                fresh.close()
                return
            self._consumers[key] = fresh
        # Its unacknowledged messages go back to the subscription: the fresh consumer gets them,
        # and acknowledgements of what it delivered before, refused now, only bring duplicates.
        try:
            consumer.close()
        except Exception as exc:
            log.debug("closing the replaced consumer of %s: %s", topic, exc)

    def _pulsar_call(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as exc:
            raise BackendError(f"Pulsar: {what} failed: {exc}", broker_message=str(exc)) from exc

    def describe(self) -> str:
        return f"pulsar {self.mode} via {self._service_url}"
