"""End-to-end throughput: raw broker client vs fedtransport, sender and receiver in separate processes.

    fedtransport bench --backend pulsar [--mib 256] [--repeat 2] [--json FILE] [--chart FILE.png]
    fedtransport bench --backend rabbitmq [--mode shared|federated]
    fedtransport bench --chart docs/benchmarks.png --from-json benchmarks/results/throughput-*.json

(``python benchmarks/throughput.py`` takes the same flags.) All workloads of one run use one
local broker (an embedded pulsar-lite, or throw-away RabbitMQ nodes), so the ratios compare
like with like on the same machine at the same time:

  raw-large    the raw client: 4 MiB byte messages, producer -> consumer (the ceiling)
  object       fedtransport remote -> get of a float64 array (--mib, default 256 MiB)
  table        a table of 8 partitions x 32 MiB (records of an int key and a 4 KiB array)
  raw-small    the raw client: 1000 messages of 1 KiB, each sent and confirmed before the next
  small        1000 objects of 1 KiB, each remote() returning before the next, then 1000 gets
  small-async  the same 1000 objects with remote_async, all in flight together

Timing starts when the sender begins (both sides connected and subscribed) and ends when
the receiver holds the last byte. Each workload runs --repeat times; the best run is kept.

Extending (e.g. a Spark workload from benchmarks/throughput.py or another module):

  * ``register_workload(name, factory, baseline=..., default=...)``: ``factory(ctx)`` gets a
    :class:`BenchContext` (the parsed args, the backend, the started broker(s) and two helpers,
    ``ctx.raw(count, size, sync)`` and ``ctx.fed(kind, **cfg)``) and returns the function that
    runs one repetition and returns ``{"seconds", "bytes", "MB_per_s"}``, or ``None`` when the
    workload does not apply to this backend. ``default=False`` workloads run only when named
    with ``--only`` or when a flag of the same name is set (``--spark`` for ``spark``).
  * ``register_fed_kind(kind, prepare, send, receive)``: a new sender/receiver pair for
    ``ctx.fed``; it must be registered at import time of a module both processes import (the
    children are spawned, so a script's top level runs again in them).
  * ``register_arguments(fn)``: ``fn(parser)`` adds flags (``--spark``) before parsing.

Needs the ``bench`` extra (numpy; matplotlib for ``--chart``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "BenchContext",
    "add_arguments",
    "build_parser",
    "execute",
    "main",
    "register_arguments",
    "register_fed_kind",
    "register_workload",
    "render_chart",
    "run",
]

MiB = 1 << 20
RAW_MESSAGE = 4 * MiB
SMALL = 1024
SMALL_COUNT = 1000

Result = dict[str, float]
Go = Callable[[int], Result]


# --- registries ---------------------------------------------------------------------------------


@dataclass
class BenchContext:
    """What a workload factory gets: the run's arguments, backend and broker helpers."""

    args: argparse.Namespace
    backend: str
    stack: ExitStack
    #: ``raw(count, size, sync)`` -> a raw-client workload on this backend's broker
    raw: Callable[[int, int, bool], Go]
    #: ``fed(kind, **cfg)`` -> a fedtransport sender/receiver workload of a registered kind
    fed: Callable[..., Go]
    #: backend specifics: ``service_url`` (pulsar) or ``nodes`` / ``routes`` / ``options`` (rabbitmq)
    broker: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Workload:
    factory: Callable[[BenchContext], Go | None]
    baseline: str | None
    default: bool


@dataclass(frozen=True)
class _FedKind:
    prepare: Callable[[dict[str, Any]], Any]  # builds the value before the clock starts
    send: Callable[[Any, Any, dict[str, Any], Any], None]  # (fed, value, cfg, dst)
    receive: Callable[[Any, dict[str, Any], Any], int]  # (fed, cfg, src) -> bytes received


WORKLOADS: dict[str, _Workload] = {}
FED_KINDS: dict[str, _FedKind] = {}
_ARGUMENT_HOOKS: list[Callable[[argparse.ArgumentParser], None]] = []


def register_workload(
    name: str, factory: Callable[[BenchContext], Go | None], *, baseline: str | None = None, default: bool = True
) -> None:
    """Add (or replace) workload ``name``; ``baseline`` names the raw workload its ratio is to."""
    WORKLOADS[name] = _Workload(factory, baseline, default)


