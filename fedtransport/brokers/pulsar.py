"""An embedded Pulsar-protocol broker: the ``pulsar-lite`` binary run as a child process.

Features
--------
- Starts the Rust broker shipped in the ``pulsar-lite`` wheel (``pip install pulsar-lite``)
  directly, on a free 127.0.0.1 port, and waits (bounded) until that process itself listens
  (a port held by someone else is a start-up failure, not a false "ready").
- Always hands the broker a config file: without one pulsar-lite binds its Prometheus metrics
  endpoint to ``0.0.0.0:8080``. Here metrics listen on ``127.0.0.1:<free port>`` (``metrics_url``)
  or are switched off.
- Throw-away storage by default: pulsar-lite never reclaims acknowledged data on disk, so an
  embedded broker gets a temporary data directory that ``stop()`` deletes. A ``data_dir`` you
  pass is created if needed and kept. The RocksDB store lives in ``<data_dir>/pulsar-lite.rocksdb``
  (the binary appends ``.rocksdb`` to its ``--db-path``).
- Logs go to ``broker.log`` in a private run directory; start-up failures raise
  :class:`~fedtransport.errors.BackendError` with the tail of that log.
- Fault injection for tests: ``kill()`` (SIGKILL) and ``restart()`` (same port, same data dir,
  so clients reconnect and find their unacknowledged messages).
- ``shared_embedded_pulsar()``: one broker per process, started on first use and stopped at
  interpreter exit; the Pulsar backend uses it when no ``service_url`` is configured.

Options (constructor arguments) and defaults
--------------------------------------------
- ``data_dir``: ``None`` -> temporary directory deleted by ``stop()``; a path -> kept.
- ``port``: ``None`` -> a free port picked at first start and kept for every restart.
- ``metrics``: ``True`` -> metrics on ``127.0.0.1:metrics_port``; ``False`` -> disabled
  (the address in the config file is still the loopback one).
- ``metrics_port``: ``None`` -> a free port.
- ``max_message_size``: ``None`` -> the broker's default (5 MiB = 5242880 bytes).
- ``log_level``: ``"warn"`` (``error``, ``warn``, ``info``, ``debug``, ``trace``); ``info`` logs
  every dispatch of a shared subscription, which adds up over a long job.
- ``startup_timeout``: ``20.0`` seconds (the broker usually listens within 30 ms).
- ``binary``: ``None`` -> ``<site-packages>/pulsar_lite/bin/pulsar-lite``.

Config file written (TOML; pulsar-lite ignores keys it does not know)::

    max_message_size_bytes = 5242880     # only when max_message_size is given
    [metrics]
    enabled = true
    addr = "127.0.0.1:<metrics port>"

Example::

    with EmbeddedPulsar() as broker:
        client = pulsar.Client(broker.service_url)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from pathlib import Path

from ..errors import BackendError, ConfigError
from ._process import LOOPBACK, ChildProcess, free_port, port_free, stopped_at_exit

__all__ = ["EmbeddedPulsar", "find_pulsar_lite_binary", "shared_embedded_pulsar"]

_LOG_LEVELS = ("error", "warn", "info", "debug", "trace")
_BINARY_NAME = "pulsar-lite"
_DB_NAME = "pulsar-lite"


def find_pulsar_lite_binary() -> Path:
    """Path of the broker binary inside the installed ``pulsar_lite`` package.

    Located through the import system without importing the package (its ``__init__`` pulls in
    pulsar-client and a process manager we do not want).
    """
    spec = importlib.util.find_spec("pulsar_lite")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("the embedded Pulsar broker needs the pulsar-lite package: pip install pulsar-lite")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / _BINARY_NAME
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise BackendError(
        f"pulsar-lite is installed but its broker binary bin/{_BINARY_NAME} is missing or not "
        f"executable under {list(spec.submodule_search_locations)}: pip install --force-reinstall pulsar-lite"
    )


class EmbeddedPulsar(ChildProcess):
    """A local pulsar-lite broker on 127.0.0.1; see the module docstring for options."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        metrics: bool = True,
        metrics_port: int | None = None,
        max_message_size: int | None = None,
        log_level: str = "warn",
        startup_timeout: float = 20.0,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        if log_level not in _LOG_LEVELS:
            raise ConfigError(f"EmbeddedPulsar log_level must be one of {_LOG_LEVELS}, got {log_level!r}")
        if max_message_size is not None and max_message_size <= 0:
            raise ConfigError(f"EmbeddedPulsar max_message_size must be positive, got {max_message_size}")
        if startup_timeout <= 0:
            raise ConfigError(f"EmbeddedPulsar startup_timeout must be positive, got {startup_timeout}")
        super().__init__()
        self._given_data_dir = Path(data_dir).resolve() if data_dir is not None else None
        self._port = port
        self._metrics = metrics
        self._metrics_port = metrics_port
        self._max_message_size = max_message_size
        self._log_level = log_level
        self._startup_timeout = startup_timeout
        self._binary = Path(binary) if binary is not None else None
        self._data_dir: Path | None = None

    # ------------------------------------------------------------------ properties
    @property
    def port(self) -> int:
        if self._port is None:
            raise BackendError("EmbeddedPulsar has no port yet: call start() first")
        return self._port

    @property
    def service_url(self) -> str:
        return f"pulsar://{LOOPBACK}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_port if self._metrics else None

    @property
    def metrics_url(self) -> str | None:
        """Prometheus text endpoint, or ``None`` when metrics are disabled."""
        if not self._metrics or self._metrics_port is None:
            return None
        return f"http://{LOOPBACK}:{self._metrics_port}/metrics"

    @property
    def data_dir(self) -> Path | None:
        return self._data_dir if self._data_dir is not None else self._given_data_dir

    @property
    def log_path(self) -> Path | None:
        return self._in_run_dir("broker.log")

    @property
    def config_path(self) -> Path | None:
        return self._in_run_dir("pulsar-lite.toml")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> EmbeddedPulsar:
        """Start the broker (no-op when it already runs); returns ``self``."""
        with self._lock:
            if self.running:
                return self
            binary = self._binary if self._binary is not None else find_pulsar_lite_binary()
            if not binary.is_file():
                raise BackendError(f"pulsar-lite binary not found at {binary}: pip install pulsar-lite")
            fresh = self._run_dir is None
            if fresh:
                self._run_dir = Path(tempfile.mkdtemp(prefix="fedtransport-pulsar-"))
                if self._given_data_dir is not None:
                    self._given_data_dir.mkdir(parents=True, exist_ok=True)
                    self._data_dir = self._given_data_dir
                else:
                    self._data_dir = self._run_dir / "data"
            if self._port is None:
                self._port = free_port()
            try:
                self._launch(binary)
            except BaseException:
                # A first start that failed leaves nothing behind; a failed restart keeps the
                # data so the caller can retry.
                self._kill_child()
                if fresh:
                    self._remove_dirs()
                raise
            _live.add(self)
            return self

    def _stop(self) -> None:
        """Stop the broker and delete its run dir and, unless given, its data dir. Idempotent."""
        self._stop_child()
        self._remove_dirs()
        _live.discard(self)

    def restart(self) -> EmbeddedPulsar:
        """Stop the process if it runs and start it again on the same port and data dir."""
        with self._lock:
            self._stop_child()
            return self.start()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        port = self._port if self._port is not None else "?"
        return f"EmbeddedPulsar(pulsar://{LOOPBACK}:{port}, {state}, data_dir={self.data_dir})"

    # ------------------------------------------------------------------ internals
    def _launch(self, binary: Path) -> None:
        assert self._run_dir is not None and self._data_dir is not None and self._port is not None
        if self._metrics and (self._metrics_port is None or not port_free(self._metrics_port)):
            # Re-pick on restart if someone took the old metrics port meanwhile.
            self._metrics_port = free_port()
        config = self.config_path
        log = self.log_path
        assert config is not None and log is not None
        config.write_text(self._config_text())
        cmd = [
            str(binary),
            "--config",
            str(config),
            "--addr",
            f"{LOOPBACK}:{self._port}",
            # pulsar-lite stores its RocksDB at "<db-path>.rocksdb", beside the path it is given.
            "--db-path",
            str(self._data_dir / _DB_NAME),
            "--log-level",
            self._log_level,
        ]
        metrics_port = self._metrics_port if self._metrics else None
        self._spawn(
            cmd,
            log,
            ports=[self._port] if metrics_port is None else [self._port, metrics_port],
            timeout=self._startup_timeout,
            what=f"pulsar-lite broker on {LOOPBACK}:{self._port}",
            append=True,  # a restart adds to the log of the runs before
        )

    def _config_text(self) -> str:
        lines = ["# written by fedtransport.brokers.pulsar.EmbeddedPulsar"]
        if self._max_message_size is not None:
            lines.append(f"max_message_size_bytes = {int(self._max_message_size)}")
        # Bind metrics to loopback even when disabled: the default would be 0.0.0.0:8080.
        metrics_port = self._metrics_port if self._metrics_port is not None else free_port()
        lines += [
            "",
            "[metrics]",
            f"enabled = {'true' if self._metrics else 'false'}",
            f'addr = "{LOOPBACK}:{metrics_port}"',
            "",
        ]
        return "\n".join(lines)

    def _remove_dirs(self) -> None:
        data_dir, self._data_dir = self._data_dir, None
        if data_dir is not None and data_dir != self._given_data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
        self._remove_run_dir()


# Brokers still running at interpreter exit are stopped so no orphan keeps a port and disk.
_live: set[EmbeddedPulsar] = stopped_at_exit()

_shared: EmbeddedPulsar | None = None
_shared_lock = threading.Lock()


def shared_embedded_pulsar() -> EmbeddedPulsar:
    """The process-wide embedded broker: started on first call, stopped at interpreter exit.

    If it died (killed from outside), the next call restarts it on the same port.
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            broker = EmbeddedPulsar()
            broker.start()
            _shared = broker
        elif not _shared.running:
            _shared.restart()
        return _shared
