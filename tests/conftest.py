"""Shared fixtures. Broker fixtures live next to the tests that need them."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator

import pytest

import fedtransport as ft

try:  # the real Apache Pulsar broker, one per session (tests/standalone_fixtures.py)
    from tests.standalone_fixtures import pulsar_standalone
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from standalone_fixtures import pulsar_standalone  # type: ignore[no-redef]  # noqa: F401

GUEST = ft.Party("guest", "9999")
HOST = ft.Party("host", "10000")
ARBITER = ft.Party("arbiter", "10001")

_job_ids = itertools.count()


@pytest.fixture
def job_id(request: pytest.FixtureRequest) -> str:
    """A job id unique to the test (and to the process, for parallel runs)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"t{os.getpid()}-{next(_job_ids)}-{request.node.name[:40]}")


@pytest.fixture
def memory_pair(job_id: str) -> Iterator[tuple[ft.Federation, ft.Federation]]:
    g = ft.Federation.connect("memory", job_id=job_id, party=GUEST)
    h = ft.Federation.connect("memory", job_id=job_id, party=HOST)
    yield g, h
    g.close()
    h.close()
    g.cleanup()
