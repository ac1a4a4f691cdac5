"""Operator tools behind ``fedtransport doctor`` and ``fedtransport cleanup``.

``run_doctor(backend, options, ...)`` checks, in order, what a job session needs from this
party's broker and returns one :class:`Check` per step with what is wrong and how to fix it:

RabbitMQ
    AMQP listener (TCP, TLS handshake with the ``ssl`` options, the AMQP 0-9-1 protocol
    header answered by ``connection.start``), management API reachable and the credentials
    accepted, the user tagged ``administrator``, plugins (``rabbitmq_federation`` and
    ``rabbitmq_federation_management``), then a round trip: two probe parties open a job
    session on this broker, move one object and clean up.
Pulsar
    broker reachable (TCP, TLS with the trust file and host name check), a topic lookup
    over the binary protocol (the token is accepted), admin REST reachable and the token
    accepted, this party's cluster registered, the tenant usable, then the same round trip.

``cleanup_job(backend, job_id, options, ...)`` deletes what a crashed job left on this party's
broker through the backend's own ``Transport.cleanup`` (no second copy of that logic): the
transport is built for the job without being opened, so nothing new is created. For the
built-in brokers it lists what is there before and after, so an operator sees what went.

``session_options`` fills connection options from a route table entry (host, ports, the
admin/management URL) without overriding what was given explicitly.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import BackendError, ConfigError, FederationError, RouteError
from .options import split_options
from .party import Party, check_job_id
from .routing import RouteTable
from .transport import JobContext, Transport, get_backend

__all__ = ["Check", "CleanupReport", "cleanup_job", "run_doctor", "session_options"]

log = logging.getLogger("fedtransport.doctor")

Status = Literal["ok", "warn", "fail", "skip"]
RouteSource = str | Path | Mapping[str, Any] | RouteTable | None

# The job sessions a round trip opens: a party id nobody uses, so nothing collides.
_PROBE_A = Party("doctor", "probe-a")
_PROBE_B = Party("doctor", "probe-b")
_OPERATOR = Party("operator", "0")  # who a cleanup acts as when no party is given


@dataclass
class Check:
    """One step of ``doctor``: ``status`` is ok / warn / fail / skip."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class CleanupReport:
    """What ``cleanup_job`` found before deleting, and what was still there afterwards."""

    backend: str
    job_id: str
    target: str
    found: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    deleted: bool = False


# ---------------------------------------------------------------------------- options


def parse_party(text: str | Party | None, default_role: str = "operator") -> Party | None:
    """``"ROLE:ID"`` or ``"ID"`` (role ``default_role``) -> ``Party``."""
    if text is None or isinstance(text, Party):
        return text
    role, sep, pid = str(text).rpartition(":")
    return Party(role if sep else default_role, pid)


def session_options(
    backend: str,
    options: Mapping[str, Any] | None,
    route_table: RouteSource = None,
    party: Party | str | None = None,
) -> tuple[dict[str, Any], RouteTable | None]:
    """Options for ``backend`` with the party's broker filled in from the route table.

    Explicit options win. Pulsar: ``service_url`` from host/port (``pulsar+ssl`` on the
    sslPort when a trust file is configured), ``admin_url`` from ``mngPort``. RabbitMQ:
    ``host``, ``port`` (the ssl_port when ``ssl`` is set) and ``mng_port``.
    """
    opts = dict(options or {})
    if route_table is None:
        return opts, None
    kind = backend if backend in ("pulsar", "rabbitmq") else None
    rt = RouteTable.load(route_table, kind=kind)
    me = parse_party(party)
    if me is None:
        raise ConfigError(f"a route table ({rt.source}) needs --party ID to know which broker is ours")
    ep = rt.resolve(me)
    if backend == "pulsar":
        if "service_url" not in opts:
            tls = bool(opts.get("tls_trust_certs_file_path")) and ep.ssl_port is not None
            opts["service_url"] = f"pulsar+ssl://{ep.host}:{ep.ssl_port}" if tls else f"pulsar://{ep.host}:{ep.port}"
        if "admin_url" not in opts and ep.mng_port:
            opts["admin_url"] = f"http://{ep.host}:{ep.mng_port}"
    elif backend == "rabbitmq":
        opts.setdefault("host", ep.host)
        if "port" not in opts:
            opts["port"] = ep.ssl_port if opts.get("ssl") and ep.ssl_port else ep.port
        if "mng_port" not in opts and ep.mng_port:
            opts["mng_port"] = ep.mng_port
    return opts, rt


