"""Where the time of FATE over fedtransport goes: one table of 4 KiB records, per layer, per side.

    python benchmarks/fate_profile.py [--backend rabbitmq|pulsar] [--mib 64] [--rate 200] [--idle] [--json FILE]

Runs one repetition of the ``fate-ft-table`` workload (fedtransport/bench/fate.py: two processes
with FATE 2.2 contexts on standalone computing, a table of 8 partitions of (int key, 4 KiB float64
array) records) under ``py-spy record --subprocesses`` on a fresh RabbitMQ node (or a real Pulsar
standalone broker), and sums the sampled stacks up by layer. A sample counts for the innermost
frame of a known layer (a socket call made by the transport is the transport's time); stacks of
the party start-up (imports, building the table, FATE contexts) and of the end (destroy) are left
out, so the shares are of the transfer itself. py-spy runs with ``--gil``: a sample is the thread that
holds the GIL, i.e. Python's own work. Threads that wait poll with timeouts and look busy to py-spy's
idle heuristic; with ``--gil`` they do not count. Work done with the GIL released (socket writes,
LMDB, CRC32, numpy copies) is not in the samples: the shares are of the Python-side time.

``--idle`` is the wall-clock view instead: py-spy samples every thread, idle or not (``--idle``,
no ``--gil``), and the shares are of each party's main thread alone, on the bench's lines that
``put`` or ``get`` the data (not the hello before the clock, nor the sender's wait for "done"
after). Where that thread waits (on the broker, on a lock, inside LMDB) is where the transfer's
time goes, whoever does the work.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (layer, pattern on a frame's file): the first whose pattern matches, innermost frame first
LAYERS = [
    ("broker client (pika / pulsar-client)", re.compile(r"/site-packages/(pika|pulsar)/")),
    ("fedtransport transport", re.compile(r"fedtransport/transport/")),
    ("fedtransport framing + inbox", re.compile(r"fedtransport/(framing|inbox)\.py")),
    ("fedtransport codec (pickle 5, buffers, crc)", re.compile(r"fedtransport/codec/")),
    ("fedtransport api / table", re.compile(r"fedtransport/(api|table|transfer|progress)\.py")),
    ("FATE adapter (fedtransport/fate2.py)", re.compile(r"fedtransport/fate2\.py")),
    ("FATE standalone computing (LMDB read/write)", re.compile(r"fate/arch/computing/|/site-packages/lmdb")),
    ("FATE context, pickler, federation API", re.compile(r"/fate/")),
]
# A sample of the transfer: a party's main thread inside FATE's put/get, or any other thread (the
# broker clients' and fedtransport's I/O threads, FATE's computing pool); the parties' set-up and
# tear-down (imports, the table built, contexts made and destroyed) are left out.
TRANSFER = re.compile(r"^_(push|pull) \(fate/arch/context/_parties\.py|^Thread\._bootstrap \(")
# The --idle view: a party's main thread on a line of the bench that puts or gets "data" (the
# hello, the "done" and the count after the clock are other lines), found in the bench's source.
_BENCH = ROOT / "fedtransport" / "bench" / "fate.py"
DATA_LINES = {i for i, line in enumerate(_BENCH.read_text().splitlines(), 1) if '"data"' in line}
DATA_FRAME = re.compile(r"^fate_(sender|receiver) \(fedtransport/bench/fate\.py:(\d+)\)$")


def on_data_line(frames: list[str]) -> bool:
    return any((m := DATA_FRAME.match(f)) is not None and int(m.group(2)) in DATA_LINES for f in frames)


FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::\d+)?\)$")


def layer_of(frames: list[str]) -> str | None:
    for frame in reversed(frames):  # innermost first
        m = FRAME.match(frame)
        path = m.group("file") if m else frame
        for name, pattern in LAYERS:
            if pattern.search(path):
                return name
    return None


def innermost(frames: list[str]) -> str:
    """The innermost frame of a known layer, as ``function (file)``, or ``other``."""
    for frame in reversed(frames):
        m = FRAME.match(frame)
        if m and any(pattern.search(m.group("file")) for _, pattern in LAYERS):
            return f"{m.group('func')} ({m.group('file')})"
    return "other"


def summarize(raw: str, top: int = 8, *, main_only: bool = False) -> dict[str, dict[str, float]]:
    """Per side (sender / receiver), each layer's share of the transfer's samples, and under
    ``functions`` the ``top`` innermost functions of the layers with theirs. ``main_only``: the
    samples of the party's main thread putting or getting the data alone (the ``--idle`` view)."""
    by_pid: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        procs = [i for i, f in enumerate(frames) if f.startswith("process ")]  # py-spy's root frames
        if procs:
            by_pid[frames[procs[-1]]].append((frames[procs[-1] + 1 :], int(count)))
    shares: dict[str, dict[str, float]] = {}
    for samples in by_pid.values():
        text = "\n".join(";".join(f) for f, _ in samples)
        side = "sender" if "fate_sender" in text else "receiver" if "fate_receiver" in text else None
        if side is None:
            continue  # the driver, the broker's helpers
        counts: collections.Counter[str] = collections.Counter()
        functions: collections.Counter[str] = collections.Counter()
        for frames, n in samples:
            if not (on_data_line(frames) if main_only else any(TRANSFER.search(f) for f in frames)):
                continue
            counts[layer_of(frames) or "other (numpy, stdlib outside the layers)"] += n
            functions[innermost(frames)] += n
        total = sum(counts.values()) or 1
        shares[side] = {k: round(100 * v / total, 1) for k, v in counts.most_common()}
        shares[side]["samples"] = float(total)
        shares[f"{side} functions"] = {k: round(100 * v / total, 1) for k, v in functions.most_common(top)}
    return shares


