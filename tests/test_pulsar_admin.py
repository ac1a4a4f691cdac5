"""PulsarAdmin, the backend's admin REST v2 client, against the real Apache Pulsar broker.

Every call the client makes runs here against the session's ``PulsarStandalone``, and what it
did is read back through the broker's admin REST by a client of its own
(``PulsarStandalone.admin``), not by the client under test. Names are unique per test, so the
session's broker can be shared. Tokens, TLS and hostname validation on the admin plane are in
tests/test_pulsar_tls.py (a broker with TLS and authentication).

The recording fake (tests/pulsar_admin_fake.py) stays for two answers one real standalone broker
cannot be made to give: a 500 (a failing metadata store) and a 307 redirect (sent by a broker
that does not own the namespace's bundle; a standalone owns them all).
"""

from __future__ import annotations

import logging
import socket
import threading
import urllib.error
import uuid
from collections.abc import Iterator
from typing import Any

import pulsar
import pytest
from party_proc import wait_for
from pulsar_admin_fake import FakePulsarAdmin
from standalone_fixtures import admin_read as read

from fedtransport.brokers.standalone import PulsarStandalone
from fedtransport.errors import BackendError, ConfigError
from fedtransport.transport.pulsar.admin import PulsarAdmin

pytestmark = pytest.mark.timeout(600)  # the session broker may be resolved and started first

CLUSTER_A = {
    "serviceUrl": "http://party-a.fate.test:8080",
    "serviceUrlTls": "https://party-a.fate.test:8443",
    "brokerServiceUrl": "pulsar://party-a.fate.test:6650",
    "brokerServiceUrlTls": "pulsar+ssl://party-a.fate.test:6651",
    "proxyServiceUrl": "pulsar+ssl://proxy.fate.test:443",
    "proxyProtocol": "SNI",
    "peerClusterNames": [],
}
_quiet = logging.getLogger("test-pulsar-admin-client")
_quiet.setLevel(logging.ERROR)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def status_of(broker: PulsarStandalone, method: str, path: str) -> int:
    try:
        broker.admin(method, path)
    except urllib.error.HTTPError as err:
        return err.code
    return 200


@pytest.fixture
def broker(pulsar_standalone: PulsarStandalone) -> PulsarStandalone:
    return pulsar_standalone


@pytest.fixture
def admin(broker: PulsarStandalone) -> PulsarAdmin:
    return PulsarAdmin(broker.admin_url, timeout=30.0)


@pytest.fixture
def namespace(broker: PulsarStandalone, admin: PulsarAdmin) -> Iterator[tuple[str, str]]:
    """A tenant of the test's own (allowed on the broker's cluster) with one namespace."""
    tenant, ns = unique("tenant"), unique("job")
    admin.ensure_tenant(tenant, [broker.cluster])
    admin.create_namespace(tenant, ns)
    yield tenant, ns
    admin.delete_namespace(tenant, ns)
    admin.delete_tenant(tenant)


# ---------------------------------------------------------------------------- clusters
def test_cluster_put_then_post_read_back_and_delete(broker, admin):
    name = unique("party-a")
    assert admin.ensure_cluster(name, CLUSTER_A) is True  # PUT
    stored = read(broker, f"/admin/v2/clusters/{name}")
    assert {k: stored[k] for k in CLUSTER_A} == CLUSTER_A
    updated = {**CLUSTER_A, "brokerServiceUrl": "pulsar://party-a.fate.test:6660"}
    assert admin.ensure_cluster(name, updated) is False  # 409, then POST
    assert read(broker, f"/admin/v2/clusters/{name}")["brokerServiceUrl"] == "pulsar://party-a.fate.test:6660"
    assert admin.get_cluster(name) == read(broker, f"/admin/v2/clusters/{name}")
    assert admin.get_cluster(unique("nope")) is None
    assert {name, broker.cluster} <= set(admin.get_clusters())
    assert set(admin.get_clusters()) == set(read(broker, "/admin/v2/clusters"))
    assert admin.delete_cluster(name) is True
    assert read(broker, f"/admin/v2/clusters/{name}") is None
    assert admin.delete_cluster(name) is False  # 404 = already gone


