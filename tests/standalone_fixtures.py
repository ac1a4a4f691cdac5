"""The real Apache Pulsar broker for tests: one standalone JVM per test session.

``tests/conftest.py`` imports ``pulsar_standalone`` from here, so every test module can ask for
it by name. A start takes 5-10 s and the JVM ~400 MB, so the broker is shared: tests use their
own topics and subscriptions (``unique_topic``) and leave the broker running (a test that kills
or restarts it must bring it back). The first start of a machine also resolves the broker's jars
with Maven (~35 s, ~240 MB under ``~/.cache/fedtransport/pulsar``). Without Java 17, Maven or
Maven Central the fixture raises, and every test using it errors: nothing is skipped.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtransport.brokers.standalone import PulsarStandalone

__all__ = ["pulsar_standalone", "socket_addresses", "unique_topic"]


@pytest.fixture(scope="session")
def pulsar_standalone() -> Iterator[PulsarStandalone]:
    """A plain (no TLS, no auth) Apache Pulsar standalone on loopback, for the whole session."""
    with PulsarStandalone() as broker:
        yield broker


def unique_topic(prefix: str = "t") -> str:
    return f"persistent://public/default/{prefix}-{uuid.uuid4().hex[:12]}"


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _address(hex_addr: str, v6: bool) -> str:
    raw = bytes.fromhex(hex_addr)
    if not v6:
        return socket.inet_ntoa(raw[::-1])
    # /proc stores an IPv6 address as four host-order 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def socket_addresses(pid: int) -> dict[str, list[tuple[str, int]]]:
    """The process's TCP listeners and bound UDP sockets: ``{"tcp": [(addr, port)], "udp": [...]}``.

    Read from /proc (both IPv4 and IPv6 tables), so a socket on 0.0.0.0 or :: shows as such.
    """
    inodes = _socket_inodes(pid)
    found: dict[str, list[tuple[str, int]]] = {"tcp": [], "udp": []}
    for kind, table, v6 in (("tcp", "tcp", False), ("tcp", "tcp6", True), ("udp", "udp", False), ("udp", "udp6", True)):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode not in inodes:
                continue
            if kind == "tcp" and state != "0A":  # 0A = LISTEN; connections are not listeners
                continue
            addr_hex, port_hex = local.split(":")
            found[kind].append((_address(addr_hex, v6), int(port_hex, 16)))
    return found
