"""A throw-away haproxy on 127.0.0.1: the SNI router of a star network, or a TLS terminator.

Two modes, exactly one per instance:

``sni_routes={"9999.fate.org": ("127.0.0.1", 6651), ...}``
    The centre of FATE's star network. One ``mode tcp`` frontend reads the TLS ClientHello,
    picks the backend whose name equals the requested server name (SNI, case-insensitive) and
    tunnels the raw byte stream to it: TLS is end to end between client and backend, the proxy
    holds no key. A ClientHello naming any other server, or bytes that are not a ClientHello,
    get the connection closed.

``tls_terminate={"backend": ("127.0.0.1", 5672), "certfile": "proxy.pem"}``
    TLS in front of a plaintext listener: haproxy presents ``certfile`` (certificate + key in one
    PEM, as ``fedtransport.certs`` writes them) and forwards decrypted TCP to ``backend``.
    Optional ``cafile`` makes client certificates signed by that CA mandatory.

Example::

    with HAProxy(sni_routes={"9999.fate.test": ("127.0.0.1", broker_tls_port)}) as router:
        client connects to (router.host, router.port) with server_hostname="9999.fate.test"

The process runs in the foreground (``haproxy -f <cfg> -db``) as our child, so ``stop()`` is a
SIGTERM and a wait. Config and log (haproxy's stderr, one line per connection showing the
backend chosen) live in a temporary directory deleted by ``stop()``; ``config_text`` shows the
config. Nothing needs root: no chroot, no user switch, a small ``maxconn``. Timeouts: connect
5 s, client/server 1 h, so long transfers are not cut.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..certs import validate_hostname
from ..errors import BackendError, ConfigError
from ._process import LOOPBACK, ChildProcess, free_port, stopped_at_exit

__all__ = ["HAProxy"]

_INSTALL_HINT = "apt-get install -y haproxy"
_TLS_KEYS = {"backend", "certfile", "cafile"}
_BIND_ATTEMPTS = 3  # another process may take a free port before haproxy binds it


def _find_haproxy(binary: str | os.PathLike[str] | None) -> str:
    if binary is not None:
        path = Path(binary)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        raise BackendError(f"haproxy not found at {path}; install it with: {_INSTALL_HINT}")
    # /usr/sbin is often missing from a non-root PATH.
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise BackendError(f"haproxy is not installed (not on PATH nor in /usr/sbin); install it with: {_INSTALL_HINT}")
    return found


def _check_port(port: object, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{what} must be a TCP port 1-65535, got {port!r}")
    return port


def _server_address(target: object, what: str) -> str:
    """``(host, port)`` as haproxy writes a server address."""
    if not isinstance(target, (tuple, list)) or len(target) != 2:
        raise ConfigError(f"{what} must be a (host, port) pair, got {target!r}")
    host = validate_hostname(target[0], what=f"{what} host")
    port = _check_port(target[1], f"{what} port")
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"ipv6@{host}:{port}"  # haproxy reads the last colon as the port separator
    except ValueError:
        pass
    return f"{host}:{port}"


def _quoted_file(path: object, what: str) -> str:
    """An existing file's absolute path, single-quoted for the config (no expansion inside)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"{what} must be a path, got {path!r}")
    resolved = Path(path).resolve()
    text = str(resolved)
    if any(c in text for c in "'\n\r"):
        raise ConfigError(f"{what} {text!r} contains a quote or a line break; haproxy cannot be given it")
    if not resolved.is_file():
        raise ConfigError(f"{what} {text} does not exist")
    return f"'{text}'"


