"""Scale simulation: many parties of one job in one process, on the in-process ``memory`` backend.

    python benchmarks/scale_sim.py --parties 32 --lanes 4 --mib 1 --json benchmarks/results/scale-sim.json
    python benchmarks/scale_sim.py --parties 100 --pattern star --json benchmarks/results/scale-sim.json

Every party is a ``Federation`` session of its own, driven by its own thread (with its own
asyncio loop). Which ordered pairs of parties exchange data is set by ``--pattern``:

  all    every party sends to every other party and gets from every other party
  star   party 0 (the arbiter) sends to every other party, and every other party sends to it

Two rounds run one after the other; inside a round every transfer is in flight at once:

  object  each party calls ``remote`` once with a float64 array of ``--mib`` MiB (random,
          incompressible) for all of its peers, and ``get`` once per peer
  table   the same with a table of ``--partitions`` partitions x ``--records`` records of
          ``--record-bytes`` random bytes each

Every value is checked on arrival (sender, CRC32 of the data, table keys and record counts).
What is reported is counted or measured, never derived from the design:

  lanes      the lanes (topics / queues on a broker) the memory hub created for the job
             (``fedtransport.transport.memory.hub``), the ordered pairs and lane numbers they
             cover, how many carried messages, and how many were left after ``cleanup()``
  traffic    transfers, messages and bytes (``Federation.stats`` of every session, and a count
             per lane taken on the send path)
  time       wall time per round; per-transfer latency from the sender's ``remote`` call to the
             receiver holding the value (``get`` returned; for a table, every partition read),
             as min, p50, p90, p99, max
  resources  peak RSS (``getrusage``), RSS before and after, peak thread count, CPU seconds

``--idle-wait`` replaces the memory backend's idle poll (every lane consumer thread wakes every
0.5 s to look for a close). With thousands of consumer threads in one process those wake-ups
take the GIL from the threads doing the work: with 24 parties x 23 peers x 4 lanes = 2208
threads, a round that takes 3-6 s with ``--idle-wait 30`` took a minute and more. Each real
party runs in its own process with only its own consumers, so larger simulations set
``--idle-wait 30``; the JSON records the value.

The memory backend moves the same framed bytes a broker would, but through in-process queues:
the timings measure this library's own CPU cost (encode, frame, reassemble, decode, thread
hand-offs) with every party sharing the machine's cores, not a network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sys
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Iterable
from datetime import date
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import fedtransport as ft  # noqa: E402
from fedtransport.party import Party  # noqa: E402
from fedtransport.transport.base import Delivery  # noqa: E402
from fedtransport.transport.memory import MemoryTransport, hub  # noqa: E402

MiB = 1 << 20
BACKEND = "memory-counted"


# --- a memory backend that also counts what goes on each lane ----------------------------------


class CountedMemory(MemoryTransport):
    """The ``memory`` backend plus a count of messages and bytes per lane on send (and ``--idle-wait``)."""

    name: ClassVar[str] = BACKEND
    counts: ClassVar[dict[tuple[Any, ...], list[int]]] = defaultdict(lambda: [0, 0])
    counts_lock: ClassVar[threading.Lock] = threading.Lock()

    def send(self, dst: Party, lane: int, messages: Iterable[bytes]) -> int:
        key = self._key(self.ctx.party, dst, lane)

        def counted() -> Iterable[bytes]:
            for msg in messages:
                with self.counts_lock:
                    c = self.counts[key]
                    c[0] += 1
                    c[1] += len(msg)
                yield msg

        return super().send(dst, lane, counted())

    #: seconds an idle lane consumer sleeps before it looks again; None keeps the backend's own
    idle_wait: ClassVar[float | None] = None

    def _pump(self, src: Party, lane_no: int, deliver: Any) -> None:
        if self.idle_wait is None:
            return super()._pump(src, lane_no, deliver)
        # MemoryTransport._pump with a longer idle wait: close() and cleanup() notify every lane
        # of the job, so the wait only bounds how long a missed notification could go unseen.
        q = self._hub.lane(self._key(src, self.ctx.party, lane_no))
        while not self._closed.is_set():
            with q.cond:
                while not q.ready and not self._closed.is_set() and not q.deleted:
                    q.cond.wait(self.idle_wait)
                if self._closed.is_set() or q.deleted:
                    return
                msg_id, data = q.ready.popleft()
                q.unacked[msg_id] = data
            deliver(Delivery(src, lane_no, data, msg_id))


ft.register(BACKEND, CountedMemory)


# --- process measurements -------------------------------------------------------------------


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Sampler:
    """Samples RSS and the thread count in the background; keeps the maxima."""

    def __init__(self, every: float = 0.05) -> None:
        self.every = every
        self.max_rss = 0.0
        self.max_threads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max_rss = max(self.max_rss, rss_mib())
            self.max_threads = max(self.max_threads, threading.active_count())
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def percentiles(values: list[float]) -> dict[str, float]:
    """Nearest-rank percentiles of ``values``, in milliseconds."""
    if not values:
        return {}
    s = sorted(values)

    def rank(q: float) -> float:
        return s[min(len(s) - 1, max(0, int(np.ceil(q / 100 * len(s))) - 1))]

    return {
        "count": len(s),
        "min_ms": round(s[0] * 1000, 2),
        "p50_ms": round(rank(50) * 1000, 2),
        "p90_ms": round(rank(90) * 1000, 2),
        "p99_ms": round(rank(99) * 1000, 2),
        "max_ms": round(s[-1] * 1000, 2),
        "mean_ms": round(sum(s) / len(s) * 1000, 2),
    }


# --- the workload ---------------------------------------------------------------------------


def make_parties(n: int) -> list[Party]:
    """Party 0 is the arbiter (the centre of the star pattern), 1 the guest, the rest hosts."""
    roles = ["arbiter", "guest"]
    return [Party(roles[i] if i < 2 else "host", str(9999 + i)) for i in range(n)]


def peer_map(n: int, pattern: str) -> dict[int, list[int]]:
    if pattern == "all":
        return {i: [j for j in range(n) if j != i] for i in range(n)}
    return {0: list(range(1, n)), **{i: [0] for i in range(1, n)}}


class Values:
    """What each party sends, and the checksums a receiver verifies it against."""

    def __init__(self, args: argparse.Namespace, n: int) -> None:
        self.objects: list[dict[str, Any]] = []
        self.object_crc: list[int] = []
        self.tables: list[ft.Table] = []
        self.table_crc: list[int] = []
        length = max(1, int(args.mib * MiB) // 8)
        for i in range(n):
            rng = np.random.default_rng(i)
            arr = rng.random(length)
            self.objects.append({"src": i, "data": arr})
            self.object_crc.append(zlib.crc32(arr))
            parts = [
                [(f"{i}-{p}-{r}", rng.bytes(args.record_bytes)) for r in range(args.records)]
                for p in range(args.partitions)
            ]
            self.tables.append(ft.Table.from_partitions(parts))
            self.table_crc.append(table_crc(parts))


def table_crc(partitions: list[list[tuple[Any, Any]]]) -> int:
    crc = 0
    for part in partitions:
        for key, value in part:
            crc = zlib.crc32(value, zlib.crc32(key.encode(), crc))
    return crc


class Check(Exception):
    pass


def check(kind: str, src: int, value: Any, values: Values, args: argparse.Namespace) -> None:
    if kind == "object":
        if not isinstance(value, dict) or value.get("src") != src:
            raise Check(f"object from party {src}: wrong sender in {type(value).__name__}")
        if zlib.crc32(value["data"]) != values.object_crc[src]:
            raise Check(f"object from party {src}: CRC mismatch")
        return
    if not isinstance(value, ft.Table) or value.num_partitions != args.partitions:
        raise Check(f"table from party {src}: not a table of {args.partitions} partitions")
    if any(len(p) != args.records for p in value.partitions):
        raise Check(f"table from party {src}: wrong record count")
    if table_crc(value.partitions) != values.table_crc[src]:
        raise Check(f"table from party {src}: keys or values differ")


async def party_round(
    me: int, fed: ft.Federation, kind: str, parties: list[Party], peers: list[int], values: Values,
    args: argparse.Namespace, out: dict[str, Any],
) -> None:  # fmt: skip
    """One party's share of a round: one remote to all its peers, one get per peer, concurrently."""
    value = values.objects[me] if kind == "object" else values.tables[me]
    name, tag = f"{kind}-round", "0"

    async def send() -> None:
        out["sent_at"][me] = time.perf_counter()
        await fed.remote_async(value, name, tag, [parties[j] for j in peers])
        out["accepted_at"][me] = time.perf_counter()

    async def receive(src: int) -> None:
        [got] = await fed.get_async(name, tag, [parties[src]], timeout=args.timeout)
        if isinstance(got, ft.Table):
            # get returns a table once its head is in; its partitions stream in as they are read
            await asyncio.to_thread(lambda: got.partitions)
        done = time.perf_counter()
        check(kind, src, got, values, args)
        out["received_at"][(src, me)] = done

    await asyncio.gather(send(), *(receive(j) for j in peers))


