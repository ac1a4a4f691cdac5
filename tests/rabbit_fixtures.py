"""Reusable RabbitMQ fixtures: throw-away nodes, their admin clients and TLS material.

Import what a test module needs::

    from tests.rabbit_fixtures import rabbit_certs, rabbit_node, rabbit_pair, requires_rabbitmq  # noqa: F401

Nodes are session-scoped and shared (a boot takes 8-25 s depending on load): tests must use
their own vhosts, queues and users (``unique_name``) and leave the nodes running. The pool
starts nodes on first use, several at once in parallel, and stops them all at the end of the
session. It is one per process even when several modules import these fixtures; a root
``conftest.py`` may instead register this module with ``pytest_plugins``.

Every pool node also has an AMQPS listener with a certificate for ``{name}.fate.test``,
``localhost`` and 127.0.0.1, signed by the session CA in ``rabbit_certs["ca"]``.
"""

from __future__ import annotations

import secrets
import ssl
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from fedtransport import certs
from fedtransport.brokers.rabbitmq import RabbitNode
from fedtransport.transport.rabbitmq_admin import RabbitAdmin

__all__ = [
    "BootingNode",
    "RabbitPool",
    "admin_of",
    "make_certs",
    "rabbit_certs",
    "rabbit_installed",
    "rabbit_node",
    "rabbit_opts",
    "rabbit_pair",
    "rabbit_pool",
    "requires_rabbitmq",
    "tls_context",
    "unique_name",
]

POOL_NAMES = ("party-a", "party-b", "party-c")
TEST_DOMAIN = "fate.test"


def rabbit_installed() -> bool:
    return RabbitNode.installed()


requires_rabbitmq = pytest.mark.skipif(
    not rabbit_installed(), reason="rabbitmq-server not installed (apt-get install -y rabbitmq-server)"
)


def unique_name(prefix: str) -> str:
    """A fresh resource name for a shared node (vhosts, users, queues)."""
    return f"{prefix}-{secrets.token_hex(4)}"


def admin_of(node: RabbitNode) -> RabbitAdmin:
    """A management client logged in as the node's administrator."""
    assert node.mng_url is not None, "node runs without the management plugin"
    return RabbitAdmin(node.mng_url, node.user, node.password, timeout=30.0)


