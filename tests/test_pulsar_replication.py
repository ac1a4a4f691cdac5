"""Replication mode between real Apache Pulsar clusters, without a global configuration store.

One set of three standalone clusters serves the module: fl-pulsar-9999 (A, guest's),
fl-pulsar-10000 (B, host's) and fl-pulsar-10001 (C, arbiter's). Each has a metadata store of its
own and knows the others only as each party's session registers them from the route table
through its own cluster's admin REST (PowerFL's practice). A party's client talks to its own
cluster only; the brokers' replicators carry the messages.

The brokers run TLS with certificates for ``{party_id}.fate.test`` from ``fedtransport.certs``
(the star network's layout) and ``brokerClientTlsEnabled=true``: replicators speak TLS, as an
SNI proxy needs, and verify the peer's chain against the star's CA. Direct tests register the
clusters by their loopback ports; the star test puts haproxy between the clusters and registers
them behind it (``proxyServiceUrl``, ``proxyProtocol: SNI``), as in FATE on Spark with Pulsar.

What the clusters hold is read through their own admin REST (``broker.admin``), never through the
client under test. After each test every cluster forgets the others (tenant and cluster entries
deleted): a broker keeps one replication client per cluster name, built from the entry it first
saw, until that entry is deleted.
"""

from __future__ import annotations

import urllib.error
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ARBITER, GUEST, HOST
from party_proc import wait_for

import fedtransport as ft
from fedtransport import certs
from fedtransport.brokers import HAProxy
from fedtransport.brokers.standalone import PulsarStandalone
from fedtransport.transport.pulsar.admin import PulsarAdmin

# Three brokers start at once on 2 cores (the jars may first be resolved with Maven, ~35 s cold).
pytestmark = pytest.mark.timeout(900)

DOMAIN = "fate.test"
PARTIES = (GUEST, HOST, ARBITER)
TENANT = "fl-tenant"


@pytest.fixture(scope="module")
def star(tmp_path_factory: pytest.TempPathFactory) -> certs.StarCerts:
    return certs.make_star(tmp_path_factory.mktemp("star"), DOMAIN, [p.party_id for p in PARTIES])


@pytest.fixture(scope="module")
def clusters(star: certs.StarCerts) -> Iterator[dict[ft.Party, PulsarStandalone]]:
    """Party -> its own cluster (``fl-pulsar-{party_id}``), started together, stopped at the end."""
    brokers = {
        p: PulsarStandalone(
            cluster=f"fl-pulsar-{p.party_id}",
            tls={"cert": star.parties[p.party_id].cert, "key": star.parties[p.party_id].key, "ca": star.ca_cert},
            config={"brokerClientTlsEnabled": True},
        )
        for p in PARTIES
    }
    try:
        with ThreadPoolExecutor(len(brokers)) as pool:
            for started in [pool.submit(b.start) for b in brokers.values()]:
                started.result()
        yield brokers
    finally:
        for b in brokers.values():
            b.stop()


@pytest.fixture(autouse=True)
def forget_peers(clusters: dict[ft.Party, PulsarStandalone]) -> Iterator[None]:
    """After the test, every cluster knows only itself again (see the module docstring)."""
    yield
    for b in clusters.values():
        forget(b)


def forget(b: PulsarStandalone) -> None:
    """Delete the tenant and every other cluster's entry, which closes the broker's replication
    client to it. A namespace a failed test left behind goes first, so the next test starts clean."""
    if TENANT in read(b, "/admin/v2/tenants"):
        for namespace in read(b, f"/admin/v2/namespaces/{TENANT}"):
            b.admin("POST", f"/admin/v2/namespaces/{namespace}/replication", [b.cluster])
            PulsarAdmin(b.admin_url).delete_namespace(*namespace.split("/"))
        b.admin("DELETE", f"/admin/v2/tenants/{TENANT}")
    for name in read(b, "/admin/v2/clusters"):
        if name != b.cluster:
            b.admin("DELETE", f"/admin/v2/clusters/{name}")


def read(b: PulsarStandalone, path: str) -> Any:
    """GET ``path`` from the cluster's admin REST; ``None`` for a 404."""
    try:
        return b.admin("GET", path)
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise


def direct_table(clusters: dict[ft.Party, PulsarStandalone]) -> dict[str, Any]:
    """Every party's cluster at its real loopback ports (FATE's pulsar_route_table.yaml format)."""
    return {
        p.party_id: {"host": "127.0.0.1", "port": b.port, "sslPort": b.tls_port, "mngPort": b.web_port}
        for p, b in clusters.items()
    }


