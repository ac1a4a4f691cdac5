"""The benchmark report: medians and worst runs, interleaved repetitions, the chart's groups, and
workloads that move the bytes of their raw baseline.

The chart test renders the committed results the way docs/cli.md does
(``fedtransport bench --from-json benchmarks/results/throughput-*.json --chart ...``) and reads
the group labels and bars from the calls made to matplotlib, not from pixels. The report tests
run the harness on a fake backend whose repetitions take times the test chose.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from fedtransport import bench
from fedtransport.cli import main

ROOT = Path(__file__).resolve().parent.parent
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("throughput-*.json"))
MiB = 1 << 20


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, dict[str, list[Any]]]]:
    """What render_chart hands matplotlib, per Axes: x tick positions and labels, bars (x, height)."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    calls: dict[int, dict[str, list[Any]]] = {}
    set_xticks, bar = Axes.set_xticks, Axes.bar

    def record_ticks(self: Axes, ticks: Any, labels: Any = None, **kwargs: Any) -> Any:
        entry = calls.setdefault(id(self), {"ticks": [], "labels": [], "bars": []})
        entry["ticks"] = [float(t) for t in ticks]
        entry["labels"] = [str(label) for label in labels]
        return set_xticks(self, ticks, labels, **kwargs)

    def record_bars(self: Axes, x: Any, height: Any, *args: Any, **kwargs: Any) -> Any:
        entry = calls.setdefault(id(self), {"ticks": [], "labels": [], "bars": [], "whiskers": []})
        entry["bars"] += [(float(a), float(h)) for a, h in zip(x, height, strict=True)]
        below, above = kwargs["yerr"]
        entry.setdefault("whiskers", [])
        entry["whiskers"] += [(float(a), float(h) - float(b)) for a, h, b in zip(x, height, below, strict=True)]
        assert not any(above), "the whisker reaches down to the worst run, never up"
        return bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(Axes, "set_xticks", record_ticks)
    monkeypatch.setattr(Axes, "bar", record_bars)
    yield calls


def _groups(entry: dict[str, list[Any]]) -> dict[str, list[float]]:
    """Bar heights under each x label: bars stand side by side (1 apart) within a group and further
    apart between groups; each run of adjacent bars belongs to the tick at its middle."""
    ticks, labels = entry["ticks"], entry["labels"]
    runs: list[list[tuple[float, float]]] = []
    for x, h in sorted(entry["bars"]):
        if runs and x - runs[-1][-1][0] < 1.5:
            runs[-1].append((x, h))
        else:
            runs.append([(x, h)])
    groups: dict[str, list[float]] = {}
    for run in runs:
        middle = (run[0][0] + run[-1][0]) / 2
        [label] = [label for t, label in zip(ticks, labels, strict=True) if abs(t - middle) < 1e-9]
        groups[label] = [h for _, h in run]
    return groups


def test_chart_of_the_committed_results_has_distinct_nonempty_groups(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, drawn: dict[int, dict[str, list[Any]]]
) -> None:
    assert len(RESULTS) == 8, "benchmarks/results/ holds six plain and two Spark result sets"
    png = tmp_path / "benchmarks.png"
    assert main(["bench", "--from-json", *map(str, RESULTS), "--chart", str(png)]) == 0
    assert f"chart written to {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = list(drawn.values())
    assert len(panels) == 3
    seen = []
    for entry in panels:
        labels = entry["labels"]
        assert len(labels) == len(set(labels)), f"a label appears twice: {labels}"
        groups = _groups(entry)
        for label, heights in groups.items():
            # the raw client and at least one fedtransport workload, all measured
            assert len(heights) >= 2 and all(h > 0 for h in heights), f"group {label!r} holds {heights}"
        assert sum(len(h) for h in groups.values()) == len(entry["bars"]), "a bar outside every group"
        seen.append({label.replace("),\n", "), ").replace("\n", " ") for label in labels})
    large, repl, small = seen
    assert large == {
        "pulsar (standalone)",
        "pulsar (pulsar-lite), 2026-11-29",
        "pulsar (pulsar-lite), 2026-12-06",
        "rabbitmq (shared)",
        "rabbitmq (federated)",
        "spark + pulsar (pulsar-lite)",
        "spark + rabbitmq (shared)",
    }
    assert repl == {"pulsar (standalone, replication)"}
    # the Spark runs and the 10 embedded transfers have no small objects
    lite = "pulsar (pulsar-lite), 2026-11-29"
    assert small == {"pulsar (standalone)", lite, "rabbitmq (shared)", "rabbitmq (federated)"}


