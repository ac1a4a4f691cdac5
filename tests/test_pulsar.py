"""Pulsar backend against a real pulsar-lite broker (and a recording fake of the admin API)."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import random
import re
import threading
import urllib.request
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from conftest import ARBITER, GUEST, HOST
from party_proc import big_array, digest, receiver, wait_for
from pulsar_admin_fake import FakePulsarAdmin

import fedtransport as ft
from fedtransport.brokers import EmbeddedPulsar
from fedtransport.transport.pulsar import PulsarTransport

SPAWN = mp.get_context("spawn")


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedPulsar]:
    with EmbeddedPulsar() as b:
        yield b


def connect(job_id: str, party: ft.Party, url: str, **options) -> ft.Federation:
    return ft.Federation.connect("pulsar", job_id=job_id, party=party, options={"service_url": url, **options})


def job_topics(b: EmbeddedPulsar, job_id: str) -> dict[str, dict[str, float]]:
    """What pulsar-lite shows of a job's topics: its metrics endpoint is the only listing it has."""
    text = urllib.request.urlopen(b.metrics_url, timeout=10).read().decode()
    topics: dict[str, dict[str, float]] = {}
    for metric, labels, value in re.findall(r"^(\w+)\{([^}]*)\} (\S+)$", text, re.M):
        if f'namespace="fl-tenant/{job_id}"' in labels and "subscription=" not in labels:
            topic = re.search(r'topic="([^"]+)"', labels).group(1)
            topics.setdefault(topic, {})[metric] = float(value)
    return topics


def test_shared_object_and_table_roundtrip(broker, job_id):
    with connect(job_id, GUEST, broker.service_url) as g, connect(job_id, HOST, broker.service_url) as h:
        obj = {"w": np.arange(1000.0), "meta": ("lr", 0.1)}
        table = ft.Table.from_partitions([[(f"k{p}{i}", i * p) for i in range(500)] for p in range(4)])
        g.remote(obj, "w", "0", [HOST])
        g.remote(table, "t", "0", [HOST])
        [w] = h.get("w", "0", [GUEST], timeout=30)
        [t] = h.get("t", "0", [GUEST], timeout=30)
        assert np.array_equal(w["w"], obj["w"]) and w["meta"] == ("lr", 0.1)
        assert t == table
    lanes = {f"guest-9999-host-10000-{lane}" for lane in range(4)}
    wait_for(lambda: set(job_topics(broker, job_id)) == lanes, "the four lanes in pulsar-lite's metrics")


def test_direct_mode_produces_to_the_destination_broker(job_id):
    with EmbeddedPulsar() as b_guest, EmbeddedPulsar() as b_host:
        routes = {
            "9999": {"host": "127.0.0.1", "port": b_guest.port},
            "10000": {"host": "127.0.0.1", "port": b_host.port},
        }
        g = ft.Federation.connect("pulsar", job_id=job_id, party=GUEST, route_table=routes,
                                  options={"service_url": b_guest.service_url, "mode": "direct"})  # fmt: skip
        h = ft.Federation.connect("pulsar", job_id=job_id, party=HOST, route_table=routes,
                                  options={"service_url": b_host.service_url, "mode": "direct"})  # fmt: skip
        with g, h:
            g.remote(np.arange(10), "x", "0", [HOST])
            h.remote(ft.Table.from_partitions([[(1, "a")], [(2, "b")]]), "t", "0", [GUEST])
            assert np.array_equal(h.get("x", "0", [GUEST], timeout=30)[0], np.arange(10))
            assert g.get("t", "0", [HOST], timeout=30)[0].collect() == [(1, "a"), (2, "b")]
        # guest -> host traffic lives on host's broker only, and the other way round
        assert {t.rsplit("-", 1)[0] for t in job_topics(b_host, job_id)} == {"guest-9999-host-10000"}
        assert {t.rsplit("-", 1)[0] for t in job_topics(b_guest, job_id)} == {"host-10000-guest-9999"}


def test_three_parties_and_a_remote_to_two(broker, job_id):
    url = broker.service_url
    with connect(job_id, GUEST, url) as g, connect(job_id, HOST, url) as h, connect(job_id, ARBITER, url) as a:
        a.remote({"pubkey": 65537}, "key", "0", [GUEST, HOST])
        g.remote(np.ones(100), "grad", "0", [ARBITER])
        h.remote(np.full(100, 2.0), "grad", "0", [ARBITER])
        assert g.get("key", "0", [ARBITER], timeout=30) == [{"pubkey": 65537}]
        assert h.get("key", "0", [ARBITER], timeout=30) == [{"pubkey": 65537}]
        gg, hg = a.get("grad", "0", [GUEST, HOST], timeout=30)
        assert gg.sum() == 100 and hg.sum() == 200