def _transport_for(
    backend: str, job_id: str, options: Mapping[str, Any], routes: RouteTable | None, party: Party
) -> Transport:
    """The backend's transport for ``job_id``, built but not opened: it creates nothing."""
    cls = get_backend(backend)
    common, backend_opts = split_options(options, backend, cls.option_defaults)
    ctx = JobContext(
        check_job_id(job_id), party, routes, backend_opts, common.max_message_size, common.lanes, common.lane_offset
    )
    return cls(ctx)


# ---------------------------------------------------------------------------- cleanup


def cleanup_job(
    backend: str,
    job_id: str,
    options: Mapping[str, Any] | None = None,
    route_table: RouteSource = None,
    party: Party | str | None = None,
    *,
    dry_run: bool = False,
) -> CleanupReport:
    """Delete every resource of ``job_id`` on this party's broker; idempotent.

    Uses ``Transport.cleanup`` of the backend, so a crashed job is cleaned exactly as its
    own session would have done. ``dry_run`` only lists what is there.
    """
    if backend == "memory":
        raise ConfigError("the memory backend keeps nothing once its process ends: there is nothing to clean up")
    opts, routes = session_options(backend, options, route_table, party)
    if backend == "pulsar" and not opts.get("admin_url"):
        raise ConfigError(
            "cleaning up a Pulsar job needs the admin REST API to delete its topics and namespace: "
            "--option admin_url=http://BROKER:8080 (or a route table entry with mngPort)"
        )
    transport = _transport_for(backend, job_id, opts, routes, parse_party(party) or _OPERATOR)
    report = CleanupReport(backend, job_id, _target(backend, transport, opts))
    report.found = _inventory(backend, transport, opts)
    if dry_run:
        return report
    transport.cleanup()
    report.deleted = True
    report.left = _inventory(backend, transport, opts)
    return report


def _target(backend: str, transport: Transport, opts: Mapping[str, Any]) -> str:
    if backend == "rabbitmq":
        return f"RabbitMQ management API at {transport.management.admin().base_url}"  # type: ignore[attr-defined]
    if backend == "pulsar":
        return f"Pulsar admin API at {opts['admin_url']}"
    return transport.describe()


def _inventory(backend: str, transport: Transport, opts: Mapping[str, Any]) -> list[str]:
    """Names of the job's resources on the broker (built-in backends; [] for others)."""
    if backend == "rabbitmq":
        t: Any = transport
        return list(t.management.inventory())
    if backend == "pulsar":
        from .transport.pulsar.admin import PulsarAdmin

        t = transport
        admin = _pulsar_admin(opts, PulsarAdmin)
        try:
            topics = admin.list_topics(t.tenant, t.namespace)
        except BackendError as exc:
            if exc.status == 404:
                return []
            raise
        return [f"namespace {t.tenant}/{t.namespace}", *(f"topic {name}" for name in topics)]
    return []


def _pulsar_admin(opts: Mapping[str, Any], cls: Any, timeout: float = 30.0) -> Any:
    return cls(
        opts["admin_url"],
        token=opts.get("token"),
        tls_trust_certs_file_path=opts.get("tls_trust_certs_file_path"),
        tls_validate_hostname=opts.get("tls_validate_hostname", True),
        timeout=timeout,
    )


# ---------------------------------------------------------------------------- doctor


