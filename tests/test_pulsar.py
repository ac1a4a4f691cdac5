"""The Pulsar backend on the real Apache Pulsar broker (``PulsarStandalone``, one per test session).

Parties of different tests are kept apart by their job ids: each job is a namespace
``fl-tenant/{job_id}`` that the test creates through the backend's control plane and deletes at
the end. What the broker holds is read back through its own admin REST (``broker.admin``), never
through the client under test. Faults (broker and party processes killed) are in
tests/test_faults.py; TLS, tokens and direct mode between two brokers in tests/test_pulsar_tls.py;
replication between clusters in tests/test_pulsar_replication.py.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import ARBITER, GUEST, HOST
from party_proc import big_array
from standalone_fixtures import admin_read as read

import fedtransport as ft
from fedtransport.brokers.standalone import PulsarStandalone
from fedtransport.transport.pulsar import PulsarTransport
from fedtransport.transport.pulsar.admin import PulsarAdmin

# The session broker may first resolve its jars with Maven (~35 s cold) and start (5-10 s).
pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def broker(pulsar_standalone: PulsarStandalone, job_id: str) -> Iterator[PulsarStandalone]:
    """The session's broker; the test's namespace is gone afterwards, whatever the test did."""
    yield pulsar_standalone
    PulsarAdmin(pulsar_standalone.admin_url).delete_namespace("fl-tenant", job_id)


def connect(
    job_id: str, party: ft.Party, broker: PulsarStandalone, route_table: Any = None, **options: Any
) -> ft.Federation:
    opts = {"service_url": broker.service_url, "admin_url": broker.admin_url, **options}
    return ft.Federation.connect("pulsar", job_id=job_id, party=party, route_table=route_table, options=opts)


def lanes(src: ft.Party, dst: ft.Party, job_id: str, n: int = 4) -> set[str]:
    return {
        f"persistent://fl-tenant/{job_id}/{src.role}-{src.party_id}-{dst.role}-{dst.party_id}-{i}" for i in range(n)
    }


def presence(job_id: str, *parties: ft.Party) -> set[str]:
    """Each connected party's presence topic (fedtransport/transport/pulsar/presence.py)."""
    return {f"persistent://fl-tenant/{job_id}/present-{p.role}-{p.party_id}" for p in parties}


def test_shared_object_and_table_roundtrip(broker, job_id):
    with connect(job_id, GUEST, broker) as g, connect(job_id, HOST, broker) as h:
        obj = {"w": np.arange(1000.0), "meta": ("lr", 0.1)}
        table = ft.Table.from_partitions([[(f"k{p}{i}", i * p) for i in range(500)] for p in range(4)])
        g.remote(obj, "w", "0", [HOST])  # before host subscribes: the namespace's retention keeps it
        g.remote(table, "t", "0", [HOST])
        [w] = h.get("w", "0", [GUEST], timeout=60)
        [t] = h.get("t", "0", [GUEST], timeout=60)
        assert np.array_equal(w["w"], obj["w"]) and w["meta"] == ("lr", 0.1)
        assert t == table
        # parties x lanes topics, each with host's one durable subscription, and a presence topic per party
        topics = set(read(broker, f"/admin/v2/persistent/fl-tenant/{job_id}"))
        assert topics == lanes(GUEST, HOST, job_id) | presence(job_id, GUEST, HOST)
        for topic in lanes(GUEST, HOST, job_id):
            stats = read(broker, f"/admin/v2/persistent/{topic.split('://')[1]}/stats")
            assert list(stats["subscriptions"]) == ["fedtransport-host-10000"]
            assert stats["subscriptions"]["fedtransport-host-10000"]["type"] == "Shared"


def test_three_parties_and_a_remote_to_two(broker, job_id):
    with connect(job_id, GUEST, broker) as g, connect(job_id, HOST, broker) as h, connect(job_id, ARBITER, broker) as a:
        a.remote({"pubkey": 65537}, "key", "0", [GUEST, HOST])
        g.remote(np.ones(100), "grad", "0", [ARBITER])
        h.remote(np.full(100, 2.0), "grad", "0", [ARBITER])
        assert g.get("key", "0", [ARBITER], timeout=60) == [{"pubkey": 65537}]
        assert h.get("key", "0", [ARBITER], timeout=60) == [{"pubkey": 65537}]
        gg, hg = a.get("grad", "0", [GUEST, HOST], timeout=60)
        assert np.array_equal(gg, np.ones(100)) and np.array_equal(hg, np.full(100, 2.0))


