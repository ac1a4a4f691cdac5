"""A process that used the Pulsar backend exits normally: exit code 0, never an abort.

pulsar-client's blocking calls give the GIL up and take it back every 100 ms; a Python thread
still inside one when the interpreter finalises is stopped there, which aborts the process
("terminate called without an active exception", exit code 134). Each test runs a party in a
process of its own (tests/exit_proc.py, or the quickstart's ``party.py``) against the real
Apache Pulsar standalone, leaves pulsar-client busy in the way the scenario names, and checks
how that process ends. docs/reliability.md ("Interpreter exit") has the promise.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtransport.brokers.standalone import PulsarStandalone
from fedtransport.transport.pulsar.connection import EXIT_WAIT

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "exit_proc.py"
EXIT_BOUND = 180.0  # a liveness bound for one party process, not a claim about speed
ABORT = "terminate called"


@pytest.fixture
def broker(pulsar_standalone: PulsarStandalone) -> Iterator[PulsarStandalone]:
    """The session's real Pulsar broker, running again after the test whatever the test did."""
    yield pulsar_standalone
    if pulsar_standalone.running:
        assert pulsar_standalone.pid is not None
        os.kill(pulsar_standalone.pid, signal.SIGCONT)  # no-op unless the test left it frozen
    else:
        pulsar_standalone.restart()


def _job() -> str:
    return f"exit-{uuid.uuid4().hex[:10]}"


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    return env


def _start(scenario: str, broker: PulsarStandalone | None) -> subprocess.Popen[str]:
    urls = [broker.service_url, broker.admin_url] if broker else ["pulsar://127.0.0.1:9", "http://127.0.0.1:9"]
    argv = [sys.executable, str(CHILD), scenario, *urls, _job()]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # ends when the process does: a failed start shows its output
        seen.append(line)
        if line.strip() == "ready":
            return proc
    proc.wait(EXIT_BOUND)
    raise AssertionError(f"{scenario}: the party never got ready (exit code {proc.returncode}):\n{''.join(seen)}")


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Let the party go on (one line on its stdin); its exit code and the rest of its output."""
    try:
        out, _ = proc.communicate("go\n", timeout=EXIT_BOUND)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the party did not exit within {EXIT_BOUND:g} s:\n{out}") from None
    return proc.returncode, out


def test_exit_after_a_send_timed_out_on_a_frozen_broker(broker: PulsarStandalone) -> None:
    """The broker is frozen (SIGSTOP); a send to a new topic gives up after send_timeout while
    its producer is still being made inside pulsar-client; then the process exits."""
    assert broker.pid is not None
    proc = _start("frozen-send", broker)
    try:
        os.kill(broker.pid, signal.SIGSTOP)
        code, out = _finish(proc)
    finally:
        os.kill(broker.pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "send failed" in out, out  # the scenario happened: the send gave up
    assert ABORT not in out, out
    assert code == 0, f"exit code {code}:\n{out}"


def test_exit_with_a_pending_get_after_the_broker_was_killed(broker: PulsarStandalone) -> None:
    """The broker is SIGKILLed under a live session while another thread waits in ``get``; the
    process then exits without closing the session."""
    proc = _start("pending-get", broker)
    try:
        broker.kill()
        code, out = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "subscribing again" in out, out  # the scenario happened
    assert ABORT not in out, out
    assert code == 0, f"exit code {code}:\n{out}"


def test_exit_waits_at_most_exit_wait_for_a_thread_inside_a_client_call() -> None:
    """A thread that never leaves a client call does not hold the exit: after ``EXIT_WAIT`` the
    exit warns and goes on; a client asked for after that is refused with a FederationError."""
    proc = _start("stuck-call", None)  # no broker: the call is pretended
    try:
        code, out = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"1 thread(s) still inside pulsar-client {EXIT_WAIT:g} s into the interpreter's exit" in out, out
    assert "refused: Pulsar: the process is exiting; no new client" in out, out
    assert code == 0, f"exit code {code}:\n{out}"


def quickstart_party() -> str:
    """``party.py`` of docs/quickstart.md ("Two processes through Pulsar"), as written there."""
    text = (ROOT / "docs" / "quickstart.md").read_text()
    found = re.search(r"<!-- runnable file=party\.py -->\n```python\n(.*?)\n```", text, re.DOTALL)
    assert found, "docs/quickstart.md: no runnable party.py block"
    return found[1] + "\n"


def prepare_job(broker: PulsarStandalone, job_id: str) -> None:
    """What ``party.py`` leaves to the operator on a real broker (it passes no ``admin_url``): the
    tenant, and the job's namespace retaining what is sent before the receiver subscribes."""
    tenant = "fl-tenant"
    if tenant not in broker.admin("GET", "/admin/v2/tenants"):
        broker.admin("PUT", f"/admin/v2/tenants/{tenant}", {"allowedClusters": [broker.cluster]})
    broker.admin("PUT", f"/admin/v2/namespaces/{tenant}/{job_id}")
    retention = {"retentionTimeInMinutes": 60, "retentionSizeInMB": 64}
    broker.admin("POST", f"/admin/v2/namespaces/{tenant}/{job_id}/retention", retention)


def test_quickstart_parties_exit_cleanly(broker: PulsarStandalone, tmp_path: Path) -> None:
    """The quickstart's two parties, three times in a row: both exit with code 0."""
    party = quickstart_party()
    assert 'job_id="job-2"' in party
    for run in range(3):
        job_id = _job()
        prepare_job(broker, job_id)
        script = tmp_path / f"party-{run}.py"
        script.write_text(party.replace('job_id="job-2"', f'job_id="{job_id}"'))  # a fresh job each run
        procs = {
            me: subprocess.Popen(
                [sys.executable, str(script), me, broker.service_url],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=_env(),
                cwd=tmp_path,
            )
            for me in ("guest", "host")
        }
        for me, proc in procs.items():
            try:
                out, _ = proc.communicate(timeout=EXIT_BOUND)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert f"{me} sum: [3. 3. 3. 3.]" in out, f"run {run}, {me}:\n{out}"
            assert ABORT not in out, f"run {run}, {me}:\n{out}"
            assert proc.returncode == 0, f"run {run}, {me}: exit code {proc.returncode}:\n{out}"