def make_certs(directory: Path, names: Sequence[str]) -> dict[str, Path]:
    """A CA plus one server certificate per host name (SANs: the name, localhost, 127.0.0.1).

    Returns paths: ``ca`` and, per name, ``{name}.crt`` / ``{name}.key`` keys, plus a client
    certificate ``client.crt`` / ``client.key`` for mutual TLS. Made with ``fedtransport.certs``,
    valid for two days: the session's nodes never outlive it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = certs.make_ca("fedtransport test CA", days=2)
    out = {"ca": certs.write_cert(directory / "ca.crt", ca_cert)}

    def issue(name: str, *, server: bool, extra_sans: Sequence[str] = ()) -> None:
        key, cert = certs.issue(ca_key, ca_cert, name, days=2, server=server, client=not server, extra_sans=extra_sans)
        out[f"{name}.crt"] = certs.write_cert(directory / f"{name}.crt", cert)
        out[f"{name}.key"] = certs.write_key(directory / f"{name}.key", key)

    for name in names:
        issue(name, server=True, extra_sans=["localhost", "127.0.0.1"])
    issue("client", server=False)
    return out


def tls_context(certs: dict[str, Path], *, client_cert: bool = False) -> ssl.SSLContext:
    """A client context trusting the test CA (optionally presenting the client certificate)."""
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    if client_cert:
        ctx.load_cert_chain(str(certs["client.crt"]), str(certs["client.key"]))
    return ctx


class RabbitPool:
    """Session-wide nodes started on demand (in parallel) and stopped together."""

    def __init__(self, certs: dict[str, Path]) -> None:
        self.certs = certs
        self._nodes: dict[str, RabbitNode] = {}
        self._lock = threading.Lock()

    def _new(self, name: str) -> RabbitNode:
        host = f"{name}.{TEST_DOMAIN}"
        tls = {
            "certfile": str(self.certs[f"{host}.crt"]),
            "keyfile": str(self.certs[f"{host}.key"]),
            "cacertfile": str(self.certs["ca"]),
        }
        return RabbitNode(name=name, tls=tls)

    def nodes(self, count: int) -> list[RabbitNode]:
        """The first ``count`` pool nodes, starting the missing ones concurrently."""
        if count > len(POOL_NAMES):
            raise ValueError(f"the pool has at most {len(POOL_NAMES)} nodes")
        with self._lock:
            missing = [n for n in POOL_NAMES[:count] if n not in self._nodes]
            fresh = {name: self._new(name) for name in missing}
            errors: list[BaseException] = []

            def boot(node: RabbitNode) -> None:
                try:
                    node.start()
                except BaseException as exc:  # reported below, in the test's thread
                    errors.append(exc)

            threads = [threading.Thread(target=boot, args=(node,)) for node in fresh.values()]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                for node in fresh.values():
                    node.stop()
                raise errors[0]
            self._nodes.update(fresh)
            return [self._nodes[name] for name in POOL_NAMES[:count]]

    def close(self) -> None:
        # Graceful stops take ~6 s each (the management plugin's shutdown): run them together.
        threads = [threading.Thread(target=node.stop) for node in self._nodes.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._nodes.clear()


# One pool per process even if several test modules import these fixtures (each import makes
# its own session fixture definition); closing it at session end is idempotent.
_SHARED: dict[str, RabbitPool] = {}
_SHARED_LOCK = threading.Lock()


def _shared_pool(tmp_path_factory: pytest.TempPathFactory) -> RabbitPool:
    with _SHARED_LOCK:
        if "pool" not in _SHARED:
            names = [f"{n}.{TEST_DOMAIN}" for n in POOL_NAMES]
            certs = make_certs(tmp_path_factory.mktemp("rabbit-certs"), names)
            _SHARED["pool"] = RabbitPool(certs)
        return _SHARED["pool"]


@pytest.fixture(scope="session")
def rabbit_certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of the session CA (``ca``), server certs/keys per pool host, a client cert/key."""
    return _shared_pool(tmp_path_factory).certs


@pytest.fixture(scope="session")
def rabbit_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitPool]:
    if not rabbit_installed():
        pytest.skip("rabbitmq-server not installed (apt-get install -y rabbitmq-server)")
    pool = _shared_pool(tmp_path_factory)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="session")
def rabbit_node(rabbit_pool: RabbitPool) -> RabbitNode:
    """Shared node ``party-a`` (management, federation, AMQPS)."""
    return rabbit_pool.nodes(1)[0]


@pytest.fixture(scope="session")
def rabbit_pair(rabbit_pool: RabbitPool) -> tuple[RabbitNode, RabbitNode]:
    """Shared nodes ``party-a`` and ``party-b``, side by side."""
    a, b = rabbit_pool.nodes(2)
    return a, b


@pytest.fixture(scope="session")
def rabbit_trio(rabbit_pool: RabbitPool) -> tuple[RabbitNode, RabbitNode, RabbitNode]:
    """Shared nodes ``party-a``, ``party-b`` and ``party-c`` (the missing ones boot in parallel)."""
    a, b, c = rabbit_pool.nodes(3)
    return a, b, c


def rabbit_opts(node: RabbitNode, **extra: Any) -> dict[str, Any]:
    """Backend options pointing at ``node`` with its admin credentials."""
    return {"host": "127.0.0.1", "port": node.port, "mng_port": node.mng_port, "user": node.user,
            "password": node.password, **extra}  # fmt: skip


class BootingNode:
    """A node of a test module's own (one the tests kill or restart), booting in the background meanwhile."""

    def __init__(self, name: str) -> None:
        self.node = RabbitNode(name=name)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._boot, daemon=True)
        self.thread.start()

    def _boot(self) -> None:
        try:
            self.node.start()
        except BaseException as exc:  # reported by the test that needs the node
            self.error = exc

    def ready(self) -> RabbitNode:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.node

    def stop(self) -> None:
        self.thread.join()
        self.node.stop()
