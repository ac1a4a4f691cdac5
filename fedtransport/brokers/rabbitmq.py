"""Throw-away RabbitMQ nodes for the demo, the benchmarks and the tests.

``RabbitNode`` runs the Debian ``rabbitmq-server`` (3.10, Erlang/OTP 25) as a private node::

    with RabbitNode(name="party-a") as n:
        n.port, n.mng_port, n.user, n.password, n.amqp_url, n.mng_url

Features
  * Every listener binds to 127.0.0.1 on a free port: AMQP, management HTTP, Erlang
    distribution, an optional AMQPS listener, a private ``epmd``, and the fixed-port listeners of
    the prometheus/stream/mqtt/stomp/web_* plugins when enabled (``n.plugin_ports``); a system
    RabbitMQ on 5672/15672/4369/25672 does not matter.
  * A unique Erlang node name per instance (``{name}-{8 hex}@localhost``), its own data, log,
    config and enabled-plugins files in a temporary directory (``n.data_dir``, ``n.log_file``).
  * Ready means: the management API answers an authenticated ``GET /api/overview`` *from this
    node* (its node name) and lists the AMQP (and AMQPS) listener; without the management
    plugin, AMQP answers the protocol header with ``connection.start``. A bare TCP connect is not
    trusted: someone else may hold a port we picked. ``n.startup_seconds`` is the measured time
    (7-10 s on an idle 2-core machine, up to ~25 s under load).
  * ``stop()`` (idempotent; also ``__exit__`` and interpreter exit) sends SIGTERM to the pid in
    the node's pid file, SIGKILL after ``stop_timeout``, kills whatever else the node spawned
    (found by a per-node marker in the process environment), stops the private epmd and deletes
    the temporary directory. A graceful stop takes ~6 s with the management plugin (its shutdown
    waits out a 5 s timeout), ~1 s without.
  * ``kill()`` SIGKILLs the node (a crash, for fault tests); ``restart()`` stops it gracefully if
    it runs and starts it again on the same ports, node name and data directory, so durable
    queues and persistent messages survive. A start or restart that fails stops the node and
    deletes its data, and raises ``BackendError`` with the tail of the node's logs.
  * ``uri(vhost, user=, password=, tls=)`` builds AMQP URIs (e.g. federation upstreams);
    ``ctl(*args)`` runs ``rabbitmqctl`` against the node; ``processes()`` lists the live pids it
    started; ``RabbitNode.installed()`` tells whether nodes can be started here.

Options (constructor) and defaults
  name="party-a"        prefix of the node name; [A-Za-z0-9_-]
  port=None             AMQP port (None: a free one; a busy port raises BackendError)
  mng_port=None         management HTTP port (None: a free one)
  plugins=("rabbitmq_management", "rabbitmq_federation")
                        enabled plugins; federation brings ``rabbitmq_federation_management``
                        (the ``/api/federation-links`` endpoint) and the management plugin
  user="admin"          administrator created at first boot (``default_user``; tag administrator)
  password=None         its password (None: random per node)
  tls=None              mapping: certfile, keyfile, cacertfile (required), ssl_port (None: a
                        free one), require_peer_cert (False: verify_none and
                        fail_if_no_peer_cert=false; True: verify_peer, a client certificate
                        signed by cacertfile is required) -> ``n.ssl_port``, ``n.amqps_url``
  config=None           extra ``rabbitmq.conf`` keys (mapping of key -> value). Without it the
                        node gets the same settings in the classic Erlang-term file, which skips
                        cuttlefish schema translation: ~7 s faster boot here.
  start_timeout=120.0   seconds to wait for readiness
  stop_timeout=30.0     seconds between SIGTERM and SIGKILL
  base_dir=None         where the temporary directory is made (None: the system default)
  rabbitmq_home=None    RabbitMQ installation (None: $FEDTRANSPORT_RABBITMQ_HOME or
                        /usr/lib/rabbitmq); its bin/ or sbin/ must hold rabbitmq-server. Missing:
                        BackendError saying ``apt-get install -y rabbitmq-server``.
  cookie_home=None      HOME holding the shared ``.erlang.cookie`` (mode 400; None:
                        ~/.cache/fedtransport/rabbitmq-home, kept between runs) so every node we
                        start, and rabbitmqctl, use one cookie

Process model: ``rabbitmq-server`` runs in the foreground (not ``-detached``) under its wrapper
shell, with output to ``log/startup.log``: boot failures printed before logging is set up (a bad
config, a busy distribution port) reach the error message, and the shell is a child to watch.
Each node runs its own epmd (``epmd -address 127.0.0.1 -port P``, ``ERL_EPMD_PORT=P``) and stops
it with the node, so a stopped node leaves no process at all, and whether a system epmd runs on
4369 does not matter. A process killed with SIGKILL cannot clean up: its nodes stay (find them
by ``FEDTRANSPORT_RABBIT_NODE`` in /proc/*/environ).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from ..errors import BackendError, ConfigError
from ._process import LOOPBACK, free_port, log_tail, owned, port_open, stop_pid, wait_until

__all__ = ["RabbitNode"]

_INSTALL_HINT = "apt-get install -y rabbitmq-server"
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MARKER = "FEDTRANSPORT_RABBIT_NODE"
# The node is on loopback: never route the readiness probe through an environment proxy.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_TLS_KEYS = {"certfile", "keyfile", "cacertfile", "ssl_port", "require_peer_cert"}

# Plugins that would otherwise bind a fixed, well-known port: how to move them to a free one.
# plugin: (rabbitmq.conf port key, conf value is "ip:port", conf ip key or "", classic-format style)
# where the classic style is "listeners" ({tcp_listeners, [{IP, Port}]}) or "tcp_config".
_PLUGIN_PORTS: dict[str, tuple[str, bool, str, str]] = {
    "rabbitmq_prometheus": ("prometheus.tcp.port", False, "prometheus.tcp.ip", "tcp_config"),
    "rabbitmq_stream": ("stream.listeners.tcp.1", True, "", "listeners"),
    "rabbitmq_mqtt": ("mqtt.listeners.tcp.default", True, "", "listeners"),
    "rabbitmq_stomp": ("stomp.listeners.tcp.1", True, "", "listeners"),
    "rabbitmq_web_stomp": ("web_stomp.tcp.port", False, "web_stomp.tcp.ip", "tcp_config"),
    "rabbitmq_web_mqtt": ("web_mqtt.tcp.port", False, "web_mqtt.tcp.ip", "tcp_config"),
}


def _erl_str(text: str) -> str:
    """An Erlang string literal (a list of characters)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _erl_bin(text: str) -> str:
    return f"<<{_erl_str(text)}/utf8>>"


