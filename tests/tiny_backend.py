"""A third-party backend as a plugin package would ship it, for tests/test_doctor.py.

It moves messages through the in-process memory backend and declares the operator hooks of
``Transport`` itself: a doctor check of its own, how a route-table entry fills its options,
and what ``fedtransport cleanup`` reports. Its "broker resources" are one record per opened
session, kept in :data:`RESOURCES` so that a test sees what cleanup leaves.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, ClassVar

from fedtransport.party import Party
from fedtransport.routing import Endpoint, RouteTable
from fedtransport.transport.checks import Check
from fedtransport.transport.memory import MemoryTransport

#: job id -> the records its sessions made on the "broker"
RESOURCES: dict[str, set[str]] = {}
_lock = threading.Lock()
#: every call of ``doctor_checks``: (options, party, timeout)
DOCTOR_CALLS: list[tuple[dict[str, Any], Party | None, float]] = []


class TinyTransport(MemoryTransport):
    """The memory data plane under another name, with its own doctor and cleanup."""

    name: ClassVar[str] = "tiny-plugin"
    option_defaults: ClassVar[dict[str, Any]] = {"hub": "default", "healthy": True}

    def open(self) -> None:
        super().open()
        with _lock:
            RESOURCES.setdefault(self.ctx.job_id, set()).add(f"session {self.ctx.party}")

    def cleanup(self) -> None:
        super().cleanup()
        with _lock:
            RESOURCES.pop(self.ctx.job_id, None)

    @classmethod
    def options_from_route(cls, options: Mapping[str, Any], endpoint: Endpoint) -> dict[str, Any]:
        return {"hub": endpoint.host, **options}

    @classmethod
    def describe_options(cls, options: Mapping[str, Any]) -> str:
        return f"tiny hub {options.get('hub', 'default')!r}"

    @classmethod
    def doctor_checks(
        cls, options: Mapping[str, Any], *, routes: RouteTable | None, party: Party | None, timeout: float
    ) -> list[Check]:
        DOCTOR_CALLS.append((dict(options), party, timeout))
        if options.get("healthy", True):
            return [Check("tiny broker", "ok", "the tiny broker answers")]
        return [Check("tiny broker", "fail", "the tiny broker is unwell", "--option healthy=true")]

    def cleanup_target(self) -> str:
        return f"tiny broker {self.ctx.options['hub']!r}"

    def inventory(self) -> list[str]:
        with _lock:
            return sorted(RESOURCES.get(self.ctx.job_id, ()))
