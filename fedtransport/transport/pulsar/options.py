"""The Pulsar backend's options: types, ranges, defaults and what each does.

``PULSAR_OPTIONS`` is ``PulsarTransport.option_defaults``: ``split_options`` checks every key
against it, and the ``pulsar`` table of docs/backends.md is generated from it
(``scripts/option_docs.py``). What depends on more than one key (``direct`` and
``replication`` need a route table and ``service_url``; ``replication`` needs ``admin_url``) is
checked by ``PulsarTransport`` itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ...options import MiB, Option, OptionSpec
from ...routing import bare_host, is_ip

__all__ = ["PULSAR_OPTIONS"]

# Pulsar's own rule for tenant and cluster names (NamedEntity): no '/', which would change the path.
_NAME = r"[-=:.\w]+"


# pulsar-client (the C++ library under it) parses no IPv6 literal, bracketed or not:
# apache/pulsar-client-cpp#48. A name that resolves to an IPv6 address works.
IPV6_UNSUPPORTED = (
    "pulsar-client cannot connect to an IPv6 address written out (apache/pulsar-client-cpp#48): "
    "give a DNS name that resolves to it"
)


def is_ipv6_literal(host: str) -> bool:
    bare = bare_host(host)
    return ":" in bare and is_ip(bare)


def _service_url(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("not a non-empty string")
    authority = value.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    for where in authority.split(","):  # host:port, comma-separated; an IPv6 host with or without its port
        if is_ipv6_literal(where) or is_ipv6_literal(where.rsplit(":", 1)[0]):
            raise ValueError(IPV6_UNSUPPORTED)
    return value


def _publish_rate(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise ValueError("not a mapping")
    unknown = set(value) - {"messages", "bytes"}
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}")
    for key, n in value.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < -1:
            raise ValueError(f"{key!r} is not an integer >= -1 (-1: unlimited)")
    return dict(value)


def _path(value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError("not a file path")
    return str(os.fspath(value))


def _kwargs(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError("not a mapping of keyword arguments")
    return dict(value)


def _passed_through(name: str, doc: str) -> Option:
    return Option(name, object, {}, doc, parse=_kwargs, accepted="a mapping of keyword arguments")


PULSAR_OPTIONS = OptionSpec(
    Option("service_url", object, None,
           "this party's broker, `pulsar://host:6650` or `pulsar+ssl://host:6651`. `None` starts an embedded "
           "pulsar-lite broker for the process (needs the `embedded` extra); allowed in `shared` mode only. "
           "An IPv6 broker by a DNS name: pulsar-client takes no IPv6 address written out.",
           nullable=True, parse=_service_url, accepted="a Pulsar service URL"),
    Option("admin_url", str, None,
           "the broker's admin REST base, for example `http://host:8080`. `None`: no control-plane calls, and "
           "`cleanup()` can only drop this party's subscriptions. Required in `replication` mode.",
           nullable=True),
    Option("mode", object, "shared",
           '`"shared"`: every party on one broker. `"direct"`: produce to the destination\'s broker (from the '
           'route table), consume from our own. `"replication"`: produce to our own cluster with '
           "`replication_clusters=[destination's cluster]` on every message. `direct` and `replication` need a "
           "route table and `service_url`.",
           choices=("shared", "direct", "replication")),
    Option("tenant", str, "fl-tenant", "Pulsar tenant. Every party of a job must use the same one.", pattern=_NAME),
    Option("cluster", str, None,
           "this party's cluster name. `None`: its name in the route table (`fl-pulsar-{party_id}` unless the "
           'entry has a `cluster` key), or `"standalone"` without a route table. With `admin_url` it must be the '
           "name the local broker runs as (the tenant is allowed on it; an unknown name is a `BackendError` "
           "listing the broker's clusters).",
           pattern=_NAME, nullable=True),
    Option("token", str, None,
           'a JWT for the data plane and the admin API. Also `"token:<jwt>"` or `"file:///path"`. A token the '
           'broker refuses, or none where one is needed, fails `connect()` with "authentication failed".',
           nullable=True, sensitive=True),
    Option("tls_trust_certs_file_path", object, None, "CA file for `pulsar+ssl://` and `https://` admin URLs",
           nullable=True, parse=_path, accepted="a file path (str or `os.PathLike`)"),
    Option("tls_validate_hostname", bool, True,
           "`False` skips the host name check; the certificate chain is still verified"),
    Option("send_window", int, 16,
           "messages in flight (sent, not yet confirmed) per `send` call: one lane of one transfer",
           range=(1, 1 << 16)),
    Option("send_window_bytes", int, 8 * MiB,
           "bytes in flight per `send` call; this is what bounds a sender's memory",
           range=(1, 1 << 40), unit="bytes"),
    Option("send_timeout", float, 30.0,
           "seconds for the broker to confirm a message (pulsar-client's `send_timeout_millis`), and to "
           "make a lane's producer when a send needs one", unit="seconds"),
    Option("receiver_queue_size", int, 1, "pulsar-client's consumer receiver queue", range=(1, 1 << 16)),
    Option("receive_connections", int, 4,
           "connections (clients) the receive lanes are spread over, apart from the producers' one; pulsar-lite "
           "stalls a consumer that shares a connection with others",
           range=(1, 256)),
    Option("subscribe_timeout", float, 180.0,
           "seconds a refused subscription is retried, with back-off; in `direct` mode also how long a producer "
           "waits for the destination to make the job's namespace on its broker",
           unit="seconds"),
    Option("ttl_seconds", int, 172800,
           "with `admin_url`: the namespace's message TTL, and its retention (`ttl_seconds // 60` minutes, "
           "unlimited size)",
           range=(1, 1 << 31), unit="seconds"),
    Option("publish_rate", object, None,
           'with `admin_url`: `{"messages": N, "bytes": M}` per second, set as the namespace\'s publish rate',
           nullable=True, parse=_publish_rate, accepted='a mapping with keys `"messages"`, `"bytes"`: ints >= -1'),
    Option("keep_message_buffers", bool, True,
           "glibc only: raise malloc's mmap threshold to 2 × `max_message_size` (at most 32 MiB) and its trim "
           "threshold to 64 MiB, once per process, so message buffers are reused instead of mapped and zeroed "
           "anew (less CPU per byte; up to 64 MiB of free heap per malloc arena stays resident). Process-wide; "
           "skipped when a `MALLOC_*` variable or `GLIBC_TUNABLES` is set ([pulsar.md](pulsar.md#memory))"),
    _passed_through("producer", "extra keyword arguments for pulsar-client's `create_producer`"),
    _passed_through("consumer", "extra keyword arguments for pulsar-client's `subscribe`"),
    _passed_through("client", "extra keyword arguments for `pulsar.Client`"),
)  # fmt: skip
