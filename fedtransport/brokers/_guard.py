"""A guard process that ends a launcher's children when the process that started them dies.

``stop()`` runs at exit and on SIGTERM, but a process killed with SIGKILL runs nothing: its
RabbitMQ nodes (beam.smp, epmd, erl_child_setup, inet_gethost) and JVMs would run on for hours.
``PR_SET_PDEATHSIG`` does not cover it: the signal follows the *thread* that forked (a broker
started from a worker thread would die with that thread), reaches the direct child only (not the
helpers a node forks, nor a daemonised epmd) and is lost across set-uid execs.

So each launcher starts one guard: this file run as a script (``python -I -S``, standard library
only, in a session of its own so signals to the owner's process group miss it). The owner keeps
the write end of a pipe whose read end is the guard's stdin. Lines on it::

    group PID START   end process group PID if its leader still started at START (/proc tick)
    path HEX          remove this directory (hex of its bytes) once the processes are gone
    release           the owner stopped its children itself: exit doing nothing

The kernel closes a dead process's descriptors, whichever thread made them, so end-of-file
without ``release`` means the owner died: the guard SIGKILLs every process whose environment
carries its marker (``NAME=VALUE``, given to each child's environment before it starts, so no
start-up window is uncovered) and each group it was told about, waits for them to go, and
removes the paths. A forked child of the owner closes its copy of the write end (an at-fork
hook), so a lingering fork does not keep the guard waiting.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

__all__ = ["Guard", "start_time"]

# How long the guard keeps killing and waiting before it removes the paths anyway.
_SWEEP_SECONDS = 30.0


def stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` from field 3 on (index 0: the state), or None when ``pid`` is gone.

    Split after the last ``)``: the command name before it may hold spaces, parentheses, and
    bytes of a multi-byte character cut short (it is truncated to 15 bytes).
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    _, closing, rest = raw.rpartition(b")")
    return rest.decode("ascii", "replace").split() if closing else None


def start_time(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    fields = stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


class Guard:
    """The owner's side: starts the guard process and tells it what to end (see the module doc)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        # Reentrant: SIGTERM's handler (_process.owned) runs release() in the main thread, maybe
        # between two bytecodes of a _send that holds this lock; a plain lock waited forever.
        self._lock = threading.RLock()
        self._fd: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        read_end, write_end = os.pipe()  # both close on exec: no other child inherits them
        try:
            # Not our marker in its environment: the guard must not find itself among the victims.
            env = {k: v for k, v in os.environ.items() if f"{k}=" != marker[: len(k) + 1]}
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", __file__, marker],
                stdin=read_end,
                # Not the owner's stdout/stderr: a caller reading them to EOF would wait for us.
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
                env=env,
                start_new_session=True,
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._fd = write_end
        _open_guards.add(self)

    def watch_group(self, pid: int) -> None:
        """End process group ``pid`` (a child started in a session of its own) if the owner dies."""
        started = start_time(pid)  # the owner has not reaped it yet, so the pid is still this child
        if started is not None:
            self._send(f"group {pid} {started}\n")

    def remove_on_death(self, path: Path) -> None:
        """Remove the directory ``path`` after the processes, if the owner dies."""
        self._send(f"path {os.fsencode(path).hex()}\n")

    def release(self) -> None:
        """The owner stopped its children: let the guard exit without touching anything."""
        with self._lock:
            fd, self._fd = self._fd, None
            proc, self._proc = self._proc, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, b"release\n")
            os.close(fd)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)  # reap it; it exits as soon as it reads the line
        _open_guards.discard(self)

    def _send(self, line: str) -> None:
        with self._lock:
            if self._fd is None:
                return
            # A guard killed from outside: stop() still works, only the cover for the owner's
            # own death is lost.
            with contextlib.suppress(OSError):
                os.write(self._fd, line.encode())

    def _forget_in_child(self) -> None:
        # After os.fork(): the copy of the write end is the parent's to hold, not ours.
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._proc = None, None
        self._lock = threading.RLock()


_open_guards: weakref.WeakSet[Guard] = weakref.WeakSet()


def _close_in_child() -> None:
    for guard in list(_open_guards):
        guard._forget_in_child()
    _open_guards.clear()


os.register_at_fork(after_in_child=_close_in_child)


# ---------------------------------------------------------------------- the guard process


def _marked(needle: bytes) -> list[int]:
    """Pids other than ours whose environment holds ``needle`` (``NAME=VALUE``) as one entry."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if (b"\0" + needle + b"\0") in (b"\0" + env):
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    fields = stat_fields(pid)
    # a zombie waits for its (new) parent to reap it: gone for us
    return fields is not None and len(fields) > 0 and fields[0] != "Z"


def _kill(pid: int, *, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


def _end_everything(marker: bytes, groups: dict[int, str], paths: list[bytes]) -> None:
    deadline = time.monotonic() + _SWEEP_SECONDS
    pause = 0.005  # SIGKILLed processes are not our children: nothing to wait on but their pids, so back off
    while True:
        # A group whose leader is gone is not trusted: its number may belong to someone else now.
        live_groups = [pid for pid, started in groups.items() if start_time(pid) == started and _alive(pid)]
        marked = [pid for pid in _marked(marker) if _alive(pid)]
        if not live_groups and not marked:
            break
        for pid in live_groups:
            _kill(pid, group=True)
        for pid in marked:
            _kill(pid)
        if time.monotonic() >= deadline:
            break
        time.sleep(min(pause, deadline - time.monotonic()))
        pause = min(pause * 2, 0.2)
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _main(marker: str) -> int:
    groups: dict[int, str] = {}
    paths: list[bytes] = []
    for line in sys.stdin.buffer:  # blocks until the owner writes, releases or dies
        words = line.split()
        if words == [b"release"]:
            return 0
        if len(words) == 3 and words[0] == b"group":
            groups[int(words[1])] = words[2].decode()
        elif len(words) == 2 and words[0] == b"path":
            paths.append(bytes.fromhex(words[1].decode()))
    _end_everything(marker.encode(), groups, paths)  # end of file: the owner died
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
