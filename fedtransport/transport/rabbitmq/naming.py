"""Names of one job's RabbitMQ resources, and the permission patterns that follow from them.

Every party computes the same names from the job id and the parties, so nothing has to be
looked up: the vhost ``{vhost_prefix}{job_id}``, queues
``{job_id}:{src_role}:{src_id}:{dst_role}:{dst_id}:{lane}`` (``...:b{lane}`` for a broadcast
lane, which one publish with a ``CC`` header fills for several destinations), a party's exchange
``{job_id}:{role}:{party_id}``, its data user ``{vhost}:{role}:{party_id}``, the federation
link user ``{vhost}:link:{src}:{dst}``, the upstream ``from:{role}:{party_id}`` and its policy
``federate:{role}:{party_id}``. ``:`` cannot occur in job ids, roles or party ids, so a name
maps back to exactly one (src, dst, lane).

AMQP carries queue, exchange and vhost names as short strings of at most 255 bytes, and job
ids (128 characters), roles and party ids (64 each) may add up to more. So a long component
is shortened to a readable prefix, ``~`` and 16 hex digits of a hash of the whole: the job id
past 110 characters in queue and exchange names, ``role:party_id`` past 64, and the vhost past
120 in user names. ``~`` never occurs in an id, so a shortened form never meets a whole one;
short ids keep the names they always had. With those bounds every name fits:
queue 110+1+64+1+64+1+10 = 251, link user 120+6+64+1+64 = 255, vhost 64+128 = 192 bytes.

Pure functions of the names: no I/O, used by the control plane and the data plane alike.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ...party import Party
from ..base import BROADCAST_LANE

__all__ = ["AMQP_SHORT_MAX", "RabbitNames"]

AMQP_SHORT_MAX = 255  # bytes of an AMQP 0-9-1 short string: queue, exchange and vhost names
_JOB_MAX = 110  # characters of the job id in queue and exchange names
_PARTY_MAX = 64  # characters of "role:party_id" in any name
_VHOST_MAX = 120  # characters of the vhost in user names


def _short(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else a prefix, ``~`` and 16 hex digits of its hash."""
    if len(text) <= limit:
        return text
    digest = hashlib.blake2b(text.encode(), digest_size=8, person=b"ft-rabbit-name").hexdigest()
    return f"{text[: limit - 17]}~{digest}"


def _party(p: Party) -> str:
    """``role:party_id``; when too long, each part cut short and the hash of both after the id.

    The shortened form keeps one ``:`` between role and id, so the permission patterns' "any
    party" (``[^:]+:[^:]+``) still matches it.
    """
    whole = f"{p.role}:{p.party_id}"
    if len(whole) <= _PARTY_MAX:
        return whole
    digest = hashlib.blake2b(whole.encode(), digest_size=8, person=b"ft-rabbit-name").hexdigest()
    return f"{p.role[:23]}:{p.party_id[:23]}~{digest}"  # 23 + 1 + 23 + 1 + 16 = 64


@dataclass(frozen=True)
class RabbitNames:
    """The naming scheme of one job as seen by one party (``me``)."""

    job_id: str
    me: Party
    vhost: str
    lane_offset: int = 0

    @property
    def _job(self) -> str:
        return _short(self.job_id, _JOB_MAX)

    @property
    def _user_base(self) -> str:
        return _short(self.vhost, _VHOST_MAX)

    def queue(self, src: Party, dst: Party, lane: int) -> str:
        """A pair lane's queue ``...:{lane}``, or a broadcast lane's ``...:b{lane}`` (broadcast.py)."""
        if lane >= BROADCAST_LANE:
            return f"{self._job}:{_party(src)}:{_party(dst)}:b{lane - BROADCAST_LANE + self.lane_offset}"
        return f"{self._job}:{_party(src)}:{_party(dst)}:{lane + self.lane_offset}"

    def exchange(self, src: Party) -> str:
        """The exchange ``src`` publishes to: only its own queues are bound to it."""
        return f"{self._job}:{_party(src)}"

    def presence(self, party: Party) -> str:
        """The auto-delete queue every session of ``party`` consumes from while connected (presence.py)."""
        return f"{self._job}:present:{_party(party)}"

    def party_user(self, party: Party) -> str:
        return f"{self._user_base}:{_party(party)}"

    def link_user(self, src: Party, dst: Party) -> str:
        return f"{self._user_base}:link:{_party(src)}:{_party(dst)}"

    @staticmethod
    def upstream_name(src: Party) -> str:
        return f"from:{_party(src)}"

    @staticmethod
    def policy_name(src: Party) -> str:
        return f"federate:{_party(src)}"

    def queue_pattern(self, src: Party | None, dst: Party | None) -> str:
        """Regex of the queues from ``src`` to ``dst`` (``None``: any party), every lane, broadcast lanes too."""

        def part(p: Party | None) -> str:
            return "[^:]+:[^:]+" if p is None else re.escape(_party(p))

        return f"^{re.escape(self._job)}:{part(src)}:{part(dst)}:b?[0-9]+$"

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
        presence = f"^{re.escape(self.presence(me))}$"  # declared and consumed by each session
        configure = f"{outgoing}|{incoming}|{exchange}|{presence}"  # own queues both ways, exchange, presence
        return configure, f"{exchange}|{outgoing}", f"{incoming}|{exchange}|{presence}"
