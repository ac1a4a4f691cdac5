"""Spark integration: RDDs cross parties partition by partition, inside the executors.

Install with ``pip install 'fedtransport[spark]'`` (pyspark; Spark itself needs Java 17+).

::

    import fedtransport as ft
    from fedtransport import spark as fts

    conf = fts.SparkFederationConfig("pulsar", job_id="job-1", party=ft.Party("guest", "9999"),
                                     options={"service_url": "pulsar://10.0.0.5:6650"})
    fts.remote(rdd, "x", "iter-0", [host], conf)                 # on guest's driver
    [rdd] = fts.get(sc, "x", "iter-0", [guest], host_conf)       # on host's driver: an RDD

Features
    * ``remote(rdd, ...)`` sends every partition from the executor task that computes it
      (``mapPartitionsWithIndex``): the task streams its partition iterator as a one-partition
      :class:`~fedtransport.Table`, so neither the driver nor the task materialises it. To
      several parties, one task feeds one stream per party through small bounded queues.
    * ``get(sc, ...)`` returns one RDD per party, in party order, with the sender's partition
      count; task ``p`` receives partition ``p`` inside its executor and yields its records.
      By default the RDDs are persisted (``MEMORY_AND_DISK``) and received at once, like
      ``Federation.get``; ``materialize=False`` receives lazily, on first evaluation.
    * The driver moves only a small *head* per transfer (partition count, lane base), on a
      session of its own that lives until :func:`close` (or interpreter exit).
    * Connection settings travel to the executors as :class:`SparkFederationConfig`, a plain
      picklable frozen dataclass; each task opens its own short session with it.
    * Lanes: partition ``p`` travels on lane ``lane_base + p`` (its own topic or queue per
      ordered pair of parties), reused by every Spark transfer of the job: a job uses at most
      ``parties x (parties - 1) x max partitions`` partition lanes, however many variables
      it exchanges. Heads use lane ``HEAD_LANE`` (256). Ordinary sessions use lanes below
      256, so Spark traffic never mixes with theirs. The sender's ``lane_base`` travels in the
      head; the receiver needs no matching setting.
    * Re-evaluation: a transfer can be received once. A persisted RDD whose cached partition
      is lost would have to receive it again; its task raises :class:`FederationError` saying
      so instead of waiting for data that is gone. Use a replicated storage level or
      ``checkpoint()`` where executors come and go.
    * Errors raised in executors reach the driver as the same ``FederationError`` subclass
      (the message is kept; ``TransferTimeout.missing`` is not).

Configuration (:class:`SparkFederationConfig`) and defaults
    ``backend``      ``"pulsar"`` | ``"rabbitmq"`` | a registered backend reachable from every
                     executor (``"memory"`` is refused: it cannot cross processes)
    ``job_id``       as for ``Federation.connect``
    ``party``        this party, a ``Party`` or ``(role, party_id)``
    ``route_table``  ``None``, a mapping (travels with the config) or a path (must be
                     readable on every executor)
    ``options``      ``{}``: backend options as for ``Federation.connect``. Pulsar needs
                     ``service_url``: an embedded broker per executor would be useless.
                     ``lanes`` and ``lane_offset`` are set per session and refused here.
    ``lane_base``    ``1024``: first partition lane, at least 257
    ``task_options`` ``None``: options overriding ``options`` in executor sessions only.

Function arguments and defaults
    ``remote(rdd, name, tag, parties, conf)``
    ``get(sc, name, tag, parties, conf, timeout=None, storage_level="MEMORY_AND_DISK",
    materialize=True)``: ``timeout`` bounds the wait for the head in the driver and, in each
    task, every wait for more of its partition (records stream as they arrive);
    ``storage_level`` is a ``pyspark.StorageLevel`` or its name, ``None`` for no persistence
    (only with ``materialize=False``).

Caveats (docs/spark.md has the details)
    * Spark gets of the same job from the same party must not be *evaluated* at the same time:
      their tasks would share lanes and each could hold messages the other waits for. Eager
      gets in one driver process are serialised for you; lazy ones are your responsibility.
    * Sent RDDs must be deterministic (or persisted), as Spark's own retries assume: a retried
      task re-sends its partition, and the receiver drops what it already has by position.
    * Keep ``spark.speculation`` off: two attempts of one task would share a lane.

This module is the driver side; what runs inside the executor tasks is in
``fedtransport.spark_tasks``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import pickle
import re
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import errors
from .api import Federation
from .claims import ClaimBook, Key
from .errors import ConfigError, FederationError, IntegrityError
from .options import split_options
from .party import Party, as_parties, as_party, check_job_id, check_timeout, key_part
from .routing import RouteTable
from .spark_tasks import RECEIVE_PROPERTY, TIMEOUT_PROPERTY, Record, partition_tag, receive_partition, send_partition
from .transport import get_backend

if TYPE_CHECKING:
    from pyspark import RDD, SparkContext, StorageLevel

__all__ = [
    "DEFAULT_LANE_BASE",
    "HEAD_LANE",
    "SentSummary",
    "SparkFederationConfig",
    "cleanup",
    "close",
    "get",
    "head_tag",
    "partition_tag",
    "remote",
]

#: first partition lane unless the config says otherwise
DEFAULT_LANE_BASE = 1024
#: the lane heads travel on; ordinary sessions have at most 256 lanes (0..255)
HEAD_LANE = 256
_RESERVED_OPTIONS = ("lanes", "lane_offset")
_HEAD_FORMAT = 1

RouteSpec = str | Mapping[str, Any] | None


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SparkFederationConfig:
    """Everything an executor task needs to open its own session: plain, picklable data."""

    backend: str
    job_id: str
    party: Party
    route_table: RouteSpec = None
    options: Mapping[str, Any] = field(default_factory=dict)
    lane_base: int = DEFAULT_LANE_BASE
    task_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or self.backend == "memory":
            raise ConfigError(
                f"backend {self.backend!r} cannot serve Spark executors: use a broker every executor reaches"
            )
        check_job_id(self.job_id)
        object.__setattr__(self, "party", as_party(self.party))
        route = self.route_table
        if isinstance(route, Path):
            route = str(route)
        if route is not None and not isinstance(route, (str, Mapping)):
            raise ConfigError(f"route_table must be a path, a mapping or None, got {type(route).__name__}")
        if isinstance(route, Mapping):
            route = dict(route)
        object.__setattr__(self, "route_table", route)
        for what in ("options", "task_options"):
            value = getattr(self, what)
            if value is None and what == "task_options":
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{what} must be a mapping, got {type(value).__name__}")
            reserved = sorted(set(value) & set(_RESERVED_OPTIONS))
            if reserved:
                raise ConfigError(f"{what} may not set {reserved}: fedtransport.spark gives each session its lanes")
            object.__setattr__(self, what, {k: value[k] for k in sorted(value)})
        lb = self.lane_base
        if isinstance(lb, bool) or not isinstance(lb, int) or not HEAD_LANE < lb <= 1 << 29:
            raise ConfigError(f"lane_base must be an integer in [{HEAD_LANE + 1}, {1 << 29}], got {lb!r}")
        # Fail here, on the driver, rather than in every task.
        transport_cls = get_backend(self.backend)
        split_options(self.task_session_options(0), self.backend, transport_cls.option_defaults)
        if self.backend == "pulsar" and not self.options.get("service_url"):
            raise ConfigError("Spark over Pulsar needs options['service_url']: executors must share one broker")
        if route is not None:
            RouteTable.load(route, kind=transport_cls.route_kind)

    __hash__ = None  # type: ignore[assignment]  # holds mappings

    def driver_session_options(self) -> dict[str, Any]:
        """Options of the driver's head session: one lane, ``HEAD_LANE``."""
        return {**self.options, "lanes": 1, "lane_offset": HEAD_LANE}

    def task_session_options(self, lane: int) -> dict[str, Any]:
        """Options of an executor task's session, whose only lane is broker lane ``lane``.

        A task's session may read its lane past its own transfer (the queue is shared by every
        Spark transfer of the job): what it holds of other transfers stays unacknowledged, and
        closing the session hands it back to the broker for its own task.
        """
        opts = dict(self.options)
        opts.update(self.task_options or {})
        return {**opts, "lanes": 1, "lane_offset": lane}

    def connect(self, options: Mapping[str, Any]) -> Federation:
        return Federation.connect(
            self.backend, job_id=self.job_id, party=self.party, route_table=self.route_table, options=options
        )

    def _session_key(self) -> tuple[str, str, Party]:
        return (self.backend, self.job_id, self.party)

    def _session_settings(self) -> bytes:
        return pickle.dumps((self.route_table, self.options), protocol=5)


