"""Failure between parties (API.md): ``abort``, ``PeerAborted``, and ``close`` waking waiters.

Each test runs on the in-process backend and on the real brokers (Apache Pulsar standalone,
a RabbitMQ node), because the notice travels over the same lanes as data. Every waiting ``get``
runs in a thread whose outcome is collected, and the time from the abort to the peer's
exception is bounded generously (the machines are shared): what is checked is that the peer
stops waiting long before its own timeout, not how fast.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import ARBITER, GUEST, HOST

import fedtransport as ft

try:
    from tests.rabbit_fixtures import rabbit_installed, rabbit_opts, rabbit_pair, rabbit_pool  # by parameter name
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from rabbit_fixtures import rabbit_installed, rabbit_opts, rabbit_pair, rabbit_pool  # type: ignore[no-redef]  # noqa: F401

pytestmark = pytest.mark.timeout(600)

NOTICE_BOUND = 30.0  # seconds from abort to the peer's PeerAborted; its get would wait 600


Connect = Callable[[ft.Party], ft.Federation]


@pytest.fixture(params=["memory", "pulsar", "rabbitmq"])
def connect(request: pytest.FixtureRequest, job_id: str) -> Iterator[Connect]:
    kind = request.param
    if kind == "memory":
        options: Callable[[], dict[str, Any]] = dict
    elif kind == "pulsar":
        broker = request.getfixturevalue("pulsar_standalone")
        options = lambda: {"service_url": broker.service_url, "admin_url": broker.admin_url}  # noqa: E731
    else:
        if not rabbit_installed():
            pytest.skip("rabbitmq-server is not installed (scripts/test.sh installs it)")
        node = request.getfixturevalue("rabbit_pair")[0]
        options = lambda: rabbit_opts(node)  # noqa: E731
    opened: list[ft.Federation] = []

    def make(party: ft.Party) -> ft.Federation:
        fed = ft.Federation.connect(kind, job_id=job_id, party=party, options=options())
        opened.append(fed)
        return fed

    yield make
    for fed in opened:
        fed.close()
    if opened:
        opened[0].cleanup()


class Waiter:
    """A ``get`` in a thread; ``outcome()`` is its value or the exception it raised."""

    def __init__(self, fed: ft.Federation, name: str, src: ft.Party, timeout: float | None = 600.0) -> None:
        self.result: list[Any] = []
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(fed, name, src, timeout), daemon=True)
        self.thread.start()

    def _run(self, fed: ft.Federation, name: str, src: ft.Party, timeout: float | None) -> None:
        try:
            self.result.append(fed.get(name, "0", [src], timeout=timeout))
        except BaseException as exc:  # the outcome under test
            self.result.append(exc)
        self.ended.set()

    def outcome(self, bound: float = NOTICE_BOUND) -> Any:
        assert self.ended.wait(bound), f"the get was still waiting {bound} s later"
        return self.result[0]


def _exchange(a: ft.Federation, b: ft.Federation) -> None:
    """One value each way: the sessions have met (and listen to each other)."""
    a.remote("hi", "hello", "0", [b.party])
    b.remote("hi", "hello", "0", [a.party])
    assert b.get("hello", "0", [a.party], timeout=120) == ["hi"]
    assert a.get("hello", "0", [b.party], timeout=120) == ["hi"]


def test_peer_aborted_is_a_federation_error_with_party_and_reason() -> None:
    err = ft.PeerAborted(GUEST, "out of memory")
    assert isinstance(err, ft.FederationError)
    assert err.party == GUEST and err.reason == "out of memory"
    assert "guest" in str(err) and "out of memory" in str(err)


def test_abort_wakes_a_pending_get_of_the_peer(connect: Connect) -> None:
    guest, host = connect(GUEST), connect(HOST)
    _exchange(guest, host)
    waiting = Waiter(host, "w", GUEST, timeout=None)  # FATE's default: no timeout at all
    time.sleep(0.5)  # let the get start waiting; its outcome must not depend on it
    started = time.monotonic()
    guest.abort("loss became NaN")
    err = waiting.outcome()
    assert isinstance(err, ft.PeerAborted), err
    assert err.party == GUEST and err.reason == "loss became NaN"
    assert time.monotonic() - started < NOTICE_BOUND
    # a later get from that party fails at once too, and so does one under another name
    with pytest.raises(ft.PeerAborted):
        host.get("w2", "0", [GUEST], timeout=600)
    # the aborted session is closed: it sends nothing more
    assert guest.closed
    with pytest.raises(ft.FederationError):
        guest.remote(1, "late", "0", [HOST])


def test_abort_reaches_a_reader_of_a_table_still_streaming_in(connect: Connect) -> None:
    """``get`` returned the table at its head; the caller reads partition 0 while it streams in.
    The guest gives up mid-table (its partition is a generator that stops yielding): the reader
    raises ``PeerAborted``, where it waited out its timeout before."""
    guest, host = connect(GUEST), connect(HOST)
    _exchange(guest, host)
    stuck, release = threading.Event(), threading.Event()

    def rows() -> Iterator[tuple[int, bytes]]:
        for i in range(4000):
            if i == 3500:  # 14 MB in: the head and the first 4 MiB unit are out (the sender looks one ahead)
                stuck.set()
                release.wait(120)
                raise RuntimeError("the guest's data source failed")
            yield i, bytes(4096)

    sender = threading.Thread(target=lambda: _quietly(guest.remote, ft.Table([rows()]), "t", "0", [HOST]))
    sender.start()
    assert stuck.wait(60)
    [table] = host.get("t", "0", [GUEST], timeout=120)
    read: list[Any] = []

    def read_partition() -> None:
        try:
            for key, _ in table.iter_partition(0):
                read.append(key)
        except BaseException as exc:  # the outcome under test
            read.append(exc)

    reader = threading.Thread(target=read_partition, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while len(read) < 500 and time.monotonic() < deadline:  # what was sent is read before the abort
        time.sleep(0.05)
    started = time.monotonic()
    guest.abort("the data source failed")
    release.set()
    reader.join(NOTICE_BOUND)
    assert not reader.is_alive(), "the reader was still waiting"
    err = read[-1]
    assert isinstance(err, ft.PeerAborted) and err.party == GUEST, err
    assert 500 <= len(read) - 1 < 3500 and time.monotonic() - started < NOTICE_BOUND
    sender.join(60)


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(Exception):  # the sender's own failure is not what these tests look at
        fn(*args)


def test_an_exception_in_the_with_block_aborts_with_its_text(connect: Connect) -> None:
    guest, host = connect(GUEST), connect(HOST)
    _exchange(guest, host)
    waiting = Waiter(host, "model", GUEST)
    with pytest.raises(ZeroDivisionError), guest:
        raise ZeroDivisionError("division by zero in step 3")
    err = waiting.outcome()
    assert isinstance(err, ft.PeerAborted) and err.party == GUEST
    assert "ZeroDivisionError" in err.reason and "division by zero in step 3" in err.reason


def test_abort_reaches_only_the_aborting_party_s_transfers(connect: Connect) -> None:
    guest, host, arbiter = connect(GUEST), connect(HOST), connect(ARBITER)
    _exchange(guest, host)
    _exchange(arbiter, host)
    from_guest = Waiter(host, "g", GUEST)
    arbiter.remote(42, "a", "0", [HOST])
    guest.abort("guest gives up")
    assert isinstance(from_guest.outcome(), ft.PeerAborted)
    assert host.get("a", "0", [ARBITER], timeout=120) == [42]  # the other peer is not affected


def test_a_peer_that_never_sent_to_us_still_hears_the_abort(connect: Connect) -> None:
    # The host waits for the guest's first value; the guest only ever received from the host.
    guest, host = connect(GUEST), connect(HOST)
    host.remote("config", "cfg", "0", [GUEST])
    assert guest.get("cfg", "0", [HOST], timeout=120) == ["config"]
    waiting = Waiter(host, "first", GUEST)
    guest.abort("bad config")
    err = waiting.outcome()
    assert isinstance(err, ft.PeerAborted) and err.reason == "bad config"


def test_close_wakes_every_waiting_get(connect: Connect) -> None:
    guest, host = connect(GUEST), connect(HOST)
    _exchange(guest, host)
    waiters = [Waiter(host, f"w{i}", GUEST, timeout=None) for i in range(3)]
    time.sleep(0.5)
    host.close()
    for w in waiters:
        err = w.outcome()
        assert isinstance(err, ft.FederationError) and not isinstance(err, ft.PeerAborted), err
        assert "closed" in str(err)


def test_abort_arguments_and_idempotence(connect: Connect) -> None:
    guest, host = connect(GUEST), connect(HOST)
    with pytest.raises(TypeError):
        guest.abort(123)  # type: ignore[arg-type]
    assert not guest.closed  # a refused argument changes nothing
    _exchange(guest, host)
    guest.abort("x" * 100_000)  # a long reason is cut, not refused
    guest.abort("again")  # aborting a closed session does nothing
    err = Waiter(host, "w", GUEST).outcome()
    assert isinstance(err, ft.PeerAborted) and err.reason.startswith("xxx") and len(err.reason) <= 4096


def test_on_the_memory_backend_every_session_of_the_job_hears_an_abort(job_id: str) -> None:
    # The hub knows every session of the job: the host hears the guest's abort although the
    # two never exchanged anything.
    connect = lambda p: ft.Federation.connect("memory", job_id=job_id, party=p)  # noqa: E731
    with connect(GUEST) as guest, connect(HOST) as host:
        waiting = Waiter(host, "w", GUEST)
        guest.abort("never started")
        err = waiting.outcome()
        assert isinstance(err, ft.PeerAborted) and err.reason == "never started"


def test_a_normal_close_is_no_abort(connect: Connect, caplog: pytest.LogCaptureFixture) -> None:
    # Closing fails the notices a session listens for; that must not read as the peer aborting.
    guest, host = connect(GUEST), connect(HOST)
    _exchange(guest, host)
    with caplog.at_level("WARNING", logger="fedtransport"):
        host.close()
        guest.remote("after", "late", "0", [HOST])
        guest.close()
    assert not [r for r in caplog.records if "abort" in r.getMessage()]


def test_a_third_party_cannot_abort_in_another_party_s_name(job_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The arbiter sends, on its own lanes, frames carrying the id of the guest's abort notice
    # to the host. The inbox refuses frames of a transfer from another lane's sender; that
    # refusal must not read as the guest aborting, and the guest's value must still arrive.
    import fedtransport.api as api

    connect = lambda p: ft.Federation.connect("memory", job_id=job_id, party=p)  # noqa: E731
    with connect(GUEST) as guest, connect(HOST) as host, connect(ARBITER) as arbiter:
        _exchange(guest, host)
        _exchange(arbiter, host)
        waiting = Waiter(host, "w", GUEST)
        real = api.control_id
        monkeypatch.setattr(api, "control_id", lambda job, kind, src, dst: real(job, kind, str(GUEST), dst))
        arbiter.abort("forged by the arbiter")
        monkeypatch.setattr(api, "control_id", real)
        time.sleep(0.5)  # the forged frames are in and refused
        assert not waiting.ended.is_set()
        guest.remote(7, "w", "0", [HOST])
        assert waiting.outcome() == [7]
        # the host still listens for the guest's real notice
        later = Waiter(host, "w2", GUEST)
        guest.abort("the real one")
        err = later.outcome()
        assert isinstance(err, ft.PeerAborted) and err.reason == "the real one"
