"""What the standalone Pulsar broker is told, and the checks of what the caller asks for.

The launcher (:class:`~fedtransport.brokers.standalone.PulsarStandalone`) owns the process; this
module holds the text it writes and the words it passes:

- :func:`broker_config`: the ``standalone.conf`` keys (BookKeeper reads the same file for the
  bookie): every listener on 127.0.0.1, one bookie, no load balancer, websocket service,
  functions worker or bookie HTTP server; a bookie journal that a crash never tears
  (:func:`journal_buffers`), caches that share the direct memory (:func:`direct_memory_budget`),
  a disk footprint kept small (:data:`DISK_BOUNDS`); TLS and token authentication when asked
  for; the caller's extra keys last. :func:`write_run_files` writes it with ``log4j2.xml``.
- :func:`jvm_command`: the ``java`` command line of ``PulsarStandaloneStarter`` (heap, direct
  memory, the module openings Pulsar's own ``bin/pulsar`` passes, the RocksDB metadata store).
- :func:`hs256_token`: the JWTs ``AuthenticationProviderToken`` verifies; :func:`secret_bytes`,
  :func:`tls_files` and :func:`check_options` refuse what the broker would refuse later, at
  construction, with a :class:`~fedtransport.errors.ConfigError` that names the option.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ._process import LOOPBACK

__all__ = [
    "BUDGET_KEYS",
    "DISK_BOUNDS",
    "LOG_LEVELS",
    "MAIN_CLASS",
    "broker_config",
    "check_options",
    "config_value",
    "direct_memory_budget",
    "hs256_token",
    "journal_buffers",
    "jvm_command",
    "jvm_environment",
    "loopback_interface",
    "make_tls_files",
    "physical_mebibytes",
    "secret_bytes",
    "tls_files",
    "write_run_files",
]

MAIN_CLASS = "org.apache.pulsar.PulsarStandaloneStarter"
LOG_LEVELS = ("error", "warn", "info", "debug", "trace")
_CLUSTER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MEMORY_RE = re.compile(r"[1-9][0-9]*[kKmMgG]?")
_CONFIG_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.]*")
_MIN_SECRET = 32  # bytes: jjwt's Keys.hmacShaKeyFor refuses shorter HS256 keys
_IFF_LOOPBACK = 0x8

# Java 17 module openings Pulsar's own bin/pulsar passes (BookKeeper's fadvise and CRC32, Netty's
# direct buffers, DNS and GC metrics).
_ADD_OPENS = (
    "java.base/java.io",
    "java.base/java.util.zip",
    "java.base/java.nio",
    "java.base/jdk.internal.misc",
    "java.base/sun.net",
    "java.management/sun.management",
)


# ---------------------------------------------------------------------------- tokens
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hs256_token(secret: bytes, subject: str, *, expires_in: float | None = None) -> str:
    """A JWT signed with HMAC-SHA256, as Pulsar's ``AuthenticationProviderToken`` verifies it
    (the role is the ``sub`` claim); ``expires_in`` seconds -> an ``exp`` claim."""
    if not isinstance(subject, str) or not subject:
        raise ConfigError(f"token subject must be a non-empty str, got {subject!r}")
    claims: dict[str, Any] = {"sub": subject}
    if expires_in is not None:
        claims["exp"] = int(time.time() + expires_in)
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode("ascii"), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def secret_bytes(token_secret: bytes | str | None) -> bytes | None:
    if token_secret is None:
        return None
    if isinstance(token_secret, str):
        secret = token_secret.encode("utf-8")
    elif isinstance(token_secret, (bytes, bytearray)):
        secret = bytes(token_secret)
    else:
        raise ConfigError(f"PulsarStandalone token_secret must be bytes or str, got {type(token_secret).__name__}")
    if len(secret) < _MIN_SECRET:
        raise ConfigError(
            f"PulsarStandalone token_secret must be at least {_MIN_SECRET} bytes (HS256), got {len(secret)}: "
            "try secrets.token_bytes(32)"
        )
    return secret


# ---------------------------------------------------------------------------- TLS inputs
def tls_files(tls: object) -> tuple[Path, Path, Path] | None:
    """(cert, key, ca) from a mapping or an object; ``None`` when TLS files are to be made."""
    if isinstance(tls, Mapping):

        def pick(*names: str) -> object:
            for name in names:
                if tls.get(name) is not None:
                    return tls[name]
            raise ConfigError(f"PulsarStandalone tls mapping needs one of {names}; it has {sorted(tls)}")

        raw = (pick("cert", "certfile"), pick("key", "keyfile"), pick("ca", "cacertfile", "ca_cert"))
    else:
        ca = getattr(tls, "ca", None) or getattr(tls, "ca_cert", None)
        cert, key = getattr(tls, "cert", None), getattr(tls, "key", None)
        if cert is None or key is None or ca is None:
            raise ConfigError(
                "PulsarStandalone tls must be True, a mapping {cert, key, ca} or an object with cert, key and "
                f"ca (or ca_cert) paths; got {type(tls).__name__}"
            )
        raw = (cert, key, ca)
    paths = []
    for item in raw:
        if not isinstance(item, (str, os.PathLike)):
            raise ConfigError(f"PulsarStandalone tls paths must be str or path-like, got {item!r}")
        path = Path(item).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"PulsarStandalone tls file {path} does not exist")
        paths.append(path)
    return paths[0], paths[1], paths[2]


def make_tls_files(tls_dir: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 and localhost in ``tls_dir`` (made
    here): the (cert, key, ca) files, the key in PKCS#8 as the broker reads it."""
    from .. import certs  # imported here: cryptography is only needed when TLS is on

    tls_dir.mkdir()
    ca_key, ca_cert = certs.make_ca("fedtransport standalone CA")
    key, cert = certs.issue(ca_key, ca_cert, LOOPBACK, extra_sans=["localhost"])
    return (
        certs.write_cert(tls_dir / "broker.cert.pem", cert),
        certs.write_key(tls_dir / "broker.key-pk8.pem", key),
        certs.write_cert(tls_dir / "ca.cert.pem", ca_cert),
    )