def party_thread(
    me: int, fed: ft.Federation, parties: list[Party], peers: list[int], values: Values, args: argparse.Namespace,
    rounds: dict[str, dict[str, Any]], barrier: threading.Barrier, errors: list[str],
) -> None:  # fmt: skip
    for kind in rounds:
        barrier.wait()
        try:
            asyncio.run(party_round(me, fed, kind, parties, peers, values, args, rounds[kind]))
        except Exception as exc:  # reported, and the run fails
            errors.append(f"party {me} ({parties[me]}), {kind} round: {type(exc).__name__}: {exc}")
        barrier.wait()


def stats_total(feds: list[ft.Federation]) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for fed in feds:
        for k, v in fed.stats.items():
            total[k] += v
    return dict(total)


def run(args: argparse.Namespace) -> dict[str, Any]:
    CountedMemory.idle_wait = args.idle_wait
    n = args.parties
    parties = make_parties(n)
    peers = peer_map(n, args.pattern)
    pairs = sorted((i, j) for i in peers for j in peers[i])
    job_id = f"scale-sim-{os.getpid()}-{time.time_ns()}"
    hub_name = f"scale-sim-{os.getpid()}"
    options: dict[str, Any] = {"hub": hub_name, "lanes": args.lanes, "max_message_size": args.max_message_size}
    if args.secret:
        options["secret"] = "scale-sim-job-secret-0123456789"

    rss_start = rss_mib()
    t = time.perf_counter()
    values = Values(args, n)
    prepare_s = time.perf_counter() - t
    rss_values = rss_mib()
    CountedMemory.counts.clear()

    with Sampler() as sampler:
        t = time.perf_counter()
        feds = [ft.Federation.connect(BACKEND, job_id=job_id, party=p, options=options) for p in parties]
        connect_s = time.perf_counter() - t
        rounds: dict[str, dict[str, Any]] = {
            kind: {"sent_at": {}, "accepted_at": {}, "received_at": {}} for kind in ("object", "table")
        }
        barrier = threading.Barrier(n + 1)
        errors: list[str] = []
        threads = [
            threading.Thread(target=party_thread, name=f"party-{i}",
                             args=(i, feds[i], parties, peers[i], values, args, rounds, barrier, errors))
            for i in range(n)
        ]  # fmt: skip
        for th in threads:
            th.start()
        results: dict[str, Any] = {}
        for kind in rounds:
            before, cpu0 = stats_total(feds), cpu_seconds()
            lanes_before = {k: tuple(c) for k, c in CountedMemory.counts.items()}
            barrier.wait()  # start
            t = time.perf_counter()
            barrier.wait()  # every party done
            wall = time.perf_counter() - t
            cpu = cpu_seconds() - cpu0
            after = stats_total(feds)
            r = rounds[kind]
            latencies = [r["received_at"][(s, d)] - r["sent_at"][s] for (s, d) in r["received_at"]]
            accept = [r["accepted_at"][i] - r["sent_at"][i] for i in r["accepted_at"]]
            lane_delta = {
                k: (c[0] - lanes_before.get(k, (0, 0))[0], c[1] - lanes_before.get(k, (0, 0))[1])
                for k, c in CountedMemory.counts.items()
            }
            lane_delta = {k: d for k, d in lane_delta.items() if d[0]}
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            transfers = len(r["received_at"])
            results[kind] = {
                "transfers_expected": len(pairs),
                "transfers_delivered": transfers,
                "wall_s": round(wall, 3),
                "cpu_s": round(cpu, 2),
                **delta,
                "bytes_per_transfer": round(delta["bytes_sent"] / max(1, len(pairs))),
                "messages_per_transfer": round(delta["messages_sent"] / max(1, len(pairs)), 2),
                "lanes_with_traffic": len(lane_delta),
                "messages_counted_on_lanes": sum(d[0] for d in lane_delta.values()),
                "bytes_counted_on_lanes": sum(d[1] for d in lane_delta.values()),
                "MB_per_s_delivered": round(delta["bytes_received"] / 1e6 / max(wall, 1e-9), 1),
                "transfers_per_s": round(transfers / max(wall, 1e-9), 1),
                "latency": percentiles(latencies),
                "remote_accepted": percentiles(accept),
            }
        for th in threads:
            th.join()
        peak_threads = sampler.max_threads

        keys = hub(hub_name).job_lanes(job_id)
        lane_pairs = {(k[1], k[2]) for k in keys}
        lane_numbers = sorted({k[3] for k in keys})
        per_pair = defaultdict(int)
        for k in keys:
            per_pair[(k[1], k[2])] += 1
        t = time.perf_counter()
        for fed in feds:
            fed.close()
        close_s = time.perf_counter() - t
        t = time.perf_counter()
        feds[0].cleanup()
        cleanup_s = time.perf_counter() - t
        left = len(hub(hub_name).job_lanes(job_id))
        rss_peak_sampled = sampler.max_rss

    carried = {k for k, c in CountedMemory.counts.items() if c[0]}
    party_index = {p: i for i, p in enumerate(parties)}
    return {
        "config": {
            "parties": n,
            "pattern": args.pattern,
            "lanes": args.lanes,
            "object_mib": args.mib,
            "table": {"partitions": args.partitions, "records": args.records, "record_bytes": args.record_bytes},
            "max_message_size": args.max_message_size,
            "secret": bool(args.secret),
            "backend": "memory (with a per-lane send counter)",
            "idle_wait_s": args.idle_wait or "backend default",
        },
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "date": str(date.today())},
        "ok": not errors,
        "errors": errors[:20],
        "lanes": {
            "ordered_pairs_exchanging": len(pairs),
            "expected": len(pairs) * args.lanes,
            "created": len(keys),
            "pairs_covered": len(lane_pairs),
            "pairs_match": {(party_index[s], party_index[d]) for s, d in lane_pairs} == set(pairs),
            "per_pair": sorted(set(per_pair.values())),
            "lane_numbers": lane_numbers,
            "carried_messages": len(carried),
            "left_after_cleanup": left,
        },
        "rounds": results,
        "totals": {
            "transfers": sum(r["transfers_delivered"] for r in results.values()),
            "messages": sum(r["messages_sent"] for r in results.values()),
            "bytes": sum(r["bytes_sent"] for r in results.values()),
            "wall_s": round(sum(r["wall_s"] for r in results.values()), 3),
        },
        "time": {
            "prepare_values_s": round(prepare_s, 3),
            "connect_all_s": round(connect_s, 3),
            "close_all_s": round(close_s, 3),
            "cleanup_s": round(cleanup_s, 3),
        },
        "resources": {
            "rss_start_mib": round(rss_start, 1),
            "rss_after_values_mib": round(rss_values, 1),
            "rss_peak_sampled_mib": round(rss_peak_sampled, 1),
            "rss_peak_mib": round(peak_rss_mib(), 1),
            "rss_end_mib": round(rss_mib(), 1),
            "threads_peak": peak_threads,
        },
    }


