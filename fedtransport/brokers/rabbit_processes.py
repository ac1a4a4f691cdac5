"""The processes of a throw-away RabbitMQ node: finding them, starting them, probing and stopping them.

A node is a wrapper shell running ``rabbitmq-server`` in the foreground, the Erlang VM it execs,
helpers the VM spawns (``erl_child_setup``, ``inet_gethost``) and a private ``epmd``. All of them
carry :data:`~fedtransport.brokers.rabbit_config.MARKER` in their environment, which is how
:func:`marked_pids` finds them, even those no handle of ours points at. :class:`NodeProcesses`
holds the handles and files of one node and stops all of it; :func:`node_answers` is the
readiness probe (this very node answers, not whoever else holds a port we picked).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BackendError
from ._guard import Guard, stat_fields
from ._process import LOOPBACK, owned, port_open, stop_pid, stop_process
from .rabbit_config import MARKER

if TYPE_CHECKING:
    from .rabbitmq import RabbitNode

__all__ = [
    "INSTALL_HINT",
    "NodeProcesses",
    "default_cookie_home",
    "ensure_cookie",
    "find_epmd",
    "find_server",
    "marked_pids",
    "node_answers",
    "pid_alive",
    "spawn",
]

INSTALL_HINT = "apt-get install -y rabbitmq-server"
# The node is on loopback: never route the readiness probe through an environment proxy.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_server(rabbitmq_home: str | None) -> Path:
    home = Path(rabbitmq_home or os.environ.get("FEDTRANSPORT_RABBITMQ_HOME") or "/usr/lib/rabbitmq")
    # The /usr/sbin wrapper switches to the rabbitmq user, so use the real script.
    for sub in ("bin", "sbin"):
        script = home / sub / "rabbitmq-server"
        if script.is_file() and os.access(script, os.X_OK):
            return script
    raise BackendError(
        f"rabbitmq-server is not installed (no {home}/bin/rabbitmq-server); install it with: {INSTALL_HINT}"
    )


def find_epmd() -> str:
    found = shutil.which("epmd")
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"), reverse=True):
        return str(candidate)
    raise BackendError(f"epmd (Erlang) is not installed; install RabbitMQ with: {INSTALL_HINT}")


def default_cookie_home() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "fedtransport" / "rabbitmq-home"


def ensure_cookie(home: Path) -> None:
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


def amqp_answers(port: int) -> bool:
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


def marked_pids(marker: str) -> list[int]:
    """Pids of processes whose environment carries this node's marker (all it spawned)."""
    needle = f"{MARKER}={marker}".encode() + b"\0"
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


def kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    fields = stat_fields(pid)
    return fields is not None and len(fields) > 0 and fields[0] != "Z"  # a zombie is dead for our purposes


def spawn(
    cmd: list[str], env: dict[str, str], cwd: Path, log: Path, *, append: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a session of its own: stdin closed, stdout and stderr to ``log``."""
    with open(log, "ab" if append else "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def node_answers(node: RabbitNode) -> bool:
    """Ready = AMQP and the management API answer, and it is this node that answers.

    A bare TCP connect is not enough: someone else may hold a port we picked.
    """
    if node.mng_url is None:
        return amqp_answers(node.port) and (node.ssl_port is None or port_open(node.ssl_port))
    req = urllib.request.Request(f"{node.mng_url}/api/overview")
    token = base64.b64encode(f"{node.user}:{node.password}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    try:
        with _DIRECT.open(req, timeout=2.0) as resp:
            overview = json.loads(resp.read())
    except (OSError, ValueError, http.client.HTTPException):
        return False
    if not isinstance(overview, dict) or overview.get("node") != node.node_name:
        return False
    # The management API comes up before the AMQP listeners: wait until they are listed.
    listening = {(x.get("protocol"), x.get("port")) for x in overview.get("listeners") or []}
    if ("amqp", node.port) not in listening:
        return False
    return node.ssl_port is None or ("amqp/ssl", node.ssl_port) in listening


class NodeProcesses:
    """Process handles and files of one node; shared with the exit-time finalizer.

    A :class:`~._guard.Guard` ends every marked process and deletes the directory if the process
    that started the node dies without stopping it (SIGKILL).
    """

    def __init__(self, tmp: Path, marker: str, stop_timeout: float) -> None:
        self.tmp = tmp
        self.marker = marker
        self.stop_timeout = stop_timeout
        self.server: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self.pid_file = tmp / "rabbit.pid"
        self.owner_pid = os.getpid()  # a forked child never stops or deletes the node
        self._guard: Guard | None = Guard(f"{MARKER}={marker}")
        self._guard.remove_on_death(tmp)

    def spawn(self, cmd: list[str], env: dict[str, str], log: Path, *, append: bool = False) -> subprocess.Popen[bytes]:
        """:func:`spawn` in the node's directory, its process group watched by the guard."""
        proc = spawn(cmd, env, self.tmp, log, append=append)
        if self._guard is not None:
            self._guard.watch_group(proc.pid)
        return proc

    def beam_pid(self) -> int | None:
        """The VM's pid from the pid file, if that process is alive and really ours.

        A VM that died on its own leaves a stale file whose pid may since belong to someone else.
        """
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) and pid in marked_pids(self.marker) else None

    def stop_server(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the broker (graceful with SIGTERM), then anything it left; epmd stays."""
        pid = self.beam_pid()
        if pid is not None:
            if sig == signal.SIGKILL:
                kill_pids([pid])
            stop_pid(pid, timeout=self.stop_timeout)
        if self.server is not None:
            # The wrapper shell exits once the VM is gone; without a VM pid, stop the shell.
            try:
                self.server.wait(self.stop_timeout if pid is not None else 0.01)
            except subprocess.TimeoutExpired:
                stop_process(self.server, self.stop_timeout)
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
            left = [p for p in marked_pids(self.marker) if p not in keep and pid_alive(p)]
            if not left:
                return
            if time.monotonic() >= deadline:
                if killed:
                    return
                kill_pids(left)
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
                stop_process(self.epmd, self.stop_timeout)
                self.epmd = None
            self._sweep(set())
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.release()
