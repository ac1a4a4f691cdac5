"""Owner processes and their brokers: SIGTERM, fork, interpreter exit, a demo whose party dies."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from party_proc import pid_gone, wait_for
from rabbit_fixtures import requires_rabbitmq

pytest.importorskip("numpy")


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


def _passes(body: str) -> None:
    """Run ``body`` in a fresh interpreter: it must exit 0 having printed "ok" last."""
    done = subprocess.run(_script(body), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


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
    _passes(
        f"""
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
        """
    )


def test_a_forked_child_of_a_broadcasting_session(job_id: str) -> None:
    """A session that broadcast and listens to broadcast lanes, forked: the child can neither
    broadcast nor take a broadcast through it, a session of its own takes the broadcast sent
    before the fork, and the parent's broadcasts go on after the child exited."""
    _passes(
        f"""
            import os, sys
            import numpy as np
            import fedtransport as ft
            g, h, a = ft.Party("guest", "9999"), ft.Party("host", "10000"), ft.Party("arbiter", "10001")
            broker = ft.brokers.EmbeddedPulsar().start()
            opts = {{"service_url": broker.service_url, "max_message_size": 1 << 20}}
            value = np.arange(1 << 19, dtype=np.float64)  # 4 MiB: several messages on each broadcast lane
            with ft.Federation.connect("pulsar", job_id="{job_id}", party=g, options=opts) as fg, \
                 ft.Federation.connect("pulsar", job_id="{job_id}", party=h, options=opts) as fh:
                assert fg.transport.can_broadcast([h, a])
                fg.remote(value, "before", "0", [h, a])
                assert np.array_equal(fh.get("before", "0", [g], timeout=60)[0], value)  # fh listens to g's broadcasts
                fg.remote(value + 1, "during", "0", [h, a])  # its data may reach fh while the child runs
                pid = os.fork()
                if pid == 0:
                    code = 0
                    for call in (lambda: fg.remote(2, "x", "0", [h, a]), lambda: fh.get("during", "0", [g], timeout=5)):
                        try:
                            call()
                            code = 3
                        except ft.FederationError as exc:
                            code = code or (0 if "forked child" in str(exc) else 4)
                    with ft.Federation.connect("pulsar", job_id="{job_id}", party=a, options=opts) as fa:
                        if not np.array_equal(fa.get("before", "0", [g], timeout=60)[0], value):
                            code = code or 5
                    sys.exit(code)  # atexit runs here: it must not close the parent's clients
                _, status = os.waitpid(pid, 0)
                assert os.waitstatus_to_exitcode(status) == 0, status
                assert np.array_equal(fh.get("during", "0", [g], timeout=60)[0], value + 1)
                fg.remote(value + 2, "after", "0", [h, a])
                assert np.array_equal(fh.get("after", "0", [g], timeout=60)[0], value + 2)
                assert fh.stats["forged_refused"] == 0
            broker.stop()
            print("ok")
        """
    )


def _first_line(owner: subprocess.Popen[str], bound: float) -> Any:
    """The JSON line the owner prints once its broker serves; ``bound`` s is a liveness bound."""
    assert owner.stdout is not None
    ready, _, _ = select.select([owner.stdout], [], [], bound)
    line = owner.stdout.readline() if ready else ""
    if not line:
        _end(owner)
        err = owner.stderr.read() if owner.stderr is not None else ""
        raise AssertionError(f"the owner printed nothing within {bound:.0f} s:\n{err[-3000:]}")
    return json.loads(line)


def _end(owner: subprocess.Popen[str]) -> None:
    """End the owner: SIGTERM first, so it still stops what it started, then SIGKILL."""
    if owner.poll() is None:
        owner.terminate()
        try:
            owner.wait(60)
        except subprocess.TimeoutExpired:
            owner.kill()
            owner.wait(30)


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an exited child nobody reaped yet runs nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _processes_naming(run_dir: str) -> list[int]:
    """Live processes whose command line or environment names ``run_dir``: all a launcher started
    there (a RabbitMQ node's wrapper shell, VM, helpers and epmd carry it in their environment)."""
    needle = run_dir.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if (needle in (entry / "cmdline").read_bytes() or needle in (entry / "environ").read_bytes()) and _running(
                int(entry.name)
            ):
                found.append(int(entry.name))
    return found


