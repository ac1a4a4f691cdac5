"""FATE 2.2 side by side: FATE's own RabbitMQ / Pulsar federation against FATE over fedtransport.

    fedtransport bench --backend rabbitmq --fate [--mib 256] [--repeat 3]
    fedtransport bench --backend pulsar --fate            (the real Pulsar standalone broker)

Each repetition runs two processes, guest (sender) and host (receiver), each with FATE 2.2's own
``Context`` over standalone computing; they exchange the same values twice on the same broker:
once through FATE's federation for that broker (``RabbitmqFederation`` or ``PulsarFederation``,
``mode="client"``: both parties on one broker, as FATE's own standalone deployments run) and once
through :class:`~fedtransport.fate2.FedtransportFederation`. The ratio of a ``fate-ft-*`` workload
is fedtransport / FATE native, repetition by repetition.

  fate-native-object, fate-ft-object        8 float64 arrays of 4 MiB, one ``put`` after the other
                                            (one per iteration context, as an algorithm sends them)
  fate-native-table-8x4, fate-ft-table-8x4  a KVTable of 8 partitions of 4 MiB each, records of an
                                            int key and a 4 KiB float64 array
  fate-native-table, fate-ft-table          the same table, --mib MiB in all (256: 8 x 32 MiB)
  fate-native-small, fate-ft-small          1000 objects of 1 KiB, one per iteration context

The clock starts when guest begins its first ``put`` (both contexts built and a hello exchanged
both ways) and stops when host's last ``get`` returned; a table's records are counted after the
clock stopped and must all be there. pyfate is imported only in the party processes; where torch
is missing they register the same ``torch`` stand-in as tests/test_fate2.py (pyfate imports torch
on every ``put`` only to ask ``isinstance(v, torch.Tensor)``).

Not every broker set-up applies: FATE's Pulsar federation needs the admin REST API (the real
standalone broker; pulsar-lite has none) and the workloads skip ``--broker embedded``; FATE's
RabbitMQ federation in ``replication`` mode needs a federation upstream per job, so they skip
``--mode federated`` too.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
import types
from typing import Any
from urllib.parse import urlsplit

from .parties import bounded_teardown, run_pair
from .settle import tree_cpu_seconds
from .workloads import (
    SMALL,
    SMALL_COUNT,
    TABLE_ROW,
    BenchContext,
    Go,
    MiB,
    Result,
    register_arguments,
    register_workload,
    table_records,
)

GUEST, HOST = ("guest", "9999"), ("host", "10000")
PARTIES = [GUEST, HOST]
PARTITIONS = 8
OBJECT_MIB = 4
OBJECT_COUNT = 8
SMALL_TABLE_MIB = 4 * PARTITIONS  # the 8 x 4 MiB table of issue 16
TIMEOUT = 600.0  # seconds a party waits for the other (a loaded machine, FATE's slowest path)
DESTROY_TIMEOUT = 60.0  # seconds a party's ctx.destroy() may take before the party ends without it

#: every workload of the FATE comparison, in the order they run (native first: the baseline)
FATE_WORKLOADS: list[str] = []


def _torch_stand_in() -> None:
    import importlib.util

    if importlib.util.find_spec("torch") is None:  # see the module docstring
        stand_in = types.ModuleType("torch")
        stand_in.Tensor = type("Tensor", (), {})  # type: ignore[attr-defined]
        sys.modules["torch"] = stand_in


def _federation(cfg: dict[str, Any], who: str, computing: Any) -> Any:
    """The party's FATE federation: FATE's own for the broker, or fedtransport's."""
    party = GUEST if who == "guest" else HOST
    if cfg["engine"] == "fedtransport":
        from ..fate2 import FedtransportFederation

        return FedtransportFederation.from_conf(cfg["job_id"], computing, party, PARTIES, cfg["backend"],
                                                cfg["options"][who], cfg.get("routes"), timeout=TIMEOUT)  # fmt: skip
    n = cfg["native"]
    if cfg["backend"] == "rabbitmq":
        from fate.arch.federation.backends.rabbitmq import RabbitmqFederation

        return RabbitmqFederation.from_conf(
            cfg["job_id"], computing, party, PARTIES, route_table=n["routes"], host=n["host"], port=n["port"],
            mng_port=n["mng_port"], base_user=n["user"], base_password=n["password"], mode="client",
            max_message_size=None,
        )  # fmt: skip
    from fate.arch.federation.backends.pulsar import PulsarFederation

    _quiet_fate_pulsar_clients()
    return PulsarFederation.from_conf(
        cfg["job_id"], computing, party, PARTIES, route_table={}, mode="client", host=n["host"], port=n["port"],
        mng_port=n["mng_port"], topic_ttl=None, cluster=n["cluster"], tenant=None, max_message_size=None,
    )  # fmt: skip


