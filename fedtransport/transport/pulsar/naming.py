"""Names of one job's Pulsar resources.

Every party computes the same names from the tenant, the job id and the parties, so nothing
has to be looked up: the job's namespace ``{tenant}/{job_id}``, its topics
``persistent://{tenant}/{job_id}/{src_role}-{src_id}-{dst_role}-{dst_id}-{lane}`` (parties x
lanes per job, never one per variable or partition; ``lane_offset`` shifts the lane number so
that sessions of one job, such as Spark tasks, own disjoint topics), and a receiving party's
durable subscription ``fedtransport-{role}-{party_id}``. A party's presence topic
``present-{role}-{party_id}`` (presence.py) has three parts, a lane's topic five, and a
broadcast lane's topic ``{src_role}-{src_id}-all-{lane}`` (fedtransport/broadcast.py: every
destination of the source's broadcasts reads it, ``ft-to`` naming who a message is for) four.

``-`` separates the parts, and roles and party ids may hold ``-`` too: ``("a-b", "c")`` and
``("a", "b-c")`` would share every name. So inside a part ``-`` is written ``=``, which no id
holds: each name maps back to one (src, dst, lane), and ids without ``-`` keep their names.
Pulsar takes the longest ids whole (a 128-character job id as the namespace, 64-character
roles and party ids in topics: ``tests/test_long_ids.py``).

Pure functions of the names: no I/O, used by the control plane and the data plane alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...party import Party
from ..base import BROADCAST_LANE

__all__ = ["PulsarNames", "party_part"]


@dataclass(frozen=True)
class PulsarNames:
    """The naming scheme of one job."""

    tenant: str
    namespace: str  # the job id
    lane_offset: int = 0

    def topic(self, src: Party, dst: Party, lane: int) -> str:
        """A pair lane's topic; a broadcast lane's is ``{src}-all-{lane}``, whatever ``dst``."""
        if lane >= BROADCAST_LANE:
            name = f"{party_part(src)}-all-{lane - BROADCAST_LANE + self.lane_offset}"
            return f"persistent://{self.tenant}/{self.namespace}/{name}"
        name = f"{party_part(src)}-{party_part(dst)}-{lane + self.lane_offset}"
        return f"persistent://{self.tenant}/{self.namespace}/{name}"

    @staticmethod
    def subscription(party: Party) -> str:
        """The durable subscription ``party`` receives on, the same on every lane."""
        return f"fedtransport-{party_part(party)}"


def party_part(p: Party) -> str:
    """``role-party_id``, a ``-`` inside either written ``=``: the separators stay unambiguous."""
    return f"{p.role.replace('-', '=')}-{p.party_id.replace('-', '=')}"
