"""Helpers shared by the local broker launchers: loopback ports and child processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import BackendError

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
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
