"""The control plane of the Pulsar backend: everything it asks the admin REST API.

``PulsarManagement`` makes the job's tenant and namespace with their policies (topic
auto-creation, message TTL and retention, an optional publish-rate limit;
``setup_namespace``, at open); in replication mode it registers the other parties' clusters
and adds them to the namespace's replication clusters (``ensure_peer``) and waits until the
broker replicates a new topic (``await_replicator``); it lists what a job has on the broker
(``inventory``) and deletes it (``cleanup``). Only with ``admin_url``; the data plane
(``connection``, ``publisher``, ``consumer``) never imports it.

Replication mode needs two calls on a lane's first send, as a job's parties and lanes are
known only then: ``ensure_peer`` once per destination cluster, ``await_replicator`` once per
new producer. The broker gives no event to wait on, so both waits poll with a bounded
back-off (``_poll``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ...errors import BackendError, ConfigError
from ...party import Party
from ...routing import RouteTable
from .admin import PulsarAdmin
from .naming import PulsarNames

__all__ = ["PulsarManagement"]

log = logging.getLogger("fedtransport.pulsar")

_REPLICATION_ATTEMPTS = 5  # read-back rounds of adding replication clusters
_CLEANUP_ATTEMPTS = 4  # rounds of cleanup while another party deletes the same namespace
# What the admin REST answers while another party's delete of the same namespace is under way:
# 404 (gone midway), 409 (metadata changed under us), 412 (the bundle lost its owner), 500.
_RACE_STATUSES = frozenset({404, 409, 412, 500})


def _poll(ready: Callable[[], bool], deadline: float, stop: threading.Event) -> bool:
    """Call ``ready`` until it answers True (then True), backing off from 0.05 s to 1 s between
    calls; False once the next wait would pass ``deadline`` (``time.monotonic``) or ``stop`` is set."""
    delay = 0.05
    while True:
        if ready():
            return True
        if stop.is_set() or time.monotonic() + delay > deadline:
            return False
        stop.wait(delay)
        delay = min(delay * 2, 1.0)


class PulsarManagement:
    """One party's control plane for one job, on its own broker's admin API.

    ``cluster`` is this party's cluster; ``closed`` is the session's closed event, which ends
    a wait of the data plane's (not cleanup's: that runs after close too).
    """

    def __init__(
        self,
        names: PulsarNames,
        options: Mapping[str, Any],
        *,
        mode: str,
        cluster: str,
        route_table: RouteTable | None,
        closed: threading.Event,
    ) -> None:
        self.names = names
        self.tenant = names.tenant
        self.namespace = names.namespace
        self.cluster = cluster
        self._replication = mode == "replication"
        self._options = options
        self._route_table = route_table
        self._closed = closed
        self._admin: PulsarAdmin | None = None
        self._admin_lock = threading.Lock()  # guards the lazily made admin client
        self._peer_lock = threading.Lock()  # set-up per destination cluster, once
        self._peers: set[str] = set()
        self._replicating: set[tuple[str, str]] = set()  # (topic, cluster) seen replicated

    @property
    def enabled(self) -> bool:
        """Whether an ``admin_url`` is given: without one the backend makes no admin calls."""
        return bool(self._options["admin_url"])

    def admin(self) -> PulsarAdmin:
        """The admin REST client of this party's broker."""
        with self._admin_lock:
            if self._admin is None:
                o = self._options
                if not o["admin_url"]:
                    raise ConfigError("the Pulsar admin API needs option 'admin_url' (http://BROKER:8080)")
                self._admin = PulsarAdmin(
                    o["admin_url"],
                    token=o["token"],
                    tls_trust_certs_file_path=o["tls_trust_certs_file_path"],
                    tls_validate_hostname=o["tls_validate_hostname"],
                )
            return self._admin

    # the job's namespace -------------------------------------------------------------------

    def setup_namespace(self) -> None:
        a, o = self.admin(), self._options
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
        if self._replication:
            # No global configuration store: every party makes the namespace on its own cluster.
            self._add_replication_clusters([self.cluster])
        # The safety net for a scheduler that never calls cleanup: data expires on the broker.
        ttl = int(o["ttl_seconds"])
        a.set_message_ttl(self.tenant, self.namespace, ttl)
        a.set_retention(self.tenant, self.namespace, max(1, ttl // 60), -1)
        rate = o["publish_rate"]  # its keys and values were checked by PULSAR_OPTIONS
        if rate:
            a.set_publish_rate(self.tenant, self.namespace, int(rate.get("messages", -1)), int(rate.get("bytes", -1)))

    # replication ---------------------------------------------------------------------------

    def peer_ready(self, dst: Party) -> bool:
        """Whether ``ensure_peer(dst)`` would return without an admin call."""
        if not self._replication:
            return True
        assert self._route_table is not None
        cluster = self._route_table.cluster_name(dst)
        return cluster in self._peers or cluster == self.cluster

    def ensure_peer(self, dst: Party) -> str | None:
        """Replication mode: register ``dst``'s cluster and add it to the namespace, once; its
        cluster name (the message's replication cluster). Other modes: None."""
        if not self._replication:
            return None
        rt = self._route_table
        assert rt is not None
        cluster = rt.cluster_name(dst)
        with self._peer_lock:
            if cluster in self._peers or cluster == self.cluster:
                return cluster
            a = self.admin()
            a.ensure_cluster(cluster, rt.pulsar_cluster(dst))
            a.ensure_tenant(self.tenant, [self.cluster, *sorted(self._peers | {cluster})])
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
        a = self.admin()
        for _ in range(_REPLICATION_ATTEMPTS):
            have = a.get_replication_clusters(self.tenant, self.namespace)
            if set(clusters) <= set(have):
                return
            a.set_replication_clusters(self.tenant, self.namespace, sorted({*have, *clusters}))
        raise BackendError(
            f"Pulsar: the replication clusters of {self.tenant}/{self.namespace} keep changing under us; "
            f"{sorted(clusters)} could not be added"
        )

    def await_replicator(self, dst: Party, topic: str) -> None:
        """Replication mode: return once our broker replicates ``topic`` to ``dst``'s cluster."""
        assert self._route_table is not None
        self.await_replicating(topic, [self._route_table.cluster_name(dst)])

    def await_replicating(self, topic: str, clusters: Sequence[str]) -> None:
        """Replication mode: return once our broker replicates ``topic`` to each of ``clusters``.

        A replicator starts reading where the topic ends when it is created (Pulsar's
        ``replicationStartAt=latest``), and the broker creates it asynchronously once the topic
        and the namespace policy are both there: a message written before would never leave.
        A broadcast topic gains destinations over the job, so what was seen is remembered per
        (topic, cluster) and only a new pair is waited for.
        """
        with self._peer_lock:
            missing = sorted({c for c in clusters if c != self.cluster and (topic, c) not in self._replicating})
        if not missing:
            return
        a = self.admin()
        timeout = float(self._options["send_timeout"])

        def replicating() -> bool:
            have = (a.get_topic_stats(topic) or {}).get("replication") or {}
            return all(c in have for c in missing)

        if not _poll(replicating, time.monotonic() + timeout, self._closed):
            raise BackendError(
                f"Pulsar: the broker did not start replicating {topic} to cluster(s) {', '.join(missing)} "
                f"within {self._options['send_timeout']} s (send_timeout)"
            )
        with self._peer_lock:
            self._replicating.update((topic, c) for c in missing)

    def _await_replicators_stopped(self, a: PulsarAdmin, topics: Sequence[str]) -> None:
        """Cleanup in replication mode: wait (up to the admin timeout) until the broker has closed
        the replicators of ``topics`` that the namespace no longer asks for.

        A forced topic delete that lands while a replicator is still closing can hang on a
        standalone broker and is then refused as "already fenced"; waiting first avoids that
        race. Past the bound the deletes go ahead, as they would without the wait.
        """
        deadline = time.monotonic() + a.timeout
        never = threading.Event()  # cleanup runs after close too: the session's event is no bound
        for topic in topics:
            remote: list[str] = []

            def stopped(topic: str = topic, remote: list[str] = remote) -> bool:
                stats = a.get_topic_stats(topic) or {}
                remote[:] = [c for c in (stats.get("replication") or {}) if c != self.cluster]
                return not remote

            if not _poll(stopped, deadline, never):
                log.info("Pulsar cleanup: %s still replicates to %s; deleting anyway", topic, remote)
                return

    # inventory and cleanup -----------------------------------------------------------------

    def inventory(self) -> list[str]:
        """Names of the job's resources on this party's broker (``fedtransport cleanup``)."""
        try:
            topics = self.admin().list_topics(self.tenant, self.namespace)
        except BackendError as exc:
            if exc.status == 404:
                return []
            raise
        return [f"namespace {self.tenant}/{self.namespace}", *(f"topic {name}" for name in topics)]

    def cleanup(self) -> None:
        """Delete the job's topics (partitioned ones too) and namespace on this broker; idempotent.

        Two parties of a job on one broker clean up at the same moment: an answer that such a
        race gives is done once the namespace is gone (read back), else cleanup runs again,
        a bounded number of times with a back-off.
        """
        a = self.admin()
        for attempt in range(_CLEANUP_ATTEMPTS):
            try:
                self._cleanup_once(a)
                return
            except BackendError as exc:
                if exc.status not in _RACE_STATUSES:
                    raise
                if not a.namespace_exists(self.tenant, self.namespace):
                    log.info("Pulsar cleanup: %s/%s went meanwhile (%s)", self.tenant, self.namespace, exc)
                    return
                if attempt + 1 == _CLEANUP_ATTEMPTS:
                    raise
                time.sleep(0.2 * 2**attempt)

    def _cleanup_once(self, a: PulsarAdmin) -> None:
        try:
            # Clients still connected (the peers' consumers and producers, in replication mode a
            # peer's replicator) would re-create what we delete when they reconnect.
            a.set_auto_topic_creation(self.tenant, self.namespace, False)
            if self._replication:
                # Ours stop; Pulsar refuses (412) to delete a namespace replicated elsewhere.
                a.set_replication_clusters(self.tenant, self.namespace, [self.cluster])
            topics = a.list_topics(self.tenant, self.namespace)
        except BackendError as exc:
            if exc.status != 404:
                raise
            topics = []  # the namespace is gone already: cleanup is idempotent
        if self._replication:
            self._await_replicators_stopped(a, topics)
        for topic in topics:
            a.delete_topic(topic)
        a.delete_namespace(self.tenant, self.namespace)
