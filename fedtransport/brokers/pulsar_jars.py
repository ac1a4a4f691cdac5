"""Java, Maven and the jars of the real Apache Pulsar broker, resolved with Maven once and cached.

:func:`resolve_pulsar` returns the directory of jars :class:`~fedtransport.brokers.standalone.PulsarStandalone`
puts on the JVM's class path; :func:`find_java` the ``java`` it runs them with.

Jar cache
---------
``<cache>/<version>/lib/*.jar`` holds ``pulsar-broker`` and its runtime dependencies, at the
versions Pulsar's own build manages (its parent POM is imported as a BOM), plus the log4j2 SLF4J
binding. The cache root is ``cache_dir``, else ``$FEDTRANSPORT_PULSAR_CACHE``, else
``~/.cache/fedtransport/pulsar`` (``$XDG_CACHE_HOME`` is honoured). Resolution runs
``mvn dependency:copy-dependencies`` on a generated POM under an ``fcntl`` lock
(``<cache>/.<version>.lock``), into a scratch directory that is renamed into place;
``<version>/COMPLETE`` is written last, and a cache without it (or made from a different POM) is
resolved again. Without a ``~/.m2/settings.xml`` of your own, a generated settings file routes
every repository a POM declares to Maven Central (Pulsar's POMs name a Confluent repository that
may be unreachable). Java 17 and Maven are needed: ``apt-get install maven openjdk-17-jre-headless``.

Pulsar 4.0.x ships BookKeeper 4.17.2, whose ``BookieServiceInfo`` has no ``equals``: after a
SIGKILL the bookie's stale registration in the RocksDB metadata store sends its registration
lock into an endless delete/re-create loop and the broker never sees a writable bookie. For
4.0.x the BookKeeper artifacts are therefore taken at :data:`BOOKKEEPER_FIX_VERSION` (4.17.3,
the same line, which has the fix and is what Pulsar 4.2.4 ships).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import BackendError, ConfigError
from ._process import log_tail

__all__ = [
    "APT_HINT",
    "BOOKKEEPER_FIX_VERSION",
    "CACHE_ENV",
    "PULSAR_VERSION",
    "check_version",
    "find_java",
    "find_maven",
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

_MIN_JAVA = 17
_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
_VERSION_RE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+(?:[-.][A-Za-z0-9.]+)?")

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


def check_version(version: str | None) -> str:
    """``version`` (``None``: :data:`PULSAR_VERSION`) if it looks like a release number."""
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
    # Every byte of this text is hashed into the cache's COMPLETE marker: an edit (even of the
    # comment naming the module that once held it) resolves every cache again.
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
    version = check_version(version)
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