def test_chart_layout_matches_the_drawing(tmp_path: Path, drawn: dict[int, dict[str, list[Any]]]) -> None:
    results = [bench.load_results(f) for f in RESULTS]
    layout = bench.chart_layout(results)
    bench.render_chart(results, tmp_path / "chart.png")
    for panel, entry in zip(layout, drawn.values(), strict=True):
        assert [g.label.replace(" (", "\n(").replace("), ", "),\n") for g in panel.groups] == entry["labels"]
        assert sorted((b.x, b.value) for g in panel.groups for b in g.bars) == sorted(entry["bars"])
        for group in panel.groups:
            assert group.bars[0].workload == panel.workloads[0] and group.bars[0].note == "raw"
            assert all(b.note.endswith("×") for b in group.bars[1:])


def test_result_labels_tell_every_set_apart() -> None:
    def result(backend: str, date: str, *workloads: str, mode: str = "shared") -> dict[str, Any]:
        best = {"seconds": 1.0, "bytes": MiB, "MB_per_s": 1.0}
        return {"backend": backend, "mode": mode, "date": date, "workloads": {w: {"best": best} for w in workloads}}

    plain = result("pulsar", "2026-11-29", "raw-large", "table")
    spark = result("pulsar", "2026-11-29", "raw-large", "table", "spark-table")
    rabbit = result("rabbitmq", "2026-11-29", "raw-large", "table", mode="federated")
    lite = "pulsar (pulsar-lite)"  # a file from before --broker: the embedded broker
    assert bench.result_labels([plain, spark, rabbit]) == [lite, f"spark + {lite}", "rabbitmq (federated)"]
    later = result("pulsar", "2026-12-01", "raw-large", "table")
    assert bench.result_labels([plain, later]) == [f"{lite}, 2026-11-29", f"{lite}, 2026-12-01"]
    assert bench.result_labels([plain, dict(plain)]) == [f"{lite} #1", f"{lite} #2"]
    # a set without any workload of a panel is not a group there
    only_small = result("rabbitmq", "2026-11-29", "raw-small", "small")
    [large, small] = bench.chart_layout([plain, only_small])
    assert [g.label for g in large.groups] == [lite]
    assert [g.label for g in small.groups] == ["rabbitmq (shared)"]


@pytest.mark.parametrize("mib", [1, 5, 8, 10, 256, 257])
def test_large_workload_sizes_add_up_to_mib(mib: int) -> None:
    count, size = bench.raw_messages(mib)
    assert count * size == mib * MiB and size <= bench.RAW_MESSAGE
    for partitions in (1, 3, 8, 16, 64):
        records = bench.table_records(mib, partitions)
        assert len(records) == partitions and sum(records) * bench.TABLE_ROW == mib * MiB
        assert max(records) - min(records) <= 1


