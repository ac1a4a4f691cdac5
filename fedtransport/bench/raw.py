"""The raw-client baselines: the broker's own Python client, sender and receiver in child processes.

What fedtransport is measured against: ``pulsar-client`` (a producer and a Shared consumer, with
``replication_clusters`` for geo-replication) and ``pika`` (publisher confirms, manual acks). Each
function is a process target of :func:`~fedtransport.bench.parties.run_pair`: it reports
``("ready",)`` once subscribed (receivers), then ``("start", t)`` or ``("end", t, bytes)``.
"""

from __future__ import annotations

import os
import time
from typing import Any


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
    start, cpu = time.time(), time.process_time()
    if cfg["sync"]:
        for _ in range(count):
            producer.send(payload, **extra)
    else:
        failed: list[Any] = []

        def sent(res: Any, _id: Any) -> None:
            if res != pulsar.Result.Ok:
                failed.append(res)
            done.release()

        for _ in range(count):
            producer.send_async(payload, sent, **extra)
        for _ in range(count):
            done.acquire()
        if failed:  # else the receiver would wait out its timeout for messages never stored
            raise RuntimeError(f"{len(failed)} of {count} sends failed, the first with {failed[0]}")
    q.put(("start", start, time.process_time() - cpu))
    client.close()


def _await_replicator(admin_url: str, topic: str, cluster: str, timeout: float = 120.0) -> None:
    """Before the clock: the broker replicates ``topic`` to ``cluster`` (a replicator starts at the
    topic's end when it is created, so a message sent before would never leave)."""
    from ..transport.pulsar.admin import PulsarAdmin

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
    cpu = time.process_time()
    nbytes = 0
    for _ in range(cfg["count"]):
        msg = consumer.receive(timeout_millis=600_000)
        nbytes += len(msg.data())
        consumer.acknowledge(msg)
    q.put(("end", time.time(), nbytes, time.process_time() - cpu))
    client.close()


def raw_rabbit_sender(cfg: dict[str, Any], q: Any) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(cfg["url"]))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(cfg["queue"], durable=True)
    payload = os.urandom(cfg["size"])
    props = pika.BasicProperties(delivery_mode=2)
    start, cpu = time.time(), time.process_time()
    for _ in range(cfg["count"]):  # pika's blocking channel waits for each confirm
        ch.basic_publish("", cfg["queue"], payload, props)
    q.put(("start", start, time.process_time() - cpu))
    conn.close()


def raw_rabbit_receiver(cfg: dict[str, Any], q: Any) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(cfg["url"]))
    ch = conn.channel()
    ch.queue_declare(cfg["queue"], durable=True)
    ch.basic_qos(prefetch_count=cfg.get("prefetch", 16))
    q.put(("ready",))
    cpu = time.process_time()
    nbytes = 0
    for i, (method, _props, body) in enumerate(ch.consume(cfg["queue"])):
        nbytes += len(body)
        assert method.delivery_tag is not None  # a message delivered by basic.consume carries its tag
        ch.basic_ack(method.delivery_tag)
        if i + 1 == cfg["count"]:
            break
    q.put(("end", time.time(), nbytes, time.process_time() - cpu))
    ch.cancel()
    ch.queue_delete(cfg["queue"])  # after the clock, as the fed workloads' cleanup
    conn.close()


def client_logger() -> Any:
    """pulsar-client's logger as the Pulsar backend sets it up (no abort at interpreter exit)."""
    from ..transport.pulsar.connection import client_logger

    return client_logger()