def register_fed_kind(
    kind: str,
    prepare: Callable[[dict[str, Any]], Any],
    send: Callable[[Any, Any, dict[str, Any], Any], None],
    receive: Callable[[Any, dict[str, Any], Any], int],
) -> None:
    """Add a fedtransport sender/receiver pair usable as ``ctx.fed(kind, ...)``."""
    FED_KINDS[kind] = _FedKind(prepare, send, receive)


def register_arguments(hook: Callable[[argparse.ArgumentParser], None]) -> None:
    """``hook(parser)`` adds command-line flags for an extra workload."""
    if hook not in _ARGUMENT_HOOKS:
        _ARGUMENT_HOOKS.append(hook)


# --- the fedtransport workloads: both sides, run in child processes -----------------------------


def _party(name: str) -> Any:
    import fedtransport as ft

    return ft.Party("guest", "9999") if name == "guest" else ft.Party("host", "10000")


def _connect(cfg: dict[str, Any], who: str) -> Any:
    import fedtransport as ft

    return ft.Federation.connect(
        cfg["backend"], job_id=cfg["job_id"], party=_party(who), route_table=cfg.get("routes"),
        options=cfg["options"][who],
    )  # fmt: skip


def _handshake(fed: Any, me: str) -> None:
    """Both sides connected and subscribed to each other before the clock starts."""
    peer = _party("host" if me == "guest" else "guest")
    fed.remote("hello", "sync", me, [peer])
    fed.get("sync", "host" if me == "guest" else "guest", [peer], timeout=120)


def _kind(cfg: dict[str, Any]) -> _FedKind:
    for module in cfg.get("imports", ()):  # extensions register their kinds when imported
        __import__(module)
    try:
        return FED_KINDS[cfg["workload"]]
    except KeyError:
        raise ConfigError(f"benchmark kind {cfg['workload']!r} is not registered; known: {sorted(FED_KINDS)}") from None


def fed_sender(cfg: dict[str, Any], q: Any) -> None:
    kind = _kind(cfg)
    host = _party("host")
    with _connect(cfg, "guest") as fed:
        value = kind.prepare(cfg)
        _handshake(fed, "guest")
        start = time.time()
        kind.send(fed, value, cfg, host)
        q.put(("start", start))
        fed.get("sync", "done", [host], timeout=600)  # keep our session until the receiver is done


def fed_receiver(cfg: dict[str, Any], q: Any) -> None:
    kind = _kind(cfg)
    guest = _party("guest")
    with _connect(cfg, "host") as fed:
        _handshake(fed, "host")
        nbytes = kind.receive(fed, cfg, guest)
        end = time.time()
        fed.remote("bye", "sync", "done", [guest])
        q.put(("end", end, nbytes))
        if cfg.get("cleanup"):
            fed.cleanup()


