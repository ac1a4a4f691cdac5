"""Broadcast once: the sender's time and bytes for one object to 1, 2, 4 and 8 parties.

    python benchmarks/broadcast.py [--broker rabbitmq|pulsar|pulsar-replication] [--mib 128] [--runs 3]
                                   [--parties 1,2,4,8] [--json benchmarks/results/broadcast-rabbitmq.json]

One sender session ``remote``s a float64 array of ``--mib`` MiB (random: incompressible) to N
parties, sealed with a job secret (the usual federated-learning configuration), on a local
broker started for the run (a throw-away RabbitMQ node, or the real Apache Pulsar standalone
in shared mode; ``pulsar-replication``: two standalone clusters, the sender's and one cluster
that the route table gives every destination, with one destination session connected there so
the job's namespace exists for the replicators; the time is the sender's upload to its own
cluster, the replicators copy meanwhile). Timed is ``remote`` alone, which returns once the broker has accepted every
message; the receivers are not connected (their queues or the namespace's retention keep the
data), so what is measured is the sender's side. Each N runs twice in the same session: as a
broadcast (fedtransport/broadcast.py) and per destination (the transport's ``can_broadcast``
forced off: what every ``remote`` did before). Bytes on the wire are the framed messages the
sender published (``Federation.stats["bytes_sent"]``; tests/test_broadcast.py checks them
against the broker's own counters).

Reported per N and way: median and worst of ``--runs`` runs of the time, the time relative to
one party (same way, same run), and the bytes relative to the object; the machine's load
average before and after. Every run is kept in the JSON under ``runs``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import fedtransport as ft  # noqa: E402

SECRET = "benchmark job secret, 32 bytes.."
SENDER = ft.Party("guest", "9999")
MAX_PARTIES = 8


@contextlib.contextmanager
def broker_options(kind: str) -> Iterator[dict[str, Any]]:
    if kind == "rabbitmq":
        from fedtransport.brokers import RabbitNode

        with RabbitNode(name="bench-broadcast") as node:
            yield {"host": "127.0.0.1", "port": node.port, "mng_port": node.mng_port, "user": node.user,
                   "password": node.password}  # fmt: skip
    elif kind == "pulsar":
        from fedtransport.brokers.standalone import PulsarStandalone

        with PulsarStandalone() as broker:
            yield {"service_url": broker.service_url, "admin_url": broker.admin_url}
    else:
        from fedtransport.brokers.standalone import PulsarStandalone

        # 2 GiB of direct memory each: with 512 MiB (the launcher's default) cluster A ran out
        # (OutOfDirectMemoryError) replicating per-destination copies of 128 MiB, and its bookie failed.
        big = {"direct_memory": "2g"}
        with PulsarStandalone(cluster="bench-a", **big) as a, PulsarStandalone(cluster="bench-b", **big) as b:
            routes: dict[str, Any] = {SENDER.party_id: {"host": "127.0.0.1", "port": a.port, "cluster": "bench-a"}}
            for i in range(MAX_PARTIES):
                routes[str(10000 + i)] = {"host": "127.0.0.1", "port": b.port, "mngPort": b.web_port,
                                          "cluster": "bench-b"}  # fmt: skip
            table = ft.RouteTable.load(routes, kind="pulsar")
            yield {"service_url": a.service_url, "admin_url": a.admin_url, "mode": "replication",
                   "route_table": table, "receiver": {"service_url": b.service_url, "admin_url": b.admin_url,
                                                      "mode": "replication", "route_table": table}}  # fmt: skip


def one_run(
    kind: str, options: dict[str, Any], value: np.ndarray, parties: list[int], run: int
) -> list[dict[str, Any]]:
    rows = []
    backend = "rabbitmq" if kind == "rabbitmq" else "pulsar"
    options = dict(options)
    receiver_options = options.pop("receiver", None)
    routes = options.pop("route_table", None)
    for way in ("broadcast", "per-destination"):
        job = f"bench-broadcast-{os.getpid()}-{run}-{way}"
        receiver = None
        if receiver_options is not None:  # the destinations' cluster: the job's namespace there
            ropts = {k: v for k, v in receiver_options.items() if k != "route_table"}
            receiver = ft.Federation.connect(backend, job_id=job, party=ft.Party("host", "10000"),
                                             route_table=routes, options={**ropts, "secret": SECRET})  # fmt: skip
        fed = ft.Federation.connect(backend, job_id=job, party=SENDER, route_table=routes,
                                    options={**options, "secret": SECRET})  # fmt: skip
        try:
            if way == "per-destination":  # what remote did before broadcasts
                fed.transport.can_broadcast = lambda dsts: False  # type: ignore[method-assign]
            for n in parties:
                dsts = [ft.Party("host", str(10000 + i)) for i in range(n)]
                before = fed.stats["bytes_sent"]
                started = time.perf_counter()
                fed.remote(value, "w", f"{n}", dsts)
                elapsed = time.perf_counter() - started
                sent = fed.stats["bytes_sent"] - before
                rows.append({"run": run, "way": way, "parties": n, "seconds": elapsed,
                             "bytes_ratio": sent / value.nbytes})  # fmt: skip
                print(f"  run {run} {way:15} {n} parties: {elapsed:6.2f} s, {sent / value.nbytes:5.3f}x bytes",
                      flush=True)  # fmt: skip
        finally:
            fed.close()
            fed.cleanup()  # the broker lets go of the data before the next run
            if receiver is not None:
                receiver.close()
                receiver.cleanup()
    return rows


def summarise(rows: list[dict[str, Any]], parties: list[int]) -> list[dict[str, Any]]:
    out = []
    for way in ("broadcast", "per-destination"):
        for n in parties:
            mine = [r for r in rows if r["way"] == way and r["parties"] == n]
            ones = {r["run"]: r["seconds"] for r in rows if r["way"] == way and r["parties"] == parties[0]}
            rel = [r["seconds"] / ones[r["run"]] for r in mine]
            secs = [r["seconds"] for r in mine]
            out.append({
                "way": way, "parties": n,
                "seconds_median": statistics.median(secs), "seconds_worst": max(secs),
                "vs_one_party_median": statistics.median(rel), "vs_one_party_worst": max(rel),
                "bytes_ratio": statistics.median(r["bytes_ratio"] for r in mine),
            })  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker", choices=("rabbitmq", "pulsar", "pulsar-replication"), default="rabbitmq")
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--parties", default="1,2,4,8")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    parties = [int(p) for p in args.parties.split(",")]
    value = np.random.default_rng(0).random(args.mib * (1 << 20) // 8)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    with broker_options(args.broker) as options:
        for run in range(args.runs):
            rows += one_run(args.broker, options, value, parties, run)
    load_after = os.getloadavg()
    summary = summarise(rows, parties)
    print(f"{args.broker}, {args.mib} MiB sealed, {args.runs} runs; load {load_before} -> {load_after}")
    print(f"{'way':16}{'parties':>8}{'median s':>10}{'worst s':>9}{'x one (med)':>12}{'x one (worst)':>14}{'bytes':>7}")
    for s in summary:
        print(f"{s['way']:16}{s['parties']:>8}{s['seconds_median']:>10.2f}{s['seconds_worst']:>9.2f}"
              f"{s['vs_one_party_median']:>12.2f}{s['vs_one_party_worst']:>14.2f}{s['bytes_ratio']:>7.3f}")  # fmt: skip
    if args.json:
        doc = {"broker": args.broker, "mib": args.mib, "sealed": True, "runs": rows, "summary": summary,
               "loadavg_before": load_before, "loadavg_after": load_after, "cores": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