def test_200_interleaved_transfers_got_in_random_order(broker, job_id):
    rng = random.Random(11)
    with connect(job_id, GUEST, broker) as g, connect(job_id, HOST, broker) as h:
        sent = {}
        for i in range(200):
            value = (
                np.full(rng.randint(0, 3000), i, dtype=np.int32) if i % 2 else {"i": i, "s": "x" * rng.randint(0, 9000)}
            )
            sent[(f"v{i % 7}", str(i))] = value
            g.remote(value, f"v{i % 7}", str(i), [HOST])
        keys = list(sent)
        rng.shuffle(keys)
        for name, tag in keys:
            [v] = h.get(name, tag, [GUEST], timeout=60)
            expected = sent[(name, tag)]
            assert np.array_equal(v, expected) if isinstance(expected, np.ndarray) else v == expected


def test_256_mib_object(broker, job_id):
    a = big_array(256)
    with connect(job_id, GUEST, broker) as g, connect(job_id, HOST, broker) as h:
        got: dict = {}
        t = threading.Thread(target=lambda: got.update(v=h.get("big", "0", [GUEST], timeout=300)))
        t.start()
        g.remote(a, "big", "0", [HOST])
        t.join(300)
        assert np.array_equal(got["v"][0], a)
        g.cleanup()  # 256 MiB on the session's bookie: give the space back now


def test_get_timeout_names_the_missing_party(broker, job_id):
    with connect(job_id, GUEST, broker) as g, connect(job_id, HOST, broker) as h:
        h.remote(1, "x", "0", [GUEST])
        with pytest.raises(ft.TransferTimeout, match="arbiter:10001") as err:
            g.get("x", "0", [HOST, ARBITER], timeout=1.5)
        assert list(err.value.missing) == ["arbiter:10001"]


def test_control_plane_sets_up_the_namespace_and_cleanup_deletes_it(broker, job_id):
    """connect() makes tenant and namespace with TTL, retention and publish rate; cleanup() deletes
    the topics and the namespace while the other party is still connected, and is idempotent."""
    opts = {"publish_rate": {"messages": 30}, "ttl_seconds": 7200}
    g, h = connect(job_id, GUEST, broker, **opts), connect(job_id, HOST, broker, **opts)
    ns = f"/admin/v2/namespaces/fl-tenant/{job_id}"
    with g, h:
        assert broker.cluster in read(broker, "/admin/v2/tenants/fl-tenant")["allowedClusters"]
        assert f"fl-tenant/{job_id}" in read(broker, "/admin/v2/namespaces/fl-tenant")
        assert read(broker, f"{ns}/messageTTL") == 7200
        assert read(broker, f"{ns}/retention") == {"retentionTimeInMinutes": 120, "retentionSizeInMB": -1}
        assert read(broker, f"{ns}/publishRate") == {
            "publishThrottlingRateInMsg": 30,
            "publishThrottlingRateInByte": -1,
        }
        # the lanes are plain (non-partitioned) topics whatever the broker's default
        assert read(broker, f"{ns}/autoTopicCreation") == {
            "allowAutoTopicCreation": True,
            "topicType": "non-partitioned",
        }
        g.remote(np.zeros(600_000), "x", "0", [HOST])  # 4.8 MB: two messages, two lanes
        h.remote(np.ones(600_000), "x", "0", [GUEST])
        assert np.array_equal(h.get("x", "0", [GUEST], timeout=60)[0], np.zeros(600_000))
        assert np.array_equal(g.get("x", "0", [HOST], timeout=60)[0], np.ones(600_000))
        lane_topics = lanes(GUEST, HOST, job_id) | lanes(HOST, GUEST, job_id)
        assert set(read(broker, f"{ns}/topics")) == lane_topics | presence(job_id, GUEST, HOST)
        # Host's producers and consumers are still connected and reconnect when their topics go:
        # cleanup must not let them create the topics again, or the namespace would not be empty.
        g.cleanup()
        assert read(broker, ns) is None
        assert read(broker, f"{ns}/topics") is None
        assert f"fl-tenant/{job_id}" not in read(broker, "/admin/v2/namespaces/fl-tenant")
    h.cleanup()  # idempotent: everything is gone already
    g.cleanup()
    assert read(broker, ns) is None


