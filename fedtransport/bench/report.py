"""The report: saved result files, their labels, and the chart of medians and worst runs.

:func:`chart_layout` decides everything the chart shows (panels per raw baseline, a labelled
group of bars per result set, each bar's ratio note) without drawing, so it can be tested;
:func:`render_chart` draws that layout with matplotlib. Result files from before medians were
recorded (only ``best`` and ``runs``) are summed up from their runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .contexts import PULSAR_BROKERS
from .stats import summarize
from .workloads import SMALL

# Default baselines for result files written before they recorded their own.
_DEFAULT_BASELINES = {"object": "raw-large", "table": "raw-large", "small": "raw-small", "small-async": "raw-small",
                      "object-repl": "raw-repl", "table-repl": "raw-repl"}  # fmt: skip
_FATE_NATIVE = "fate-native-"  # the baselines of fedtransport/bench/fate.py's workloads
_FATE_TITLES = {"table": "table, 8 partitions", "table-8x4": "table, 8 × 4 MiB", "object": "4 MiB objects",
                "small": "1 KiB objects"}  # fmt: skip
_RAW_COLOUR = "#8c8c8c"
_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A results JSON file written by ``--json``; ``ConfigError`` if it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read benchmark results {os.fspath(path)}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("workloads"), dict) or "backend" not in data:
        raise ConfigError(f"{os.fspath(path)} is not a throughput result file (no 'backend' and 'workloads')")
    return data


def median_and_worst(record: Mapping[str, Any]) -> tuple[Mapping[str, float], Mapping[str, float] | None]:
    """A workload record's median and worst run.

    Files written before medians were recorded hold ``runs`` (and ``best``): the median and the
    worst come from the runs; a record with nothing but ``best`` has it as its median, no worst.
    """
    if "median" in record:
        return record["median"], record.get("worst")
    runs = record.get("runs") or []
    if runs:
        summary = summarize(runs)
        return summary["median"], summary["worst"]
    return record["best"], None


def _worst_ratio(result: Mapping[str, Any], name: str) -> float | None:
    """The worst per-repetition ratio recorded for ``name`` (none in files from before it was)."""
    ratio = (result.get("ratios") or {}).get(name)
    return ratio.get("worst") if isinstance(ratio, Mapping) else None


def _label(result: Mapping[str, Any]) -> str:
    """The backend (with the RabbitMQ mode, or the Pulsar broker); Spark runs are ``spark + BACKEND``.

    Pulsar results written before ``--broker`` existed ran on pulsar-lite.
    """
    backend, mode = str(result["backend"]), result.get("mode")
    label = f"{backend} ({mode})" if backend == "rabbitmq" and mode else backend
    if backend == "pulsar":
        broker = str(result.get("broker") or "embedded")
        kind = PULSAR_BROKERS.get(broker, broker)
        if any(str(name).endswith("-repl") for name in result["workloads"]):
            kind += ", replication"
        label = f"{backend} ({kind})"
    if any(str(name).startswith("spark") for name in result["workloads"]):
        label = f"spark + {label}"
    return label


def result_labels(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """One distinct label per result set: ``_label``, then its date or a number where two would share one."""
    base = [_label(r) for r in results]
    labels = list(base)
    for label in dict.fromkeys(base):
        same = [i for i, b in enumerate(base) if b == label]
        if len(same) < 2:
            continue
        dates = [str(results[i].get("date") or "") for i in same]
        by_date = all(dates) and len(set(dates)) == len(dates)
        for k, i in enumerate(same, 1):
            labels[i] = f"{label}, {dates[k - 1]}" if by_date else f"{label} #{k}"
    return labels


def _panels(results: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, list[str]]]:
    """(title, unit, workloads) per panel: each raw baseline with the workloads measured against it."""
    by_base: dict[str, list[str]] = {}
    for r in results:
        baselines = {**_DEFAULT_BASELINES, **r.get("baselines", {})}
        for name in r["workloads"]:
            base = baselines.get(name)
            if base is not None and base in r["workloads"]:
                by_base.setdefault(base, [base])
                if name not in by_base[base]:
                    by_base[base].append(name)
    panels = []
    for base, names in by_base.items():
        if base.startswith(_FATE_NATIVE):  # the FATE side by side: FATE's own federation is the baseline
            what = base[len(_FATE_NATIVE) :]
            panels.append((f"FATE: {_FATE_TITLES.get(what, what)}", "objects/s" if what == "small" else "MB/s",
                           names))  # fmt: skip
        elif base == "raw-small":
            panels.append(("1 KiB objects, one confirm each", "objects/s", names))
        elif base == "raw-repl":
            panels.append(("geo-replication, cluster A to B", "MB/s", names))
        else:
            panels.append(("large transfers", "MB/s", names))
    return panels


def _value(run: Mapping[str, float], unit: str) -> float:
    return run["bytes"] / SMALL / run["seconds"] if unit == "objects/s" else float(run["MB_per_s"])


@dataclass(frozen=True)
class ChartBar:
    """One bar: a workload of one result set, at ``x`` on its panel; ``value`` is its median run."""

    workload: str
    x: float
    value: float
    #: "raw" on the baseline ("FATE" on FATE's own federation), else the ratio of the medians
    #: ("1.22×"), with the worst per-repetition ratio when the set recorded one ("1.22×, worst
    #: 0.91×"); "" when the set lacks the baseline
    note: str
    worst: float | None = None  # the worst run's value (the whisker), None when unknown


@dataclass(frozen=True)
class ChartGroup:
    """The bars of one result set in one panel, under the x-axis label ``label`` at ``centre``."""

    label: str
    centre: float
    bars: tuple[ChartBar, ...]


@dataclass(frozen=True)
class ChartPanel:
    """One raw baseline (``workloads[0]``) with the workloads measured against it, one group per result set."""

    title: str
    unit: str
    workloads: tuple[str, ...]
    groups: tuple[ChartGroup, ...]
    extent: float  # x units from the first bar's centre to the last one's


_GROUP_GAP = 1.0  # empty bar slots between two groups
_BAR_WIDTH = 0.85


def chart_layout(results: Iterable[Mapping[str, Any]]) -> list[ChartPanel]:
    """What ``render_chart`` draws, before any drawing: panels of labelled groups of bars.

    Each result set is its own group, with a label no other group of the panel has. A set takes
    part in a panel only with at least one workload measured against that panel's baseline, so no
    group is empty; its bars sit side by side, without slots for workloads other sets ran.
    """
    results = list(results)
    labels = result_labels(results)
    panels = []
    for title, unit, names in _panels(results):
        base = names[0]
        groups = []
        cursor = 0.0
        for label, r in zip(labels, results, strict=True):
            w = r["workloads"]
            present = [name for name in names if name in w]
            if all(name == base for name in present):
                continue  # nothing of this panel to compare in this set
            raw = _value(median_and_worst(w[base])[0], unit) if base in w else None
            bars = []
            for k, name in enumerate(present):
                median, worst = median_and_worst(w[name])
                value = _value(median, unit)
                baseline_note = "FATE" if base.startswith(_FATE_NATIVE) else "raw"
                note = baseline_note if name == base else (f"{value / raw:.2f}×" if raw else "")
                worst_ratio = _worst_ratio(r, name)
                if raw and name != base and worst_ratio is not None:
                    note += f", worst {worst_ratio:.2f}×"
                bars.append(ChartBar(name, cursor + k, value, note, _value(worst, unit) if worst else None))
            groups.append(ChartGroup(label, cursor + (len(bars) - 1) / 2, tuple(bars)))
            cursor += len(bars) + _GROUP_GAP
        if groups:
            panels.append(ChartPanel(title, unit, tuple(names), tuple(groups), cursor - _GROUP_GAP - 1))
    return panels


def _tick(label: str) -> str:
    """A group's label on the x-axis: the backend, then its broker or mode, then a date, one per line."""
    return label.replace(" (", "\n(").replace("), ", "),\n")


