"""The benchmark report: the chart's groups, and workloads that move the bytes of their raw baseline.

The chart test renders the committed results the way docs/cli.md does
(``fedtransport bench --from-json benchmarks/results/throughput-*.json --chart ...``) and reads
the group labels and bars from the calls made to matplotlib, not from pixels.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
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
        entry = calls.setdefault(id(self), {"ticks": [], "labels": [], "bars": []})
        entry["bars"] += [(float(a), float(h)) for a, h in zip(x, height, strict=True)]
        return bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(Axes, "set_xticks", record_ticks)
    monkeypatch.setattr(Axes, "bar", record_bars)
    yield calls


def _groups(entry: dict[str, list[Any]]) -> dict[str, list[float]]:
    """Bar heights under each x label: the bars between the midpoints to the neighbouring ticks."""
    ticks, labels = entry["ticks"], entry["labels"]
    order = sorted(range(len(ticks)), key=lambda i: ticks[i])
    groups: dict[str, list[float]] = {}
    for k, i in enumerate(order):
        low = (ticks[order[k - 1]] + ticks[i]) / 2 if k > 0 else float("-inf")
        high = (ticks[i] + ticks[order[k + 1]]) / 2 if k + 1 < len(order) else float("inf")
        groups[labels[i]] = [h for x, h in entry["bars"] if low < x < high]
    return groups


def test_chart_of_the_committed_results_has_distinct_nonempty_groups(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, drawn: dict[int, dict[str, list[Any]]]
) -> None:
    assert len(RESULTS) == 5, "benchmarks/results/ holds three plain and two Spark result sets"
    png = tmp_path / "benchmarks.png"
    assert main(["bench", "--from-json", *map(str, RESULTS), "--chart", str(png)]) == 0
    assert f"chart written to {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = list(drawn.values())
    assert len(panels) == 2
    seen = []
    for entry in panels:
        labels = entry["labels"]
        assert len(labels) == len(set(labels)), f"a label appears twice: {labels}"
        groups = _groups(entry)
        for label, heights in groups.items():
            # the raw client and at least one fedtransport workload, all measured
            assert len(heights) >= 2 and all(h > 0 for h in heights), f"group {label!r} holds {heights}"
        assert sum(len(h) for h in groups.values()) == len(entry["bars"]), "a bar outside every group"
        seen.append({label.replace("\n", " ") for label in labels})
    large, small = seen
    assert large == {
        "pulsar",
        "rabbitmq (shared)",
        "rabbitmq (federated)",
        "spark + pulsar",
        "spark + rabbitmq (shared)",
    }
    assert small == {"pulsar", "rabbitmq (shared)", "rabbitmq (federated)"}  # the Spark runs have no small objects


def test_chart_layout_matches_the_drawing(tmp_path: Path, drawn: dict[int, dict[str, list[Any]]]) -> None:
    results = [bench.load_results(f) for f in RESULTS]
    layout = bench.chart_layout(results)
    bench.render_chart(results, tmp_path / "chart.png")
    for panel, entry in zip(layout, drawn.values(), strict=True):
        assert [g.label.replace(" (", "\n(") for g in panel.groups] == entry["labels"]
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
    assert bench.result_labels([plain, spark, rabbit]) == ["pulsar", "spark + pulsar", "rabbitmq (federated)"]
    later = result("pulsar", "2026-12-01", "raw-large", "table")
    assert bench.result_labels([plain, later]) == ["pulsar, 2026-11-29", "pulsar, 2026-12-01"]
    assert bench.result_labels([plain, dict(plain)]) == ["pulsar #1", "pulsar #2"]
    # a set without any workload of a panel is not a group there
    only_small = result("rabbitmq", "2026-11-29", "raw-small", "small")
    [large, small] = bench.chart_layout([plain, only_small])
    assert [g.label for g in large.groups] == ["pulsar"]
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
    argv = ["bench", "--backend", "pulsar", "--mib", "5", "--partitions", "3", "--repeat", "1"]
    code = main([*argv, "--only", "raw-large", "object", "table", "table-3", "--json", str(result)])
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads(result.read_text())
    moved = {name: w["best"]["bytes"] for name, w in doc["workloads"].items()}
    assert moved == {"raw-large": 5 * MiB, "object": 5 * MiB, "table": 5 * MiB, "table-3": 5 * MiB}
    assert set(doc["ratios"]) == {"object", "table", "table-3"}
    assert doc["baselines"]["table"] == doc["baselines"]["table-3"] == "raw-large"
    assert "ratio table / raw-large" in out