class HAProxy(ChildProcess):
    """A local haproxy process; see the module docstring for the two modes."""

    def __init__(
        self,
        *,
        sni_routes: Mapping[str, tuple[str, int]] | None = None,
        tls_terminate: Mapping[str, Any] | None = None,
        port: int | None = None,
        maxconn: int = 256,
        startup_timeout: float = 15.0,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        if (sni_routes is None) == (tls_terminate is None):
            raise ConfigError(
                "HAProxy needs exactly one of sni_routes= (SNI router) or tls_terminate= (TLS terminator)"
            )
        if isinstance(maxconn, bool) or not isinstance(maxconn, int) or maxconn <= 0:
            raise ConfigError(f"HAProxy maxconn must be a positive int, got {maxconn!r}")
        if startup_timeout <= 0:
            raise ConfigError(f"HAProxy startup_timeout must be positive, got {startup_timeout}")
        super().__init__()
        self._routes: dict[str, str] = {}
        self._tls: dict[str, str] = {}
        if sni_routes is not None:
            self._routes = self._check_routes(sni_routes)
        else:
            assert tls_terminate is not None
            self._tls = self._check_tls(tls_terminate)
        self._fixed_port = port is not None
        self._port = _check_port(port, "HAProxy port") if port is not None else free_port()
        self._maxconn = maxconn
        self._startup_timeout = startup_timeout
        self._binary = binary

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_routes(routes: Mapping[str, tuple[str, int]]) -> dict[str, str]:
        if not isinstance(routes, Mapping) or not routes:
            raise ConfigError("sni_routes must be a non-empty mapping of server name -> (host, port)")
        checked: dict[str, str] = {}
        for name, target in routes.items():
            sni = validate_hostname(name, what="SNI server name")
            try:
                ipaddress.ip_address(sni)
            except ValueError:
                pass
            else:  # RFC 6066: clients never send an IP address as SNI
                raise ConfigError(f"SNI server name {name!r} is an IP address; TLS clients send no SNI for those")
            if sni in checked:
                raise ConfigError(f"SNI server name {name!r} is routed twice (names are case-insensitive)")
            checked[sni] = _server_address(target, f"sni_routes[{name!r}]")
        return checked

    @staticmethod
    def _check_tls(tls: Mapping[str, Any]) -> dict[str, str]:
        if not isinstance(tls, Mapping):
            raise ConfigError(f"tls_terminate must be a mapping, got {type(tls).__name__}")
        unknown = set(tls) - _TLS_KEYS
        if unknown:
            raise ConfigError(f"unknown tls_terminate keys {sorted(unknown)}; known: {sorted(_TLS_KEYS)}")
        for key in ("backend", "certfile"):
            if tls.get(key) is None:
                raise ConfigError(f"tls_terminate needs {key!r}")
        checked = {
            "backend": _server_address(tls["backend"], "tls_terminate['backend']"),
            "certfile": _quoted_file(tls["certfile"], "tls_terminate['certfile']"),
        }
        if tls.get("cafile") is not None:
            checked["cafile"] = _quoted_file(tls["cafile"], "tls_terminate['cafile']")
        return checked

    # ------------------------------------------------------------------ properties
    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self._port)

    @property
    def mode(self) -> str:
        """``"sni"`` (router) or ``"tls"`` (terminator)."""
        return "sni" if self._routes else "tls"

    @property
    def config_text(self) -> str:
        """The haproxy configuration for the current port (what ``start()`` writes)."""
        lines = [
            "# written by fedtransport.brokers.proxy.HAProxy",
            "global",
            # No chroot, user or daemon: runs as whoever starts it, in the foreground.
            f"    maxconn {self._maxconn}",
            "    nbthread 2",
            "    log stderr format raw local0 info",
            "    ssl-default-bind-options ssl-min-ver TLSv1.2",
            "",
            "defaults",
            "    mode tcp",
            "    log global",
            "    option dontlognull",
            "    timeout connect 5s",
            # Long transfers (multi-GiB tables) must not be cut by an idle timer.
            "    timeout client 1h",
            "    timeout server 1h",
            "",
        ]
        body = self._sni_section() if self._routes else self._tls_section()
        return "\n".join(lines + body).rstrip("\n") + "\n"

    def _sni_section(self) -> list[str]:
        lines = [
            "frontend sni_router",
            f"    bind {LOOPBACK}:{self._port}",
            '    log-format "%ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %B %ts sni=%[var(sess.sni)]"',
            # Hold the connection until the whole ClientHello is in, then route on its SNI.
            "    tcp-request inspect-delay 5s",
            "    tcp-request content set-var(sess.sni) req.ssl_sni if { req.ssl_hello_type 1 }",
            "    tcp-request content accept if { req.ssl_hello_type 1 }",
        ]
        names = list(self._routes)
        lines += [f"    use_backend be_{i} if {{ req.ssl_sni -i '{name}' }}" for i, name in enumerate(names)]
        lines += ["    # no default_backend: any other server name is closed", ""]
        for i, name in enumerate(names):
            lines += [f"backend be_{i}  # {name}", f"    server s{i} {self._routes[name]}", ""]
        return lines

    def _tls_section(self) -> list[str]:
        bind = f"    bind {LOOPBACK}:{self._port} ssl crt {self._tls['certfile']}"
        if "cafile" in self._tls:
            bind += f" ca-file {self._tls['cafile']} verify required"
        return [
            "frontend tls_terminator",
            bind,
            '    log-format "%ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %B %ts sni=%[ssl_fc_sni]"',
            "    default_backend plain",
            "",
            "backend plain",
            f"    server s0 {self._tls['backend']}",
            "",
        ]

    @property
    def config_path(self) -> Path | None:
        return self._in_run_dir("haproxy.cfg")

    @property
    def log(self) -> Path | None:
        """haproxy's stderr (start-up notices, one line per connection); gone after ``stop()``."""
        return self._in_run_dir("haproxy.log")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> HAProxy:
        """Start haproxy and wait until it listens (no-op when it runs); returns ``self``."""
        with self._lock:
            if self.running:
                return self
            binary = _find_haproxy(self._binary)
            self._run_dir = Path(tempfile.mkdtemp(prefix="fedtransport-haproxy-"))
            attempts = 1 if self._fixed_port else _BIND_ATTEMPTS
            try:
                for attempt in range(1, attempts + 1):
                    try:
                        self._launch(binary)
                        break
                    except BackendError:
                        self._halt()
                        if attempt == attempts or not self._bind_failed():
                            raise
                        self._port = free_port()
            except BaseException:
                self._halt()
                self._remove_run_dir()
                raise
            _live.add(self)
            return self

    def _stop(self) -> None:
        """Stop haproxy (SIGTERM, then SIGKILL) and delete its directory. Idempotent."""
        self._halt()
        self._remove_run_dir()
        _live.discard(self)

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"HAProxy({self.mode}, {LOOPBACK}:{self._port}, {state})"

    # ------------------------------------------------------------------ internals
    def _launch(self, binary: str) -> None:
        config, log = self.config_path, self.log
        assert config is not None and log is not None
        config.write_text(self.config_text)
        self._spawn(
            [binary, "-f", str(config), "-db"],
            log,
            ports=[self._port],
            timeout=self._startup_timeout,
            what=f"haproxy ({self.mode}) on {LOOPBACK}:{self._port}",
        )

    def _bind_failed(self) -> bool:
        log = self.log
        if log is None or not log.exists():
            return False
        text = log.read_text(errors="replace")
        return "cannot bind socket" in text or "Address already in use" in text

    def _halt(self) -> None:
        # haproxy treats SIGTERM as an immediate stop of every connection.
        self._stop_child(timeout=5.0)


# Proxies still running at interpreter exit are stopped so none keeps a port.
_live: set[HAProxy] = stopped_at_exit()
