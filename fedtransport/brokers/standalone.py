"""The real Apache Pulsar broker in standalone mode, launched as a child JVM.

Features
--------
- Runs ``org.apache.pulsar.PulsarStandaloneStarter`` (broker + one bookie + a RocksDB metadata
  store in one JVM; no ZooKeeper, no functions worker ``-nfw``, no stream storage ``-nss``) from
  ``org.apache.pulsar:pulsar-broker`` :data:`PULSAR_VERSION` (the 4.0 LTS line), resolved with
  Maven from Maven Central once and cached outside the repository (see *Jar cache* below).
- Every listener binds to 127.0.0.1 on a free port: the binary protocol (``port``), the admin
  REST / metrics web port (``web_port``), the bookie (``bookie_port``, bound to the loopback
  interface), and with TLS ``tls_port`` and ``web_tls_port``. Nothing else listens: the bookie's
  HTTP server, the websocket service, the functions worker and the load balancer are off,
  OpenTelemetry exporters are disabled in the JVM's environment, and the UDP socket of the
  internal client's DNS resolver is bound to 127.0.0.1 too (``brokerClient_dnsLookupBindAddress``).
- Writes its own broker config file (``standalone.conf`` in a private run directory; BookKeeper
  reads the same file for the bookie), ``log4j2.xml`` and logs to ``broker.log`` there.
- Ready only when the admin REST answers: ``GET /admin/v2/clusters`` lists ``cluster`` and
  ``GET /admin/v2/namespaces/public`` lists ``public/default`` (bounded wait; a start-up failure
  raises :class:`~fedtransport.errors.BackendError` with the tail of the log).
- ``token_secret``: JWT (HS256) authentication on the data plane and the admin REST, with
  authorization and a superuser role (``superuser``, default ``"admin"``). The broker's own
  internal client carries a superuser token, so the standalone's own admin calls (and later
  geo-replication) work. ``token(subject)`` mints tokens; ``admin_token`` is the superuser's.
  Without it anonymous clients are accepted.
- ``tls``: TLS on the binary and web ports as well (the plain ports stay open). ``ca_path`` is
  the file clients pass as ``tls_trust_certs_file_path``; the server certificate answers to
  ``127.0.0.1`` and ``localhost`` when generated, so hostname validation works.
- Measured on a 2-core machine: ready ~6 s after launch (median of 5; 9 s the first time),
  ~440 MiB resident (``rss_bytes``) with heap 1g / direct memory 512m; ``startup_seconds`` holds
  the last start's time. ``admin(method, path, body)`` makes one admin REST call as the superuser
  and decodes the JSON; ``ports`` maps each role to its port.
- Fault injection for tests: ``kill()`` (SIGKILL) and ``restart()`` (same ports, same data
  directory, so clients reconnect and find their unacknowledged messages). ``stop()`` is
  idempotent and deletes the run directory, data included; because everything is discarded it
  SIGKILLs the JVM instead of waiting out Pulsar's ~5 s graceful shutdown.
- Instances still running at interpreter exit are stopped; a forked child never stops or deletes
  a broker its parent started.

Options (constructor arguments) and defaults
--------------------------------------------
- ``cluster``: ``"standalone"`` -> ``clusterName`` (letters, digits, ``_.-``).
- ``tls``: ``None``/``False`` -> no TLS; ``True`` -> a private CA and a server certificate for
  127.0.0.1/localhost made with :mod:`fedtransport.certs` in the run directory; a mapping with
  ``cert``/``key``/``ca`` (or RabbitNode's ``certfile``/``keyfile``/``cacertfile``) file paths,
  or an object with ``cert``, ``key`` and ``ca`` (or ``ca_cert``) attributes.
- ``token_secret``: ``None`` -> no authentication; ``bytes`` or ``str`` (UTF-8) -> the HS256
  secret, at least 32 bytes (Pulsar's JWT library refuses shorter HMAC keys).
- ``version``: ``None`` -> :data:`PULSAR_VERSION`.
- ``superuser``: ``"admin"`` -> ``superUserRoles`` and the subject of ``admin_token``.
- ``heap``: ``"1g"`` (``-Xmx``); ``initial_heap``: ``"256m"`` (``-Xms``); ``direct_memory``:
  ``"512m"`` (``-XX:MaxDirectMemorySize``; managed-ledger cache and bookie caches come out of it).
- ``config``: ``None`` -> extra ``standalone.conf`` keys (mapping key -> value) applied last,
  e.g. ``{"brokerDeleteInactiveTopicsEnabled": False}``.
- ``log_level``: ``"warn"`` (``error``, ``warn``, ``info``, ``debug``, ``trace``).
- ``startup_timeout``: ``180.0`` s per start.
- ``stop_timeout``: ``30.0`` s between SIGTERM and SIGKILL in a graceful ``restart()``.
- ``resolve_timeout``: ``1800.0`` s for the first Maven resolution.
- ``cache_dir``: ``None`` -> ``$FEDTRANSPORT_PULSAR_CACHE`` or
  ``~/.cache/fedtransport/pulsar`` (``$XDG_CACHE_HOME`` is honoured).

Jar cache
---------
``<cache>/<version>/lib/*.jar`` holds ``pulsar-broker`` and its runtime dependencies, at the
versions Pulsar's own build manages (its parent POM is imported as a BOM), plus the log4j2 SLF4J
binding. Resolution runs ``mvn dependency:copy-dependencies`` on a generated POM under an
``fcntl`` lock (``<cache>/.<version>.lock``), into a scratch directory that is renamed into
place; ``<version>/COMPLETE`` is written last, and a cache without it (or made from a different
POM) is resolved again. Without a ``~/.m2/settings.xml`` of your own, a generated settings file
routes every repository a POM declares to Maven Central (Pulsar's POMs name a Confluent
repository that may be unreachable). Java 17 and Maven are needed:
``apt-get install maven openjdk-17-jre-headless``.

Pulsar 4.0.x ships BookKeeper 4.17.2, whose ``BookieServiceInfo`` has no ``equals``: after a
SIGKILL the bookie's stale registration in the RocksDB metadata store sends its registration
lock into an endless delete/re-create loop and the broker never sees a writable bookie. For
4.0.x the BookKeeper artifacts are therefore taken at :data:`BOOKKEEPER_FIX_VERSION` (4.17.3,
the same line, which has the fix and is what Pulsar 4.2.4 ships).

Example::

    with PulsarStandalone() as p:
        client = pulsar.Client(p.service_url)
        urllib.request.urlopen(f"{p.admin_url}/admin/v2/clusters")
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import BackendError, ConfigError
from ._process import LOOPBACK, ChildProcess, free_port, log_tail, stopped_at_exit, wait_until

__all__ = [
    "BOOKKEEPER_FIX_VERSION",
    "PULSAR_VERSION",
    "PulsarStandalone",
    "find_java",
    "find_maven",
    "hs256_token",
    "pulsar_cache_root",
    "resolve_pulsar",
]

#: The pinned Pulsar release: the newest 4.0.x (LTS) whose broker and dependencies Maven Central
#: serves completely here (4.0.8 lacks jetcd-core-shaded and pulsar-opentelemetry).
PULSAR_VERSION = "4.0.7"
#: BookKeeper taken with Pulsar 4.0.x (which ships 4.17.2); see the module docstring.
BOOKKEEPER_FIX_VERSION = "4.17.3"
CACHE_ENV = "FEDTRANSPORT_PULSAR_CACHE"
APT_HINT = "apt-get install maven openjdk-17-jre-headless"
MAIN_CLASS = "org.apache.pulsar.PulsarStandaloneStarter"

_MIN_JAVA = 17
_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
_LOG_LEVELS = ("error", "warn", "info", "debug", "trace")
_CLUSTER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MEMORY_RE = re.compile(r"[1-9][0-9]*[kKmMgG]?")
_CONFIG_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.]*")
_VERSION_RE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+(?:[-.][A-Za-z0-9.]+)?")
_MIN_SECRET = 32  # bytes: jjwt's Keys.hmacShaKeyFor refuses shorter HS256 keys
_IFF_LOOPBACK = 0x8

# Every BookKeeper artifact pulsar-broker 4.0.x pulls in, for the BOOKKEEPER_FIX_VERSION override.
_BOOKKEEPER_ARTIFACTS: tuple[tuple[str, str, str | None], ...] = (
    ("org.apache.bookkeeper", "bookkeeper-common", None),
    ("org.apache.bookkeeper", "bookkeeper-common-allocator", None),
    ("org.apache.bookkeeper", "bookkeeper-proto", None),
    ("org.apache.bookkeeper", "bookkeeper-server", None),
    ("org.apache.bookkeeper", "bookkeeper-slogger-api", None),
    ("org.apache.bookkeeper", "bookkeeper-slogger-slf4j", None),
    ("org.apache.bookkeeper", "bookkeeper-tools-framework", None),
    ("org.apache.bookkeeper", "circe-checksum", None),
    ("org.apache.bookkeeper", "cpu-affinity", None),
    ("org.apache.bookkeeper", "native-io", None),
    ("org.apache.bookkeeper", "statelib", None),
    ("org.apache.bookkeeper", "stream-storage-api", None),
    ("org.apache.bookkeeper", "stream-storage-common", None),
    ("org.apache.bookkeeper", "stream-storage-java-client", None),
    ("org.apache.bookkeeper", "stream-storage-java-client-base", None),
    ("org.apache.bookkeeper", "stream-storage-proto", None),
    ("org.apache.bookkeeper", "stream-storage-server", None),
    ("org.apache.bookkeeper", "stream-storage-service-api", None),
    ("org.apache.bookkeeper", "stream-storage-service-impl", None),
    ("org.apache.bookkeeper.http", "http-server", None),
    ("org.apache.bookkeeper.http", "vertx-http-server", None),
    ("org.apache.bookkeeper.stats", "bookkeeper-stats-api", None),
    ("org.apache.bookkeeper.stats", "codahale-metrics-provider", None),
    ("org.apache.bookkeeper.stats", "prometheus-metrics-provider", None),
    ("org.apache.distributedlog", "distributedlog-common", None),
    ("org.apache.distributedlog", "distributedlog-core", None),
    ("org.apache.distributedlog", "distributedlog-core", "tests"),
    ("org.apache.distributedlog", "distributedlog-protocol", None),
)

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


# ---------------------------------------------------------------------------- tools
def find_java() -> Path:
    """The ``java`` to run the broker with (``$JAVA_HOME/bin/java``, else ``PATH``); Java 17+."""
    candidates = []
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidates.append(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            major = _java_major(str(candidate))
            if major < _MIN_JAVA:
                raise BackendError(
                    f"{candidate} is Java {major}; the Pulsar broker needs Java {_MIN_JAVA}+: {APT_HINT}"
                )
            return candidate
    raise BackendError(
        f"the Apache Pulsar broker needs Java {_MIN_JAVA} (no java on PATH or in $JAVA_HOME): {APT_HINT}"
    )


@functools.lru_cache(maxsize=8)
def _java_major(java: str) -> int:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"cannot run {java} -version: {exc}: {APT_HINT}") from exc
    match = re.search(r'version "([0-9]+)(?:\.([0-9]+))?', out)
    if match is None:
        raise BackendError(f"cannot read the Java version from {java} -version:\n{out.strip()}")
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def find_maven() -> Path:
    """The ``mvn`` that resolves the broker's jars (``PATH``, else ``$MAVEN_HOME/bin/mvn``)."""
    found = shutil.which("mvn")
    if found:
        return Path(found)
    maven_home = os.environ.get("MAVEN_HOME") or os.environ.get("M2_HOME")
    if maven_home:
        candidate = Path(maven_home) / "bin" / "mvn"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise BackendError(
        f"the Apache Pulsar broker's jars are resolved with Maven once, but mvn is not on PATH: {APT_HINT}"
    )


