"""End-to-end throughput: raw broker client vs fedtransport (a thin wrapper of ``fedtransport.bench``).

    python benchmarks/throughput.py --backend pulsar [--mib 256] [--repeat 2] [--json FILE] [--chart FILE.png]
    python benchmarks/throughput.py --backend rabbitmq [--mode shared|federated]

The harness and its workloads live in ``fedtransport/bench/`` so that ``fedtransport bench``
works from an installed package; this script takes the same flags. Add a workload here (or in
a module imported here) with ``register_workload`` / ``register_fed_kind`` /
``register_arguments`` at the top level, before ``main()``: the sender and receiver processes
are spawned and run this file's top level again, so their registrations exist there too. See
the ``fedtransport.bench`` docstring.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from fedtransport.bench import (  # noqa: E402  (after the path set-up above)
    BenchContext,
    main,
    register_arguments,
    register_fed_kind,
    register_workload,
    run,
    run_pair,
    table_records,
)

__all__ = ["BenchContext", "main", "register_arguments", "register_fed_kind", "register_workload", "run", "run_pair"]


# --- Spark local[2] beside the plain table (fedtransport.spark) --------------------------------
#
#   python benchmarks/throughput.py --backend pulsar --only raw-large table --spark
#
#   spark-table       the "table" workload's data (8 partitions, --mib MiB in all, int keys, 4 KiB arrays)
#                     as a persisted RDD, sent by fedtransport.spark.remote from a Spark local[2]
#                     app to another Spark local[2] app whose get receives and persists it
#                     (MEMORY_AND_DISK, the default): the clock stops when get returns.
#   spark-table-lazy  the same, received with materialize=False and no persistence by one
#                     pass over the RDD that sums the bytes (the clock stops after that pass).
#
# Each side is its own process with its own JVM; both are up and connected before the clock
# starts. Needs the spark extra and Java 17+.

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

SPARK_PARTITIONS = 8  # as the plain table; its size follows --mib, the size of the raw baseline
SPARK_READY_TIMEOUT = 600.0  # seconds for the other side's Spark to come up (a JVM on a loaded machine)


def _spark_session(name: str) -> Any:
    import os

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[2]")
        .appName(name)
        .config("spark.driver.memory", "1g")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _spark_stop(spark: Any) -> None:
    from pyspark import SparkContext

    spark.stop()
    gateway = SparkContext._gateway
    if gateway is not None:
        gateway.shutdown()
        if gateway.proc is not None:
            gateway.proc.stdin.close()  # the JVM exits when its stdin closes
            gateway.proc.wait(60)


def _spark_conf(cfg: dict[str, Any], who: str) -> Any:
    import fedtransport as ft
    from fedtransport import spark as fts

    party = ft.Party("guest", "9999") if who == "guest" else ft.Party("host", "10000")
    return fts.SparkFederationConfig(cfg["backend"], cfg["job_id"], party, route_table=cfg.get("routes"),
                                     options=cfg["options"][who])  # fmt: skip


def _spark_sync(conf: Any, me: str, peer: Any, tag: str) -> None:
    """Both sides up (Spark and broker) before the clock starts: an ordinary session's handshake."""
    import fedtransport as ft

    with ft.Federation.connect(conf.backend, job_id=conf.job_id, party=conf.party, route_table=conf.route_table,
                               options=conf.options) as fed:  # fmt: skip
        fed.remote(me, "spark-sync", f"{tag}-{me}", [peer])
        other = "host" if me == "guest" else "guest"
        fed.get("spark-sync", f"{tag}-{other}", [peer], timeout=SPARK_READY_TIMEOUT)


def spark_sender(cfg: dict[str, Any], q: Any) -> None:
    from pyspark import StorageLevel

    import fedtransport as ft
    from fedtransport import spark as fts

    spark = _spark_session("fedtransport-bench-sender")
    try:
        sc = spark.sparkContext
        conf = _spark_conf(cfg, "guest")
        host = ft.Party("host", "10000")
        records = table_records(cfg["mib"], cfg["partitions"])

        def rows(p: int, _it: Any) -> Any:  # nested: pickled by value (workers cannot import __mp_main__)
            import numpy as np

            block = np.random.default_rng(1).random((records[p], 512))  # as the plain table: distinct 4 KiB rows
            return ((i, block[i]) for i in range(records[p]))

        rdd = sc.parallelize(range(cfg["partitions"]), cfg["partitions"]).mapPartitionsWithIndex(rows)
        rdd.persist(StorageLevel.MEMORY_ONLY).count()  # the table exists before the clock starts
        _spark_sync(conf, "guest", host, "ready")
        start = time.time()
        fts.remote(rdd, "data", "0", [host], conf)
        q.put(("start", start))
        _spark_sync(conf, "guest", host, "done")  # keep the broker resources until the receiver is done
        fts.close()
    finally:
        _spark_stop(spark)


def spark_receiver(cfg: dict[str, Any], q: Any) -> None:
    import fedtransport as ft
    from fedtransport import spark as fts

    spark = _spark_session("fedtransport-bench-receiver")
    try:
        sc = spark.sparkContext
        conf = _spark_conf(cfg, "host")
        guest = ft.Party("guest", "9999")
        _spark_sync(conf, "host", guest, "ready")

        def nbytes(kv: Any) -> int:  # nested: pickled by value; the payload, as the plain table counts it
            return int(kv[1].nbytes)

        if cfg["lazy"]:
            [rdd] = fts.get(sc, "data", "0", [guest], conf, timeout=600, storage_level=None, materialize=False)
            total = rdd.map(nbytes).sum()
            end = time.time()
        else:
            [rdd] = fts.get(sc, "data", "0", [guest], conf, timeout=600)
            end = time.time()
            total = rdd.map(nbytes).sum()
        q.put(("end", end, int(total)))
        _spark_sync(conf, "host", guest, "done")
        if cfg.get("cleanup"):
            fts.cleanup(conf)
        fts.close()
    finally:
        _spark_stop(spark)


def _spark_workload(lazy: bool) -> Any:
    def factory(ctx: BenchContext) -> Any:
        if ctx.backend == "pulsar":
            opts = {"service_url": ctx.broker["service_url"]}
            options, routes, clean = {"guest": opts, "host": opts}, None, False
        else:
            options, routes, clean = ctx.broker["options"], ctx.broker["routes"], True

        def go(i: int) -> dict[str, float]:
            cfg = {"backend": ctx.backend, "job_id": f"bench-spark-{time.time_ns()}", "options": options,
                   "routes": routes, "cleanup": clean, "lazy": lazy, "partitions": SPARK_PARTITIONS,
                   "mib": ctx.args.mib}  # fmt: skip
            return run_pair(spark_sender, spark_receiver, cfg, wait_ready=False)

        return go

    return factory


class _SparkFlag(argparse.Action):
    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        namespace.spark_table = namespace.spark_table_lazy = True


def _spark_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--spark", nargs=0, action=_SparkFlag,
                    help="also run spark-table and spark-table-lazy (pyspark local[2] on each side)")  # fmt: skip


register_arguments(_spark_arguments)
register_workload("spark-table", _spark_workload(lazy=False), baseline="raw-large", default=False)
register_workload("spark-table-lazy", _spark_workload(lazy=True), baseline="raw-large", default=False)


if __name__ == "__main__":
    sys.exit(main(prog="throughput.py"))