@dataclass(frozen=True)
class SentSummary:
    """What a Spark ``remote`` moved, summed over its tasks (``bytes`` counts every party)."""

    partitions: int
    records: int
    bytes: int
    messages: int


# --- the driver's head sessions --------------------------------------------------------------


@dataclass
class _Pending:
    """A receiving RDD made by a get that has not completed yet."""

    rdd: RDD[Record]
    token: str | None  # the local property value its tasks accept; None: lazy, no check
    source_lock: threading.Lock  # serialises materialising jobs that use the same source's lanes


class _DriverSession:
    def __init__(self, fed: Federation, settings: bytes) -> None:
        self.fed = fed
        self.settings = settings
        self.lock = threading.Lock()  # guards the heads, pending RDDs and source locks below
        self.heads_sent: set[Key] = set()  # heads of remotes, also of failed ones (a retry skips them)
        self.sent = ClaimBook("Spark remote(name={name!r}, tag={tag!r}) was already sent to {parties}")
        self.got = ClaimBook("Spark get(name={name!r}, tag={tag!r}) from {parties} was already done")
        self.pending: dict[Key, _Pending] = {}  # RDDs of failed gets, for their retry
        self.source_locks: dict[Party, threading.Lock] = {}

    def source_lock(self, src: Party) -> threading.Lock:
        with self.lock:
            return self.source_locks.setdefault(src, threading.Lock())