def connect(job_id: str, party: ft.Party, b: PulsarStandalone, routes: Any, **extra: Any) -> ft.Federation:
    """``party`` connected to its own cluster only."""
    opts = {"mode": "replication", "service_url": b.service_url, "admin_url": b.admin_url, **extra}
    return ft.Federation.connect("pulsar", job_id=job_id, party=party, route_table=routes, options=opts)


def lanes(src: ft.Party, dst: ft.Party, job_id: str) -> list[str]:
    return [f"persistent://{TENANT}/{job_id}/{src.role}-{src.party_id}-{dst.role}-{dst.party_id}-{i}" for i in range(4)]


def replicators(b: PulsarStandalone, topic: str) -> dict[str, Any]:
    return (read(b, f"/admin/v2/{topic.replace('://', '/')}/stats") or {}).get("replication") or {}


def assert_gone(b: PulsarStandalone, job_id: str) -> None:
    assert f"{TENANT}/{job_id}" not in (read(b, f"/admin/v2/namespaces/{TENANT}") or [])
    assert read(b, f"/admin/v2/persistent/{TENANT}/{job_id}") is None  # 404: no namespace, no topic


TABLE = ft.Table.from_partitions([[(f"k{p}-{i}", {"i": i, "p": p}) for i in range(300)] for p in range(4)])
OBJECT = {"weights": np.arange(10_000, dtype=np.float64), "meta": ("lr", 0.1)}


def test_guest_on_a_sends_host_on_b_receives(clusters, job_id):
    a, b = clusters[GUEST], clusters[HOST]
    routes = direct_table(clusters)
    with connect(job_id, GUEST, a, routes) as g, connect(job_id, HOST, b, routes) as h:
        g.remote(OBJECT, "w", "0", [HOST])
        g.remote(TABLE, "t", "0", [HOST])
        [w] = h.get("w", "0", [GUEST], timeout=120)
        [t] = h.get("t", "0", [GUEST], timeout=120)
        assert np.array_equal(w["weights"], OBJECT["weights"]) and w["meta"] == ("lr", 0.1)
        assert t.num_partitions == 4 and t == TABLE
        h.remote("reply", "y", "0", [GUEST])  # B replicates to A too while A cleans up below
        assert g.get("y", "0", [HOST], timeout=120) == ["reply"]

        # What guest's session did on A, read back from A: B registered from the route table,
        # allowed for the tenant, replicated to; host's session on B only made its own namespace.
        registered = read(a, "/admin/v2/clusters/fl-pulsar-10000")
        assert registered["brokerServiceUrl"] == f"pulsar://127.0.0.1:{b.port}"
        assert registered["brokerServiceUrlTls"] == f"pulsar+ssl://127.0.0.1:{b.tls_port}"
        assert registered["serviceUrl"] == f"http://127.0.0.1:{b.web_port}"
        assert "fl-pulsar-10000" in read(a, f"/admin/v2/tenants/{TENANT}")["allowedClusters"]
        assert sorted(read(a, f"/admin/v2/namespaces/{TENANT}/{job_id}/replication")) == [
            "fl-pulsar-10000",
            "fl-pulsar-9999",
        ]
        assert sorted(read(b, f"/admin/v2/namespaces/{TENANT}/{job_id}/replication")) == [
            "fl-pulsar-10000",
            "fl-pulsar-9999",
        ]
        # Every message guest sent went out by A's replicator to B.
        out = sum(replicators(a, topic)["fl-pulsar-10000"]["msgOutCount"] for topic in lanes(GUEST, HOST, job_id))
        assert out == g.stats["messages_sent"]
    # Each party cleans its own cluster, guest first while host's replicator to A still runs.
    g.cleanup()
    assert_gone(a, job_id)
    h.cleanup()
    assert_gone(b, job_id)
    assert_gone(a, job_id)
    g.cleanup()  # idempotent
    h.cleanup()