def render_chart(results: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Grouped bars, one labelled group per result set (``chart_layout``): the raw client (grey) next
    to fedtransport's workloads. A bar is the median run, its whisker reaches down to the worst run;
    each fedtransport bar is labelled with its median ratio to the raw client and its worst
    per-repetition ratio. One panel per raw baseline."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("the chart needs matplotlib: pip install 'fedtransport[bench]'") from exc
    results = list(results)
    if not results:
        raise ConfigError("no benchmark results to chart")
    panels = chart_layout(results)
    if not panels:
        raise ConfigError("the results hold no workload with its raw baseline: nothing to compare")
    # each panel as wide as the bars it holds, so bars and their labels keep one size throughout
    sizes = [p.extent + 2 for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 0.42 * sum(sizes) + 1.2 * len(panels), 5.6),
                             squeeze=False, gridspec_kw={"width_ratios": sizes})  # fmt: skip
    for ax, panel in zip(axes[0], panels, strict=True):
        for j, name in enumerate(panel.workloads):
            bars = [b for g in panel.groups for b in g.bars if b.workload == name]
            if not bars:
                continue
            colour = _RAW_COLOUR if j == 0 else _COLOURS[(j - 1) % len(_COLOURS)]
            if name.startswith("fate-"):  # the panel's title names the workload
                label = "FATE 2.2's own federation" if j == 0 else "FATE over fedtransport"
            else:
                label = f"{name} (raw client)" if j == 0 else f"{name} (fedtransport)"
            below = [b.value - b.worst if b.worst is not None else 0.0 for b in bars]
            whisker = {"ecolor": "#333333", "capsize": 2, "lw": 1}
            drawn = ax.bar([b.x for b in bars], [b.value for b in bars], _BAR_WIDTH, color=colour, label=label,
                           yerr=[below, [0.0] * len(bars)], error_kw=whisker)  # fmt: skip
            for rect, bar in zip(drawn, bars, strict=True):
                top = (rect.get_x() + rect.get_width() / 2, rect.get_height())
                ax.annotate(bar.note, top, ha="center", va="bottom", fontsize=8, rotation=90, xytext=(0, 3),
                            textcoords="offset points")  # fmt: skip
        ax.set_xticks([g.centre for g in panel.groups], [_tick(g.label) for g in panel.groups])
        ax.set_xlim(-1, panel.extent + 1)
        ax.set_ylabel(panel.unit)
        ax.set_title(panel.title)
        fate_panel = panel.workloads[0].startswith(_FATE_NATIVE)
        ax.margins(y=0.6 if fate_panel else 0.35)  # room for the rotated ratio labels above the bars
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1 if fate_panel else 2,
                  frameon=False)  # fmt: skip
    dates = sorted({str(r.get("date", "")) for r in results} - {""})
    cpus = sorted({str(r.get("cpu_count", "?")) for r in results})
    fate_only = all(p.workloads[0].startswith(_FATE_NATIVE) for p in panels)
    versus = "FATE 2.2's own federation" if fate_only else "the raw broker client"
    fig.suptitle(f"fedtransport vs {versus} (bar: median run, whisker: worst run; {', '.join(cpus)} cores"
                 + (f"; {', '.join(dates)}" if dates else "") + ")", fontsize=11)  # fmt: skip
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")  # the legends below the axes stay in the picture
    plt.close(fig)
    return out
