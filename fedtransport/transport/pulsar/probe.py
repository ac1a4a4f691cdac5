"""Ask a Pulsar broker whether it accepts our credentials: one CONNECT on the binary protocol.

Why: pulsar-client answers a broker that refuses a token (or its absence) by reconnecting until
its operation timeout and then reports ``Timeout``; the broker's ``AuthenticationError`` answer
never reaches the caller (measured with pulsar-client 3.13 against Apache Pulsar 4.0.7: the C++
client logs "Handling incoming command: ERROR" at debug level only, and retries). One frame of
our own gets the broker's verdict and its message in a few milliseconds.

What it does: opens a TCP connection (TLS for ``pulsar+ssl://``, with the same trust file and
hostname check the client gets), sends ``BaseCommand{type: CONNECT, connect: {client_version,
auth_method_name: "token", auth_data: <jwt>, protocol_version}}`` framed as the protocol says
(``[total size][command size][command]``, big-endian), reads one frame back and closes. A
``CONNECTED`` answer is acceptance; an ``ERROR`` answer carries the broker's ``ServerError`` and
message. Anything else (an unreachable broker, a failed TLS handshake, an answer we do not
understand, an authentication challenge) gives no verdict: the result says what happened, and
pulsar-client's own connection decides. Standard library only; the protobuf encoding is the
few field kinds these two commands use.
"""

from __future__ import annotations

import socket
import ssl
import struct
import urllib.parse
from dataclasses import dataclass

__all__ = ["ConnectAnswer", "probe_connect"]

_CONNECT, _CONNECTED, _ERROR = 2, 3, 14  # BaseCommand.Type, also the field numbers of the commands
_PROTOCOL_VERSION = 15
_MAX_FRAME = 5 << 20  # the protocol's largest frame
_SERVER_ERRORS = {0: "UnknownError", 1: "MetadataError", 2: "PersistenceError", 3: "AuthenticationError",
                  4: "AuthorizationError", 5: "ConsumerBusy", 6: "ServiceNotReady", 10: "UnsupportedVersionError",
                  14: "TooManyRequests"}  # fmt: skip
AUTHENTICATION_ERROR = "AuthenticationError"


@dataclass(frozen=True)
class ConnectAnswer:
    """What the broker said to our CONNECT.

    ``accepted``: it answered CONNECTED. ``error`` / ``message``: it answered ERROR (the
    ``ServerError`` name and its text). ``problem``: why there is no answer (socket, TLS,
    timeout, a frame we do not understand); empty when there is one.
    """

    accepted: bool = False
    error: str = ""
    message: str = ""
    problem: str = ""

    @property
    def authentication_refused(self) -> bool:
        return self.error == AUTHENTICATION_ERROR


def probe_connect(
    url: str,
    *,
    token: str | None,
    tls_trust_certs_file_path: str | None = None,
    tls_validate_hostname: bool = True,
    tls_allow_insecure_connection: bool = False,
    timeout: float = 10.0,
) -> ConnectAnswer:
    """Send one CONNECT to the broker at ``url`` (``pulsar://`` or ``pulsar+ssl://host:port``)."""
    parsed = urllib.parse.urlparse(url)
    host = (parsed.hostname or "").split(",")[0]
    secure = parsed.scheme == "pulsar+ssl"
    try:
        port = parsed.port or (6651 if secure else 6650)
    except ValueError:
        return ConnectAnswer(problem=f"cannot read a port in {url!r}")
    if parsed.scheme not in ("pulsar", "pulsar+ssl") or not host or "," in (parsed.netloc or ""):
        return ConnectAnswer(problem=f"not probed: {url!r} is not one pulsar:// or pulsar+ssl:// address")
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return ConnectAnswer(problem=f"cannot connect to {host}:{port}: {exc}")
    try:
        if secure:
            context = ssl.create_default_context(cafile=tls_trust_certs_file_path)
            if tls_allow_insecure_connection:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            else:
                context.check_hostname = bool(tls_validate_hostname)
            try:
                sock = context.wrap_socket(sock, server_hostname=host)
            except ssl.SSLCertVerificationError as exc:
                return ConnectAnswer(problem=f"TLS handshake with {host}:{port} failed: {exc.verify_message}")
            except (ssl.SSLError, OSError) as exc:
                return ConnectAnswer(problem=f"TLS handshake with {host}:{port} failed: {exc}")
        sock.sendall(_frame(_connect_command(token)))
        return _answer(_read_frame(sock))
    except (OSError, ValueError) as exc:  # socket.timeout is an OSError
        return ConnectAnswer(problem=f"no answer to CONNECT from {host}:{port}: {exc or type(exc).__name__}")
    finally:
        sock.close()


# ---------------------------------------------------------------------------- protobuf, by hand
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _connect_command(token: str | None) -> bytes:
    connect = _field_bytes(1, b"fedtransport-connect-probe")  # client_version
    if token:
        connect += _field_bytes(3, token.encode("utf-8"))  # auth_data
        connect += _field_bytes(5, b"token")  # auth_method_name
    connect += _field_varint(4, _PROTOCOL_VERSION)
    return _field_varint(1, _CONNECT) + _field_bytes(_CONNECT, connect)


def _frame(command: bytes) -> bytes:
    return struct.pack(">II", len(command) + 4, len(command)) + command


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise ValueError("the broker closed the connection without an answer")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(sock: socket.socket) -> bytes:
    (total,) = struct.unpack(">I", _recv_exactly(sock, 4))
    if not 4 <= total <= _MAX_FRAME:
        raise ValueError(f"a frame of {total} bytes is not the Pulsar protocol")
    frame = _recv_exactly(sock, total)
    (size,) = struct.unpack(">I", frame[:4])
    if size > total - 4:
        raise ValueError(f"a command of {size} bytes in a frame of {total}")
    return frame[4 : 4 + size]


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("a truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> dict[int, int | bytes]:
    """The fields of one protobuf message (the last of a repeated one)."""
    fields: dict[int, int | bytes] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, kind = key >> 3, key & 7
        if kind == 0:
            fields[number], pos = _read_varint(data, pos)
        elif kind == 2:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("a truncated field")
            fields[number], pos = data[pos : pos + size], pos + size
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        else:
            raise ValueError(f"protobuf wire type {kind} is not used by the Pulsar protocol")
    return fields


def _answer(command: bytes) -> ConnectAnswer:
    fields = _fields(command)
    kind = fields.get(1)
    if kind == _CONNECTED:
        return ConnectAnswer(accepted=True)
    if kind == _ERROR and isinstance(fields.get(_ERROR), bytes):
        error = _fields(fields[_ERROR])  # type: ignore[arg-type]
        code = error.get(2)
        text = error.get(3)
        name = _SERVER_ERRORS.get(code, f"ServerError {code}") if isinstance(code, int) else "an error"
        message = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else ""
        return ConnectAnswer(error=name, message=message)
    return ConnectAnswer(problem=f"the broker answered CONNECT with command type {kind!r}")