def _quiet_fate_pulsar_clients() -> None:
    """FATE's Pulsar channels build ``pulsar.Client`` with the client's default logger, which
    prints every connection, producer and consumer at INFO: tens of thousands of lines per
    repetition on stderr. They get the logger fedtransport's Pulsar backend uses (warnings
    only); nothing else about FATE's clients changes."""
    import functools

    import pulsar
    from fate.arch.federation.backends.pulsar import _mq_channel

    from .raw import client_logger

    quiet = types.SimpleNamespace(**{k: getattr(pulsar, k) for k in dir(pulsar) if not k.startswith("__")})
    quiet.Client = functools.partial(pulsar.Client, logger=client_logger())
    _mq_channel.pulsar = quiet  # the module FATE's MQChannel reads pulsar.Client from


class _Party:
    """A FATE context (standalone computing in a directory of its own) for one side of a repetition."""

    def __init__(self, cfg: dict[str, Any], who: str) -> None:
        _torch_stand_in()
        self.cfg, self.who = cfg, who
        import numpy  # noqa: F401  (both sides hold arrays: loaded before the clock, as in a job)
        from fate.arch.computing.backends.standalone import CSession
        from fate.arch.context import Context

        self.dir = tempfile.mkdtemp(prefix=f"fate-bench-{who}-")
        # A FATE table destroys itself when collected, reopening its LMDB directory to do so:
        # after close() and the party's return. The directory goes once more at exit.
        atexit.register(shutil.rmtree, self.dir, True)
        self.computing = CSession(session_id=f"{cfg['job_id']}_{who}", data_dir=self.dir)
        self.ctx = Context(computing=self.computing, federation=_federation(cfg, who, self.computing))

    def close(self) -> None:
        _bounded_destroy(self.ctx, self.cfg, self.who)  # the job's queues / namespace; after the clock stopped
        shutil.rmtree(self.dir, ignore_errors=True)


def _bounded_destroy(ctx: Any, cfg: dict[str, Any], who: str) -> None:
    """``ctx.destroy()`` in a thread of its own, given :data:`DESTROY_TIMEOUT` seconds; a failure or
    a hang is reported, never fatal (the measurement is in by then).

    FATE's ``PulsarFederation._destroy`` makes admin calls without a timeout, and with both parties
    running its namespace-wide unsubscribe at once it parked every ``pulsar-web`` thread of Pulsar
    4.0.7 standalone: the party hung in it and every later admin call on the broker too. Both
    parties share the job's namespace (client mode), so on Pulsar only guest runs FATE's destroy,
    after host said it holds the data; host's FATE federation only goes with its process.
    """
    timeout = float(cfg.get("destroy_timeout", DESTROY_TIMEOUT))
    if cfg["engine"] == "native" and cfg["backend"] == "pulsar" and who == "host":
        # Its computing session goes all the same: the pool's worker processes left running held
        # the party's exit until the benchmark killed it, 120 s later, after every such repetition.
        bounded_teardown(ctx.computing.destroy, f"{who}'s FATE computing of {cfg['job_id']}", timeout)
        return
    what = f"{who}'s FATE destroy of {cfg['job_id']} ({cfg['engine']})"
    bounded_teardown(ctx.destroy, what, timeout)


