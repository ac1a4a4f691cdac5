"""The interface every backend implements.

A :class:`Transport` is one party's connection to its broker(s) for one job
session. It moves opaque messages (already framed, at most ``max_message_size``
bytes) on *lanes*: lane ``n`` from party A to party B is one topic or queue.
It knows nothing about objects, transfers or tables.

Threading contract: ``send`` may be called concurrently from several threads for
different ``(dst, lane)`` pairs; ``deliver`` callbacks run on threads the backend
owns and must not block for long; ``ack`` may be called from any thread.

``submit`` publishes one message and returns a future instead of waiting. A backend whose
client confirms asynchronously says so with ``submits_without_waiting``; ``remote_async``
then awaits a small object's futures on the event loop, where it would otherwise park a
thread per transfer.

Operator hooks: what ``fedtransport doctor`` and ``fedtransport cleanup`` (fedtransport.doctor)
ask of a backend, so that they name none. Each has a default, so a backend added through the
entry point gets both commands, and overrides what it knows better:

``route_kind``
    the route table format of this backend (``"pulsar"``, ``"rabbitmq"``); ``None``: guessed
    from the table's keys.
``options_from_route(options, endpoint)``
    connection options with this party's route-table entry filled in; explicit keys win.
``describe_options(options)``
    one line naming the broker the options point at (doctor's ``options`` step).
``doctor_checks(options, *, routes, party, timeout)``
    the backend's own checks of its broker, a list of :class:`~.checks.Check`, run after the
    options were accepted and before the round trip.
``probe_options(options, *, routes, party)`` / ``probe_failure_fix(options)``
    options for doctor's round trip, in which two made-up parties share this party's broker;
    and the advice shown when that round trip fails.
``cleanup_target()`` / ``inventory()``
    on a transport built for a job but not opened: where ``cleanup`` deletes (raising
    ``ConfigError`` when it cannot from outside a session), and the names of the job's
    resources there, listed before and after ``cleanup()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import BackendError
from ..party import Party
from ..routing import Endpoint, RouteTable
from .checks import Check

__all__ = ["BROADCAST_LANE", "DeliverFn", "Delivery", "JobContext", "Transport", "is_broadcast_lane"]

#: Lane ids from here on are broadcast lanes (fedtransport/broadcast.py): one publish that the
#: broker hands to several destinations. Pair lanes stay below 256, so the two never meet.
BROADCAST_LANE = 1 << 16


def is_broadcast_lane(lane: int) -> bool:
    return lane >= BROADCAST_LANE


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
    #: ``submit`` returns at once: its future completes when the broker has accepted the message
    submits_without_waiting: ClassVar[bool] = False

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def open(self) -> None:
        """Connect and create whatever the session needs before the first send."""

    @abstractmethod
    def send(self, dst: Party, lane: int, messages: Iterable[bytes]) -> int:
        """Publish ``messages`` in order; return the count once the broker has accepted all."""

    def submit(self, dst: Party, lane: int, message: bytes) -> Future[int] | None:
        """Publish one message without waiting for the broker: a future of ``send``'s result
        (1, or the ``BackendError`` it raises). ``None``: not possible without waiting right now
        (a lane's first use that needs the control plane); the caller then uses ``send``.

        The default sends (it waits) and returns the finished future; backends that declare
        ``submits_without_waiting`` override it."""
        done: Future[int] = Future()
        try:
            done.set_result(self.send(dst, lane, [message]))
        except Exception as exc:
            done.set_exception(exc)
        return done

    @property
    def submit_patience(self) -> float | None:
        """Seconds after which a submit still unsettled counts as lost (the caller stops waiting
        and raises ``BackendError``); ``None``: the backend settles every submit in bounded time."""
        return None

    @abstractmethod
    def listen(self, src: Party, lane: int, deliver: DeliverFn) -> None:
        """Start delivering messages from ``src`` on ``lane`` (idempotent).

        A broadcast lane (``is_broadcast_lane``) delivers what ``src`` broadcast to this party."""

    # broadcast: one publish, fanned out by the broker (fedtransport/broadcast.py) -------------

    def can_broadcast(self, dsts: Sequence[Party]) -> bool:
        """Whether one ``send_broadcast`` reaches every one of ``dsts``; off unless a backend says so."""
        return False

    @property
    def broadcast_lanes(self) -> int:
        """How many broadcast lanes a broadcast stripes its messages over (and a receiver listens to)."""
        return self.ctx.lanes

    def send_broadcast(self, dsts: Sequence[Party], lane: int, messages: Iterable[bytes]) -> int:
        """Publish ``messages`` once on broadcast ``lane`` for every one of ``dsts``; the count
        once the broker has accepted all. Only called when ``can_broadcast(dsts)``: a backend
        that cannot fan out refuses, so a caller that skipped the check never loses the data."""
        raise BackendError(
            f"backend {self.name!r} cannot broadcast to {len(dsts)} parties: check can_broadcast() first"
        )

    @abstractmethod
    def ack(self, deliveries: Sequence[tuple[int, Party, Any]]) -> None:
        """Acknowledge ``(lane, src, token)`` triples; the broker may forget them."""

    def make_room(self, src: Party, lane: int, held: int) -> None:  # noqa: B027 - optional hook
        """The lane holds ``held`` unacknowledged deliveries in memory: let the broker send more.

        Needed by backends that set ``max_unacked_per_lane``.
        """

    def last_stored(self, dst: Party, lane: int) -> bytes | None:
        """The last message the broker stores on the lane to ``dst`` that ``dst`` has not
        acknowledged, or ``None`` when there is none or the broker cannot tell (the default).

        A sender restarted after a kill skips what this shows stored of the same send
        (resume.py). Raise :class:`FederationError` if asking failed: the lane is sent whole.
        """
        return None

    def redeliver(self, src: Party, lane: int) -> None:  # noqa: B027 - optional hook
        """Ask the broker to deliver this lane's unacknowledged messages again."""

    def peers(self) -> set[Party]:
        """Parties of the job this backend knows of, beyond those the session met itself.

        ``Federation.abort`` tells them too. The memory hub knows every session of its job;
        a broker backend knows none (the route table names party ids, not roles).
        """
        return set()

    def peer_present(self, party: Party) -> bool | None:
        """Whether ``party`` has a session connected to the broker right now, as the broker sees it.

        ``None``: this backend cannot tell. Used for timeout messages (fedtransport/presence.py);
        it must return within a few seconds, also when the broker is down.
        """
        return None

    @abstractmethod
    def close(self) -> None:
        """Release connections; idempotent. Broker-side resources stay."""

    @abstractmethod
    def cleanup(self) -> None:
        """Delete every broker resource of this job; idempotent."""

    def describe(self) -> str:
        return self.name

    # operator hooks: fedtransport doctor and cleanup (see the module docstring) ---------------

    #: the route table format of this backend; None: guessed from the table's keys
    route_kind: ClassVar[str | None] = None

    #: sessions meet only inside one process (the demo runs its parties as threads)
    in_process: ClassVar[bool] = False

    @classmethod
    def local_broker(cls, options: dict[str, Any], stack: ExitStack) -> str:
        """For ``fedtransport demo``: when ``options`` name no broker, start a throw-away local
        one on ``stack`` and fill ``options`` in. Returns what the parties will use, in words."""
        return "configured broker"

    @classmethod
    def options_from_route(cls, options: Mapping[str, Any], endpoint: Endpoint) -> dict[str, Any]:
        """``options`` with the broker of ``endpoint`` (this party's route-table entry) filled in."""
        return dict(options)

    @classmethod
    def describe_options(cls, options: Mapping[str, Any]) -> str:
        """One line naming the broker ``options`` point at."""
        return f"backend {cls.name}"

    @classmethod
    def doctor_checks(
        cls, options: Mapping[str, Any], *, routes: RouteTable | None, party: Party | None, timeout: float
    ) -> list[Check]:
        """Checks of this party's broker, each network step bounded by ``timeout`` seconds."""
        return [Check("broker", "skip", f"no connectivity checks for backend {cls.name!r}; the round trip tests it")]

    @classmethod
    def probe_options(
        cls, options: Mapping[str, Any], *, routes: RouteTable | None, party: Party | None
    ) -> dict[str, Any]:
        """Options for two probe parties that both live on this party's broker (no route table)."""
        return dict(options)

    @classmethod
    def probe_failure_fix(cls, options: Mapping[str, Any]) -> str:
        """What to do when the round trip failed with the broker's own message."""
        return "the message above carries the broker's own reason"

    def cleanup_target(self) -> str:
        """Where ``cleanup()`` deletes, for the operator; ``ConfigError`` when it cannot."""
        return self.describe()

    def inventory(self) -> list[str]:
        """Names of the job's resources on the broker; ``[]`` when the backend cannot list them."""
        return []