def run_doctor(
    backend: str,
    options: Mapping[str, Any] | None = None,
    route_table: RouteSource = None,
    party: Party | str | None = None,
    *,
    roundtrip: bool = True,
    timeout: float = 10.0,
) -> list[Check]:
    """Check this party's broker for ``backend``; see the module docstring for the steps."""
    checks: list[Check] = []
    try:
        opts, routes = session_options(backend, options, route_table, party)
        # Building (not opening) a transport runs the backend's own checks of every option.
        _transport_for(backend, "fedtransport-doctor", opts, routes, parse_party(party) or _PROBE_A)
    except FederationError as exc:
        fix = "check the route table with: fedtransport route check FILE" if isinstance(exc, RouteError) else ""
        return [Check("options", "fail", str(exc), fix)]
    checks.append(Check("options", "ok", _describe_options(backend, opts)))
    if backend == "rabbitmq":
        checks += _rabbit_checks(opts, timeout)
    elif backend == "pulsar":
        checks += _pulsar_checks(opts, routes, parse_party(party), timeout)
    elif backend == "memory":
        checks.append(Check("broker", "ok", "the memory backend needs no broker"))
    else:
        checks.append(
            Check("broker", "skip", f"no connectivity checks for backend {backend!r}; the round trip tests it")
        )
    if roundtrip:
        checks.append(_roundtrip(backend, opts, routes, parse_party(party), timeout, checks))
    return checks


def _describe_options(backend: str, opts: Mapping[str, Any]) -> str:
    if backend == "rabbitmq":
        host = opts.get("host", "127.0.0.1")
        return (
            f"RabbitMQ at {host}: AMQP{'S' if opts.get('ssl') else ''} port {opts.get('port', 5672)}, "
            f"management port {opts.get('mng_port', 15672)}, user {opts.get('user', 'guest')!r}"
        )
    if backend == "pulsar":
        return (
            f"Pulsar broker {opts.get('service_url') or '(none)'}, admin {opts.get('admin_url') or '(none)'}, "
            f"tenant {opts.get('tenant', 'fl-tenant')!r}, token {'set' if opts.get('token') else 'none'}"
        )
    return f"backend {backend}"


def _roundtrip(
    backend: str,
    opts: Mapping[str, Any],
    routes: RouteTable | None,
    party: Party | None,
    timeout: float,
    so_far: list[Check],
) -> Check:
    name = "round trip"
    if any(c.status == "fail" for c in so_far):
        return Check(name, "skip", "not tried: fix the failures above first")
    probe = dict(opts)
    if backend in ("rabbitmq", "pulsar"):
        probe["mode"] = "shared"  # both probe parties live on this one broker
    if backend == "pulsar" and not probe.get("cluster"):
        probe["cluster"] = _pulsar_cluster(opts, routes, party)
    if backend == "memory":
        probe["hub"] = f"doctor-{secrets.token_hex(4)}"
    job_id = f"fedtransport-doctor-{secrets.token_hex(4)}"
    from .api import Federation

    sessions: list[Any] = []
    started = time.monotonic()
    try:
        for who in (_PROBE_A, _PROBE_B):
            sessions.append(Federation.connect(backend, job_id=job_id, party=who, options=probe))
        a, b = sessions
        token = secrets.token_hex(8)
        a.remote({"doctor": token}, "probe", "0", [_PROBE_B])
        [got] = b.get("probe", "0", [_PROBE_A], timeout=max(30.0, 3 * timeout))
        if got != {"doctor": token}:
            return Check(name, "fail", f"job {job_id}: the probe object came back changed: {got!r}")
    except FederationError as exc:
        return Check(
            name, "fail", f"a probe job ({job_id}) on this broker failed: {exc}", _roundtrip_fix(backend, opts)
        )
    finally:
        for s in sessions:
            with contextlib.suppress(FederationError):
                s.close()
        for s in sessions:  # each drops what it made (subscriptions); the first one takes the namespace/vhost
            try:
                s.cleanup()
            except FederationError as exc:  # logged: the round trip itself already worked or failed
                log.warning(
                    "could not delete the probe job %s: %s (fedtransport cleanup --job %s)", job_id, exc, job_id
                )
    elapsed = time.monotonic() - started
    return Check(
        name, "ok", f"two probe parties opened job {job_id}, moved one object and cleaned up in {elapsed:.1f} s"
    )


