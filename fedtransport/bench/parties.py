"""The two sides of every repetition, each in a process of its own, and the repetition itself.

:func:`run_pair` spawns a receiver and a sender and takes the clock from them: the sender reports
when it began, the receiver when it held the last byte. Each side may also report the CPU seconds
it spent moving the data (every thread of its process, :func:`time.process_time`): on a loaded
machine a wall-clock ratio is mostly noise, while the CPU a transfer costs barely moves. :func:`fed_sender` and
:func:`fed_receiver` are the fedtransport sides (guest sends to host); what they move is a
registered kind (``object``, ``table``, ``small``, ``small-async`` here). The children are
spawned, not forked, so whatever registers a kind must be imported again in them (``cfg["imports"]``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from .workloads import FED_KINDS, SMALL, SMALL_COUNT, TABLE_ROW, FedKind, MiB, Result, register_fed_kind, table_records

REPORT_DEADLINE = 900.0  # seconds both sides of a repetition have to report, once the sender started
READY_DEADLINE = 120.0  # seconds a raw receiver has to say it is subscribed
FAILED_GRACE = 2.0  # seconds a side has to end by itself once the repetition has failed


def run_pair(sender: Callable[..., None], receiver: Callable[..., None], cfg: dict[str, Any],
             wait_ready: bool) -> Result:  # fmt: skip
    """Run one repetition: receiver and sender in spawned processes; the clock is theirs.

    A side reports ``("start", t[, cpu])`` or ``("end", t, bytes[, cpu])``; the result holds
    ``cpu_sender`` / ``cpu_receiver`` when they were reported, and always ``cpu_processes``:
    the CPU seconds of both processes over their whole lives (start-up and connecting too).
    """
    ctx = mp.get_context("spawn")
    children_cpu = _children_cpu()
    q = ctx.Queue()
    recv = ctx.Process(target=receiver, args=(cfg, q))
    recv.start()
    send = None
    ended = False
    try:
        if wait_ready:
            ready = _next_report(q, cfg, [("receiver", recv)], time.monotonic() + READY_DEADLINE,
                                 lambda: f"the receiver was not ready in {READY_DEADLINE:.0f} s")  # fmt: skip
            if ready[0] != "ready":
                raise RuntimeError(f"the receiver reported {ready[0]!r} before it was ready")
        send = ctx.Process(target=sender, args=(cfg, q))
        send.start()
        got: dict[str, Any] = {}
        sides = [("sender", send), ("receiver", recv)]
        deadline = time.monotonic() + REPORT_DEADLINE

        def overdue() -> str:
            missing = " and ".join(k for k in ("start", "end") if k not in got)
            return f"no {missing} reported in {REPORT_DEADLINE:.0f} s"

        while len(got) < 2:
            item = _next_report(q, cfg, sides, deadline, overdue)
            got[item[0]] = item[1:]
        ended = True
    finally:
        for child in (send, recv):  # every child ends with the repetition, also on failure
            if child is not None:
                # After a failure the survivor waits for a peer that is gone (the receiver's
                # hello alone for 120 s): it is stopped, not waited out.
                child.join(120 if ended else FAILED_GRACE)
                if child.is_alive():
                    child.kill()
                    child.join()
    seconds = got["end"][0] - got["start"][0]
    nbytes = got["end"][1]
    result: Result = {"seconds": round(seconds, 3), "bytes": nbytes, "MB_per_s": round(nbytes / 1e6 / seconds, 1)}
    if len(got["start"]) > 1:
        result["cpu_sender"] = round(got["start"][1], 3)
    if len(got["end"]) > 2:
        result["cpu_receiver"] = round(got["end"][2], 3)
    # Both children were joined above, so their CPU is in RUSAGE_CHILDREN (grandchildren they reaped too).
    result["cpu_processes"] = round(_children_cpu() - children_cpu, 3)
    return result


def _next_report(q: Any, cfg: dict[str, Any], sides: list[tuple[str, Any]], deadline: float,
                 overdue: Callable[[], str]) -> tuple[Any, ...]:  # fmt: skip
    """The next report on ``q``; a RuntimeError as soon as one of ``sides`` died without it (the
    other would wait for it to its own timeout), or saying ``overdue()`` past ``deadline``."""
    while True:
        try:
            return tuple(q.get(timeout=1.0))
        except queue.Empty:
            for who, proc in sides:
                if proc.exitcode not in (None, 0):
                    what = cfg.get("workload") or "the raw client"
                    raise RuntimeError(f"the {who} of {what} died (exit code {proc.exitcode}); "
                                       "its traceback is above") from None  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError(overdue()) from None


def _children_cpu() -> float:
    """User + system seconds of this process's children that have ended and been reaped."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _party(name: str) -> Any:
    import fedtransport as ft

    return ft.Party("guest", "9999") if name == "guest" else ft.Party("host", "10000")


def _connect(cfg: dict[str, Any], who: str) -> Any:
    import fedtransport as ft

    return ft.Federation.connect(
        cfg["backend"], job_id=cfg["job_id"], party=_party(who), route_table=cfg.get("routes"),
        options=cfg["options"][who],
    )  # fmt: skip


def _handshake(fed: Any, me: str) -> None:
    """Both sides connected and subscribed to each other before the clock starts: guest says
    hello and host answers once it has it, so guest (the sender, who starts the clock) knows that
    messages travel both ways. Each direction may start on its own: in RabbitMQ's federated mode
    each has a federation link, and guest's hello once reached host 0.9 s after host's hello had
    reached guest, a delay the clock then counted (3 of 8 repetitions of small-async)."""
    peer = _party("host" if me == "guest" else "guest")
    if me == "guest":
        fed.remote("hello", "sync", "guest", [peer])
        fed.get("sync", "host", [peer], timeout=120)
    else:
        fed.get("sync", "guest", [peer], timeout=120)
        fed.remote("hello", "sync", "host", [peer])


