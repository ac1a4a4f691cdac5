"""The RabbitMQ backend's options: types, ranges, defaults and what each does.

``RABBITMQ_OPTIONS`` is ``RabbitTransport.option_defaults``: ``split_options`` checks every
key against it, and the ``rabbitmq`` table of docs/backends.md is generated from it
(``scripts/option_docs.py``). What depends on more than one key (``federated`` needs a route
table; federation over TLS needs a CA) is checked by ``RabbitTransport`` itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ...options import IDENTITY, PEER_KEYS, SECRET, MiB, Option, OptionSpec
from ...routing import bare_host, host_problem

__all__ = ["FED_SSL_KEYS", "RABBITMQ_OPTIONS", "SSL_KEYS"]

SSL_KEYS = ("ca_file", "cert_file", "key_file", "server_hostname")
FED_SSL_KEYS = ("ca_file", "cert_file", "key_file")


def _tls_settings(value: Any, allowed: tuple[str, ...]) -> dict[str, str]:
    """A TLS mapping with only ``allowed`` keys, its None values dropped, as strings."""
    if not isinstance(value, Mapping):
        raise ValueError("not a mapping")
    unknown = set(value) - set(allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}")
    out = {str(k): str(v) for k, v in value.items() if v is not None}
    if "key_file" in out and "cert_file" not in out:
        raise ValueError("'key_file' needs 'cert_file'")
    return out


def _host(value: Any) -> str:
    """A host name or IP address as pika takes it: an IPv6 literal without its URL brackets."""
    if not isinstance(value, str):
        raise ValueError("not a string")
    if host_problem(value):
        raise ValueError("a DNS name is labels of letters, digits, '-' and '_' joined by dots")
    return bare_host(value)


def _ssl(value: Any) -> dict[str, str]:
    return _tls_settings(value, SSL_KEYS)


def _federation_ssl(value: Any) -> dict[str, str] | bool:
    return False if value is False else _tls_settings(value, FED_SSL_KEYS)


def _peer_credentials(value: Any) -> dict[str, dict[str, str]]:
    if not isinstance(value, Mapping):
        raise ValueError("not a mapping")
    out: dict[str, dict[str, str]] = {}
    for pid, cred in value.items():
        if not isinstance(cred, Mapping) or not {"user", "password"} <= set(cred):
            raise ValueError(f"party {str(pid)!r} needs 'user' and 'password'")
        out[str(pid)] = {"user": str(cred["user"]), "password": str(cred["password"])}
    return out


def _keys(keys: tuple[str, ...]) -> str:
    return "`{" + ", ".join(f'"{k}"' for k in keys) + "}`"


def _seconds(name: str, default: float, doc: str) -> Option:
    return Option(name, float, default, doc, unit="seconds")


RABBITMQ_OPTIONS = OptionSpec(
    Option("host", object, "127.0.0.1", "this party's broker; an IPv6 address with or without brackets",
           parse=_host, accepted="a host name or an IP address"),
    Option("port", int, 5672, "AMQP port; the AMQPS port when `ssl` is set", range=(1, 65535)),
    Option("mng_port", int, 15672, "management API, reached as `http://{host}:{mng_port}`", range=(1, 65535)),
    Option("user", str, "guest",
           "admin user, for the management API only. The data plane uses a per-job user. RabbitMQ lets `guest` "
           "in from localhost only, unless `loopback_users` says otherwise."),
    Option("password", str, "guest", "the admin user's password", sensitive=True),
    Option("mode", object, "shared",
           '`"shared"`: every party on one broker. `"federated"`: each party on its own broker; the receiver\'s '
           "broker pulls with the federation plugin. `federated` needs a route table.",
           choices=("shared", "federated")),
    Option("ssl", object, None,
           "TLS (AMQPS) for the data plane, every key optional. `server_hostname` defaults to `host`.",
           nullable=True, parse=_ssl, accepted=f"a mapping with any of the keys {_keys(SSL_KEYS)}"),
    Option("prefetch", int, 4,
           "the floor of a lane's qos (unacknowledged deliveries the broker sends ahead), sized for full 4 MiB "
           "messages. When the receiver holds this many unacknowledged, it raises the lane's qos by what it holds "
           "rather than acknowledge early ([concepts.md](concepts.md#acknowledgement)).",
           range=(1, 65535)),
    Option("prefetch_bytes", int, 16 * MiB,
           "the qos rises above `prefetch` while messages are small, to keep about this many bytes in flight "
           "per lane",
           range=(1, 1 << 40), unit="bytes"),
    Option("prefetch_max", int, 64,
           "the ceiling of that size-based qos (what the receiver holds is added on top)", range=(1, 65535)),
    Option("send_window", int, 8, "unconfirmed messages per `send` call: one lane of one transfer", range=(1, 1 << 16)),
    Option("send_window_bytes", int, 8 * MiB,
           "unconfirmed bytes per `send` call; this is what bounds a sender's memory",
           range=(1, 1 << 40), unit="bytes"),
    _seconds("send_timeout", 60.0, "seconds without a confirm before `send` fails with `BackendError`"),
    _seconds("connect_timeout", 30.0, "seconds for the first connection and channel set-up"),
    Option("heartbeat", int, 60, "AMQP heartbeat in seconds; `0` disables it", range=(0, 3600), unit="seconds"),
    _seconds("blocked_connection_timeout", 300.0,
             "seconds blocked by a broker alarm before the connection is dropped and made again"),
    _seconds("reconnect_max_delay", 5.0, "cap of the reconnect back-off, in seconds"),
    Option("vhost_prefix", str, "fedtransport-",
           "the job's vhost is `{vhost_prefix}{job_id}`; the same on every party",
           pattern=r"[A-Za-z0-9_.-]{0,64}"),
    Option("ttl_seconds", int, 172800, "a policy makes the broker delete queues unused this long",
           range=(1, 1 << 31), unit="seconds"),
    Option("federation_prefetch", int, 16,
           "messages a federation link has in flight (`prefetch-count` of the upstream)", range=(1, 65535)),
    Option("federation_ssl", object, None,
           "`None`: TLS upstreams when `ssl` is set, with its CA and client certificate. `False`: plain "
           "`amqp://`. A mapping: paths the *broker* can read.",
           nullable=True, parse=_federation_ssl,
           accepted=f"`False` or a mapping with any of the keys {_keys(FED_SSL_KEYS)}"),
    Option("peer_credentials", object, {},
           "admin credentials of remote brokers, for federated mode without a `secret` or `identity`",
           parse=_peer_credentials, accepted='`{party_id: {"user": ..., "password": ...}}`', sensitive=True),
    # The common job secret (also checked there), declared so that it reaches this backend,
    # which derives the federation link passwords from it.
    dataclasses.replace(
        SECRET, doc="the common `secret`, declared here so it reaches the backend (federation link users)"
    ),
    # Likewise the common pair-key options: with them, link passwords come from the pair keys.
    dataclasses.replace(
        IDENTITY, doc="the common `identity`, declared here so it reaches the backend (federation link users)"
    ),
    dataclasses.replace(
        PEER_KEYS, doc="the common `peer_keys`, declared here so it reaches the backend (federation link users)"
    ),
)  # fmt: skip