def test_200_interleaved_transfers_got_in_random_order(broker, job_id):
    rng = random.Random(11)
    with connect(job_id, GUEST, broker.service_url) as g, connect(job_id, HOST, broker.service_url) as h:
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
            [v] = h.get(name, tag, [GUEST], timeout=30)
            expected = sent[(name, tag)]
            assert np.array_equal(v, expected) if isinstance(expected, np.ndarray) else v == expected


def test_256_mib_object(broker, job_id):
    a = big_array(256)
    with connect(job_id, GUEST, broker.service_url) as g, connect(job_id, HOST, broker.service_url) as h:
        got: dict = {}
        t = threading.Thread(target=lambda: got.update(v=h.get("big", "0", [GUEST], timeout=300)))
        t.start()
        g.remote(a, "big", "0", [HOST])
        t.join(300)
        assert np.array_equal(got["v"][0], a)


def test_get_timeout_names_the_missing_party(broker, job_id):
    url = broker.service_url
    with connect(job_id, GUEST, url) as g, connect(job_id, HOST, url) as h:
        h.remote(1, "x", "0", [GUEST])
        with pytest.raises(ft.TransferTimeout, match="arbiter:10001") as err:
            g.get("x", "0", [HOST, ARBITER], timeout=1.5)
        assert list(err.value.missing) == ["arbiter:10001"]


def test_receiver_terminated_mid_transfer_gets_it_all_after_restart(job_id):
    a = big_array(16)
    with EmbeddedPulsar() as b:
        options = {"service_url": b.service_url, "max_message_size": 65536, "redelivery_after": 3.0,
                   "client": {"operation_timeout_seconds": 5}}  # fmt: skip
        q = SPAWN.Queue()
        args = ("pulsar", job_id, ("host", "10000"), ("guest", "9999"), options, "w", "0", q)
        first = SPAWN.Process(target=receiver, args=(*args, 50))
        first.start()
        with ft.Federation.connect("pulsar", job_id=job_id, party=GUEST, options=options) as g:
            t = threading.Thread(target=g.remote, args=(a, "w", "0", [HOST]))
            t.start()
            kind, n = q.get(timeout=120)
            assert kind == "progress" and n >= 50
            # SIGTERM mid-transfer (256 messages), as a container stop does: nothing was handed
            # over, so nothing was acknowledged. (With SIGKILL, pulsar-lite can keep the dead
            # consumer and its messages for minutes; a real broker does not: docs/pulsar.md.)
            first.terminate()
            first.join(10)
            t.join(120)
        second = SPAWN.Process(target=receiver, args=args)
        second.start()
        kind, got = q.get(timeout=280)
        second.join(30)
        assert (kind, got) == ("done", digest(a))


def test_broker_killed_and_restarted_mid_transfer(job_id):
    a = big_array(64)
    with EmbeddedPulsar() as b:
        url = b.service_url
        with connect(job_id, GUEST, url) as g:
            result: dict = {}
            sender = threading.Thread(target=lambda: result.update(sent=g.remote(a, "w", "0", [HOST])))
            sender.start()
            threading.Event().wait(0.3)
            b.kill()  # SIGKILL mid-remote: no graceful anything
            threading.Event().wait(1.0)
            b.restart()  # same port, same data dir
            sender.join(240)
            assert "sent" in result, "remote did not complete after the broker came back"
        # The receiver subscribes after the restart. pulsar-lite sometimes loses messages it had
        # already confirmed when it is SIGKILLed (docs/pulsar.md); then the receiver's timeout
        # names what is missing and the sender's retry of the same remote fills the gaps, the
        # duplicates being dropped. Either way the bytes must come out identical.
        with connect(job_id, HOST, url) as h:
            try:
                [v] = h.get("w", "0", [GUEST], timeout=20)
            except ft.TransferTimeout as exc:
                assert "guest:9999" in exc.missing
                with connect(job_id, GUEST, url) as g2:
                    g2.remote(a, "w", "0", [HOST])
                [v] = h.get("w", "0", [GUEST], timeout=120)
        assert digest(v) == digest(a)


