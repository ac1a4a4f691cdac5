"""End-to-end throughput: raw broker client vs fedtransport, sender and receiver in separate processes.

    fedtransport bench --backend pulsar [--broker standalone|embedded] [--mib 256] [--repeat 3]
                       [--replication] [--json FILE] [--chart FILE.png]
    fedtransport bench --backend rabbitmq [--mode shared|federated]
    fedtransport bench --chart docs/benchmarks.png --from-json benchmarks/results/throughput-*.json

(``python benchmarks/throughput.py`` takes the same flags.) All workloads of one run use the
brokers started for it, so the ratios compare like with like on the same machine at the same
time. ``--broker`` picks the Pulsar broker: ``standalone`` (the default) is the real Apache
Pulsar broker in standalone mode (``fedtransport.brokers.PulsarStandalone``), ``embedded`` is
pulsar-lite (``EmbeddedPulsar``). RabbitMQ runs on throw-away local nodes.

  raw-large    the raw client: --mib MiB (default 256) in messages of at most 4 MiB,
               producer -> consumer (the ceiling)
  object       fedtransport remote -> get of a float64 array of --mib MiB
  table        a table of 8 partitions, --mib MiB in all (records of an int key and a 4 KiB array)
  table-N      the same table in N partitions (--partitions N ...)
  raw-small    the raw client: 1000 messages of 1 KiB, each sent and confirmed before the next
  small        1000 objects of 1 KiB, each remote() returning before the next, then 1000 gets
  small-async  the same 1000 objects with remote_async, all in flight together

With ``--replication`` (Pulsar only; two more standalone brokers, ~1 GiB of RAM), geo-replication
between two clusters, fl-pulsar-9999 (A) and fl-pulsar-10000 (B), registered with each other:

  raw-repl     the raw client: producer on A, every message with replication_clusters=[B],
               consumer on B; --mib MiB in messages of at most 4 MiB
  object-repl  the object workload in ``mode: replication``: guest connected to A, host to B
  table-repl   the table workload (8 partitions) in the same way

--mib sizes every large workload, so each one moves exactly the bytes of its raw baseline and
its ratio compares equal transfers. A workload's ``bytes`` is its payload as received: the
array's bytes for ``object``, the rows' array bytes for a table (its int keys are not counted,
as the raw client has nothing that matches them).

Timing starts when the sender begins (both sides connected and subscribed; in replication, the
broker's replicator to B exists) and ends when the receiver holds the last byte. Each workload
runs --repeat times, interleaved with its raw baseline repetition by repetition (raw-large 1,
object 1, table 1, raw-large 2, ...), so every fedtransport run has a raw run next to it in
time. Reported, never the best alone:

  * per workload: every run, the ``median`` (of the rates) and the ``worst`` run
    (lowest MB/s); ``best`` is kept in the JSON as well;
  * per ratio to the baseline: the ratio of the medians, and the ``worst`` of the
    per-repetition ratios fed_i / raw_i (all of them under ``per_repeat``).

The chart draws the median as the bar and the worst run as a whisker below it; each
fedtransport bar is labelled with its median ratio and its worst per-repetition ratio.
Result files written before this (only ``best`` and ``runs``) are charted from their runs.

Extending (e.g. a Spark workload from benchmarks/throughput.py or another module):

  * ``register_workload(name, factory, baseline=..., default=...)``: ``factory(ctx)`` gets a
    :class:`BenchContext` (the parsed args, the backend, the started broker(s) and two helpers,
    ``ctx.raw(count, size, sync)`` and ``ctx.fed(kind, **cfg)``) and returns the function that
    runs one repetition and returns ``{"seconds", "bytes", "MB_per_s"}``, or ``None`` when the
    workload does not apply to this backend. ``default=False`` workloads run only when named
    with ``--only`` or when a flag of the same name is set (``--spark`` for ``spark``), or the
    flag given as ``flag=`` (``--replication`` for the ``*-repl`` workloads).
  * ``register_fed_kind(kind, prepare, send, receive)``: a new sender/receiver pair for
    ``ctx.fed``; it must be registered at import time of a module both processes import (the
    children are spawned, so a script's top level runs again in them).
  * ``register_arguments(fn)``: ``fn(parser)`` adds flags (``--spark``) before parsing.

Needs the ``bench`` extra (numpy; matplotlib for ``--chart``); ``--broker standalone`` needs
Java 17 and Maven (see ``fedtransport.brokers.standalone``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import statistics
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
    "ChartBar",
    "ChartGroup",
    "ChartPanel",
    "add_arguments",
    "build_parser",
    "chart_layout",
    "execute",
    "main",
    "raw_messages",
    "register_arguments",
    "register_fed_kind",
    "register_workload",
    "render_chart",
    "result_labels",
    "run",
    "table_records",
]

MiB = 1 << 20
RAW_MESSAGE = 4 * MiB
TABLE_ROW = 4096  # bytes of the float64 array in each record of a table workload
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
    #: backend specifics: ``service_url``, ``admin_url``, ``kind`` (pulsar; ``replication`` with
    #: ``--replication``) or ``nodes`` / ``routes`` / ``options`` (rabbitmq)
    broker: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Workload:
    factory: Callable[[BenchContext], Go | None]
    baseline: str | None
    default: bool
    flag: str | None = None  # the argparse dest that turns a default=False workload on


@dataclass(frozen=True)
class _FedKind:
    prepare: Callable[[dict[str, Any]], Any]  # builds the value before the clock starts
    send: Callable[[Any, Any, dict[str, Any], Any], None]  # (fed, value, cfg, dst)
    receive: Callable[[Any, dict[str, Any], Any], int]  # (fed, cfg, src) -> bytes received


WORKLOADS: dict[str, _Workload] = {}
FED_KINDS: dict[str, _FedKind] = {}
_ARGUMENT_HOOKS: list[Callable[[argparse.ArgumentParser], None]] = []


def register_workload(
    name: str,
    factory: Callable[[BenchContext], Go | None],
    *,
    baseline: str | None = None,
    default: bool = True,
    flag: str | None = None,
) -> None:
    """Add (or replace) workload ``name``; ``baseline`` names the raw workload its ratio is to.

    A ``default=False`` workload runs when named in ``--only``, or when the flag whose argparse
    dest is ``flag`` (default: the name with ``-`` as ``_``) is set.
    """
    WORKLOADS[name] = _Workload(factory, baseline, default, flag)


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
        if cfg.get("cleanup_sender"):
            _bounded_cleanup(fed, cfg, "guest")


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
            _bounded_cleanup(fed, cfg, "host")


CLEANUP_TIMEOUT = 60.0  # seconds a party's cleanup may take before the benchmark moves on without it


def _bounded_cleanup(fed: Any, cfg: dict[str, Any], who: str) -> None:
    """``fed.cleanup()``, after the clock stopped; a failure or a hang is logged, never fatal.

    A forced topic delete on a replicating Pulsar standalone now and then never answers (see
    tests/test_pulsar_replication.py): the measurement is in by then, so it must not wait on that.
    """
    import threading

    failure: list[BaseException] = []

    def clean() -> None:
        try:
            fed.cleanup()
        except BaseException as exc:  # reported below; the run's result stands
            failure.append(exc)

    worker = threading.Thread(target=clean, name="bench-cleanup", daemon=True)
    worker.start()
    worker.join(float(cfg.get("cleanup_timeout", CLEANUP_TIMEOUT)))
    if worker.is_alive():
        print(f"bench: {who}'s cleanup of {cfg['job_id']} still running after "
              f"{cfg.get('cleanup_timeout', CLEANUP_TIMEOUT)} s; left behind", file=sys.stderr, flush=True)  # fmt: skip
    elif failure:
        print(f"bench: {who}'s cleanup of {cfg['job_id']} failed: {failure[0]!r}", file=sys.stderr, flush=True)


def _prepare_object(cfg: dict[str, Any]) -> Any:
    import numpy as np

    return np.random.default_rng(0).random(cfg["mib"] * MiB // 8)


def table_records(mib: int, partitions: int) -> list[int]:
    """Records per partition of a table workload of ``mib`` MiB in all (4 KiB arrays, spread evenly).

    The rows' array bytes add up to exactly ``mib`` MiB, the bytes of the raw baseline.
    """
    if mib < 1 or partitions < 1:
        raise ConfigError(f"a table workload needs at least 1 MiB and 1 partition, got {mib} MiB, {partitions}")
    per, extra = divmod(mib * MiB // TABLE_ROW, partitions)
    return [per + 1 if p < extra else per for p in range(partitions)]


def raw_messages(mib: int) -> tuple[int, int]:
    """(count, size) of the raw-large messages: ``mib`` MiB exactly, each message at most 4 MiB."""
    total = mib * MiB
    count = -(-total // RAW_MESSAGE)
    while total % count:  # ends at the latest with 1 MiB messages (count == mib)
        count += 1
    return count, total // count


def _prepare_table(cfg: dict[str, Any]) -> Any:
    import numpy as np

    import fedtransport as ft

    records = table_records(cfg["mib"], cfg["partitions"])
    # Distinct arrays (rows of one block): a shared row would be pickled once per batch, not once per record.
    block = np.random.default_rng(1).random((max(records), TABLE_ROW // 8))
    return ft.Table.from_partitions([((i, block[i]) for i in range(n)) for n in records])


def _send_one(fed: Any, value: Any, cfg: dict[str, Any], dst: Any) -> None:
    from fedtransport.progress import ProgressBar

    fed.remote(value, "data", "0", [dst], progress=ProgressBar(f"  {cfg['workload']}: sent"))


def _receive_one(fed: Any, cfg: dict[str, Any], src: Any) -> int:
    import fedtransport as ft
    from fedtransport.progress import ProgressBar

    [value] = fed.get("data", "0", [src], timeout=600, progress=ProgressBar(f"  {cfg['workload']}: received"))
    if isinstance(value, ft.Table):
        return sum(v.nbytes for p in value.partitions for _, v in p)  # the payload: keys are not counted
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

    client = pulsar.Client(cfg["service_url"], logger=client_logger())
    producer = client.create_producer(cfg["topic"], batching_enabled=False, block_if_queue_full=True,
                                      max_pending_messages=16)  # fmt: skip
    count, size = cfg["count"], cfg["size"]
    payload = os.urandom(size)
    done = threading.Semaphore(0)
    extra: dict[str, Any] = {}
    if cfg.get("replicate_to"):  # geo-replication: every message names its destination cluster
        extra["replication_clusters"] = [cfg["replicate_to"]]
        _await_replicator(cfg["admin_url"], cfg["topic"], cfg["replicate_to"])
    start = time.time()
    if cfg["sync"]:
        for _ in range(count):
            producer.send(payload, **extra)
    else:
        for _ in range(count):
            producer.send_async(payload, lambda res, _id: done.release(), **extra)
        for _ in range(count):
            done.acquire()
    q.put(("start", start))
    client.close()


def _await_replicator(admin_url: str, topic: str, cluster: str, timeout: float = 120.0) -> None:
    """Before the clock: the broker replicates ``topic`` to ``cluster`` (a replicator starts at the
    topic's end when it is created, so a message sent before would never leave)."""
    from .transport.pulsar.admin import PulsarAdmin

    admin = PulsarAdmin(admin_url)
    deadline = time.monotonic() + timeout
    delay = 0.05
    while cluster not in ((admin.get_topic_stats(topic) or {}).get("replication") or {}):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no replicator of {topic} to {cluster} after {timeout} s")
        time.sleep(delay)  # polling the broker's stats: nothing to wait on but time
        delay = min(delay * 2, 1.0)


def raw_pulsar_receiver(cfg: dict[str, Any], q: Any) -> None:
    import pulsar

    client = pulsar.Client(cfg.get("receive_url") or cfg["service_url"], logger=client_logger())
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


def client_logger() -> Any:
    """pulsar-client's logger as the Pulsar backend sets it up (no abort at interpreter exit)."""
    from .transport.pulsar.connection import client_logger

    return client_logger()


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
        deadline = time.monotonic() + 900
        while len(got) < 2:
            try:
                item = q.get(timeout=1.0)
            except queue.Empty:
                # A side that died before reporting would leave the other waiting for it until the deadline.
                for who, proc in (("sender", send), ("receiver", recv)):
                    if proc.exitcode not in (None, 0):
                        what = cfg.get("workload") or "the raw client"
                        raise RuntimeError(f"the {who} of {what} died (exit code {proc.exitcode}); "
                                           "its traceback is above") from None  # fmt: skip
                if time.monotonic() > deadline:
                    raise
                continue
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


PULSAR_BROKERS = {"standalone": "standalone", "embedded": "pulsar-lite"}  # --broker -> chart label
REPL_CLUSTERS = ("fl-pulsar-9999", "fl-pulsar-10000")  # the route table's names for guest's and host's
REPL_TENANT = "bench"  # the raw client's replicated namespace: bench/raw on both clusters


def _pulsar_context(args: argparse.Namespace, stack: ExitStack) -> BenchContext:
    """The Pulsar broker of the run (not for a run of replication workloads alone), and the two
    replication clusters, started when a replication workload first needs them."""
    from .brokers import EmbeddedPulsar, PulsarStandalone

    kind = getattr(args, "broker", "standalone")
    started: dict[str, Any] = {}

    def single() -> Any:
        if "single" not in started:
            broker = EmbeddedPulsar() if kind == "embedded" else PulsarStandalone()
            started["single"] = stack.enter_context(broker)
            if kind != "embedded":
                # Both parties' sessions create the tenant at once on a fresh broker, and Pulsar 4.0.7
                # answers one of the racing PUTs with HTTP 500 (BadVersionException), not 409: made first.
                broker.admin("PUT", "/admin/v2/tenants/fl-tenant", {"allowedClusters": [broker.cluster]})
        return started["single"]

    def raw(count: int, size: int, sync: bool) -> Go:
        def go(i: int) -> Result:
            b = single()
            ns = "bench/raw" if kind == "embedded" else "public/default"  # a real broker has no tenant bench
            cfg = {"service_url": b.service_url, "topic": f"persistent://{ns}/t{time.time_ns()}", "count": count,
                   "size": size, "sync": sync}  # fmt: skip
            return run_pair(raw_pulsar_sender, raw_pulsar_receiver, cfg, wait_ready=True)

        return go

    def fed(kind_: str, **extra: Any) -> Go:
        def go(i: int) -> Result:
            b = single()
            opts = {"service_url": b.service_url}
            if kind != "embedded":  # retention for what is sent before the peer subscribes, and cleanup
                opts["admin_url"] = b.admin_url
            cfg = {"backend": "pulsar", "job_id": f"bench-{kind_}-{time.time_ns()}", "workload": kind_,
                   "mib": args.mib, "options": {"guest": opts, "host": opts},
                   "cleanup": kind != "embedded", **extra}  # fmt: skip
            return run_pair(fed_sender, fed_receiver, cfg, wait_ready=False)

        return go

    def clusters() -> tuple[Any, Any]:
        """Two standalone clusters, A (guest's) and B (host's), registered with each other, and the
        raw client's namespace bench/raw replicated between them."""
        if "repl" not in started:
            a, b = (stack.enter_context(PulsarStandalone(cluster=name)) for name in REPL_CLUSTERS)
            for here, there in ((a, b), (b, a)):
                here.admin("PUT", f"/admin/v2/clusters/{there.cluster}",
                           {"serviceUrl": there.admin_url, "brokerServiceUrl": there.service_url})  # fmt: skip
            for here in (a, b):
                here.admin("PUT", f"/admin/v2/tenants/{REPL_TENANT}", {"allowedClusters": list(REPL_CLUSTERS)})
                here.admin("PUT", f"/admin/v2/namespaces/{REPL_TENANT}/raw")
                here.admin("POST", f"/admin/v2/namespaces/{REPL_TENANT}/raw/replication", list(REPL_CLUSTERS))
            started["repl"] = (a, b)
        return started["repl"]

    def raw_repl(count: int, size: int) -> Go:
        def go(i: int) -> Result:
            a, b = clusters()
            cfg = {"service_url": a.service_url, "receive_url": b.service_url, "admin_url": a.admin_url,
                   "replicate_to": b.cluster, "topic": f"persistent://{REPL_TENANT}/raw/t{time.time_ns()}",
                   "count": count, "size": size, "sync": False}  # fmt: skip
            return run_pair(raw_pulsar_sender, raw_pulsar_receiver, cfg, wait_ready=True)

        return go

    def fed_repl(kind_: str, **extra: Any) -> Go:
        def go(i: int) -> Result:
            a, b = clusters()
            routes = {party_id: {"host": "127.0.0.1", "port": c.port, "mngPort": c.web_port}
                      for party_id, c in (("9999", a), ("10000", b))}  # fmt: skip
            options = {
                who: {"mode": "replication", "service_url": c.service_url, "admin_url": c.admin_url}
                for who, c in (("guest", a), ("host", b))
            }
            cfg = {"backend": "pulsar", "job_id": f"bench-{kind_}-{time.time_ns()}", "workload": kind_,
                   "mib": args.mib, "options": options, "routes": routes, "cleanup": True,
                   "cleanup_sender": True, **extra}  # fmt: skip
            return run_pair(fed_sender, fed_receiver, cfg, wait_ready=False)

        return go

    broker: dict[str, Any] = {"kind": kind, "replication": {"raw": raw_repl, "fed": fed_repl}}
    only = set(args.only or ())
    if not only or not all(name.endswith("-repl") for name in only):  # a run of replication alone needs no third
        b = single()
        broker["service_url"] = b.service_url
        if kind != "embedded":
            broker["admin_url"] = b.admin_url
    return BenchContext(args, "pulsar", stack, raw, fed, broker)


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
register_workload("raw-large", lambda c: c.raw(*raw_messages(c.args.mib), False))
register_workload("object", lambda c: c.fed("object"), baseline="raw-large")
register_workload("table", lambda c: c.fed("table", partitions=8), baseline="raw-large")
register_workload("raw-small", lambda c: c.raw(SMALL_COUNT, SMALL, True))
register_workload("small", lambda c: c.fed("small"), baseline="raw-small")
register_workload("small-async", lambda c: c.fed("small-async"), baseline="raw-small")


def _repl(make: Callable[[BenchContext, dict[str, Any]], Go]) -> Callable[[BenchContext], Go | None]:
    """A replication workload: Pulsar only (``None`` elsewhere)."""
    return lambda c: make(c, c.broker["replication"]) if "replication" in c.broker else None


_REPL = {"default": False, "flag": "replication"}
register_workload("raw-repl", _repl(lambda c, r: r["raw"](*raw_messages(c.args.mib))), **_REPL)
register_workload("object-repl", _repl(lambda c, r: r["fed"]("object")), baseline="raw-repl", **_REPL)
register_workload("table-repl", _repl(lambda c, r: r["fed"]("table", partitions=8)), baseline="raw-repl", **_REPL)


def _suite(ctx: BenchContext) -> dict[str, tuple[Go, str | None]]:
    """The workloads to run now: defaults, --only names, --partitions scaling runs."""
    only = set(ctx.args.only or ())
    unknown = only - set(WORKLOADS) - {f"table-{n}" for n in ctx.args.partitions}
    if unknown:
        raise ConfigError(f"unknown workload(s) {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
    suite: dict[str, tuple[Go, str | None]] = {}
    for name, w in WORKLOADS.items():
        flag = w.flag or name.replace("-", "_")
        wanted = name in only if only else (w.default or getattr(ctx.args, flag, False))
        if not wanted:
            continue
        go = w.factory(ctx)
        if go is not None:
            suite[name] = (go, w.baseline)
    for n in ctx.args.partitions:
        name = f"table-{n}"
        if not only or name in only:
            suite[name] = (ctx.fed("table", partitions=n), "raw-large")
    return suite


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
    ap.add_argument("--partitions", type=_positive, nargs="*", default=[], metavar="N",
                    help="extra workloads table-N: the --mib table in N partitions (scaling)")  # fmt: skip
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--chart", type=Path, help="draw a PNG chart of the results (needs matplotlib)")
    ap.add_argument("--from-json", type=Path, nargs="+", metavar="FILE",
                    help="run nothing: chart these result files (with --chart)")  # fmt: skip
    for hook in _ARGUMENT_HOOKS:
        hook(ap)
    return ap


def _whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(ap)


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
    return {"median": median, "worst": worst, "best": best, "runs": list(runs)}


def compare(fed: Mapping[str, Any], raw: Mapping[str, Any]) -> dict[str, Any]:
    """A workload's ratio to its baseline: of the medians, and the worst per-repetition ratio.

    Repetition ``i`` of the workload ran right after repetition ``i`` of the baseline, so
    ``fed_i / raw_i`` compares runs made under the same load.
    """
    per_repeat = [round(_rate(f) / _rate(r), 3) for f, r in zip(fed["runs"], raw["runs"], strict=False)]
    return {
        "median": round(_rate(fed["median"]) / _rate(raw["median"]), 3),
        "worst": min(per_repeat) if per_repeat else None,
        "per_repeat": per_repeat,
    }


def _schedule(suite: Mapping[str, tuple[Go, str | None]]) -> list[list[str]]:
    """Workloads in groups: a raw baseline first, then the workloads measured against it."""
    groups: dict[str, list[str]] = {}
    for name, (_go, baseline) in suite.items():
        head = baseline if baseline in suite else name
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
    return (f"{backend:8s} {name:12s} median {median['MB_per_s']:8.1f} MB/s {median['seconds']:7.2f} s  "
            f"worst {worst['MB_per_s']:8.1f} MB/s {worst['seconds']:7.2f} s{extra}  runs: {runs}")  # fmt: skip


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
        suite = _suite(ctx)
        for group in _schedule(suite):
            runs: dict[str, list[Result]] = {name: [] for name in group}
            # Unmeasured rounds first: a broker JVM just started runs its first transfers on cold
            # code and fresh ledgers (object/raw 0.62 on round 1, then 1.0-1.25). They are kept
            # in the results under "warmup", never counted in a median or worst.
            for i in range(getattr(args, "warmup", 0)):
                for name in group:
                    warm = suite[name][0](args.repeat + i)
                    results.setdefault("warmup", {}).setdefault(name, []).append(warm)
                    out(f"warm-up {name}: {warm['MB_per_s']:.1f} MB/s in {warm['seconds']:.2f} s (not counted)")
            for i in range(args.repeat):
                for name in group:
                    runs[name].append(suite[name][0](i))
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
                        f"  (per repetition: {each})")  # fmt: skip
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
_DEFAULT_BASELINES = {"object": "raw-large", "table": "raw-large", "small": "raw-small", "small-async": "raw-small",
                      "object-repl": "raw-repl", "table-repl": "raw-repl"}  # fmt: skip
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


def median_and_worst(record: Mapping[str, Any]) -> tuple[Mapping[str, float], Mapping[str, float] | None]:
    """A workload record's median and worst run.

    Files written before medians were recorded hold ``runs`` (and ``best``): the median and the
    worst come from the runs; a record with nothing but ``best`` has it as its median, no worst.
    """
    if "median" in record:
        return record["median"], record.get("worst")
    runs = record.get("runs") or []
    if runs:
        summary = summarize(runs)
        return summary["median"], summary["worst"]
    return record["best"], None


def _worst_ratio(result: Mapping[str, Any], name: str) -> float | None:
    """The worst per-repetition ratio recorded for ``name`` (none in files from before it was)."""
    ratio = (result.get("ratios") or {}).get(name)
    return ratio.get("worst") if isinstance(ratio, Mapping) else None


def _label(result: Mapping[str, Any]) -> str:
    """The backend (with the RabbitMQ mode, or the Pulsar broker); Spark runs are ``spark + BACKEND``.

    Pulsar results written before ``--broker`` existed ran on pulsar-lite.
    """
    backend, mode = str(result["backend"]), result.get("mode")
    label = f"{backend} ({mode})" if backend == "rabbitmq" and mode else backend
    if backend == "pulsar":
        broker = str(result.get("broker") or "embedded")
        kind = PULSAR_BROKERS.get(broker, broker)
        if any(str(name).endswith("-repl") for name in result["workloads"]):
            kind += ", replication"
        label = f"{backend} ({kind})"
    if any(str(name).startswith("spark") for name in result["workloads"]):
        label = f"spark + {label}"
    return label


def result_labels(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """One distinct label per result set: ``_label``, then its date or a number where two would share one."""
    base = [_label(r) for r in results]
    labels = list(base)
    for label in dict.fromkeys(base):
        same = [i for i, b in enumerate(base) if b == label]
        if len(same) < 2:
            continue
        dates = [str(results[i].get("date") or "") for i in same]
        by_date = all(dates) and len(set(dates)) == len(dates)
        for k, i in enumerate(same, 1):
            labels[i] = f"{label}, {dates[k - 1]}" if by_date else f"{label} #{k}"
    return labels


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
        elif base == "raw-repl":
            panels.append(("geo-replication, cluster A to B", "MB/s", names))
        else:
            panels.append(("large transfers", "MB/s", names))
    return panels


def _value(run: Mapping[str, float], unit: str) -> float:
    return run["bytes"] / SMALL / run["seconds"] if unit == "objects/s" else float(run["MB_per_s"])


@dataclass(frozen=True)
class ChartBar:
    """One bar: a workload of one result set, at ``x`` on its panel; ``value`` is its median run."""

    workload: str
    x: float
    value: float
    #: "raw" on the baseline, else the ratio of the medians ("1.22×"), with the worst per-repetition
    #: ratio when the set recorded one ("1.22×, worst 0.91×"); "" when the set lacks the baseline
    note: str
    worst: float | None = None  # the worst run's value (the whisker), None when unknown


@dataclass(frozen=True)
class ChartGroup:
    """The bars of one result set in one panel, under the x-axis label ``label`` at ``centre``."""

    label: str
    centre: float
    bars: tuple[ChartBar, ...]


@dataclass(frozen=True)
class ChartPanel:
    """One raw baseline (``workloads[0]``) with the workloads measured against it, one group per result set."""

    title: str
    unit: str
    workloads: tuple[str, ...]
    groups: tuple[ChartGroup, ...]
    extent: float  # x units from the first bar's centre to the last one's


_GROUP_GAP = 1.0  # empty bar slots between two groups
_BAR_WIDTH = 0.85


def chart_layout(results: Iterable[Mapping[str, Any]]) -> list[ChartPanel]:
    """What ``render_chart`` draws, before any drawing: panels of labelled groups of bars.

    Each result set is its own group, with a label no other group of the panel has. A set takes
    part in a panel only with at least one workload measured against that panel's baseline, so no
    group is empty; its bars sit side by side, without slots for workloads other sets ran.
    """
    results = list(results)
    labels = result_labels(results)
    panels = []
    for title, unit, names in _panels(results):
        base = names[0]
        groups = []
        cursor = 0.0
        for label, r in zip(labels, results, strict=True):
            w = r["workloads"]
            present = [name for name in names if name in w]
            if all(name == base for name in present):
                continue  # nothing of this panel to compare in this set
            raw = _value(median_and_worst(w[base])[0], unit) if base in w else None
            bars = []
            for k, name in enumerate(present):
                median, worst = median_and_worst(w[name])
                value = _value(median, unit)
                note = "raw" if name == base else (f"{value / raw:.2f}×" if raw else "")
                worst_ratio = _worst_ratio(r, name)
                if raw and name != base and worst_ratio is not None:
                    note += f", worst {worst_ratio:.2f}×"
                bars.append(ChartBar(name, cursor + k, value, note, _value(worst, unit) if worst else None))
            groups.append(ChartGroup(label, cursor + (len(bars) - 1) / 2, tuple(bars)))
            cursor += len(bars) + _GROUP_GAP
        if groups:
            panels.append(ChartPanel(title, unit, tuple(names), tuple(groups), cursor - _GROUP_GAP - 1))
    return panels


def _tick(label: str) -> str:
    """A group's label on the x-axis: the backend, then its broker or mode, then a date, one per line."""
    return label.replace(" (", "\n(").replace("), ", "),\n")


def render_chart(results: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Grouped bars, one labelled group per result set (``chart_layout``): the raw client (grey) next
    to fedtransport's workloads. A bar is the median run, its whisker reaches down to the worst run;
    each fedtransport bar is labelled with its median ratio to the raw client and its worst
    per-repetition ratio. One panel per raw baseline."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("the chart needs matplotlib: pip install 'fedtransport[bench]'") from exc
    results = list(results)
    if not results:
        raise ConfigError("no benchmark results to chart")
    panels = chart_layout(results)
    if not panels:
        raise ConfigError("the results hold no workload with its raw baseline: nothing to compare")
    # each panel as wide as the bars it holds, so bars and their labels keep one size throughout
    sizes = [p.extent + 2 for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 0.42 * sum(sizes) + 1.2 * len(panels), 5.6),
                             squeeze=False, gridspec_kw={"width_ratios": sizes})  # fmt: skip
    for ax, panel in zip(axes[0], panels, strict=True):
        for j, name in enumerate(panel.workloads):
            bars = [b for g in panel.groups for b in g.bars if b.workload == name]
            if not bars:
                continue
            colour = _RAW_COLOUR if j == 0 else _COLOURS[(j - 1) % len(_COLOURS)]
            label = f"{name} (raw client)" if j == 0 else f"{name} (fedtransport)"
            below = [b.value - b.worst if b.worst is not None else 0.0 for b in bars]
            whisker = {"ecolor": "#333333", "capsize": 2, "lw": 1}
            drawn = ax.bar([b.x for b in bars], [b.value for b in bars], _BAR_WIDTH, color=colour, label=label,
                           yerr=[below, [0.0] * len(bars)], error_kw=whisker)  # fmt: skip
            for rect, bar in zip(drawn, bars, strict=True):
                top = (rect.get_x() + rect.get_width() / 2, rect.get_height())
                ax.annotate(bar.note, top, ha="center", va="bottom", fontsize=8, rotation=90, xytext=(0, 3),
                            textcoords="offset points")  # fmt: skip
        ax.set_xticks([g.centre for g in panel.groups], [_tick(g.label) for g in panel.groups])
        ax.set_xlim(-1, panel.extent + 1)
        ax.set_ylabel(panel.unit)
        ax.set_title(panel.title)
        ax.margins(y=0.35)  # room for the rotated ratio labels above the bars
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    dates = sorted({str(r.get("date", "")) for r in results} - {""})
    cpus = sorted({str(r.get("cpu_count", "?")) for r in results})
    fig.suptitle(f"fedtransport vs the raw broker client (bar: median run, whisker: worst run; {', '.join(cpus)} cores"
                 + (f"; {', '.join(dates)}" if dates else "") + ")", fontsize=11)  # fmt: skip
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")  # the legends below the axes stay in the picture
    plt.close(fig)
    return out