# One head session per (backend, job, party) and process: two would compete for the head lane.
_sessions: dict[tuple[str, str, Party], _DriverSession] = {}
_sessions_lock = threading.Lock()


def _driver(conf: SparkFederationConfig) -> _DriverSession:
    key, settings = conf._session_key(), conf._session_settings()
    with _sessions_lock:
        session = _sessions.get(key)
        if session is not None and not session.fed.closed:
            if session.settings != settings:
                raise ConfigError(
                    f"job {conf.job_id}: a Spark head session of {conf.party} is open with other options or "
                    f"routes; fedtransport.spark.close() it first (two would compete for the head lane)"
                )
            return session
        session = _DriverSession(conf.connect(conf.driver_session_options()), settings)
        _sessions[key] = session
        return session


def close(conf: SparkFederationConfig | None = None) -> None:
    """Close the driver's head session of ``conf`` (of every config when ``None``); idempotent.

    Broker resources stay: see :func:`cleanup`. Also runs at interpreter exit.
    """
    with _sessions_lock:
        if conf is None:
            doomed = list(_sessions.values())
            _sessions.clear()
        else:
            one = _sessions.pop(conf._session_key(), None)
            doomed = [one] if one is not None else []
    for session in doomed:
        session.fed.close()


def cleanup(conf: SparkFederationConfig) -> None:
    """Close the head session and delete the job's broker resources, as ``Federation.cleanup``.

    Whatever the backend's cleanup reaches goes: the RabbitMQ vhost with every queue in it; the
    Pulsar namespace when ``admin_url`` is set (without it, only the head lane's subscription
    is dropped and the partition topics expire with the broker's retention).
    """
    session = _driver(conf)
    close(conf)
    session.fed.cleanup()


