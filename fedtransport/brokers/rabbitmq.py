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
4369 does not matter. A process killed with SIGKILL cannot clean up itself: a guard process
(:mod:`fedtransport.brokers._guard`) notices its death, SIGKILLs every process carrying the node's
``FEDTRANSPORT_RABBIT_NODE`` marker and deletes the directory.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import BackendError, ConfigError
from ._process import LOOPBACK, Launcher, free_port, log_tail, owned, port_open, release_ports, reserve_port, wait_until
from .rabbit_config import (
    PLUGIN_PORTS,
    check_tls,
    classic_config_text,
    config_file_name,
    config_text,
    node_environment,
    plugin_list,
)
from .rabbit_processes import (
    NodeProcesses,
    default_cookie_home,
    ensure_cookie,
    find_epmd,
    find_server,
    marked_pids,
    node_answers,
    pid_alive,
)

__all__ = ["RabbitNode"]

_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class RabbitNode(Launcher):
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
        self.plugins = plugin_list(plugins)
        self.tls = check_tls(tls)
        self.config = {str(k): str(v) for k, v in (config or {}).items()}
        self.start_timeout = float(start_timeout)
        self.stop_timeout = float(stop_timeout)
        self._base_dir = None if base_dir is None else str(base_dir)
        self.startup_seconds: float | None = None
        self._server = find_server(rabbitmq_home)
        self._epmd_bin = find_epmd()
        self._cookie_home = Path(cookie_home) if cookie_home is not None else default_cookie_home()

        if mng_port is not None and "rabbitmq_management" not in self.plugins:
            raise ConfigError("mng_port needs the rabbitmq_management plugin")
        taken: set[int] = set()
        # Released when the node is stopped or garbage-collected.
        self._ports_finalizer = weakref.finalize(self, release_ports, taken)
        self.port = reserve_port(port, taken)
        self.mng_port: int | None = reserve_port(mng_port, taken) if "rabbitmq_management" in self.plugins else None
        self.dist_port = reserve_port(None, taken)
        self.epmd_port = reserve_port(None, taken)
        self.ssl_port: int | None = None
        if self.tls is not None:
            self.ssl_port = reserve_port(self.tls.get("ssl_port"), taken)
        self.plugin_ports = {p: reserve_port(None, taken) for p in self.plugins if p in PLUGIN_PORTS}

        self._tmp: Path | None = None
        self._marker: str | None = None
        self._rt: NodeProcesses | None = None
        self._finalizer: weakref.finalize[[], RabbitNode] | None = None
        self._closed = False

    @staticmethod
    def installed(rabbitmq_home: str | None = None) -> bool:
        """Whether rabbitmq-server and epmd are there to start nodes with."""
        try:
            find_server(rabbitmq_home)
            find_epmd()
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
        return [pid for pid in marked_pids(self._marker) if pid_alive(pid)]

    @property
    def env(self) -> dict[str, str]:
        """Environment for RabbitMQ CLI tools (rabbitmqctl, rabbitmq-diagnostics) aimed at this node."""
        if self._tmp is None:
            raise BackendError(f"RabbitMQ node {self.node_name} is not started")
        return node_environment(self, self._tmp, self._cookie_home)

    # ------------------------------------------------------------------ lifecycle

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
            self._finalizer()  # runs NodeProcesses.shutdown at most once
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

    def _prepare(self) -> None:
        ensure_cookie(self._cookie_home)
        tmp = Path(tempfile.mkdtemp(prefix=f"fedtransport-rabbit-{self.name}-", dir=self._base_dir))
        rt = NodeProcesses(tmp, tmp.name, self.stop_timeout)
        self._tmp, self._rt, self._marker = tmp, rt, tmp.name
        self._finalizer = weakref.finalize(self, rt.shutdown)
        owned.add(rt, rt.shutdown)  # on SIGTERM too, which skips the finalizer
        (tmp / "mnesia").mkdir()
        (tmp / "log").mkdir()
        (tmp / "rabbitmq-env.conf").write_text("")
        conf = tmp / config_file_name(self.config)
        conf.write_text(config_text(self) if self.config else classic_config_text(self))
        conf.chmod(0o600)  # holds the admin password
        (tmp / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        epmd = [self._epmd_bin, "-address", LOOPBACK, "-port", str(self.epmd_port)]
        rt.epmd = rt.spawn(epmd, node_environment(self, tmp, self._cookie_home), tmp / "log" / "epmd.log")
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
        began = time.monotonic()
        # Foreground mode (not -detached): the wrapper shell keeps the VM's stdout, where
        # early boot failures such as a bad config are printed, and gives us a child to watch.
        env = node_environment(self, tmp, self._cookie_home)
        rt.server = rt.spawn([str(self._server)], env, tmp / "log" / "startup.log", append=True)
        try:
            wait_until(
                lambda: node_answers(self),
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

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RabbitNode {self.node_name} amqp={self.port} mng={self.mng_port} {state}>"