def _sigterm_owner_and_check(owner: subprocess.Popen[str], pids: list[int], run_dir: str) -> None:
    """SIGTERM the owner; it ends as SIGTERM ends a process, and leaves no child and no files."""
    owner.send_signal(signal.SIGTERM)
    assert owner.wait(90) == -signal.SIGTERM  # a liveness bound: stopping takes seconds
    wait_for(lambda: not any(_running(pid) for pid in pids), f"the children {pids} of the SIGTERMed owner", 30)
    assert _processes_naming(run_dir) == []
    assert not Path(run_dir).exists()


def _kill_leftovers(owner: subprocess.Popen[str], run_dir: str | None) -> None:
    """After a failed test: nothing the owner started may outlive it."""
    _end(owner)
    for pipe in (owner.stdout, owner.stderr):
        if pipe is not None:
            pipe.close()
    if run_dir is not None:
        for pid in _processes_naming(run_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(run_dir, ignore_errors=True)


# Two forked children of the owner: one simply exits (its exit handlers run), one calls stop() on
# the inherited launcher first. Neither may stop or delete what the owner started.
_FORK_TWICE = """
def fork_twice(launcher):
    codes = []
    for explicit_stop in (False, True):
        pid = os.fork()
        if pid == 0:
            if explicit_stop:
                launcher.stop()
            sys.exit(0)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    return codes
"""


def _start_owner(imports: str, body: str) -> subprocess.Popen[str]:
    """An owner process: ``imports``, ``fork_twice``, then ``body`` (each indented as it likes)."""
    code = textwrap.dedent(imports) + _FORK_TWICE + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@requires_rabbitmq
@pytest.mark.rabbitmq
def test_sigterm_of_the_owner_stops_its_rabbitmq_node_a_forked_child_does_not() -> None:
    # No plugins: the node boots and stops in about a second, and binds no management port.
    owner = _start_owner(
        """
            import json, os, sys, time
            import pika
            import fedtransport as ft
            """,
        """
            node = ft.brokers.RabbitNode(name="sigterm", plugins=()).start()
            before = sorted(node.processes())
            codes = fork_twice(node)
            # the node still serves: a message goes through a queue of it
            conn = pika.BlockingConnection(pika.URLParameters(node.amqp_url))
            ch = conn.channel()
            queue = ch.queue_declare("", exclusive=True).method.queue
            ch.basic_publish("", queue, b"after the forks")
            for _ in range(100):
                _, _, body = ch.basic_get(queue, auto_ack=True)
                if body is not None:
                    break
                time.sleep(0.05)
            conn.close()
            pids = node.processes()
            print(json.dumps({
                "pids": pids, "names": [open(f"/proc/{p}/comm").read().strip() for p in pids],
                "run_dir": str(node.data_dir), "fork_codes": codes, "running": node.running,
                "same_processes": sorted(node.processes()) == before, "body": (body or b"").decode(),
            }), flush=True)
            time.sleep(3600)
            """,
    )
    run_dir = None
    try:
        seen = _first_line(owner, 180)
        run_dir = seen["run_dir"]
        assert seen["fork_codes"] == [0, 0]
        assert seen["running"] and seen["same_processes"] and seen["body"] == "after the forks", seen
        named = dict(zip(seen["names"], seen["pids"], strict=True))
        assert {"beam.smp", "epmd"} <= set(named), named  # the VM and the node's own epmd
        assert {named["beam.smp"], named["epmd"]} <= set(_processes_naming(run_dir))  # found by the sweep too
        _sigterm_owner_and_check(owner, seen["pids"], run_dir)
    finally:
        _kill_leftovers(owner, run_dir)


@pytest.mark.timeout(1800)  # the first start of a machine resolves the broker's jars with Maven
def test_sigterm_of_the_owner_stops_its_pulsar_standalone_a_forked_child_does_not() -> None:
    owner = _start_owner(
        """
            import json, os, sys, time
            import fedtransport as ft
            """,
        """
            broker = ft.brokers.PulsarStandalone().start()
            pid = broker.pid
            codes = fork_twice(broker)
            print(json.dumps({
                "pid": pid, "run_dir": str(broker.run_dir), "fork_codes": codes,
                "running": broker.running and broker.pid == pid and broker.data_dir.is_dir(),
                "clusters": broker.admin("GET", "/admin/v2/clusters"),  # it still serves
            }), flush=True)
            time.sleep(3600)
            """,
    )
    run_dir = None
    try:
        seen = _first_line(owner, 1500)
        run_dir = seen["run_dir"]
        assert seen["fork_codes"] == [0, 0]
        assert seen["running"] and seen["clusters"] == ["standalone"], seen
        assert _processes_naming(run_dir) == [seen["pid"]]  # the JVM, and nothing else runs there
        _sigterm_owner_and_check(owner, [seen["pid"]], run_dir)
    finally:
        _kill_leftovers(owner, run_dir)


@pytest.mark.timeout(1800)  # the first start of a machine resolves the broker's jars with Maven
def test_sigterm_while_the_owner_starts_a_broker_stops_it_too() -> None:
    """The window between spawning the JVM and its serving (5-10 s) is covered too."""
    owner = subprocess.Popen(
        _script("""
            import time
            import fedtransport as ft
            ft.brokers.PulsarStandalone().start()
            print("serving", flush=True)
            time.sleep(3600)
        """),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = None

    def starting_jvm() -> int | None:
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == owner.pid and b"PulsarStandaloneStarter" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
        return None

    try:
        jvm = wait_for(starting_jvm, "the owner's broker JVM", 1500)
        args = Path(f"/proc/{jvm}/cmdline").read_bytes().split(b"\0")
        [tmp] = [a.split(b"=", 1)[1].decode() for a in args if a.startswith(b"-Djava.io.tmpdir=")]
        run_dir = str(Path(tmp).parent)
        assert owner.stdout is not None
        assert not select.select([owner.stdout], [], [], 0)[0]  # still starting: it has not said "serving"
        _sigterm_owner_and_check(owner, [jvm], run_dir)
    finally:
        _kill_leftovers(owner, run_dir)


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


@pytest.mark.parametrize("where", ["guard", "book"])
def test_sigterm_while_the_owner_updates_its_books_still_ends_it(where: str) -> None:
    """SIGTERM's handler runs in the main thread, between two bytecodes of whatever it was doing:
    once that was telling the guard about a new child (the JVM just spawned) or adding to the book
    of what to stop, and the handler's stop waited for the lock the interrupted code held, forever
    (CI: an owner SIGTERMed while its Pulsar broker started took over 90 s, ended by a second
    signal). Both locks are taken again by the handler now; the owner ends as SIGTERM ends it."""
    owner = subprocess.Popen(
        _script(f"""
            import os, signal, time
            from pathlib import Path
            from fedtransport.brokers import _guard
            from fedtransport.brokers._process import owned
            guard = _guard.Guard("FT_TEST_SIGTERM_MARKER=1")
            owned.add(guard, guard.release)  # as a launcher does: stopped on SIGTERM
            real_write = os.write
            def write_then_sigterm(fd, data):  # the signal lands while the guard's lock is held
                os.write = real_write
                n = real_write(fd, data)
                os.kill(os.getpid(), signal.SIGTERM)
                return n
            if {where!r} == "guard":
                os.write = write_then_sigterm
                guard.remove_on_death(Path("/nonexistent-ft-test"))
            else:
                with owned._lock:  # the book's lock, as owned.add holds it
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.5)
            time.sleep(5)
            print("survived", flush=True)
        """),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.wait(30) == -signal.SIGTERM  # a liveness bound: it ends at once
    finally:
        _end(owner)
        assert owner.stdout is not None
        owner.stdout.close()
