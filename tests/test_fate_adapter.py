"""fedtransport.fate: FATE 1.x's federation interface (remote/get/destroy, gc, from_conf) over fedtransport.

Against the memory backend, and one round trip through the real Apache Pulsar broker (the
session's standalone), its admin API where FATE's conf points (``mng_port``).
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from standalone_fixtures import admin_read

import fedtransport as ft
from fedtransport.brokers.standalone import PulsarStandalone
from fedtransport.fate import FateFederation, GarbageCollector, fate_options, to_party
from fedtransport.transport.pulsar.admin import PulsarAdmin


class FateParty:
    """The shape of ``fate_arch.common.Party``: role and party_id as strings, ordered, hashable."""

    def __init__(self, role: str, party_id: int | str) -> None:
        self.role, self.party_id = str(role), str(party_id)

    def __hash__(self) -> int:
        return hash((self.role, self.party_id))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FateParty) and (self.role, self.party_id) == (other.role, other.party_id)

    def __lt__(self, other: FateParty) -> bool:
        return (self.role, self.party_id) < (other.role, other.party_id)


GUEST, HOST, ARBITER = FateParty("guest", 9999), FateParty("host", 10000), FateParty("arbiter", 10001)


class ComputingTable:
    """A scheduler's own table type (FATE's computing tables have ``destroy()``)."""

    def __init__(self, partitions: list[list[tuple[Any, Any]]]) -> None:
        self.partitions = partitions
        self.destroyed = False

    def destroy(self) -> None:
        self.destroyed = True


def to_table(v: Any) -> ft.Table | None:
    return ft.Table.from_partitions(v.partitions) if isinstance(v, ComputingTable) else None


def from_table(t: ft.Table) -> ComputingTable:
    return ComputingTable(t.partitions)


@pytest.fixture
def sessions(job_id: str) -> Iterator[dict[str, FateFederation]]:
    hub = {"hub": job_id}
    feds = {
        p.role: FateFederation.connect("memory", job_id, p, options=hub, timeout=30) for p in (GUEST, HOST, ARBITER)
    }
    yield feds
    for fed in feds.values():
        fed.destroy([GUEST, HOST, ARBITER])


def test_parties_map_onto_fedtransport_parties() -> None:
    assert to_party(GUEST) == ft.Party("guest", "9999")
    assert to_party(("host", 10000)) == ft.Party("host", "10000")
    assert to_party(ft.Party("arbiter", 1)) == ft.Party("arbiter", "1")
    with pytest.raises(ft.ConfigError):
        to_party(object())


def test_remote_and_get_objects_in_party_order(sessions: dict[str, FateFederation]) -> None:
    guest, host, arbiter = sessions["guest"], sessions["host"], sessions["arbiter"]
    guest.remote({"w": 1}, "w", "iter-0", [HOST, ARBITER], None)
    host.remote(np.arange(3), "g", "iter-0", [GUEST], None)
    arbiter.remote("from arbiter", "g", "iter-0", [GUEST], None)
    assert host.get("w", "iter-0", [GUEST], None) == [{"w": 1}]
    assert arbiter.get("w", "iter-0", [GUEST], None) == [{"w": 1}]
    # FATE: "a list ... get from parties with same order of `parties`", whatever the arrival order
    got = guest.get("g", "iter-0", [ARBITER, HOST], None)
    assert got[0] == "from arbiter" and np.array_equal(got[1], np.arange(3))


def test_keyword_calls_as_fate_makes_them(sessions: dict[str, FateFederation]) -> None:
    guest, host = sessions["guest"], sessions["host"]
    gc = GarbageCollector()
    guest.remote(v=[1, 2, 3], name="x", tag="t", parties=[HOST], gc=gc)
    assert host.get(name="x", tag="t", parties=[GUEST], gc=gc) == [[1, 2, 3]]
    assert gc.pending() == 0  # objects are not tables: nothing for the collector


def test_tables_travel_as_tables_and_register_gc_actions(job_id: str) -> None:
    kw = {"options": {"hub": job_id}, "timeout": 30, "to_table": to_table, "from_table": from_table}
    guest = FateFederation.connect("memory", job_id, GUEST, **kw)
    host = FateFederation.connect("memory", job_id, HOST, **kw)
    try:
        sent = ComputingTable([[(i, i * i) for i in range(p * 10, p * 10 + 10)] for p in range(3)])
        send_gc, get_gc = GarbageCollector(capacity=1), GarbageCollector(capacity=1)
        guest.remote(sent, "t", "iter-0", [HOST], send_gc)
        [got] = host.get("t", "iter-0", [GUEST], get_gc)
        assert isinstance(got, ComputingTable) and got.partitions == sent.partitions
        # like FATE's federations: both tables are registered under their tag, to be destroyed later
        assert send_gc.pending() == 1 and get_gc.pending() == 1
        guest.remote(ComputingTable([[(0, 0)]]), "t", "iter-1", [HOST], send_gc)
        host.get("t", "iter-1", [GUEST], get_gc)
        send_gc.gc()  # capacity 1: the older tag's tables go
        get_gc.gc()
        assert sent.destroyed and got.destroyed
        get_gc.clean()
        assert get_gc.pending() == 0

        plain = ft.Table.from_partitions([[("a", 1)], [("b", 2)]])
        gc = GarbageCollector()
        guest.remote(plain, "plain", "0", [HOST], gc)
        [back] = host.get("plain", "0", [GUEST], None)
        assert isinstance(back, ComputingTable) and back.partitions == [[("a", 1)], [("b", 2)]]
        assert gc.pending() == 0  # a fedtransport Table is plain memory: nothing to destroy
    finally:
        guest.destroy([GUEST, HOST])
        host.destroy([GUEST, HOST])


def test_gc_must_look_like_fates(sessions: dict[str, FateFederation]) -> None:
    table = ft.Table.from_partitions([[(1, 1)]])
    with pytest.raises(ft.ConfigError, match="add_gc_action"):
        sessions["guest"].remote(ComputingTable([[(1, 1)]]), "t", "0", [HOST], gc=object())
    sessions["guest"].remote(table, "t2", "0", [HOST], gc=GarbageCollector())


def test_a_failing_gc_action_is_logged_not_raised() -> None:
    class Broken:
        def destroy(self) -> None:
            raise RuntimeError("already gone")

    gc = GarbageCollector(capacity=0)
    gc.add_gc_action("t", Broken(), "destroy", {})
    gc.gc()
    assert gc.pending() == 0


def test_from_conf_picks_the_backend_from_the_runtime_conf(job_id: str) -> None:
    runtime_conf = {"job_parameters": {"common": {"federation_engine": "STANDALONE"}}}
    guest = FateFederation.from_conf(job_id, GUEST, runtime_conf, options={"hub": job_id})
    host = FateFederation.from_conf(job_id, HOST, runtime_conf, service_conf={}, options={"hub": job_id})
    try:
        assert guest.session_id == job_id and guest.party == ft.Party("guest", "9999")
        guest.remote("hi", "m", "0", [HOST], None)
        assert host.get("m", "0", [GUEST], None) == ["hi"]
    finally:
        guest.destroy()
        host.destroy()
    with pytest.raises(ft.ConfigError, match="EGGROLL"):
        FateFederation.from_conf(job_id, GUEST, {"job_parameters": {"federation_engine": "EGGROLL"}})
    with pytest.raises(ft.ConfigError, match="which backend"):
        FateFederation.from_conf(job_id, GUEST, {})


def test_fate_service_conf_maps_onto_options() -> None:
    pulsar_conf = {
        "host": "10.0.0.4",
        "port": 6650,
        "mng_port": 8080,
        "topic_ttl": 30,
        "tenant": "fl",
        "cluster": "party-a",
        "mode": "client",
        "route_table": "conf/pulsar_route_table.yaml",
        "fedtransport": {"secret": "a job secret shared by every party"},
    }
    run = {"max_message_size": 1 << 20, "producer": {"send_timeout_millis": 5000}, "consumer": {}}
    opts, routes = fate_options("pulsar", pulsar_conf, run)
    assert opts == {
        "service_url": "pulsar://10.0.0.4:6650",
        "admin_url": "http://10.0.0.4:8080",
        "mode": "shared",  # FATE's "client" mode: produce and consume on the one broker each conf names
        "ttl_seconds": 1800,  # FATE's topic_ttl is in minutes
        "tenant": "fl",
        "cluster": "party-a",
        "max_message_size": 1 << 20,
        "producer": {"send_timeout_millis": 5000},
        "secret": "a job secret shared by every party",
    }
    assert routes == "conf/pulsar_route_table.yaml"
    # replication (FATE's default with a route table) needs the admin API: FATE's port 8080 by default
    opts, _ = fate_options("pulsar", {"host": "b", "route_table": "r.yaml"})
    assert opts["mode"] == "replication" and opts["admin_url"] == "http://b:8080"
    # an embedded broker without an admin API: no admin_url unless mng_port is given
    assert "admin_url" not in fate_options("pulsar", {"host": "127.0.0.1", "port": 6650})[0]

    rabbit_conf = {
        "host": "10.0.0.5",
        "port": 5672,
        "mng_port": 15672,
        "user": "fate",
        "password": "pw",
        "mode": "replication",
        "max_message_size": 1 << 20,
    }
    opts, routes = fate_options("rabbitmq", rabbit_conf, {"max_message_size": 2 << 20})
    assert opts == {
        "host": "10.0.0.5",
        "port": 5672,
        "mng_port": 15672,
        "user": "fate",
        "password": "pw",
        "mode": "federated",
        "max_message_size": 2 << 20,
    }
    assert routes is None
    with pytest.raises(ft.ConfigError, match="port"):
        fate_options("rabbitmq", {"port": "amqp"})


def test_destroy_is_idempotent_and_sessions_are_not_picklable(job_id: str) -> None:
    fed = FateFederation.connect("memory", job_id, GUEST, options={"hub": job_id})
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(fed)
    fed.destroy([GUEST, HOST])
    fed.destroy([GUEST, HOST])
    fed.cleanup([GUEST, HOST])  # the older FATE name


# ---------------------------------------------------------------------------- a real broker


def fate_flow_task(
    federation_cls: type,
    session_id: str,
    party: FateParty,
    conf: dict[str, Any],
    peer: FateParty,
    results: dict[str, Any],
    received: Callable[[], None] = lambda: None,
) -> None:
    """What a FATE-Flow-style task does with whatever federation class it is configured with;
    the host calls ``received`` once it holds everything, before it answers."""
    runtime_conf = {"job_parameters": {"pulsar_run": {"max_message_size": 1 << 20}}}
    fed = federation_cls.from_conf(
        federation_session_id=session_id, party=party, runtime_conf=runtime_conf, pulsar_config=conf
    )
    gc = GarbageCollector()
    try:
        if party.role == "guest":
            fed.remote(np.full(300_000, 7.0), "w", "iter-0", [peer], gc)  # 2.4 MB: three 1 MiB messages
            fed.remote(
                ft.Table.from_partitions([[(i, str(i)) for i in range(p, 500, 4)] for p in range(4)]),
                "t",
                "iter-0",
                [peer],
                gc,
            )
            results["guest"] = fed.get("done", "iter-0", [peer], gc)
        else:
            [w] = fed.get("w", "iter-0", [peer], gc)
            [t] = fed.get("t", "iter-0", [peer], gc)
            results["host"] = (float(w.sum()), sorted(t.collect()))
            received()
            fed.remote("ok", "done", "iter-0", [peer], gc)
    finally:
        if party.role == "guest":
            fed.destroy(parties=[GUEST, HOST])
        else:
            fed.close()


def test_round_trip_through_a_real_broker(job_id: str, pulsar_standalone: PulsarStandalone) -> None:
    broker = pulsar_standalone
    # FATE-Flow's service_conf.yaml "pulsar" section; mng_port is where the admin API answers
    conf = {"host": "127.0.0.1", "port": broker.port, "mng_port": broker.web_port, "topic_ttl": 30}
    ns = f"/admin/v2/namespaces/fl-tenant/{job_id}"
    results: dict[str, Any] = {}
    errors: list[BaseException] = []
    try:

        def received() -> None:  # the job's namespace, read through the broker's own admin REST
            results["ttl"] = admin_read(broker, f"{ns}/messageTTL")

        def party(me: FateParty, peer: FateParty) -> None:
            try:
                fate_flow_task(FateFederation, job_id, me, conf, peer, results, received)
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)

        threads = [
            threading.Thread(target=party, args=(GUEST, HOST)),
            threading.Thread(target=party, args=(HOST, GUEST)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
        assert results["guest"] == ["ok"]
        assert results["host"] == (2_100_000.0, sorted((i, str(i)) for i in range(500)))
        assert results["ttl"] == 30 * 60  # FATE's topic_ttl is in minutes
        assert admin_read(broker, ns) is None  # destroy() removed the session's namespace
    finally:
        PulsarAdmin(broker.admin_url).delete_namespace("fl-tenant", job_id)
