"""PulsarStandalone: the real Apache Pulsar broker (standalone mode) as a child JVM on loopback.

Two brokers per run: the session-wide plain one (``pulsar_standalone`` from conftest) and one
with TLS and token authentication for this module. Missing Java, Maven or Maven Central makes
these tests error, never skip.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pulsar
import pytest

from fedtransport import certs
from fedtransport.brokers import PulsarStandalone as LazyExport
from fedtransport.brokers.standalone import (
    APT_HINT,
    PULSAR_VERSION,
    PulsarStandalone,
    hs256_token,
    pulsar_cache_root,
    resolve_pulsar,
)
from fedtransport.brokers.standalone_config import (
    BUDGET_KEYS,
    DEFAULT_MAX_MESSAGE_SIZE,
    broker_config,
    direct_memory_budget,
    journal_buffers,
)
from fedtransport.errors import BackendError, ConfigError

try:
    from tests.party_proc import pid_gone
    from tests.standalone_fixtures import socket_addresses, unique_topic
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from party_proc import pid_gone  # type: ignore[no-redef]
    from standalone_fixtures import socket_addresses, unique_topic  # type: ignore[no-redef]

# The session fixture may resolve the jars with Maven first (~35 s cold) before a 5-10 s start.
pytestmark = pytest.mark.timeout(900)

_quiet = logging.getLogger("test-broker-standalone-client")
_quiet.setLevel(logging.ERROR)
SECRET = secrets.token_bytes(32)


def _client(url: str, **kwargs: object) -> pulsar.Client:
    kwargs.setdefault("operation_timeout_seconds", 15)
    return pulsar.Client(url, logger=_quiet, **kwargs)


def _round_trip(client: pulsar.Client, payload: bytes) -> bytes:
    topic = unique_topic("rt")
    consumer = client.subscribe(topic, "sub", receiver_queue_size=1)
    producer = client.create_producer(topic, batching_enabled=False)
    producer.send(payload)
    msg = consumer.receive(timeout_millis=15_000)
    consumer.acknowledge(msg)
    return msg.data()


def _get(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> tuple[int, object]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=15, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, None


# ---------------------------------------------------------------------------- plain broker
def test_round_trip(pulsar_standalone: PulsarStandalone) -> None:
    p = pulsar_standalone
    assert p.running and p.version == PULSAR_VERSION and p.cluster == "standalone"
    assert p.host == "127.0.0.1"
    assert p.service_url == f"pulsar://127.0.0.1:{p.port}"
    assert p.admin_url == f"http://127.0.0.1:{p.web_port}"
    assert p.admin_token is None and not p.tls and p.ca_path is None
    client = _client(p.service_url)  # anonymous: no authentication configured
    try:
        assert _round_trip(client, b"hello federation") == b"hello federation"
    finally:
        client.close()


def test_admin_rest_lists_cluster_and_default_namespace(pulsar_standalone: PulsarStandalone) -> None:
    p = pulsar_standalone
    assert _get(f"{p.admin_url}/admin/v2/clusters") == (200, ["standalone"])
    status, namespaces = _get(f"{p.admin_url}/admin/v2/namespaces/public")
    assert status == 200 and isinstance(namespaces, list) and "public/default" in namespaces
    cluster = p.admin("GET", "/admin/v2/clusters/standalone")
    assert cluster["brokerServiceUrl"] == p.service_url


def test_listens_on_loopback_only(pulsar_standalone: PulsarStandalone) -> None:
    p = pulsar_standalone
    client = _client(p.service_url)  # traffic first: the broker's internal client opens sockets lazily
    try:
        _round_trip(client, b"x")
    finally:
        client.close()
    assert p.pid is not None
    sockets = socket_addresses(p.pid)
    assert sorted(port for _, port in sockets["tcp"]) == sorted(p.ports.values()), sockets
    assert set(p.ports) == {"broker", "web", "bookie"}
    assert all(addr == "127.0.0.1" for addr, _ in sockets["tcp"]), sockets
    assert all(addr == "127.0.0.1" for addr, _ in sockets["udp"]), sockets
    assert p.config_path is not None
    conf = p.config_path.read_text()
    assert "bindAddress=127.0.0.1" in conf and "advertisedAddress=127.0.0.1" in conf
    rss = p.rss_bytes
    assert rss is not None and 100 * 2**20 < rss < 2 * 2**30


def test_kill_and_restart_keep_unacknowledged_message(pulsar_standalone: PulsarStandalone) -> None:
    p = pulsar_standalone
    ports, run_dir = p.ports, p.run_dir
    topic = unique_topic("crash")
    client = _client(p.service_url)
    try:
        client.subscribe(topic, "durable", receiver_queue_size=1).close()  # creates the subscription
        client.create_producer(topic, batching_enabled=False).send(b"before the crash")
    finally:
        client.close()
    old_pid = p.pid
    assert old_pid is not None
    p.kill()
    assert not p.running and pid_gone(old_pid)
    p.restart()
    assert p.running and p.pid != old_pid and p.ports == ports and p.run_dir == run_dir
    client = _client(p.service_url)
    try:
        consumer = client.subscribe(topic, "durable", receiver_queue_size=1)
        msg = consumer.receive(timeout_millis=30_000)
        assert msg.data() == b"before the crash"
        consumer.acknowledge(msg)
    finally:
        client.close()
    # A graceful restart of a running broker keeps ports and data the same way.
    p.restart()
    assert p.running and p.ports == ports
    assert _get(f"{p.admin_url}/admin/v2/clusters") == (200, ["standalone"])


def test_jar_cache_is_marked_complete(pulsar_standalone: PulsarStandalone) -> None:
    lib = pulsar_standalone.lib_dir
    assert lib is not None and lib == pulsar_cache_root() / PULSAR_VERSION / "lib"
    assert not lib.is_relative_to(Path(__file__).resolve().parents[1])  # outside the repository
    manifest = json.loads((lib.parent / "COMPLETE").read_text())
    assert manifest["pulsar_version"] == PULSAR_VERSION and manifest["jars"] > 100
    assert (lib / f"pulsar-broker-{PULSAR_VERSION}.jar").is_file()
    started = time.monotonic()
    assert resolve_pulsar() == lib  # cached: no Maven run
    assert time.monotonic() - started < 2


# ---------------------------------------------------------------------------- TLS + token broker
@pytest.fixture(scope="module")
def secure_standalone() -> Iterator[PulsarStandalone]:
    with PulsarStandalone(cluster="secure", tls=True, token_secret=SECRET) as broker:
        yield broker


def test_tls_client_with_ca_and_hostname_validation(secure_standalone: PulsarStandalone) -> None:
    p = secure_standalone
    assert p.tls and p.ca_path is not None and p.ca_path.is_file()
    assert p.service_url_tls == f"pulsar+ssl://127.0.0.1:{p.tls_port}"
    assert p.admin_url_tls == f"https://127.0.0.1:{p.web_tls_port}"
    client = _client(
        p.service_url_tls,
        authentication=pulsar.AuthenticationToken(p.admin_token),
        tls_trust_certs_file_path=p.tls_trust_certs_file_path,
        tls_validate_hostname=True,
        tls_allow_insecure_connection=False,
    )
    try:
        assert _round_trip(client, b"over tls") == b"over tls"
    finally:
        client.close()
    trusted = ssl.create_default_context(cafile=str(p.ca_path))  # checks the 127.0.0.1 IP SAN
    assert _get(f"{p.admin_url_tls}/admin/v2/clusters", p.admin_token, trusted) == (200, ["secure"])
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"{p.admin_url_tls}/admin/v2/clusters", timeout=15, context=ssl.create_default_context())
    assert p.pid is not None
    sockets = socket_addresses(p.pid)
    assert sorted(port for _, port in sockets["tcp"]) == sorted(p.ports.values())
    assert set(p.ports) == {"broker", "web", "bookie", "broker_tls", "web_tls"}
    assert all(addr == "127.0.0.1" for kind in ("tcp", "udp") for addr, _ in sockets[kind]), sockets


def test_token_on_the_data_plane(secure_standalone: PulsarStandalone) -> None:
    p = secure_standalone
    client = _client(p.service_url, authentication=pulsar.AuthenticationToken(p.token()))
    try:
        assert _round_trip(client, b"authenticated") == b"authenticated"
    finally:
        client.close()
    wrong = hs256_token(secrets.token_bytes(32), p.superuser)  # right role, other secret
    for auth in ({}, {"authentication": pulsar.AuthenticationToken(wrong)}):
        client = _client(p.service_url, operation_timeout_seconds=5, **auth)
        try:
            with pytest.raises(pulsar.PulsarException):
                client.create_producer(unique_topic("refused"))
        finally:
            client.close()


def test_token_on_the_admin_rest(secure_standalone: PulsarStandalone) -> None:
    p = secure_standalone
    tenants = f"{p.admin_url}/admin/v2/tenants"  # superuser only
    status, body = _get(tenants, p.admin_token)
    assert status == 200 and isinstance(body, list) and "public" in body
    assert _get(tenants)[0] == 401
    assert _get(tenants, hs256_token(secrets.token_bytes(32), p.superuser))[0] == 401
    assert _get(tenants, "not.a.token")[0] == 401
    assert _get(tenants, p.token("someone-else"))[0] in (401, 403)  # authenticated, not authorized
    assert p.admin("GET", "/admin/v2/clusters") == ["secure"]
    assert f"superUserRoles={p.superuser}" in (p.config_path or Path("/nonexistent")).read_text()


def test_stop_leaves_no_process_and_no_run_dir(secure_standalone: PulsarStandalone) -> None:
    # Runs last in this module: it stops the module's broker (the fixture's stop is idempotent).
    p = secure_standalone
    pid, run_dir = p.pid, p.run_dir
    assert pid is not None and run_dir is not None and (run_dir / "data").is_dir()
    p.stop()
    assert pid_gone(pid) and not run_dir.exists()
    assert not p.running and p.pid is None and p.run_dir is None
    p.stop()  # idempotent


# ---------------------------------------------------------------------------- no broker needed
def test_hs256_token_is_a_jwt_signed_with_the_secret() -> None:
    token = hs256_token(SECRET, "party-9999", expires_in=60)
    header, payload, signature = token.split(".")

    def decode(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    assert json.loads(decode(header))["alg"] == "HS256"
    claims = json.loads(decode(payload))
    assert claims["sub"] == "party-9999" and claims["exp"] > time.time()
    expected = hmac.new(SECRET, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert hmac.compare_digest(decode(signature), expected)
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        PulsarStandalone(token_secret=b"short")
    with pytest.raises(ConfigError, match="needs token_secret"):
        PulsarStandalone().token()
    assert LazyExport is PulsarStandalone


def test_missing_java_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no java (and no mvn) on PATH
    monkeypatch.delenv("JAVA_HOME", raising=False)
    broker = PulsarStandalone()
    with pytest.raises(BackendError, match="needs Java 17") as info:
        broker.start()
    assert APT_HINT in str(info.value) and APT_HINT == "apt-get install maven openjdk-17-jre-headless"
    assert not broker.running and broker.run_dir is None


def test_missing_maven_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real_java = shutil.which("java")
    assert real_java, "java must be installed for these tests"
    (bin_dir / "java").symlink_to(real_java)  # java is there, mvn is not
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.delenv("MAVEN_HOME", raising=False)
    monkeypatch.delenv("M2_HOME", raising=False)
    monkeypatch.setenv("FEDTRANSPORT_PULSAR_CACHE", str(tmp_path / "empty-cache"))  # nothing resolved yet
    broker = PulsarStandalone()
    with pytest.raises(BackendError, match="mvn is not on PATH") as info:
        broker.start()
    assert APT_HINT in str(info.value)
    assert not broker.running and broker.run_dir is None


def test_startup_failure_raises_with_the_log_tail() -> None:
    # The broker port is taken: the JVM exits, and the error shows why.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = PulsarStandalone(config={"brokerServicePort": port}, startup_timeout=120)
        with pytest.raises(BackendError) as info:
            broker.start()
    text = str(info.value)
    assert "exited before it was ready" in text and "last lines of" in text
    assert "Address already in use" in text or "BindException" in text, text
    assert not broker.running and broker.run_dir is None


def test_tls_accepts_files_made_by_fedtransport_certs(tmp_path: Path) -> None:
    star = certs.make_star(tmp_path / "certs", "fate.test", ["9999"], extra_sans={"9999": ["127.0.0.1"]})
    party = star.parties["9999"]
    for tls in (
        {"cert": party.cert, "key": party.key, "ca": star.ca_cert},
        {"certfile": str(party.cert), "keyfile": str(party.key), "cacertfile": str(star.ca_cert)},
    ):
        broker = PulsarStandalone(tls=tls)
        assert broker.tls and not broker.running  # nothing starts before start()
    with pytest.raises(ConfigError, match="does not exist"):
        PulsarStandalone(tls={"cert": party.cert, "key": party.key, "ca": tmp_path / "missing.pem"})
    with pytest.raises(ConfigError, match="needs one of"):
        PulsarStandalone(tls={"cert": party.cert, "key": party.key})
    with pytest.raises(ConfigError, match="must be True, a mapping"):
        PulsarStandalone(tls=party)  # CertPaths carries no CA: pass a mapping with the star's CA


# ---------------------------------------------------------------------------- the bookie's write cache
def _conf(**kw: Any) -> dict[str, str]:
    return broker_config(cluster="c", run_dir=Path("/nonexistent"), ports={"broker": 1, "web": 2},
                         tls_paths=None, secret=None, superuser="su", **kw)  # fmt: skip


def test_broker_and_bookie_caches_take_at_most_half_the_direct_memory() -> None:
    """Broker and bookie share one JVM; each one's defaults assume it owns it (with a 128 MiB
    write cache at 512m a benchmark run peaked at 434 MiB). The launcher's caches take at most
    half, the write cache still 128 MiB at the default 1g (16 MiB made 7 of 100 tables of 256 MiB
    stall 3-9 s) and never less than two whole entries per half: a larger entry is never written."""
    conf = _conf(extra={})  # the launcher's default: 1g
    assert {k: conf[k] for k in BUDGET_KEYS} == {"dbStorage_writeCacheMaxSizeMb": "128",
                                                 "managedLedgerCacheSizeMB": "128",
                                                 "maxMessagePublishBufferSizeInMB": "256"}  # fmt: skip
    assert PulsarStandalone()._direct_memory == "1g"
    assert direct_memory_budget("1048576k", DEFAULT_MAX_MESSAGE_SIZE)["dbStorage_writeCacheMaxSizeMb"] == 128
    big = 30 * 2**20  # entries of 31 MiB: four of them fit in an eighth of 1g, not of 512m
    for size in (64 * 1024, DEFAULT_MAX_MESSAGE_SIZE, big):
        for direct, mib in (("512m", 512), ("1g", 1024), ("2g", 2048)):
            if (size, direct) == (big, "512m"):
                continue  # refused below
            budget = direct_memory_budget(direct, size)
            assert sum(budget.values()) <= mib // 2
            assert budget["dbStorage_writeCacheMaxSizeMb"] * 2**20 // 2 >= 2 * (size + 2**16)  # per half
            assert budget["maxMessagePublishBufferSizeInMB"] * 2**20 >= size
    with pytest.raises(ConfigError, match="direct_memory 128m is too small"):  # refused at construction
        PulsarStandalone(direct_memory="128m")
    with pytest.raises(ConfigError, match="direct_memory 512m is too small for entries of 31 MiB"):
        PulsarStandalone(direct_memory="512m", config={"maxMessageSize": big})
    PulsarStandalone(direct_memory="32m", config={"dbStorage_writeCacheMaxSizeMb": 8})  # the caller's own size
    own = _conf(extra={"dbStorage_writeCacheMaxSizeMb": 8}, direct_memory="32m")
    assert own["dbStorage_writeCacheMaxSizeMb"] == "8" and own["managedLedgerCacheSizeMB"] == "4"


def test_the_bookie_frees_the_disk_a_deleted_topic_held(pulsar_standalone: PulsarStandalone) -> None:
    """With BookKeeper's defaults (entry logs of 1 GiB, garbage collection every 10 minutes) one
    benchmark run left 4.9 GB on disk, and on a fuller CI disk the bookie turned read-only mid-run.
    Here 320 MiB go through a topic that is then deleted: its entry logs go within seconds."""
    assert pulsar_standalone.data_dir is not None
    logs = pulsar_standalone.data_dir / "bookkeeper" / "current"

    def entry_log_mib() -> float:
        return sum(f.stat().st_size for f in logs.glob("*.log") if f.exists()) / 2**20

    name = f"disk-{time.time_ns()}"
    client = _client(pulsar_standalone.service_url)
    try:
        producer = client.create_producer(f"persistent://public/default/{name}", batching_enabled=False)
        chunk = secrets.token_bytes(4 * 2**20)
        for _ in range(80):
            producer.send(chunk)
        producer.close()
    finally:
        client.close()
    assert entry_log_mib() >= 256, "the topic's bytes are in the entry logs"
    pulsar_standalone.admin("DELETE", f"/admin/v2/persistent/public/default/{name}", timeout=60)
    # What came after the first log filled (64 MiB) stays in the log being written, never collected.
    deadline = time.monotonic() + 60
    while entry_log_mib() > 100 and time.monotonic() < deadline:
        time.sleep(0.5)  # the bookie's garbage collector runs on its own clock
    assert entry_log_mib() <= 100, f"{entry_log_mib():.0f} MiB of entry logs left after the delete"


# ---------------------------------------------------------------------------- crash safety
def test_journal_buffer_holds_a_whole_entry_of_the_largest_message() -> None:
    """The journal flushes after ``threshold`` bytes of entries, so a buffer of threshold plus
    a whole entry never has to write one entry in two pieces (see journal_buffers)."""
    for size in (64 * 1024, DEFAULT_MAX_MESSAGE_SIZE, 100 * 2**20):
        keys = journal_buffers(size)
        assert keys["journalWriteBufferSizeKB"] * 1024 >= keys["journalBufferedWritesThreshold"] + size + 2**16
    conf = broker_config(cluster="c", run_dir=Path("/nonexistent"), ports={"broker": 1, "web": 2},
                         tls_paths=None, secret=None, superuser="su",
                         extra={"maxMessageSize": 20 * 2**20})  # fmt: skip
    assert int(conf["journalWriteBufferSizeKB"]) * 1024 >= 20 * 2**20 + int(conf["journalBufferedWritesThreshold"])
    with pytest.raises(ConfigError, match="maxMessageSize"):
        broker_config(cluster="c", run_dir=Path("/nonexistent"), ports={"broker": 1, "web": 2},
                      tls_paths=None, secret=None, superuser="su", extra={"maxMessageSize": "big"})  # fmt: skip
    for option in ("heap", "initial_heap", "direct_memory"):  # the JVM would refuse it only at start
        with pytest.raises(ConfigError, match=f"{option} 9999999999999g is more than this machine's memory"):
            PulsarStandalone(**{option: "9999999999999g"})
    for bad in (-5, 0, "1.5", True):  # refused when the launcher is made, not when the broker refuses sends
        with pytest.raises(ConfigError, match="maxMessageSize must be a positive int"):
            PulsarStandalone(config={"maxMessageSize": bad})