def child(args: argparse.Namespace) -> None:
    """One fate-ft-table repetition on a fresh broker (run under py-spy)."""
    from contextlib import ExitStack

    from fedtransport.bench.fate import fate_receiver, fate_sender
    from fedtransport.bench.parties import run_pair

    with ExitStack() as stack:
        if args.backend == "rabbitmq":
            from fedtransport.brokers import RabbitNode

            node = stack.enter_context(RabbitNode(name="fate-profile"))
            opts = {"host": "127.0.0.1", "port": node.port, "mng_port": node.mng_port, "user": node.user,
                    "password": node.password, "mode": "shared"}  # fmt: skip
            options = {"guest": opts, "host": opts}
            routes = {p: {"host": "127.0.0.1", "port": node.port, "mng_port": node.mng_port} for p in ("9999", "10000")}
        else:
            from fedtransport.brokers import PulsarStandalone

            broker = stack.enter_context(PulsarStandalone())
            opts = {"service_url": broker.service_url, "admin_url": broker.admin_url}
            options, routes = {"guest": opts, "host": opts}, None
        cfg = {"engine": "fedtransport", "what": "table", "backend": args.backend, "options": options,
               "routes": routes, "native": None, "table_mib": args.mib,
               "job_id": f"fate-profile-{time.time_ns()}"}  # fmt: skip
        result = run_pair(fate_sender, fate_receiver, cfg, wait_ready=True)
        print(json.dumps(result), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["rabbitmq", "pulsar"], default="rabbitmq")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--idle", action="store_true",
                    help="wall-clock view: sample idle threads too, shares of each party's main thread")  # fmt: skip
    ap.add_argument("--json", type=Path, help="write the shares here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    spy = Path(sys.executable).with_name("py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "stacks.txt"
        view = ["--idle"] if args.idle else ["--gil"]
        cmd = [str(spy), "record", "--subprocesses", *view, "--format", "raw", "--rate", str(args.rate),
               "-o", str(raw), "--", sys.executable, __file__, "--child", "--backend", args.backend,
               "--mib", str(args.mib)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        run = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
        shares = summarize(raw.read_text(), main_only=args.idle)
    report = {"backend": args.backend, "mib": args.mib, "run": run, "load_average": list(os.getloadavg()),
              "rate": args.rate, "view": "idle" if args.idle else "gil"}  # fmt: skip
    if not args.idle:  # how much of the transfer each side spent running Python (holding the GIL) at all
        report["gil_held_percent_of_transfer"] = {
            side: round(100 * s["samples"] / (args.rate * run["seconds"]), 1) for side, s in shares.items()
            if "samples" in s
        }  # fmt: skip
    report["shares_percent"] = shares
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
