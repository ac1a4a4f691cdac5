"""End-to-end throughput: raw broker client vs fedtransport, sender and receiver in separate processes.

    fedtransport bench --backend pulsar [--broker standalone|embedded] [--mib 256] [--repeat 3]
                       [--replication] [--json FILE] [--chart FILE.png]
    fedtransport bench --backend rabbitmq [--mode shared|federated]
    fedtransport bench --chart docs/benchmarks.png --from-json benchmarks/results/throughput-*.json

(``python benchmarks/throughput.py`` takes the same flags.) All workloads of one run use the
brokers started for it, so the ratios compare like with like on the same machine at the same
time. ``--broker`` picks the Pulsar broker: ``standalone`` (the default) is the real Apache
Pulsar broker in standalone mode (``fedtransport.brokers.PulsarStandalone``), ``embedded`` is
pulsar-lite (``EmbeddedPulsar``). RabbitMQ runs on throw-away local nodes.

  raw-large    the raw client: --mib MiB (default 256) in messages of at most 4 MiB,
               producer -> consumer (the ceiling)
  object       fedtransport remote -> get of a float64 array of --mib MiB
  table        a table of 8 partitions, --mib MiB in all (records of an int key and a 4 KiB array)
  table-N      the same table in N partitions (--partitions N ...)
  raw-small    the raw client: 1000 messages of 1 KiB, each sent and confirmed before the next
  small        1000 objects of 1 KiB, each remote() returning before the next, then 1000 gets
  small-async  the same 1000 objects with remote_async, all in flight together

With ``--replication`` (Pulsar only; two more standalone brokers, ~1 GiB of RAM), geo-replication
between two clusters, fl-pulsar-9999 (A) and fl-pulsar-10000 (B), registered with each other:

  raw-repl     the raw client: producer on A, every message with replication_clusters=[B],
               consumer on B; --mib MiB in messages of at most 4 MiB
  object-repl  the object workload in ``mode: replication``: guest connected to A, host to B
  table-repl   the table workload (8 partitions) in the same way

With ``--fate`` (pyfate 2.2; the real Pulsar broker or a shared RabbitMQ node), the FATE 2.2 side
by side runs alone (``--only`` picks among it): two processes with FATE ``Context``s exchange 8
objects of 4 MiB, tables of 8 x 4 MiB and of --mib MiB (8 partitions, 4 KiB records) and 1000
objects of 1 KiB, once over FATE's own federation for the broker (fate-native-*) and once over
fedtransport (fate-ft-*); each fate-ft-* ratio is to its fate-native-* run (fedtransport/bench/fate.py).

--mib sizes every large workload, so each one moves exactly the bytes of its raw baseline and
its ratio compares equal transfers. A workload's ``bytes`` is its payload as received: the
array's bytes for ``object``, the rows' array bytes for a table (its int keys are not counted,
as the raw client has nothing that matches them).

Timing starts when the sender begins (both sides connected and subscribed; in replication, the
broker's replicator to B exists) and ends when the receiver holds the last byte. Each workload
runs --repeat times, interleaved with its raw baseline repetition by repetition (raw-large 1,
object 1, table 1, raw-large 2, ...), so every fedtransport run has a raw run next to it in
time. Each run, warm-ups too, starts once the run's brokers use under 0.15 of a core
(``--settle``, fedtransport/bench/settle.py): a broker still deleting what the previous run's
clean-up removed would otherwise slow the next run. Each run records ``settle_seconds`` and
``settle_broker_cpu``. Reported, never the best alone:

  * per workload: every run, the ``median`` (of the rates) and the ``worst`` run
    (lowest MB/s); ``best`` is kept in the JSON as well;
  * per ratio to the baseline: the ratio of the medians, and the ``worst`` of the
    per-repetition ratios fed_i / raw_i (all of them under ``per_repeat``).
  * CPU: the seconds each side's process spent on the transfer (``cpu_sender``,
    ``cpu_receiver``) and both processes' whole lives (``cpu_processes``), with a ``cpu``
    block per ratio: fed's CPU per byte over raw's (median, worst = highest, per repetition).

The chart draws the median as the bar and the worst run as a whisker below it; each
fedtransport bar is labelled with its median ratio and its worst per-repetition ratio.
Result files written before this (only ``best`` and ``runs``) are charted from their runs.

Extending (e.g. a Spark workload from benchmarks/throughput.py or another module):

  * ``register_workload(name, factory, baseline=..., default=...)``: ``factory(ctx)`` gets a
    :class:`BenchContext` (the parsed args, the backend, the started broker(s) and two helpers,
    ``ctx.raw(count, size, sync)`` and ``ctx.fed(kind, **cfg)``) and returns the function that
    runs one repetition and returns ``{"seconds", "bytes", "MB_per_s"}``, or ``None`` when the
    workload does not apply to this backend. ``default=False`` workloads run only when named
    with ``--only`` or when a flag of the same name is set (``--spark`` for ``spark``), or the
    flag given as ``flag=`` (``--replication`` for the ``*-repl`` workloads).
  * ``register_fed_kind(kind, prepare, send, receive, warm=None)``: a new sender/receiver pair for
    ``ctx.fed``; it must be registered at import time of a module both processes import (the
    children are spawned, so a script's top level runs again in them).
  * ``register_arguments(fn)``: ``fn(parser)`` adds flags (``--spark``) before parsing.

Needs the ``bench`` extra (numpy; matplotlib for ``--chart``); ``--broker standalone`` needs
Java 17 and Maven (see ``fedtransport.brokers.standalone``).
"""