def test_cleanup_deletes_topics_and_namespace_through_the_admin_api(broker, job_id):
    with FakePulsarAdmin() as fake:
        fake.state.clusters["standalone"] = {"brokerServiceUrl": broker.service_url}  # the broker's own cluster
        opts = {"service_url": broker.service_url, "admin_url": fake.url, "publish_rate": {"messages": 30}}
        g = ft.Federation.connect("pulsar", job_id=job_id, party=GUEST, options=opts)
        h = ft.Federation.connect("pulsar", job_id=job_id, party=HOST, options=opts)
        with g, h:
            g.remote(np.zeros(600_000), "x", "0", [HOST])  # 4.8 MB: two messages, two lanes
            h.get("x", "0", [GUEST], timeout=30)
        ns_path = f"/admin/v2/namespaces/fl-tenant/{job_id}"
        setup = fake.calls()
        assert ("PUT", "/admin/v2/tenants/fl-tenant") in setup
        assert ("PUT", ns_path) in setup
        assert ("POST", f"{ns_path}/messageTTL") in setup and ("POST", f"{ns_path}/retention") in setup
        rate = [r for r in fake.requests if r.path == f"{ns_path}/publishRate"]
        assert rate and rate[0].body == {"publishThrottlingRateInMsg": 30, "publishThrottlingRateInByte": -1}
        # the broker knows the topics the data plane created; pulsar-lite cannot tell the fake, we do
        wait_for(lambda: len(job_topics(broker, job_id)) == 4, "the four lanes in pulsar-lite's metrics")
        for topic in job_topics(broker, job_id):
            fake.add_topic(f"persistent://fl-tenant/{job_id}/{topic}")
        fake.clear()
        g.cleanup()
        h.cleanup()  # idempotent: everything is gone already
        deletes = [c for c in fake.calls() if c[0] == "DELETE"]
        topic_deletes = {p for m, p in deletes if "/persistent/" in p}
        assert topic_deletes == {f"/admin/v2/persistent/fl-tenant/{job_id}/guest-9999-host-10000-{i}" for i in range(4)}
        assert ("DELETE", ns_path) in deletes
        assert not fake.state.namespaces and not fake.state.topics
    # What pulsar-lite itself shows: no producer or consumer is left on any job topic. (The
    # subscriptions go with the topics, which the fake admin API deletes only in its own books.)
    wait_for_topics(broker, job_id, lambda subs, producers, consumers: producers == consumers == 0,
                    "no producer or consumer left")  # fmt: skip


def wait_for_topics(b: EmbeddedPulsar, job_id: str, ok: Callable[[float, float, float], bool], what: str) -> None:
    """Wait until ``ok(subscriptions, producers, consumers)`` holds on every job topic.

    pulsar-lite's metrics are a snapshot it refreshes every few seconds: a first reading may
    predate what the test just did."""

    def counts() -> dict[str, tuple[float, float, float]]:
        return {t: (m["pulsar_subscriptions_count"], m["pulsar_producers_count"], m["pulsar_consumers_count"])
                for t, m in job_topics(b, job_id).items()}  # fmt: skip

    try:
        wait_for(lambda: (c := counts()) and all(ok(*v) for v in c.values()), what, bound=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; (subscriptions, producers, consumers) per topic: {counts()}") from None


def test_cleanup_without_the_admin_api_drops_the_subscriptions(broker, job_id):
    """Without admin_url, cleanup can only unsubscribe: the broker then keeps no backlog for the job."""
    g, h = connect(job_id, GUEST, broker.service_url), connect(job_id, HOST, broker.service_url)
    with g, h:
        g.remote(np.zeros(600_000), "x", "0", [HOST])
        h.get("x", "0", [GUEST], timeout=30)
    # first the subscriptions as pulsar-lite shows them, so that their absence below means something
    wait_for_topics(broker, job_id, lambda subs, producers, consumers: subs == 1, "host's subscription on every lane")
    h.cleanup()  # after close: it attaches once more to each lane to unsubscribe
    g.cleanup()
    wait_for_topics(broker, job_id, lambda subs, producers, consumers: subs == producers == consumers == 0,
                    "no subscription, producer or consumer left")  # fmt: skip


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


def test_unreachable_broker_is_a_backend_error(job_id):
    from fedtransport.brokers._process import free_port

    with pytest.raises(ft.BackendError):
        connect(job_id, GUEST, f"pulsar://127.0.0.1:{free_port()}", client={"operation_timeout_seconds": 2})


def test_topic_naming():
    ctx = ft.transport.JobContext("job-1", GUEST, None, {**PulsarTransport.option_defaults, "service_url": "x"},
                                  4 << 20, lanes=4, lane_offset=0)  # fmt: skip
    t = PulsarTransport(ctx)
    assert t.topic(GUEST, HOST, 3) == "persistent://fl-tenant/job-1/guest-9999-host-10000-3"
    shifted = PulsarTransport(dataclasses.replace(ctx, lane_offset=1024))
    assert shifted.topic(GUEST, HOST, 3) == "persistent://fl-tenant/job-1/guest-9999-host-10000-1027"
