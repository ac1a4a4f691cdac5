"""Resuming a send whose sender was SIGKILLed half way (issue 14), on a real Pulsar standalone.

    python benchmarks/resume.py [--mib 1024] [--runs 3] [--json benchmarks/results/resume.json]

A table of ``--mib`` MiB (4 partitions of 64 KiB byte-string records, lists, so it can be
digested) goes from guest to host in 4 MiB messages over 4 lanes. Per run and variant, in a
job of its own:

- ``resumed``: a sender is SIGKILLed once half of each lane's messages are stored; a new sender
  process sends the same table with ``resumable_tables`` and resume on (it skips what Pulsar
  stores). Timed: the new sender's ``remote``, its digest pre-pass included.
- ``whole``: the same kill, then the new sender sends everything again under the same
  incarnation (resume switched off); the receiver drops the copies.
- ``fresh``: no kill; one sender sends the whole table (``resumable_tables`` off: no pre-pass).
  The raw reference: what a send of the table costs here.

Also timed, in each new sender: the digest pre-pass alone (``table_digest``). The receiver, in
this process, reads every partition as it streams in and counts the records. The machine is
shared and loaded: ``uptime`` is recorded before and after each run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import fedtransport as ft  # noqa: E402  (after the path set-up above)
from fedtransport.brokers.standalone import PulsarStandalone  # noqa: E402
from fedtransport.resume import table_digest  # noqa: E402

GUEST, HOST = ft.Party("guest", "9999"), ft.Party("host", "10000")
RECORD = 64 << 10
PARTITIONS = 4
SPAWN = mp.get_context("spawn")


def make_table(mib: int) -> ft.Table:
    per = (mib << 20) // RECORD // PARTITIONS
    rng = __import__("numpy").random.default_rng(11)
    return ft.Table.from_partitions([[(f"{p}-{i}", rng.bytes(RECORD)) for i in range(per)] for p in range(PARTITIONS)])


def options(broker: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"service_url": broker["service_url"], "admin_url": broker["admin_url"], "max_message_size": 4 << 20,
            "send_timeout": 600.0, **extra}  # fmt: skip


def killed_sender(broker: dict[str, str], job: str, mib: int, out: Any) -> None:
    """Send the table; every lane stops once half its messages are confirmed. Then wait to be killed."""
    table = make_table(mib)
    opts = options(broker, resumable_tables=True)
    with ft.Federation.connect("pulsar", job_id=job, party=GUEST, options=opts) as fed:
        lanes = fed.transport.ctx.lanes
        per_lane = -(-mib // 4 // lanes) + 1  # about a lane's messages, the head's and tails included
        reached = threading.Barrier(lanes + 1)
        real_send = fed.transport.send

        def half_then_stuck(dst: ft.Party, lane: int, messages: Any) -> int:
            it = iter(messages)
            real_send(dst, lane, [m for _, m in zip(range(per_lane // 2), it, strict=False)])
            reached.wait(1800)
            threading.Event().wait(3600)
            return 0

        fed.transport.send = half_then_stuck  # type: ignore[method-assign]
        threading.Thread(target=fed.remote, args=(table, "t", "0", [HOST]), daemon=True).start()
        reached.wait(1800)
        out.put("half")
        threading.Event().wait(3600)


def new_sender(broker: dict[str, str], job: str, mib: int, variant: str, out: Any) -> None:
    """The restarted (or the only) sender: time its digest pre-pass and its ``remote``."""
    table = make_table(mib)
    started = time.perf_counter()
    table_digest(table, (4 << 20) - 88)
    digest_s = time.perf_counter() - started
    if variant == "whole":
        ft.Federation._stored_point = lambda *args: None  # type: ignore[method-assign,assignment]  # resume off
    opts = options(broker, resumable_tables=variant != "fresh")
    with ft.Federation.connect("pulsar", job_id=job, party=GUEST, options=opts) as fed:
        started = time.perf_counter()
        fed.remote(table, "t", "0", [HOST])
        remote_s = time.perf_counter() - started
        stats = fed.stats
    out.put({"digest_s": digest_s, "remote_s": remote_s, "messages_sent": stats["messages_sent"],
             "messages_resumed": stats["messages_resumed"]})  # fmt: skip


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def one(broker: dict[str, str], mib: int, variant: str, run: int) -> dict[str, Any]:
    job = f"resume-{variant}-{run}-{os.getpid()}"
    q = SPAWN.Queue()
    got: dict[str, Any] = {}
    with ft.Federation.connect("pulsar", job_id=job, party=HOST, options=options(broker)) as h:
        with contextlib.suppress(ft.TransferTimeout):
            h.get("t", "0", [GUEST], timeout=0.5)  # listening from now on

        def receive() -> None:
            [table] = h.get("t", "0", [GUEST], timeout=1800)
            got["records"] = sum(sum(1 for _ in table.iter_partition(p)) for p in range(table.num_partitions))

        load_before = uptime()
        if variant != "fresh":
            dead = SPAWN.Process(target=killed_sender, args=(broker, job, mib, q))
            dead.start()
            assert q.get(timeout=1800) == "half"
            dead.kill()
            dead.join(60)
        reader = threading.Thread(target=receive)
        reader.start()
        sender = SPAWN.Process(target=new_sender, args=(broker, job, mib, variant, q))
        sender.start()
        result: dict[str, Any] = q.get(timeout=3600)
        sender.join(60)
        reader.join(1800)
    ft.Federation.connect("pulsar", job_id=job, party=GUEST, options=options(broker)).cleanup()
    expected = (mib << 20) // RECORD // PARTITIONS * PARTITIONS
    assert got.get("records") == expected, f"{variant}: received {got.get('records')} of {expected} records"
    return {"variant": variant, "run": run, **result, "load_before": load_before, "load_after": uptime()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/resume.json")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with PulsarStandalone(startup_timeout=900.0) as pulsar:  # the machine is shared and loaded
        broker = {"service_url": pulsar.service_url, "admin_url": pulsar.admin_url}
        for run in range(args.runs):
            for variant in ("resumed", "whole", "fresh"):
                row = one(broker, args.mib, variant, run)
                rows.append(row)
                print(json.dumps(row), flush=True)
                write(args.json, args.mib, rows)  # after every row: an interrupted run keeps what it measured


def write(path: Path, mib: int, rows: list[dict[str, Any]]) -> None:
    summary: dict[str, Any] = {}
    for variant in ("resumed", "whole", "fresh"):
        times = [r["remote_s"] for r in rows if r["variant"] == variant]
        digests = [r["digest_s"] for r in rows if r["variant"] == variant]
        if times:
            summary[variant] = {"remote_s_median": statistics.median(times), "remote_s_worst": max(times),
                                "digest_s_median": statistics.median(digests), "digest_s_worst": max(digests),
                                "runs": len(times)}  # fmt: skip
    doc = {"mib": mib, "message_size": 4 << 20, "lanes": 4, "summary": summary, "rows": rows}
    path.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
