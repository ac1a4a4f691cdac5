"""The interface every backend implements.

A :class:`Transport` is one party's connection to its broker(s) for one job
session. It moves opaque messages (already framed, at most ``max_message_size``
bytes) on *lanes*: lane ``n`` from party A to party B is one topic or queue.
It knows nothing about objects, transfers or tables.

Threading contract: ``send`` may be called concurrently from several threads for
different ``(dst, lane)`` pairs; ``deliver`` callbacks run on threads the backend
owns and must not block for long; ``ack`` may be called from any thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..party import Party
from ..routing import RouteTable

__all__ = ["DeliverFn", "Delivery", "JobContext", "Transport"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message received on a lane.

    ``token`` is what the backend needs to acknowledge it; it must not keep the
    payload alive (the receiver drops ``data`` once the bytes are placed).
    """

    src: Party
    lane: int
    data: bytes | memoryview
    token: Any


DeliverFn = Callable[[Delivery], None]


@dataclass(frozen=True)
class JobContext:
    """What a backend is told about the session it serves."""

    job_id: str
    party: Party
    route_table: RouteTable | None
    options: Mapping[str, Any]  # backend options, defaults applied, unknown keys refused
    max_message_size: int
    lanes: int
    #: added to a lane's index to name its topic or queue, so sessions of one job
    #: (Spark tasks) can own disjoint lanes; the framing above never sees it
    lane_offset: int = 0


class Transport(ABC):
    """Base class of backends; subclasses declare their options and defaults."""

    #: registry name
    name: ClassVar[str]
    #: backend-specific option keys and their defaults
    option_defaults: ClassVar[Mapping[str, Any]] = {}
    #: how many unacknowledged deliveries a lane can hold before the broker stops
    #: sending more (RabbitMQ prefetch); ``None`` when unacked messages do not
    #: block delivery. Past this the receiver calls ``make_room``, to stay live.
    max_unacked_per_lane: int | None = None

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def open(self) -> None:
        """Connect and create whatever the session needs before the first send."""

    @abstractmethod
    def send(self, dst: Party, lane: int, messages: Iterable[bytes]) -> int:
        """Publish ``messages`` in order; return the count once the broker has accepted all."""

    @abstractmethod
    def listen(self, src: Party, lane: int, deliver: DeliverFn) -> None:
        """Start delivering messages from ``src`` on ``lane`` (idempotent)."""

    @abstractmethod
    def ack(self, deliveries: Sequence[tuple[int, Party, Any]]) -> None:
        """Acknowledge ``(lane, src, token)`` triples; the broker may forget them."""

    def make_room(self, src: Party, lane: int, held: int) -> None:  # noqa: B027 - optional hook
        """The lane holds ``held`` unacknowledged deliveries in memory: let the broker send more.

        Needed by backends that set ``max_unacked_per_lane``.
        """

    def redeliver(self, src: Party, lane: int) -> None:  # noqa: B027 - optional hook
        """Ask the broker to deliver this lane's unacknowledged messages again."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; idempotent. Broker-side resources stay."""

    @abstractmethod
    def cleanup(self) -> None:
        """Delete every broker resource of this job; idempotent."""

    def describe(self) -> str:
        return self.name