# Ports handed to nodes of this process that are not stopped yet.
_RESERVED: set[int] = set()
_RESERVED_LOCK = threading.Lock()


def _release_ports(ports: set[int]) -> None:
    with _RESERVED_LOCK:
        _RESERVED.difference_update(ports)


def _find_server(rabbitmq_home: str | None) -> Path:
    home = Path(rabbitmq_home or os.environ.get("FEDTRANSPORT_RABBITMQ_HOME") or "/usr/lib/rabbitmq")
    # The /usr/sbin wrapper switches to the rabbitmq user, so use the real script.
    for sub in ("bin", "sbin"):
        script = home / sub / "rabbitmq-server"
        if script.is_file() and os.access(script, os.X_OK):
            return script
    raise BackendError(
        f"rabbitmq-server is not installed (no {home}/bin/rabbitmq-server); install it with: {_INSTALL_HINT}"
    )


def _find_epmd() -> str:
    found = shutil.which("epmd")
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"), reverse=True):
        return str(candidate)
    raise BackendError(f"epmd (Erlang) is not installed; install RabbitMQ with: {_INSTALL_HINT}")


def _default_cookie_home() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "fedtransport" / "rabbitmq-home"


def _ensure_cookie(home: Path) -> None:
    """Create ``home/.erlang.cookie`` (mode 400) once; concurrent creators agree on one file."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    cookie = home / ".erlang.cookie"
    if cookie.exists():
        if cookie.stat().st_uid != os.getuid():
            raise BackendError(f"{cookie} belongs to another user; pass cookie_home= to RabbitNode")
        return
    draft = home / f".erlang.cookie.{os.getpid()}.{secrets.token_hex(4)}"
    draft.write_text(secrets.token_hex(20).upper())
    draft.chmod(0o400)
    try:
        os.link(draft, cookie)  # atomic: a concurrent process either wins or sees ours
    except FileExistsError:
        pass
    finally:
        draft.unlink()


def _amqp_answers(port: int) -> bool:
    """True when an AMQP 0-9-1 broker answers the protocol header with Connection.Start."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=2.0) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            data = b""
            while len(data) < 11:
                chunk = sock.recv(11 - len(data))
                if not chunk:
                    return False
                data += chunk
    except OSError:
        return False
    # Frame type 1 (method), then class 10 / method 10 (connection.start) after the 7-byte header.
    return data[0] == 1 and data[7:11] == b"\x00\x0a\x00\x0a"


