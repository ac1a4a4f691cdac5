"""``fedtransport doctor`` and ``cleanup`` for any backend, through the operator hooks of ``Transport``.

A plugin backend (tests/tiny_backend.py) is installed the way a third-party package installs
one, through an entry point in the ``fedtransport.backends`` group: doctor runs its checks
and cleanup calls its cleanup, without fedtransport knowing its name. The broker backends'
own checks are tested against real brokers in tests/test_cli.py.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiny_backend
import yaml
from conftest import GUEST, HOST

import fedtransport as ft
from fedtransport.cli import main
from fedtransport.doctor import Check, cleanup_job, run_doctor, session_options
from fedtransport.transport import ENTRY_POINT_GROUP, available, get_backend

PLUGIN = "tiny-plugin"


@pytest.fixture
def plugin_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """tests/tiny_backend.py declared as an installed distribution's entry point."""
    dist = tmp_path / "tiny_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{PLUGIN} = tiny_backend:TinyTransport\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tiny_backend.DOCTOR_CALLS.clear()
    yield
    tiny_backend.RESOURCES.clear()


def run(capsys: pytest.CaptureFixture[str], command: str) -> tuple[int, str, str]:
    code = main(shlex.split(command))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_plugin_is_found_through_its_entry_point(plugin_installed: None) -> None:
    assert PLUGIN in available()
    assert get_backend(PLUGIN) is tiny_backend.TinyTransport


def test_doctor_runs_the_plugins_checks_then_a_round_trip(
    plugin_installed: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, f"doctor --backend {PLUGIN} --option hub=doctor-plugin --timeout 3 --json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"], (out, err)
    assert [(c["name"], c["status"]) for c in doc["checks"]] == [
        ("options", "ok"),
        ("tiny broker", "ok"),
        ("round trip", "ok"),
    ]
    assert doc["checks"][0]["detail"] == "tiny hub 'doctor-plugin'"
    assert tiny_backend.DOCTOR_CALLS == [({"hub": "doctor-plugin"}, None, 3.0)]
    assert tiny_backend.RESOURCES == {}  # the probe job cleaned up after itself

    code, out, _ = run(capsys, f"doctor --backend {PLUGIN} --option healthy=false")
    assert code == 1
    assert "FAIL  tiny broker  the tiny broker is unwell" in out and "fix: --option healthy=true" in out
    assert "skip  round trip" in out and "result: 1 problem(s): tiny broker" in out


def test_doctor_refuses_the_plugins_unknown_options(plugin_installed: None) -> None:
    [check] = run_doctor(PLUGIN, {"hubb": "x"})
    assert isinstance(check, Check) and check.status == "fail" and "unknown option(s) ['hubb']" in check.detail


def test_cleanup_calls_the_plugins_cleanup_and_lists_what_went(
    plugin_installed: None, capsys: pytest.CaptureFixture[str], job_id: str
) -> None:
    opts = {"hub": f"hub-{job_id}"}
    g = ft.Federation.connect(PLUGIN, job_id=job_id, party=GUEST, options=opts)
    h = ft.Federation.connect(PLUGIN, job_id=job_id, party=HOST, options=opts)
    g.remote("x", "x", "0", [HOST])
    assert h.get("x", "0", [GUEST], timeout=30) == ["x"]
    g.close()  # crashed: nobody called cleanup()
    h.close()
    made = [f"session {GUEST}", f"session {HOST}"]

    report = cleanup_job(PLUGIN, job_id, opts, dry_run=True)
    assert report.target == f"tiny broker 'hub-{job_id}'" and report.found == made and not report.deleted
    assert tiny_backend.RESOURCES[job_id] == set(made)

    code, out, err = run(capsys, f"cleanup --backend {PLUGIN} --job {job_id} --option hub=hub-{job_id}")
    assert code == 0, err
    assert all(f"deleted  {item}" in out for item in made) and "nothing of the job is left" in out
    assert job_id not in tiny_backend.RESOURCES
    code, out, _ = run(capsys, f"cleanup --backend {PLUGIN} --job {job_id} --option hub=hub-{job_id}")
    assert code == 0 and "already clean" in out


def test_the_plugin_fills_its_options_from_the_route_table(plugin_installed: None, tmp_path: Path) -> None:
    table = tmp_path / "routes.yaml"
    table.write_text(yaml.safe_dump({9999: {"host": "hub-from-route", "port": 1}}))
    opts, routes = session_options(PLUGIN, {}, table, "guest:9999")
    assert opts == {"hub": "hub-from-route"} and routes is not None
    opts, _ = session_options(PLUGIN, {"hub": "explicit"}, table, "guest:9999")
    assert opts == {"hub": "explicit"}  # explicit options win
    report = cleanup_job(PLUGIN, "job-1", {}, table, "9999", dry_run=True)
    assert report.target == "tiny broker 'hub-from-route'" and report.found == []


def test_memory_needs_no_broker_and_nothing_to_clean_up() -> None:
    checks = run_doctor("memory")
    assert [(c.name, c.status) for c in checks] == [("options", "ok"), ("broker", "ok"), ("round trip", "ok")]
    with pytest.raises(ft.ConfigError, match="nothing to clean up"):
        cleanup_job("memory", "job-1")


def test_the_demo_asks_the_backend_for_its_local_broker() -> None:
    # demo.py names no backend: each class says whether its parties meet in one process and
    # which throw-away broker to start when the options name none.
    from contextlib import ExitStack

    from fedtransport.transport import get_backend

    assert get_backend("memory").in_process and not get_backend("pulsar").in_process
    with ExitStack() as stack:
        given = {"service_url": "pulsar://10.0.0.5:6650"}
        assert get_backend("pulsar").local_broker(given, stack) == "configured broker"
        assert given == {"service_url": "pulsar://10.0.0.5:6650"}  # nothing started, nothing changed
        rabbit = {"port": 5671}
        assert get_backend("rabbitmq").local_broker(rabbit, stack) == "configured broker" and rabbit == {"port": 5671}
        assert get_backend("memory").local_broker({}, stack) == "in-process hub"
        started = get_backend("pulsar").local_broker(opts := {}, stack)
        assert started.startswith("embedded broker at pulsar://127.0.0.1:") and opts["service_url"] in started