def loopback_interface() -> str:
    """Name of the loopback interface the bookie binds to (Linux sysfs; ``lo`` otherwise)."""
    net = Path("/sys/class/net")
    with contextlib.suppress(OSError, ValueError):
        for iface in sorted(net.iterdir()):
            if int((iface / "flags").read_text().strip(), 16) & _IFF_LOOPBACK:
                return iface.name
    return "lo"


def config_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ConfigError(f"PulsarStandalone config values must be one line, got {text!r}")
    return text


# ---------------------------------------------------------------------------- checks and files
def check_options(
    *,
    cluster: str,
    superuser: str,
    heap: str,
    initial_heap: str,
    direct_memory: str,
    log_level: str,
    startup_timeout: float,
    stop_timeout: float,
    resolve_timeout: float,
    config: Mapping[str, object] | None,
) -> dict[str, object]:
    """Refuse what the broker would refuse (or misread) later; the extra ``standalone.conf`` keys."""
    if not isinstance(cluster, str) or not _CLUSTER_RE.fullmatch(cluster):
        raise ConfigError(f"PulsarStandalone cluster must be 1-64 letters, digits or _.- , got {cluster!r}")
    if not isinstance(superuser, str) or not superuser or any(c in superuser for c in ",\n\r "):
        raise ConfigError(f"PulsarStandalone superuser must be a role name without ',' or spaces, got {superuser!r}")
    for name, value in (("heap", heap), ("initial_heap", initial_heap), ("direct_memory", direct_memory)):
        if not isinstance(value, str) or not _MEMORY_RE.fullmatch(value):
            raise ConfigError(f"PulsarStandalone {name} must look like '512m' or '1g', got {value!r}")
        if _mebibytes(value) > physical_mebibytes():  # else the JVM alone says so, at start
            raise ConfigError(f"PulsarStandalone {name} {value} is more than this machine's memory "
                              f"({physical_mebibytes()} MiB)")  # fmt: skip
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"PulsarStandalone log_level must be one of {LOG_LEVELS}, got {log_level!r}")
    for name, seconds in (("startup_timeout", startup_timeout), ("stop_timeout", stop_timeout),
                          ("resolve_timeout", resolve_timeout)):  # fmt: skip
        if seconds <= 0:
            raise ConfigError(f"PulsarStandalone {name} must be positive, got {seconds}")
    extra = dict(config or {})
    for key, setting in extra.items():
        if not isinstance(key, str) or not _CONFIG_KEY_RE.fullmatch(key):
            raise ConfigError(f"PulsarStandalone config key {key!r} is not a standalone.conf key")
        config_value(setting)
    max_message_size = _max_message_size(extra)  # not a positive int: refused now
    if not BUDGET_KEYS & extra.keys():  # a caller who sizes any of them takes the budget over
        direct_memory_budget(direct_memory, max_message_size)  # too little: refused now
    return extra


