"""What ``fedtransport doctor`` and ``fedtransport cleanup`` know of a Pulsar broker.

:class:`PulsarOperatorHooks` is the base of ``PulsarTransport`` that answers the operator
hooks of ``Transport`` (see transport/base.py). Doctor's checks, in order:

``broker``
    TCP to ``service_url`` (for ``pulsar+ssl``, TLS with the trust file and host name check).
``protocol and token``
    a topic lookup over the binary protocol: the handshake works and the token is accepted.
``admin API``
    ``GET /admin/v2/clusters`` with the token (401: token rejected; 403: not a superuser).
    Without ``admin_url`` a warning: job namespaces must then exist beforehand.
``cluster`` / ``tenant``
    this party's cluster is registered (else creating the tenant fails with 412); the tenant
    exists or the first job can create it.

Cleanup needs ``admin_url``: it deletes the job's topics and namespace through the admin
API, and ``inventory`` lists them there.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Mapping
from typing import Any, ClassVar

from ...errors import BackendError, ConfigError, FederationError
from ...party import Party
from ...routing import Endpoint, RouteTable, url_host
from ..base import Transport
from ..checks import Check, connect, socket_problem, tls_context
from .admin import PulsarAdmin
from .connection import client_kwargs, close_client, inside_client, open_client
from .management import PulsarManagement

__all__ = ["PulsarOperatorHooks", "pulsar_checks"]


class PulsarOperatorHooks(Transport):
    """The operator hooks of the ``pulsar`` backend (doctor checks, route options, cleanup)."""

    route_kind: ClassVar[str | None] = "pulsar"

    @classmethod
    def local_broker(cls, options: dict[str, Any], stack: contextlib.ExitStack) -> str:
        if options.get("service_url"):
            return "configured broker"
        from ...brokers import EmbeddedPulsar

        broker = stack.enter_context(EmbeddedPulsar())
        options["service_url"] = broker.service_url
        return f"embedded broker at {broker.service_url}"

    management: PulsarManagement  # made by PulsarTransport.__init__

    @classmethod
    def options_from_route(cls, options: Mapping[str, Any], endpoint: Endpoint) -> dict[str, Any]:
        """``service_url`` (``pulsar+ssl`` on the sslPort when a trust file is set) and ``admin_url``
        from ``mngPort``; explicit keys win."""
        opts = dict(options)
        if "service_url" not in opts:
            tls = bool(opts.get("tls_trust_certs_file_path")) and endpoint.ssl_port is not None
            scheme, port = ("pulsar+ssl", endpoint.ssl_port) if tls else ("pulsar", endpoint.port)
            opts["service_url"] = f"{scheme}://{url_host(endpoint.host)}:{port}"
        if "admin_url" not in opts and endpoint.mng_port:
            opts["admin_url"] = f"http://{url_host(endpoint.host)}:{endpoint.mng_port}"
        return opts

    @classmethod
    def describe_options(cls, options: Mapping[str, Any]) -> str:
        o = {**cls.option_defaults, **options}
        return (
            f"Pulsar broker {o['service_url'] or '(none)'}, admin {o['admin_url'] or '(none)'}, "
            f"tenant {o['tenant']!r}, token {'set' if o['token'] else 'none'}"
        )

    @classmethod
    def doctor_checks(
        cls, options: Mapping[str, Any], *, routes: RouteTable | None, party: Party | None, timeout: float
    ) -> list[Check]:
        o = {**cls.option_defaults, **options}
        return pulsar_checks(o, _cluster(o, routes, party), timeout)

    @classmethod
    def probe_options(
        cls, options: Mapping[str, Any], *, routes: RouteTable | None, party: Party | None
    ) -> dict[str, Any]:
        # Both probe parties live on this one broker, in this party's cluster.
        return {**options, "mode": "shared", "cluster": _cluster(options, routes, party)}

    @classmethod
    def probe_failure_fix(cls, options: Mapping[str, Any]) -> str:
        if not options.get("admin_url"):
            return (
                "without admin_url the job namespace must already exist on a real Pulsar broker; "
                "pass --option admin_url=http://BROKER:8080 so fedtransport creates and deletes it"
            )
        return super().probe_failure_fix(options)

    def cleanup_target(self) -> str:
        if not self.management.enabled:
            raise ConfigError(
                "cleaning up a Pulsar job needs the admin REST API to delete its topics and namespace: "
                "--option admin_url=http://BROKER:8080 (or a route table entry with mngPort)"
            )
        return f"Pulsar admin API at {self.ctx.options['admin_url']}"

    def inventory(self) -> list[str]:
        return self.management.inventory()


def _cluster(options: Mapping[str, Any], routes: RouteTable | None, party: Party | None) -> str:
    """This party's cluster, as a session of it would name it."""
    if options.get("cluster"):
        return str(options["cluster"])
    if routes is not None and party is not None:
        return routes.cluster_name(party)
    return "standalone"


def pulsar_checks(o: Mapping[str, Any], cluster: str, timeout: float) -> list[Check]:
    """Doctor's checks of the broker that the options ``o`` (defaults applied) point at."""
    checks: list[Check] = []
    if not o["service_url"]:
        checks.append(
            Check(
                "broker",
                "fail",
                "no service_url: doctor checks a running broker",
                "--option service_url=pulsar://BROKER:6650 (or --route-table FILE --party ID)",
            )
        )
    else:
        checks += _broker_checks(str(o["service_url"]), o, timeout)
    if not o["admin_url"]:
        checks.append(
            Check(
                "admin API",
                "warn",
                "no admin_url: fedtransport cannot create the job namespace, set its TTL or delete it at "
                "cleanup; on a real Pulsar every job namespace must then exist beforehand",
                "--option admin_url=http://BROKER:8080 (the broker's webServicePort)",
            )
        )
        return checks
    return checks + _admin_checks(o, str(o["tenant"]), cluster, timeout)


