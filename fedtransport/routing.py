"""Route tables: where each party's broker is.

Two YAML formats that FATE operators already keep are read as they are:

Pulsar (``conf/pulsar_route_table.yaml``)::

    9999:  {host: 192.168.0.4, port: 6650, sslPort: 6651, proxy: ""}
    default: {proxy: "proxy.fate.org:443", domain: "fate.org", port: 6650, sslPort: 6651}

A party missing from the table resolves to ``{party_id}.{domain}`` behind the
default proxy: the SNI-proxy star network, where a new party only needs a
certificate and a DNS name.

RabbitMQ (``conf/rabbitmq_route_table.yaml``)::

    9999: {host: 127.0.0.1, port: 5672, mng_port: 15672}

Keys may be spelled ``sslPort``/``ssl_port`` and ``mngPort``/``mng_port``; a
``cluster`` key names a party's Pulsar cluster (default ``fl-pulsar-{party_id}``,
the naming PowerFL uses). A ``public_key`` key publishes the party's X25519 public key
(base64 of its raw 32 bytes, ``fedtransport keys new``) for per-pair authentication.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import RouteError
from .identity import X25519PublicKey, parse_public_key
from .party import Party

__all__ = ["Endpoint", "RouteTable"]

_DEFAULT_PORTS = {
    "pulsar": {"port": 6650, "ssl_port": 6651, "mng_port": None},
    "rabbitmq": {"port": 5672, "ssl_port": None, "mng_port": 15672},
}
_ALIASES = {"sslPort": "ssl_port", "mngPort": "mng_port"}
_PORT_KEYS = ("port", "ssl_port", "mng_port")
_KNOWN = {"host", "proxy", "domain", "cluster", "public_key", *_PORT_KEYS}
# A DNS name as resolvers take it (underscores too, as internal names have them), or an IP.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


@dataclass(frozen=True)
class Endpoint:
    """A party's broker as resolved from the route table."""

    party_id: str
    host: str  # as sockets take it: an IPv6 literal without brackets (``url_host`` adds them)
    port: int
    ssl_port: int | None
    proxy: str | None  # "host:port" of the SNI proxy in front of it (IPv6 in brackets), or None
    sni: str  # the TLS server name to present: the party's own host name
    mng_port: int | None
    cluster: str
    listed: bool  # False when built from the default section

    @property
    def proxy_host(self) -> str | None:
        return bare_host(self.proxy.rsplit(":", 1)[0]) if self.proxy else None

    @property
    def proxy_port(self) -> int | None:
        return int(self.proxy.rsplit(":", 1)[1]) if self.proxy else None


def host_problem(host: str) -> str | None:
    """Why ``host`` cannot name a machine (a space, a stray ':' or '/', an empty label), or None."""
    if is_ip(bare_host(host)) or (len(host) <= 253 and _HOST_RE.fullmatch(host)):
        return None
    return f"{host!r} is not a host name or an IP address"


def bare_host(host: str) -> str:
    """``host`` as sockets, pika and TLS take it: an IPv6 literal without its URL brackets."""
    inner = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return inner if inner != host and is_ip(inner) else host


def url_host(host: str) -> str:
    """``host`` as a URL's authority takes it: an IPv6 literal in brackets (``[::1]``)."""
    host = bare_host(host)
    return f"[{host}]" if ":" in host else host


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IP literal (which TLS cannot present as a server name)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _party_key(party: object) -> str:
    if isinstance(party, Party):
        return party.party_id
    if isinstance(party, bool) or not isinstance(party, (str, int)):
        raise RouteError(f"a party id must be a str, int or Party, got {party!r}")
    return str(party)


