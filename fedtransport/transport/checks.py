"""What ``fedtransport doctor`` reports, and the network probes backends build their checks from.

A backend's ``Transport.doctor_checks`` returns a list of :class:`Check`: one step each, with
what was found and, for a failure or a warning, how to fix it. The helpers here know no
broker: :func:`connect` opens a TCP connection (optionally TLS), :func:`socket_problem`
turns a failed connection into words an operator can act on, and :func:`tls_context` loads
CA and client certificate files with a clear error when they are unusable.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

from ..errors import ConfigError

__all__ = ["Check", "Status", "connect", "read_exactly", "socket_problem", "tls_context"]

Status = Literal["ok", "warn", "fail", "skip"]


@dataclass
class Check:
    """One step of ``doctor``: ``status`` is ok / warn / fail / skip."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@contextlib.contextmanager
def connect(
    host: str, port: int, timeout: float, tls: ssl.SSLContext | None = None, sni: str | None = None
) -> Iterator[socket.socket]:
    """A connected socket (TLS-wrapped when ``tls`` is given, presenting ``sni`` or ``host``)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=sni or host)
        yield sock
    finally:
        sock.close()


def read_exactly(sock: socket.socket, n: int) -> bytes:
    """Up to ``n`` bytes: fewer only when the peer closes the connection first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def socket_problem(host: str, port: int, exc: BaseException, timeout: float) -> tuple[str, str]:
    """(detail, fix) for a failed connection, in words an operator can act on."""
    where = f"{host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"{where}: the TLS certificate was refused: {exc.verify_message or exc}",
            "trust the CA that signed the broker's certificate and use a server name it carries "
            "(fedtransport certs prints the names of each certificate)",
        )
    if isinstance(exc, ssl.SSLError):
        return (
            f"{where}: TLS handshake failed: {exc}",
            "is this the TLS port? plain and TLS listeners usually differ (5672/5671, 6650/6651)",
        )
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host {host!r}: {exc}", "correct the host option or the route table entry"
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"nothing listens on {where} (connection refused)",
            "start the broker, or correct the host/port options (or the route table entry)",
        )
    if isinstance(exc, TimeoutError):
        return (
            f"no answer from {where} within {timeout:g} s",
            "a firewall or a wrong address; check that the port is reachable from this machine",
        )
    return f"{where}: {type(exc).__name__}: {exc}", "check the host/port options and the broker's log"


def tls_context(ca_file: str | None, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    """A client TLS context trusting ``ca_file`` (system CAs when None), with an optional client certificate."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS files (CA {ca_file!r}, certificate {cert_file!r}): {exc}") from exc
    return ctx
