"""In-process backend, for unit tests and single-process simulations.

Features
    Parties of one process that connect with the same ``job_id`` (and hub) see
    each other. Messages are the same framed bytes a broker would carry, never
    Python objects, and are refused above ``max_message_size`` as a broker would.
    Unacknowledged messages stay on their lane and ``redeliver`` puts them back,
    so the receiver's acknowledgement logic is exercised exactly as on a broker.

Connection options (``options=`` of ``Federation.connect``)
    ``hub``, the name of the in-process hub: parties on different hubs never meet. Declared in
    ``MemoryTransport.option_defaults``; docs/backends.md has the table generated from it.

``cleanup()`` deletes every lane of the job in the hub.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any, ClassVar

from ..errors import BackendError, ConfigError
from ..options import Option, OptionSpec
from ..party import Party
from ..routing import RouteTable
from .base import DeliverFn, Delivery, JobContext, Transport
from .checks import Check

__all__ = ["MemoryTransport"]

_LaneKey = tuple[str, Party, Party, int]  # job, src, dst, lane


class _Lane:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ready: deque[tuple[int, bytes]] = deque()
        self.unacked: dict[int, bytes] = {}
        self.deleted = False


class _Hub:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lanes: dict[_LaneKey, _Lane] = {}
        self.ids = itertools.count()
        self.members: dict[str, set[Party]] = {}  # job -> every party that opened a session of it

    def lane(self, key: _LaneKey) -> _Lane:
        with self.lock:
            lane = self.lanes.get(key)
            if lane is None:
                lane = self.lanes[key] = _Lane()
            return lane

    def delete_job(self, job_id: str) -> None:
        with self.lock:
            doomed = [k for k in self.lanes if k[0] == job_id]
            self.members.pop(job_id, None)
            for k in doomed:
                lane = self.lanes.pop(k)
                with lane.cond:
                    lane.deleted = True
                    lane.ready.clear()
                    lane.unacked.clear()
                    lane.cond.notify_all()

    def job_lanes(self, job_id: str) -> list[_LaneKey]:
        with self.lock:
            return [k for k in self.lanes if k[0] == job_id]


_hubs: dict[str, _Hub] = {}
_hubs_lock = threading.Lock()


def hub(name: str = "default") -> _Hub:
    with _hubs_lock:
        h = _hubs.get(name)
        if h is None:
            h = _hubs[name] = _Hub()
        return h


class MemoryTransport(Transport):
    name: ClassVar[str] = "memory"
    in_process: ClassVar[bool] = True
    submits_without_waiting: ClassVar[bool] = True  # a send never waits here: the default submit is it
    option_defaults: ClassVar[OptionSpec] = OptionSpec(
        Option(
            "hub",
            str,
            "default",
            "name of the in-process hub. Sessions of one process with the same `job_id` and hub see each other.",
        ),
    )

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(ctx)
        self._hub = hub(str(ctx.options["hub"]))
        self._closed = threading.Event()
        self._listeners: dict[tuple[Party, int], threading.Thread] = {}
        self._lock = threading.Lock()

    def _key(self, src: Party, dst: Party, lane: int) -> _LaneKey:
        return (self.ctx.job_id, src, dst, lane + self.ctx.lane_offset)

    def open(self) -> None:
        self._closed.clear()
        with self._hub.lock:
            self._hub.members.setdefault(self.ctx.job_id, set()).add(self.ctx.party)

    def peers(self) -> set[Party]:
        with self._hub.lock:
            return set(self._hub.members.get(self.ctx.job_id, ())) - {self.ctx.party}

    def send(self, dst: Party, lane: int, messages: Iterable[bytes]) -> int:
        q = self._hub.lane(self._key(self.ctx.party, dst, lane))
        limit = self.ctx.max_message_size
        n = 0
        for msg in messages:
            if self._closed.is_set():
                raise BackendError("memory transport is closed")
            if len(msg) > limit:
                raise BackendError(f"message of {len(msg)} bytes exceeds max_message_size {limit}")
            with q.cond:
                q.ready.append((next(self._hub.ids), bytes(msg)))
                q.cond.notify_all()
            n += 1
        return n

    def listen(self, src: Party, lane: int, deliver: DeliverFn) -> None:
        with self._lock:
            if (src, lane) in self._listeners:
                return
            t = threading.Thread(target=self._pump, args=(src, lane, deliver), name=f"ft-mem-{src}-{lane}", daemon=True)
            self._listeners[(src, lane)] = t
        t.start()

    def _pump(self, src: Party, lane_no: int, deliver: DeliverFn) -> None:
        q = self._hub.lane(self._key(src, self.ctx.party, lane_no))
        while not self._closed.is_set():
            with q.cond:
                while not q.ready and not self._closed.is_set() and not q.deleted:
                    q.cond.wait(0.5)  # wakes to notice close() on lanes nobody sends to
                if self._closed.is_set() or q.deleted:
                    return
                msg_id, data = q.ready.popleft()
                q.unacked[msg_id] = data
            deliver(Delivery(src, lane_no, data, msg_id))

    def ack(self, deliveries: Sequence[tuple[int, Party, Any]]) -> None:
        for lane_no, src, token in deliveries:
            q = self._hub.lane(self._key(src, self.ctx.party, lane_no))
            with q.cond:
                q.unacked.pop(token, None)

    def redeliver(self, src: Party, lane: int) -> None:
        q = self._hub.lane(self._key(src, self.ctx.party, lane))
        with q.cond:
            back = sorted(q.unacked.items())
            q.unacked.clear()
            q.ready.extendleft(reversed(back))
            q.cond.notify_all()

    def close(self) -> None:
        self._closed.set()
        for key in self._hub.job_lanes(self.ctx.job_id):
            queue = self._hub.lane(key)
            with queue.cond:
                queue.cond.notify_all()
        with self._lock:
            listeners = dict(self._listeners)
            self._listeners.clear()
        for t in listeners.values():
            if t is not threading.current_thread():
                t.join(timeout=5)
        # as a broker does when a consumer goes away: what was not acked is delivered again
        for src, lane in listeners:
            self.redeliver(src, lane)

    def cleanup(self) -> None:
        self._hub.delete_job(self.ctx.job_id)

    def describe(self) -> str:
        return f"memory hub {self.ctx.options['hub']!r}"

    # operator hooks (fedtransport doctor and cleanup) --------------------------------------

    @classmethod
    def local_broker(cls, options: dict[str, Any], stack: ExitStack) -> str:
        return "in-process hub"

    @classmethod
    def doctor_checks(
        cls, options: Mapping[str, Any], *, routes: RouteTable | None, party: Party | None, timeout: float
    ) -> list[Check]:
        return [Check("broker", "ok", "the memory backend needs no broker")]

    @classmethod
    def probe_options(
        cls, options: Mapping[str, Any], *, routes: RouteTable | None, party: Party | None
    ) -> dict[str, Any]:
        return {**options, "hub": f"doctor-{secrets.token_hex(4)}"}  # a hub no session uses

    def cleanup_target(self) -> str:
        raise ConfigError("the memory backend keeps nothing once its process ends: there is nothing to clean up")
