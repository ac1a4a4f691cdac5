"""Median and worst: how the repetitions of a workload, and its ratio to the baseline, are summed up.

Never the best run alone: a workload's record holds every run, the median (of the rates), the
worst run and the spread (worst rate / median rate); a ratio is that of the medians, with the
worst per-repetition ratio beside it.

CPU (when the sides report it, see :func:`~fedtransport.bench.parties.run_pair`): a record's
``cpu`` holds the median seconds per side, and a ratio's ``cpu`` block compares the CPU the two
sides spent per byte moved, fed / raw: above 1 fedtransport costs more. Its ``worst`` is the
highest per-repetition ratio. On a loaded machine this is the steadier figure: a neighbour's
burst moves a run's wall clock a lot and the CPU it needed little.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .workloads import Result

CPU_KEYS = ("cpu_sender", "cpu_receiver", "cpu_processes", "cpu_broker")


def _rate(run: Mapping[str, float]) -> float:
    """Bytes per second, unrounded (``MB_per_s`` is rounded to 0.1, too coarse for 1 MB of small objects)."""
    return run["bytes"] / run["seconds"]


def summarize(runs: Sequence[Result]) -> dict[str, Any]:
    """A workload's record: every run, the median (of the rates), the worst and the best run."""
    if not runs:
        raise ValueError("no runs to summarize")
    rate = statistics.median(_rate(r) for r in runs)  # of an even count: the mean of the middle two
    median = {  # seconds to match the median rate, so both say the same of an even count too
        "seconds": round(runs[0]["bytes"] / rate, 3),
        "bytes": runs[0]["bytes"],
        "MB_per_s": round(rate / 1e6, 3),
    }
    worst = min(runs, key=_rate)
    best = max(runs, key=_rate)
    # How far the slowest run fell below the median: the machine's noise, measured on the
    # workload itself. A raw baseline's spread bounds what a worst per-repetition ratio can show.
    spread = round(_rate(worst) / rate, 3)
    record: dict[str, Any] = {"median": median, "worst": worst, "best": best, "spread": spread, "runs": list(runs)}
    cpu = {key: round(statistics.median(r[key] for r in runs), 3) for key in CPU_KEYS if all(key in r for r in runs)}
    if cpu:
        record["cpu"] = cpu
    return record


def _transfer_cpu(run: Mapping[str, float]) -> float | None:
    """CPU seconds per byte both sides spent on the transfer; None if a side did not report it."""
    if "cpu_sender" not in run or "cpu_receiver" not in run:
        return None
    return (run["cpu_sender"] + run["cpu_receiver"]) / run["bytes"]


def compare(fed: Mapping[str, Any], raw: Mapping[str, Any]) -> dict[str, Any]:
    """A workload's ratio to its baseline: of the medians, and the worst per-repetition ratio.

    Repetition ``i`` of the workload ran right after repetition ``i`` of the baseline, so
    ``fed_i / raw_i`` compares runs made under the same load.
    """
    pairs = list(zip(fed["runs"], raw["runs"], strict=False))
    per_repeat = [round(_rate(f) / _rate(r), 3) for f, r in pairs]
    ratio: dict[str, Any] = {
        "median": round(_rate(fed["median"]) / _rate(raw["median"]), 3),
        "worst": min(per_repeat) if per_repeat else None,
        "per_repeat": per_repeat,
    }
    cpu = [(_transfer_cpu(f), _transfer_cpu(r)) for f, r in pairs]
    each = [round(f / r, 3) for f, r in cpu if f is not None and r]
    if pairs and len(each) == len(pairs):
        fed_cpu = statistics.median(c for c, _ in cpu if c is not None)
        raw_cpu = statistics.median(c for _, c in cpu if c is not None)
        ratio["cpu"] = {"median": round(fed_cpu / raw_cpu, 3), "worst": max(each), "per_repeat": each}
    return ratio
