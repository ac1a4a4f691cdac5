"""End-to-end throughput: raw broker client vs fedtransport, sender and receiver in separate processes.

    python benchmarks/throughput.py --backend pulsar [--mib 256] [--repeat 2] [--json FILE]
    python benchmarks/throughput.py --backend rabbitmq [--mode shared|federated]

All workloads of one run use one local broker (an embedded pulsar-lite, or throw-away
RabbitMQ nodes), so the ratios compare like with like on the same machine at the same time:

  raw-large    the raw client: 4 MiB byte messages, producer -> consumer (the ceiling)
  object       fedtransport remote -> get of a float64 array (--mib, default 256 MiB)
  table        a table of 8 partitions x 32 MiB (records of an int key and a 4 KiB array)
  raw-small    the raw client: 1000 messages of 1 KiB, each sent and confirmed before the next
  small        1000 objects of 1 KiB, each remote() returning before the next, then 1000 gets
  small-async  the same 1000 objects with remote_async, all in flight together

Timing starts when the sender begins (both sides connected and subscribed) and ends when
the receiver holds the last byte. Each workload runs --repeat times; the best run is kept.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
RAW_MESSAGE = 4 * MiB
SMALL = 1024
SMALL_COUNT = 1000


# --- the two sides of each workload, run in child processes -----------------------------------


def _party(name: str) -> Any:
    import fedtransport as ft

    return ft.Party("guest", "9999") if name == "guest" else ft.Party("host", "10000")


def _connect(cfg: dict[str, Any], who: str) -> Any:
    import fedtransport as ft

    return ft.Federation.connect(cfg["backend"], job_id=cfg["job_id"], party=_party(who),
                                 route_table=cfg.get("routes"), options=cfg["options"][who])  # fmt: skip


def _handshake(fed: Any, me: str) -> None:
    """Both sides connected and subscribed to each other before the clock starts."""
    peer = _party("host" if me == "guest" else "guest")
    fed.remote("hello", "sync", me, [peer])
    fed.get("sync", "host" if me == "guest" else "guest", [peer], timeout=120)


def fed_sender(cfg: dict[str, Any], q: Any) -> None:
    import numpy as np

    import fedtransport as ft

    host = _party("host")
    with _connect(cfg, "guest") as fed:
        work = cfg["workload"]
        if work == "object":
            value = np.random.default_rng(0).random(cfg["mib"] * MiB // 8)
        elif work == "table":
            n, per = cfg["partitions"], cfg["partition_mib"] * MiB // 4096
            row = np.random.default_rng(1).random(512)
            value = ft.Table.from_partitions([((i, row) for i in range(per)) for _ in range(n)])
        _handshake(fed, "guest")
        start = time.time()
        if work in ("object", "table"):
            fed.remote(value, "data", "0", [host])
        elif work == "small":
            payload = os.urandom(SMALL)
            for i in range(SMALL_COUNT):
                fed.remote(payload, "small", str(i), [host])
        elif work == "small-async":
            import asyncio

            async def all_at_once() -> None:
                payload = os.urandom(SMALL)
                await asyncio.gather(*(fed.remote_async(payload, "small", str(i), [host]) for i in range(SMALL_COUNT)))

            asyncio.run(all_at_once())
        q.put(("start", start))
        fed.get("sync", "done", [host], timeout=600)  # keep our session until the receiver is done


def fed_receiver(cfg: dict[str, Any], q: Any) -> None:
    import fedtransport as ft

    guest = _party("guest")
    with _connect(cfg, "host") as fed:
        _handshake(fed, "host")
        work = cfg["workload"]
        nbytes = 0
        if work in ("object", "table"):
            [value] = fed.get("data", "0", [guest], timeout=600)
            if isinstance(value, ft.Table):
                nbytes = sum(v.nbytes + 8 for p in value.partitions for _, v in p)
            else:
                nbytes = value.nbytes
        else:
            for i in range(SMALL_COUNT):
                fed.get("small", str(i), [guest], timeout=600)
            nbytes = SMALL * SMALL_COUNT
        end = time.time()
        fed.remote("bye", "sync", "done", [guest])
        q.put(("end", end, nbytes))
        if cfg.get("cleanup"):
            fed.cleanup()


def raw_pulsar_sender(cfg: dict[str, Any], q: Any) -> None:
    import threading

    import pulsar

    client = pulsar.Client(cfg["service_url"], logger=_quiet_logger())
    producer = client.create_producer(cfg["topic"], batching_enabled=False, block_if_queue_full=True,
                                      max_pending_messages=16)  # fmt: skip
    count, size = cfg["count"], cfg["size"]
    payload = os.urandom(size)
    done = threading.Semaphore(0)
    start = time.time()
    if cfg["sync"]:
        for _ in range(count):
            producer.send(payload)
    else:
        for _ in range(count):
            producer.send_async(payload, lambda res, _id: done.release())
        for _ in range(count):
            done.acquire()
    q.put(("start", start))
    client.close()


def raw_pulsar_receiver(cfg: dict[str, Any], q: Any) -> None:
    import pulsar

    client = pulsar.Client(cfg["service_url"], logger=_quiet_logger())
    consumer = client.subscribe(cfg["topic"], "bench", consumer_type=pulsar.ConsumerType.Shared,
                                receiver_queue_size=1, initial_position=pulsar.InitialPosition.Earliest)  # fmt: skip
    q.put(("ready",))
    nbytes = 0
    for _ in range(cfg["count"]):
        msg = consumer.receive(timeout_millis=600_000)
        nbytes += len(msg.data())
        consumer.acknowledge(msg)
    q.put(("end", time.time(), nbytes))
    client.close()


def raw_rabbit_sender(cfg: dict[str, Any], q: Any) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(cfg["url"]))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(cfg["queue"], durable=True)
    payload = os.urandom(cfg["size"])
    props = pika.BasicProperties(delivery_mode=2)
    start = time.time()
    for _ in range(cfg["count"]):  # pika's blocking channel waits for each confirm
        ch.basic_publish("", cfg["queue"], payload, props)
    q.put(("start", start))
    conn.close()


def raw_rabbit_receiver(cfg: dict[str, Any], q: Any) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(cfg["url"]))
    ch = conn.channel()
    ch.queue_declare(cfg["queue"], durable=True)
    ch.basic_qos(prefetch_count=cfg.get("prefetch", 16))
    q.put(("ready",))
    nbytes = 0
    for i, (method, _props, body) in enumerate(ch.consume(cfg["queue"])):
        nbytes += len(body)
        ch.basic_ack(method.delivery_tag)
        if i + 1 == cfg["count"]:
            break
    q.put(("end", time.time(), nbytes))
    ch.cancel()
    conn.close()


def _quiet_logger() -> Any:
    import logging

    log = logging.getLogger("bench.pulsar")
    log.setLevel(logging.ERROR)
    return log


# --- the harness ------------------------------------------------------------------------------


def run_pair(sender: Callable[..., None], receiver: Callable[..., None], cfg: dict[str, Any],
             wait_ready: bool) -> dict[str, float]:  # fmt: skip
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    recv = ctx.Process(target=receiver, args=(cfg, q))
    recv.start()
    if wait_ready:
        assert q.get(timeout=120)[0] == "ready"
    send = ctx.Process(target=sender, args=(cfg, q))
    send.start()
    got: dict[str, Any] = {}
    while len(got) < 2:
        item = q.get(timeout=900)
        got[item[0]] = item[1:]
    send.join(120)
    recv.join(120)
    seconds = got["end"][0] - got["start"][0]
    nbytes = got["end"][1]
    return {"seconds": round(seconds, 3), "bytes": nbytes, "MB_per_s": round(nbytes / 1e6 / seconds, 1)}


def pulsar_suite(args: argparse.Namespace, stack: ExitStack) -> dict[str, Callable[[int], dict[str, float]]]:
    from fedtransport.brokers import EmbeddedPulsar

    broker = stack.enter_context(EmbeddedPulsar())
    url = broker.service_url

    def raw(count: int, size: int, sync: bool) -> Callable[[int], dict[str, float]]:
        def go(i: int) -> dict[str, float]:
            cfg = {"service_url": url, "topic": f"persistent://bench/raw/t{time.time_ns()}", "count": count,
                   "size": size, "sync": sync}  # fmt: skip
            return run_pair(raw_pulsar_sender, raw_pulsar_receiver, cfg, wait_ready=True)

        return go

    def fed(workload: str, **extra: Any) -> Callable[[int], dict[str, float]]:
        def go(i: int) -> dict[str, float]:
            opts = {"service_url": url}
            cfg = {"backend": "pulsar", "job_id": f"bench-{workload}-{time.time_ns()}", "workload": workload,
                   "mib": args.mib, "options": {"guest": opts, "host": opts}, **extra}  # fmt: skip
            return run_pair(fed_sender, fed_receiver, cfg, wait_ready=False)

        return go

    return _workloads(args, raw, fed)


def rabbit_suite(args: argparse.Namespace, stack: ExitStack) -> dict[str, Callable[[int], dict[str, float]]]:
    from fedtransport.brokers import RabbitNode

    a = stack.enter_context(RabbitNode(name="bench-a"))
    b = stack.enter_context(RabbitNode(name="bench-b")) if args.mode == "federated" else a

    def opts(node: Any) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": node.port, "mng_port": node.mng_port, "user": node.user,
                "password": node.password, "mode": args.mode}  # fmt: skip

    routes = {"9999": {"host": "127.0.0.1", "port": a.port, "mng_port": a.mng_port},
              "10000": {"host": "127.0.0.1", "port": b.port, "mng_port": b.mng_port}}  # fmt: skip

    def raw(count: int, size: int, sync: bool) -> Callable[[int], dict[str, float]]:
        def go(i: int) -> dict[str, float]:
            cfg = {"url": a.uri("/"), "queue": f"bench-raw-{time.time_ns()}", "count": count, "size": size}
            return run_pair(raw_rabbit_sender, raw_rabbit_receiver, cfg, wait_ready=True)

        return go

    def fed(workload: str, **extra: Any) -> Callable[[int], dict[str, float]]:
        def go(i: int) -> dict[str, float]:
            cfg = {"backend": "rabbitmq", "job_id": f"bench-{workload}-{time.time_ns()}", "workload": workload,
                   "mib": args.mib, "options": {"guest": opts(a), "host": opts(b)}, "routes": routes,
                   "cleanup": True, **extra}  # fmt: skip
            return run_pair(fed_sender, fed_receiver, cfg, wait_ready=False)

        return go

    return _workloads(args, raw, fed)


def _workloads(args: argparse.Namespace, raw: Any, fed: Any) -> dict[str, Callable[[int], dict[str, float]]]:
    suite = {
        "raw-large": raw(args.mib * MiB // RAW_MESSAGE, RAW_MESSAGE, False),
        "object": fed("object"),
        "table": fed("table", partitions=8, partition_mib=32),
        "raw-small": raw(SMALL_COUNT, SMALL, True),
        "small": fed("small"),
        "small-async": fed("small-async"),
    }
    for n in args.partitions:
        suite[f"table-{n}"] = fed("table", partitions=n, partition_mib=max(1, args.table_mib // n))
    return suite


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["pulsar", "rabbitmq"], default="pulsar")
    ap.add_argument("--mode", choices=["shared", "federated"], default="shared", help="RabbitMQ mode")
    ap.add_argument("--mib", type=int, default=256, help="size of the large object and raw transfer (MiB)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="run only these workloads")
    ap.add_argument("--partitions", type=int, nargs="*", default=[],
                    help="extra table workloads of N partitions sharing --table-mib (scaling)")  # fmt: skip
    ap.add_argument("--table-mib", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    results: dict[str, Any] = {"backend": args.backend, "mode": args.mode, "cpu_count": os.cpu_count(),
                               "date": time.strftime("%Y-%m-%d"), "workloads": {}}  # fmt: skip
    with ExitStack() as stack:
        suite = (pulsar_suite if args.backend == "pulsar" else rabbit_suite)(args, stack)
        for name, go in suite.items():
            if args.only and name not in args.only:
                continue
            runs = [go(i) for i in range(args.repeat)]
            best = max(runs, key=lambda r: r["MB_per_s"])
            results["workloads"][name] = {"best": best, "runs": runs}
            extra = ""
            if name.startswith("small") or name == "raw-small":
                extra = f"  {SMALL_COUNT / best['seconds']:8.0f} objects/s"
            print(f"{args.backend:8s} {name:12s} {best['MB_per_s']:8.1f} MB/s  {best['seconds']:7.2f} s{extra}",
                  flush=True)  # fmt: skip
    w = results["workloads"]
    ratios = {}
    for name, base in (("object", "raw-large"), ("table", "raw-large"), ("small", "raw-small"),
                       ("small-async", "raw-small")):  # fmt: skip
        if name in w and base in w:
            ratios[name] = round(w[name]["best"]["MB_per_s"] / w[base]["best"]["MB_per_s"], 2)
            print(f"ratio {name} / {base}: {ratios[name]:.2f}")
    results["ratios"] = ratios
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