def summary(res: dict[str, Any]) -> str:
    c, lanes = res["config"], res["lanes"]
    lines = [
        f"{c['parties']} parties, pattern {c['pattern']}, {c['lanes']} lanes: "
        f"{lanes['created']} lanes created (expected {lanes['expected']}), "
        f"{lanes['carried_messages']} carried messages, {lanes['left_after_cleanup']} left after cleanup",
    ]
    for kind, r in res["rounds"].items():
        lat = r["latency"]
        lines.append(
            f"  {kind:6} {r['transfers_delivered']}/{r['transfers_expected']} transfers, "
            f"{r['messages_sent']} messages, {r['bytes_sent'] / 1e6:.1f} MB in {r['wall_s']:.2f} s "
            f"({r['MB_per_s_delivered']} MB/s); latency p50 {lat.get('p50_ms')} ms, "
            f"p99 {lat.get('p99_ms')} ms, max {lat.get('max_ms')} ms"
        )
    rs = res["resources"]
    lines.append(
        f"  peak RSS {rs['rss_peak_mib']} MiB (start {rs['rss_start_mib']}), peak threads {rs['threads_peak']}"
    )
    if res["errors"]:
        lines += [f"  ERROR {e}" for e in res["errors"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parties", type=int, default=32, help="number of parties (default 32)")
    ap.add_argument("--lanes", type=int, default=4, help="the 'lanes' option (default 4)")
    ap.add_argument("--mib", type=float, default=1.0, help="object size in MiB (default 1)")
    ap.add_argument("--pattern", choices=["all", "star"], default="all", help="who exchanges with whom")
    ap.add_argument("--partitions", type=int, default=8, help="table partitions (default 8)")
    ap.add_argument("--records", type=int, default=64, help="records per table partition (default 64)")
    ap.add_argument("--record-bytes", type=int, default=1024, help="bytes per record value (default 1024)")
    ap.add_argument("--max-message-size", type=int, default=4 * MiB, help="bytes (default 4 MiB)")
    ap.add_argument("--secret", action="store_true", help="seal every message (AES-256-GCM)")
    ap.add_argument(
        "--idle-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long an idle lane consumer sleeps between looks (default: the backend's 0.5 s)",
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="per-get timeout in seconds")
    ap.add_argument("--json", type=Path, help="append the run to this JSON file ({'runs': [...]})")
    args = ap.parse_args(argv)
    if args.parties < 2:
        ap.error("--parties must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    print(summary(res))
    if args.json:
        doc: dict[str, Any] = {"runs": []}
        if args.json.exists():
            doc = json.loads(args.json.read_text())
        doc.setdefault("runs", []).append(res)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