class RouteTable:
    """Party id -> broker endpoint, with a ``default`` section for the SNI star."""

    def __init__(
        self, entries: Mapping[str, Mapping[str, Any]], default: Mapping[str, Any], *, source: str, kind: str
    ) -> None:
        self.entries = dict(entries)
        self.default = dict(default)
        self.source = source
        self.kind = kind

    # loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, source: str | Path | Mapping[str, Any] | RouteTable, *, kind: str | None = None) -> RouteTable:
        """Read a route table from a YAML file, a mapping or another ``RouteTable``.

        ``kind`` ("pulsar" or "rabbitmq") picks the default ports; it is guessed
        from the keys when not given.
        """
        if isinstance(source, RouteTable):
            return source
        if isinstance(source, Mapping):
            return cls._parse(source, "<mapping>", kind)
        if not isinstance(source, (str, Path)):
            raise RouteError(f"a route table is a path, a mapping or a RouteTable, not {type(source).__name__}")
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as exc:
            raise RouteError(f"route table {path}: cannot read it: {exc.strerror or exc}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise RouteError(f"route table {path}: not valid YAML{where}: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise RouteError(f"route table {path}: the top level must be a mapping of party ids")
        return cls._parse(data, str(path), kind)

    @classmethod
    def _parse(cls, data: Mapping[Any, Any], source: str, kind: str | None) -> RouteTable:
        def fail(key: str, why: str) -> RouteError:
            return RouteError(f"route table {source}: key {key!r}: {why}")

        raw_default = data.get("default") or {}
        if not isinstance(raw_default, Mapping):
            raise fail("default", "must be a mapping")
        entries: dict[str, dict[str, Any]] = {}
        for key, value in data.items():
            if key == "default":
                continue
            if isinstance(key, bool) or not isinstance(key, (int, str)) or not str(key).strip():
                raise fail(str(key), "a party id must be a number or a string")
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise fail(str(key), "must be a mapping with host/port")
            entries[str(key)] = cls._clean(value, str(key), fail)
        default = cls._clean(raw_default, "default", fail)
        if kind is None:
            kind = cls._guess_kind(data)
        if kind not in _DEFAULT_PORTS:
            raise RouteError(f"route table {source}: kind must be 'pulsar' or 'rabbitmq', not {kind!r}")
        for pid, entry in entries.items():
            if not entry.get("host") and not default.get("domain"):
                raise fail(f"{pid}.host", "missing, and the table has no default domain to build one from")
        return cls(entries, default, source=source, kind=kind)

    @staticmethod
    def _clean(value: Mapping[Any, Any], where: str, fail: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in value.items():
            k = _ALIASES.get(str(k), str(k))
            if k not in _KNOWN:
                continue  # operators' tables carry extra keys (comments as keys, tooling fields)
            if k in _PORT_KEYS:
                if v is None or v == "":
                    continue
                if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and v.isdigit())):
                    raise fail(f"{where}.{k}", f"{v!r} is not an integer port")
                v = int(v)
                if not 0 < v < 65536:
                    raise fail(f"{where}.{k}", f"{v} is not a TCP port")
            elif k == "proxy":
                if v in (None, ""):
                    v = ""
                elif not isinstance(v, str) or ":" not in v or not v.rsplit(":", 1)[1].isdigit():
                    raise fail(f"{where}.proxy", f"{v!r} must be 'host:port'")
                elif problem := host_problem(v.rsplit(":", 1)[0]):
                    raise fail(f"{where}.proxy", problem)
                else:  # one spelling for URLs: an IPv6 proxy in brackets
                    phost, pport = v.rsplit(":", 1)
                    v = f"{url_host(phost)}:{pport}"
            elif k == "public_key":
                if v in (None, ""):
                    continue
                try:
                    parse_public_key(v)
                except ValueError as exc:
                    raise fail(f"{where}.public_key", f"{exc} (base64 of a raw X25519 public key)") from None
            elif v is None:
                v = ""
            elif not isinstance(v, (str, int)) or isinstance(v, bool):
                raise fail(f"{where}.{k}", f"{v!r} must be a string")
            else:
                v = str(v)
                if k in ("host", "domain") and v and (problem := host_problem(v)):
                    raise fail(f"{where}.{k}", problem)
                if k == "host":  # "[::1]" and "::1" are one host: each backend adds brackets where it needs them
                    v = bare_host(v)
            out[k] = v
        return out

    @staticmethod
    def _guess_kind(data: Mapping[Any, Any]) -> str:
        keys: set[str] = set()
        for v in data.values():
            if isinstance(v, Mapping):
                keys |= {str(k) for k in v}
        if keys & {"mng_port", "mngPort"} and not keys & {"sslPort", "proxy", "domain"}:
            return "rabbitmq"
        return "pulsar"

    # resolving -------------------------------------------------------------------------

    def __contains__(self, party: object) -> bool:
        try:
            return _party_key(party) in self.entries
        except RouteError:
            return False

    def parties(self) -> list[str]:
        return list(self.entries)

    def public_keys(self) -> dict[str, X25519PublicKey]:
        """Party id -> the X25519 public key its entry publishes (``public_key``), for pair keys."""
        return {pid: parse_public_key(e["public_key"]) for pid, e in self.entries.items() if e.get("public_key")}

    def resolve(self, party: Party | str | int) -> Endpoint:
        pid = _party_key(party)
        entry = self.entries.get(pid)
        listed = entry is not None
        d = self.default
        defaults = _DEFAULT_PORTS[self.kind]
        if entry is None:
            if not d.get("domain"):
                raise RouteError(
                    f"route table {self.source}: party {pid} is not listed and there is no "
                    "'default' section with a 'domain' to reach it through"
                )
            entry = {}
            proxy = d.get("proxy") or None
        else:
            proxy = entry.get("proxy") or None
        host = entry.get("host") or f"{pid}.{d['domain']}"
        port = entry.get("port", d.get("port", defaults["port"]))
        ssl_port = entry.get("ssl_port", d.get("ssl_port", defaults["ssl_port"]))
        mng_port = entry.get("mng_port", d.get("mng_port", defaults["mng_port"]))
        # the certificate names the party's DNS name; a listed IP address cannot be presented as SNI
        sni = f"{pid}.{d['domain']}" if is_ip(host) and d.get("domain") else host
        cluster = str(entry.get("cluster") or f"fl-pulsar-{pid}")
        return Endpoint(pid, host, int(port), ssl_port, proxy, sni, mng_port, cluster, listed)

    def pulsar_cluster(self, party: Party | str | int) -> dict[str, Any]:
        """The body of Pulsar's cluster registration (``PUT /admin/v2/clusters/{name}``)."""
        ep = self.resolve(party)
        return {
            "serviceUrl": f"http://{url_host(ep.host)}:{ep.mng_port}" if ep.mng_port else "",
            "serviceUrlTls": "",
            "brokerServiceUrl": f"pulsar://{url_host(ep.host)}:{ep.port}",
            "brokerServiceUrlTls": f"pulsar+ssl://{url_host(ep.host)}:{ep.ssl_port}" if ep.ssl_port else "",
            "proxyServiceUrl": f"pulsar+ssl://{ep.proxy}" if ep.proxy else "",
            "proxyProtocol": "SNI" if ep.proxy else None,
            "peerClusterNames": [],
        }

    def cluster_name(self, party: Party | str | int) -> str:
        return self.resolve(party).cluster

    def __repr__(self) -> str:
        return f"RouteTable({self.source!r}, kind={self.kind!r}, parties={self.parties()})"
