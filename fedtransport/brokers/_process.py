"""Helpers shared by the local broker launchers: loopback ports and child processes."""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Container, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from ..errors import BackendError, ConfigError
from ._guard import Guard

LOOPBACK = "127.0.0.1"
#: Environment variable that marks every process a :class:`ChildProcess` started (value: per launcher).
CHILD_MARKER = "FEDTRANSPORT_CHILD_OF"


def free_port(avoid: Container[int] = ()) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now and that is not in ``avoid``.

    The kernel may hand out a port again before anyone binds it: ``avoid`` holds the ones picked
    for others already.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            port = int(s.getsockname()[1])
        if port not in avoid:
            return port


# Ports handed to launchers of this process that are not stopped yet (see reserve_port).
_RESERVED: set[int] = set()
_RESERVED_LOCK = threading.Lock()


def reserve_port(wanted: int | None, taken: set[int]) -> int:
    """``wanted`` if it is free, else (``None``) a free port no other launcher of this process holds.

    The port joins ``taken`` (the caller's own) and the process-wide reservations until
    :func:`release_ports`: a port free now may be handed out again before its owner binds it.
    """
    with _RESERVED_LOCK:
        if wanted is not None:
            port = int(wanted)
            if port in taken or port in _RESERVED:
                raise ConfigError(f"port {port} is asked for twice")
            if port_open(port):
                raise BackendError(f"port {port} on {LOOPBACK} is already in use")
        else:
            port = free_port(avoid=taken | _RESERVED)
        taken.add(port)
        _RESERVED.add(port)
    return port


def release_ports(ports: set[int]) -> None:
    """Give back ports of :func:`reserve_port` (their launcher stopped)."""
    with _RESERVED_LOCK:
        _RESERVED.difference_update(ports)


