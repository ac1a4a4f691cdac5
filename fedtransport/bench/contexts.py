"""The brokers a run starts, per backend, and the ``raw`` / ``fed`` helpers bound to them.

``_CONTEXTS[backend](args, stack)`` starts what the backend needs on ``stack`` (closed when the
run ends) and returns the :class:`~fedtransport.bench.workloads.BenchContext` the workload
factories get. Pulsar: one broker (real standalone or pulsar-lite, ``--broker``), and two
standalone clusters replicating to each other, started when a ``*-repl`` workload first needs
them. RabbitMQ: one node (``--mode shared``) or two federated ones.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .parties import fed_receiver, fed_sender, run_pair
from .raw import raw_pulsar_receiver, raw_pulsar_sender, raw_rabbit_receiver, raw_rabbit_sender
from .workloads import BenchContext, Go, Result

PULSAR_BROKERS = {"standalone": "standalone", "embedded": "pulsar-lite"}  # --broker -> chart label
REPL_CLUSTERS = ("fl-pulsar-9999", "fl-pulsar-10000")  # the route table's names for guest's and host's
REPL_TENANT = "bench"  # the raw client's replicated namespace: bench/raw on both clusters


def _pulsar_context(args: argparse.Namespace, stack: ExitStack) -> BenchContext:
    """The Pulsar broker of the run (not for a run of replication workloads alone), and the two
    replication clusters, started when a replication workload first needs them."""
    from ..brokers import EmbeddedPulsar, PulsarStandalone

    kind = getattr(args, "broker", "standalone")
    started: dict[str, Any] = {}

    def single() -> Any:
        if "single" not in started and kind == "embedded":
            started["single"] = stack.enter_context(EmbeddedPulsar())
        elif "single" not in started:
            broker = started["single"] = stack.enter_context(PulsarStandalone())
            # Both parties' sessions create the tenant at once on a fresh broker, and Pulsar 4.0.7
            # answers one of the racing PUTs with HTTP 500 (BadVersionException), not 409: made first.
            broker.admin("PUT", "/admin/v2/tenants/fl-tenant", {"allowedClusters": [broker.cluster]})
        return started["single"]

    def raw(count: int, size: int, sync: bool) -> Go:
        def go(i: int) -> Result:
            b = single()
            ns = "bench/raw" if kind == "embedded" else "public/default"  # a real broker has no tenant bench
            name = f"t{time.time_ns()}"
            cfg = {"service_url": b.service_url, "topic": f"persistent://{ns}/{name}", "count": count,
                   "size": size, "sync": sync}  # fmt: skip
            result = run_pair(raw_pulsar_sender, raw_pulsar_receiver, cfg, wait_ready=True)
            if kind != "embedded":  # as the fed workloads' cleanup: the bookie frees what no topic holds
                b.admin("DELETE", f"/admin/v2/persistent/{ns}/{name}", timeout=60.0)
            return result

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

    def clusters() -> tuple[PulsarStandalone, PulsarStandalone]:
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
        pair: tuple[PulsarStandalone, PulsarStandalone] = started["repl"]
        return pair

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

    def brokers() -> list[Any]:
        return ([started["single"]] if "single" in started else []) + list(started.get("repl", ()))

    def pids() -> list[int]:
        return [b.pid for b in brokers() if b.pid is not None]

    def logs() -> list[Path]:
        return [b.log_path for b in brokers() if b.log_path is not None]

    broker: dict[str, Any] = {"kind": kind, "replication": {"raw": raw_repl, "fed": fed_repl}}
    only = set(args.only or ())
    if not only or not all(name.endswith("-repl") for name in only):  # a run of replication alone needs no third
        b = single()
        broker["service_url"] = b.service_url
        if kind != "embedded":
            broker["admin_url"] = b.admin_url
    return BenchContext(args, "pulsar", stack, raw, fed, broker, pids, logs)


def _rabbit_context(args: argparse.Namespace, stack: ExitStack) -> BenchContext:
    from ..brokers import RabbitNode

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
    nodes = (a,) if a is b else (a, b)
    return BenchContext(args, "rabbitmq", stack, raw, fed, broker, lambda: sorted({*a.processes(), *b.processes()}),
                        lambda: [n.log_file for n in nodes if n.log_file is not None])  # fmt: skip


_CONTEXTS: dict[str, Callable[[argparse.Namespace, ExitStack], BenchContext]] = {
    "pulsar": _pulsar_context,
    "rabbitmq": _rabbit_context,
}