def broker_config(
    *,
    cluster: str,
    run_dir: Path,
    ports: Mapping[str, int],
    tls_paths: tuple[Path, Path, Path] | None,
    secret: bytes | None,
    superuser: str,
    extra: Mapping[str, object],
    direct_memory: str = "1g",
) -> dict[str, str]:
    """The ``standalone.conf`` keys and values of a broker on ``ports`` (by role, as the launcher
    names them); ``tls_paths`` (cert, key, ca) turns TLS on, ``secret`` token authentication;
    ``direct_memory`` is the JVM's ``-XX:MaxDirectMemorySize`` (broker and bookie share it:
    :func:`direct_memory_budget`)."""
    max_message_size = _max_message_size(extra)
    conf: dict[str, object] = {
        "clusterName": cluster,
        "bindAddress": LOOPBACK,
        "advertisedAddress": LOOPBACK,  # the bookie reads this key too
        "brokerServicePort": ports["broker"],
        "webServicePort": ports["web"],
        "managedLedgerDefaultEnsembleSize": 1,
        "managedLedgerDefaultWriteQuorum": 1,
        "managedLedgerDefaultAckQuorum": 1,
        "loadManagerClassName": "org.apache.pulsar.broker.loadbalance.NoopLoadManager",
        "loadBalancerEnabled": False,
        "webSocketServiceEnabled": False,
        "functionsWorkerEnabled": False,
        "transactionCoordinatorEnabled": False,
        "allowAutoTopicCreation": True,
        "allowAutoTopicCreationType": "non-partitioned",
        "statusFilePath": "",
        "narExtractionDirectory": run_dir / "tmp",
        "authenticationEnabled": False,
        "authorizationEnabled": False,
        # The broker's internal client (system topics) otherwise binds its DNS resolver's UDP
        # socket to 0.0.0.0; every address it looks up here is a loopback IP anyway.
        "brokerClient_dnsLookupBindAddress": LOOPBACK,
        # BookKeeper reads the same file for the bookie:
        "listeningInterface": loopback_interface(),  # bind the bookie to loopback, not 0.0.0.0
        "allowLoopback": True,
        "allowEphemeralPorts": True,  # else BKCluster ignores --bookkeeper-port and picks a port
        "httpServerEnabled": False,
        "ledgerStorageClass": "org.apache.bookkeeper.bookie.storage.ldb.DbLedgerStorage",
        "dbStorage_readAheadCacheMaxSizeMb": 16,
        "dbStorage_rocksDB_blockCacheSize": 16 * 1024 * 1024,
        "journalSyncData": False,  # a process crash keeps the page cache; fsync buys nothing here
        "journalMaxGroupWaitMSec": 1,
        # A SIGKILL must never tear a journal entry (see journal_buffers).
        **journal_buffers(max_message_size),
        "diskUsageThreshold": 0.999,  # CI disks run full; a read-only bookie refuses writes
        "diskUsageWarnThreshold": 0.99,
        **DISK_BOUNDS,
        **direct_memory_budget(direct_memory, max_message_size, checked=False),
    }
    if tls_paths is not None:
        cert, key, ca = tls_paths
        conf.update(
            {
                "brokerServicePortTls": ports["broker_tls"],
                "webServicePortTls": ports["web_tls"],
                "tlsCertificateFilePath": cert,
                "tlsKeyFilePath": key,
                "tlsTrustCertsFilePath": ca,
                "tlsRequireTrustedClientCertOnConnect": False,
                "tlsAllowInsecureConnection": False,
                # The internal client keeps the plain ports, but trusts the CA if told to use TLS.
                "brokerClientTrustCertsFilePath": ca,
            }
        )
    if secret is not None:
        conf.update(
            {
                "authenticationEnabled": True,
                "authenticationProviders": "org.apache.pulsar.broker.authentication.AuthenticationProviderToken",
                "tokenSecretKey": "data:;base64," + base64.b64encode(secret).decode("ascii"),
                "authorizationEnabled": True,
                "superUserRoles": superuser,
                "brokerClientAuthenticationPlugin": "org.apache.pulsar.client.impl.auth.AuthenticationToken",
                "brokerClientAuthenticationParameters": f"token:{hs256_token(secret, superuser)}",
            }
        )
    conf.update(extra)
    return {key: config_value(value) for key, value in conf.items()}