def test_table_moves_the_bytes_of_its_raw_baseline(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A small real run (as in tests/test_cli.py): with --mib 5 the raw client, the object, the
    table and a table of 3 partitions each move exactly 5 MiB, so their ratios compare equal transfers."""
    pytest.importorskip("numpy")
    result = tmp_path / "sub" / "r.json"  # the directory is made before the run
    argv = ["bench", "--backend", "pulsar", "--broker", "embedded", "--mib", "5", "--partitions", "3", "--repeat", "1"]
    code = main([*argv, "--only", "raw-large", "object", "table", "table-3", "--json", str(result)])
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads(result.read_text())
    moved = {name: w["median"]["bytes"] for name, w in doc["workloads"].items()}
    assert doc["broker"] == "embedded"
    assert moved == {"raw-large": 5 * MiB, "object": 5 * MiB, "table": 5 * MiB, "table-3": 5 * MiB}
    assert set(doc["ratios"]) == {"object", "table", "table-3"}
    assert doc["baselines"]["table"] == doc["baselines"]["table-3"] == "raw-large"
    assert "ratio table / raw-large" in out
    # every side of every run reported the CPU it spent, and the report compares it
    for w in doc["workloads"].values():
        [run] = w["runs"]
        assert run["cpu_sender"] > 0 and run["cpu_receiver"] > 0
        assert run["cpu_processes"] >= run["cpu_sender"] + run["cpu_receiver"]  # whole lives hold the transfer
    assert doc["ratios"]["object"]["cpu"]["median"] > 0
    assert "cpu ratio object / raw-large" in out


# ---------------------------------------------------------------------------- median, worst, interleaving

# Seconds per repetition, chosen so that median, mean, best and worst all differ, and the worst
# per-repetition ratio is not the ratio of the worst runs.
RAW_SECONDS = [1.0, 4.0, 2.0]  # 4.0 is the worst raw run
OBJECT_SECONDS = [1.25, 4.0, 4.0]  # per repetition 0.8, 1.0, 0.5; median 4.0 s
SMALL_SECONDS = [2.0, 1.0, 3.0]
RAW_SMALL_SECONDS = [1.0, 1.0, 1.0]


def _fake_run(
    capsys: pytest.CaptureFixture[str],
    *only: str,
    warmup: int = 0,
    cpu: dict[str, list[tuple[float, float]]] | None = None,
    pids: bool = False,
    extra: Sequence[str] = (),
) -> tuple[dict[str, Any], list[str], str]:
    """``bench.run`` on a backend whose workloads take the seconds above; (results, call order, output).

    A warm-up round (index 3 and up) takes 100 s: counted anywhere, it would show. ``cpu`` gives
    a workload's (sender, receiver) CPU seconds per repetition; its processes took 3 times that.
    """
    order: list[str] = []
    seconds = {"raw-large": RAW_SECONDS, "object": OBJECT_SECONDS, "raw-small": RAW_SMALL_SECONDS,
               "small": SMALL_SECONDS}  # fmt: skip

    def go(name: str, nbytes: int) -> bench.Go:
        def one(i: int) -> bench.Result:
            order.append(f"{name} {i}")
            t = seconds[name][i] if i < 3 else 100.0
            result: bench.Result = {"seconds": t, "bytes": nbytes, "MB_per_s": round(nbytes / 1e6 / t, 1)}
            if cpu and name in cpu and i < 3:
                sender, receiver = cpu[name][i]
                result |= {"cpu_sender": sender, "cpu_receiver": receiver, "cpu_processes": 3 * (sender + receiver)}
            return result

        return one

    def context(args: argparse.Namespace, stack: ExitStack) -> bench.BenchContext:
        def raw(count: int, size: int, sync: bool) -> bench.Go:
            return go("raw-small" if sync else "raw-large", count * size)

        def fed(kind: str, **extra: Any) -> bench.Go:
            return go(kind, 5 * MiB if kind == "object" else bench.SMALL * bench.SMALL_COUNT)

        # with pids: the test process stands in for the broker (quiet: it waits in the run)
        return bench.BenchContext(args, "fake", stack, raw, fed, pids=(lambda: [os.getpid()]) if pids else None)

    argv = ["--mib", "5", "--repeat", "3", "--warmup", str(warmup), *extra, "--only", *only]
    args = bench.build_parser().parse_args(argv)
    args.backend = "fake"
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(bench._CONTEXTS, "fake", context)
        results = bench.run(args, lines.append)
    return results, order, "\n".join(lines)


def test_each_repetition_of_a_workload_runs_next_to_one_of_its_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    _, order, _ = _fake_run(capsys, "small", "object", "raw-large", "raw-small")
    assert order == [
        "raw-large 0", "object 0", "raw-large 1", "object 1", "raw-large 2", "object 2",
        "raw-small 0", "small 0", "raw-small 1", "small 1", "raw-small 2", "small 2",
    ]  # fmt: skip
    # without its baseline a workload runs on its own, and has no ratio
    results, order, out = _fake_run(capsys, "object")
    assert order == ["object 0", "object 1", "object 2"] and results["ratios"] == {}
    assert "ratio" not in out


def test_warm_up_rounds_run_first_are_kept_and_never_counted(capsys: pytest.CaptureFixture[str]) -> None:
    results, order, out = _fake_run(capsys, "raw-large", "object", warmup=1)
    assert order[:2] == ["raw-large 3", "object 3"] and len(order) == 8
    assert [r["seconds"] for r in results["warmup"]["object"]] == [100.0]
    assert results["workloads"]["object"]["worst"]["seconds"] == 4.0  # the 100 s round is not in it
    assert results["ratios"]["object"]["per_repeat"] == [0.8, 1.0, 0.5]
    assert "warm-up object" in out and "(not counted)" in out
    assert bench.build_parser().parse_args([]).warmup == 1
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--warmup", "-1"])


def test_the_report_holds_every_run_the_median_and_the_worst(capsys: pytest.CaptureFixture[str]) -> None:
    results, _, out = _fake_run(capsys, "raw-large", "object", "raw-small", "small")
    w = results["workloads"]
    mb = 5 * MiB / 1e6
    raw, obj = w["raw-large"], w["object"]
    assert [r["seconds"] for r in raw["runs"]] == RAW_SECONDS
    assert raw["median"]["seconds"] == 2.0 and raw["median"]["MB_per_s"] == pytest.approx(mb / 2.0, abs=1e-3)
    assert raw["worst"]["seconds"] == 4.0 and raw["best"]["seconds"] == 1.0
    assert raw["spread"] == 0.5  # the 4 s run against the median 2 s
    assert "raw-large's own slowest run: 0.50 of its median" in out
    assert obj["median"]["seconds"] == 4.0 and obj["worst"]["seconds"] == 4.0
    small = w["small"]
    assert small["median"]["seconds"] == 2.0 and small["worst"]["seconds"] == 3.0
    # ratio of the medians; the worst of fed_i / raw_i (0.8, 1.0, 0.5), not worst / worst (1.0)
    ratio = results["ratios"]["object"]
    assert ratio["per_repeat"] == [0.8, 1.0, 0.5]
    assert ratio["median"] == pytest.approx(0.5) and ratio["worst"] == pytest.approx(0.5)
    small_ratio = results["ratios"]["small"]
    # 1 KiB objects: the ratios come from the seconds, not from MB/s rounded to 0.1 (all ~0.5 or ~1.0 here)
    assert small_ratio["per_repeat"] == [0.5, 1.0, pytest.approx(0.333, abs=1e-3)]
    assert small_ratio["median"] == pytest.approx(0.5) and small_ratio["worst"] == pytest.approx(0.333, abs=1e-3)
    assert results["baselines"] == {"object": "raw-large", "small": "raw-small"}
    # printed: median and worst of each workload, both ratios and every per-repetition ratio
    assert f"fake     raw-large    median {mb / 2:8.1f} MB/s    2.00 s  worst {mb / 4:8.1f} MB/s    4.00 s" in out
    assert "ratio object / raw-large: median 0.50, worst 0.50  (per repetition: 0.80 1.00 0.50; " in out
    assert "small" in out and "500 objects/s (worst 333)" in out
    assert "best" not in out


def test_cpu_seconds_per_side_are_summed_up_and_compared_per_byte(capsys: pytest.CaptureFixture[str]) -> None:
    """CPU reported by the sides: medians per workload; the ratio is fed's CPU per byte over raw's."""
    cpu = {"raw-large": [(1.0, 1.0), (1.0, 3.0), (2.0, 2.0)], "object": [(2.0, 2.0), (1.0, 1.0), (5.0, 5.0)]}
    results, _, out = _fake_run(capsys, "raw-large", "object", cpu=cpu)
    raw, obj = results["workloads"]["raw-large"], results["workloads"]["object"]
    assert raw["cpu"] == {"cpu_sender": 1.0, "cpu_receiver": 2.0, "cpu_processes": 12.0}
    assert obj["runs"][2]["cpu_sender"] == 5.0
    ratio = results["ratios"]["object"]["cpu"]
    assert ratio["per_repeat"] == [2.0, 0.5, 2.5]  # (2+2)/(1+1), (1+1)/(1+3), (5+5)/(2+2)
    assert ratio["worst"] == 2.5  # the most CPU fed spent against raw, not the least
    assert ratio["median"] == pytest.approx(1.0)  # median 4 s of fed's against median 4 s of raw's
    assert "cpu sender 1.00 s receiver 2.00 s processes 12.00 s" in out
    assert "cpu ratio object / raw-large (CPU per byte, both sides): median 1.00, worst 2.50" in out
    # a workload whose sides report no CPU has no cpu block, and no cpu line
    results, _, out = _fake_run(capsys, "raw-large", "object")
    assert "cpu" not in results["ratios"]["object"] and "cpu" not in out


def test_chart_bars_are_medians_with_the_worst_run_as_whisker(
    tmp_path: Path, drawn: dict[int, dict[str, list[Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    results, _, _ = _fake_run(capsys, "raw-large", "object")
    results["broker"] = "standalone"
    results["backend"] = "pulsar"
    [panel] = bench.chart_layout([results])
    [group] = panel.groups
    assert group.label == "pulsar (standalone)"
    raw, obj = group.bars
    mb = 5 * MiB / 1e6
    assert raw.value == pytest.approx(mb / 2.0, abs=1e-3) and raw.worst == pytest.approx(mb / 4.0, abs=0.1)
    assert obj.value == pytest.approx(mb / 4.0, abs=1e-3) and obj.worst == pytest.approx(mb / 4.0, abs=0.1)
    assert raw.note == "raw" and obj.note == "0.50×, worst 0.50×"
    bench.render_chart([results], tmp_path / "c.png")
    [entry] = drawn.values()
    assert sorted(entry["bars"]) == sorted((b.x, b.value) for b in group.bars)
    assert sorted(entry["whiskers"]) == sorted((b.x, b.worst) for b in group.bars)


def test_older_result_files_chart_from_their_runs() -> None:
    """Files from before medians: the median and worst come from ``runs``; with ``best`` alone it is the bar."""

    def run(seconds: float) -> dict[str, float]:
        return {"seconds": seconds, "bytes": 100 * MiB, "MB_per_s": round(100 * MiB / 1e6 / seconds, 1)}

    runs = [run(1.0), run(3.0), run(2.0)]
    old = {"backend": "pulsar", "mode": "shared", "date": "2026-11-29", "ratios": {"object": 1.2},
           "workloads": {"raw-large": {"best": run(1.0), "runs": runs},
                         "object": {"best": run(2.0)}}}  # fmt: skip
    [panel] = bench.chart_layout([old])
    [group] = panel.groups
    assert group.label == "pulsar (pulsar-lite)"  # no "broker": before --broker, Pulsar was pulsar-lite
    raw, obj = group.bars
    assert raw.value == pytest.approx(100 * MiB / 1e6 / 2.0, abs=1e-3)  # the median of 1, 3 and 2 s
    assert raw.worst == pytest.approx(run(3.0)["MB_per_s"])
    assert obj.value == pytest.approx(run(2.0)["MB_per_s"]) and obj.worst is None
    assert obj.note == "1.00×"  # no per-repetition ratios recorded: no worst ratio


def test_pulsar_groups_are_labelled_with_their_broker() -> None:
    one = {"seconds": 1.0, "bytes": MiB, "MB_per_s": 1.0}

    def result(broker: str | None, *names: str) -> dict[str, Any]:
        r: dict[str, Any] = {"backend": "pulsar", "mode": "shared", "workloads": {n: {"best": one} for n in names}}
        if broker:
            r["broker"] = broker
        return r

    sets = [
        result("standalone", "raw-large", "object"),
        result("embedded", "raw-large", "object"),
        result("standalone", "raw-repl", "object-repl"),
        result(None, "raw-large", "table", "spark-table"),
    ]
    assert bench.result_labels(sets) == [
        "pulsar (standalone)",
        "pulsar (pulsar-lite)",
        "pulsar (standalone, replication)",
        "spark + pulsar (pulsar-lite)",
    ]
    large, repl = bench.chart_layout(sets)
    assert repl.title.startswith("geo-replication") and [g.label for g in repl.groups] == [
        "pulsar (standalone, replication)"
    ]
    assert "pulsar (standalone, replication)" not in [g.label for g in large.groups]


def test_broker_and_replication_flags() -> None:
    args = bench.build_parser().parse_args([])
    assert args.broker == "standalone" and args.replication is False
    args = bench.build_parser().parse_args(["--broker", "embedded", "--replication"])
    assert args.broker == "embedded" and args.replication is True
    assert {"raw-repl", "object-repl", "table-repl"} <= set(bench.WORKLOADS)
    assert not any(bench.WORKLOADS[n].default for n in ("raw-repl", "object-repl", "table-repl"))
    assert bench.WORKLOADS["object-repl"].baseline == bench.WORKLOADS["table-repl"].baseline == "raw-repl"


def test_the_sender_starts_the_clock_only_once_the_receiver_holds_its_hello(
    memory_pair: tuple[Any, Any],
) -> None:
    """A direction slow to start (RabbitMQ federation links start one by one) must be before the
    clock: guest's handshake returns only after host's get of guest's hello returned."""
    import threading

    from fedtransport.bench.parties import _handshake

    guest, host = memory_pair
    real_get = host.get
    host_got: list[float] = []

    def slow_get(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)  # guest's hello arriving late
        value = real_get(*args, **kwargs)
        host_got.append(time.monotonic())
        return value

    host.get = slow_get
    receiver = threading.Thread(target=_handshake, args=(host, "host"))
    receiver.start()
    try:
        _handshake(guest, "guest")
        clock_starts = time.monotonic()
    finally:
        receiver.join(30)
    assert host_got and host_got[0] <= clock_starts


# ---------------------------------------------------------------------------- settling between runs


def test_a_run_waits_for_a_busy_broker_to_go_quiet_and_records_it() -> None:
    """settle() waits while the watched process burns CPU, returns once it idles, and gives up
    after its bound on one that never does; a run's result records both figures."""
    from fedtransport.bench.settle import cpu_seconds, settle

    busy_then_idle = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.5: pass\ntime.sleep(60)"
    burning = subprocess.Popen([sys.executable, "-c", busy_then_idle])
    forever = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        quiet = settle(lambda: [burning.pid], window=0.25, bound=30)
        assert 1.0 <= quiet["seconds"] < 30 and quiet["broker_cpu"] < 0.15, quiet
        stuck = settle(lambda: [forever.pid], window=0.25, bound=1.0)
        assert stuck["seconds"] >= 1.0 and stuck["broker_cpu"] > 0.15, stuck
        assert settle(lambda: [])["seconds"] == 0.0  # no broker of the run's own: nothing to wait for
        assert cpu_seconds([forever.pid, 2**22 + 1]) > 0  # a pid that is gone counts nothing
        assert cpu_seconds([2**22 + 1]) == 0.0  # above pid_max: never a process
    finally:
        for p in (burning, forever):
            p.kill()
            p.wait()


def test_every_run_is_settled_first_unless_told_not_to(capsys: pytest.CaptureFixture[str]) -> None:
    results, _, out = _fake_run(capsys, "raw-large", "object", warmup=1, pids=True)
    runs = [*results["workloads"]["object"]["runs"], *results["warmup"]["object"]]
    assert all(r["settle_seconds"] >= 0 and "settle_broker_cpu" in r for r in runs)
    assert re.search(r"object .* settled [\d.]+ [\d.]+ [\d.]+ s", out), out  # each run's wait, printed
    results, _, _ = _fake_run(capsys, "raw-large", "object", pids=True, extra=["--settle", "0"])
    assert all("settle_seconds" not in r for r in results["workloads"]["object"]["runs"])
    assert bench.build_parser().parse_args(["--settle", "2.5"]).settle == 2.5
    for bad in ("-1", "nan", "inf", "soon"):  # off unsaid, or a wait that never ends: refused
        with pytest.raises(SystemExit):
            bench.build_parser().parse_args(["--settle", bad])


def test_each_run_records_the_cpu_its_broker_used_unless_the_broker_started_in_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A run's ``cpu_broker`` is what the broker processes used while it ran; a broker the
    repetition itself started (its pids changed) would count its start-up, so none is recorded."""
    burning = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    started: list[int] = []  # a broker the second workload starts in its first repetition
    try:

        def go(i: int) -> bench.Result:
            if len(order) == 1:  # raw 0, then object 0: the broker of object 0 starts in it
                started.append(os.getpid())
            order.append(i)
            time.sleep(0.6)  # the broker burns CPU meanwhile
            return {"seconds": 1.0, "bytes": 5 * MiB, "MB_per_s": 5.2}

        order: list[int] = []

        def context(args: argparse.Namespace, stack: ExitStack) -> bench.BenchContext:
            return bench.BenchContext(args, "fake", stack, lambda *a: go, lambda *a, **k: go,
                                      pids=lambda: [burning.pid, *started])  # fmt: skip

        args = bench.build_parser().parse_args(["--repeat", "3", "--warmup", "0", "--settle", "0",
                                                "--only", "raw-large", "object"])  # fmt: skip
        args.backend = "fake"
        lines: list[str] = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(bench._CONTEXTS, "fake", context)
            results = bench.run(args, lines.append)
    finally:
        burning.kill()
        burning.wait()
    raw = results["workloads"]["raw-large"]["runs"]
    assert all(0.2 <= r["cpu_broker"] <= 2.0 for r in raw), raw  # ~0.6 s of one busy core
    obj = results["workloads"]["object"]["runs"]
    assert "cpu_broker" not in obj[0] and all(0.2 <= r["cpu_broker"] <= 2.0 for r in obj[1:]), obj
    assert 0.2 <= results["workloads"]["raw-large"]["cpu"]["cpu_broker"] <= 2.0  # the median, printed:
    assert re.search(r"raw-large .* broker [\d.]+ s", "\n".join(lines)), lines


def test_a_party_s_cpu_counts_its_worker_processes() -> None:
    """FATE's computing runs a party's work in pool processes: they count, live or reaped."""
    from fedtransport.bench.settle import tree_cpu_seconds

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    before = tree_cpu_seconds(os.getpid())
    subprocess.run([sys.executable, "-c", burn], check=True)  # a child that ended: reaped by us
    child = (f"import subprocess, sys, time\nsubprocess.run([sys.executable, '-c', {burn!r}])\n"
             "print('reaped', flush=True)\ntime.sleep(60)")  # fmt: skip
    live = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout is not None and live.stdout.readline().strip() == "reaped"
        assert tree_cpu_seconds(live.pid) >= 0.5  # a live child's tree: what it reaped (0.6 s, in ticks)
        assert tree_cpu_seconds(os.getpid()) - before >= 1.0  # and ours: both burns
    finally:
        live.kill()
        live.wait()


def test_a_broker_named_to_confuse_the_stat_parser_is_still_measured(tmp_path: Path) -> None:
    """/proc/PID/stat puts the command name in parentheses; a name holding ") (" and spaces must
    not shift the fields settle() reads (the CPU ticks) or the state the launchers read."""
    from fedtransport.bench.settle import cpu_seconds
    from fedtransport.brokers._guard import stat_fields

    odd = tmp_path / "b) Z 1 (x"  # split at the first ")", the state would read "Z"
    odd.symlink_to(sys.executable)
    proc = subprocess.Popen([str(odd), "-c", "while True: pass"])
    try:
        fields = None
        for _ in range(50):  # until it has used a tick of CPU
            fields = stat_fields(proc.pid)
            if cpu_seconds([proc.pid]) > 0:
                break
            time.sleep(0.05)  # a CPU tick is 10 ms: nothing to wait on but time
        assert fields is not None and fields[0] in ("R", "S"), fields
        assert 0 < cpu_seconds([proc.pid]) < 60
    finally:
        proc.kill()
        proc.wait()


def test_a_run_whose_party_died_reports_the_tail_of_the_broker_s_log(tmp_path: Path) -> None:
    """CI once saw only the client's "Not enough non-faulty bookies" lines: the broker's own
    words (a bookie turned read-only on a full disk) belong in the failure."""
    log = tmp_path / "broker.log"
    log.write_text("started\n" + "".join(f"line {n}\n" for n in range(100)) + "Bookie is in read-only mode\n")

    def go(i: int) -> bench.Result:
        raise RuntimeError("the receiver of the raw client died (exit code 1)")

    def context(args: argparse.Namespace, stack: ExitStack) -> bench.BenchContext:
        return bench.BenchContext(args, "fake", stack, lambda *a: go, lambda *a, **k: go, logs=lambda: [log])

    args = bench.build_parser().parse_args(["--repeat", "1", "--warmup", "0", "--settle", "0", "--only", "raw-large"])
    args.backend = "fake"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(bench._CONTEXTS, "fake", context)
        with pytest.raises(RuntimeError, match="died") as failure:
            bench.run(args, lambda line: None)
    text = str(failure.value)
    assert "Bookie is in read-only mode" in text and str(log) in text
    assert "started" not in text  # the tail, not the whole log


def _left_at_stop(backend: str, broker: Any, stop: str, names: Callable[[Any], list[str]]) -> list[str]:
    """What ``names(broker)`` lists as the broker stops, after a raw-large bench of two repetitions."""
    left: list[str] = []
    real_stop = getattr(broker, stop)

    def stop_after_listing(self: Any) -> None:
        if self.running:
            left.extend(names(self))
        real_stop(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(broker, stop, stop_after_listing)
        code = main(["bench", "--backend", backend, "--mib", "8", "--repeat", "2", "--warmup", "0", "--settle", "0",
                     "--only", "raw-large"])  # fmt: skip
    assert code == 0
    return left


@pytest.mark.timeout(600)
def test_the_raw_baseline_deletes_its_topic_on_the_real_broker() -> None:
    """As the fed workloads' cleanup does: a raw topic left behind keeps its bytes on the bookie's
    disk (one documented run left 4.9 GB behind, and a fuller CI disk failed mid-run)."""
    pytest.importorskip("numpy")
    from fedtransport.brokers.standalone import PulsarStandalone

    left = _left_at_stop("pulsar", PulsarStandalone, "_stop",
                         lambda b: b.admin("GET", "/admin/v2/persistent/public/default"))  # fmt: skip
    assert not [t for t in left if t.rsplit("/", 1)[-1].startswith("t")], left


@pytest.mark.timeout(600)
def test_the_raw_baseline_deletes_its_queue_on_the_real_node() -> None:
    """The raw pika baseline's queue goes after each run, as the fed workloads' cleanup does."""
    pytest.importorskip("numpy")
    from fedtransport.brokers import RabbitNode

    if not RabbitNode.installed():
        pytest.skip("rabbitmq-server is not installed")
    left = _left_at_stop("rabbitmq", RabbitNode, "stop",
                         lambda n: n.ctl("list_queues", "--quiet", "--no-table-headers", "name").split())  # fmt: skip
    assert not [q for q in left if q.startswith("bench-raw-")], left


def test_the_raw_async_sender_fails_when_the_broker_refuses_a_send(pulsar_standalone: Any) -> None:
    """A send the broker (or the client) refuses fails the raw sender at once. It counted as sent,
    and the receiver then waited 600 s for messages never stored (a CI run on a full disk)."""
    import queue as queue_

    from fedtransport.bench.raw import raw_pulsar_sender

    q: queue_.Queue[Any] = queue_.Queue()
    cfg = {"service_url": pulsar_standalone.service_url, "topic": f"persistent://public/default/big{time.time_ns()}",
           "count": 3, "size": 6 * 2**20, "sync": False}  # fmt: skip  # over the broker's 5 MiB maxMessageSize
    with pytest.raises(RuntimeError, match=r"3 of 3 sends failed, the first with .*MessageTooBig"):
        raw_pulsar_sender(cfg, q)
    assert q.empty()  # no "start": the run fails, not the receiver's timeout
    cfg["size"] = 1024
    raw_pulsar_sender(cfg, q)
    assert q.get_nowait()[0] == "start"


def test_a_repetition_whose_parties_go_silent_fails_by_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A party that neither reports nor dies fails the repetition at the deadline, naming what is
    missing, as a RuntimeError (so a failed run reports the brokers' log tails)."""
    from fedtransport.bench import parties

    silent_party = _bench_party("silent_party")
    monkeypatch.setattr(parties, "REPORT_DEADLINE", 2.0)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="no start and end reported in 2 s"):
        parties.run_pair(silent_party, silent_party, {"silent": 4}, wait_ready=False)
    assert time.monotonic() - began < 60  # both children joined, not left behind