def _table(ctx: Any, mib: int) -> Any:
    import numpy as np

    records = sum(table_records(mib, PARTITIONS))
    block = np.random.default_rng(1).random((records, TABLE_ROW // 8))  # distinct rows, as the plain table
    return ctx.computing.parallelize(((i, block[i]) for i in range(records)), partition=PARTITIONS,
                                     include_key=True)  # fmt: skip


def _cpu() -> float:
    """The party's CPU seconds: FATE's standalone computing works in a pool of processes."""
    return tree_cpu_seconds(os.getpid())


def fate_sender(cfg: dict[str, Any], q: Any) -> None:
    import numpy as np

    side = _Party(cfg, "guest")
    try:
        ctx, what = side.ctx, cfg["what"]
        if what == "table":
            value: Any = _table(ctx, cfg["table_mib"])
        elif what == "object":
            rng = np.random.default_rng(0)
            value = [rng.random(OBJECT_MIB * MiB // 8) for _ in range(OBJECT_COUNT)]
        else:
            value = b"x" * SMALL
        # host said hi once its context stood (the receiver's "ready"): now hello back
        ctx.hosts.put("hello", "guest")
        assert ctx.hosts[0].get("hi") == "host"
        cpu = _cpu()  # before the clock: it reads /proc
        start = time.time()
        if what == "table":
            ctx.hosts.put("data", value)
        elif what == "object":
            for i, sub in ctx.on_iterations.ctxs_range(OBJECT_COUNT):
                sub.hosts.put("data", value[i])
        else:
            for _i, sub in ctx.on_iterations.ctxs_range(SMALL_COUNT):
                sub.hosts.put("data", value)
        assert ctx.hosts[0].get("done") == "done"  # keep our side until the receiver holds it all
        # Reported once the receiver holds it all: a put may push in the background, and its CPU counts.
        q.put(("start", start, _cpu() - cpu))
    finally:
        side.close()


def fate_receiver(cfg: dict[str, Any], q: Any) -> None:
    side = _Party(cfg, "host")
    try:
        ctx, what = side.ctx, cfg["what"]
        # host first, then "ready": its side of the job exists before guest's (FATE's Pulsar
        # federation creates the job's namespace, and two racing creations can fail with HTTP 500)
        ctx.guest.put("hi", "host")
        q.put(("ready",))
        assert ctx.guest.get("hello") == "guest"
        cpu = _cpu()
        if what == "table":
            table = ctx.guest.get("data")
            end, cpu = time.time(), _cpu() - cpu
            want = sum(table_records(cfg["table_mib"], PARTITIONS))
            got = table.count()
            if got != want or table.num_partitions != PARTITIONS:
                raise RuntimeError(f"received {got} records in {table.num_partitions} partitions, "
                                   f"sent {want} in {PARTITIONS}")  # fmt: skip
            nbytes = got * TABLE_ROW
        elif what == "object":
            nbytes = 0
            for _i, sub in ctx.on_iterations.ctxs_range(OBJECT_COUNT):
                nbytes += int(sub.guest.get("data").nbytes)
            end, cpu = time.time(), _cpu() - cpu
        else:
            nbytes = 0
            for _i, sub in ctx.on_iterations.ctxs_range(SMALL_COUNT):
                nbytes += len(sub.guest.get("data"))
            end, cpu = time.time(), _cpu() - cpu
        ctx.guest.put("done", "done")
        q.put(("end", end, nbytes, cpu))
    finally:
        side.close()


def _applies(ctx: BenchContext) -> bool:
    """Only where FATE's own federation runs: a real Pulsar (admin API) or a shared RabbitMQ node."""
    if ctx.backend == "pulsar":
        return ctx.broker.get("kind") == "standalone" and "admin_url" in ctx.broker
    return ctx.backend == "rabbitmq" and ctx.args.mode == "shared"


def _native(ctx: BenchContext) -> dict[str, Any]:
    """What FATE's own federation needs to reach the run's broker."""
    if ctx.backend == "rabbitmq":
        node = ctx.broker["nodes"][0]
        return {"host": "127.0.0.1", "port": node.port, "mng_port": node.mng_port, "user": node.user,
                "password": node.password, "routes": {}}  # fmt: skip
    service, admin = urlsplit(ctx.broker["service_url"]), urlsplit(ctx.broker["admin_url"])
    return {"host": service.hostname, "port": service.port, "mng_port": admin.port,
            "cluster": ctx.broker.get("cluster", "standalone")}  # fmt: skip


def _workload(engine: str, what: str, table_mib: int | None = None) -> Any:
    def factory(ctx: BenchContext) -> Go | None:
        if not _applies(ctx):
            return None
        if ctx.backend == "pulsar":
            opts = {"service_url": ctx.broker["service_url"], "admin_url": ctx.broker["admin_url"]}
            options, routes = {"guest": opts, "host": opts}, None
        else:
            options, routes = ctx.broker["options"], ctx.broker["routes"]
        native = _native(ctx)

        def go(i: int) -> Result:
            cfg = {"engine": engine, "what": what, "backend": ctx.backend, "options": options, "routes": routes,
                   "native": native, "table_mib": table_mib or ctx.args.mib,
                   "job_id": f"fate-bench-{engine}-{what}-{time.time_ns()}"}  # fmt: skip
            return run_pair(fate_sender, fate_receiver, cfg, wait_ready=True)

        return go

    return factory


def _register(name: str, what: str, table_mib: int | None = None) -> None:
    native, ours = f"fate-native-{name}", f"fate-ft-{name}"
    register_workload(native, _workload("native", what, table_mib), default=False, flag="fate")
    register_workload(ours, _workload("fedtransport", what, table_mib), baseline=native, default=False, flag="fate")
    FATE_WORKLOADS.extend([native, ours])


class _FateFlag(argparse.Action):
    """``--fate``: the comparison alone (every fate-* workload), unless ``--only`` names workloads."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        namespace.fate = True
        if not namespace.only:
            namespace.only = list(FATE_WORKLOADS)


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--fate", nargs=0, action=_FateFlag, default=False,
                    help="run the FATE 2.2 side by side alone: fate-native-* (FATE's own federation) vs "
                    "fate-ft-* (FATE over fedtransport) on the same broker; needs pyfate 2.2")  # fmt: skip


register_arguments(_arguments)
# The short groups first: the big table and the small objects (minutes of FATE's own federation)
# run on a broker that has been working for a while.
_register("object", "object")
_register("table-8x4", "table", SMALL_TABLE_MIB)
_register("table", "table")
_register("small", "small")