atexit.register(close)


# --- helpers -------------------------------------------------------------------------------------


def head_tag(tag: str) -> str:
    """The tag of a Spark transfer's head (the suffix ``#spark`` is reserved)."""
    return f"{tag}#spark"


_REMOTE_ERROR = re.compile(r"fedtransport\.errors\.(\w+): (.*)")


def _translate(exc: BaseException, what: str) -> BaseException:
    """An executor's FederationError, as Spark reports it to the driver, raised again as itself."""
    found = _REMOTE_ERROR.findall(str(exc))
    if not found:
        return exc
    name, message = found[-1]
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, FederationError)):
        return exc
    try:
        return cls(f"{what}: {message}")
    except TypeError:
        return FederationError(f"{what}: {name}: {message}")


def _storage_level(level: Any) -> StorageLevel:
    from pyspark import StorageLevel

    if isinstance(level, StorageLevel):
        return level
    if isinstance(level, str) and isinstance(getattr(StorageLevel, level, None), StorageLevel):
        named: StorageLevel = getattr(StorageLevel, level)
        return named
    raise ConfigError(f"storage_level must be a pyspark.StorageLevel or its name, got {level!r}")


# --- sending -----------------------------------------------------------------------------------


def remote(
    rdd: RDD[Record], name: str, tag: str, parties: Party | Sequence[Party], conf: SparkFederationConfig
) -> SentSummary:
    """Send ``rdd`` (of ``(key, value)`` records) to each of ``parties``, partition by partition.

    The head goes first, so receivers start while the partitions are still being sent; the
    partitions are sent by the executor tasks that compute them. Returns once the broker has
    accepted every message. Sending the same ``(name, tag)`` to a party twice raises
    :class:`DuplicateTransfer`; after a failure the same call may be retried.
    """
    name, tag = key_part("name", name), key_part("tag", tag)
    dsts = as_parties(parties)
    session = _driver(conf)
    with session.sent.claimed(name, tag, dsts):  # released if this call fails: it may be retried
        n = rdd.getNumPartitions()
        head = {"format": _HEAD_FORMAT, "partitions": n, "lane_base": conf.lane_base}
        with session.lock:
            fresh = [p for p in dsts if (name, tag, p) not in session.heads_sent]  # a retry sent them already
        if fresh:
            session.fed.remote(head, name, head_tag(tag), fresh)
            with session.lock:
                session.heads_sent.update((name, tag, p) for p in fresh)
        task = functools.partial(send_partition, conf, name, tag, tuple(dsts))
        try:
            stats = rdd.mapPartitionsWithIndex(task).collect()
        except Exception as exc:
            raise _translate(exc, f"Spark remote(name={name!r}, tag={tag!r}) failed in an executor") from exc
    return SentSummary(
        partitions=n,
        records=sum(s[1] for s in stats),
        bytes=sum(s[2] for s in stats),
        messages=sum(s[3] for s in stats),
    )


# --- receiving ---------------------------------------------------------------------------------