def _marked_pids(marker: str) -> list[int]:
    """Pids of processes whose environment carries this node's marker (all it spawned)."""
    needle = f"{_MARKER}={marker}".encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env:
            found.append(int(entry.name))
    return found


def _kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class _Runtime:
    """Process handles and files of one node; shared with the exit-time finalizer."""

    def __init__(self, tmp: Path, marker: str, stop_timeout: float) -> None:
        self.tmp = tmp
        self.marker = marker
        self.stop_timeout = stop_timeout
        self.server: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self.pid_file = tmp / "rabbit.pid"
        self.owner_pid = os.getpid()  # a forked child never stops or deletes the node

    def beam_pid(self) -> int | None:
        """The VM's pid from the pid file, if that process is alive and really ours.

        A VM that died on its own leaves a stale file whose pid may since belong to someone else.
        """
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) and pid in _marked_pids(self.marker) else None

    def stop_server(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the broker (graceful with SIGTERM), then anything it left; epmd stays."""
        pid = self.beam_pid()
        if pid is not None:
            if sig == signal.SIGKILL:
                _kill_pids([pid])
            stop_pid(pid, timeout=self.stop_timeout)
        if self.server is not None:
            # The wrapper shell exits once the VM is gone; without a VM pid, stop the shell.
            try:
                self.server.wait(self.stop_timeout if pid is not None else 0.01)
            except subprocess.TimeoutExpired:
                self.server.terminate()
                try:
                    self.server.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self.server.kill()
                    self.server.wait()
            self.server = None
        keep = {self.epmd.pid} if self.epmd is not None and self.epmd.poll() is None else set()
        self._sweep(keep)
        self.pid_file.unlink(missing_ok=True)

    def _sweep(self, keep: set[int], grace: float = 5.0) -> None:
        # erl_child_setup, inet_gethost and similar helpers die with the VM: give them ``grace``
        # seconds, SIGKILL what is left, and give up after as long again (a process stuck in
        # the kernel cannot be helped).
        killed = False
        deadline = time.monotonic() + grace
        delay = 0.02
        while True:
            left = [p for p in _marked_pids(self.marker) if p not in keep and _pid_alive(p)]
            if not left:
                return
            if time.monotonic() >= deadline:
                if killed:
                    return
                _kill_pids(left)
                killed = True
                deadline = time.monotonic() + grace
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def shutdown(self) -> None:
        """Stop everything and delete the files; safe to call more than once."""
        if os.getpid() != self.owner_pid:
            return
        owned.discard(self)
        try:
            self.stop_server()
            if self.epmd is not None:
                self.epmd.terminate()
                try:
                    self.epmd.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self.epmd.kill()
                    self.epmd.wait()
                self.epmd = None
            self._sweep(set())
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


class RabbitNode:
    """A throw-away RabbitMQ node on free loopback ports (see the module docstring)."""

    def __init__(
        self,
        name: str = "party-a",
        port: int | None = None,
        mng_port: int | None = None,
        plugins: Iterable[str] = ("rabbitmq_management", "rabbitmq_federation"),
        *,
        user: str = "admin",
        password: str | None = None,
        tls: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        start_timeout: float = 120.0,
        stop_timeout: float = 30.0,
        base_dir: str | os.PathLike[str] | None = None,
        rabbitmq_home: str | None = None,
        cookie_home: str | os.PathLike[str] | None = None,
    ) -> None:
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(f"RabbitNode name {name!r} must match [A-Za-z0-9_-]{{1,64}}")
        if not user or ":" in user:
            raise ConfigError(f"RabbitNode user {user!r} must be non-empty without ':'")
        self.name = name
        self.node_name = f"{name}-{secrets.token_hex(4)}@localhost"
        self.user = user
        self.password = password if password is not None else secrets.token_urlsafe(18)
        self.plugins = self._plugin_list(plugins)
        self.tls = self._check_tls(tls)
        self.config = {str(k): str(v) for k, v in (config or {}).items()}
        self.start_timeout = float(start_timeout)
        self.stop_timeout = float(stop_timeout)
        self._base_dir = None if base_dir is None else str(base_dir)
        self.startup_seconds: float | None = None
        self._server = _find_server(rabbitmq_home)
        self._epmd_bin = _find_epmd()
        self._cookie_home = Path(cookie_home) if cookie_home is not None else _default_cookie_home()

        if mng_port is not None and "rabbitmq_management" not in self.plugins:
            raise ConfigError("mng_port needs the rabbitmq_management plugin")
        taken: set[int] = set()
        # Released when the node is stopped or garbage-collected.
        self._ports_finalizer = weakref.finalize(self, _release_ports, taken)
        self.port = self._port(port, taken)
        self.mng_port: int | None = self._port(mng_port, taken) if "rabbitmq_management" in self.plugins else None
        self.dist_port = self._port(None, taken)
        self.epmd_port = self._port(None, taken)
        self.ssl_port: int | None = None
        if self.tls is not None:
            self.ssl_port = self._port(self.tls.get("ssl_port"), taken)
        self.plugin_ports = {p: self._port(None, taken) for p in self.plugins if p in _PLUGIN_PORTS}

        self._tmp: Path | None = None
        self._marker: str | None = None
        self._rt: _Runtime | None = None
        self._finalizer: weakref.finalize | None = None
        self._closed = False

    @staticmethod
    def installed(rabbitmq_home: str | None = None) -> bool:
        """Whether rabbitmq-server and epmd are there to start nodes with."""
        try:
            _find_server(rabbitmq_home)
            _find_epmd()
        except BackendError:
            return False
        return True

    # ------------------------------------------------------------------ properties

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def amqp_url(self) -> str:
        """``amqp://user:password@127.0.0.1:PORT/%2F`` (the admin user, the default vhost)."""
        return self.uri()

    @property
    def amqps_url(self) -> str | None:
        """The same through the AMQPS listener (None without ``tls``)."""
        return None if self.ssl_port is None else self.uri(tls=True)

    def uri(self, vhost: str = "/", *, user: str | None = None, password: str | None = None, tls: bool = False) -> str:
        """An AMQP URI for this node, e.g. a federation upstream's ``uri`` (vhost URL-encoded)."""
        if tls and self.ssl_port is None:
            raise ConfigError(f"RabbitMQ node {self.node_name} has no TLS listener (pass tls=...)")
        who = quote(self.user if user is None else user, safe="")
        secret = quote(self.password if password is None else password, safe="")
        scheme, port = ("amqps", self.ssl_port) if tls else ("amqp", self.port)
        return f"{scheme}://{who}:{secret}@{LOOPBACK}:{port}/{quote(vhost, safe='')}"

    @property
    def mng_url(self) -> str | None:
        """``http://127.0.0.1:MNG`` (None without the management plugin)."""
        return None if self.mng_port is None else f"http://{LOOPBACK}:{self.mng_port}"

    @property
    def data_dir(self) -> Path | None:
        """The node's temporary directory (mnesia, logs, config); None before start / after stop."""
        return self._tmp

    @property
    def log_file(self) -> Path | None:
        return None if self._tmp is None else self._tmp / "log" / "rabbit.log"

    @property
    def pid(self) -> int | None:
        """Pid of the Erlang VM while it runs."""
        return None if self._rt is None else self._rt.beam_pid()

    @property
    def running(self) -> bool:
        return self._rt is not None and self._rt.server is not None and self._rt.server.poll() is None

    def processes(self) -> list[int]:
        """Pids of live processes this node started (shell, VM, helpers, epmd); [] after stop()."""
        if self._marker is None:
            return []
        return [pid for pid in _marked_pids(self._marker) if _pid_alive(pid)]

    @property
    def env(self) -> dict[str, str]:
        """Environment for RabbitMQ CLI tools (rabbitmqctl, rabbitmq-diagnostics) aimed at this node."""
        if self._tmp is None:
            raise BackendError(f"RabbitMQ node {self.node_name} is not started")
        return self._environment(self._tmp)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> RabbitNode:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> RabbitNode:
        """Start the node and wait until AMQP and the management API answer."""
        if self._closed:
            raise BackendError(f"RabbitMQ node {self.node_name} was stopped and its data deleted")
        if self.running:
            return self
        if self._rt is None:
            self._prepare()
        self._launch()
        return self

    def stop(self) -> None:
        """Stop the node, its helpers and epmd, and delete its directory. Idempotent."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()  # runs _Runtime.shutdown at most once
        self._ports_finalizer()
        self._rt = None
        self._tmp = None

    close = stop

    def kill(self) -> None:
        """SIGKILL the node (a crash, for fault tests); data stays for ``restart()``."""
        if self._rt is None:
            return
        self._rt.stop_server(signal.SIGKILL)

    def restart(self) -> None:
        """Stop the node if it runs (SIGTERM) and start it on the same ports, name and data."""
        if self._closed or self._rt is None:
            raise BackendError(f"RabbitMQ node {self.node_name} is not started (or was stopped)")
        self._rt.stop_server()
        self._launch()

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n NODE *args`` and return its output."""
        ctl = self._server.parent / "rabbitmqctl"
        env = self.env
        # The CLI's own distribution ports default to a fixed 35672-35682 range.
        cli_port = free_port()
        env["RABBITMQ_CTL_DIST_PORT_MIN"] = str(cli_port)
        env["RABBITMQ_CTL_DIST_PORT_MAX"] = str(cli_port)
        try:
            done = subprocess.run(
                [str(ctl), "-n", self.node_name, *args],
                env=env,
                cwd=str(self._tmp),
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BackendError(f"rabbitmqctl {' '.join(args)} did not finish in {timeout:.0f} s") from None
        out = done.stdout.decode(errors="replace")
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip() or out.strip()
            raise BackendError(f"rabbitmqctl {' '.join(args)} failed ({done.returncode})", broker_message=err)
        return out

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _plugin_list(plugins: Iterable[str]) -> tuple[str, ...]:
        if isinstance(plugins, str):
            plugins = [plugins]
        names: list[str] = []
        for p in plugins:
            if not re.fullmatch(r"[a-z0-9_]+", p):
                raise ConfigError(f"RabbitMQ plugin name {p!r} is not valid")
            if p not in names:
                names.append(p)
        if "rabbitmq_federation" in names and "rabbitmq_federation_management" not in names:
            # Shows federation links in the management API (GET /api/federation-links).
            names.append("rabbitmq_federation_management")
            if "rabbitmq_management" not in names:
                names.append("rabbitmq_management")
        return tuple(names)

    @staticmethod
    def _check_tls(tls: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if tls is None:
            return None
        unknown = set(tls) - _TLS_KEYS
        if unknown:
            raise ConfigError(f"unknown RabbitNode tls key(s) {sorted(unknown)}; known: {sorted(_TLS_KEYS)}")
        out: dict[str, Any] = dict(tls)
        for key in ("certfile", "keyfile", "cacertfile"):
            if not out.get(key):
                raise ConfigError(f"RabbitNode tls needs {key!r}")
            path = Path(out[key]).resolve()
            if not path.is_file():
                raise ConfigError(f"RabbitNode tls {key} {str(path)!r} does not exist")
            out[key] = str(path)
        out["require_peer_cert"] = bool(out.get("require_peer_cert", False))
        return out

    @staticmethod
    def _port(wanted: Any, taken: set[int]) -> int:
        with _RESERVED_LOCK:
            if wanted is not None:
                port = int(wanted)
                if port in taken or port in _RESERVED:
                    raise ConfigError(f"port {port} is asked for twice")
                if port_open(port):
                    raise BackendError(f"port {port} on {LOOPBACK} is already in use")
            else:
                # A port free now may be handed out again before a node binds it: skip the ones
                # other nodes of this process hold.
                port = free_port()
                while port in taken or port in _RESERVED:
                    port = free_port()
            taken.add(port)
            _RESERVED.add(port)
        return port

    def _environment(self, tmp: Path) -> dict[str, str]:
        # Inherited RABBITMQ_*/ERL_* settings would point the node at someone else's files.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        dist_args = "-kernel inet_dist_use_interface {127,0,0,1}"
        env.update(
            {
                "HOME": str(self._cookie_home),
                _MARKER: tmp.name,
                "ERL_EPMD_ADDRESS": LOOPBACK,
                "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_CRASH_DUMP": str(tmp / "log" / "erl_crash.dump"),
                "RABBITMQ_NODENAME": self.node_name,
                "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(tmp / "mnesia"),
                "RABBITMQ_LOG_BASE": str(tmp / "log"),
                "RABBITMQ_LOGS": str(tmp / "log" / "rabbit.log"),
                "RABBITMQ_CONFIG_FILE": str(tmp / self._config_name),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(tmp / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(tmp / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(tmp / "rabbit.pid"),
                "RABBITMQ_CONF_ENV_FILE": str(tmp / "rabbitmq-env.conf"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": dist_args,
                "RABBITMQ_CTL_ERL_ARGS": dist_args,
            }
        )
        return env

    @property
    def _config_name(self) -> str:
        # rabbitmq.conf goes through cuttlefish schema translation, which costs ~7 s of boot
        # here; the classic Erlang-term file does not, so it is used unless conf keys are given.
        return "rabbitmq.conf" if self.config else "rabbitmq.config"

    def _config_text(self) -> str:
        lines = {
            "listeners.tcp.1": f"{LOOPBACK}:{self.port}",
            "loopback_users": "none",
            "default_user": self.user,
            "default_pass": self.password,
        }
        if self.mng_port is not None:
            lines["management.tcp.ip"] = LOOPBACK
            lines["management.tcp.port"] = str(self.mng_port)
        if self.tls is not None:
            require = self.tls["require_peer_cert"]
            lines.update(
                {
                    "listeners.ssl.1": f"{LOOPBACK}:{self.ssl_port}",
                    "ssl_options.cacertfile": self.tls["cacertfile"],
                    "ssl_options.certfile": self.tls["certfile"],
                    "ssl_options.keyfile": self.tls["keyfile"],
                    "ssl_options.verify": "verify_peer" if require else "verify_none",
                    "ssl_options.fail_if_no_peer_cert": "true" if require else "false",
                }
            )
        for plugin, port in self.plugin_ports.items():
            key, with_ip, ip_key, _ = _PLUGIN_PORTS[plugin]
            lines[key] = f"{LOOPBACK}:{port}" if with_ip else str(port)
            if ip_key:
                lines[ip_key] = LOOPBACK
        lines.update(self.config)
        return "".join(f"{k} = {v}\n" for k, v in lines.items())

    def _classic_config_text(self) -> str:
        """The same settings in the classic Erlang-term format, which skips cuttlefish."""
        ip = _erl_str(LOOPBACK)
        rabbit = [
            f"{{tcp_listeners, [{{{ip}, {self.port}}}]}}",
            "{loopback_users, []}",
            f"{{default_user, {_erl_bin(self.user)}}}",
            f"{{default_pass, {_erl_bin(self.password)}}}",
        ]
        if self.tls is not None:
            require = self.tls["require_peer_cert"]
            options = ", ".join(
                [
                    *(f"{{{k}, {_erl_str(self.tls[k])}}}" for k in ("cacertfile", "certfile", "keyfile")),
                    f"{{verify, {'verify_peer' if require else 'verify_none'}}}",
                    f"{{fail_if_no_peer_cert, {'true' if require else 'false'}}}",
                ]
            )
            rabbit.append(f"{{ssl_listeners, [{{{ip}, {self.ssl_port}}}]}}")
            rabbit.append(f"{{ssl_options, [{options}]}}")
        apps = [f"{{rabbit, [{', '.join(rabbit)}]}}"]
        if self.mng_port is not None:
            mng = f"[{{ip, {ip}}}, {{port, {self.mng_port}}}]"
            apps.append(f"{{rabbitmq_management, [{{tcp_config, {mng}}}]}}")
        for plugin, port in self.plugin_ports.items():
            if _PLUGIN_PORTS[plugin][3] == "listeners":
                apps.append(f"{{{plugin}, [{{tcp_listeners, [{{{ip}, {port}}}]}}]}}")
            else:
                apps.append(f"{{{plugin}, [{{tcp_config, [{{ip, {ip}}}, {{port, {port}}}]}}]}}")
        return "[\n " + ",\n ".join(apps) + "\n].\n"

    def _prepare(self) -> None:
        _ensure_cookie(self._cookie_home)
        tmp = Path(tempfile.mkdtemp(prefix=f"fedtransport-rabbit-{self.name}-", dir=self._base_dir))
        rt = _Runtime(tmp, tmp.name, self.stop_timeout)
        self._tmp, self._rt, self._marker = tmp, rt, tmp.name
        self._finalizer = weakref.finalize(self, rt.shutdown)
        owned.add(rt, rt.shutdown)  # on SIGTERM too, which skips the finalizer
        (tmp / "mnesia").mkdir()
        (tmp / "log").mkdir()
        (tmp / "rabbitmq-env.conf").write_text("")
        conf = tmp / self._config_name
        conf.write_text(self._config_text() if self.config else self._classic_config_text())
        conf.chmod(0o600)  # holds the admin password
        (tmp / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        epmd_log = open(tmp / "log" / "epmd.log", "wb")  # noqa: SIM115 - handed to the child
        try:
            rt.epmd = subprocess.Popen(
                [self._epmd_bin, "-address", LOOPBACK, "-port", str(self.epmd_port)],
                env=self._environment(tmp),
                cwd=str(tmp),
                stdin=subprocess.DEVNULL,
                stdout=epmd_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            epmd_log.close()
        try:
            wait_until(
                lambda: port_open(self.epmd_port),
                timeout=10.0,
                what=f"epmd for {self.node_name}",
                alive=lambda: rt.epmd is not None and rt.epmd.poll() is None,
                log=tmp / "log" / "epmd.log",
            )
        except BackendError:
            self.stop()
            raise

    def _launch(self) -> None:
        rt, tmp = self._rt, self._tmp
        assert rt is not None and tmp is not None
        out = open(tmp / "log" / "startup.log", "ab")  # noqa: SIM115 - handed to the child
        began = time.monotonic()
        try:
            # Foreground mode (not -detached): the wrapper shell keeps the VM's stdout, where
            # early boot failures such as a bad config are printed, and gives us a child to watch.
            rt.server = subprocess.Popen(
                [str(self._server)],
                env=self._environment(tmp),
                cwd=str(tmp),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        try:
            wait_until(
                self._ready,
                timeout=self.start_timeout,
                what=f"RabbitMQ node {self.node_name}",
                alive=lambda: rt.server is not None and rt.server.poll() is None,
                log=None,
            )
        except BackendError as exc:
            detail = log_tail(tmp / "log" / "startup.log") + log_tail(self.log_file)
            try:
                rt.stop_server(signal.SIGKILL)
            finally:
                self.stop()
            raise BackendError(f"{exc}{detail}") from None
        self.startup_seconds = time.monotonic() - began

    def _ready(self) -> bool:
        """Ready = AMQP and the management API answer, and it is this node that answers.

        A bare TCP connect is not enough: someone else may hold a port we picked.
        """
        if self.mng_url is None:
            return _amqp_answers(self.port) and (self.ssl_port is None or port_open(self.ssl_port))
        req = urllib.request.Request(f"{self.mng_url}/api/overview")
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        try:
            with _DIRECT.open(req, timeout=2.0) as resp:
                overview = json.loads(resp.read())
        except (OSError, ValueError, http.client.HTTPException):
            return False
        if not isinstance(overview, dict) or overview.get("node") != self.node_name:
            return False
        # The management API comes up before the AMQP listeners: wait until they are listed.
        listening = {(x.get("protocol"), x.get("port")) for x in overview.get("listeners") or []}
        if ("amqp", self.port) not in listening:
            return False
        return self.ssl_port is None or ("amqp/ssl", self.ssl_port) in listening

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RabbitNode {self.node_name} amqp={self.port} mng={self.mng_port} {state}>"
