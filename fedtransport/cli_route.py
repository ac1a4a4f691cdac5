"""``fedtransport route show`` and ``route check``: what a route table says, and whether it holds.

``show`` prints (or, with ``--json``, dumps) each party's endpoint, its URLs and, for a Pulsar
table, the cluster registration a session would PUT. ``check`` loads the table, resolves every
party, refuses a proxy without a domain and a table that reaches nobody, and warns about keys the
reader skips (typos of real keys, mostly).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml

from .errors import RouteError

__all__ = ["Output", "route_command"]


class Output(Protocol):
    """Where a command writes: called for stdout, ``err`` for stderr."""

    def __call__(self, text: str = "") -> None: ...
    def err(self, text: str) -> None: ...


def route_command(args: argparse.Namespace, out: Output) -> int:
    """``fedtransport route show|check``: exit code 0, or 1 for a table that does not hold."""
    from .routing import RouteTable

    if args.route_command == "check":
        return _route_check(args, out)
    rt = RouteTable.load(args.file, kind=args.kind)
    ids = [str(p) for p in args.party] if args.party else rt.parties()
    parties = {pid: _endpoint_info(rt, pid) for pid in ids}
    if args.json:
        out(json.dumps({"source": rt.source, "kind": rt.kind, "default": rt.default, "parties": parties}, indent=2))
        return 0
    out(f"route table {rt.source} ({rt.kind}, {len(rt.parties())} parties listed)")
    if rt.default:
        d = rt.default
        via = f" through the proxy {d['proxy']}" if d.get("proxy") else ""
        reach = f"{{party_id}}.{d['domain']}{via}" if d.get("domain") else "nowhere (no domain)"
        out(f"  parties not listed: {reach}")
    for pid, info in parties.items():
        out("")
        out(f"party {pid}" + ("" if info["listed"] else " (not listed: from the default section)"))
        for key in ("host", "port", "ssl_port", "mng_port", "proxy", "sni", "cluster"):
            if info.get(key) not in (None, ""):
                out(f"  {key:<11} {info[key]}")
        for key, url in info["urls"].items():
            out(f"  {key:<11} {url}")
        if "pulsar_cluster" in info:
            out(f"  cluster registration: PUT /admin/v2/clusters/{info['cluster']}")
            for line in json.dumps(info["pulsar_cluster"], indent=2).splitlines():
                out(f"    {line}")
    return 0


def _endpoint_info(rt: Any, pid: str) -> dict[str, Any]:
    from .routing import is_ip, url_host

    ep = rt.resolve(pid)
    at = url_host(ep.host)
    sni = None if is_ip(ep.sni) else ep.sni  # an IP address cannot be sent as a TLS server name
    info: dict[str, Any] = {
        "listed": ep.listed,
        "host": ep.host,
        "port": ep.port,
        "ssl_port": ep.ssl_port,
        "mng_port": ep.mng_port,
        "proxy": ep.proxy,
        "sni": sni,
    }
    if rt.kind == "pulsar":
        info["cluster"] = ep.cluster
        info["urls"] = {"broker": f"pulsar://{at}:{ep.port}"}
        if ep.ssl_port:
            info["urls"]["broker+tls"] = f"pulsar+ssl://{at}:{ep.ssl_port}"
        if ep.proxy:
            info["urls"]["via proxy"] = f"pulsar+ssl://{ep.proxy} (SNI {sni})"
        info["pulsar_cluster"] = rt.pulsar_cluster(pid)
    else:
        info["urls"] = {"amqp": f"amqp://{at}:{ep.port}"}
        if ep.ssl_port:
            info["urls"]["amqps"] = f"amqps://{at}:{ep.ssl_port}" + (f" (SNI {sni})" if sni else "")
        if ep.proxy:
            info["urls"]["via proxy"] = f"amqps://{ep.proxy} (SNI {sni})"
        if ep.mng_port:
            info["urls"]["management"] = f"http://{at}:{ep.mng_port}"
    return info


_ROUTE_KEYS = {"host", "port", "sslPort", "ssl_port", "mngPort", "mng_port", "proxy", "domain", "cluster", "public_key"}


def _route_check(args: argparse.Namespace, out: Output) -> int:
    from .routing import RouteTable

    try:
        rt = RouteTable.load(args.file, kind=args.kind)
        if rt.default.get("proxy") and not rt.default.get("domain"):
            raise RouteError(
                f"route table {rt.source}: key 'default.proxy': a proxy needs 'default.domain' "
                "to name the parties behind it"
            )
        if not rt.parties() and not rt.default.get("domain"):
            raise RouteError(
                f"route table {rt.source}: lists no party and has no 'default' section with a "
                "'domain': no party can be reached"
            )
        for pid in rt.parties():
            _endpoint_info(rt, pid)
    except RouteError as exc:
        out.err(f"fedtransport route check: {exc}")
        return 1
    for warning in _unknown_keys(Path(args.file)) + _pulsar_ipv6_hosts(rt):
        out.err(f"warning: {warning}")
    listed = ", ".join(rt.parties()) or "none"
    star = f"; other parties as {{id}}.{rt.default['domain']}" if rt.default.get("domain") else ""
    via = f" via {rt.default['proxy']}" if rt.default.get("proxy") else ""
    out(f"{rt.source}: OK ({rt.kind}; parties {listed}{star}{via})")
    return 0


def _pulsar_ipv6_hosts(rt: Any) -> list[str]:
    """Pulsar entries listed by IPv6 address, which pulsar-client cannot connect to (docs/route-tables.md)."""
    from .transport.pulsar.options import IPV6_UNSUPPORTED, is_ipv6_literal

    if rt.kind != "pulsar":
        return []
    return [
        f"{rt.source}: key '{pid}.host': {rt.entries[pid]['host']}: {IPV6_UNSUPPORTED} "
        "(direct mode and a party's own service_url; replication mode registers it on the brokers, which take it)"
        for pid in rt.parties()
        if is_ipv6_literal(rt.entries[pid].get("host", ""))
    ]


def _unknown_keys(path: Path) -> list[str]:
    """Keys the route table reader skips: harmless tooling fields, or typos of real ones."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return []
    found = []
    for pid, entry in (data or {}).items() if isinstance(data, Mapping) else ():
        if isinstance(entry, Mapping):
            for key in entry:
                if str(key) not in _ROUTE_KEYS:
                    found.append(f"{path}: key '{pid}.{key}' is not used (known: {', '.join(sorted(_ROUTE_KEYS))})")
    return found
