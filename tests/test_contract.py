"""One contract for every backend: what the layers above rely on from a ``Transport``.

Each test runs against memory, Pulsar (pulsar-lite and the real Apache Pulsar broker) and
RabbitMQ (shared and federated), through the backend plugin interface only (``get_backend``,
``JobContext``, the ``Transport`` methods): the same calls a third-party backend must answer.
Backend-specific behaviour stays in the backend's own test module.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import GUEST, HOST

import fedtransport as ft
from fedtransport.options import split_options
from fedtransport.routing import RouteTable
from fedtransport.transport import Delivery, JobContext, Transport, get_backend

try:
    from tests.rabbit_fixtures import rabbit_installed, rabbit_opts, rabbit_pair, rabbit_pool
except ModuleNotFoundError:
    from rabbit_fixtures import rabbit_installed, rabbit_opts, rabbit_pair, rabbit_pool  # type: ignore[no-redef]  # noqa: F401

WAIT = 120.0  # liveness bound of every wait for a delivery; never a timing claim
FEDERATION_SECRET = "the contract suite's job secret"


@dataclass
class Backend:
    """How to open one party's transport of a job on one backend."""

    name: str  # the registry name
    options: Callable[[ft.Party], dict[str, Any]]
    routes: dict[str, Any] | None = None
    deletes_messages: bool = True  # cleanup removes queued messages (Pulsar needs its admin REST)
    one_broker: bool = True  # every party on one broker: one cleanup removes the whole job
    opened: list[Transport] = field(default_factory=list)

    def open(self, job_id: str, party: ft.Party, **extra: Any) -> Transport:
        cls = get_backend(self.name)
        common, opts = split_options({**self.options(party), **extra}, self.name, cls.option_defaults)
        routes = RouteTable.load(self.routes, kind=self.name) if self.routes else None
        ctx = JobContext(job_id, party, routes, opts, common.max_message_size, common.lanes, common.lane_offset)
        transport = cls(ctx)
        transport.open()
        self.opened.append(transport)
        return transport


@pytest.fixture(scope="module")
def embedded_pulsar() -> Iterator[Any]:
    from fedtransport.brokers import EmbeddedPulsar

    with EmbeddedPulsar() as broker:
        yield broker


def _rabbit_or_skip(request: pytest.FixtureRequest) -> Any:
    if not rabbit_installed():
        pytest.skip("rabbitmq-server is not installed (scripts/test.sh installs it)")
    return request.getfixturevalue("rabbit_pair")


def _federated_rabbit(request: pytest.FixtureRequest) -> Backend:
    """Each party on its own node; the receiver's node pulls with the federation plugin.

    The job secret matters: with it, each sender makes a link user on its own node that the
    receiver's upstream logs in as. Without it (and without ``peer_credentials``) an upstream
    logs in with the receiving party's own admin credentials, which the pool's nodes do not
    share (each has a random admin password): the links never start and nothing arrives.
    """
    nodes = dict(zip((GUEST, HOST), _rabbit_or_skip(request), strict=True))
    routes = {p.party_id: {"host": "127.0.0.1", "port": n.port, "mng_port": n.mng_port} for p, n in nodes.items()}
    return Backend(
        "rabbitmq",
        lambda p: rabbit_opts(nodes[p], mode="federated", secret=FEDERATION_SECRET),
        routes=routes,
        one_broker=False,
    )