# The broker's own default maxMessageSize (5 MiB); an entry is at most that plus its headers.
DEFAULT_MAX_MESSAGE_SIZE = 5 * 1024 * 1024
_ENTRY_OVERHEAD = 64 * 1024
_JOURNAL_FLUSH_THRESHOLD_KB = 512


def _max_message_size(extra: Mapping[str, object]) -> int:
    value = extra.get("maxMessageSize", DEFAULT_MAX_MESSAGE_SIZE)
    try:
        size = int(str(value))
    except ValueError:
        size = 0
    if size <= 0:  # the broker would take it and refuse every message
        raise ConfigError(f"PulsarStandalone config maxMessageSize must be a positive int, got {value!r}")
    return size


def physical_mebibytes() -> int:
    """This machine's memory in MiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20


def _mebibytes(memory: str) -> int:
    """A JVM memory size (``512m``, ``1g``, ``524288k``, bytes) in whole MiB."""
    if not _MEMORY_RE.fullmatch(memory):
        raise ConfigError(f"PulsarStandalone direct_memory must look like '512m' or '1g', got {memory!r}")
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(memory[-1].lower(), 1)
    return int(memory.rstrip("kKmMgG")) * scale >> 20


# The bookie keeps every byte twice (journal, entry log) and by default frees neither for long:
# journal files of 2 GiB with 5 old ones kept, entry logs of 1 GiB, garbage collected every
# 10 minutes. One documented benchmark run then left 4.9 GB behind, and on a CI disk with less
# free the bookie turned read-only mid-run ("Not enough non-faulty bookies available", -6).
DISK_BOUNDS: dict[str, object] = {
    "journalMaxSizeMB": 256,
    "journalMaxBackups": 0,  # old journals serve manual recovery only; replay needs none
    "logSizeLimit": 256 * 1024 * 1024,  # an entry log goes once all its ledgers are deleted
    "gcWaitTime": 5_000,  # ms: a deleted topic's bytes go within seconds, not 10 minutes
    "minorCompactionInterval": 10,  # s (hourly by default): a log a small live ledger holds is rewritten
    "isForceGCAllowWhenNoSpace": True,
}

BUDGET_KEYS = frozenset({"dbStorage_writeCacheMaxSizeMb", "managedLedgerCacheSizeMB",
                         "maxMessagePublishBufferSizeInMB"})  # fmt: skip


def direct_memory_budget(direct_memory: str, max_message_size: int, *, checked: bool = True) -> dict[str, int]:
    """How the broker and the bookie, in one JVM, share ``direct_memory`` (MiB per key): the
    bookie's write cache an eighth, the broker's managed-ledger cache an eighth and its buffer of
    messages read but not yet written a quarter, so that half is left for messages in flight.

    Each side's own default assumes it owns the JVM (a fifth, a half, BookKeeper's a quarter):
    95% of it together; at 512m with a 128 MiB write cache a benchmark run peaked at 434 MiB of
    direct memory, at 1g with this budget at 452. The write cache holds two whole entries per
    half or more: a larger entry is never written (apache/pulsar#18062), and a cache of a few
    entries is full at every other one, each add then waiting for a flush; with 16 MiB, 7 of 100
    FATE tables of 256 MiB stalled 3 to 9 s ("WriteEntryProcessor took too long" in the broker's
    log), none of 40 with 128 MiB (docs/benchmarks.md). A ``direct_memory`` too small for that is
    refused (:class:`ConfigError`) unless ``checked`` is false: the caller sized a cache itself."""
    direct = _mebibytes(direct_memory)
    entry = -(-(max_message_size + _ENTRY_OVERHEAD) // (1 << 20))
    if checked and 4 * entry > direct // 8:
        raise ConfigError(
            f"PulsarStandalone direct_memory {direct_memory} is too small for entries of {entry} MiB: "
            f"the bookie's write cache, an eighth of it, must hold {4 * entry} MiB"
        )
    return {
        "dbStorage_writeCacheMaxSizeMb": direct // 8,
        "managedLedgerCacheSizeMB": direct // 8,
        "maxMessagePublishBufferSizeInMB": direct // 4,
    }


def journal_buffers(max_message_size: int) -> dict[str, int]:
    """The bookie journal's buffer sizes that keep every entry in one ``write()``.

    BookKeeper's journal has no checksum of its own (BK #4659) and preallocates its file with
    zeros. With the default 64 KiB write buffer, an entry larger than the buffer goes to the
    file in several writes; a SIGKILL between two leaves a torn entry that replays as garbage,
    and ledger recovery then fails with "Mac mismatch" (error code -10) on every restart. The
    buffer here holds the flush threshold's worth of small entries plus two whole entries of
    the largest message, so the journal flushes whole entries only, and the page cache (which a
    process crash keeps) has each one complete or not at all.
    """
    entry_kb = (max_message_size + _ENTRY_OVERHEAD + 1023) // 1024
    return {
        "journalBufferedWritesThreshold": _JOURNAL_FLUSH_THRESHOLD_KB * 1024,  # bytes
        "journalWriteBufferSizeKB": _JOURNAL_FLUSH_THRESHOLD_KB + 2 * entry_kb,
    }


def log4j_xml(log_level: str) -> str:
    """The broker's log4j2 configuration: one console appender (the launcher sends it to broker.log)."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<!-- written by fedtransport.brokers.standalone.PulsarStandalone -->\n"
        '<Configuration status="warn" shutdownHook="disable">\n'
        '  <Appenders><Console name="out" target="SYSTEM_OUT">'
        '<PatternLayout pattern="%d{ISO8601} %-5level [%t] %c{1} - %msg%n"/></Console></Appenders>\n'
        f'  <Loggers><Root level="{log_level}"><AppenderRef ref="out"/></Root></Loggers>\n'
        "</Configuration>\n"
    )