def test_cluster_none_values_are_not_sent(broker, admin):
    name = unique("party-b")
    admin.ensure_cluster(name, {"serviceUrl": "http://b.fate.test:8080", "proxyServiceUrl": None})
    try:
        stored = read(broker, f"/admin/v2/clusters/{name}")
        assert stored["serviceUrl"] == "http://b.fate.test:8080"
        assert stored.get("proxyServiceUrl") is None
    finally:
        admin.delete_cluster(name)


# ---------------------------------------------------------------------------- tenants
def test_tenant_create_extend_and_delete(broker, admin):
    tenant, other = unique("tenant"), unique("party-x")
    admin.ensure_cluster(other, {"serviceUrl": "http://x.fate.test:8080"})
    try:
        assert admin.ensure_tenant(tenant, [broker.cluster]) is True
        assert read(broker, f"/admin/v2/tenants/{tenant}") == {"adminRoles": [], "allowedClusters": [broker.cluster]}
        assert admin.ensure_tenant(tenant, [broker.cluster]) is False  # there with everything: unchanged
        # a party joining later: its cluster and role are added, the existing ones kept
        assert admin.ensure_tenant(tenant, [other], admin_roles=["ops"]) is False
        stored = read(broker, f"/admin/v2/tenants/{tenant}")
        assert sorted(stored["allowedClusters"]) == sorted([broker.cluster, other])
        assert stored["adminRoles"] == ["ops"]
        assert admin.get_tenant(tenant) == stored
        assert admin.get_tenant(unique("nope")) is None
        # a tenant with a namespace is not deleted: the broker's own reason comes through
        admin.create_namespace(tenant, "busy")
        with pytest.raises(BackendError) as info:
            admin.delete_tenant(tenant)
        assert info.value.status == 409 and info.value.broker_message == "The tenant still has active namespaces"
        admin.delete_namespace(tenant, "busy")
        assert admin.delete_tenant(tenant) is True
        assert read(broker, f"/admin/v2/tenants/{tenant}") is None
        assert admin.delete_tenant(tenant) is False
    finally:
        if admin.get_tenant(tenant) is not None:
            admin.delete_namespace(tenant, "busy")
            admin.delete_tenant(tenant)
        admin.delete_cluster(other)


# ---------------------------------------------------------------------------- namespaces
def test_namespace_policies_read_back(broker, admin, namespace):
    tenant, ns = namespace
    path = f"/admin/v2/namespaces/{tenant}/{ns}"
    assert admin.create_namespace(tenant, ns) is False  # 409 = exists = fine
    admin.set_replication_clusters(tenant, ns, [broker.cluster])
    admin.set_retention(tenant, ns, 60, 1024)
    admin.set_message_ttl(tenant, ns, 86400)
    admin.set_publish_rate(tenant, ns, 1000, 64 << 20)
    admin.set_auto_topic_creation(tenant, ns, False)
    assert read(broker, f"{path}/replication") == [broker.cluster]
    assert admin.get_replication_clusters(tenant, ns) == [broker.cluster]
    assert read(broker, f"{path}/retention") == {"retentionTimeInMinutes": 60, "retentionSizeInMB": 1024}
    assert read(broker, f"{path}/messageTTL") == 86400
    assert read(broker, f"{path}/publishRate") == {
        "publishThrottlingRateInMsg": 1000,
        "publishThrottlingRateInByte": 64 << 20,
    }
    assert read(broker, f"{path}/autoTopicCreation")["allowAutoTopicCreation"] is False
    admin.set_auto_topic_creation(tenant, ns, True)
    assert read(broker, f"{path}/autoTopicCreation") == {"allowAutoTopicCreation": True, "topicType": "non-partitioned"}
    policies = admin.get_namespace_policies(tenant, ns)
    assert policies == read(broker, path)
    assert policies["message_ttl_in_seconds"] == 86400 and policies["replication_clusters"] == [broker.cluster]