def _prepare_object(cfg: dict[str, Any]) -> Any:
    import numpy as np

    return np.random.default_rng(0).random(cfg["mib"] * MiB // 8)


def _prepare_table(cfg: dict[str, Any]) -> Any:
    import numpy as np

    import fedtransport as ft

    n, per = cfg["partitions"], cfg["partition_mib"] * MiB // 4096
    # Distinct arrays (rows of one block): a shared row would be pickled once per batch, not once per record.
    block = np.random.default_rng(1).random((per, 512))
    return ft.Table.from_partitions([((i, block[i]) for i in range(per)) for _ in range(n)])


def _send_one(fed: Any, value: Any, cfg: dict[str, Any], dst: Any) -> None:
    from fedtransport.progress import ProgressBar

    fed.remote(value, "data", "0", [dst], progress=ProgressBar(f"  {cfg['workload']}: sent"))


def _receive_one(fed: Any, cfg: dict[str, Any], src: Any) -> int:
    import fedtransport as ft
    from fedtransport.progress import ProgressBar

    [value] = fed.get("data", "0", [src], timeout=600, progress=ProgressBar(f"  {cfg['workload']}: received"))
    if isinstance(value, ft.Table):
        return sum(v.nbytes + 8 for p in value.partitions for _, v in p)
    return int(value.nbytes)


def _prepare_small(cfg: dict[str, Any]) -> bytes:
    return os.urandom(SMALL)


def _send_small(fed: Any, payload: bytes, cfg: dict[str, Any], dst: Any) -> None:
    for i in range(SMALL_COUNT):
        fed.remote(payload, "small", str(i), [dst])


def _send_small_async(fed: Any, payload: bytes, cfg: dict[str, Any], dst: Any) -> None:
    import asyncio

    async def all_at_once() -> None:
        await asyncio.gather(*(fed.remote_async(payload, "small", str(i), [dst]) for i in range(SMALL_COUNT)))

    asyncio.run(all_at_once())


def _receive_small(fed: Any, cfg: dict[str, Any], src: Any) -> int:
    for i in range(SMALL_COUNT):
        fed.get("small", str(i), [src], timeout=600)
    return SMALL * SMALL_COUNT


register_fed_kind("object", _prepare_object, _send_one, _receive_one)
register_fed_kind("table", _prepare_table, _send_one, _receive_one)
register_fed_kind("small", _prepare_small, _send_small, _receive_small)
register_fed_kind("small-async", _prepare_small, _send_small_async, _receive_small)


# --- the raw clients, run in child processes ----------------------------------------------------


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


# --- the harness --------------------------------------------------------------------------------


def run_pair(sender: Callable[..., None], receiver: Callable[..., None], cfg: dict[str, Any],
             wait_ready: bool) -> Result:  # fmt: skip
    """Run one repetition: receiver and sender in spawned processes; the clock is theirs."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    recv = ctx.Process(target=receiver, args=(cfg, q))
    recv.start()
    send = None
    try:
        if wait_ready:
            assert q.get(timeout=120)[0] == "ready"
        send = ctx.Process(target=sender, args=(cfg, q))
        send.start()
        got: dict[str, Any] = {}
        while len(got) < 2:
            item = q.get(timeout=900)
            got[item[0]] = item[1:]
    finally:
        for proc in (send, recv):  # every child ends with the repetition, also on failure
            if proc is not None:
                proc.join(120)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    seconds = got["end"][0] - got["start"][0]
    nbytes = got["end"][1]
    return {"seconds": round(seconds, 3), "bytes": nbytes, "MB_per_s": round(nbytes / 1e6 / seconds, 1)}


def _pulsar_context(args: argparse.Namespace, stack: ExitStack) -> BenchContext:
    from .brokers import EmbeddedPulsar

    broker = stack.enter_context(EmbeddedPulsar())
    url = broker.service_url

    def raw(count: int, size: int, sync: bool) -> Go:
        def go(i: int) -> Result:
            cfg = {"service_url": url, "topic": f"persistent://bench/raw/t{time.time_ns()}", "count": count,
                   "size": size, "sync": sync}  # fmt: skip
            return run_pair(raw_pulsar_sender, raw_pulsar_receiver, cfg, wait_ready=True)

        return go

    def fed(kind: str, **extra: Any) -> Go:
        def go(i: int) -> Result:
            opts = {"service_url": url}
            cfg = {"backend": "pulsar", "job_id": f"bench-{kind}-{time.time_ns()}", "workload": kind,
                   "mib": args.mib, "options": {"guest": opts, "host": opts}, **extra}  # fmt: skip
            return run_pair(fed_sender, fed_receiver, cfg, wait_ready=False)

        return go

    return BenchContext(args, "pulsar", stack, raw, fed, {"service_url": url})


def _rabbit_context(args: argparse.Namespace, stack: ExitStack) -> BenchContext:
    from .brokers import RabbitNode

    a = stack.enter_context(RabbitNode(name="bench-a"))
    b = stack.enter_context(RabbitNode(name="bench-b")) if args.mode == "federated" else a

    def opts(node: Any, peer_id: str, peer: Any) -> dict[str, Any]:
        o = {"host": "127.0.0.1", "port": node.port, "mng_port": node.mng_port, "user": node.user,
             "password": node.password, "mode": args.mode}  # fmt: skip
        if peer is not node:  # federated: the upstream logs in to the peer's node (no secret: no sealing cost)
            o["peer_credentials"] = {peer_id: {"user": peer.user, "password": peer.password}}
        return o

    options = {"guest": opts(a, "10000", b), "host": opts(b, "9999", a)}

    routes = {"9999": {"host": "127.0.0.1", "port": a.port, "mng_port": a.mng_port},
              "10000": {"host": "127.0.0.1", "port": b.port, "mng_port": b.mng_port}}  # fmt: skip

    def raw(count: int, size: int, sync: bool) -> Go:
        def go(i: int) -> Result:
            cfg = {"url": a.uri("/"), "queue": f"bench-raw-{time.time_ns()}", "count": count, "size": size}
            return run_pair(raw_rabbit_sender, raw_rabbit_receiver, cfg, wait_ready=True)

        return go

    def fed(kind: str, **extra: Any) -> Go:
        def go(i: int) -> Result:
            cfg = {"backend": "rabbitmq", "job_id": f"bench-{kind}-{time.time_ns()}", "workload": kind,
                   "mib": args.mib, "options": options, "routes": routes,
                   "cleanup": True, **extra}  # fmt: skip
            return run_pair(fed_sender, fed_receiver, cfg, wait_ready=False)

        return go

    broker = {"nodes": (a, b), "routes": routes, "options": options}
    return BenchContext(args, "rabbitmq", stack, raw, fed, broker)


_CONTEXTS: dict[str, Callable[[argparse.Namespace, ExitStack], BenchContext]] = {
    "pulsar": _pulsar_context,
    "rabbitmq": _rabbit_context,
}

# The built-in workloads, in the order they run.
register_workload("raw-large", lambda c: c.raw(c.args.mib * MiB // RAW_MESSAGE, RAW_MESSAGE, False))
register_workload("object", lambda c: c.fed("object"), baseline="raw-large")
register_workload("table", lambda c: c.fed("table", partitions=8, partition_mib=32), baseline="raw-large")
register_workload("raw-small", lambda c: c.raw(SMALL_COUNT, SMALL, True))
register_workload("small", lambda c: c.fed("small"), baseline="raw-small")
register_workload("small-async", lambda c: c.fed("small-async"), baseline="raw-small")


def _suite(ctx: BenchContext) -> dict[str, tuple[Go, str | None]]:
    """The workloads to run now: defaults, --only names, --partitions scaling runs."""
    only = set(ctx.args.only or ())
    unknown = only - set(WORKLOADS) - {f"table-{n}" for n in ctx.args.partitions}
    if unknown:
        raise ConfigError(f"unknown workload(s) {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
    suite: dict[str, tuple[Go, str | None]] = {}
    for name, w in WORKLOADS.items():
        wanted = name in only if only else (w.default or getattr(ctx.args, name.replace("-", "_"), False))
        if not wanted:
            continue
        go = w.factory(ctx)
        if go is not None:
            suite[name] = (go, w.baseline)
    for n in ctx.args.partitions:
        name = f"table-{n}"
        if not only or name in only:
            suite[name] = (ctx.fed("table", partitions=n, partition_mib=max(1, ctx.args.table_mib // n)), "raw-large")
    return suite


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's flags (shared by ``fedtransport bench`` and benchmarks/throughput.py)."""
    ap.add_argument("--backend", choices=sorted(_CONTEXTS), default="pulsar")
    ap.add_argument("--mode", choices=["shared", "federated"], default="shared", help="RabbitMQ mode")
    ap.add_argument("--mib", type=int, default=256, help="size of the large object and raw transfer (MiB)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="run only these workloads")
    ap.add_argument("--partitions", type=int, nargs="*", default=[],
                    help="extra table workloads of N partitions sharing --table-mib (scaling)")  # fmt: skip
    ap.add_argument("--table-mib", type=int, default=256)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--chart", type=Path, help="draw a PNG chart of the results (needs matplotlib)")
    ap.add_argument("--from-json", type=Path, nargs="+", metavar="FILE",
                    help="run nothing: chart these result files (with --chart)")  # fmt: skip
    for hook in _ARGUMENT_HOOKS:
        hook(ap)
    return ap


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(ap)


def run(args: argparse.Namespace, out: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run the suite for ``args.backend``; print one line per workload; return the results."""
    results: dict[str, Any] = {"backend": args.backend, "mode": args.mode, "cpu_count": os.cpu_count(),
                               "date": time.strftime("%Y-%m-%d"), "workloads": {}}  # fmt: skip
    baselines: dict[str, str] = {}
    with ExitStack() as stack:
        ctx = _CONTEXTS[args.backend](args, stack)
        for name, (go, baseline) in _suite(ctx).items():
            runs = [go(i) for i in range(args.repeat)]
            best = max(runs, key=lambda r: r["MB_per_s"])
            results["workloads"][name] = {"best": best, "runs": runs}
            if baseline:
                baselines[name] = baseline
            extra = ""
            if name.startswith("small") or name == "raw-small":
                extra = f"  {SMALL_COUNT / best['seconds']:8.0f} objects/s"
            out(f"{args.backend:8s} {name:12s} {best['MB_per_s']:8.1f} MB/s  {best['seconds']:7.2f} s{extra}")
    w = results["workloads"]
    ratios = {}
    for name, base in baselines.items():
        if name in w and base in w:
            ratios[name] = round(w[name]["best"]["MB_per_s"] / w[base]["best"]["MB_per_s"], 2)
            out(f"ratio {name} / {base}: {ratios[name]:.2f}")
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
        results = [run(args, out)]
        if args.json:
            args.json.write_text(json.dumps(results[0], indent=2))
            out(f"results written to {args.json}")
    if args.chart:
        render_chart(results, args.chart)
        out(f"chart written to {args.chart}")
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``python benchmarks/throughput.py``: the same flags as ``fedtransport bench``."""
    args = build_parser(prog).parse_args(argv)
    try:
        return execute(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


# --- the chart ----------------------------------------------------------------------------------

# Default baselines for result files written before they recorded their own.
_DEFAULT_BASELINES = {"object": "raw-large", "table": "raw-large", "small": "raw-small", "small-async": "raw-small"}
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


def _label(result: Mapping[str, Any]) -> str:
    mode = result.get("mode")
    return f"{result['backend']} ({mode})" if result["backend"] == "rabbitmq" and mode else str(result["backend"])


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
        if base == "raw-small":
            panels.append(("1 KiB objects, one confirm each", "objects/s", names))
        else:
            panels.append(("large transfers", "MB/s", names))
    return panels


def _value(best: Mapping[str, float], unit: str) -> float:
    return best["bytes"] / SMALL / best["seconds"] if unit == "objects/s" else float(best["MB_per_s"])


def render_chart(results: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Grouped bars, one group per backend: the raw client (grey) next to fedtransport's workloads,
    each fedtransport bar labelled with its ratio to the raw client. One panel per raw baseline."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("the chart needs matplotlib: pip install 'fedtransport[bench]'") from exc
    results = list(results)
    if not results:
        raise ConfigError("no benchmark results to chart")
    panels = _panels(results)
    if not panels:
        raise ConfigError("the results hold no workload with its raw baseline: nothing to compare")
    # each panel as wide as the bars it holds, so bars and their labels keep one size throughout
    sizes = [len(results) * len(names) + len(results) for _, _, names in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 0.42 * sum(sizes) + 1.2 * len(panels), 5.6),
                             squeeze=False, gridspec_kw={"width_ratios": sizes})  # fmt: skip
    for ax, (title, unit, names) in zip(axes[0], panels, strict=True):
        width = 0.8 / len(names)
        groups = [_label(r) for r in results]
        for j, name in enumerate(names):
            xs, heights, notes = [], [], []
            for i, r in enumerate(results):
                w = r["workloads"]
                if name not in w:
                    continue
                xs.append(i - 0.4 + width * (j + 0.5))
                heights.append(_value(w[name]["best"], unit))
                base = names[0]
                ratio = _value(w[name]["best"], unit) / _value(w[base]["best"], unit) if base in w else None
                notes.append("raw" if j == 0 else (f"{ratio:.2f}×" if ratio is not None else ""))
            colour = _RAW_COLOUR if j == 0 else _COLOURS[(j - 1) % len(_COLOURS)]
            label = f"{name} (raw client)" if j == 0 else f"{name} (fedtransport)"
            bars = ax.bar(xs, heights, width * 0.92, color=colour, label=label)
            for bar, note in zip(bars, notes, strict=True):
                ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=8, rotation=90, xytext=(0, 3), textcoords="offset points")  # fmt: skip
        ax.set_xticks(range(len(groups)), [g.replace(" (", "\n(") for g in groups])
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    dates = sorted({str(r.get("date", "")) for r in results} - {""})
    cpus = sorted({str(r.get("cpu_count", "?")) for r in results})
    fig.suptitle(f"fedtransport vs the raw broker client (best run; {', '.join(cpus)} cores"
                 + (f"; {', '.join(dates)}" if dates else "") + ")", fontsize=11)  # fmt: skip
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")  # the legends below the axes stay in the picture
    plt.close(fig)
    return out