@pytest.fixture(params=["memory", "pulsar-lite", "pulsar", "rabbitmq-shared", "rabbitmq-federated"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    kind = request.param
    if kind == "memory":
        b = Backend("memory", lambda p: {})
    elif kind == "pulsar-lite":
        url = request.getfixturevalue("embedded_pulsar").service_url
        b = Backend("pulsar", lambda p: {"service_url": url}, deletes_messages=False)
    elif kind == "pulsar":
        broker = request.getfixturevalue("pulsar_standalone")
        b = Backend("pulsar", lambda p: {"service_url": broker.service_url, "admin_url": broker.admin_url})
    elif kind == "rabbitmq-shared":
        node = _rabbit_or_skip(request)[0]
        b = Backend("rabbitmq", lambda p: rabbit_opts(node))
    else:
        b = _federated_rabbit(request)
    yield b
    for t in b.opened:
        t.close()
    first = {t.ctx.party: t for t in reversed(b.opened)}  # each party's first transport
    for t in b.opened[:1] if b.one_broker else first.values():
        t.cleanup()


class Inbox:
    """Deliveries of the lanes a transport listens on, in arrival order. Like the real receiver,
    it calls ``make_room`` once a lane holds ``max_unacked_per_lane`` unacknowledged messages."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.q: queue.Queue[Delivery] = queue.Queue()
        self.held: dict[tuple[ft.Party, int], int] = {}
        self.lock = threading.Lock()

    def __call__(self, d: Delivery) -> None:
        key, limit = (d.src, d.lane), self.transport.max_unacked_per_lane
        with self.lock:
            self.held[key] = held = self.held.get(key, 0) + 1
        if limit is not None and held >= limit:
            self.transport.make_room(d.src, d.lane, held)
        self.q.put(Delivery(d.src, d.lane, bytes(d.data), d.token))

    def take(self, count: int) -> list[Delivery]:
        return [self.q.get(timeout=WAIT) for _ in range(count)]

    def ack(self, ds: list[Delivery]) -> None:
        with self.lock:
            for d in ds:
                self.held[(d.src, d.lane)] -= 1
        self.transport.ack([(d.lane, d.src, d.token) for d in ds])


def payloads(ds: list[Delivery]) -> list[bytes]:
    return [bytes(d.data) for d in ds]


def test_messages_arrive_whole_in_order_on_their_own_lane(backend, job_id):
    g, h = backend.open(job_id, GUEST), backend.open(job_id, HOST)
    inboxes = {lane: Inbox(h) for lane in (0, 1)}
    for lane, inbox in inboxes.items():
        h.listen(GUEST, lane, inbox)
    sent = {lane: [f"lane {lane} message {i}".encode() * (i + 1) for i in range(20)] for lane in (0, 1)}
    assert g.send(HOST, 0, iter(sent[0])) == 20  # a lazy iterator, as the framing hands it over
    assert g.send(HOST, 1, sent[1]) == 20
    for lane, inbox in inboxes.items():
        got = inbox.take(20)
        assert payloads(got) == sent[lane]
        assert {(d.src, d.lane) for d in got} == {(GUEST, lane)}
        inbox.ack(got)


def test_a_message_of_max_message_size_passes_intact(backend, job_id):
    g, h = backend.open(job_id, GUEST), backend.open(job_id, HOST)
    size = g.ctx.max_message_size
    inbox = Inbox(h)
    h.listen(GUEST, 0, inbox)
    big = bytes(range(256)) * (size // 256)
    g.send(HOST, 0, [big])
    (d,) = inbox.take(1)
    assert len(d.data) == size and d.data == big
    inbox.ack([d])


def test_concurrent_sends_on_different_lanes(backend, job_id):
    g, h = backend.open(job_id, GUEST), backend.open(job_id, HOST)
    lanes = g.ctx.lanes
    inboxes = [Inbox(h) for _ in range(lanes)]
    for lane, inbox in enumerate(inboxes):
        h.listen(GUEST, lane, inbox)
    threads = [
        threading.Thread(target=g.send, args=(HOST, lane, [b"%d:%d" % (lane, i) for i in range(50)]))
        for lane in range(lanes)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    for lane, inbox in enumerate(inboxes):
        got = inbox.take(50)
        assert payloads(got) == [b"%d:%d" % (lane, i) for i in range(50)]
        inbox.ack(got)


def test_listening_twice_delivers_each_message_once(backend, job_id):
    g, h = backend.open(job_id, GUEST), backend.open(job_id, HOST)
    inbox = Inbox(h)
    h.listen(GUEST, 0, inbox)
    h.listen(GUEST, 0, inbox)  # idempotent
    g.send(HOST, 0, [b"one", b"two"])
    got = inbox.take(2)
    inbox.ack(got)
    g.send(HOST, 0, [b"three"])  # a marker: anything delivered twice would come before it
    (d,) = inbox.take(1)
    assert [*payloads(got), d.data] == [b"one", b"two", b"three"]
    inbox.ack([d])


def test_unacknowledged_messages_come_to_the_next_session_acknowledged_ones_do_not(backend, job_id):
    g, h = backend.open(job_id, GUEST), backend.open(job_id, HOST)
    inbox = Inbox(h)
    h.listen(GUEST, 0, inbox)
    g.send(HOST, 0, [b"m%d" % i for i in range(10)])
    got = inbox.take(10)
    inbox.ack(got[:5])
    h.close()  # the other five were delivered but never acknowledged
    h2 = backend.open(job_id, HOST)
    again = Inbox(h2)
    h2.listen(GUEST, 0, again)
    assert sorted(payloads(again.take(5))) == [b"m%d" % i for i in range(5, 10)]
    g.send(HOST, 0, [b"marker"])  # an acknowledged one coming back would arrive before it
    assert payloads(again.take(1)) == [b"marker"]


def test_redeliver_brings_back_what_was_not_acknowledged(backend, job_id):
    g, h = backend.open(job_id, GUEST), backend.open(job_id, HOST)
    inbox = Inbox(h)
    h.listen(GUEST, 0, inbox)
    g.send(HOST, 0, [b"a", b"b", b"c"])
    first = inbox.take(3)
    inbox.ack(first[:1])
    h.redeliver(GUEST, 0)
    again = inbox.take(2)
    assert sorted(payloads(again)) == [b"b", b"c"]
    inbox.ack(again)


def test_send_after_close_is_a_backend_error(backend, job_id):
    g = backend.open(job_id, GUEST)
    g.close()
    g.close()  # idempotent
    with pytest.raises(ft.BackendError):
        g.send(HOST, 0, [b"late"])


def test_cleanup_is_idempotent_and_the_job_starts_afresh(backend, job_id):
    if not backend.deletes_messages:
        pytest.skip("without an admin REST, Pulsar cleanup can only drop subscriptions (docs/pulsar.md)")
    g, h = backend.open(job_id, GUEST), backend.open(job_id, HOST)
    h.listen(GUEST, 0, Inbox(h))  # the lane exists and holds an unread message
    g.send(HOST, 0, [b"old"])
    g.close()
    h.close()
    g.cleanup()
    h.cleanup()
    g.cleanup()
    g2, h2 = backend.open(job_id, GUEST), backend.open(job_id, HOST)
    inbox = Inbox(h2)
    h2.listen(GUEST, 0, inbox)
    g2.send(HOST, 0, [b"new"])
    (d,) = inbox.take(1)
    assert d.data == b"new"  # nothing of the session before the cleanup is left to deliver
    inbox.ack([d])
