"""Names of one job's RabbitMQ resources, and the permission patterns that follow from them.

Every party computes the same names from the job id and the parties, so nothing has to be
looked up: the vhost ``{vhost_prefix}{job_id}``, queues
``{job_id}:{src_role}:{src_id}:{dst_role}:{dst_id}:{lane}``, a party's exchange
``{job_id}:{role}:{party_id}``, its data user ``{vhost}:{role}:{party_id}``, the federation
link user ``{vhost}:link:{src}:{dst}``, the upstream ``from:{role}:{party_id}`` and its policy
``federate:{role}:{party_id}``. ``:`` cannot occur in job ids, roles or party ids, so a name
maps back to exactly one (src, dst, lane).

Pure functions of the names: no I/O, used by the control plane and the data plane alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...party import Party

__all__ = ["RabbitNames"]


@dataclass(frozen=True)
class RabbitNames:
    """The naming scheme of one job as seen by one party (``me``)."""

    job_id: str
    me: Party
    vhost: str
    lane_offset: int = 0

    def queue(self, src: Party, dst: Party, lane: int) -> str:
        return f"{self.job_id}:{src.role}:{src.party_id}:{dst.role}:{dst.party_id}:{lane + self.lane_offset}"

    def exchange(self, src: Party) -> str:
        """The exchange ``src`` publishes to: only its own queues are bound to it."""
        return f"{self.job_id}:{src.role}:{src.party_id}"

    def party_user(self, party: Party) -> str:
        return f"{self.vhost}:{party.role}:{party.party_id}"

    def link_user(self, src: Party, dst: Party) -> str:
        return f"{self.vhost}:link:{src.role}:{src.party_id}:{dst.role}:{dst.party_id}"

    @staticmethod
    def upstream_name(src: Party) -> str:
        return f"from:{src.role}:{src.party_id}"

    @staticmethod
    def policy_name(src: Party) -> str:
        return f"federate:{src.role}:{src.party_id}"

    def queue_pattern(self, src: Party | None, dst: Party | None) -> str:
        """Regex of the queues from ``src`` to ``dst`` (``None``: any party), every lane."""

        def part(p: Party | None) -> str:
            return "[^:]+:[^:]+" if p is None else f"{re.escape(p.role)}:{re.escape(p.party_id)}"

        return f"^{re.escape(self.job_id)}:{part(src)}:{part(dst)}:[0-9]+$"

    def data_permissions(self) -> tuple[str, str, str]:
        """(configure, write, read) of the party's data user.

        RabbitMQ checks a publish against the exchange, not the queue it reaches: with the
        default exchange writable, a party could publish into any queue of the job. So each
        party publishes to an exchange of its own, to which only its outgoing queues are
        bound, and may write nowhere else. Binding needs write on the queue and read on the
        exchange; writing to a queue allows nothing more than binding it."""
        me = self.me
        outgoing, incoming = self.queue_pattern(me, None), self.queue_pattern(None, me)
        exchange = f"^{re.escape(self.exchange(me))}$"
        configure = f"{outgoing}|{incoming}|{exchange}"  # declare own queues, both ways, and the exchange
        return configure, f"{exchange}|{outgoing}", f"{incoming}|{exchange}"