def _broker_checks(url: str, o: Mapping[str, Any], timeout: float) -> list[Check]:
    parsed = urllib.parse.urlparse(url.split(",")[0])
    host, secure = parsed.hostname or "", parsed.scheme == "pulsar+ssl"
    if parsed.scheme not in ("pulsar", "pulsar+ssl") or not host:
        return [Check("broker", "fail", f"service_url {url!r} is not pulsar://HOST:PORT or pulsar+ssl://HOST:PORT")]
    port = parsed.port or (6651 if secure else 6650)
    tls = None
    if secure:
        try:
            tls = tls_context(o["tls_trust_certs_file_path"])
        except ConfigError as exc:
            return [Check("broker", "fail", str(exc), "correct --option tls_trust_certs_file_path=FILE")]
        tls.check_hostname = bool(o["tls_validate_hostname"])
    try:
        with connect(host, port, timeout, tls, host):
            pass
    except OSError as exc:
        detail, fix = socket_problem(host, port, exc, timeout)
        return [Check("broker", "fail", detail, fix)]
    checks = [Check("broker", "ok", f"{host}:{port} accepts connections" + (" (TLS verified)" if tls else ""))]
    checks.append(_lookup(url, o, timeout))
    return checks


def _lookup(url: str, o: Mapping[str, Any], timeout: float) -> Check:
    """A topic lookup over the binary protocol: proves the handshake and the token."""
    name = "protocol and token"
    topic = f"persistent://{o['tenant']}/fedtransport-doctor/probe"
    client = None
    try:
        kwargs = {**client_kwargs(o), "operation_timeout_seconds": max(1, int(timeout))}
        client = open_client(url, **kwargs)
        with inside_client():
            client.get_topic_partitions(topic)
    except Exception as exc:  # pulsar-client raises its own exception types
        text = f"{type(exc).__name__}: {exc}"
        if "Authentication" in text:
            return Check(
                name,
                "fail",
                f"the broker rejected the credentials: {text}",
                "--option token=JWT (or token:JWT / file:///path) of a role the broker accepts",
            )
        if "Authorization" in text:
            return Check(
                name,
                "fail",
                f"the token was accepted but its role may not use tenant {o['tenant']!r}: {text}",
                "grant the role on the tenant, or use a superuser token",
            )
        if "NotFound" in text or "TopicNotFound" in text:
            return Check(name, "ok", f"the broker answered a topic lookup ({text})")
        return Check(
            name, "fail", f"a topic lookup failed: {text}", "check service_url, TLS options and the broker's log"
        )
    finally:
        if client is not None:
            close_client(client)
    return Check(name, "ok", "the broker answered a topic lookup" + (" with the token" if o["token"] else ""))


def _admin_checks(o: Mapping[str, Any], tenant: str, cluster: str, timeout: float) -> list[Check]:
    admin_url = str(o["admin_url"])
    try:
        admin = PulsarAdmin(
            admin_url,
            token=o["token"],
            tls_trust_certs_file_path=o["tls_trust_certs_file_path"],
            tls_validate_hostname=o["tls_validate_hostname"],
            timeout=timeout,
        )
        clusters = admin.get_clusters()
    except FederationError as exc:
        return [_admin_failure(admin_url, exc), Check("cluster", "skip", "not checked")]
    checks = [Check("admin API", "ok", f"{admin_url} answered; clusters: {', '.join(clusters) or 'none'}")]
    if cluster not in clusters:
        checks.append(
            Check(
                "cluster",
                "fail",
                f"this party's cluster {cluster!r} is not registered on the broker (it knows "
                f"{', '.join(clusters) or 'none'}): creating tenant {tenant!r} on it would fail",
                "--option cluster=NAME with the broker's clusterName (broker.conf), or set 'cluster' "
                "for this party in the route table",
            )
        )
        return checks
    checks.append(Check("cluster", "ok", f"this party's cluster {cluster!r} is registered"))
    try:
        info = admin.get_tenant(tenant)
    except BackendError as exc:
        checks.append(Check("tenant", "fail", str(exc), "use a token whose role administers the tenant"))
        return checks
    if info is None:
        checks.append(Check("tenant", "ok", f"tenant {tenant!r} does not exist yet; the first job creates it"))
    else:
        allowed = list(info.get("allowedClusters") or [])
        extra = "" if cluster in allowed else f"; the first job adds cluster {cluster!r} to it"
        checks.append(
            Check("tenant", "ok", f"tenant {tenant!r} exists (clusters {', '.join(allowed) or 'none'}){extra}")
        )
    return checks


def _admin_failure(admin_url: str, exc: FederationError) -> Check:
    status = getattr(exc, "status", None)
    if status == 401:
        detail, fix = (
            f"{admin_url} rejected the token (HTTP 401): {exc}",
            "--option token=JWT of a superuser role (token:JWT and file:///path work too)",
        )
    elif status == 403:
        detail, fix = (
            f"the token is valid but its role may not administer the broker (HTTP 403): {exc}",
            "fedtransport registers clusters and tenants: use a superuser role's token",
        )
    elif status is None:
        detail, fix = (str(exc), "check --option admin_url (the broker's webServicePort, default 8080)")
    else:
        detail, fix = str(exc), "the broker's reason is in the message"
    return Check("admin API", "fail", detail, fix)
