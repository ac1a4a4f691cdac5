"""The executor side of ``fedtransport.spark``: the tasks that send and receive one partition.

Spark runs these functions inside executor tasks, far from the driver: each opens a short
session of its own from the :class:`~fedtransport.spark.SparkFederationConfig` it was given,
on the one broker lane of its partition, and closes it before the task ends.

* :func:`send_partition` streams the task's partition iterator as a one-partition
  :class:`~fedtransport.Table`; to several parties, one thread per party sends it while this
  thread feeds their small bounded queues (``_fan_out``), so the partition is read once and
  never materialised.
* :func:`receive_partition` yields the records of one partition while they arrive; it refuses
  to run outside the ``get`` that owns the transfer (Spark's local property
  ``RECEIVE_PROPERTY``), as a lost cached partition cannot be received a second time.

The driver side (configuration, head sessions, ``remote``/``get``) is in ``fedtransport.spark``.
"""

from __future__ import annotations

import queue
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .api import Federation
from .errors import FederationError, IntegrityError, TransferTimeout
from .party import Party
from .table import Table

if TYPE_CHECKING:
    from .spark import SparkFederationConfig

__all__ = ["RECEIVE_PROPERTY", "TIMEOUT_PROPERTY", "Record", "partition_tag", "receive_partition", "send_partition"]

#: Spark local property naming the gets being materialised (tokens): only their tasks may receive
RECEIVE_PROPERTY = "fedtransport.spark.receive"
#: ... and the timeout of that get: a retry reuses the failed call's RDDs, whose tasks were made
#: with the failed call's timeout, and must wait as long as the retry says.
TIMEOUT_PROPERTY = "fedtransport.spark.timeout"
_FANOUT_CHUNK = 64  # records per hand-off between a task's source iterator and its per-party streams
_FANOUT_DEPTH = 4  # chunks queued per party before the source waits for the slowest party
_PUT_TICK = 0.2  # seconds between checks that a party's stream is still alive

Record = tuple[Any, Any]


def partition_tag(tag: str, index: int) -> str:
    """The tag of partition ``index`` of a Spark transfer."""
    return f"{tag}#spark-{index}"


# --- sending -----------------------------------------------------------------------------------


class _Source:
    """The task's partition iterator: counts records and keeps the exception it raised."""

    def __init__(self, it: Iterable[Record]) -> None:
        self._it = iter(it)
        self.count = 0
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[Record]:
        return self

    def __next__(self) -> Record:
        try:
            rec = next(self._it)
        except StopIteration:
            raise
        except BaseException as exc:
            self.error = exc
            raise
        self.count += 1
        return rec


def send_partition(
    conf: SparkFederationConfig, name: str, tag: str, dsts: tuple[Party, ...], index: int, it: Iterable[Record]
) -> Iterator[tuple[int, int, int, int]]:
    """Executor task: stream partition ``index`` to every destination on lane ``lane_base + index``."""
    source = _Source(it)
    ptag = partition_tag(tag, index)
    # Closed, never aborted, on failure (no ``with``, whose exit would abort): Spark retries a
    # failed task, and the receivers must keep waiting for the retry's partition.
    fed = conf.connect(conf.task_session_options(conf.lane_base + index))
    try:
        if len(dsts) == 1:
            fed.remote(Table([source]), name, ptag, list(dsts))
        else:
            _fan_out(fed, source, name, ptag, dsts)
        stats = fed.stats
    except BaseException as exc:
        if source.error is not None and source.error is not exc:
            raise source.error from exc  # the RDD's own failure, not a transport one
        raise
    finally:
        fed.close()
    yield index, source.count, stats["bytes_sent"], stats["messages_sent"]


_END = object()


class _Abort(Exception):
    pass


