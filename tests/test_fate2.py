"""FATE 2.x over fedtransport, with the real pyfate 2.2.0 (scripts/test.sh installs it).

Two parties in two processes, each with FATE's own ``Context`` and standalone computing, talk
over the real brokers (Apache Pulsar standalone, a RabbitMQ node): a dict holding an ndarray, a
4-partition KVTable, a KVTable nested in a dict, an array over FATE's 1 MiB max message size (FATE's
brokers would take it as a slice table; this federation sends it whole), a table sent back after
``mapValues``, then ``ctx.destroy()``.

pyfate's pickler runs ``import torch`` for every ``put`` only to ask ``isinstance(v,
torch.Tensor)``; the test environment leaves torch out (hundreds of MB), so when torch is not
importable the party processes register a ``torch`` module holding just a ``Tensor`` class that
nothing is an instance of, which answers that question as a real torch would for these values.
FATE users have torch installed (pyfate depends on it) and need nothing of the kind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fate.arch.computing.backends.standalone import CSession
from fate.arch.federation import FederationBuilder

from fedtransport.fate2 import FedtransportFederation, install, raw_partitions

try:
    from tests.rabbit_fixtures import rabbit_installed, rabbit_opts, rabbit_pair, rabbit_pool  # by parameter name
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from rabbit_fixtures import rabbit_installed, rabbit_opts, rabbit_pair, rabbit_pool  # type: ignore[no-redef]  # noqa: F401

pytestmark = pytest.mark.timeout(600)

GUEST, HOST = ("guest", "9999"), ("host", "10000")
PARTIES = [GUEST, HOST]
ROOT = Path(__file__).resolve().parents[1]

# One party of the exchange; argv[1] is a JSON mapping of its settings. It prints one JSON line
# with what it saw, for the test to check.
PARTY = r"""
import json, sys, time, types
from pathlib import Path
try:
    import torch  # noqa: F401
except ImportError:  # see the module docstring of tests/test_fate2.py
    stand_in = types.ModuleType("torch")
    stand_in.Tensor = type("Tensor", (), {})
    sys.modules["torch"] = stand_in
import numpy as np
from fedtransport.fate2 import create_context

a = json.loads(sys.argv[1])
me = tuple(a["party"])
ctx = create_context(me, [tuple(p) for p in a["parties"]], a["job"], a["backend"], a["options"],
                     computing_conf={"computing.standalone.data_dir": a["data_dir"]}, timeout=240)
done = Path(a["done"])
out = {}
pushed = []  # the tables this party's federation sent: FATE's slice tables would be among them
real_push_table = ctx.federation._push_table
ctx.federation._push_table = lambda **kw: (pushed.append(kw["name"]), real_push_table(**kw))  # FATE passes keywords
if me[0] == "guest":
    table = ctx.computing.parallelize([(i, f"v{i}") for i in range(1000)], partition=4, include_key=True)
    nested = ctx.computing.parallelize([(f"k{i}", i * i) for i in range(50)], partition=3, include_key=True)
    ctx.hosts.put("d", {"w": np.arange(10, dtype=np.float64), "s": "fate"})
    ctx.hosts.put("t", table)
    ctx.hosts.put("nest", {"table": nested, "n": 3})
    ctx.hosts.put("big", np.arange(600_000, dtype=np.float64))  # 4.8 MB, over FATE's 1 MiB
    back = ctx.hosts[0].get("back")
    out["back_partitions"] = back.num_partitions
    out["back_ok"] = dict(back.collect()) == {i: f"v{i}!" for i in range(1000)}
    done.write_text("read")