# ---------------------------------------------------------------------------- jar cache
def pulsar_cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where resolved broker jars live: ``cache_dir``, ``$FEDTRANSPORT_PULSAR_CACHE`` or
    ``~/.cache/fedtransport/pulsar``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().resolve()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().resolve() / "fedtransport" / "pulsar"


def _check_version(version: str | None) -> str:
    version = PULSAR_VERSION if version is None else version
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise ConfigError(f"PulsarStandalone version must look like '4.0.7', got {version!r}")
    return version


def _bookkeeper_override(version: str) -> str | None:
    return BOOKKEEPER_FIX_VERSION if version.startswith("4.0.") else None


def _pom_text(version: str) -> str:
    managed = []
    bookkeeper = _bookkeeper_override(version)
    if bookkeeper is not None:
        # Declared before the BOM import, so these win over the versions Pulsar manages.
        for group, artifact, classifier in _BOOKKEEPER_ARTIFACTS:
            extra = f"<classifier>{classifier}</classifier>" if classifier else ""
            managed.append(
                f"      <dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
                f"<version>{bookkeeper}</version>{extra}</dependency>"
            )
    managed.append(
        "      <dependency><groupId>org.apache.pulsar</groupId><artifactId>pulsar</artifactId>"
        f"<version>{version}</version><type>pom</type><scope>import</scope></dependency>"
    )
    return "\n".join(
        [
            '<?xml version="1.0" encoding="UTF-8"?>',
            "<!-- generated by fedtransport.brokers.standalone: the jars PulsarStandaloneStarter needs -->",
            '<project xmlns="http://maven.apache.org/POM/4.0.0">',
            "  <modelVersion>4.0.0</modelVersion>",
            "  <groupId>fedtransport.local</groupId>",
            "  <artifactId>pulsar-standalone-classpath</artifactId>",
            f"  <version>{version}</version>",
            "  <packaging>pom</packaging>",
            "  <dependencyManagement>",
            "    <dependencies>",
            *managed,
            "    </dependencies>",
            "  </dependencyManagement>",
            "  <dependencies>",
            "    <dependency><groupId>org.apache.pulsar</groupId><artifactId>pulsar-broker</artifactId>"
            f"<version>{version}</version></dependency>",
            # The broker logs through SLF4J; this is the binding Pulsar's distribution ships.
            "    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>"
            "</dependency>",
            "    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId>"
            "</dependency>",
            "  </dependencies>",
            "</project>",
            "",
        ]
    )