def port_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def port_free(port: int) -> bool:
    """Whether 127.0.0.1:``port`` can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def pid_listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself listens on 127.0.0.1:``port`` (Linux /proc; else a TCP probe).

    A bare connect would also succeed against whoever else holds the port, and our child would
    then die of "address in use" right after we declared it ready.
    """
    table = Path("/proc/net/tcp")
    fd_dir = Path(f"/proc/{pid}/fd")
    if not table.is_file() or not fd_dir.is_dir():
        return port_open(port)
    want = f"0100007F:{port:04X}"
    try:
        listening = {
            f"socket:[{cols[9]}]"
            # cols: sl, local_address, rem_address, st (0A = LISTEN), ..., inode (index 9)
            for cols in (line.split() for line in table.read_text().splitlines()[1:])
            if len(cols) > 9 and cols[1] == want and cols[3] == "0A"
        }
        if not listening:
            return False
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in listening:
                    return True
    except OSError:
        return False
    return False


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    alive: Callable[[], bool] | None = None,
    log: Path | None = None,
) -> None:
    """Poll ``ready`` with a bounded back-off; raise ``BackendError`` with the log tail on failure."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if ready():
            return
        if alive is not None and not alive():
            raise BackendError(f"{what} exited before it was ready{log_tail(log)}")
        if time.monotonic() >= deadline:
            raise BackendError(f"{what} not ready after {timeout:.0f} s{log_tail(log)}")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def log_tail(log: Path | None, lines: int = 40) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log} ---\n" + "\n".join(text)


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM a process (group leader or not), then SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        delay = 0.01
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child: probe it instead
                done = 0
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
            if done == pid:
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class _Owned:
    """What the launchers of this process started, stopped when the process ends.

    At interpreter exit (atexit) and on SIGTERM: the default action of SIGTERM ends a
    process without running atexit, which would orphan every broker it started. The
    handler is installed only over the default action, from the main thread; it stops
    the children, then lets SIGTERM end the process as it would have. A forked child
    starts with an empty book: it never stops or deletes what its parent started.
    """

    def __init__(self) -> None:
        self._stops: dict[int, tuple[int, Callable[[], None]]] = {}  # id -> (owner pid, stop)
        # Reentrant: the SIGTERM handler takes it in the main thread, maybe while add() holds it.
        self._lock = threading.RLock()
        atexit.register(self.stop_all)
        os.register_at_fork(after_in_child=self._forget_all)

    def add(self, key: object, stop: Callable[[], None]) -> None:
        with self._lock:
            self._stops[id(key)] = (os.getpid(), stop)
        self._handle_sigterm()

    def discard(self, key: object) -> None:
        with self._lock:
            self._stops.pop(id(key), None)

    def stop_all(self) -> None:
        with self._lock:
            mine = [stop for owner, stop in self._stops.values() if owner == os.getpid()]
            self._stops.clear()
        for stop in mine:
            # Best effort at exit: there is nobody left to report a failure to.
            with contextlib.suppress(Exception):
                stop()

    def _forget_all(self) -> None:
        self._lock = threading.RLock()  # another thread of the parent may have held it at fork
        self._stops.clear()

    def _handle_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; the next start tries again
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stop_all()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # and end as SIGTERM's default action would


owned = _Owned()


class _LiveSet(set[Any]):
    """A set whose members still there when the process ends get their ``stop()`` called."""

    def add(self, item: Any) -> None:
        super().add(item)
        owned.add(item, item.stop)

    def discard(self, item: Any) -> None:
        super().discard(item)
        owned.discard(item)


def stopped_at_exit() -> set[Any]:
    """A set whose members still there at exit or SIGTERM of this process get ``stop()`` called.

    Strong references on purpose: a running child dropped by its owner must still be stopped,
    so no orphan keeps a port or disk space.
    """
    live = _LiveSet()
    os.register_at_fork(after_in_child=lambda: set.clear(live))
    return live


_L = TypeVar("_L", bound="Launcher")


class Launcher(ABC):
    """A context manager over ``start()`` (which returns ``self``) and ``stop()``."""

    @abstractmethod
    def start(self: _L) -> _L:
        """Start the child and wait until it serves; return ``self``."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the child and remove what it left behind; idempotent."""

    def __enter__(self: _L) -> _L:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ChildProcess(Launcher):
    """Base of the launchers that own one child process and a private run directory.

    Subclasses implement ``start()`` (which returns ``self``) and ``_stop()``; the context
    manager calls ``start()`` and ``stop()``. ``stop()`` in a forked child of the process that
    started the launcher only lets go of it: the parent's broker keeps running. If the process
    that started the child dies without stopping it (SIGKILL), a :class:`~._guard.Guard` ends
    the child and removes its run directory.
    """

    def __init__(self) -> None:
        self._run_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._guard: Guard | None = None
        self._owner_pid = os.getpid()
        # Start/stop/restart may come from several threads (shared instance, atexit).
        self._lock = threading.RLock()

    @abstractmethod
    def _stop(self) -> None:
        """Stop the child and remove what it left behind; idempotent."""

    def stop(self) -> None:
        """Stop the child and remove what it left behind; idempotent."""
        with self._lock:
            if os.getpid() != self._owner_pid:
                self._proc, self._run_dir = None, None  # the parent's: not ours to stop or delete
                self._guard = None  # the at-fork hook closed our copy of its pipe
                return
            self._stop()
            guard, self._guard = self._guard, None
            if guard is not None:
                guard.release()

    def kill(self) -> None:
        """SIGKILL the child, as a crash would (fault tests); its run directory and data stay."""
        with self._lock:
            self._kill_child()

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def run_dir(self) -> Path | None:
        return self._run_dir

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and os.getpid() == self._owner_pid and self._proc.poll() is None

    @property
    def rss_bytes(self) -> int | None:
        """Resident memory of the child (Linux ``/proc``), or ``None`` when it does not run."""
        pid = self.pid if self.running else None
        if pid is None:
            return None
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return None

    def _in_run_dir(self, name: str) -> Path | None:
        return self._run_dir / name if self._run_dir is not None else None

    def _spawn(
        self,
        cmd: list[str],
        log: Path,
        *,
        ports: Iterable[int],
        timeout: float,
        what: str,
        append: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        """Run ``cmd`` in the run dir as ``self._proc`` (stdin closed, stdout and stderr to ``log``,
        environment ``env`` or ours) and wait until that very process listens on each of ``ports``
        on 127.0.0.1."""
        self._owner_pid = os.getpid()
        # Stopped at exit or SIGTERM from now on, not only once it serves (when the subclass puts
        # it in its live set, under the same key): a SIGTERM while it starts would orphan it.
        owned.add(self, self.stop)
        if self._guard is None:
            self._guard = Guard(f"{CHILD_MARKER}={secrets.token_hex(8)}")
        guard = self._guard
        if self._run_dir is not None:
            guard.remove_on_death(self._run_dir)
        name, value = guard.marker.split("=", 1)
        child_env = {**(os.environ if env is None else env), name: value}
        with open(log, "ab" if append else "wb") as log_file:
            # The child keeps its own copy of the descriptor; ours closes right away. A session
            # of its own: the guard ends the whole group, and terminal signals meant for the
            # owner do not reach it (the owner stops it).
            self._proc = proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=str(self._run_dir),
                env=child_env,
                start_new_session=True,
            )
        guard.watch_group(proc.pid)
        wanted = tuple(ports)
        wait_until(
            # Another process may hold a port (then ours exits): only our own listener counts.
            lambda: proc.poll() is None and all(pid_listens(proc.pid, port) for port in wanted),
            timeout=timeout,
            what=what,
            alive=lambda: proc.poll() is None,
            log=log,
        )

    def _stop_child(self, timeout: float = 15.0) -> None:
        """SIGTERM the child (SIGKILL after ``timeout`` s) and forget it."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, timeout)

    def _kill_child(self) -> None:
        """SIGKILL the child and reap it; ``restart()`` starts it again in the same run dir."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    def _remove_run_dir(self) -> None:
        run_dir, self._run_dir = self._run_dir, None
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
