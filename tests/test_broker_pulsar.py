"""EmbeddedPulsar: the pulsar-lite broker launched as a child process on loopback ports."""

from __future__ import annotations

import logging
import os
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from party_proc import pid_gone, socket_addresses

from fedtransport.brokers import pulsar as pulsar_broker
from fedtransport.brokers.pulsar import EmbeddedPulsar, find_pulsar_lite_binary, shared_embedded_pulsar
from fedtransport.errors import BackendError

pulsar = pytest.importorskip("pulsar")

_quiet = logging.getLogger("test-broker-pulsar-client")
_quiet.setLevel(logging.ERROR)


def _client(url: str) -> pulsar.Client:
    return pulsar.Client(url, logger=_quiet, operation_timeout_seconds=10)


def _topic() -> str:
    return f"persistent://public/default/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def broker() -> Iterator[EmbeddedPulsar]:
    with EmbeddedPulsar() as b:
        yield b


def test_round_trip(broker: EmbeddedPulsar) -> None:
    assert broker.running
    assert broker.service_url == f"pulsar://127.0.0.1:{broker.port}"
    assert broker.host == "127.0.0.1"
    topic = _topic()
    client = _client(broker.service_url)
    try:
        consumer = client.subscribe(topic, "sub", receiver_queue_size=1)
        producer = client.create_producer(topic, batching_enabled=False)
        producer.send(b"hello federation")
        msg = consumer.receive(timeout_millis=10_000)
        assert msg.data() == b"hello federation"
        consumer.acknowledge(msg)
    finally:
        client.close()


def test_listens_on_loopback_only_and_serves_metrics(broker: EmbeddedPulsar) -> None:
    assert broker.pid is not None and broker.metrics_port is not None
    sockets = socket_addresses(broker.pid)["tcp"]
    assert sorted(port for _, port in sockets) == sorted([broker.port, broker.metrics_port])
    assert all(addr == "127.0.0.1" for addr, _ in sockets), sockets
    assert broker.metrics_url == f"http://127.0.0.1:{broker.metrics_port}/metrics"
    with urllib.request.urlopen(broker.metrics_url, timeout=5) as resp:
        assert b"pulsar_" in resp.read()
    assert broker.config_path is not None
    assert f'addr = "127.0.0.1:{broker.metrics_port}"' in broker.config_path.read_text()


def test_metrics_disabled_still_binds_nothing_public() -> None:
    with EmbeddedPulsar(metrics=False) as b:
        assert b.metrics_url is None
        assert b.pid is not None
        assert socket_addresses(b.pid)["tcp"] == [("127.0.0.1", b.port)]
        assert b.config_path is not None
        text = b.config_path.read_text()
        assert "enabled = false" in text and 'addr = "127.0.0.1:' in text


def test_stop_removes_temp_dirs_and_process() -> None:
    b = EmbeddedPulsar().start()
    try:
        pid, data_dir, run_dir, log = b.pid, b.data_dir, b.run_dir, b.log_path
        assert pid is not None and data_dir is not None and run_dir is not None and log is not None
        assert (data_dir / "pulsar-lite.rocksdb").is_dir() and log.is_file()
    finally:
        b.stop()
    assert pid_gone(pid)
    assert not data_dir.exists() and not run_dir.exists()
    assert not b.running and b.pid is None
    b.stop()  # idempotent


def test_given_data_dir_is_kept(tmp_path: Path) -> None:
    db = tmp_path / "broker-db"
    with EmbeddedPulsar(data_dir=db) as b:
        assert b.data_dir == db.resolve()
        run_dir = b.run_dir
    assert (db / "pulsar-lite.rocksdb" / "CURRENT").is_file()
    assert run_dir is not None and not run_dir.exists()


def test_kill_and_restart_keep_port_and_data(tmp_path: Path) -> None:
    topic = _topic()
    with EmbeddedPulsar(data_dir=tmp_path / "db") as b:
        port = b.port
        client = _client(b.service_url)
        try:
            client.subscribe(topic, "durable", receiver_queue_size=1).close()  # creates the subscription
            producer = client.create_producer(topic, batching_enabled=False)
            producer.send(b"before the crash")
        finally:
            client.close()
        old_pid = b.pid
        assert old_pid is not None
        b.kill()
        assert not b.running and pid_gone(old_pid)
        b.restart()
        assert b.running and b.port == port and b.pid != old_pid
        client = _client(b.service_url)
        try:
            consumer = client.subscribe(topic, "durable", receiver_queue_size=1)
            msg = consumer.receive(timeout_millis=10_000)
            assert msg.data() == b"before the crash"
            consumer.acknowledge(msg)
        finally:
            client.close()
        # A graceful restart of a running broker works the same way.
        b.restart()
        assert b.running and b.port == port


def test_startup_failure_shows_the_log() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        b = EmbeddedPulsar(port=port, startup_timeout=10)
        with pytest.raises(BackendError) as info:
            b.start()
    text = str(info.value)
    assert "exited before it was ready" in text
    assert "last lines of" in text and "Address already in use" in text
    assert not b.running and b.run_dir is None  # nothing left behind


def test_missing_binary_says_how_to_install() -> None:
    with pytest.raises(BackendError, match="pip install pulsar-lite"):
        EmbeddedPulsar(binary="/nonexistent/pulsar-lite").start()
    binary = find_pulsar_lite_binary()
    assert binary.name == "pulsar-lite" and os.access(binary, os.X_OK)


def test_shared_instance_is_reused_and_revived(monkeypatch: pytest.MonkeyPatch) -> None:
    # Isolated from a shared broker other test modules may be using.
    monkeypatch.setattr(pulsar_broker, "_shared", None)
    first = shared_embedded_pulsar()
    try:
        assert shared_embedded_pulsar() is first and first.running
        port = first.port
        first.kill()
        again = shared_embedded_pulsar()
        assert again is first and again.running and again.port == port
    finally:
        first.stop()
