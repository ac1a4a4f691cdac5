"""The longest ids the API allows work end to end on real brokers (issue 13, item 7).

A job id of 128 characters and roles and party ids of 64 pass ``connect``'s checks, so every
backend must turn them into broker names the broker takes: RabbitMQ's queue, exchange and vhost
names are AMQP short strings (at most 255 bytes), and before the names were shortened a
``remote`` failed after ``send_timeout`` with "no publisher confirm" while the receiver looped
on ``ShortStringTooLong``. Real rabbitmq-server (tests/rabbit_fixtures.py) and real Apache
Pulsar standalone (tests/standalone_fixtures.py).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import fedtransport as ft
from fedtransport.brokers import PulsarStandalone, RabbitNode
from fedtransport.transport.pulsar.admin import PulsarAdmin
from fedtransport.transport.pulsar.naming import PulsarNames
from fedtransport.transport.rabbitmq.naming import AMQP_SHORT_MAX, RabbitNames

try:
    from tests.rabbit_fixtures import admin_of, rabbit_node, rabbit_opts, rabbit_pair, rabbit_pool, requires_rabbitmq
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from rabbit_fixtures import (  # type: ignore[no-redef]  # noqa: F401
        admin_of,
        rabbit_node,
        rabbit_opts,
        rabbit_pair,
        rabbit_pool,
        requires_rabbitmq,
    )

pytestmark = pytest.mark.timeout(600)

# The longest of everything: 128-character job ids, 64-character roles and party ids.
SENDER = ft.Party("g" * 63 + "1", "9" * 64)
RECEIVER = ft.Party("h" * 63 + "2", "1" * 63 + "0")


def long_job_id() -> str:
    job = f"long-{uuid.uuid4().hex}-"
    return job + "x" * (128 - len(job))


def round_trip(sender: ft.Federation, receiver: ft.Federation) -> None:
    """An object and a table, each way of the pair's lanes: what a job moves."""
    value = {"weights": list(range(1000)), "name": "é" * 100}
    sender.remote(value, "w", "0", [RECEIVER])
    table = ft.Table([[(i, str(i)) for i in range(50)], [(i, str(i)) for i in range(50, 100)]])
    sender.remote(table, "t", "0", [RECEIVER])
    assert receiver.get("w", "0", [SENDER], timeout=60) == [value]
    [table] = receiver.get("t", "0", [SENDER], timeout=60)
    assert sorted(table.collect()) == [(i, str(i)) for i in range(100)]
    receiver.remote("back", "ack", "0", [SENDER])
    assert sender.get("ack", "0", [RECEIVER], timeout=60) == ["back"]


def test_every_rabbitmq_name_fits_an_amqp_short_string() -> None:
    longest_lane = (1 << 30) + 255  # lane_offset's bound plus the last lane
    for prefix in ("", "fedtransport-", "p" * 64):
        job = long_job_id()
        names = RabbitNames(job, SENDER, f"{prefix}{job}", 0)
        every = [
            names.vhost,
            names.queue(SENDER, RECEIVER, longest_lane),
            names.exchange(SENDER),
            names.party_user(SENDER),
            names.link_user(SENDER, RECEIVER),
            names.upstream_name(SENDER),
            names.policy_name(SENDER),
        ]
        assert max(len(n.encode()) for n in every) <= AMQP_SHORT_MAX, every
        # the permission patterns still select the shortened queue names, and only those
        queue = names.queue(SENDER, RECEIVER, 3)
        assert re.fullmatch(names.queue_pattern(SENDER, None), queue)
        assert re.fullmatch(names.queue_pattern(None, RECEIVER), queue)
        assert not re.fullmatch(names.queue_pattern(RECEIVER, None), queue)


def test_short_ids_keep_their_readable_names() -> None:
    names = RabbitNames("job-1", ft.Party("guest", "9999"), "fedtransport-job-1")
    assert names.queue(ft.Party("guest", "9999"), ft.Party("host", "10000"), 0) == "job-1:guest:9999:host:10000:0"
    link = names.link_user(ft.Party("guest", "9999"), ft.Party("host", "1"))
    assert link == "fedtransport-job-1:link:guest:9999:host:1"


def test_shortened_rabbitmq_names_of_distinct_parties_differ() -> None:
    """Parties that share the kept prefixes still get names of their own (the hash of the whole)."""
    a, b = ft.Party("r" * 64, "p" * 63 + "a"), ft.Party("r" * 64, "p" * 63 + "b")
    names = RabbitNames(long_job_id(), a, "v")
    assert names.queue(a, b, 0) != names.queue(b, a, 0)
    assert names.party_user(a) != names.party_user(b)
    assert names.exchange(a) != names.exchange(b)


