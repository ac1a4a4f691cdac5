"""The FATE side by side of the benchmark (fedtransport/bench/fate.py): its workloads, the ``--fate``
flag, where it applies, and a small real run over RabbitMQ that produces ratios.

The real run uses the session's RabbitMQ node (tests/rabbit_fixtures.py) in place of the node the
benchmark would start, FATE 2.2 (pyfate) in both party processes, FATE's own ``RabbitmqFederation``
and fedtransport's, and a 1 MiB table: it checks that every repetition is measured and compared,
never how fast (the machine is shared).
"""

from __future__ import annotations

import contextlib
from contextlib import ExitStack
from typing import Any

import pytest

from fedtransport import bench
from fedtransport.bench.fate import FATE_WORKLOADS

try:
    from tests.rabbit_fixtures import rabbit_installed, rabbit_pair, rabbit_pool  # by parameter name
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from rabbit_fixtures import rabbit_installed, rabbit_pair, rabbit_pool  # type: ignore[no-redef]  # noqa: F401

pytestmark = pytest.mark.timeout(300)

KINDS = ["object", "table-8x4", "table", "small"]
MiB = 1 << 20


def test_every_fate_workload_is_registered_against_fate_s_own_federation() -> None:
    assert [f"fate-{e}-{k}" for k in KINDS for e in ("native", "ft")] == FATE_WORKLOADS
    for kind in KINDS:
        native, ours = bench.WORKLOADS[f"fate-native-{kind}"], bench.WORKLOADS[f"fate-ft-{kind}"]
        assert native.baseline is None and ours.baseline == f"fate-native-{kind}"
        assert not native.default and not ours.default  # only with --fate or --only
        assert native.flag == ours.flag == "fate"


def test_the_fate_flag_runs_the_comparison_alone_unless_only_names_workloads() -> None:
    args = bench.build_parser().parse_args(["--fate"])
    assert args.fate and args.only == FATE_WORKLOADS
    args = bench.build_parser().parse_args(["--only", "fate-native-small", "fate-ft-small", "--fate"])
    assert args.only == ["fate-native-small", "fate-ft-small"]
    args = bench.build_parser().parse_args([])
    assert not args.fate and not args.only


def _context(backend: str, **broker: Any) -> bench.BenchContext:
    args = bench.build_parser().parse_args(["--fate", "--backend", backend])
    return bench.BenchContext(args, backend, ExitStack(), lambda *a: pytest.fail("no raw"), lambda *a, **k: None,
                              broker)  # fmt: skip


def test_the_comparison_skips_brokers_fate_s_own_federation_cannot_use() -> None:
    # pulsar-lite has no admin API (FATE's PulsarFederation needs it); a federated RabbitMQ would
    # need FATE's replication mode and an upstream per job.
    embedded = _context("pulsar", kind="embedded", service_url="pulsar://127.0.0.1:1")
    federated = _context("rabbitmq", nodes=(None, None), options={}, routes={})
    federated.args.mode = "federated"
    for ctx in (embedded, federated):
        assert all(bench.WORKLOADS[name].factory(ctx) is None for name in FATE_WORKLOADS)
    real = _context("pulsar", kind="standalone", service_url="pulsar://127.0.0.1:6650",
                    admin_url="http://127.0.0.1:8080")  # fmt: skip
    assert all(bench.WORKLOADS[name].factory(real) is not None for name in FATE_WORKLOADS)


