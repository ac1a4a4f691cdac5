"""fedtransport.spark: pyspark local[2] against real brokers (Apache Pulsar standalone, a RabbitMQ node).

Both parties' drivers share one SparkSession (one per module, stopped at its end, JVM included):
remote and get are separate Spark jobs, and the broker holds the data between them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ARBITER, GUEST, HOST
from party_proc import PeakRSS

import fedtransport as ft
from fedtransport import spark as fts
from fedtransport.brokers.standalone import PulsarStandalone

try:
    from tests.rabbit_fixtures import rabbit_certs, rabbit_installed, rabbit_node, rabbit_opts, rabbit_pool
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from rabbit_fixtures import (  # type: ignore[no-redef]  # noqa: F401
        rabbit_certs,
        rabbit_installed,
        rabbit_node,
        rabbit_opts,
        rabbit_pool,
    )


def _java_missing() -> str | None:
    java = shutil.which("java") or (Path(os.environ.get("JAVA_HOME", "/nonexistent")) / "bin" / "java")
    try:
        out = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"java not found ({exc}): Spark needs Java 17+ (apt-get install -y openjdk-17-jre-headless)"
    return None if out.returncode == 0 else f"`java -version` failed: {out.stderr.strip()[:200]}"


pyspark = pytest.importorskip("pyspark", reason="pyspark not installed: pip install -e '.[spark]'")
_NO_JAVA = _java_missing()
pytestmark = pytest.mark.skipif(_NO_JAVA is not None, reason=_NO_JAVA or "")

MiB = 1 << 20
SPARK_ENV = {"PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One local[2] SparkContext for the module; its JVM is stopped at the end."""
    from pyspark import SparkContext
    from pyspark import cloudpickle as spark_cloudpickle
    from pyspark.sql import SparkSession

    # Executor-side functions of this module travel by value: workers cannot import tests/.
    spark_cloudpickle.register_pickle_by_value(sys.modules[__name__])
    saved = {k: os.environ.get(k) for k in SPARK_ENV}
    os.environ.update(SPARK_ENV)
    local_dir = tmp_path_factory.mktemp("spark-local")
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("fedtransport-tests")
        .config("spark.driver.memory", "512m")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.local.dir", str(local_dir))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield spark.sparkContext
    finally:
        fts.close()
        spark.stop()
        gateway = SparkContext._gateway
        if gateway is not None:  # stop() leaves the JVM running for a next context: end it
            proc = gateway.proc
            gateway.shutdown()
            SparkContext._gateway = None
            SparkContext._jvm = None
            if proc is not None:
                proc.stdin.close()  # the JVM exits when its stdin closes
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        spark_cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def pulsar_broker(pulsar_standalone: PulsarStandalone) -> dict[str, Any]:
    """The options of the session's real Apache Pulsar broker; a job with ``admin_url`` makes its
    own namespace, which ``fts.cleanup`` deletes."""
    return {"service_url": pulsar_standalone.service_url, "admin_url": pulsar_standalone.admin_url}


PulsarJob = Callable[..., tuple[fts.SparkFederationConfig, fts.SparkFederationConfig]]


@pytest.fixture
def pulsar_job(pulsar_broker: dict[str, Any]) -> Iterator[PulsarJob]:
    """``pulsar_job(**options)``: guest's and host's configs of a fresh job on the real broker;
    their driver sessions are closed and each job cleaned up at the end of the test."""
    made: list[fts.SparkFederationConfig] = []

    def confs(**options: Any) -> tuple[fts.SparkFederationConfig, fts.SparkFederationConfig]:
        job_id = f"spark-{uuid.uuid4().hex[:12]}"
        opts = {**pulsar_broker, **options}
        guest, host = (fts.SparkFederationConfig("pulsar", job_id, p, options=opts) for p in (GUEST, HOST))
        made.extend((guest, host))
        return guest, host

    yield confs
    for conf in made:
        fts.close(conf)
    for guest in made[::2]:
        fts.cleanup(guest)