def test_create_namespace_with_initial_policies(broker, admin, namespace):
    tenant, _ = namespace
    ns = unique("job")
    assert admin.create_namespace(tenant, ns, {"message_ttl_in_seconds": 60}) is True
    try:
        assert read(broker, f"/admin/v2/namespaces/{tenant}/{ns}/messageTTL") == 60
        assert f"{tenant}/{ns}" in read(broker, f"/admin/v2/namespaces/{tenant}")
    finally:
        admin.delete_namespace(tenant, ns)


def test_errors_carry_the_brokers_status_and_reason(admin, namespace):
    tenant, _ = namespace
    with pytest.raises(BackendError) as info:
        admin.set_message_ttl(tenant, "missing", 60)
    err = info.value
    assert err.status == 404 and err.broker_message == "Namespace does not exist"
    assert f"POST /admin/v2/namespaces/{tenant}/missing/messageTTL" in str(err) and "HTTP 404" in str(err)
    # 409 is fine for create_namespace; a 404 there (no such tenant) is an error
    with pytest.raises(BackendError) as info:
        admin.create_namespace(unique("no-tenant"), "job-1")
    assert info.value.status == 404 and info.value.broker_message == "Tenant does not exist"


# ---------------------------------------------------------------------------- topics
def test_topics_are_listed_and_deleted_with_subscriptions_attached(broker, admin, namespace):
    tenant, ns = namespace
    topics = [f"persistent://{tenant}/{ns}/guest-9999-host-10000-{lane}" for lane in range(2)]
    client = pulsar.Client(broker.service_url, logger=_quiet, operation_timeout_seconds=10)
    try:
        consumers = [client.subscribe(t, "fedtransport-host-10000") for t in topics]
        client.create_producer(topics[0]).send(b"x")
        assert admin.list_topics(tenant, ns) == topics
        assert read(broker, f"/admin/v2/namespaces/{tenant}/{ns}/topics") == topics
        stats = admin.get_topic_stats(topics[0])
        assert stats is not None and list(stats["subscriptions"]) == ["fedtransport-host-10000"]
        assert admin.get_topic_stats(f"persistent://{tenant}/{ns}/missing") is None
        # Why force=true: without it Pulsar refuses a topic with connected producers or consumers.
        assert status_of(broker, "DELETE", f"/admin/v2/persistent/{tenant}/{ns}/guest-9999-host-10000-0") == 412
        # and the consumers would re-create their topics on reconnecting, were that allowed
        admin.set_auto_topic_creation(tenant, ns, False)
        assert admin.delete_topic(topics[0]) is True
        assert admin.delete_topic(topics[0]) is False  # 404 = already gone
        assert admin.delete_topic(f"{tenant}/{ns}/guest-9999-host-10000-1") is True  # the short form
        assert read(broker, f"/admin/v2/namespaces/{tenant}/{ns}/topics") == []
        del consumers
    finally:
        client.close()


def test_partitioned_topics_are_listed_and_deleted(broker, admin, namespace):
    tenant, ns = namespace
    broker.admin("PUT", f"/admin/v2/persistent/{tenant}/{ns}/wide/partitions", 3)
    assert admin.list_partitioned_topics(tenant, ns) == [f"persistent://{tenant}/{ns}/wide"]
    assert len(admin.list_topics(tenant, ns)) == 3  # the partitions, as topics
    assert admin.delete_partitioned_topic(f"persistent://{tenant}/{ns}/wide") is True
    assert read(broker, f"/admin/v2/persistent/{tenant}/{ns}/partitioned") == []
    assert read(broker, f"/admin/v2/namespaces/{tenant}/{ns}/topics") == []
    assert admin.delete_partitioned_topic(f"persistent://{tenant}/{ns}/wide") is False


