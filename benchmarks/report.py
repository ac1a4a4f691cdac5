"""Turn the throughput results in benchmarks/results/ into one PNG chart (docs/benchmarks.png).

    python benchmarks/report.py [--results benchmarks/results] [--out docs/benchmarks.png]

Reads every ``throughput-*.json`` written by ``benchmarks/throughput.py --json`` (or
``fedtransport bench --json``) and draws, per result file (its own labelled group: the backend,
with the Pulsar broker or the RabbitMQ mode; ``spark + BACKEND`` for a Spark run), the raw broker
client next to fedtransport's workloads: each bar the median run, its whisker the worst run, each
fedtransport bar labelled with its median ratio to the raw client and its worst per-repetition
ratio. Needs matplotlib (``pip install 'fedtransport[bench]'``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from fedtransport.bench import load_results, render_chart  # noqa: E402  (after the path set-up above)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--pattern", default="throughput-*.json", help="which result files to read")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.png")
    args = ap.parse_args(argv)
    files = sorted(args.results.glob(args.pattern))
    if not files:
        print(f"no {args.pattern} in {args.results}", file=sys.stderr)
        return 1
    out = render_chart([load_results(f) for f in files], args.out)
    print(f"{out} from {', '.join(f.name for f in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
