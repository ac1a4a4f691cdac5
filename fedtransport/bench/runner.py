"""Running a benchmark: the flags, the schedule of repetitions, the printed lines and the result.

:func:`run` starts the backend's brokers (:mod:`.contexts`), picks the workloads
(:func:`~fedtransport.bench.workloads.selected`), runs each raw baseline repetition by repetition
with the workloads measured against it, after ``--warmup`` unmeasured rounds, and sums them up
(:mod:`.stats`). :func:`execute` is
``fedtransport bench``: a run, its JSON file and its chart, or only a chart of saved results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..brokers._process import log_tail
from ..brokers.standalone_config import physical_mebibytes
from ..errors import ConfigError
from .contexts import _CONTEXTS, PULSAR_BROKERS
from .report import load_results, render_chart
from .settle import BOUND, BUSY, cpu_seconds, settle
from .stats import CPU_KEYS, compare, summarize
from .workloads import _ARGUMENT_HOOKS, SMALL_COUNT, BenchContext, Go, Result, selected


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's flags (shared by ``fedtransport bench`` and benchmarks/throughput.py)."""
    ap.add_argument("--backend", choices=sorted(_CONTEXTS), default="pulsar")
    ap.add_argument("--mode", choices=["shared", "federated"], default="shared", help="RabbitMQ mode")
    ap.add_argument("--broker", choices=sorted(PULSAR_BROKERS), default="standalone",
                    help="Pulsar: standalone (real Apache Pulsar; default) or embedded (pulsar-lite)")  # fmt: skip
    ap.add_argument("--replication", action="store_true",
                    help="Pulsar: also run raw-repl, object-repl, table-repl on two standalone clusters")  # fmt: skip
    ap.add_argument("--mib", type=_positive, default=256, metavar="N",
                    help="MiB moved by every large workload: raw-large, object, table and table-N (default 256); "
                    "the raw client moves the same bytes, so each ratio compares equal transfers")  # fmt: skip
    ap.add_argument("--repeat", type=_positive, default=2)
    ap.add_argument("--warmup", type=_whole, default=1, metavar="N",
                    help="unmeasured rounds of every workload before the measured ones (default 1; "
                    "kept in the results under 'warmup')")  # fmt: skip
    ap.add_argument("--only", nargs="*", help="run only these workloads")
    ap.add_argument("--settle", type=_seconds, default=BOUND, metavar="SECONDS",
                    help="before each run, wait up to this long for the brokers to go quiet (under "
                    f"{BUSY:g} of a core; default {BOUND:g}, 0: do not wait)")  # fmt: skip
    ap.add_argument("--partitions", type=_positive, nargs="*", default=[], metavar="N",
                    help="extra workloads table-N: the --mib table in N partitions (scaling)")  # fmt: skip
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--chart", type=Path, help="draw a PNG chart of the results (needs matplotlib)")
    ap.add_argument("--from-json", type=Path, nargs="+", metavar="FILE",
                    help="run nothing: chart these result files (with --chart)")  # fmt: skip
    for hook in _ARGUMENT_HOOKS:
        hook(ap)
    return ap