def test_cleanup_deletes_partitioned_topics_too(broker, job_id):
    """A partitioned topic someone made in the job's namespace: Pulsar refuses to delete a
    namespace while its partitioned-topic metadata is there, even once the partitions are gone."""
    with connect(job_id, GUEST, broker) as g:
        topic = f"/admin/v2/persistent/fl-tenant/{job_id}/extra"
        broker.admin("PUT", f"{topic}/partitions", 3)
        broker.admin("PUT", f"/admin/v2/persistent/fl-tenant/{job_id}/plain")
        assert read(broker, f"/admin/v2/persistent/fl-tenant/{job_id}/partitioned") == [
            f"persistent://fl-tenant/{job_id}/extra"
        ]
        g.cleanup()
    assert read(broker, f"/admin/v2/namespaces/fl-tenant/{job_id}") is None


def test_cleanup_without_the_admin_api_drops_the_subscriptions(broker, job_id):
    """Without admin_url the operator makes the namespace (with retention); cleanup can only
    unsubscribe, and then the broker keeps no backlog for the job."""
    admin = PulsarAdmin(broker.admin_url)
    admin.ensure_tenant("fl-tenant", [broker.cluster])
    admin.create_namespace("fl-tenant", job_id)
    admin.set_retention("fl-tenant", job_id, 60, -1)
    opts = {"service_url": broker.service_url}
    g = ft.Federation.connect("pulsar", job_id=job_id, party=GUEST, options=opts)
    h = ft.Federation.connect("pulsar", job_id=job_id, party=HOST, options=opts)
    with g, h:
        g.remote(np.zeros(600_000), "x", "0", [HOST])
        h.get("x", "0", [GUEST], timeout=60)

    def subscriptions() -> dict[str, list[str]]:
        topics = read(broker, f"/admin/v2/persistent/fl-tenant/{job_id}") or []
        return {
            t: list(read(broker, f"/admin/v2/persistent/{t.split('://')[1]}/stats")["subscriptions"]) for t in topics
        }

    assert subscriptions() == {t: ["fedtransport-host-10000"] for t in lanes(GUEST, HOST, job_id)}
    h.cleanup()  # after close: it attaches once more to each lane to unsubscribe
    g.cleanup()
    assert subscriptions() == {t: [] for t in lanes(GUEST, HOST, job_id)}


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_address_is_refused_up_front_with_what_to_give_instead(broker, job_id, host):
    """pulsar-client parses no IPv6 literal (apache/pulsar-client-cpp#48; a DNS name that resolves to
    one works). Left alone it fails inside the client with "invalid hostname"; refused here, before."""
    for url in (f"pulsar://{ft.routing.url_host(host)}:{broker.port}", f"pulsar://h:1,{host}",
                f"pulsar+ssl://user@[{host.strip('[]')}]:6651/"):  # fmt: skip
        with pytest.raises(ft.ConfigError, match=r"service_url.*pulsar-client-cpp#48.*DNS name"):
            connect(job_id, GUEST, broker, service_url=url)
    here = {"host": "127.0.0.1", "port": broker.port, "cluster": broker.cluster}
    routes = {"9999": here, "10000": {**here, "host": host}, ARBITER.party_id: here}
    with (
        connect(job_id, GUEST, broker, mode="direct", route_table=routes) as g,
        connect(job_id, ARBITER, broker, mode="direct", route_table=routes) as a,
    ):
        with pytest.raises(ft.RouteError, match=r"party 10000's host ::1: .*pulsar-client-cpp#48"):
            g.remote(np.arange(3), "x", "0", [HOST])
        g.remote(np.arange(3), "x", "0", [ARBITER])  # the session goes on
        assert np.array_equal(a.get("x", "0", [GUEST], timeout=60)[0], np.arange(3))
    g.cleanup()
    a.cleanup()


def test_options_are_checked():
    with pytest.raises(ft.ConfigError, match="route_table"):
        ft.Federation.connect(
            "pulsar", job_id="j", party=GUEST, options={"service_url": "pulsar://x:1", "mode": "direct"}
        )
    with pytest.raises(ft.ConfigError, match="admin_url"):
        ft.Federation.connect("pulsar", job_id="j", party=GUEST, route_table={"9999": {"host": "h"}},
                              options={"service_url": "pulsar://x:1", "mode": "replication"})  # fmt: skip
    with pytest.raises(ft.ConfigError, match="mode"):
        ft.Federation.connect("pulsar", job_id="j", party=GUEST, options={"mode": "multicast"})
    with pytest.raises(ft.ConfigError, match="unknown option"):
        ft.Federation.connect("pulsar", job_id="j", party=GUEST, options={"servce_url": "pulsar://x:1"})
    for key in ("send_timeout", "subscribe_timeout"):
        for bad in (0, -1.5, "30", True):
            with pytest.raises(ft.ConfigError, match=f"{key}.*positive number of seconds"):
                ft.Federation.connect("pulsar", job_id="j", party=GUEST,
                                      options={"service_url": "pulsar://x:1", key: bad})  # fmt: skip