def _roundtrip_fix(backend: str, opts: Mapping[str, Any]) -> str:
    if backend == "pulsar" and not opts.get("admin_url"):
        return (
            "without admin_url the job namespace must already exist on a real Pulsar broker; "
            "pass --option admin_url=http://BROKER:8080 so fedtransport creates and deletes it"
        )
    return "the message above carries the broker's own reason"


# ---------------------------------------------------------------------------- network probes


@contextlib.contextmanager
def _connect(host: str, port: int, timeout: float, tls: ssl.SSLContext | None, sni: str | None) -> Iterator[Any]:
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=sni or host)
        yield sock
    finally:
        sock.close()


def _socket_problem(host: str, port: int, exc: BaseException, timeout: float) -> tuple[str, str]:
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


def _tls_context(ca_file: str | None, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS files (CA {ca_file!r}, certificate {cert_file!r}): {exc}") from exc
    return ctx


# ---------------------------------------------------------------------------- RabbitMQ


def _rabbit_checks(opts: Mapping[str, Any], timeout: float) -> list[Check]:
    from .transport.rabbitmq import RabbitAdmin, RabbitTransport

    o = {**RabbitTransport.option_defaults, **opts}
    host, port, mng_port = str(o["host"]), int(o["port"]), int(o["mng_port"])
    checks = [_amqp_check(host, port, o.get("ssl"), timeout)]

    user = str(o["user"])
    hostpart = f"[{host}]" if ":" in host else host
    admin = RabbitAdmin(f"http://{hostpart}:{mng_port}", user, str(o["password"]), timeout=timeout)
    try:
        overview = admin.overview()
    except BackendError as exc:
        if exc.status == 401:
            checks.append(
                Check(
                    "management API",
                    "fail",
                    f"{admin.base_url} refused user {user!r} (HTTP 401): wrong user or password",
                    "pass the broker administrator's credentials: --option user=NAME --option password=SECRET",
                )
            )
        elif exc.status is None:
            checks.append(
                Check(
                    "management API",
                    "fail",
                    f"unreachable: {exc}",
                    "enable the management plugin (rabbitmq-plugins enable rabbitmq_management) and "
                    "check --option mng_port (default 15672)",
                )
            )
        else:
            checks.append(Check("management API", "fail", str(exc), "the broker's reason is in the message"))
        skipped = "not checked: the management API did not answer"
        return [*checks, Check("administrator", "skip", skipped), Check("plugins", "skip", skipped)]
    version = overview.get("rabbitmq_version", "?")
    checks.append(
        Check(
            "management API",
            "ok",
            f"{admin.base_url}: RabbitMQ {version} on node {overview.get('node', '?')}, user {user!r} accepted",
        )
    )

    who = admin.whoami()
    tags = who.get("tags") or []
    tag_list = [t.strip() for t in tags.split(",")] if isinstance(tags, str) else [str(t) for t in tags]
    if "administrator" in tag_list:
        checks.append(Check("administrator", "ok", f"user {user!r} is tagged administrator"))
    else:
        checks.append(
            Check(
                "administrator",
                "fail",
                f"user {user!r} has tags {tag_list or 'none'}: fedtransport creates a vhost, users, "
                "permissions, policies and federation upstreams per job, which needs administrator",
                f"rabbitmqctl set_user_tags {user} administrator (or use another account)",
            )
        )

    try:
        plugins = admin.enabled_plugins(wait=max(timeout, 15.0))
    except BackendError as exc:
        checks.append(Check("plugins", "fail", str(exc), "enable management statistics on the node"))
        return checks
    missing = [p for p in ("rabbitmq_federation", "rabbitmq_federation_management") if p not in plugins]
    if not missing:
        checks.append(
            Check(
                "plugins",
                "ok",
                "rabbitmq_management, rabbitmq_federation and rabbitmq_federation_management are enabled",
            )
        )
    else:
        shared_only = opts.get("mode") == "shared"
        why = (
            "needed by federated mode (each party on its own broker)"
            if "rabbitmq_federation" in missing
            else "needed to show federation link status"
        )
        checks.append(
            Check(
                "plugins",
                "warn" if shared_only else "fail",
                f"not enabled: {', '.join(missing)} ({why})",
                f"rabbitmq-plugins enable {' '.join(missing)}",
            )
        )
    return checks


def _amqp_check(host: str, port: int, ssl_opts: Any, timeout: float) -> Check:
    name = "AMQP listener"
    tls = None
    sni = None
    if ssl_opts:
        try:
            tls = _tls_context(ssl_opts.get("ca_file"), ssl_opts.get("cert_file"), ssl_opts.get("key_file"))
        except ConfigError as exc:
            return Check(name, "fail", str(exc), "correct the paths in --option ssl={...}")
        sni = ssl_opts.get("server_hostname") or host
    try:
        with _connect(host, port, timeout, tls, sni) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")  # protocol header of AMQP 0-9-1
            head = _read(sock, 7)
    except OSError as exc:
        detail, fix = _socket_problem(host, port, exc, timeout)
        return Check(name, "fail", detail, fix)
    if head[:1] == b"\x01":  # a method frame: connection.start
        return Check(name, "ok", f"{host}:{port} answers AMQP 0-9-1" + (f" over TLS as {sni}" if tls else ""))
    if head.startswith(b"AMQP"):
        return Check(
            name,
            "fail",
            f"{host}:{port} speaks another AMQP version ({head!r})",
            "fedtransport needs RabbitMQ's AMQP 0-9-1 listener",
        )
    return Check(
        name,
        "fail",
        f"{host}:{port} answered {head[:16]!r}, which is not AMQP",
        "is this the AMQP port (5672, or 5671 with --option ssl=...)?",
    )


def _read(sock: Any, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


# ---------------------------------------------------------------------------- Pulsar


def _pulsar_cluster(opts: Mapping[str, Any], routes: RouteTable | None, party: Party | None) -> str:
    if opts.get("cluster"):
        return str(opts["cluster"])
    if routes is not None and party is not None:
        return routes.cluster_name(party)
    return "standalone"


def _pulsar_checks(
    opts: Mapping[str, Any], routes: RouteTable | None, party: Party | None, timeout: float
) -> list[Check]:
    checks: list[Check] = []
    url = opts.get("service_url")
    if not url:
        checks.append(
            Check(
                "broker",
                "fail",
                "no service_url: doctor checks a running broker",
                "--option service_url=pulsar://BROKER:6650 (or --route-table FILE --party ID)",
            )
        )
    else:
        checks += _pulsar_broker_checks(str(url), opts, timeout)
    tenant = str(opts.get("tenant", "fl-tenant"))
    if not opts.get("admin_url"):
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
    checks += _pulsar_admin_checks(opts, tenant, _pulsar_cluster(opts, routes, party), timeout)
    return checks


def _pulsar_broker_checks(url: str, opts: Mapping[str, Any], timeout: float) -> list[Check]:
    parsed = urllib.parse.urlparse(url.split(",")[0])
    host, secure = parsed.hostname or "", parsed.scheme == "pulsar+ssl"
    if parsed.scheme not in ("pulsar", "pulsar+ssl") or not host:
        return [Check("broker", "fail", f"service_url {url!r} is not pulsar://HOST:PORT or pulsar+ssl://HOST:PORT")]
    port = parsed.port or (6651 if secure else 6650)
    tls = None
    if secure:
        try:
            tls = _tls_context(opts.get("tls_trust_certs_file_path"))
        except ConfigError as exc:
            return [Check("broker", "fail", str(exc), "correct --option tls_trust_certs_file_path=FILE")]
        tls.check_hostname = bool(opts.get("tls_validate_hostname", True))
    try:
        with _connect(host, port, timeout, tls, host):
            pass
    except OSError as exc:
        detail, fix = _socket_problem(host, port, exc, timeout)
        return [Check("broker", "fail", detail, fix)]
    checks = [Check("broker", "ok", f"{host}:{port} accepts connections" + (" (TLS verified)" if tls else ""))]
    checks.append(_pulsar_lookup(url, opts, timeout))
    return checks


def _pulsar_lookup(url: str, opts: Mapping[str, Any], timeout: float) -> Check:
    """A topic lookup over the binary protocol: proves the handshake and the token."""
    import pulsar

    from .transport.pulsar.admin import read_token

    name = "protocol and token"
    quiet = logging.getLogger("fedtransport.doctor.pulsar-client")
    quiet.setLevel(logging.CRITICAL)
    kwargs: dict[str, Any] = {
        "operation_timeout_seconds": max(1, int(timeout)),
        "logger": quiet,
        "tls_validate_hostname": bool(opts.get("tls_validate_hostname", True)),
    }
    if opts.get("token"):
        kwargs["authentication"] = pulsar.AuthenticationToken(read_token(str(opts["token"])))
    if opts.get("tls_trust_certs_file_path"):
        kwargs["tls_trust_certs_file_path"] = str(opts["tls_trust_certs_file_path"])
    topic = f"persistent://{opts.get('tenant', 'fl-tenant')}/fedtransport-doctor/probe"
    client = None
    try:
        client = pulsar.Client(url, **kwargs)
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
                f"the token was accepted but its role may not use tenant {opts.get('tenant', 'fl-tenant')!r}: {text}",
                "grant the role on the tenant, or use a superuser token",
            )
        if "NotFound" in text or "TopicNotFound" in text:
            return Check(name, "ok", f"the broker answered a topic lookup ({text})")
        return Check(
            name, "fail", f"a topic lookup failed: {text}", "check service_url, TLS options and the broker's log"
        )
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
    return Check(name, "ok", "the broker answered a topic lookup" + (" with the token" if opts.get("token") else ""))


def _pulsar_admin_checks(opts: Mapping[str, Any], tenant: str, cluster: str, timeout: float) -> list[Check]:
    from .transport.pulsar.admin import PulsarAdmin

    try:
        admin = _pulsar_admin(opts, PulsarAdmin, timeout)
        clusters = admin.get_clusters()
    except FederationError as exc:
        status = getattr(exc, "status", None)
        if status == 401:
            detail, fix = (
                f"{opts['admin_url']} rejected the token (HTTP 401): {exc}",
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
        return [Check("admin API", "fail", detail, fix), Check("cluster", "skip", "not checked")]
    checks = [Check("admin API", "ok", f"{opts['admin_url']} answered; clusters: {', '.join(clusters) or 'none'}")]
    if cluster in clusters:
        checks.append(Check("cluster", "ok", f"this party's cluster {cluster!r} is registered"))
    else:
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


def summary(checks: list[Check]) -> tuple[int, str]:
    """Exit code (1 when any check failed) and a one-line verdict."""
    failed = [c for c in checks if c.status == "fail"]
    warned = [c for c in checks if c.status == "warn"]
    if failed:
        return 1, f"{len(failed)} problem(s): {', '.join(c.name for c in failed)}"
    return 0, "all checks passed" + (f" ({len(warned)} warning(s))" if warned else "")


def format_checks(checks: list[Check], write: Callable[[str], Any]) -> None:
    """Aligned text lines: status, check name, detail, and the fix under a failure or warning."""
    width = max((len(c.name) for c in checks), default=0)
    labels = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
    for c in checks:
        write(f"  {labels[c.status]}  {c.name:<{width}}  {c.detail}")
        if c.fix and c.status in ("fail", "warn"):
            write(f"        {'':<{width}}  fix: {c.fix}")
