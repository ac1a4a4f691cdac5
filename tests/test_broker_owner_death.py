"""Brokers die with the process that started them, even when it is SIGKILLed (no atexit, no handler).

A child Python process starts a real RabbitMQ node (shell, beam.smp, its helpers, a private epmd)
and a real Apache Pulsar standalone (java). The JVM is started from a worker thread that ends
before the kill: a PR_SET_PDEATHSIG set by that thread would have taken the broker down with the
thread, which the child checks by calling the broker after the thread is gone. The test SIGKILLs
the child and polls until every broker process is gone and the run directories are deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from tests.rabbit_fixtures import requires_rabbitmq
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from rabbit_fixtures import requires_rabbitmq  # type: ignore[no-redef]

pytestmark = [pytest.mark.timeout(900), requires_rabbitmq]

ROOT = Path(__file__).resolve().parents[1]

OWNER = r"""
import json, sys, threading
from fedtransport.brokers.rabbitmq import RabbitNode
from fedtransport.brokers.standalone import PulsarStandalone

pulsar = PulsarStandalone(startup_timeout=600.0)
failed = []

def start_pulsar():
    try:
        pulsar.start()
    except BaseException as exc:
        failed.append(exc)

worker = threading.Thread(target=start_pulsar)
worker.start()
node = RabbitNode(name="owner-death", plugins=(), start_timeout=600.0).start()
worker.join()
if failed:
    raise failed[0]
# The thread that forked the JVM is gone; the broker must still serve.
assert "standalone" in pulsar.admin("GET", "/admin/v2/clusters")
print(json.dumps({
    "rabbit": node.processes(),
    "pulsar": [pulsar.pid],
    "dirs": [str(node.data_dir), str(pulsar.run_dir)],
}), flush=True)
sys.stdin.readline()  # the test kills us while we wait here
"""


def _started(pid: int) -> str | None:
    """Start time of a live (not zombie) ``pid`` in clock ticks, else ``None``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


@pytest.fixture
def owner() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER],
        cwd=str(ROOT),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        proc.stdout.close()


def test_brokers_die_with_a_sigkilled_owner(owner: subprocess.Popen[str]) -> None:
    assert owner.stdout is not None
    line = owner.stdout.readline()
    assert line, f"the owner process died before its brokers served (exit {owner.wait()})"
    started = json.loads(line)
    broker_pids = started["rabbit"] + started["pulsar"]
    dirs = [Path(d) for d in started["dirs"]]
    assert len(started["rabbit"]) >= 3  # the shell, beam.smp and epmd at least
    identity = {pid: _started(pid) for pid in broker_pids}
    assert all(identity.values()), "a broker process was gone before the owner died"
    assert all(d.is_dir() for d in dirs)

    owner.send_signal(signal.SIGKILL)
    owner.wait()
    try:
        deadline = time.monotonic() + 120.0  # a bound for a loaded machine, not a measurement
        while True:
            alive = [pid for pid, began in identity.items() if _started(pid) == began]
            left = [d for d in dirs if d.exists()]
            if not alive and not left:
                break
            assert time.monotonic() < deadline, f"still there after the owner died: pids {alive}, dirs {left}"
            time.sleep(0.2)
    finally:
        # The old launchers leave everything behind: clean up so this run does not leak either.
        for pid, began in identity.items():
            if _started(pid) == began:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
