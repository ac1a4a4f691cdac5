"""The workload registry: what a benchmark run can measure, and which of it runs now.

A workload is a name, a factory and the raw baseline its ratio is taken to. The factory gets a
:class:`BenchContext` (the parsed flags, the backend, the started brokers and the ``raw`` /
``fed`` helpers of :mod:`.contexts`) and returns ``go(i)``, one repetition, or ``None`` when the
workload does not apply to the backend. ``FED_KINDS`` holds the fedtransport sender/receiver pairs
that ``ctx.fed(kind)`` runs (:mod:`.parties` registers the built-in ones), and ``_ARGUMENT_HOOKS``
the extra command-line flags. The built-in workloads are registered at the end of this module, in
the order they run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

MiB = 1 << 20
RAW_MESSAGE = 4 * MiB
TABLE_ROW = 4096  # bytes of the float64 array in each record of a table workload
SMALL = 1024
SMALL_COUNT = 1000

Result = dict[str, float]
Go = Callable[[int], Result]


@dataclass
class BenchContext:
    """What a workload factory gets: the run's arguments, backend and broker helpers."""

    args: argparse.Namespace
    backend: str
    stack: ExitStack
    #: ``raw(count, size, sync)`` -> a raw-client workload on this backend's broker
    raw: Callable[[int, int, bool], Go]
    #: ``fed(kind, **cfg)`` -> a fedtransport sender/receiver workload of a registered kind
    fed: Callable[..., Go]
    #: backend specifics: ``service_url``, ``admin_url``, ``kind`` (pulsar; ``replication`` with
    #: ``--replication``) or ``nodes`` / ``routes`` / ``options`` (rabbitmq)
    broker: dict[str, Any] = field(default_factory=dict)
    #: ``pids()`` -> the processes of the brokers started so far, waited on to go quiet (:mod:`.settle`)
    pids: Callable[[], list[int]] | None = None
    #: ``logs()`` -> the log files of the brokers started so far, whose tails a failed run reports
    logs: Callable[[], list[Path]] | None = None


@dataclass(frozen=True)
class Workload:
    """A registered workload (see :func:`register_workload`)."""

    factory: Callable[[BenchContext], Go | None]
    baseline: str | None
    default: bool
    flag: str | None = None  # the argparse dest that turns a default=False workload on


@dataclass(frozen=True)
class FedKind:
    """A fedtransport sender/receiver pair (see :func:`register_fed_kind`)."""

    prepare: Callable[[dict[str, Any]], Any]  # builds the value before the clock starts
    send: Callable[[Any, Any, dict[str, Any], Any], None]  # (fed, value, cfg, dst)
    receive: Callable[[Any, dict[str, Any], Any], int]  # (fed, cfg, src) -> bytes received
    # Run by the receiver before the clock: a job's process has its decoder's modules (numpy)
    # loaded long before a value arrives, while a benchmark party is a fresh process.
    warm: Callable[[dict[str, Any]], None] | None = None


WORKLOADS: dict[str, Workload] = {}
FED_KINDS: dict[str, FedKind] = {}
_ARGUMENT_HOOKS: list[Callable[[argparse.ArgumentParser], None]] = []


def register_workload(
    name: str,
    factory: Callable[[BenchContext], Go | None],
    *,
    baseline: str | None = None,
    default: bool = True,
    flag: str | None = None,
) -> None:
    """Add (or replace) workload ``name``; ``baseline`` names the raw workload its ratio is to.

    A ``default=False`` workload runs when named in ``--only``, or when the flag whose argparse
    dest is ``flag`` (default: the name with ``-`` as ``_``) is set.
    """
    WORKLOADS[name] = Workload(factory, baseline, default, flag)


def register_fed_kind(
    kind: str,
    prepare: Callable[[dict[str, Any]], Any],
    send: Callable[[Any, Any, dict[str, Any], Any], None],
    receive: Callable[[Any, dict[str, Any], Any], int],
    warm: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Add a fedtransport sender/receiver pair usable as ``ctx.fed(kind, ...)``; ``warm(cfg)``, if
    given, runs in the receiving process before the clock starts (imports the value's decoder needs)."""
    FED_KINDS[kind] = FedKind(prepare, send, receive, warm)


def register_arguments(hook: Callable[[argparse.ArgumentParser], None]) -> None:
    """``hook(parser)`` adds command-line flags for an extra workload."""
    if hook not in _ARGUMENT_HOOKS:
        _ARGUMENT_HOOKS.append(hook)


def table_records(mib: int, partitions: int) -> list[int]:
    """Records per partition of a table workload of ``mib`` MiB in all (4 KiB arrays, spread evenly).

    The rows' array bytes add up to exactly ``mib`` MiB, the bytes of the raw baseline.
    """
    if mib < 1 or partitions < 1:
        raise ConfigError(f"a table workload needs at least 1 MiB and 1 partition, got {mib} MiB, {partitions}")
    per, extra = divmod(mib * MiB // TABLE_ROW, partitions)
    return [per + 1 if p < extra else per for p in range(partitions)]


def raw_messages(mib: int) -> tuple[int, int]:
    """(count, size) of the raw-large messages: ``mib`` MiB exactly, each message at most 4 MiB."""
    total = mib * MiB
    count = -(-total // RAW_MESSAGE)
    while total % count:  # ends at the latest with 1 MiB messages (count == mib)
        count += 1
    return count, total // count


# The built-in workloads, in the order they run.
register_workload("raw-large", lambda c: c.raw(*raw_messages(c.args.mib), False))
register_workload("object", lambda c: c.fed("object"), baseline="raw-large")
register_workload("table", lambda c: c.fed("table", partitions=8), baseline="raw-large")
register_workload("raw-small", lambda c: c.raw(SMALL_COUNT, SMALL, True))
register_workload("small", lambda c: c.fed("small"), baseline="raw-small")
register_workload("small-async", lambda c: c.fed("small-async"), baseline="raw-small")


def _repl(make: Callable[[BenchContext, dict[str, Any]], Go]) -> Callable[[BenchContext], Go | None]:
    """A replication workload: Pulsar only (``None`` elsewhere)."""
    return lambda c: make(c, c.broker["replication"]) if "replication" in c.broker else None


# Off unless named in --only or asked for with --replication.
register_workload("raw-repl", _repl(lambda c, r: r["raw"](*raw_messages(c.args.mib))), default=False,
                  flag="replication")  # fmt: skip
register_workload("object-repl", _repl(lambda c, r: r["fed"]("object")), baseline="raw-repl", default=False,
                  flag="replication")  # fmt: skip
register_workload("table-repl", _repl(lambda c, r: r["fed"]("table", partitions=8)), baseline="raw-repl",
                  default=False, flag="replication")  # fmt: skip


def selected(ctx: BenchContext) -> dict[str, tuple[Go, str | None]]:
    """The workloads to run now: defaults, --only names, --partitions scaling runs."""
    only = set(ctx.args.only or ())
    unknown = only - set(WORKLOADS) - {f"table-{n}" for n in ctx.args.partitions}
    if unknown:
        raise ConfigError(f"unknown workload(s) {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
    suite: dict[str, tuple[Go, str | None]] = {}
    for name, w in WORKLOADS.items():
        flag = w.flag or name.replace("-", "_")
        wanted = name in only if only else (w.default or getattr(ctx.args, flag, False))
        if not wanted:
            continue
        go = w.factory(ctx)
        if go is not None:
            suite[name] = (go, w.baseline)
    for n in ctx.args.partitions:
        name = f"table-{n}"
        if not only or name in only:
            suite[name] = (ctx.fed("table", partitions=n), "raw-large")
    return suite
