"""Owner processes and their brokers: SIGTERM, fork, interpreter exit, a demo whose party dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from party_proc import pid_gone, wait_for

pytest.importorskip("numpy")


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


def test_sigterm_of_the_owner_stops_its_brokers_and_removes_their_files() -> None:
    owner = subprocess.Popen(
        _script("""
            import json, time
            import fedtransport as ft
            brokers = [ft.brokers.EmbeddedPulsar().start()]
            import shutil
            if shutil.which("haproxy"):
                brokers.append(ft.brokers.HAProxy(sni_routes={"a.fate.test": ("127.0.0.1", 1)}).start())
            print(json.dumps([[b.pid, str(b.run_dir)] for b in brokers]), flush=True)
            time.sleep(3600)
        """),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    children = json.loads(owner.stdout.readline())
    assert children and all(not pid_gone(pid) for pid, _ in children)
    owner.send_signal(signal.SIGTERM)
    assert owner.wait(60) == -signal.SIGTERM  # it still ends as SIGTERM ends a process
    for pid, run_dir in children:
        wait_for(lambda pid=pid: pid_gone(pid), f"broker child {pid} of the SIGTERMed owner", 30)
        assert not Path(run_dir).exists()


def test_a_forked_child_neither_stops_the_broker_nor_uses_the_session(job_id: str) -> None:
    done = subprocess.run(
        _script(f"""
            import os, sys
            import fedtransport as ft
            g, h = ft.Party("guest", "9999"), ft.Party("host", "10000")
            broker = ft.brokers.EmbeddedPulsar().start()
            opts = {{"service_url": broker.service_url}}
            with ft.Federation.connect("pulsar", job_id="{job_id}", party=g, options=opts) as fg, \\
                 ft.Federation.connect("pulsar", job_id="{job_id}", party=h, options=opts) as fh:
                pid = os.fork()
                if pid == 0:
                    try:
                        fg.remote(1, "x", "0", [h])
                        code = 3
                    except ft.FederationError as exc:
                        code = 0 if "forked child" in str(exc) else 4
                    sys.exit(code)  # atexit runs here: it must not stop the parent's broker
                _, status = os.waitpid(pid, 0)
                assert os.waitstatus_to_exitcode(status) == 0, status
                assert broker.running and broker.data_dir.exists()
                fg.remote(41, "x", "0", [h])
                assert fh.get("x", "0", [g], timeout=60) == [41]
            broker.stop()
            print("ok")
        """),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_the_quickstart_parties_exit_cleanly_every_time(tmp_path: Path) -> None:
    """pulsar-client aborted 12 of 60 party processes at exit with a Python logger."""
    import fedtransport as ft

    party = tmp_path / "party.py"
    party.write_text(
        textwrap.dedent("""
            import sys
            import fedtransport as ft
            guest, host = ft.Party("guest", "9999"), ft.Party("host", "10000")
            me, peer = (guest, host) if sys.argv[1] == "guest" else (host, guest)
            with ft.Federation.connect("pulsar", job_id=sys.argv[3], party=me,
                                       options={"service_url": sys.argv[2]}) as fed:
                fed.remote(sys.argv[1], name="x", tag="0", parties=[peer])
                [theirs] = fed.get(name="x", tag="0", parties=[peer], timeout=60)
            print("got", theirs)
        """)
    )
    failures = []
    with ft.brokers.EmbeddedPulsar() as broker:
        for run in range(50):
            procs = [
                subprocess.Popen(
                    [sys.executable, str(party), who, broker.service_url, f"qs-{os.getpid()}-{run}"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for who in ("guest", "host")
            ]
            for proc in procs:
                _out, err = proc.communicate(timeout=120)
                if proc.returncode != 0:
                    failures.append((run, proc.returncode, err[-500:]))
    assert not failures


def test_the_demo_ends_at_once_when_a_party_process_dies() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "fedtransport.cli", "demo"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def party_pids() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if int(entry.joinpath("stat").read_text().split()[3]) != demo.pid:
                    continue
                if b"spawn_main" in entry.joinpath("cmdline").read_bytes():
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
        return found

    wait_for(lambda: len(party_pids()) == 2, "the demo's two party processes", 60)
    victim = party_pids()[0]
    os.kill(victim, signal.SIGKILL)
    out, _ = demo.communicate(timeout=120)  # a liveness bound; the demo itself notices within a second
    assert demo.returncode == 1, out
    assert "died with exit code -9" in out and "FAILED" in out
