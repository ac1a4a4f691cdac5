"""A peer's process killed outright (issue 14): its peers learn from the broker that it is gone.

A SIGKILLed party sends no abort notice, but its connections close and the broker drops its
presence (RabbitMQ: an exclusive queue; Pulsar: a producer listed in the topic's stats, see
fedtransport/presence.py). A ``get`` waiting on it then times out with a message that says the
party is not connected any more, where an alive peer that has not sent is said to be connected.
The parties run in their own processes (spawn), killed with SIGKILL; the brokers are real
(a RabbitMQ node, Apache Pulsar standalone). Delays are bounded generously: the machine is shared.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import GUEST, HOST

import fedtransport as ft
from fedtransport.presence import FRESH_WAIT

try:
    from tests.rabbit_fixtures import rabbit_installed, rabbit_node, rabbit_opts, rabbit_pool  # by parameter name
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from rabbit_fixtures import rabbit_installed, rabbit_node, rabbit_opts, rabbit_pool  # type: ignore[no-redef]  # noqa: F401

pytestmark = pytest.mark.timeout(600)

SPAWN = mp.get_context("spawn")
SEEN_BOUND = 30.0  # seconds from the kill until the peer's broker shows it gone (measured: well under 1 s)
BACKENDS = ["pulsar", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]


def options_for(request: pytest.FixtureRequest, backend: str) -> dict[str, Any]:
    if backend == "pulsar":
        broker = request.getfixturevalue("pulsar_standalone")
        return {"service_url": broker.service_url, "admin_url": broker.admin_url}
    if not rabbit_installed():
        pytest.skip("rabbitmq-server is not installed (scripts/test.sh installs it)")
    return rabbit_opts(request.getfixturevalue("rabbit_node"))


def guest(backend: str, job_id: str, options: dict[str, Any], send: bool, out: Any) -> None:
    """Connect as the guest; with ``send``, send half of a transfer to the host (the second message
    never goes); report, then wait to be killed."""
    with ft.Federation.connect(backend, job_id=job_id, party=GUEST, options=options) as fed:
        if send:
            real_send = fed.transport.send

            def first_only(dst: ft.Party, lane: int, messages: Any) -> int:
                it = iter(messages)
                real_send(dst, lane, [next(it)])  # confirmed by the broker
                threading.Event().wait(600)  # this process is killed here
                return 1

            fed.transport.send = first_only  # type: ignore[method-assign]
            value = os.urandom(1 << 20)  # incompressible: many messages on every lane
            threading.Thread(target=fed.remote, args=(value, "w", "0", [HOST]), daemon=True).start()
        out.put("ready")
        threading.Event().wait(600)


def table_guest(backend: str, job_id: str, options: dict[str, Any], out: Any) -> None:
    """Connect as the guest and send the host a table of two partitions of which each lane carries
    only its first two messages (lane 0: the head and the start of partition 0); report, then
    wait to be killed."""
    with ft.Federation.connect(backend, job_id=job_id, party=GUEST, options=options) as fed:
        real_send = fed.transport.send

        def first_two(dst: ft.Party, lane: int, messages: Any) -> int:
            it = iter(messages)
            real_send(dst, lane, [next(it), next(it)])  # confirmed by the broker
            threading.Event().wait(600)  # this process is killed here
            return 2

        fed.transport.send = first_two  # type: ignore[method-assign]
        rows = [[(i, os.urandom(16384)) for i in range(64)] for _ in range(2)]  # 1 MiB a partition, incompressible
        table = ft.Table.from_partitions(rows)
        threading.Thread(target=fed.remote, args=(table, "t", "0", [HOST]), daemon=True).start()
        out.put("ready")
        threading.Event().wait(600)


def wait_until(probe: Callable[[], bool], what: str, bound: float) -> float:
    """Seconds until ``probe()`` holds; fails after ``bound``."""
    start = time.monotonic()
    while not probe():
        assert time.monotonic() - start < bound, f"{what}: not within {bound} s"
        time.sleep(0.05)
    return time.monotonic() - start


def timeout_of(h: ft.Federation, timeout: float = 2.0) -> ft.TransferTimeout:
    with pytest.raises(ft.TransferTimeout) as err:
        h.get("w", "0", [GUEST], timeout=timeout)
    return err.value


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_sender_is_named_disconnected_in_the_timeout(request, backend, job_id):
    """The guest sends part of a transfer and is SIGKILLed: the host's ``get`` times out saying the
    guest is not connected; a new session of the guest (restarted) is connected again."""
    options = options_for(request, backend)
    options["max_message_size"] = 65536
    q = SPAWN.Queue()
    proc = SPAWN.Process(target=guest, args=(backend, job_id, options, True, q))
    with ft.Federation.connect(backend, job_id=job_id, party=HOST, options=options) as h:
        try:
            proc.start()
            assert q.get(timeout=300) == "ready"
            wait_until(lambda: h.transport.peer_present(GUEST) is True, "the guest shows as connected", 60)
            err = timeout_of(h)  # alive and sending: connected
            assert err.presence == {"guest:9999": "connected"}, err
            assert "guest:9999 is connected to the broker" in str(err)
            killed = time.monotonic()
            proc.kill()
            wait_until(lambda: h.transport.peer_present(GUEST) is False, "the kill is seen", SEEN_BOUND)
            seen = time.monotonic() - killed
            proc.join(30)
            print(f"{backend}: the kill was visible after {seen:.3f} s")  # docs/reliability.md quotes this
            err = timeout_of(h)
            assert err.presence == {"guest:9999": "gone"}, err
            assert "guest:9999 is not connected to the broker: it disconnected" in str(err), str(err)
            assert err.missing["guest:9999"] != "nothing"  # part of it had arrived
            assert time.monotonic() - killed < SEEN_BOUND + 30
            with ft.Federation.connect(backend, job_id=job_id, party=GUEST, options=options):
                wait_until(lambda: h.transport.peer_present(GUEST) is True, "the restarted guest", 60)
                assert timeout_of(h, 1.0).presence == {"guest:9999": "connected"}
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join(30)
        h.cleanup()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_alive_peer_that_never_sends_is_connected_not_gone(request, backend, job_id):
    """No false positive: a guest that is alive but sends nothing is reported connected, for as long
    as it lives; one that never connected is reported absent (it may start later), not gone."""
    options = options_for(request, backend)
    q = SPAWN.Queue()
    proc = SPAWN.Process(target=guest, args=(backend, job_id, options, False, q))
    with ft.Federation.connect(backend, job_id=job_id, party=HOST, options=options) as h:
        try:
            err = timeout_of(h, 0.5)
            assert err.presence == {"guest:9999": "absent"}, err
            assert "guest:9999 is not connected to the broker (not seen connected" in str(err)
            proc.start()
            assert q.get(timeout=300) == "ready"
            wait_until(lambda: h.transport.peer_present(GUEST) is True, "the guest shows as connected", 60)
            for _ in range(3):  # polled over several seconds: never seen gone while it lives
                err = timeout_of(h)
                assert err.presence == {"guest:9999": "connected"}, err
                assert "guest:9999 is connected to the broker but has not sent it all" in str(err)
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join(30)
        h.cleanup()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_get_without_timeout_stops_waiting_for_a_killed_peer(request, backend, job_id):
    """``get(timeout=None)`` from a guest SIGKILLed mid-send raises ``PeerGone`` about
    ``peer_gone_after`` seconds after the kill, not never; a later ``get`` waits again."""
    options = options_for(request, backend)
    options.update(max_message_size=65536, peer_gone_after=3.0)
    q = SPAWN.Queue()
    proc = SPAWN.Process(target=guest, args=(backend, job_id, options, True, q))
    outcome: list[BaseException] = []
    with ft.Federation.connect(backend, job_id=job_id, party=HOST, options=options) as h:
        try:
            proc.start()
            assert q.get(timeout=300) == "ready"
            wait_until(lambda: h.transport.peer_present(GUEST) is True, "the guest shows as connected", 60)

            def wait_forever() -> None:
                try:
                    h.get("w", "0", [GUEST], timeout=None)
                except BaseException as exc:  # the outcome under test
                    outcome.append(exc)

            waiter = threading.Thread(target=wait_forever, daemon=True)
            waiter.start()
            # the waiting get has seen the guest connected (test probe), so its going counts
            wait_until(lambda: h._presence.state(GUEST) == "connected", "the get sees the guest", 60)
            killed = time.monotonic()
            proc.kill()
            waiter.join(3.0 + 60)  # the grace, plus generous slack for polling on a loaded machine
            took = time.monotonic() - killed
            assert outcome, "the get was still waiting"
            [err] = outcome
            assert isinstance(err, ft.PeerGone) and isinstance(err, ft.TransferTimeout), repr(err)
            assert err.party == GUEST and err.presence == {"guest:9999": "gone"}
            assert "guest:9999 was gone from the broker for 3.0 s (peer_gone_after)" in str(err)
            assert took >= 3.0
            print(f"{backend}: PeerGone {took:.2f} s after the kill (peer_gone_after 3 s)")
            err2 = timeout_of(h, 0.5)  # not failed for good: a later get waits (and times out) again
            assert type(err2) is ft.PeerGone or err2.presence == {"guest:9999": "gone"}
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join(30)
        h.cleanup()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reading_a_table_without_timeout_stops_for_a_killed_peer(request, backend, job_id):
    """The table's head arrived, so ``get`` returned it; its partition streams in as it is read.
    The guest is SIGKILLed part-way: reading the partition (the get's ``timeout=None``) raises
    ``PeerGone`` about ``peer_gone_after`` seconds later, as a waiting ``get`` does, not never."""
    options = options_for(request, backend)
    options.update(max_message_size=65536, peer_gone_after=3.0)
    q = SPAWN.Queue()
    proc = SPAWN.Process(target=table_guest, args=(backend, job_id, options, q))
    outcome: list[BaseException] = []
    read: list[Any] = []
    with ft.Federation.connect(backend, job_id=job_id, party=HOST, options=options) as h:
        try:
            proc.start()
            assert q.get(timeout=300) == "ready"
            [table] = h.get("t", "0", [GUEST], timeout=None)
            wait_until(lambda: h.transport.peer_present(GUEST) is True, "the guest shows as connected", 60)

            def read_partition() -> None:
                try:
                    for record in table.iter_partition(0):
                        read.append(record[0])
                except BaseException as exc:  # the outcome under test
                    outcome.append(exc)

            reader = threading.Thread(target=read_partition, daemon=True)
            reader.start()
            wait_until(lambda: bool(read), "the first records of partition 0", 60)
            # the waiting read has seen the guest connected (test probe), so its going counts
            wait_until(lambda: h._presence.state(GUEST) == "connected", "the read sees the guest", 60)
            killed = time.monotonic()
            proc.kill()
            reader.join(3.0 + 60)  # the grace, plus generous slack for polling on a loaded machine
            took = time.monotonic() - killed
            assert outcome, f"reading the partition was still waiting {took:.0f} s after the kill"
            [err] = outcome
            assert isinstance(err, ft.PeerGone) and err.party == GUEST, repr(err)
            assert "guest:9999 was gone from the broker for 3.0 s (peer_gone_after)" in str(err), str(err)
            assert "partition 0" in str(err) and "'t'" in str(err), str(err)
            assert 0 < len(read) < 64 and took >= 3.0
            print(f"{backend}: PeerGone in a partition {took:.2f} s after the kill (peer_gone_after 3 s)")
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join(30)
        h.cleanup()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_party_with_two_sessions_stays_connected_while_one_lives(request, backend, job_id):
    """Spark runs a party as several sessions (driver and tasks, ``lane_offset``): one of them
    closing does not make the party gone while another is connected."""
    options = options_for(request, backend)
    with ft.Federation.connect(backend, job_id=job_id, party=HOST, options=options) as h:
        driver = ft.Federation.connect(backend, job_id=job_id, party=GUEST, options={**options, "lane_offset": 256})
        task = ft.Federation.connect(backend, job_id=job_id, party=GUEST, options={**options, "lane_offset": 3})
        wait_until(lambda: h.transport.peer_present(GUEST) is True, "the guest shows as connected", 60)
        task.close()
        for _ in range(5):  # the broker has dropped the closed session's consumer or producer already
            assert h.transport.peer_present(GUEST) is True
        driver.close()
        wait_until(lambda: h.transport.peer_present(GUEST) is False, "the guest's last session closed", SEEN_BOUND)
        h.cleanup()


def test_the_memory_backend_cannot_tell(job_id):
    with ft.Federation.connect("memory", job_id=job_id, party=HOST) as h:
        err = timeout_of(h, 0.1)
        assert err.presence == {"guest:9999": "unknown"}
        assert "connected" not in str(err)


def test_a_broker_slow_to_answer_does_not_hold_a_get_past_its_deadline(job_id, monkeypatch):
    """The probes run on a thread of their own: a presence check that hangs (a frozen broker's
    admin API) delays a timeout by at most ``FRESH_WAIT``, and the party is then "unknown"."""
    release = threading.Event()

    def hangs(party: ft.Party) -> bool | None:
        release.wait(60)
        return True

    with ft.Federation.connect("memory", job_id=job_id, party=HOST) as h:
        monkeypatch.setattr(h._presence, "_probe", hangs)  # test probe: the session's presence check
        start = time.monotonic()
        err = timeout_of(h, 1.5)
        took = time.monotonic() - start
        release.set()
        assert err.presence == {"guest:9999": "unknown"}
        assert took < 1.5 + FRESH_WAIT + 5, took
