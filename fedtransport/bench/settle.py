"""Waiting for a run's brokers to go quiet before each repetition.

A broker may keep working after a repetition has ended: deleting what the job's clean-up
removed (topics and their ledgers, queues, vhosts), collecting garbage. A repetition started
right behind another would share the cores with that work and measure less than itself, and
the next workload in the schedule would always pay for the one before it. So before every
run, warm-ups included, :func:`settle` waits until the broker processes use less than ``busy``
of a core over ``window`` seconds, for at most ``bound`` seconds, and the run's result records
how long that took and what the broker used last (``settle_seconds``, ``settle_broker_cpu``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from ..brokers._guard import stat_fields

__all__ = ["BUSY", "cpu_seconds", "settle", "tree_cpu_seconds"]

BUSY = 0.15  # of one core: what an idle broker uses (timers, heartbeats, a JVM's housekeeping) stays below
WINDOW = 0.5  # seconds over which the broker's CPU is measured
BOUND = 60.0  # seconds: a broker that never settles does not stop the run


def cpu_seconds(pids: Iterable[int], *, reaped: bool = False) -> float:
    """User and system CPU seconds the processes ``pids`` have used (every thread); gone ones count 0.

    ``reaped``: with what their children that ended and were waited for used."""
    last = 15 if reaped else 13  # utime, stime[, cutime, cstime]: fields 14 to 17 of proc(5)
    ticks = 0
    for pid in pids:
        fields = stat_fields(pid)
        if fields is not None and len(fields) >= last:
            ticks += sum(int(f) for f in fields[11:last])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid``, the processes below it that still run, and those they reaped.

    For a party whose work runs in a pool of worker processes (FATE's standalone computing):
    its own process time leaves them out."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None and len(fields) > 1:
                children.setdefault(int(fields[1]), []).append(int(entry))  # by parent pid
    tree, todo = [pid], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        tree += below
        todo += below
    return cpu_seconds(tree, reaped=True)


def settle(
    pids: Callable[[], list[int]], *, busy: float = BUSY, window: float = WINDOW, bound: float = BOUND
) -> dict[str, float]:
    """Wait until the processes ``pids()`` use less than ``busy`` of a core over ``window`` seconds.

    Returns ``{"seconds": waited, "broker_cpu": cores used over the last window}``; gives up
    after ``bound`` seconds (the run goes on, and the record says how busy the broker still was).
    Without pids (a broker not started by the run) it returns at once.
    """
    started = time.monotonic()
    watched = pids()
    if not watched:
        return {"seconds": 0.0, "broker_cpu": 0.0}
    before = cpu_seconds(watched)
    while True:
        time.sleep(window)  # sampling the broker's CPU: nothing to wait on but time
        now = cpu_seconds(watched)
        used = (now - before) / window
        before = now
        waited = time.monotonic() - started
        if used < busy or waited >= bound:
            return {"seconds": round(waited, 2), "broker_cpu": round(used, 3)}