from __future__ import annotations

from . import fate as fate  # registers the FATE side-by-side workloads (pyfate imported only when they run)
from .contexts import _CONTEXTS as _CONTEXTS
from .contexts import PULSAR_BROKERS, REPL_CLUSTERS, REPL_TENANT
from .parties import CLEANUP_TIMEOUT, fed_receiver, fed_sender, run_pair
from .raw import client_logger, raw_pulsar_receiver, raw_pulsar_sender, raw_rabbit_receiver, raw_rabbit_sender
from .report import (
    ChartBar,
    ChartGroup,
    ChartPanel,
    chart_layout,
    load_results,
    median_and_worst,
    render_chart,
    result_labels,
)
from .runner import add_arguments, build_parser, execute, main, run
from .stats import compare, summarize
from .workloads import _ARGUMENT_HOOKS as _ARGUMENT_HOOKS
from .workloads import (
    FED_KINDS,
    RAW_MESSAGE,
    SMALL,
    SMALL_COUNT,
    TABLE_ROW,
    WORKLOADS,
    BenchContext,
    FedKind,
    Go,
    MiB,
    Result,
    Workload,
    raw_messages,
    register_arguments,
    register_fed_kind,
    register_workload,
    table_records,
)

__all__ = [
    "CLEANUP_TIMEOUT",
    "FED_KINDS",
    "PULSAR_BROKERS",
    "RAW_MESSAGE",
    "REPL_CLUSTERS",
    "REPL_TENANT",
    "SMALL",
    "SMALL_COUNT",
    "TABLE_ROW",
    "WORKLOADS",
    "BenchContext",
    "ChartBar",
    "ChartGroup",
    "ChartPanel",
    "FedKind",
    "Go",
    "MiB",
    "Result",
    "Workload",
    "add_arguments",
    "build_parser",
    "chart_layout",
    "client_logger",
    "compare",
    "execute",
    "fed_receiver",
    "fed_sender",
    "load_results",
    "main",
    "median_and_worst",
    "raw_messages",
    "raw_pulsar_receiver",
    "raw_pulsar_sender",
    "raw_rabbit_receiver",
    "raw_rabbit_sender",
    "register_arguments",
    "register_fed_kind",
    "register_workload",
    "render_chart",
    "result_labels",
    "run",
    "run_pair",
    "summarize",
    "table_records",
]