else:
    d = ctx.guest.get("d")
    out["d_ok"] = d["s"] == "fate" and np.array_equal(d["w"], np.arange(10, dtype=np.float64))
    t = ctx.guest.get("t")
    out["t"] = [t.num_partitions, t.key_serdes_type, t.value_serdes_type, t.partitioner_type]
    out["t_ok"] = dict(t.collect()) == {i: f"v{i}" for i in range(1000)}
    nest = ctx.guest.get("nest")
    out["nest_n"] = nest["n"]
    out["nest_partitions"] = nest["table"].num_partitions
    out["nest_ok"] = dict(nest["table"].collect()) == {f"k{i}": i * i for i in range(50)}
    big = ctx.guest.get("big")
    out["big_ok"] = np.array_equal(big, np.arange(600_000, dtype=np.float64))
    ctx.guest.put("back", t.mapValues(lambda v: v + "!"))
    # destroy deletes the job's broker resources: not before the guest has read "back"
    deadline = time.monotonic() + 240
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
ctx.destroy()
out["closed"] = ctx.federation.federation.closed
out["tables_pushed"] = len(pushed)
print(json.dumps(out), flush=True)
"""


def _exchange(tmp_path: Path, job: str, backend: str, options: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run both parties; their reports by role."""
    procs = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for party in PARTIES:
        args = {
            "party": party, "parties": PARTIES, "job": job, "backend": backend, "options": options(),
            "data_dir": str(tmp_path / party[0]), "done": str(tmp_path / "done"),
        }  # fmt: skip
        procs[party[0]] = subprocess.Popen(
            [sys.executable, "-c", PARTY, json.dumps(args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        )  # fmt: skip
    reports: dict[str, Any] = {}
    try:
        for role, proc in procs.items():
            out, err = proc.communicate(timeout=400)
            assert proc.returncode == 0, f"{role} failed:\n{err[-4000:]}"
            reports[role] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return reports


def _check(reports: dict[str, Any]) -> None:
    host, guest = reports["host"], reports["guest"]
    assert host["d_ok"]
    assert host["t"] == [4, 0, 0, 0]  # partitions, key/value serdes types, partitioner type
    assert host["t_ok"]
    assert (host["nest_n"], host["nest_partitions"], host["nest_ok"]) == (3, 3, True)
    assert host["big_ok"]
    # t and the nested table; "big" (4.8 MB) went as one push of bytes, not a slice table
    assert (guest["tables_pushed"], host["tables_pushed"]) == (2, 1)
    assert (guest["back_partitions"], guest["back_ok"]) == (4, True)
    assert host["closed"] and guest["closed"]


def test_fate_contexts_exchange_over_pulsar(tmp_path: Path, job_id: str, pulsar_standalone: Any) -> None:
    broker = pulsar_standalone
    opts = {"service_url": broker.service_url, "admin_url": broker.admin_url}
    _check(_exchange(tmp_path, job_id, "pulsar", lambda: dict(opts)))


def test_fate_contexts_exchange_over_rabbitmq(tmp_path: Path, job_id: str, request: pytest.FixtureRequest) -> None:
    if not rabbit_installed():
        pytest.skip("rabbitmq-server is not installed (scripts/test.sh installs it)")
    node = request.getfixturevalue("rabbit_pair")[0]
    _check(_exchange(tmp_path, job_id, "rabbitmq", lambda: rabbit_opts(node)))


def test_raw_partitions_keep_the_layout_of_a_standalone_table(tmp_path: Path) -> None:
    session = CSession(session_id=f"raw-{os.getpid()}-{time.time_ns()}", data_dir=str(tmp_path))
    try:
        table = session.parallelize([(i, i) for i in range(200)], partition=4, include_key=True)
        parts = [list(p) for p in raw_partitions(table)]
        assert len(parts) == 4 and all(parts)
        assert sum(map(len, parts)) == 200
        for p, records in enumerate(parts):  # each record where the table's partitioner puts it
            assert all(table.partitioner(k, 4) == p for k, _ in records)
            assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in records)
        assert sorted(table.key_serdes.deserialize(k) for part in parts for k, _ in part) == list(range(200))
    finally:
        session.destroy()


def test_install_lets_fate_s_builder_select_fedtransport(tmp_path: Path, job_id: str) -> None:
    install()
    install()  # idempotent
    session = CSession(session_id=f"inst-{os.getpid()}-{time.time_ns()}", data_dir=str(tmp_path))
    conf = {"federation.fedtransport.backend": "memory", "federation.fedtransport.options": {"hub": job_id}}
    fed = FederationBuilder(job_id, GUEST, PARTIES).build(session, "fedtransport", conf)
    try:
        assert isinstance(fed, FedtransportFederation)
        assert (fed.local_party, fed.parties, fed.world_size) == (GUEST, PARTIES, 2)
        assert fed.session_id == job_id and fed.federation.backend == "memory"
    finally:
        fed.destroy()
        session.destroy()
    assert fed.federation.closed
    # FATE's own engines still go through the original if/elif
    with pytest.raises(ValueError):
        FederationBuilder(job_id, GUEST, PARTIES).build(session, "no-such-engine", {})


def test_a_party_outside_the_parties_is_refused(job_id: str) -> None:
    from fedtransport.errors import ConfigError

    with pytest.raises(ConfigError, match="not one of the parties"):
        FedtransportFederation.from_conf(job_id, None, ("arbiter", "1"), PARTIES, "memory", {})


def test_install_lets_fate_s_load_federation_take_a_custom_spec(tmp_path: Path, job_id: str) -> None:
    install()
    from fate.components.core import load_federation
    from fate.components.core.spec.federation import CustomFederationSpec

    spec = CustomFederationSpec(
        type="custom",
        metadata={
            "engine": "fedtransport", "federation_id": job_id, "backend": "memory", "options": {"hub": job_id},
            "parties": {"local": {"role": "host", "partyid": "10000"},
                        "parties": [{"role": "guest", "partyid": "9999"}, {"role": "host", "partyid": "10000"}]},
        },
    )  # fmt: skip
    session = CSession(session_id=f"load-{os.getpid()}-{time.time_ns()}", data_dir=str(tmp_path))
    fed = load_federation(spec, session)
    try:
        assert isinstance(fed, FedtransportFederation)
        assert (fed.local_party, fed.parties) == (HOST, PARTIES)
    finally:
        fed.destroy()
        session.destroy()
    # the execute CLI imports it from either module at call time: both hold the wrapper
    from fate.components.core import _load_federation

    assert _load_federation.load_federation is load_federation


# ---------------------------------------------------------------- the standalone writer, the pushes
# In one process over the memory backend: a plain fedtransport session sends what FATE's would,
# and FATE's pull_table / push_table / push_bytes (its public Federation API) drive the hooks.

SMALL_UNITS = {"max_message_size": 65536}  # 64 KiB units; a lane's window is 4 of them


def _keys_by_partition(n: int, per: int) -> list[list[bytes]]:
    """``per`` serialised int keys for each of ``n`` partitions, as FATE's default partitioner places them."""
    from fate.arch.computing.partitioners import get_partitioner_by_type
    from fate.arch.computing.serdes import get_serdes_by_type

    place, serdes = get_partitioner_by_type(0), get_serdes_by_type(0)
    parts: list[list[bytes]] = [[] for _ in range(n)]
    i = 0
    while min(map(len, parts)) < per:
        key = serdes.serialize(i)
        if len(parts[place(key, n)]) < per:
            parts[place(key, n)].append(key)
        i += 1
    return parts


def _host_federation(tmp_path: Path, job_id: str) -> tuple[FedtransportFederation, CSession]:
    session = CSession(session_id=f"w-{os.getpid()}-{time.time_ns()}", data_dir=str(tmp_path / "host"))
    opts = {"hub": job_id, **SMALL_UNITS}
    return FedtransportFederation.from_conf(job_id, session, HOST, PARTIES, "memory", opts, timeout=20), session


class _Watched:
    """A received partition that tells when its reading began."""

    def __init__(self, part: Any, began: Any) -> None:
        self._part, self._began = part, began

    def __iter__(self) -> Any:
        self._began.set()
        return iter(self._part)

    def batches(self) -> Any:
        self._began.set()
        return self._part.batches()


def test_a_table_of_many_partitions_is_written_by_several_writers_at_once(
    tmp_path: Path, job_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender holds partition 0 back until the receiver began reading partition 1: read one
    partition after the other, as before, the receiver would wait on 0 until its timeout."""
    import threading

    from fate.arch.federation.api import TableMeta

    import fedtransport as ft

    n, per, value = 8, 120, b"v" * 10_000  # 1.2 MB a partition, 64 KiB units: ~19 units each
    keys = _keys_by_partition(n, per)
    began = [threading.Event() for _ in range(n)]

    def partition(p: int) -> Any:
        for i, key in enumerate(keys[p]):
            if p == 0 and i == 10:
                assert began[1].wait(30), "the receiver never began partition 1 while partition 0 was open"
            yield key, value + key

    host, session = _host_federation(tmp_path, job_id)
    received: list[Any] = []  # the tables as received stay referenced while their partitions are read
    real_get = host.federation.get

    def get(*args: Any, **kwargs: Any) -> Any:
        received.extend(real_get(*args, **kwargs))
        return [ft.Table([_Watched(t.raw_partition(p), began[p]) for p in range(t.num_partitions)]) for t in received]

    monkeypatch.setattr(host.federation, "get", get)
    guest = ft.Federation.connect("memory", job_id=job_id, party=ft.Party(*GUEST), options={"hub": job_id,
                                  **SMALL_UNITS})  # fmt: skip
    try:
        sender = threading.Thread(target=guest.remote, args=(ft.Table([partition(p) for p in range(n)]), "t", "0",
                                                             [ft.Party(*HOST)]))  # fmt: skip
        sender.start()
        [table] = host.pull_table("t", "0", [GUEST], [TableMeta(n, 0, 0, 0)])
        sender.join(30)
        assert all(b.is_set() for b in began)
        assert table.num_partitions == n and table.count() == n * per
        assert dict(table.table.collect()) == {k: value + k for part in keys for k in part}
        for p, records in enumerate(raw_partitions(table)):  # each partition in its own LMDB store
            assert sorted(k for k, _ in records) == sorted(keys[p])
            # a transaction per received unit (~19 a partition here), so that LMDB never holds a
            # whole partition's dirty pages in memory
            with table.table._get_env_for_partition(p) as env:
                assert env.info()["last_txnid"] >= 10
    finally:
        host.destroy()
        guest.close()
        session.destroy()


def test_a_record_in_the_wrong_partition_is_an_integrity_error(tmp_path: Path, job_id: str) -> None:
    from fate.arch.federation.api import TableMeta

    import fedtransport as ft
    from fedtransport.errors import IntegrityError

    keys = _keys_by_partition(2, 5)
    host, session = _host_federation(tmp_path, job_id)
    with ft.Federation.connect("memory", job_id=job_id, party=ft.Party(*GUEST), options={"hub": job_id}) as guest:
        standalone = session.get_standalone_session()
        tables = Path(standalone._data_dir) / standalone.session_id
        try:  # partition 0 holds a key of partition 1
            guest.remote(ft.Table([[(k, b"x") for k in keys[0] + keys[1][:1]], []]), "t", "0", [ft.Party(*HOST)])
            before = set(tables.glob("*"))
            with pytest.raises(IntegrityError, match="belongs in partition 1 of 2"):
                host.pull_table("t", "0", [GUEST], [TableMeta(2, 0, 0, 0)])
            assert set(tables.glob("*")) <= before  # the table made for it is gone, with all it committed
        finally:
            host.destroy()
            session.destroy()


class _Unreadable:
    """A KVTable whose records cannot be read (its store is gone): its push fails while it streams."""

    num_partitions = 2

    @staticmethod
    def partitioner(key: bytes, n: int) -> int:
        return 0

    def _collect(self) -> Any:
        raise RuntimeError("the table's store is gone")


def test_a_table_that_failed_to_go_out_raises_at_the_next_put(tmp_path: Path, job_id: str) -> None:
    from fedtransport.errors import BackendError

    session = CSession(session_id=f"p-{os.getpid()}-{time.time_ns()}", data_dir=str(tmp_path))
    fed = FedtransportFederation.from_conf(job_id, session, GUEST, PARTIES, "memory", {"hub": job_id})
    try:
        fed.push_table(_Unreadable(), "t", "0", [HOST])  # returns: the table goes out in the background
        fed.push_bytes(b"names t", "v", "0", [HOST])  # the same put: its pickle goes out at once
        with pytest.raises(BackendError, match="store is gone"):
            fed.push_bytes(b"next", "w", "0", [HOST])  # the next put waits for the table, and raises
        fed.push_bytes(b"after", "x", "0", [HOST])  # raised once: the session goes on
    finally:
        fed.destroy()
        session.destroy()
    assert fed.federation.closed


def test_a_table_that_failed_to_go_out_raises_at_destroy(tmp_path: Path, job_id: str) -> None:
    from fedtransport.errors import BackendError

    session = CSession(session_id=f"d-{os.getpid()}-{time.time_ns()}", data_dir=str(tmp_path))
    fed = FedtransportFederation.from_conf(job_id, session, GUEST, PARTIES, "memory", {"hub": job_id})
    try:
        fed.push_table(_Unreadable(), "t", "0", [HOST])
        with pytest.raises(BackendError, match="store is gone"):
            fed.destroy()
        assert fed.federation.closed  # closed and cleaned up all the same
    finally:
        session.destroy()


# ---------------------------------------------------------------- objects over FATE's 1 MiB


def _contexts(tmp_path: Path, job_id: str, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> dict[str, Any]:
    """Guest's and host's FATE ``Context`` in this process over the memory backend; each
    federation counts the tables it pushes (FATE's slice tables among them)."""
    import importlib.util
    import types

    from fate.arch.context import Context

    if importlib.util.find_spec("torch") is None:  # see the module docstring
        stand_in = types.ModuleType("torch")
        stand_in.Tensor = type("Tensor", (), {})  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "torch", stand_in)
    ctxs: dict[str, Any] = {}
    for party in PARTIES:
        session = CSession(session_id=f"o-{party[0]}-{time.time_ns()}", data_dir=str(tmp_path / party[0]))
        fed = FedtransportFederation.from_conf(job_id, session, party, PARTIES, "memory", {"hub": job_id},
                                               timeout=20, **kw)  # fmt: skip
        fed.pushed = []  # type: ignore[attr-defined]
        real = fed._push_table
        monkeypatch.setattr(
            fed, "_push_table", lambda f=fed, real=real, **kw: (f.pushed.append(kw["name"]), real(**kw))
        )
        ctxs[party[0]] = Context(computing=session, federation=fed)
    return ctxs


def _close(ctxs: dict[str, Any]) -> None:
    for ctx in ctxs.values():
        ctx.federation.destroy()
        ctx.computing.destroy()


@pytest.mark.parametrize("limit", [None, 1 << 20])
def test_an_object_over_fate_s_1_mib_goes_whole_unless_a_limit_is_set(
    tmp_path: Path, job_id: str, monkeypatch: pytest.MonkeyPatch, limit: int | None
) -> None:
    """By default a 4.8 MB array is one push of its pickle, no slice table; with
    ``max_message_size`` FATE cuts it into slice tables again, and both arrive whole."""
    import numpy as np

    ctxs = _contexts(tmp_path, job_id, monkeypatch, max_message_size=limit)
    try:
        big = np.arange(600_000, dtype=np.float64)
        ctxs["guest"].hosts.put("big", big)
        assert np.array_equal(ctxs["host"].guest.get("big"), big)
        assert len(ctxs["guest"].federation.pushed) == (0 if limit is None else 1)
    finally:
        _close(ctxs)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "1MiB", True])
def test_a_bad_max_message_size_is_a_config_error(tmp_path: Path, job_id: str, bad: Any) -> None:
    from fedtransport.errors import ConfigError

    session = CSession(session_id=f"m-{os.getpid()}-{time.time_ns()}", data_dir=str(tmp_path))
    try:
        with pytest.raises(ConfigError, match="max_message_size"):
            FedtransportFederation.from_conf(job_id, session, GUEST, PARTIES, "memory", {"hub": job_id},
                                             max_message_size=bad)  # fmt: skip
    finally:
        session.destroy()
