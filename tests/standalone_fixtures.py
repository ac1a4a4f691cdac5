"""The real Apache Pulsar broker for tests: one standalone JVM per test session.

``tests/conftest.py`` imports ``pulsar_standalone`` from here, so every test module can ask for
it by name. A start takes 5-10 s and the JVM ~400 MB, so the broker is shared: tests use their
own topics and subscriptions (``unique_topic``) and leave the broker running (a test that kills
or restarts it must bring it back). The first start of a machine also resolves the broker's jars
with Maven (~35 s, ~240 MB under ``~/.cache/fedtransport/pulsar``). Without Java 17, Maven or
Maven Central the fixture raises, and every test using it errors: nothing is skipped.
"""

from __future__ import annotations

import urllib.error
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from fedtransport.brokers.standalone import PulsarStandalone

try:
    from tests.party_proc import socket_addresses
except ImportError:  # tests/ itself on sys.path
    from party_proc import socket_addresses  # type: ignore[no-redef]

__all__ = ["admin_read", "pulsar_standalone", "socket_addresses", "unique_topic"]


@pytest.fixture(scope="session")
def pulsar_standalone() -> Iterator[PulsarStandalone]:
    """A plain (no TLS, no auth) Apache Pulsar standalone on loopback, for the whole session."""
    with PulsarStandalone() as broker:
        yield broker


def admin_read(broker: PulsarStandalone, path: str) -> Any:
    """GET ``path`` through the broker's admin REST (not the client under test); ``None`` for a 404."""
    try:
        return broker.admin("GET", path)
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise


def unique_topic(prefix: str = "t") -> str:
    return f"persistent://public/default/{prefix}-{uuid.uuid4().hex[:12]}"