def test_delete_namespace_when_forced_deletion_is_refused(broker, admin, namespace):
    """Pulsar's default (forceDeleteNamespaceAllowed=false) answers 405 to a forced delete: the
    namespace is emptied, partitioned topics included, and deleted with a plain DELETE."""
    tenant, ns = namespace
    path = f"/admin/v2/namespaces/{tenant}/{ns}"
    broker.admin("PUT", f"/admin/v2/persistent/{tenant}/{ns}/wide/partitions", 2)
    broker.admin("PUT", f"/admin/v2/persistent/{tenant}/{ns}/plain")
    assert status_of(broker, "DELETE", f"{path}?force=true") == 405
    assert status_of(broker, "DELETE", path) == 409  # "Cannot delete non empty namespace"
    assert admin.delete_namespace(tenant, ns) is True
    assert read(broker, path) is None
    assert f"{tenant}/{ns}" not in read(broker, f"/admin/v2/namespaces/{tenant}")
    assert admin.delete_namespace(tenant, ns) is False  # idempotent


def test_bad_names_are_refused_before_any_request(admin):
    with pytest.raises(ConfigError):
        admin.delete_topic("just-a-topic")
    with pytest.raises(ConfigError):
        admin.create_namespace("fl/tenant", "job-1")


# ---------------------------------------------------------------------------- no broker needed
def test_connection_refused_names_the_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        admin = PulsarAdmin(f"http://127.0.0.1:{port}", timeout=2.0)
        with pytest.raises(BackendError) as info:
            admin.get_clusters()
    assert f"http://127.0.0.1:{port}" in str(info.value)
    assert info.value.status is None


def test_bad_configuration() -> None:
    with pytest.raises(ConfigError):
        PulsarAdmin("127.0.0.1:8080")
    with pytest.raises(ConfigError):
        PulsarAdmin("https://127.0.0.1:8443", tls_trust_certs_file_path="/nonexistent/ca.pem")
    with pytest.raises(ConfigError):
        PulsarAdmin("http://127.0.0.1:8080", timeout=0)


def test_parties_creating_one_tenant_at_once_all_succeed(broker, admin):
    # Every party of a job ensures the job's tenant at connect, at the same moment; each also
    # adds its own cluster. None may fail, and no party's cluster may be lost to a race.
    tenant = unique("tenant")
    clusters = [unique("party") for _ in range(6)]
    for name in clusters:
        admin.ensure_cluster(name, {"serviceUrl": f"http://{name}.fate.test:8080"})
    start = threading.Barrier(len(clusters))
    errors: list[BaseException] = []

    def join(cluster: str) -> None:
        start.wait()
        try:
            PulsarAdmin(broker.admin_url, timeout=30.0).ensure_tenant(tenant, [broker.cluster, cluster])
        except BaseException as e:  # collected, asserted below
            errors.append(e)

    threads = [threading.Thread(target=join, args=(c,)) for c in clusters]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        stored = read(broker, f"/admin/v2/tenants/{tenant}")
        assert sorted(stored["allowedClusters"]) == sorted([broker.cluster, *clusters])
    finally:
        admin.delete_tenant(tenant)
        for name in clusters:
            admin.delete_cluster(name)


# ---------------------------------------------------------------------------- the fake: what a standalone cannot answer
def test_a_server_error_carries_status_and_reason() -> None:
    # A 500 needs a broker whose metadata store fails; a healthy standalone never answers one.
    with FakePulsarAdmin() as fake:
        fake.fail("GET", "/admin/v2/clusters", 500, "Internal error: metadata store down")
        with pytest.raises(BackendError) as info:
            PulsarAdmin(fake.url, timeout=5.0).get_clusters()
    assert info.value.status == 500
    assert info.value.broker_message == "Internal error: metadata store down"