def _whole_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def _whole(text: str) -> int:
    return _whole_at_least(text, 0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:  # nan or a negative would turn waiting off unsaid; inf never ends
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, 0 or more, got {text}")
    return value


def _positive(text: str) -> int:
    return _whole_at_least(text, 1)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    guide = sys.modules[__package__].__doc__  # fedtransport.bench's docstring is the --help text
    ap = argparse.ArgumentParser(prog=prog, description=guide, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(ap)


def _schedule(suite: Mapping[str, tuple[Go, str | None]]) -> list[list[str]]:
    """Workloads in groups: a raw baseline first, then the workloads measured against it."""
    groups: dict[str, list[str]] = {}
    for name, (_go, baseline) in suite.items():
        head = baseline if baseline is not None and baseline in suite else name
        groups.setdefault(head, [head] if head != name else [])
        if name not in groups[head]:
            groups[head].append(name)
    return list(groups.values())


def _line(backend: str, name: str, record: Mapping[str, Any]) -> str:
    median, worst = record["median"], record["worst"]
    runs = " ".join(f"{r['MB_per_s']:.1f}" for r in record["runs"])
    extra = ""
    if name.startswith("small") or name == "raw-small":
        extra = f"  {SMALL_COUNT / median['seconds']:6.0f} objects/s (worst {SMALL_COUNT / worst['seconds']:.0f})"
    if "cpu" in record:  # median CPU seconds: sender, receiver (the transfer), both processes (whole lives)
        cpu = record["cpu"]
        extra += "  cpu " + " ".join(f"{k[4:]} {cpu[k]:.2f} s" for k in CPU_KEYS if k in cpu)
    if all("settle_seconds" in r for r in record["runs"]):  # how long each run waited for a quiet broker
        extra += "  settled " + " ".join(f"{r['settle_seconds']:.1f}" for r in record["runs"]) + " s"
    return (f"{backend:8s} {name:12s} median {median['MB_per_s']:8.1f} MB/s {median['seconds']:7.2f} s  "
            f"worst {worst['MB_per_s']:8.1f} MB/s {worst['seconds']:7.2f} s{extra}  runs: {runs}")  # fmt: skip


def _settled(ctx: BenchContext, args: argparse.Namespace, go: Go, i: int) -> Result:
    """Repetition ``i`` of ``go``, started once the brokers have gone quiet (:mod:`.settle`).

    The result also holds ``cpu_broker``, the CPU seconds the brokers used over the whole
    repetition (the parties' start-up and clean-up too), when they were running before it began."""
    bound = getattr(args, "settle", BOUND)
    quiet = settle(ctx.pids, bound=bound) if ctx.pids is not None and bound > 0 else None
    before = ctx.pids() if ctx.pids is not None else []
    broker_cpu = cpu_seconds(before)
    try:
        result = go(i)
    except RuntimeError as exc:  # a party died: what the broker said then is often why
        tails = "".join(log_tail(log, 30) for log in (ctx.logs() if ctx.logs is not None else []))
        raise RuntimeError(f"{exc}{tails}") from exc
    if quiet is not None:
        result["settle_seconds"], result["settle_broker_cpu"] = quiet["seconds"], quiet["broker_cpu"]
    # A broker started inside the repetition would count its own start-up: left out then.
    if before and ctx.pids is not None and ctx.pids() == before:
        result["cpu_broker"] = round(cpu_seconds(before) - broker_cpu, 3)
    return result


def run(args: argparse.Namespace, out: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run the suite for ``args.backend``; print one line per workload and ratio; return the results.

    Each raw baseline runs repetition by repetition with the workloads measured against it
    (raw 1, fed 1, fed' 1, raw 2, ...), so every per-repetition ratio compares neighbours in time.
    """
    results: dict[str, Any] = {"backend": args.backend, "mode": args.mode, "cpu_count": os.cpu_count(),
                               "date": time.strftime("%Y-%m-%d"), "repeat": args.repeat,
                               "load_average": list(os.getloadavg()), "workloads": {}}  # fmt: skip
    if args.backend == "pulsar":
        results["broker"] = getattr(args, "broker", "standalone")
    baselines: dict[str, str] = {}
    ratios: dict[str, Any] = {}
    w = results["workloads"]
    with ExitStack() as stack:
        ctx = _CONTEXTS[args.backend](args, stack)
        suite = selected(ctx)
        for group in _schedule(suite):
            runs: dict[str, list[Result]] = {name: [] for name in group}
            # Unmeasured rounds first: a broker JVM just started runs its first transfers on cold
            # code and fresh ledgers (object/raw 0.62 on round 1, then 1.0-1.25). They are kept
            # in the results under "warmup", never counted in a median or worst.
            for i in range(getattr(args, "warmup", 0)):
                for name in group:
                    warm = _settled(ctx, args, suite[name][0], args.repeat + i)
                    results.setdefault("warmup", {}).setdefault(name, []).append(warm)
                    out(f"warm-up {name}: {warm['MB_per_s']:.1f} MB/s in {warm['seconds']:.2f} s (not counted)")
            for i in range(args.repeat):
                for name in group:
                    runs[name].append(_settled(ctx, args, suite[name][0], i))
            for name in group:
                w[name] = summarize(runs[name])
                out(_line(args.backend, name, w[name]))
            for name in group:
                base = suite[name][1]
                if base and base in w:
                    baselines[name] = base
                    ratios[name] = r = compare(w[name], w[base])
                    each = " ".join(f"{x:.2f}" for x in r["per_repeat"])
                    out(f"ratio {name} / {base}: median {r['median']:.2f}, worst {r['worst']:.2f}"
                        f"  (per repetition: {each}; {base}'s own slowest run: {w[base]['spread']:.2f}"
                        " of its median)")  # fmt: skip
                    if "cpu" in r:
                        c = r["cpu"]
                        each = " ".join(f"{x:.2f}" for x in c["per_repeat"])
                        out(f"cpu ratio {name} / {base} (CPU per byte, both sides): median {c['median']:.2f}, "
                            f"worst {c['worst']:.2f}  (per repetition: {each})")  # fmt: skip
                elif base:
                    baselines[name] = base
    results["load_average_after"] = list(os.getloadavg())
    results["ratios"] = ratios
    results["baselines"] = baselines
    return results


def execute(args: argparse.Namespace, out: Callable[[str], Any] = print) -> int:
    """Run (or, with ``--from-json``, only chart) as the parsed flags say; the exit code."""
    if args.from_json:
        if not args.chart:
            raise ConfigError("--from-json only charts existing results: give --chart FILE.png")
        results = [load_results(p) for p in args.from_json]
    else:
        _check_room(args)
        if args.json:  # before the run, not after minutes of it
            args.json.parent.mkdir(parents=True, exist_ok=True)
        results = [run(args, out)]
        if args.json:
            args.json.write_text(json.dumps(results[0], indent=2))
            out(f"results written to {args.json}")
    if args.chart:
        render_chart(results, args.chart)
        out(f"chart written to {args.chart}")
    return 0


def _check_room(args: argparse.Namespace) -> None:
    """Refuse a ``--mib`` this machine cannot hold before any broker starts: the object and table
    workloads build the whole value in the sending party and the object one again in the
    receiving party, two processes here. Otherwise the run would fail after its raw baseline, with
    a MemoryError in a child process and its peer waiting for it."""
    if args.only and all(name.startswith(("raw-", "small")) for name in args.only):
        return  # streamed by the raw client, or of a fixed small size
    have = physical_mebibytes()
    if 2 * args.mib > have:
        raise ConfigError(
            f"--mib {args.mib} needs at least {2 * args.mib} MiB of memory (the value whole in both "
            f"parties) and this machine has {have} MiB: give a smaller --mib"
        )


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``python benchmarks/throughput.py``: the same flags as ``fedtransport bench``."""
    args = build_parser(prog).parse_args(argv)
    try:
        return execute(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