def test_a_small_fate_run_over_rabbitmq_produces_ratios(request: pytest.FixtureRequest,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    pytest.importorskip("fate.arch.federation.backends.rabbitmq")
    pytest.importorskip("numpy")
    if not rabbit_installed():
        pytest.skip("rabbitmq-server is not installed (scripts/test.sh installs it)")
    node = request.getfixturevalue("rabbit_pair")[0]
    # the run's "own" node is the session's: no second node boots on a loaded machine
    monkeypatch.setattr("fedtransport.brokers.RabbitNode", lambda **kw: contextlib.nullcontext(node))
    args = bench.build_parser().parse_args(["--backend", "rabbitmq", "--mib", "1", "--repeat", "1", "--warmup", "0",
                                            "--only", "fate-native-table", "fate-ft-table"])  # fmt: skip
    lines: list[str] = []
    results = bench.run(args, lines.append)
    w = results["workloads"]
    assert set(w) == {"fate-native-table", "fate-ft-table"}
    for name in w:  # every record of the 1 MiB table arrived, over FATE's federation and ours
        [run] = w[name]["runs"]
        assert run["bytes"] == 1 * MiB and run["seconds"] > 0
        # each side's CPU over the transfer, the sender's background pushes too, and the broker's
        assert run["cpu_sender"] > 0 and run["cpu_receiver"] > 0 and run["cpu_broker"] > 0, run
    ratio = results["ratios"]["fate-ft-table"]
    assert results["baselines"]["fate-ft-table"] == "fate-native-table"
    assert len(ratio["per_repeat"]) == 1 and ratio["median"] > 0 and ratio["worst"] == ratio["per_repeat"][0]
    assert any(line.startswith("ratio fate-ft-table / fate-native-table") for line in lines)


def test_the_chart_names_fate_s_own_federation_as_the_baseline() -> None:
    run = {"seconds": 2.0, "bytes": 8 * MiB, "MB_per_s": 4.2}
    fast = {"seconds": 0.5, "bytes": 8 * MiB, "MB_per_s": 16.8}
    small, small_fast = ({"seconds": s, "bytes": 1024 * 1000, "MB_per_s": 0.1} for s in (10.0, 1.0))
    result = {
        "backend": "rabbitmq", "mode": "shared", "date": "2026-12-06",
        "workloads": {"fate-native-table": bench.summarize([run]), "fate-ft-table": bench.summarize([fast]),
                      "fate-native-small": bench.summarize([small]), "fate-ft-small": bench.summarize([small_fast])},
        "baselines": {"fate-ft-table": "fate-native-table", "fate-ft-small": "fate-native-small"},
        "ratios": {"fate-ft-table": {"median": 4.0, "worst": 4.0, "per_repeat": [4.0]},
                   "fate-ft-small": {"median": 10.0, "worst": 10.0, "per_repeat": [10.0]}},
    }  # fmt: skip
    panels = {p.title: p for p in bench.chart_layout([result])}
    assert set(panels) == {"FATE: table, 8 partitions", "FATE: 1 KiB objects"}
    table = panels["FATE: table, 8 partitions"]
    assert table.unit == "MB/s"
    [group] = table.groups
    assert [(b.workload, b.note) for b in group.bars] == [("fate-native-table", "FATE"),
                                                          ("fate-ft-table", "4.00×, worst 4.00×")]  # fmt: skip
    small_panel = panels["FATE: 1 KiB objects"]
    assert small_panel.unit == "objects/s"
    assert [round(b.value) for b in small_panel.groups[0].bars] == [100, 1000]


def _fate_context(tmp_path: Any, job_id: str, party: tuple[str, str]) -> Any:
    """FATE's own ``Context`` over FATE over fedtransport (the memory backend), as a bench party holds."""
    from fate.arch.computing.backends.standalone import CSession
    from fate.arch.context import Context

    from fedtransport.fate2 import FedtransportFederation

    parties = [("guest", "9999"), ("host", "10000")]
    session = CSession(session_id=f"b-{party[0]}-{job_id}", data_dir=str(tmp_path / party[0]))
    fed = FedtransportFederation.from_conf(job_id, session, party, parties, "memory", {"hub": job_id})
    return Context(computing=session, federation=fed)


def test_a_fate_destroy_that_hangs_is_left_behind_at_its_deadline(
    tmp_path: Any, job_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """FATE's Pulsar destroy once hung for good (admin calls without a timeout on a wedged broker):
    the party must end all the same. Here the destroy waits on a table push that cannot finish."""
    import threading

    pytest.importorskip("fate.arch.context")
    from fedtransport.bench.fate import _bounded_destroy

    ctx = _fate_context(tmp_path, job_id, ("guest", "9999"))
    release = threading.Event()

    class _Blocked:  # a KVTable whose records come only once released: destroy waits for its push
        num_partitions = 1

        @staticmethod
        def partitioner(key: bytes, n: int) -> int:
            return 0

        def _collect(self) -> Any:
            release.wait(120)
            return iter([])

    ctx.federation.push_table(_Blocked(), "t", "0", [("host", "10000")])
    cfg = {"engine": "fedtransport", "backend": "rabbitmq", "job_id": job_id, "destroy_timeout": 0.5}
    try:
        _bounded_destroy(ctx, cfg, "guest")  # returns at its deadline, the destroy still waiting
        assert not ctx.federation.federation.closed
        assert "still running after 0.5 s; left behind" in capsys.readouterr().err
    finally:
        release.set()


def test_on_pulsar_only_guest_runs_fate_s_own_destroy(tmp_path: Any, job_id: str) -> None:
    """Both parties' namespace-wide unsubscribe at once wedged Pulsar's admin REST: host skips it."""
    pytest.importorskip("fate.arch.context")
    from fedtransport.bench.fate import _bounded_destroy

    host = _fate_context(tmp_path, job_id, ("host", "10000"))
    guest = _fate_context(tmp_path, job_id, ("guest", "9999"))
    cfg = {"engine": "native", "backend": "pulsar", "job_id": job_id}
    try:
        _bounded_destroy(host, cfg, "host")
        assert not host.federation.federation.closed
        # its computing pool is shut down, or its workers would hold the party's exit
        with pytest.raises(RuntimeError, match="shutdown"):
            host.computing._session._pool._pool.submit(int)
        _bounded_destroy(guest, cfg, "guest")
        assert guest.federation.federation.closed
    finally:
        host.federation.destroy()