def test_a_lost_metadata_race_counts_as_already_there() -> None:
    # Two parties creating one tenant on a fresh standalone: the loser gets HTTP 500 with
    # BadVersionException (seen on Pulsar 4.0.7), which must read as a 409, never fail connect.
    with FakePulsarAdmin() as fake:
        for name in ("party-a", "party-b", "party-c", "party-d"):
            fake.state.clusters[name] = {"serviceUrl": f"http://{name}.fate.test:8080"}
        fake.state.tenants["fl-tenant"] = {"adminRoles": [], "allowedClusters": ["party-a"]}
        reason = "org.apache.pulsar.metadata.api.MetadataStoreException$BadVersionException: version mismatch"
        fake.fail("PUT", "/admin/v2/tenants/fl-tenant", 500, reason)
        a = PulsarAdmin(fake.url, timeout=5.0)
        assert a.ensure_tenant("fl-tenant", ["party-b"]) is False
        assert sorted(fake.state.tenants["fl-tenant"]["allowedClusters"]) == ["party-a", "party-b"]
        # the same answer to the read-modify-write update: read again and re-apply
        fake.fail("POST", "/admin/v2/tenants/fl-tenant", 500, reason)
        assert a.ensure_tenant("fl-tenant", ["party-c"]) is False
        assert sorted(fake.state.tenants["fl-tenant"]["allowedClusters"]) == ["party-a", "party-b", "party-c"]
        # any other 500 still fails, with its status
        fake.fail("PUT", "/admin/v2/tenants/fl-tenant", 500, "Internal error: metadata store down")
        with pytest.raises(BackendError) as info:
            a.ensure_tenant("fl-tenant", ["party-d"])
    assert info.value.status == 500


def test_redirect_is_followed_with_method_body_and_token() -> None:
    # A 307 comes from a broker that does not own the namespace's bundle; a standalone owns all.
    with FakePulsarAdmin(token="t0k") as server:
        a = PulsarAdmin(server.url, token="t0k")
        a.ensure_cluster("party-a", CLUSTER_A)
        a.ensure_tenant("fl-tenant", ["party-a"])
        a.create_namespace("fl-tenant", "job-1")
        server.redirect_once("POST", "/admin/v2/namespaces/fl-tenant/job-1/messageTTL")
        server.clear()
        a.set_message_ttl("fl-tenant", "job-1", 120)
        first, second = server.requests
        assert (second.method, second.path, second.body) == ("POST", first.path, 120)
        assert second.query == {"redirected": "1"}
        assert second.headers["authorization"] == "Bearer t0k"
        assert server.state.namespaces["fl-tenant/job-1"]["message_ttl_in_seconds"] == 120


# ---------------------------------------------------------------------------- resume probe
class CountingAdmin(PulsarAdmin):
    """Counts the admin calls it makes."""

    calls = 0

    def request(self, *args: Any, **kwargs: Any) -> tuple[int, Any]:
        self.calls += 1
        return super().request(*args, **kwargs)


def test_last_unacked_message_reads_the_message_only_when_there_is_one(broker, namespace):
    """The resume probe (Transport.last_stored): one call when there is nothing to resume from,
    a second one only to read a message the subscription has not acknowledged. Also after the
    topic was unloaded and loaded again (a new, empty ledger)."""
    tenant, ns = namespace
    topic, sub = f"persistent://{tenant}/{ns}/guest-9999-host-10000-0", "fedtransport-host-10000"
    admin = CountingAdmin(broker.admin_url, timeout=30.0)

    def probe() -> tuple[bytes | None, int]:
        admin.calls = 0
        found = admin.last_unacked_message(topic, sub)
        return found, admin.calls

    assert probe() == (None, 1)  # no topic
    client = pulsar.Client(broker.service_url, logger=_quiet, operation_timeout_seconds=10)
    try:
        consumer = client.subscribe(topic, sub, consumer_type=pulsar.ConsumerType.Shared)
        producer = client.create_producer(topic, batching_enabled=False)
        assert probe() == (None, 1)  # no message
        producer.send(b"first")
        assert probe() == (b"first", 2)
        consumer.acknowledge(consumer.receive(timeout_millis=15_000))
        # the client sends acknowledgements in the background: wait until the cursor has it
        wait_for(lambda: admin.last_unacked_message(topic, sub) is None, "the cursor to pass the message", 60)
        assert probe() == (None, 1)  # acknowledged
        producer.send(b"second")
        producer.close()
        consumer.close()
        broker.admin("PUT", f"/admin/v2/persistent/{tenant}/{ns}/guest-9999-host-10000-0/unload")
        assert probe() == (b"second", 2)
        assert admin.last_unacked_message(topic, "another-subscription") is None
    finally:
        client.close()