def test_unreachable_broker_is_a_backend_error(job_id):
    from fedtransport.brokers._process import free_port

    url = f"pulsar://127.0.0.1:{free_port()}"
    with pytest.raises(ft.BackendError, match=url):
        ft.Federation.connect("pulsar", job_id=job_id, party=GUEST,
                              options={"service_url": url, "client": {"operation_timeout_seconds": 2}})  # fmt: skip


def test_topic_naming():
    ctx = ft.transport.JobContext("job-1", GUEST, None, {**PulsarTransport.option_defaults, "service_url": "x"},
                                  4 << 20, lanes=4, lane_offset=0)  # fmt: skip
    t = PulsarTransport(ctx)
    assert t.topic(GUEST, HOST, 3) == "persistent://fl-tenant/job-1/guest-9999-host-10000-3"
    shifted = PulsarTransport(dataclasses.replace(ctx, lane_offset=1024))
    assert shifted.topic(GUEST, HOST, 3) == "persistent://fl-tenant/job-1/guest-9999-host-10000-1027"


def test_receive_lanes_listen_on_connections_of_their_own(broker, job_id):
    """Lanes a session listens on are spread over ``receive_connections`` TCP connections apart from
    the one it produces on: pulsar-lite stalls consumers that share a connection. Seen from outside:
    the client address of each lane's consumer in the broker's topic stats, and this process's sockets."""
    import os
    from pathlib import Path

    def client_port(address: str) -> int:  # "/127.0.0.1:41234"
        return int(address.rsplit(":", 1)[1])

    def consumer_ports(src: ft.Party, dst: ft.Party) -> list[int]:
        ports = []
        for topic in sorted(lanes(src, dst, job_id)):
            stats = read(broker, f"/admin/v2/persistent/{topic.split('://')[1]}/stats")
            [consumer] = stats["subscriptions"][PulsarTransport.subscription(dst)]["consumers"]
            ports.append(client_port(consumer["address"]))
        return ports

    def publisher_ports(src: ft.Party, dst: ft.Party) -> set[int]:
        ports = set()
        for topic in lanes(src, dst, job_id):
            stats = read(broker, f"/admin/v2/persistent/{topic.split('://')[1]}/stats")
            ports |= {client_port(p["address"]) for p in (stats or {}).get("publishers", [])}
        return ports

    def our_connections() -> set[int]:
        """Local ports of this process's established TCP connections to the broker's port."""
        inodes = set()
        for fd in Path("/proc/self/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
        ports = set()
        for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
            cols = line.split()  # sl, local, remote, state (01 = ESTABLISHED), ..., inode (index 9)
            if cols[3] == "01" and cols[9] in inodes and int(cols[2].split(":")[1], 16) == broker.port:
                ports.add(int(cols[1].split(":")[1], 16))
        return ports

    big = np.arange(1 << 18, dtype=np.float64)  # 2 MiB: spread over the 4 lanes
    with connect(job_id, GUEST, broker) as g, connect(job_id, HOST, broker) as h, \
         connect(job_id, ARBITER, broker, receive_connections=1) as a:  # fmt: skip
        g.remote(big, "w", "0", [HOST, ARBITER])
        h.remote(1, "x", "0", [GUEST])  # host and arbiter produce too, on their sessions' own connection
        a.remote(2, "x", "0", [GUEST])
        [got_h] = h.get("w", "0", [GUEST], timeout=60)
        [got_a] = a.get("w", "0", [GUEST], timeout=60)
        assert np.array_equal(got_h, big) and np.array_equal(got_a, big)
        assert g.get("x", "0", [HOST, ARBITER], timeout=60) == [1, 2]

        host_in, arbiter_in = consumer_ports(GUEST, HOST), consumer_ports(GUEST, ARBITER)
        host_out, arbiter_out = publisher_ports(HOST, GUEST), publisher_ports(ARBITER, GUEST)
        assert len(set(host_in)) == 4  # receive_connections=4 (the default): one connection per lane
        assert len(set(arbiter_in)) == 1  # receive_connections=1: the four lanes share one
        assert len(host_out) == 1 and len(arbiter_out) == 1
        assert not host_out & set(host_in) and not arbiter_out & set(arbiter_in)  # apart from the producers'
        # ... and each of them is a TCP connection of this very process to the broker
        assert {*host_in, *arbiter_in, *host_out, *arbiter_out} <= our_connections()
