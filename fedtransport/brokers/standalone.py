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
  ~440 MiB resident (``rss_bytes``) with heap 1g / direct memory 1g; ``startup_seconds`` holds
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
  ``"1g"`` (``-XX:MaxDirectMemorySize``; broker and bookie share it, half for their caches and
  half for messages in flight: ``direct_memory_budget`` in standalone_config.py; a size too small
  for two entries of ``maxMessageSize`` per half of the write cache is refused, as is any of the
  three above the machine's physical memory).
- Disk: the bookie's journal files rotate at 256 MiB and go once flushed, its entry logs rotate
  at 256 MiB, garbage collected every 5 s and compacted every 10 s (``DISK_BOUNDS``): a
  benchmark run that grew to 4.9 GB with BookKeeper's defaults peaks at 1.0 GB and ends at 22 MB.
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
``pulsar-broker`` and its runtime jars are resolved with Maven once and cached outside the
repository; :mod:`fedtransport.brokers.pulsar_jars` says where and how (and why BookKeeper is
taken at :data:`~fedtransport.brokers.pulsar_jars.BOOKKEEPER_FIX_VERSION` for 4.0.x). What the
broker is told (``standalone.conf``, ``log4j2.xml``, the JVM command line) is written by
:mod:`fedtransport.brokers.standalone_config`. Java 17 and Maven are needed:
``apt-get install maven openjdk-17-jre-headless``.

Example::

    with PulsarStandalone() as p:
        client = pulsar.Client(p.service_url)
        urllib.request.urlopen(f"{p.admin_url}/admin/v2/clusters")
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import BackendError, ConfigError
from ._process import LOOPBACK, ChildProcess, free_port, stopped_at_exit, wait_until
from .pulsar_jars import (
    APT_HINT,
    BOOKKEEPER_FIX_VERSION,
    PULSAR_VERSION,
    check_version,
    find_java,
    find_maven,
    pulsar_cache_root,
    resolve_pulsar,
)
from .standalone_config import (
    broker_config,
    check_options,
    hs256_token,
    jvm_command,
    jvm_environment,
    make_tls_files,
    secret_bytes,
    tls_files,
    write_run_files,
)

# The jar and token helpers are importable from here too, as they were before the split.
__all__ = [
    "APT_HINT",
    "BOOKKEEPER_FIX_VERSION",
    "PULSAR_VERSION",
    "PulsarStandalone",
    "find_java",
    "find_maven",
    "hs256_token",
    "pulsar_cache_root",
    "resolve_pulsar",
]


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
        direct_memory: str = "1g",
        config: Mapping[str, object] | None = None,
        log_level: str = "warn",
        startup_timeout: float = 180.0,
        stop_timeout: float = 30.0,
        resolve_timeout: float = 1800.0,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        extra = check_options(
            cluster=cluster,
            superuser=superuser,
            heap=heap,
            initial_heap=initial_heap,
            direct_memory=direct_memory,
            log_level=log_level,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
            resolve_timeout=resolve_timeout,
            config=config,
        )
        super().__init__()
        self._cluster = cluster
        self._version = check_version(version)
        self._secret = secret_bytes(token_secret)
        self._superuser = superuser
        self._tls_given = None if tls is None or tls is False or tls is True else tls_files(tls)
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
                self._kill_child()
                if fresh:
                    self._remove_run_dir()
                    self._ports.clear()
                    self._tls_paths = None
                raise
            _live.add(self)
            return self

    def _stop(self) -> None:
        """SIGKILL the broker and delete its run directory (config, logs, data). Idempotent."""
        self._kill_child()
        self._proc = None
        self._remove_run_dir()
        self._ports.clear()
        self._tls_paths = None
        _live.discard(self)

    def restart(self) -> PulsarStandalone:
        """Stop the broker gracefully if it runs, then start it on the same ports and data."""
        with self._lock:
            if self._run_dir is not None:
                self._stop_child(self._stop_timeout)  # SIGKILL after stop_timeout s
            return self.start()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        port = self._ports.get("broker", "?")
        return f"PulsarStandalone({self._version}, pulsar://{LOOPBACK}:{port}, cluster={self._cluster}, {state})"

    # ------------------------------------------------------------------ internals
    def _pick_ports(self) -> None:
        for name in ["broker", "web", "bookie"] + (["broker_tls", "web_tls"] if self._tls else []):
            self._ports[name] = free_port(avoid=self._ports.values())

    def _prepare_tls(self) -> None:
        if not self._tls:
            return
        assert self._run_dir is not None
        self._tls_paths = self._tls_given or make_tls_files(self._run_dir / "tls")

    def _launch(self, java: Path, lib: Path) -> None:
        assert self._run_dir is not None
        config = broker_config(
            cluster=self._cluster,
            run_dir=self._run_dir,
            ports=self._ports,
            tls_paths=self._tls_paths,
            secret=self._secret,
            superuser=self._superuser,
            extra=self._extra_config,
            direct_memory=self._direct_memory,
        )
        write_run_files(self._run_dir, config, self._log_level)
        command = jvm_command(
            java=java,
            lib=lib,
            run_dir=self._run_dir,
            heap=self._heap,
            initial_heap=self._initial_heap,
            direct_memory=self._direct_memory,
            log_level=self._log_level,
            bookie_port=self.bookie_port,
        )
        log = self._run_dir / "broker.log"
        started = time.monotonic()
        # Our own JVM must hold every port (someone else may have taken one), then the admin REST
        # must list the cluster and the default namespace.
        what = f"Apache Pulsar {self._version} standalone on {LOOPBACK}:{self.port}"
        self._spawn(command, log, ports=self._ports.values(), timeout=self._startup_timeout,
                    what=what, append=True, env=jvm_environment())  # fmt: skip
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


# Brokers still running at interpreter exit are stopped so no JVM keeps ports and disk.
_live: set[PulsarStandalone] = stopped_at_exit()