def write_run_files(run_dir: Path, config: Mapping[str, str], log_level: str) -> Path:
    """Write ``standalone.conf`` and ``log4j2.xml`` into ``run_dir``; the config file's path."""
    path = run_dir / "standalone.conf"
    lines = ["# written by fedtransport.brokers.standalone.PulsarStandalone"]
    lines += [f"{key}={value}" for key, value in config.items()]
    path.write_text("\n".join(lines) + "\n")
    (run_dir / "log4j2.xml").write_text(log4j_xml(log_level))
    return path


def jvm_command(
    *,
    java: Path,
    lib: Path,
    run_dir: Path,
    heap: str,
    initial_heap: str,
    direct_memory: str,
    log_level: str,
    bookie_port: int,
) -> list[str]:
    """``java ... PulsarStandaloneStarter ...`` for a broker whose files are in ``run_dir``."""
    data = run_dir / "data"
    return [
        str(java),
        f"-Xms{initial_heap}",
        f"-Xmx{heap}",
        f"-XX:MaxDirectMemorySize={direct_memory}",
        f"-Djava.io.tmpdir={run_dir / 'tmp'}",
        "-Djava.net.preferIPv4Stack=true",
        "-Dio.netty.tryReflectionSetAccessible=true",
        *(arg for module in _ADD_OPENS for arg in ("--add-opens", f"{module}=ALL-UNNAMED")),
        f"-Dlog4j2.configurationFile={run_dir / 'log4j2.xml'}",
        "-Dlog4j2.is.webapp=false",
        "-Dlog4j.shutdownHookEnabled=false",
        f"-Dpulsar.log.level={log_level}",
        "-Dbookkeeper.metadata.bookie.drivers=org.apache.pulsar.metadata.bookkeeper.PulsarMetadataBookieDriver",
        "-Dbookkeeper.metadata.client.drivers=org.apache.pulsar.metadata.bookkeeper.PulsarMetadataClientDriver",
        "-Dzookeeper.admin.enableServer=false",
        "-cp",
        f"{lib}/*",
        MAIN_CLASS,
        "--config",
        str(run_dir / "standalone.conf"),
        "--no-stream-storage",
        "--no-functions-worker",
        "--bookkeeper-port",
        str(bookie_port),
        "--bookkeeper-dir",
        str(data / "bookkeeper"),
        "--metadata-dir",
        str(data / "metadata"),
        "--zookeeper-dir",
        str(data / "zookeeper"),  # never created: its absence selects the RocksDB metadata store
    ]


def jvm_environment() -> dict[str, str]:
    """Ours, without what would change the broker: no OpenTelemetry exporter (a port of its
    own), no ZooKeeper in place of the RocksDB metadata store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.pop("PULSAR_STANDALONE_USE_ZOOKEEPER", None)
    env["OTEL_SDK_DISABLED"] = "true"
    return env