def test_three_clusters_a_message_for_b_never_reaches_c(clusters, job_id):
    a, b, c = clusters[GUEST], clusters[HOST], clusters[ARBITER]
    routes = direct_table(clusters)
    with (
        connect(job_id, GUEST, a, routes) as g,
        connect(job_id, HOST, b, routes) as h,
        connect(job_id, ARBITER, c, routes) as r,
    ):
        g.remote(OBJECT, "w", "0", [HOST])
        g.remote(TABLE, "t", "0", [HOST])
        g.remote("for the arbiter", "z", "0", [ARBITER])
        assert np.array_equal(h.get("w", "0", [GUEST], timeout=120)[0]["weights"], OBJECT["weights"])
        assert h.get("t", "0", [GUEST], timeout=120)[0] == TABLE
        assert r.get("z", "0", [GUEST], timeout=120) == ["for the arbiter"]
        # Namespace-wide, A replicates to both: every topic of the job has a replicator to B and to C.
        assert sorted(read(a, f"/admin/v2/namespaces/{TENANT}/{job_id}/replication")) == [
            "fl-pulsar-10000",
            "fl-pulsar-10001",
            "fl-pulsar-9999",
        ]
        for topic in lanes(GUEST, HOST, job_id):
            # C's replicator has read past host's messages (nothing left for it on A)...
            wait_for(
                lambda topic=topic: replicators(a, topic).get("fl-pulsar-10001", {}).get("replicationBacklog") == 0,
                f"A's replicator to C to be through {topic}",
            )
            to_c = replicators(a, topic)["fl-pulsar-10001"]
            assert to_c["msgOutCount"] == 0
            # ...and C's copy of the topic, if its replicator made one, never had a message in.
            on_c = read(c, f"/admin/v2/{topic.replace('://', '/')}/stats")
            assert on_c is None or on_c["msgInCounter"] == 0, on_c
        # The other way round: the arbiter's message is nowhere on B.
        for topic in lanes(GUEST, ARBITER, job_id):
            on_b = read(b, f"/admin/v2/{topic.replace('://', '/')}/stats")
            assert on_b is None or on_b["msgInCounter"] == 0, on_b
    for fed in (r, h, g):  # the receivers first this time: A's replicators still run meanwhile
        fed.cleanup()
    for cluster in (a, b, c):
        assert_gone(cluster, job_id)


def test_star_network_through_an_sni_proxy(clusters, star, job_id):
    """FATE's star: the clusters reach each other only through haproxy, which routes by TLS name."""
    a, b = clusters[GUEST], clusters[HOST]
    names = {p: star.hostname(p.party_id) for p in (GUEST, HOST)}
    with HAProxy(sni_routes={names[p]: ("127.0.0.1", clusters[p].tls_port) for p in (GUEST, HOST)}) as proxy:

        def star_table(own: ft.Party) -> dict[str, Any]:
            """The star format (route_tables/pulsar_star_route_table.yaml) as ``own`` keeps it: its
            own cluster, everyone else as ``{party_id}.fate.test`` behind the proxy. Those names
            resolve nowhere, and the ports after them are never dialled: every replicator
            connection goes to the proxy, with the name as SNI."""
            b = clusters[own]
            return {
                own.party_id: {"host": "127.0.0.1", "port": b.port, "sslPort": b.tls_port},
                "default": {"proxy": f"127.0.0.1:{proxy.port}", "domain": DOMAIN, "port": 6650, "sslPort": 6651},
            }

        with connect(job_id, GUEST, a, star_table(GUEST)) as g, connect(job_id, HOST, b, star_table(HOST)) as h:
            g.remote(OBJECT, "w", "0", [HOST])
            g.remote(TABLE, "t", "0", [HOST])
            h.remote("reply", "y", "0", [GUEST])
            assert np.array_equal(h.get("w", "0", [GUEST], timeout=120)[0]["weights"], OBJECT["weights"])
            assert h.get("t", "0", [GUEST], timeout=120)[0] == TABLE
            assert g.get("y", "0", [HOST], timeout=120) == ["reply"]

            registered = read(a, "/admin/v2/clusters/fl-pulsar-10000")
            assert registered["brokerServiceUrlTls"] == "pulsar+ssl://10000.fate.test:6651"
            assert registered["proxyServiceUrl"] == f"pulsar+ssl://127.0.0.1:{proxy.port}"
            assert registered["proxyProtocol"] == "SNI"
            # Each side's replicator is connected to the proxy, not to the other broker.
            for src, dst, cluster, sender in ((GUEST, HOST, "fl-pulsar-10000", a), (HOST, GUEST, "fl-pulsar-9999", b)):
                link = replicators(sender, lanes(src, dst, job_id)[0])[cluster]
                assert link["connected"] and link["outboundConnection"].endswith(f":{proxy.port}]"), link
        g.cleanup()
        h.cleanup()
        for cluster in (a, b):
            assert_gone(cluster, job_id)
            forget(cluster)  # closes the replication clients: haproxy logs a session when it ends
        log = Path(proxy.log)

        def routed() -> str:
            text = log.read_text()
            return text if f"sni={names[GUEST]}" in text and f"sni={names[HOST]}" in text else ""

        text = wait_for(routed, "haproxy to log the replicators' sessions both ways")
        assert "<NOSRV>" not in text  # every connection asked for a name the proxy routes