def _fan_out(fed: Federation, source: Iterator[Record], name: str, tag: str, dsts: tuple[Party, ...]) -> None:
    """Send one record stream to several parties without materialising it.

    One ``remote`` per party runs on its own thread, reading from a small bounded queue; this
    thread reads the source once and hands each chunk of records to every queue, so the source
    advances at the pace of the slowest party and memory stays at a few chunks per party.
    """
    queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=_FANOUT_DEPTH) for _ in dsts]

    def stream(q: queue.Queue[Any]) -> Iterator[Record]:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item

    def put(q: queue.Queue[Any], fut: Future[None], item: Any) -> bool:
        while not fut.done():
            try:
                q.put(item, timeout=_PUT_TICK)
                return True
            except queue.Full:
                continue
        return False

    abort = FederationError(
        f"sending {name!r}/{tag!r}: the stream was abandoned (another party's, or the source, failed)"
    )
    failed: BaseException | None = None
    with ThreadPoolExecutor(len(dsts), thread_name_prefix="ft-spark-fanout") as pool:
        futures = [
            pool.submit(fed.remote, Table([stream(q)]), name, tag, [dst]) for q, dst in zip(queues, dsts, strict=True)
        ]
        try:
            chunk: list[Record] = []
            for rec in source:
                chunk.append(rec)
                if len(chunk) == _FANOUT_CHUNK:
                    for q, fut in zip(queues, futures, strict=True):
                        if not put(q, fut, chunk):
                            raise _Abort
                    chunk = []
            for q, fut in zip(queues, futures, strict=True):
                if (chunk and not put(q, fut, chunk)) or not put(q, fut, _END):
                    raise _Abort
        except BaseException as exc:
            failed = exc
            for q, fut in zip(queues, futures, strict=True):  # the other streams end with an error, not silently
                put(q, fut, abort)
    if failed is not None and not isinstance(failed, _Abort):
        raise failed
    for fut in futures:  # the first real failure: the others may just have been abandoned because of it
        error = fut.exception()
        if error is not None and error is not abort:
            raise error
    for fut in futures:
        error = fut.exception()
        if error is not None:
            raise error


# --- receiving ---------------------------------------------------------------------------------


def receive_partition(
    conf: SparkFederationConfig,
    name: str,
    tag: str,
    src: Party,
    lane_base: int,
    token: str | None,
    timeout: float | None,
    index: int,
    _unused: Iterable[Any],
) -> Iterator[Record]:
    """Executor task: receive partition ``index`` from ``src`` and yield its records."""
    if token is not None:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if ctx is None or token not in (ctx.getLocalProperty(RECEIVE_PROPERTY) or "").split(","):
            raise FederationError(
                f"partition {index} of Spark transfer {name!r}/{tag!r} from {src} was received and cached "
                f"by get() already, and its cached copy is gone (executor lost, or the RDD unpersisted); "
                f"a transfer can be received only once. Persist with a replicated storage level or "
                f"checkpoint() the RDD if executors may be lost."
            )
        wanted = ctx.getLocalProperty(TIMEOUT_PROPERTY)  # the get() running now, maybe a retry
        if wanted:
            timeout = None if wanted == "none" else float(wanted)
    what = f"partition {index} of Spark transfer {name!r}/{tag!r} from {src}"
    fed = conf.connect(conf.task_session_options(lane_base + index))
    try:
        try:
            [table] = fed.get(name, partition_tag(tag, index), [src], timeout=timeout)
            if not isinstance(table, Table) or table.num_partitions != 1:
                raise IntegrityError(f"{what} is not a one-partition table")
            # Records stream while the partition arrives; the transfer is acknowledged once read
            # to the end, so a task that dies before that leaves it on the broker for its retry.
            yield from table.iter_partition(0)
        except TransferTimeout as exc:
            hint = "" if token is not None else " (if this RDD was evaluated before, that evaluation consumed it)"
            raise TransferTimeout(f"{what}: {exc}{hint}", exc.missing) from exc
    finally:
        fed.close()  # before the table is released: a partition read only in part stays unacknowledged