def get(
    sc: SparkContext,
    name: str,
    tag: str,
    parties: Party | Sequence[Party],
    conf: SparkFederationConfig,
    timeout: float | None = None,
    storage_level: Any = "MEMORY_AND_DISK",
    materialize: bool = True,
) -> list[RDD[Record]]:
    """Receive ``(name, tag)`` from each of ``parties`` as RDDs, in party order.

    Each RDD has the sender's partition count; its task ``p`` receives partition ``p`` inside
    the executor. With ``materialize`` (the default), the RDDs are persisted at
    ``storage_level`` and received now, as ``Federation.get`` does; a task that later has to
    recompute a lost partition raises :class:`FederationError` (the transfer was consumed).
    With ``materialize=False`` nothing is received until the RDD is first evaluated; evaluate
    it once (or persist it): a second evaluation finds the transfer gone and its tasks fail
    after ``timeout`` (or wait for ever without one).
    """
    name, tag = key_part("name", name), key_part("tag", tag)
    srcs = as_parties(parties)
    timeout = check_timeout(timeout)
    if timeout == 0:  # the executors' tasks would give up before a partition could arrive
        raise ConfigError("timeout must be a positive number of seconds or None, got 0")
    level = None if storage_level is None else _storage_level(storage_level)
    if materialize and level is None:
        raise ConfigError("materialize=True needs a storage_level: the received partitions must be kept somewhere")
    session = _driver(conf)
    with session.got.claimed(name, tag, srcs) as keys:  # in progress: released again if this call fails
        # A retry after a failure reuses the RDDs (and the heads) of the failed call: partitions
        # it received are in Spark's cache, the others are still on the broker.
        with session.lock:
            need = [p for p in srcs if (name, tag, p) not in session.pending]
        if need:
            heads = session.fed.get(name, head_tag(tag), need, timeout=timeout)
            for src, head in zip(need, heads, strict=True):
                n, lane_base = _check_head(head, name, tag, src)
                token = uuid.uuid4().hex if materialize else None
                task = functools.partial(receive_partition, conf, name, tag, src, lane_base, token, timeout)
                rdd = (sc.parallelize(range(n), n) if n else sc.emptyRDD()).mapPartitionsWithIndex(task)
                rdd.setName(f"fedtransport {name}/{tag} from {src}")
                if level is not None:
                    rdd.persist(level)
                entry = _Pending(rdd, token, session.source_lock(src))
                with session.lock:
                    session.pending[(name, tag, src)] = entry
        with session.lock:
            pending = [session.pending[k] for k in keys]
        if materialize:
            _materialize(sc, pending, name, tag, timeout)
    with session.lock:
        for k in keys:
            session.pending.pop(k, None)
    return [p.rdd for p in pending]


def _check_head(head: Any, name: str, tag: str, src: Party) -> tuple[int, int]:
    ok = (
        isinstance(head, dict)
        and head.get("format") == _HEAD_FORMAT
        and all(isinstance(head.get(k), int) and not isinstance(head.get(k), bool) for k in ("partitions", "lane_base"))
        and head["partitions"] >= 0
        and head["lane_base"] > HEAD_LANE
    )
    if not ok:
        raise IntegrityError(f"the head of Spark transfer {name!r}/{tag!r} from {src} is malformed: {head!r}")
    return head["partitions"], head["lane_base"]


def _materialize(sc: SparkContext, pending: list[_Pending], name: str, tag: str, timeout: float | None) -> None:
    """Receive every partition now, in one Spark job, tagged so that only this job may receive."""
    tokens = [p.token for p in pending if p.token is not None]
    with contextlib.ExitStack() as stack:
        # Two gets from one party evaluated at once would share its lanes: one at a time.
        for lock in sorted({id(p.source_lock): p.source_lock for p in pending}.values(), key=id):
            stack.enter_context(lock)
        previous = sc.getLocalProperty(RECEIVE_PROPERTY), sc.getLocalProperty(TIMEOUT_PROPERTY)
        sc.setLocalProperty(RECEIVE_PROPERTY, ",".join(tokens))
        sc.setLocalProperty(TIMEOUT_PROPERTY, "none" if timeout is None else repr(float(timeout)))
        try:
            rdds = [p.rdd for p in pending]
            (rdds[0] if len(rdds) == 1 else sc.union(rdds)).count()
        except Exception as exc:
            raise _translate(exc, f"Spark get(name={name!r}, tag={tag!r}) failed in an executor") from exc
        finally:
            sc.setLocalProperty(RECEIVE_PROPERTY, previous[0])  # type: ignore[arg-type]  # None removes it
            sc.setLocalProperty(TIMEOUT_PROPERTY, previous[1])  # type: ignore[arg-type]
