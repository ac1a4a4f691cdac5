"""Operator tools behind ``fedtransport doctor`` and ``fedtransport cleanup``.

Both commands work for every backend in the registry, built-in or added through the
``fedtransport.backends`` entry point, through the operator hooks of its ``Transport`` class
(see fedtransport/transport/base.py); this module names no backend.

``run_doctor(backend, options, ...)`` checks, in order, what a job session needs from this
party's broker and returns one :class:`Check` per step with what is wrong and how to fix it:

1. ``options``: building (not opening) the backend's transport runs its own checks of every
   option; the step names the broker they point at.
2. the backend's ``doctor_checks``: for RabbitMQ the AMQP listener, the management API, the
   administrator tag and the federation plugins (transport/rabbitmq/doctor.py); for Pulsar
   the broker, a topic lookup with the token, the admin API, the cluster and the tenant
   (transport/pulsar/doctor.py).
3. ``round trip``: two probe parties open a job session on this broker through the public
   API, move one object and clean up. Skipped when an earlier step failed.

``cleanup_job(backend, job_id, options, ...)`` deletes what a crashed job left on this party's
broker through the backend's own ``Transport.cleanup`` (no second copy of that logic): the
transport is built for the job without being opened, so nothing new is created. Its
``inventory()`` lists what is there before and after, so an operator sees what went.

``session_options`` fills connection options from a route table entry (the backend's
``options_from_route``) without overriding what was given explicitly.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, FederationError, RouteError
from .options import split_options
from .party import Party, check_job_id
from .routing import RouteTable
from .transport import JobContext, Transport, get_backend
from .transport.checks import Check

__all__ = [
    "Check",
    "CleanupReport",
    "cleanup_job",
    "format_checks",
    "parse_party",
    "run_doctor",
    "session_options",
    "summary",
]

log = logging.getLogger("fedtransport.doctor")

RouteSource = str | Path | Mapping[str, Any] | RouteTable | None

# The job sessions a round trip opens: a party id nobody uses, so nothing collides.
_PROBE_A = Party("doctor", "probe-a")
_PROBE_B = Party("doctor", "probe-b")
_OPERATOR = Party("operator", "0")  # who a cleanup acts as when no party is given


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

    Explicit options win. What is filled in is the backend's ``options_from_route``:
    Pulsar's ``service_url`` and ``admin_url``; RabbitMQ's ``host``, ``port`` and ``mng_port``.
    """
    opts = dict(options or {})
    if route_table is None:
        return opts, None
    cls = get_backend(backend)
    rt = RouteTable.load(route_table, kind=cls.route_kind)
    me = parse_party(party)
    if me is None:
        raise ConfigError(f"a route table ({rt.source}) needs --party ID to know which broker is ours")
    return cls.options_from_route(opts, rt.resolve(me)), rt


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
    opts, routes = session_options(backend, options, route_table, party)
    transport = _transport_for(backend, job_id, opts, routes, parse_party(party) or _OPERATOR)
    report = CleanupReport(backend, job_id, transport.cleanup_target())
    report.found = transport.inventory()
    if dry_run:
        return report
    transport.cleanup()
    report.deleted = True
    report.left = transport.inventory()
    return report


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
    me = parse_party(party)
    try:
        cls = get_backend(backend)
        opts, routes = session_options(backend, options, route_table, me)
        # Building (not opening) a transport runs the backend's own checks of every option.
        _transport_for(backend, "fedtransport-doctor", opts, routes, me or _PROBE_A)
    except FederationError as exc:
        fix = "check the route table with: fedtransport route check FILE" if isinstance(exc, RouteError) else ""
        return [Check("options", "fail", str(exc), fix)]
    checks = [Check("options", "ok", cls.describe_options(opts))]
    checks += cls.doctor_checks(opts, routes=routes, party=me, timeout=timeout)
    if roundtrip:
        checks.append(_roundtrip(backend, cls, opts, routes, me, timeout, checks))
    return checks


def _roundtrip(
    backend: str,
    cls: type[Transport],
    opts: Mapping[str, Any],
    routes: RouteTable | None,
    party: Party | None,
    timeout: float,
    so_far: list[Check],
) -> Check:
    """Two probe parties on this party's broker move one object through the public API."""
    name = "round trip"
    if any(c.status == "fail" for c in so_far):
        return Check(name, "skip", "not tried: fix the failures above first")
    probe = cls.probe_options(opts, routes=routes, party=party)
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
        return Check(name, "fail", f"a probe job ({job_id}) on this broker failed: {exc}", cls.probe_failure_fix(opts))
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


# ---------------------------------------------------------------------------- output


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