_SETTINGS_XML = """<?xml version="1.0" encoding="UTF-8"?>
<!-- generated by fedtransport.brokers.standalone: every repository a POM declares -> Maven Central -->
<settings>
  <mirrors>
    <mirror>
      <id>central-for-all</id>
      <mirrorOf>*,!central</mirrorOf>
      <url>https://repo.maven.apache.org/maven2</url>
    </mirror>
  </mirrors>
</settings>
"""


def _cache_complete(version_dir: Path, pom_sha: str) -> bool:
    marker = version_dir / "COMPLETE"
    try:
        manifest = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(manifest, dict)
        and manifest.get("pom_sha256") == pom_sha
        and any((version_dir / "lib").glob("pulsar-broker-*.jar"))
    )


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float, what: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BackendError(f"{what}: another process held {path} for {timeout:.0f} s") from None
                time.sleep(delay)  # flock has no timeout: poll with a bounded back-off
                delay = min(delay * 2, 1.0)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def resolve_pulsar(
    version: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    timeout: float = 1800.0,
) -> Path:
    """The directory holding ``pulsar-broker`` ``version`` and its runtime jars, resolving them
    with Maven on first use (see the module docstring); returns ``<cache>/<version>/lib``."""
    version = _check_version(version)
    root = pulsar_cache_root(cache_dir)
    version_dir = root / version
    pom = _pom_text(version)
    pom_sha = hashlib.sha256(pom.encode()).hexdigest()
    if _cache_complete(version_dir, pom_sha):
        return version_dir / "lib"
    what = f"resolving org.apache.pulsar:pulsar-broker:{version} with Maven"
    mvn = find_maven()  # before taking the lock: a missing tool is not worth waiting for
    with _file_lock(root / f".{version}.lock", timeout, what):
        if _cache_complete(version_dir, pom_sha):  # another process finished meanwhile
            return version_dir / "lib"
        scratch = Path(tempfile.mkdtemp(prefix=f".{version}.resolving-", dir=root))
        try:
            _run_maven(mvn, scratch, pom, timeout, what)
            jars = sorted(p.name for p in (scratch / "lib").glob("*.jar"))
            if not any(name.startswith("pulsar-broker-") for name in jars):
                raise BackendError(
                    f"{what}: Maven finished but copied no pulsar-broker jar{log_tail(scratch / 'mvn.log')}"
                )
            manifest = {
                "pulsar_version": version,
                "bookkeeper_version": _bookkeeper_override(version),
                "pom_sha256": pom_sha,
                "jars": len(jars),
                "resolved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            if version_dir.exists():
                shutil.rmtree(version_dir)  # an incomplete or outdated earlier attempt
            os.replace(scratch, version_dir)
            # Written last: only a finished copy is ever taken for complete.
            (version_dir / "COMPLETE").write_text(json.dumps(manifest, indent=2) + "\n")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return version_dir / "lib"


def _run_maven(mvn: Path, scratch: Path, pom: str, timeout: float, what: str) -> None:
    (scratch / "pom.xml").write_text(pom)
    cmd = [str(mvn), "-B", "-ntp", "-f", str(scratch / "pom.xml")]
    if not (Path.home() / ".m2" / "settings.xml").is_file():
        (scratch / "settings.xml").write_text(_SETTINGS_XML)
        cmd += ["-s", str(scratch / "settings.xml")]
    cmd += [
        f"{_DEPENDENCY_PLUGIN}:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={scratch / 'lib'}",
    ]
    log = scratch / "mvn.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  cwd=scratch, timeout=timeout, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise BackendError(f"{what}: not done after {timeout:.0f} s{log_tail(log)}") from None
        except OSError as exc:
            raise BackendError(f"{what}: cannot run {mvn}: {exc}: {APT_HINT}") from exc
    if proc.returncode != 0:
        raise BackendError(
            f"{what} failed (exit {proc.returncode} after {time.monotonic() - started:.0f} s; "
            f"is Maven Central reachable?){log_tail(log)}"
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


def _secret_bytes(token_secret: bytes | str | None) -> bytes | None:
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
def _tls_files(tls: object) -> tuple[Path, Path, Path] | None:
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


def _loopback_interface() -> str:
    """Name of the loopback interface the bookie binds to (Linux sysfs; ``lo`` otherwise)."""
    net = Path("/sys/class/net")
    with contextlib.suppress(OSError, ValueError):
        for iface in sorted(net.iterdir()):
            if int((iface / "flags").read_text().strip(), 16) & _IFF_LOOPBACK:
                return iface.name
    return "lo"


def _config_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ConfigError(f"PulsarStandalone config values must be one line, got {text!r}")
    return text


# ---------------------------------------------------------------------------- the launcher
class PulsarStandalone(ChildProcess):
    """Apache Pulsar in standalone mode on 127.0.0.1; see the module docstring for options."""

    def __init__(
        self,
        cluster: str = "standalone",
        tls: bool | Mapping[str, str | os.PathLike[str]] | object | None = None,
        token_secret: bytes | str | None = None,
        version: str | None = None,
        *,
        superuser: str = "admin",
        heap: str = "1g",
        initial_heap: str = "256m",
        direct_memory: str = "512m",
        config: Mapping[str, object] | None = None,
        log_level: str = "warn",
        startup_timeout: float = 180.0,
        stop_timeout: float = 30.0,
        resolve_timeout: float = 1800.0,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(cluster, str) or not _CLUSTER_RE.fullmatch(cluster):
            raise ConfigError(f"PulsarStandalone cluster must be 1-64 letters, digits or _.- , got {cluster!r}")
        if not isinstance(superuser, str) or not superuser or any(c in superuser for c in ",\n\r "):
            raise ConfigError(
                f"PulsarStandalone superuser must be a role name without ',' or spaces, got {superuser!r}"
            )
        for name, value in (("heap", heap), ("initial_heap", initial_heap), ("direct_memory", direct_memory)):
            if not isinstance(value, str) or not _MEMORY_RE.fullmatch(value):
                raise ConfigError(f"PulsarStandalone {name} must look like '512m' or '1g', got {value!r}")
        if log_level not in _LOG_LEVELS:
            raise ConfigError(f"PulsarStandalone log_level must be one of {_LOG_LEVELS}, got {log_level!r}")
        for name, seconds in (("startup_timeout", startup_timeout), ("stop_timeout", stop_timeout),
                              ("resolve_timeout", resolve_timeout)):  # fmt: skip
            if seconds <= 0:
                raise ConfigError(f"PulsarStandalone {name} must be positive, got {seconds}")
        extra = dict(config or {})
        for key, value in extra.items():
            if not isinstance(key, str) or not _CONFIG_KEY_RE.fullmatch(key):
                raise ConfigError(f"PulsarStandalone config key {key!r} is not a standalone.conf key")
            _config_value(value)
        super().__init__()
        self._cluster = cluster
        self._version = _check_version(version)
        self._secret = _secret_bytes(token_secret)
        self._superuser = superuser
        self._tls_given = None if tls is None or tls is False or tls is True else _tls_files(tls)
        self._tls = tls is not None and tls is not False
        self._heap, self._initial_heap, self._direct_memory = heap, initial_heap, direct_memory
        self._extra_config = extra
        self._log_level = log_level
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._resolve_timeout = resolve_timeout
        self._cache_dir = cache_dir
        self._ports: dict[str, int] = {}
        self._tls_paths: tuple[Path, Path, Path] | None = None
        self._lib: Path | None = None
        self._admin_token: str | None = None
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------------ properties
    def _port(self, name: str) -> int:
        try:
            return self._ports[name]
        except KeyError:
            what = "TLS is off" if name.endswith("tls") and not self._tls else "call start() first"
            raise BackendError(f"PulsarStandalone has no {name} port: {what}") from None

    @property
    def cluster(self) -> str:
        return self._cluster

    @property
    def version(self) -> str:
        return self._version

    @property
    def port(self) -> int:
        return self._port("broker")

    @property
    def web_port(self) -> int:
        return self._port("web")

    @property
    def bookie_port(self) -> int:
        return self._port("bookie")

    @property
    def tls_port(self) -> int:
        return self._port("broker_tls")

    @property
    def web_tls_port(self) -> int:
        return self._port("web_tls")

    @property
    def ports(self) -> dict[str, int]:
        """Every port the broker listens on, by role (broker, web, bookie, broker_tls, web_tls)."""
        return dict(self._ports)

    @property
    def service_url(self) -> str:
        return f"pulsar://{LOOPBACK}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.web_port}"

    @property
    def service_url_tls(self) -> str:
        return f"pulsar+ssl://{LOOPBACK}:{self.tls_port}"

    @property
    def admin_url_tls(self) -> str:
        return f"https://{LOOPBACK}:{self.web_tls_port}"

    @property
    def tls(self) -> bool:
        return self._tls

    @property
    def ca_path(self) -> Path | None:
        """The CA certificate clients trust (``tls_trust_certs_file_path``); ``None`` without TLS."""
        return self._tls_paths[2] if self._tls_paths is not None else None

    @property
    def tls_trust_certs_file_path(self) -> str | None:
        return str(self.ca_path) if self.ca_path is not None else None

    @property
    def auth(self) -> bool:
        return self._secret is not None

    @property
    def superuser(self) -> str:
        return self._superuser

    @property
    def admin_token(self) -> str | None:
        """A token for the superuser role; ``None`` without ``token_secret``."""
        if self._secret is None:
            return None
        if self._admin_token is None:
            self._admin_token = hs256_token(self._secret, self._superuser)
        return self._admin_token

    @property
    def data_dir(self) -> Path | None:
        return self._in_run_dir("data")

    @property
    def log_path(self) -> Path | None:
        return self._in_run_dir("broker.log")

    @property
    def config_path(self) -> Path | None:
        return self._in_run_dir("standalone.conf")

    @property
    def lib_dir(self) -> Path | None:
        """The resolved jar directory (after the first start)."""
        return self._lib

    @property
    def rss_bytes(self) -> int | None:
        """Resident memory of the JVM (Linux ``/proc``), or ``None`` when it does not run."""
        pid = self.pid if self.running else None
        if pid is None:
            return None
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return None

    def token(self, subject: str | None = None, *, expires_in: float | None = None) -> str:
        """A JWT for role ``subject`` (default: the superuser) signed with ``token_secret``."""
        if self._secret is None:
            raise ConfigError("PulsarStandalone.token() needs token_secret: this broker does not authenticate")
        return hs256_token(self._secret, self._superuser if subject is None else subject, expires_in=expires_in)

    def admin(self, method: str, path: str, body: object = None, *, timeout: float = 10.0) -> Any:
        """One admin REST call on the plain web port as the superuser; the decoded JSON (or ``None``).

        ``path`` starts with ``/admin/v2/``; an HTTP error raises ``urllib.error.HTTPError``.
        """
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.admin_url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.admin_token is not None:
            request.add_header("Authorization", f"Bearer {self.admin_token}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw.strip() else None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> PulsarStandalone:
        """Start the broker (no-op when it already runs) and wait until it serves; returns ``self``."""
        with self._lock:
            if self.running:
                return self
            java = find_java()
            self._lib = resolve_pulsar(self._version, cache_dir=self._cache_dir, timeout=self._resolve_timeout)
            fresh = self._run_dir is None
            if fresh:
                self._run_dir = Path(tempfile.mkdtemp(prefix="fedtransport-pulsar-standalone-"))
                (self._run_dir / "tmp").mkdir()
                (self._run_dir / "data").mkdir()
            try:
                if fresh:
                    self._pick_ports()
                    self._prepare_tls()
                self._launch(java, self._lib)
            except BaseException:
                # A first start that failed leaves nothing behind; a failed restart keeps the data
                # so the caller can look at it or retry.
                self._kill_process()
                if fresh:
                    self._remove_run_dir()
                    self._ports.clear()
                    self._tls_paths = None
                raise
            _live.add(self)
            return self

    def _stop(self) -> None:
        """SIGKILL the broker and delete its run directory (config, logs, data). Idempotent."""
        self._kill_process()
        self._proc = None
        self._remove_run_dir()
        self._ports.clear()
        self._tls_paths = None
        _live.discard(self)

    def kill(self) -> None:
        """SIGKILL the broker (a crash, for fault tests); ``restart()`` brings it back."""
        with self._lock:
            self._kill_process()

    def restart(self) -> PulsarStandalone:
        """Stop the broker gracefully if it runs, then start it on the same ports and data."""
        with self._lock:
            if self._run_dir is None:
                return self.start()
            proc, self._proc = self._proc, None
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(self._stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            return self.start()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        port = self._ports.get("broker", "?")
        return f"PulsarStandalone({self._version}, pulsar://{LOOPBACK}:{port}, cluster={self._cluster}, {state})"

    # ------------------------------------------------------------------ internals
    def _pick_ports(self) -> None:
        names = ["broker", "web", "bookie"] + (["broker_tls", "web_tls"] if self._tls else [])
        ports: set[int] = set()
        for name in names:
            port = free_port()
            while port in ports:  # free_port() may hand out the same port twice before binding
                port = free_port()
            ports.add(port)
            self._ports[name] = port

    def _prepare_tls(self) -> None:
        if not self._tls:
            return
        if self._tls_given is not None:
            self._tls_paths = self._tls_given
            return
        from .. import certs  # imported here: cryptography is only needed when TLS is on

        assert self._run_dir is not None
        tls_dir = self._run_dir / "tls"
        tls_dir.mkdir()
        ca_key, ca_cert = certs.make_ca("fedtransport standalone CA")
        key, cert = certs.issue(ca_key, ca_cert, LOOPBACK, extra_sans=["localhost"])
        self._tls_paths = (
            certs.write_cert(tls_dir / "broker.cert.pem", cert),
            certs.write_key(tls_dir / "broker.key-pk8.pem", key),
            certs.write_cert(tls_dir / "ca.cert.pem", ca_cert),
        )

    def _config(self) -> dict[str, str]:
        assert self._run_dir is not None
        conf: dict[str, object] = {
            "clusterName": self._cluster,
            "bindAddress": LOOPBACK,
            "advertisedAddress": LOOPBACK,  # the bookie reads this key too
            "brokerServicePort": self.port,
            "webServicePort": self.web_port,
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
            "narExtractionDirectory": self._run_dir / "tmp",
            "authenticationEnabled": False,
            "authorizationEnabled": False,
            # The broker's internal client (system topics) otherwise binds its DNS resolver's UDP
            # socket to 0.0.0.0; every address it looks up here is a loopback IP anyway.
            "brokerClient_dnsLookupBindAddress": LOOPBACK,
            # BookKeeper reads the same file for the bookie:
            "listeningInterface": _loopback_interface(),  # bind the bookie to loopback, not 0.0.0.0
            "allowLoopback": True,
            "allowEphemeralPorts": True,  # else BKCluster ignores --bookkeeper-port and picks a port
            "httpServerEnabled": False,
            "ledgerStorageClass": "org.apache.bookkeeper.bookie.storage.ldb.DbLedgerStorage",
            "dbStorage_writeCacheMaxSizeMb": 16,
            "dbStorage_readAheadCacheMaxSizeMb": 16,
            "dbStorage_rocksDB_blockCacheSize": 16 * 1024 * 1024,
            "journalSyncData": False,  # a process crash keeps the page cache; fsync buys nothing here
            "journalMaxGroupWaitMSec": 1,
            "diskUsageThreshold": 0.999,  # CI disks run full; a read-only bookie refuses writes
            "diskUsageWarnThreshold": 0.99,
        }
        if self._tls_paths is not None:
            cert, key, ca = self._tls_paths
            conf.update(
                {
                    "brokerServicePortTls": self.tls_port,
                    "webServicePortTls": self.web_tls_port,
                    "tlsCertificateFilePath": cert,
                    "tlsKeyFilePath": key,
                    "tlsTrustCertsFilePath": ca,
                    "tlsRequireTrustedClientCertOnConnect": False,
                    "tlsAllowInsecureConnection": False,
                    # The internal client keeps the plain ports, but trusts the CA if told to use TLS.
                    "brokerClientTrustCertsFilePath": ca,
                }
            )
        if self._secret is not None:
            conf.update(
                {
                    "authenticationEnabled": True,
                    "authenticationProviders": "org.apache.pulsar.broker.authentication.AuthenticationProviderToken",
                    "tokenSecretKey": "data:;base64," + base64.b64encode(self._secret).decode("ascii"),
                    "authorizationEnabled": True,
                    "superUserRoles": self._superuser,
                    "brokerClientAuthenticationPlugin": "org.apache.pulsar.client.impl.auth.AuthenticationToken",
                    "brokerClientAuthenticationParameters": f"token:{self.admin_token}",
                }
            )
        conf.update(self._extra_config)
        return {key: _config_value(value) for key, value in conf.items()}

    def _log4j_xml(self) -> str:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            "<!-- written by fedtransport.brokers.standalone.PulsarStandalone -->\n"
            '<Configuration status="warn" shutdownHook="disable">\n'
            '  <Appenders><Console name="out" target="SYSTEM_OUT">'
            '<PatternLayout pattern="%d{ISO8601} %-5level [%t] %c{1} - %msg%n"/></Console></Appenders>\n'
            f'  <Loggers><Root level="{self._log_level}"><AppenderRef ref="out"/></Root></Loggers>\n'
            "</Configuration>\n"
        )

    def _command(self, java: Path, lib: Path) -> list[str]:
        assert self._run_dir is not None
        data = self._run_dir / "data"
        return [
            str(java),
            f"-Xms{self._initial_heap}",
            f"-Xmx{self._heap}",
            f"-XX:MaxDirectMemorySize={self._direct_memory}",
            f"-Djava.io.tmpdir={self._run_dir / 'tmp'}",
            "-Djava.net.preferIPv4Stack=true",
            "-Dio.netty.tryReflectionSetAccessible=true",
            *(arg for module in _ADD_OPENS for arg in ("--add-opens", f"{module}=ALL-UNNAMED")),
            f"-Dlog4j2.configurationFile={self._run_dir / 'log4j2.xml'}",
            "-Dlog4j2.is.webapp=false",
            "-Dlog4j.shutdownHookEnabled=false",
            f"-Dpulsar.log.level={self._log_level}",
            "-Dbookkeeper.metadata.bookie.drivers=org.apache.pulsar.metadata.bookkeeper.PulsarMetadataBookieDriver",
            "-Dbookkeeper.metadata.client.drivers=org.apache.pulsar.metadata.bookkeeper.PulsarMetadataClientDriver",
            "-Dzookeeper.admin.enableServer=false",
            "-cp",
            f"{lib}/*",
            MAIN_CLASS,
            "--config",
            str(self._run_dir / "standalone.conf"),
            "--no-stream-storage",
            "--no-functions-worker",
            "--bookkeeper-port",
            str(self.bookie_port),
            "--bookkeeper-dir",
            str(data / "bookkeeper"),
            "--metadata-dir",
            str(data / "metadata"),
            "--zookeeper-dir",
            str(data / "zookeeper"),  # never created: its absence selects the RocksDB metadata store
        ]

    def _launch(self, java: Path, lib: Path) -> None:
        assert self._run_dir is not None
        config, log = self._run_dir / "standalone.conf", self._run_dir / "broker.log"
        lines = ["# written by fedtransport.brokers.standalone.PulsarStandalone"]
        lines += [f"{key}={value}" for key, value in self._config().items()]
        config.write_text("\n".join(lines) + "\n")
        (self._run_dir / "log4j2.xml").write_text(self._log4j_xml())
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.pop("PULSAR_STANDALONE_USE_ZOOKEEPER", None)  # would start ZooKeeper instead of RocksDB
        env["OTEL_SDK_DISABLED"] = "true"  # no metrics exporter port
        started = time.monotonic()
        # Our own JVM must hold every port (someone else may have taken one), then the admin REST
        # must list the cluster and the default namespace.
        what = f"Apache Pulsar {self._version} standalone on {LOOPBACK}:{self.port}"
        self._spawn(self._command(java, lib), log, ports=self._ports.values(), timeout=self._startup_timeout,
                    what=what, append=True, env=env)  # fmt: skip
        proc = self._proc
        assert proc is not None
        wait_until(
            self._serves,
            timeout=max(1.0, self._startup_timeout - (time.monotonic() - started)),
            what=what,
            alive=lambda: proc.poll() is None,
            log=log,
        )
        self.startup_seconds = time.monotonic() - started

    def _serves(self) -> bool:
        try:
            clusters = self.admin("GET", "/admin/v2/clusters", timeout=5.0)
            if not isinstance(clusters, list) or self._cluster not in clusters:
                return False
            namespaces = self.admin("GET", "/admin/v2/namespaces/public", timeout=5.0)
            return isinstance(namespaces, list) and "public/default" in namespaces
        except (OSError, ValueError):  # URLError and HTTPError are OSErrors
            return False

    def _kill_process(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait()


# Brokers still running at interpreter exit are stopped so no JVM keeps ports and disk.
_live: set[PulsarStandalone] = stopped_at_exit()