@pytest.fixture(params=["pulsar", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def backend(request: pytest.FixtureRequest) -> Iterator[Callable[..., fts.SparkFederationConfig]]:
    """A factory of configs for one job on a real broker: ``make(party, **options)``."""
    job_id = f"spark-{uuid.uuid4().hex[:12]}"
    if request.param == "pulsar":
        base: dict[str, Any] = request.getfixturevalue("pulsar_broker")
    else:
        if not rabbit_installed():
            pytest.skip("rabbitmq-server not installed (apt-get install -y rabbitmq-server)")
        node = request.getfixturevalue("rabbit_node")
        base = rabbit_opts(node)
    made: list[fts.SparkFederationConfig] = []

    def make(party: ft.Party, **options: Any) -> fts.SparkFederationConfig:
        conf = fts.SparkFederationConfig(request.param, job_id, party, options={**base, **options})
        made.append(conf)
        return conf

    yield make
    for conf in made:
        fts.close(conf)
    if made:
        fts.cleanup(made[0])  # the job's broker resources (RabbitMQ: the vhost and every queue)


# --- what executors compute (pickled by value) ---------------------------------------------------


def mixed_records(p: int, _it: Any) -> Iterator[tuple[Any, Any]]:
    """Partition ``p`` of a deterministic table of mixed keys and values; partition 3 is empty."""
    if p == 3:
        return
    for i in range(40 * (p + 1)):
        key: Any = (p, i) if i % 3 == 0 else (f"k-{p}-{i}" if i % 3 == 1 else p * 1000 + i)
        if i % 4 == 0:
            value: Any = np.arange(i, dtype=np.float64).reshape(-1, 1) * p
        elif i % 4 == 1:
            value = {"name": f"r{i}", "w": [1.5, None, True], "blob": bytes([i % 256]) * i}
        elif i % 4 == 2:
            value = np.full((3, 4), i, dtype=np.int32)
        else:
            value = ("x" * i, float(i) / 7, -i)
        yield key, value


def big_records(p: int, _it: Any, mib: int = 32, size: int = 256 * 1024) -> Iterator[tuple[int, bytes]]:
    """``mib`` MiB of incompressible values, made inside the executor."""
    rng = np.random.default_rng(p)
    for i in range(mib * MiB // size):
        yield p * 1_000_000 + i, rng.bytes(size)


def record_digest(rec: tuple[Any, Any]) -> int:
    k, v = rec
    data = v if isinstance(v, bytes) else repr(v).encode()
    return int.from_bytes(hashlib.blake2b(repr(k).encode() + data, digest_size=7).digest(), "little")


def same_records(a: list[list[tuple[Any, Any]]], b: list[list[tuple[Any, Any]]]) -> bool:
    if [len(p) for p in a] != [len(p) for p in b]:
        return False
    for pa, pb in zip(a, b, strict=True):
        for (ka, va), (kb, vb) in zip(pa, pb, strict=True):
            if ka != kb or type(va) is not type(vb):
                return False
            if isinstance(va, np.ndarray):
                if va.dtype != vb.dtype or not np.array_equal(va, vb):
                    return False
            elif va != vb:
                return False
    return True


# --- tests ---------------------------------------------------------------------------------------


def test_config_is_checked_and_travels_as_plain_data() -> None:
    import pickle

    url = "pulsar://127.0.0.1:6650"  # only checked and carried here: nothing connects
    conf = fts.SparkFederationConfig("pulsar", "job-1", ("guest", 9999), options={"service_url": url})
    assert conf.party == GUEST and pickle.loads(pickle.dumps(conf)) == conf
    assert conf.task_session_options(1030) == {"service_url": url, "lanes": 1, "lane_offset": 1030}
    with pytest.raises(ft.ConfigError, match="memory"):
        fts.SparkFederationConfig("memory", "job-1", GUEST)
    with pytest.raises(ft.ConfigError, match="service_url"):
        fts.SparkFederationConfig("pulsar", "job-1", GUEST)
    with pytest.raises(ft.ConfigError, match="lane_offset"):
        fts.SparkFederationConfig("pulsar", "job-1", GUEST, options={"service_url": url, "lane_offset": 3})
    with pytest.raises(ft.ConfigError, match="lane_base"):
        fts.SparkFederationConfig("pulsar", "job-1", GUEST, options={"service_url": url}, lane_base=10)
    with pytest.raises(ft.ConfigError, match="unknown option"):
        fts.SparkFederationConfig("pulsar", "job-1", GUEST, options={"service_url": url, "servce_url": 1})
    rabbit = fts.SparkFederationConfig("rabbitmq", "job-1", GUEST, task_options={"prefetch": 64})
    assert rabbit.task_session_options(1024)["prefetch"] == 64
    assert "prefetch" not in fts.SparkFederationConfig("rabbitmq", "job-1", GUEST).task_session_options(1024)


def test_roundtrip_keeps_partitions_and_records(sc: Any, backend: Callable[..., fts.SparkFederationConfig]) -> None:
    guest, host = backend(GUEST), backend(HOST)
    src = sc.parallelize(range(5), 5).mapPartitionsWithIndex(mixed_records)
    expected = src.glom().collect()
    sent = fts.remote(src, "x", "0", [HOST], guest)
    assert (sent.partitions, sent.records) == (5, sum(map(len, expected)))

    [rdd] = fts.get(sc, "x", "0", [GUEST], host, timeout=120)
    assert rdd.getNumPartitions() == 5 and rdd.is_cached
    got = rdd.glom().collect()
    assert same_records(got, expected)
    assert rdd.count() == sent.records  # evaluated again: read from Spark's cache, not the broker
    with pytest.raises(ft.DuplicateTransfer):
        fts.get(sc, "x", "0", [GUEST], host)
    with pytest.raises(ft.DuplicateTransfer):
        fts.remote(src, "x", "0", [HOST], guest)


def test_several_parties_each_way(sc: Any, backend: Callable[..., fts.SparkFederationConfig]) -> None:
    guest, host, arbiter = backend(GUEST), backend(HOST), backend(ARBITER)
    src = sc.parallelize(range(5), 5).mapPartitionsWithIndex(mixed_records)
    expected = src.glom().collect()
    fts.remote(src, "x", "0", [HOST, ARBITER], guest)  # one task feeds two parties' streams
    other = sc.parallelize([(i, f"arbiter-{i}") for i in range(100)], 3)
    fts.remote(other, "x", "0", [HOST], arbiter)  # same (name, tag), another sender

    from_guest, from_arbiter = fts.get(sc, "x", "0", [GUEST, ARBITER], host, timeout=120)
    assert same_records(from_guest.glom().collect(), expected)
    assert from_arbiter.glom().collect() == other.glom().collect()
    [at_arbiter] = fts.get(sc, "x", "0", [GUEST], arbiter, timeout=120)
    assert same_records(at_arbiter.glom().collect(), expected)


def test_lanes_are_reused_across_variables_and_gets_may_come_in_any_order(
    sc: Any, backend: Callable[..., fts.SparkFederationConfig]
) -> None:
    # Small messages, so each partition is many messages (more than RabbitMQ's default
    # prefetch of 32): a task reading past its own transfer must not lose the next one.
    guest, host = backend(GUEST, max_message_size=64 * 1024), backend(HOST, max_message_size=64 * 1024)
    srcs = {
        v: sc.parallelize(range(3), 3).mapPartitionsWithIndex(lambda p, it, v=v: big_records(p + 10 * v, it, mib=4))
        for v in range(3)
    }
    digests = {v: rdd.map(record_digest).sum() for v, rdd in srcs.items()}
    for v, rdd in srcs.items():
        fts.remote(rdd, f"v{v}", "0", [HOST], guest)
    for v in (2, 0, 1):
        [rdd] = fts.get(sc, f"v{v}", "0", [GUEST], host, timeout=120)
        assert rdd.map(record_digest).sum() == digests[v]


def test_driver_memory_does_not_grow_with_the_table(sc: Any, pulsar_job: PulsarJob) -> None:
    guest, host = pulsar_job()
    partitions, mib = 8, 32  # 256 MiB, made, sent, received and checked in the executors
    src = sc.parallelize(range(partitions), partitions).mapPartitionsWithIndex(lambda p, it: big_records(p, it, mib))
    with PeakRSS() as mem:
        sent = fts.remote(src, "big", "0", [HOST], guest)
        [rdd] = fts.get(sc, "big", "0", [GUEST], host, timeout=240)
        got = rdd.map(record_digest).sum()
        expected = src.map(record_digest).sum()
    assert sent.bytes >= partitions * mib * MiB
    assert got == expected and rdd.count() == sent.records
    # The table is 256 MiB; the driver held a head, some counts and digests.
    assert mem.growth < 48 * MiB, f"driver RSS grew by {mem.growth / MiB:.0f} MiB for a 256 MiB table"
    rdd.unpersist()


def test_a_lost_cached_partition_is_not_received_twice(sc: Any, pulsar_job: PulsarJob) -> None:
    guest, host = pulsar_job()
    fts.remote(sc.parallelize([(i, i * i) for i in range(50)], 2), "x", "0", [HOST], guest)
    [rdd] = fts.get(sc, "x", "0", [GUEST], host, timeout=60)
    assert sorted(rdd.collect()) == [(i, i * i) for i in range(50)]
    rdd.unpersist(blocking=True)  # as if the executors holding it were lost
    with pytest.raises(Exception, match="received only once"):
        rdd.count()


def test_lazy_get_receives_on_first_evaluation_only(sc: Any, pulsar_job: PulsarJob) -> None:
    guest, host = pulsar_job()
    data = [(i, str(i)) for i in range(30)]
    fts.remote(sc.parallelize(data, 3), "x", "0", [HOST], guest)
    [rdd] = fts.get(sc, "x", "0", [GUEST], host, timeout=3, storage_level=None, materialize=False)
    assert not rdd.is_cached
    assert sorted(rdd.collect()) == data
    with pytest.raises(Exception, match=r"TransferTimeout.*evaluated before"):
        rdd.count()  # the transfer was consumed by the first evaluation
    with pytest.raises(ft.ConfigError, match="storage_level"):
        fts.get(sc, "y", "0", [GUEST], host, storage_level=None)


def test_a_retried_get_waits_as_long_as_the_retry_says(sc: Any, pulsar_job: PulsarJob) -> None:
    """The retry reuses the failed call's RDD, whose tasks were made with its 2 s timeout."""
    guest, host = pulsar_job(redelivery_after=2.0)
    parts = [[(p * 100 + i, i) for i in range(5)] for p in range(2)]

    def flaky(p: int, it: Any) -> Iterator[tuple[int, int]]:
        if p == 1:
            raise ValueError("partition 1 cannot be computed")
        yield from parts[p]

    def send_late() -> None:  # from outside Spark: the get's waiting tasks hold both task slots
        time.sleep(8)
        for p, records in enumerate(parts):  # partition 0 may have gone out already: a duplicate is dropped
            with guest.connect(guest.task_session_options(guest.lane_base + p)) as fed:
                fed.remote(ft.Table([records]), "x", fts.partition_tag("0", p), [HOST])

    with pytest.raises(Exception, match="partition 1 cannot be computed"):
        fts.remote(sc.parallelize(range(2), 2).mapPartitionsWithIndex(flaky), "x", "0", [HOST], guest)
    with pytest.raises(ft.TransferTimeout):
        fts.get(sc, "x", "0", [GUEST], host, timeout=2)
    late = threading.Thread(target=send_late)
    late.start()
    try:
        [rdd] = fts.get(sc, "x", "0", [GUEST], host, timeout=60)
    finally:
        late.join()
    assert rdd.glom().collect() == parts


def test_failures_reach_the_driver_and_a_remote_can_be_retried(sc: Any, pulsar_job: PulsarJob) -> None:
    # A pulsar-lite dispatch stall is outlived by the watchdog in 2-4 s, well inside the 10 s gets.
    guest, host = pulsar_job(redelivery_after=2.0)
    with pytest.raises(ft.TransferTimeout, match="guest:9999"):
        fts.get(sc, "nothing", "0", [GUEST], host, timeout=1)

    def flaky(p: int, it: Any, fail: bool) -> Iterator[tuple[int, int]]:
        if fail and p == 2:
            raise ValueError("partition 2 cannot be computed")
        yield from ((p * 100 + i, i) for i in range(10))

    base = sc.parallelize(range(4), 4)
    with pytest.raises(Exception, match="partition 2 cannot be computed"):
        fts.remote(base.mapPartitionsWithIndex(lambda p, it: flaky(p, it, True)), "x", "0", [HOST], guest)
    # The head and partitions 0 and 1 went out; partition 2 did not, and partition 3 may not have:
    # its task runs beside 2's and Spark cancels it when the job aborts. The get names what is missing.
    with pytest.raises(ft.TransferTimeout, match=r"partition [23] of Spark transfer 'x'/'0' from guest:9999"):
        fts.get(sc, "x", "0", [GUEST], host, timeout=10)
    fixed = base.mapPartitionsWithIndex(lambda p, it: flaky(p, it, False))
    assert fts.remote(fixed, "x", "0", [HOST], guest).records == 40  # the same (name, tag) again
    # The get again: the partitions received the first time come from Spark's cache; the
    # others are received with this call's timeout, not the failed call's 10 s.
    [rdd] = fts.get(sc, "x", "0", [GUEST], host, timeout=60)
    assert rdd.glom().collect() == fixed.glom().collect()

    fts.remote(sc.emptyRDD(), "empty", "0", [HOST], guest)  # no partitions: just the head
    [empty] = fts.get(sc, "empty", "0", [GUEST], host, timeout=60)
    assert empty.getNumPartitions() == 0 and empty.collect() == []

    # A record that is not a (key, value) pair: refused by the sending executor, reported as such.
    with pytest.raises(ft.SerializationError):
        fts.remote(sc.parallelize([1, 2, 3], 1), "bad", "0", [HOST], guest)
