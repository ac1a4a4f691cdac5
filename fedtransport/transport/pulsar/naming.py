"""Names of one job's Pulsar resources.

Every party computes the same names from the tenant, the job id and the parties, so nothing
has to be looked up: the job's namespace ``{tenant}/{job_id}``, its topics
``persistent://{tenant}/{job_id}/{src_role}-{src_id}-{dst_role}-{dst_id}-{lane}`` (parties x
lanes per job, never one per variable or partition; ``lane_offset`` shifts the lane number so
that sessions of one job, such as Spark tasks, own disjoint topics), and a receiving party's
durable subscription ``fedtransport-{role}-{party_id}``.

Pure functions of the names: no I/O, used by the control plane and the data plane alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...party import Party

__all__ = ["PulsarNames"]


@dataclass(frozen=True)
class PulsarNames:
    """The naming scheme of one job."""

    tenant: str
    namespace: str  # the job id
    lane_offset: int = 0

    def topic(self, src: Party, dst: Party, lane: int) -> str:
        name = f"{src.role}-{src.party_id}-{dst.role}-{dst.party_id}-{lane + self.lane_offset}"
        return f"persistent://{self.tenant}/{self.namespace}/{name}"

    @staticmethod
    def subscription(party: Party) -> str:
        """The durable subscription ``party`` receives on, the same on every lane."""
        return f"fedtransport-{party.role}-{party.party_id}"
