"""Codec + framing throughput and memory, each side in its own process.

    python benchmarks/codec.py [--mib 256] [--repeat 3] [--json results.json]

Sender: encode a float64 array (pickle 5, out of band) and frame it into messages
of at most 4 MiB with the default options (lz4 with back-off, 4 lanes), one
thread per lane as ``remote`` does. Receiver: parse and check each message on
its lane's thread, place it under the transfer's lock as the inbox does, then
decode the array. The messages pass between the processes through a file; the
sender's writes are not timed; the receiver reads into reused buffers, timed.
Peak RSS is read from getrusage in each process and reported absolute and as a
multiple of the array size.

Each variant runs --repeat times; reported are the median and the worst run of every
figure (lowest MB/s, highest peak RSS), never the best alone. Every run is kept in the
JSON under ``all``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import resource
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_REC = struct.Struct("<II")  # lane, message length


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sender(mib: int, path: str, secret: bytes | None, out: mp.Queue) -> None:
    import numpy as np

    from fedtransport.codec import Compressor, PayloadCodec, Sealer
    from fedtransport.framing import HEADER_SIZE, FrameWriter, job_fingerprint, transfer_id
    from fedtransport.options import COMMON_DEFAULTS
    from fedtransport.transfer import Outgoing

    array = np.random.default_rng(0).random(mib * (1 << 20) // 8)
    aead = Sealer(secret, "bench").for_pair("guest:9999", "host:10000") if secret else None
    transform = PayloadCodec(Compressor(True), aead)
    writer = FrameWriter(job_fingerprint("bench"), transfer_id("bench", "a", "0", "g", "h"), 1, transform)
    chunk = COMMON_DEFAULTS["max_message_size"] - HEADER_SIZE - transform.overhead
    lock = threading.Lock()
    counts = [0, 0]
    write_time = [0.0]

    with open(path, "wb", buffering=0) as f:

        def lane_worker(lane: int, messages: Iterator[bytes]) -> None:
            for msg in messages:
                with lock:
                    t0 = time.perf_counter()
                    f.write(_REC.pack(lane, len(msg)))
                    f.write(msg)
                    write_time[0] += time.perf_counter() - t0
                    counts[0] += len(msg)
                    counts[1] += 1

        t0 = time.perf_counter()
        lanes = Outgoing(array, fanout=1).lane_messages(writer, 4, chunk)
        threads = [threading.Thread(target=lane_worker, args=item) for item in lanes.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        busy = time.perf_counter() - t0 - write_time[0]
    out.put({"seconds": busy, "bytes": counts[0], "messages": counts[1], "peak_rss_mib": _rss_mib()})


def _receiver(mib: int, path: str, secret: bytes | None, out: mp.Queue) -> None:
    import numpy as np

    from fedtransport.codec import Compressor, PayloadCodec, Sealer, UnpicklePolicy
    from fedtransport.framing import TransferAssembly, job_fingerprint, parse_frame, transfer_id
    from fedtransport.transfer import decode_object_transfer

    base = _rss_mib()
    job = job_fingerprint("bench")
    aead = Sealer(secret, "bench").for_pair("guest:9999", "host:10000") if secret else None
    asm = TransferAssembly(transfer_id("bench", "a", "0", "g", "h"), PayloadCodec(Compressor(True), aead))
    lock = threading.Lock()
    queues: dict[int, queue.Queue] = {}
    # Reusable read buffers: the harness's own reads should not cost page faults we then measure.
    free: queue.Queue = queue.Queue()
    for _ in range(4):  # one in flight per lane, like a receiver queue of 1
        free.put(bytearray(4 << 20))

    def lane_worker(q: queue.Queue) -> None:
        while (item := q.get()) is not None:
            buf, n = item
            header, payload = parse_frame(memoryview(buf)[:n], job)
            with lock:
                asm.add(header, payload)
            del payload
            free.put(buf)

    threads = []
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while head := f.read(_REC.size):
            lane, n = _REC.unpack(head)
            if lane not in queues:
                queues[lane] = queue.Queue()
                threads.append(threading.Thread(target=lane_worker, args=(queues[lane],)))
                threads[-1].start()
            buf = free.get()
            f.readinto(memoryview(buf)[:n])
            queues[lane].put((buf, n))
    for q in queues.values():
        q.put(None)
    for t in threads:
        t.join()
    array = decode_object_transfer(asm, UnpicklePolicy(), "bench")
    busy = time.perf_counter() - t0
    assert isinstance(array, np.ndarray) and array.nbytes == mib << 20
    assert array[0] == np.random.default_rng(0).random(1)[0]
    out.put({"seconds": busy, "peak_rss_mib": _rss_mib(), "baseline_rss_mib": base})


def run(mib: int, secret: bytes | None = None) -> dict:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "messages.bin")
        q: mp.Queue = ctx.Queue()
        results = {}
        for side, target in (("send", _sender), ("receive", _receiver)):
            p = ctx.Process(target=target, args=(mib, path, secret, q))
            p.start()
            results[side] = q.get(timeout=600)
            p.join()
    size = mib << 20
    for side in results.values():
        side["MB_per_s"] = round(size / 1e6 / side["seconds"], 1)
        side["peak_rss_over_array"] = round(side["peak_rss_mib"] / mib, 3)
    return {"array_mib": mib, "sealed": bool(secret), **results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="array size in MiB (default 256)")
    ap.add_argument("--repeat", type=int, default=3, help="runs; their median and worst are reported (default 3)")
    ap.add_argument("--sealed", action="store_true", help="also measure with a job secret (AES-256-GCM)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    report = {"cpu_count": os.cpu_count(), "runs": []}
    variants = [None, b"k" * 32] if args.sealed else [None]
    for secret in variants:
        runs = [run(args.mib, secret) for _ in range(args.repeat)]
        summary: dict = {"array_mib": args.mib, "sealed": bool(secret)}
        # (figure, side, key, which way is worse)
        figures = [("send_MB_per_s", "send", "MB_per_s", min), ("receive_MB_per_s", "receive", "MB_per_s", min),
                   ("send_peak_rss_mib", "send", "peak_rss_mib", max),
                   ("receive_peak_rss_mib", "receive", "peak_rss_mib", max),
                   ("receive_peak_rss_over_array", "receive", "peak_rss_over_array", max)]  # fmt: skip
        for figure, side, key, worse in figures:
            values = [r[side][key] for r in runs]
            summary[figure] = {"median": round(statistics.median(values), 3), "worst": worse(values)}
        summary["all"] = runs
        report["runs"].append(summary)
        med = {k: v["median"] for k, v in summary.items() if isinstance(v, dict)}
        bad = {k: v["worst"] for k, v in summary.items() if isinstance(v, dict)}
        print(
            f"{args.mib} MiB float64{' sealed' if secret else ''}, median (worst) of {len(runs)}: "
            f"encode+frame {med['send_MB_per_s']:.0f} ({bad['send_MB_per_s']:.0f}) MB/s, "
            f"peak RSS {med['send_peak_rss_mib']:.0f} ({bad['send_peak_rss_mib']:.0f}) MiB; "
            f"reassemble+decode {med['receive_MB_per_s']:.0f} ({bad['receive_MB_per_s']:.0f}) MB/s, "
            f"peak RSS {med['receive_peak_rss_mib']:.0f} ({bad['receive_peak_rss_mib']:.0f}) MiB = "
            f"{med['receive_peak_rss_over_array']:.2f}x ({bad['receive_peak_rss_over_array']:.2f}x) array"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