def _bench_party(name: str) -> Any:
    try:
        import tests.party_proc as procs
    except ModuleNotFoundError:
        import party_proc as procs  # type: ignore[no-redef]
    return getattr(procs, name)


@pytest.mark.parametrize("wait_ready", [False, True], ids=["fed", "raw"])
def test_a_repetition_fails_as_soon_as_a_party_dies_and_stops_the_other(wait_ready: bool) -> None:
    """A side that dies before reporting fails the repetition at once, and the side still waiting
    for it is stopped: the survivor used to be waited out (120 s, a fed receiver's hello timeout),
    and a raw receiver that died before it was ready left the run waiting 120 s on a bare assert."""
    from fedtransport.bench import parties

    failing, silent = _bench_party("failing_party"), _bench_party("silent_party")
    sender, receiver = (failing, silent) if not wait_ready else (silent, failing)
    began = time.monotonic()
    who = "receiver" if wait_ready else "sender"
    with pytest.raises(RuntimeError, match=f"the {who} of the raw client died \\(exit code 1\\)"):
        parties.run_pair(sender, receiver, {"silent": 90}, wait_ready=wait_ready)
    assert time.monotonic() - began < 45  # not the silent side's 90 s
    assert not mp.active_children()  # both ended with the repetition


def test_a_count_flag_below_its_least_says_its_least(capsys: pytest.CaptureFixture[str]) -> None:
    for flag, least in (("--repeat", 1), ("--mib", 1), ("--partitions", 1), ("--warmup", 0)):
        for bad in (least - 1, -5):  # -5 once said "must be 0 or more" for a flag that needs 1
            with pytest.raises(SystemExit):
                bench.build_parser().parse_args([flag, str(bad)])
            assert f"argument {flag}: must be at least {least}, got {bad}" in capsys.readouterr().err