@requires_rabbitmq
@pytest.mark.rabbitmq
def test_longest_ids_round_trip_on_rabbitmq(rabbit_node: RabbitNode) -> None:
    job = long_job_id()
    opts = rabbit_opts(rabbit_node, send_timeout=20.0)
    sender = ft.Federation.connect("rabbitmq", job_id=job, party=SENDER, options=opts)
    receiver = ft.Federation.connect("rabbitmq", job_id=job, party=RECEIVER, options=opts)
    try:
        round_trip(sender, receiver)
        assert len(sender.transport.vhost) == len("fedtransport-") + 128  # the vhost keeps the whole id
    finally:
        receiver.close()
        sender.close()
        sender.cleanup()
        receiver.cleanup()
    assert admin_of(rabbit_node).get_vhost(sender.transport.vhost) is None


@requires_rabbitmq
@pytest.mark.rabbitmq
def test_longest_ids_round_trip_on_federated_rabbitmq(rabbit_pair: tuple[RabbitNode, RabbitNode]) -> None:
    """Each party on its own node: the shortened link user, upstream and policy names work too."""
    job = long_job_id()
    routes = {
        p.party_id: {"host": "127.0.0.1", "port": node.port, "mng_port": node.mng_port}
        for p, node in zip((SENDER, RECEIVER), rabbit_pair, strict=True)
    }

    def connect(party: ft.Party, node: RabbitNode) -> ft.Federation:
        opts = rabbit_opts(node, mode="federated", secret="a job secret shared by every party", send_timeout=20.0)
        return ft.Federation.connect("rabbitmq", job_id=job, party=party, route_table=routes, options=opts)

    sender, receiver = connect(SENDER, rabbit_pair[0]), connect(RECEIVER, rabbit_pair[1])
    try:
        round_trip(sender, receiver)
    finally:
        receiver.close()
        sender.close()
        sender.cleanup()
        receiver.cleanup()


@pytest.fixture
def pulsar_broker(pulsar_standalone: PulsarStandalone) -> Iterator[tuple[PulsarStandalone, str]]:
    job = long_job_id()
    yield pulsar_standalone, job
    PulsarAdmin(pulsar_standalone.admin_url).delete_namespace("fl-tenant", job)


def test_longest_ids_round_trip_on_pulsar(pulsar_broker: tuple[PulsarStandalone, str]) -> None:
    broker, job = pulsar_broker
    opts: dict[str, Any] = {"service_url": broker.service_url, "admin_url": broker.admin_url}
    sender = ft.Federation.connect("pulsar", job_id=job, party=SENDER, options=opts)
    receiver = ft.Federation.connect("pulsar", job_id=job, party=RECEIVER, options=opts)
    try:
        round_trip(sender, receiver)
    finally:
        receiver.close()
        sender.close()
        sender.cleanup()


def test_pulsar_names_of_parties_with_dashes_never_meet() -> None:
    """``-`` separates the parts of a topic name and may occur in ids: ("a-b", "c") is not ("a", "b-c")."""
    names = PulsarNames("fl-tenant", "job")
    parties = [ft.Party("a-b", "c"), ft.Party("a", "b-c"), ft.Party("a", "b"), ft.Party("c-d", "e"), ft.Party("d", "e")]
    topics = [names.topic(s, d, lane) for s in parties for d in parties if s != d for lane in (0, 1)]
    assert len(set(topics)) == len(topics)
    assert len({names.subscription(p) for p in parties}) == len(parties)
    # ids without a dash keep the names they always had
    assert names.topic(ft.Party("guest", "9999"), ft.Party("host", "10000"), 3) == (
        "persistent://fl-tenant/job/guest-9999-host-10000-3"
    )


def test_parties_whose_dashed_names_once_met_each_get_their_own_on_pulsar(
    pulsar_broker: tuple[PulsarStandalone, str],
) -> None:
    """Two senders whose topics to one receiver used to be the same topic: each value from its sender."""
    broker, job = pulsar_broker
    opts: dict[str, Any] = {"service_url": broker.service_url, "admin_url": broker.admin_url}
    first, second, receiver_party = ft.Party("a-b", "c"), ft.Party("a", "b-c"), ft.Party("d", "e")
    sessions = [ft.Federation.connect("pulsar", job_id=job, party=p, options=opts) for p in (first, second)]
    receiver = ft.Federation.connect("pulsar", job_id=job, party=receiver_party, options=opts)
    try:
        sessions[0].remote("from a-b:c", "w", "0", [receiver_party])
        sessions[1].remote("from a:b-c", "w", "0", [receiver_party])
        assert receiver.get("w", "0", [first, second], timeout=60) == ["from a-b:c", "from a:b-c"]
    finally:
        receiver.close()
        for s in sessions:
            s.close()
        receiver.cleanup()
