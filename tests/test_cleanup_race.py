"""Parties of one job cleaning up at the same moment on one real broker: every cleanup succeeds.

Both parties of a job on one broker delete the same Pulsar namespace (and its topics) or the same
RabbitMQ vhost and job users. One of two deletes racing on the broker may be answered 404, 409,
412 or 500; cleanup must read back and call that done once the thing is gone. The race is the
broker's: several cleaners per round and several rounds make it likely, not certain, to occur
(RabbitMQ's 500 on a job user comes in the first rounds; Pulsar's 412 came 1 round in 40 of a
two-party cleanup). So the answers Pulsar gave are also served, deterministically, by the admin
fake (tests/pulsar_admin_fake.py) in front of the same cleanup.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from conftest import GUEST, HOST
from pulsar_admin_fake import FakePulsarAdmin

import fedtransport as ft
from fedtransport.brokers.rabbitmq import RabbitNode
from fedtransport.brokers.standalone import PulsarStandalone
from fedtransport.doctor import cleanup_job
from fedtransport.transport.pulsar.admin import PulsarAdmin

try:
    from tests.rabbit_fixtures import admin_of, rabbit_node, rabbit_opts, rabbit_pool, requires_rabbitmq
    from tests.standalone_fixtures import admin_read
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from rabbit_fixtures import admin_of, rabbit_node, rabbit_opts, rabbit_pool, requires_rabbitmq  # type: ignore[no-redef]  # noqa: F401
    from standalone_fixtures import admin_read  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(900)

ROUNDS = 8
CLEANERS_PER_PARTY = 2


def _job(backend: str, options: dict[str, Any]) -> str:
    """A job whose two parties exchanged a value and closed: its resources are on the broker."""
    job_id = f"race-{uuid.uuid4().hex[:10]}"
    with (
        ft.Federation.connect(backend, job_id=job_id, party=GUEST, options=options) as g,
        ft.Federation.connect(backend, job_id=job_id, party=HOST, options=options) as h,
    ):
        g.remote("to host", "x", "0", [HOST])
        h.remote("to guest", "x", "0", [GUEST])
        assert h.get("x", "0", [GUEST], timeout=60) == ["to host"]
        assert g.get("x", "0", [HOST], timeout=60) == ["to guest"]
    return job_id


def _at_once(calls: list[Callable[[], object]]) -> list[BaseException]:
    """Run ``calls`` in threads released together; the exceptions they raised."""
    start = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        start.wait()
        try:
            call()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _cleaners(backend: str, job_id: str, options: dict[str, Any]) -> list[Callable[[], object]]:
    return [
        lambda party=party: cleanup_job(backend, job_id, options, party=party)
        for party in [GUEST, HOST] * CLEANERS_PER_PARTY
    ]


def test_pulsar_parties_deleting_the_namespace_at_once(pulsar_standalone: PulsarStandalone) -> None:
    opts = {"service_url": pulsar_standalone.service_url, "admin_url": pulsar_standalone.admin_url}
    for _ in range(ROUNDS):
        job_id = _job("pulsar", opts)
        assert admin_read(pulsar_standalone, f"/admin/v2/namespaces/fl-tenant/{job_id}") is not None
        errors = _at_once(_cleaners("pulsar", job_id, opts))
        assert errors == []
        assert admin_read(pulsar_standalone, f"/admin/v2/namespaces/fl-tenant/{job_id}") is None


@requires_rabbitmq
def test_rabbitmq_parties_deleting_the_vhost_and_users_at_once(rabbit_node: RabbitNode) -> None:
    opts = rabbit_opts(rabbit_node)
    admin = admin_of(rabbit_node)
    for _ in range(ROUNDS):
        job_id = _job("rabbitmq", opts)
        vhost = f"fedtransport-{job_id}"
        assert admin.get_vhost(vhost) is not None
        errors = _at_once(_cleaners("rabbitmq", job_id, opts))
        assert errors == []
        assert admin.get_vhost(vhost) is None
        assert [u["name"] for u in admin.list_users() if u["name"].startswith(f"{vhost}:")] == []


@pytest.mark.parametrize("applied", [True, False], ids=["gone-after-the-error", "still-there-after-the-error"])
def test_pulsar_cleanup_checks_again_after_a_racing_answer(pulsar_standalone: PulsarStandalone, applied: bool) -> None:
    """The namespace delete answered 412 as in the race: done when the namespace is gone after
    it (the other party's delete won), cleaned again when it is still there."""
    job_id = f"race-{uuid.uuid4().hex[:10]}"
    with FakePulsarAdmin() as fake:
        admin = PulsarAdmin(fake.url)
        fake.state.clusters[pulsar_standalone.cluster] = {"brokerServiceUrl": pulsar_standalone.service_url}
        admin.ensure_tenant("fl-tenant", [pulsar_standalone.cluster])
        admin.create_namespace("fl-tenant", job_id)
        fake.add_topic(f"persistent://fl-tenant/{job_id}/guest-9999-host-10000-0")
        ns_path = f"/admin/v2/namespaces/fl-tenant/{job_id}"
        reason = f"Failed to find ownership for ServiceUnit:fl-tenant/{job_id}/0x80000000_0xc0000000"
        fake.fail("DELETE", ns_path, 412, reason, applied=applied)
        opts = {"service_url": pulsar_standalone.service_url, "admin_url": fake.url}
        report = cleanup_job("pulsar", job_id, opts, party=GUEST)
        assert report.left == []
        assert not admin.namespace_exists("fl-tenant", job_id)
        deletes = [r.path for r in fake.requests if r.method == "DELETE" and r.path == ns_path]
        assert len(deletes) == (1 if applied else 2)