def test_a_mib_the_machine_cannot_hold_twice_is_refused_before_any_broker_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The object and table workloads hold the value whole in both parties: a --mib beyond half
    the machine's memory failed after the raw baseline had run, with a MemoryError in the sender
    and the receiver waiting for it. The raw client alone streams, so it may move any size."""
    from fedtransport.bench import runner
    from fedtransport.errors import ConfigError

    started: list[str] = []

    def no_broker(args: argparse.Namespace, stack: ExitStack) -> bench.BenchContext:
        started.append(args.backend)
        raise RuntimeError("a broker would start here")

    monkeypatch.setattr(runner, "physical_mebibytes", lambda: 100)
    monkeypatch.setitem(runner._CONTEXTS, "rabbitmq", no_broker)
    for argv in (["--mib", "51"], ["--mib", "51", "--only", "raw-large", "table"]):
        with pytest.raises(ConfigError, match=r"--mib 51 needs at least 102 MiB .* this machine has 100 MiB"):
            runner.execute(bench.build_parser().parse_args(["--backend", "rabbitmq", *argv]))
    assert not started
    for argv in (["--mib", "50"], ["--mib", "51", "--only", "raw-large", "raw-small", "small"]):
        with pytest.raises(RuntimeError, match="a broker would start here"):
            runner.execute(bench.build_parser().parse_args(["--backend", "rabbitmq", *argv]))
    assert started == ["rabbitmq", "rabbitmq"]