def test_a_session_keeps_the_destinations_of_the_partys_other_sessions(clusters, job_id):
    """Sessions of guest on A (Spark executors, a retried task) share the job's namespace there:
    adding a destination, or connecting, never drops another session's destination (Pulsar would
    remove that replicator with what it had not sent yet)."""
    a = clusters[GUEST]
    routes = direct_table(clusters)
    expected = ["fl-pulsar-10000", "fl-pulsar-10001", "fl-pulsar-9999"]
    with (
        connect(job_id, HOST, clusters[HOST], routes) as h,
        connect(job_id, ARBITER, clusters[ARBITER], routes) as r,
        connect(job_id, GUEST, a, routes) as g1,
        connect(job_id, GUEST, a, routes) as g2,
    ):
        g1.remote("to host", "x", "0", [HOST])
        g2.remote("to arbiter", "x", "1", [ARBITER])
        assert sorted(read(a, f"/admin/v2/namespaces/{TENANT}/{job_id}/replication")) == expected
        with connect(job_id, GUEST, a, routes):  # a session that connects later
            assert sorted(read(a, f"/admin/v2/namespaces/{TENANT}/{job_id}/replication")) == expected
        g1.remote("to host again", "x", "2", [HOST])
        assert h.get("x", "0", [GUEST], timeout=120) == ["to host"]
        assert h.get("x", "2", [GUEST], timeout=120) == ["to host again"]
        assert r.get("x", "1", [GUEST], timeout=120) == ["to arbiter"]
    for fed in (g1, h, r):
        fed.cleanup()
    for cluster in clusters.values():
        assert_gone(cluster, job_id)


def topic_stats(b: PulsarStandalone, topic: str) -> dict[str, Any]:
    return read(b, f"/admin/v2/{topic.replace('://', '/')}/stats") or {}


def test_broadcast_stored_once_and_replicated_to_each_destination(clusters, job_id):
    """A ``remote`` to host (B) and arbiter (C): A stores the data once, on guest's broadcast
    topics, and A's replicators copy it to B and to C; per destination go only the heads."""
    a = clusters[GUEST]
    routes = direct_table(clusters)
    rng = np.random.default_rng(5)
    value = rng.random(3 * (1 << 20) // 8)  # 3 MiB, incompressible: several messages
    opts = {"max_message_size": 1 << 20}
    with (
        connect(job_id, GUEST, a, routes, **opts) as g,
        connect(job_id, HOST, clusters[HOST], routes, **opts) as h,
        connect(job_id, ARBITER, clusters[ARBITER], routes, **opts) as r,
    ):
        g.remote(value, "w", "0", [HOST, ARBITER])
        for fed in (h, r):
            [got] = fed.get("w", "0", [GUEST], timeout=120)
            np.testing.assert_array_equal(got, value)
        ours = f"persistent://{TENANT}/{job_id}/guest-9999-"
        topics = [t for t in read(a, f"/admin/v2/persistent/{TENANT}/{job_id}") if t.startswith(ours)]
        bcast = [t for t in topics if t.startswith(ours + "all-")]
        stored = {t: topic_stats(a, t) for t in topics}
        data_msgs = sum(int(stored[t]["msgInCounter"]) for t in bcast)
        # The broker's count: the data once on the broadcast topics, one head on each pair lane 0.
        assert bcast and data_msgs == g.stats["messages_sent"] - 2, (data_msgs, g.stats["messages_sent"])
        pair_msgs = sum(int(stored[t]["msgInCounter"]) for t in topics if t not in bcast)
        assert pair_msgs == 2
        data_bytes = sum(int(stored[t]["bytesInCounter"]) for t in bcast)
        assert value.nbytes <= data_bytes < 1.1 * value.nbytes
        assert sum(int(s["bytesInCounter"]) for s in stored.values()) < 1.1 * value.nbytes
        # Each destination's cluster got its copy from A's replicator, none from the sender.
        for cluster in ("fl-pulsar-10000", "fl-pulsar-10001"):
            out = sum(int(replicators(a, t)[cluster]["msgOutCount"]) for t in bcast)
            assert out == data_msgs, (cluster, out, data_msgs)
    for fed in (r, h, g):
        fed.cleanup()
    for cluster in clusters.values():
        assert_gone(cluster, job_id)