def _kind(cfg: dict[str, Any]) -> FedKind:
    for module in cfg.get("imports", ()):  # extensions register their kinds when imported
        __import__(module)
    try:
        return FED_KINDS[cfg["workload"]]
    except KeyError:
        raise ConfigError(f"benchmark kind {cfg['workload']!r} is not registered; known: {sorted(FED_KINDS)}") from None


def fed_sender(cfg: dict[str, Any], q: Any) -> None:
    kind = _kind(cfg)
    host = _party("host")
    with _connect(cfg, "guest") as fed:
        value = kind.prepare(cfg)
        _handshake(fed, "guest")
        start, cpu = time.time(), time.process_time()
        kind.send(fed, value, cfg, host)
        q.put(("start", start, time.process_time() - cpu))
        fed.get("sync", "done", [host], timeout=600)  # keep our session until the receiver is done
        if cfg.get("cleanup_sender"):
            _bounded_cleanup(fed, cfg, "guest")


def fed_receiver(cfg: dict[str, Any], q: Any) -> None:
    kind = _kind(cfg)
    guest = _party("guest")
    if kind.warm is not None:
        kind.warm(cfg)
    with _connect(cfg, "host") as fed:
        _handshake(fed, "host")
        cpu = time.process_time()
        nbytes = kind.receive(fed, cfg, guest)
        end, cpu = time.time(), time.process_time() - cpu
        fed.remote("bye", "sync", "done", [guest])
        q.put(("end", end, nbytes, cpu))
        if cfg.get("cleanup"):
            _bounded_cleanup(fed, cfg, "host")


CLEANUP_TIMEOUT = 60.0  # seconds a party's cleanup may take before the benchmark moves on without it


def _bounded_cleanup(fed: Any, cfg: dict[str, Any], who: str) -> None:
    """``fed.cleanup()``, after the clock stopped; a failure or a hang is logged, never fatal.

    A forced topic delete on a replicating Pulsar standalone now and then never answers (see
    tests/test_pulsar_replication.py): the measurement is in by then, so it must not wait on that.
    """
    timeout = float(cfg.get("cleanup_timeout", CLEANUP_TIMEOUT))
    bounded_teardown(fed.cleanup, f"{who}'s cleanup of {cfg['job_id']}", timeout)


def bounded_teardown(call: Callable[[], object], what: str, timeout: float) -> None:
    """``call()`` in a thread of its own, given ``timeout`` seconds; a failure or a hang is printed
    to stderr, never raised: teardown runs after the measurement is in."""
    import threading

    failure: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # reported below; the run's result stands
            failure.append(exc)

    worker = threading.Thread(target=run, name="bench-teardown", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        print(f"bench: {what} still running after {timeout} s; left behind", file=sys.stderr, flush=True)
    elif failure:
        print(f"bench: {what} failed: {failure[0]!r}", file=sys.stderr, flush=True)


def _prepare_object(cfg: dict[str, Any]) -> Any:
    import numpy as np

    return np.random.default_rng(0).random(cfg["mib"] * MiB // 8)


def _prepare_table(cfg: dict[str, Any]) -> Any:
    import numpy as np

    import fedtransport as ft

    records = table_records(cfg["mib"], cfg["partitions"])
    # Distinct arrays (rows of one block): a shared row would be pickled once per batch, not once per record.
    block = np.random.default_rng(1).random((max(records), TABLE_ROW // 8))
    return ft.Table.from_partitions([((i, block[i]) for i in range(n)) for n in records])


def _import_numpy(cfg: dict[str, Any]) -> None:
    import numpy  # noqa: F401  (the receiver decodes arrays; the raw client's receiver decodes nothing)


def _send_one(fed: Any, value: Any, cfg: dict[str, Any], dst: Any) -> None:
    from fedtransport.progress import ProgressBar

    fed.remote(value, "data", "0", [dst], progress=ProgressBar(f"  {cfg['workload']}: sent"))


def _receive_one(fed: Any, cfg: dict[str, Any], src: Any) -> int:
    import fedtransport as ft
    from fedtransport.progress import ProgressBar

    [value] = fed.get("data", "0", [src], timeout=600, progress=ProgressBar(f"  {cfg['workload']}: received"))
    if isinstance(value, ft.Table):
        return sum(v.nbytes for p in value.partitions for _, v in p)  # the payload: keys are not counted
    return int(value.nbytes)


def _prepare_small(cfg: dict[str, Any]) -> bytes:
    return os.urandom(SMALL)


def _send_small(fed: Any, payload: bytes, cfg: dict[str, Any], dst: Any) -> None:
    for i in range(SMALL_COUNT):
        fed.remote(payload, "small", str(i), [dst])


def _send_small_async(fed: Any, payload: bytes, cfg: dict[str, Any], dst: Any) -> None:
    import asyncio

    async def all_at_once() -> None:
        await asyncio.gather(*(fed.remote_async(payload, "small", str(i), [dst]) for i in range(SMALL_COUNT)))

    asyncio.run(all_at_once())


def _receive_small(fed: Any, cfg: dict[str, Any], src: Any) -> int:
    for i in range(SMALL_COUNT):
        fed.get("small", str(i), [src], timeout=600)
    return SMALL * SMALL_COUNT


register_fed_kind("object", _prepare_object, _send_one, _receive_one, _import_numpy)
register_fed_kind("table", _prepare_table, _send_one, _receive_one, _import_numpy)
register_fed_kind("small", _prepare_small, _send_small, _receive_small)
register_fed_kind("small-async", _prepare_small, _send_small_async, _receive_small)
