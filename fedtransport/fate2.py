"""FATE 2.x's federation over fedtransport: FATE's ``Context`` unchanged, the transport ours.

FATE 2.2 (``pyfate``) facts this module follows (read in ``fate/arch``):

* Algorithm code calls ``ctx.hosts.put(name, v)`` / ``ctx.guest.get(name)``. FATE pickles ``v``
  itself (``TableRemotePersistentPickler``): every computing ``KVTable`` inside ``v`` goes out
  first through the federation's ``push_table`` under a key of its own, the pickle through
  ``push_bytes``; a pickle over ``get_default_max_message_size()`` is cut into a slice table of
  ``get_default_partition_num()`` partitions, pushed as a table.
* The receiver calls ``pull_bytes``, then ``pull_table(key, tag, [party], table_metas)`` for each
  table the pickle names; ``TableMeta`` carries the partition count, the key and value serdes
  types and the partitioner type, and ``pull_table`` must return the receiver's computing table.
* ``fate.arch.federation.api.Federation`` does the bookkeeping (duplicate checks, tracing) and
  calls the hooks ``_push_bytes``, ``_pull_bytes``, ``_push_table``, ``_pull_table``,
  ``_destroy``; ``Context`` reads ``local_party``, ``parties`` and ``world_size``. Parties are
  ``(role, party_id)`` tuples of strings.
* FATE picks its federation in a fixed if/elif (``FederationBuilder.build``,
  ``fate.components.core.load_federation``): :func:`install` adds ``"fedtransport"`` to both.

How it maps onto fedtransport
    bytes       ``remote`` of a ``pickle.PickleBuffer`` over FATE's bytes: they travel as one
                out-of-band buffer, not pickled a second time, and come back as ``bytes``.
                FATE's cut of pickles over 1 MiB into slice tables is off (its queues cap a
                message; fedtransport's framing splits any size): ``max_message_size`` turns it on
    tables      a :class:`~fedtransport.Table` whose partitions are the KVTable's partitions of
                raw ``(key bytes, value bytes)``, read one at a time while they stream out; the
                receiver rebuilds them with its own computing session (same partition count,
                serdes types and partitioner type; records are placed by that partitioner, as
                FATE's own tables place them), values never deserialised on the way
    pushing     a table goes out in the background (``put`` does not wait for it): the pickle
                that names it follows at once, so the receiver starts on the table while it is
                still being sent. The next ``put`` waits for the tables of the one before, and
                ``destroy`` for all of them; a table that failed to go out raises there
    standalone  on FATE's standalone computing the receiver writes the partitions into the new
                table's LMDB stores itself, up to :data:`WRITERS` at once, a whole received
                unit per ``putmulti``, one transaction per partition; other computing engines
                get the records through their own ``_parallelize``
    destroy     ``close()`` then ``cleanup()``, as FATE's Pulsar and RabbitMQ federations delete
                the job's broker resources at the end of a task

Usage::

    from fedtransport.fate2 import create_context

    ctx = create_context(("guest", "9999"), [("guest", "9999"), ("host", "10000")],
                         federation_session_id="job-1", backend="pulsar",
                         options={"service_url": "pulsar://broker:6650"},
                         computing_conf={"computing.standalone.data_dir": "/data/fate"})
    ctx.hosts.put("w", w)
    ctx.destroy()

FATE 1.x: use :mod:`fedtransport.fate` instead.
"""

from __future__ import annotations

import logging
import pickle
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from .api import Federation
from .errors import ConfigError, IntegrityError
from .party import Party, check_timeout
from .routing import RouteTable
from .table import Table

INSTALL_HINT = "pip install --no-deps pyfate==2.2.0 && pip install 'fedtransport[fate]'"

try:
    from fate.arch.federation.api import Federation as _FateFederation
except ImportError as exc:  # FATE missing, or one of the packages it imports
    raise ImportError(
        f"fedtransport.fate2 needs FATE 2.x (pyfate 2.2) and what it imports ({exc}); install them with: "
        f"{INSTALL_HINT}. For FATE 1.x use fedtransport.fate."
    ) from exc

__all__ = ["ENGINE", "INSTALL_HINT", "FedtransportFederation", "create_context", "install"]

ENGINE = "fedtransport"  # the name FATE's builders select once install() ran
log = logging.getLogger(__name__)
WRITERS = 4  # partitions of a received table written into standalone LMDB at once
PUSHERS = 2  # tables sent at once in the background
_NO_SLICING = 2**63 - 1  # a pickle size FATE never reaches: every object goes as one push of bytes

PartyMeta = tuple[str, str]
RouteTableArg = str | Path | Mapping[str, Any] | RouteTable | None


def _meta(party: Any) -> PartyMeta:
    """FATE's ``(role, party_id)`` with both as strings (``Context`` compares ids as str)."""
    if isinstance(party, Party):
        return (party.role, party.party_id)
    try:
        role, pid = party
    except (TypeError, ValueError):
        raise ConfigError(f"a FATE party is a (role, party_id) pair, got {party!r}") from None
    return (str(role), str(pid))


def _dsts(parties: Sequence[Any]) -> list[Party]:
    return [Party(*_meta(p)) for p in parties]


class FedtransportFederation(_FateFederation):  # type: ignore[misc]  # FATE ships no annotations
    """A FATE 2.x ``Federation`` whose messages and tables move over a fedtransport session.

    Build it with :meth:`from_conf`, or around an open :class:`~fedtransport.Federation` whose
    ``job_id`` is the federation session id. ``computing_session`` is FATE's computing session
    (``KVTableContext``) that received tables are rebuilt in. ``timeout`` bounds each pull
    (``None``: wait as long as it takes, as FATE does). ``max_message_size``: pickles over that
    many bytes go as FATE's slice tables (``None``, the default: never; see
    :meth:`get_default_max_message_size`).
    """

    def __init__(
        self,
        federation: Federation,
        computing_session: Any,
        party: Any,
        parties: Sequence[Any],
        *,
        timeout: float | None = None,
        max_message_size: int | None = None,
    ) -> None:
        local, members = _meta(party), [_meta(p) for p in parties]
        if local not in members:
            raise ConfigError(f"the local party {local} is not one of the parties {members}")
        if Party(*local) != federation.party:
            raise ConfigError(f"the local party {local} is not the session's party {federation.party}")
        super().__init__(federation.job_id, local, members)
        self._fed = federation
        self._computing = computing_session
        self._timeout = check_timeout(timeout)  # refused now, not at the first get
        if max_message_size is not None and (type(max_message_size) is not int or max_message_size <= 0):
            raise ConfigError(f"max_message_size must be a positive int of bytes or None, got {max_message_size!r}")
        self._max_message_size = max_message_size
        # Tables pushed in the background: this put's (since the last bytes) and earlier puts'.
        self._pushes = ThreadPoolExecutor(max_workers=PUSHERS, thread_name_prefix="fedtransport-fate-push")
        self._push_lock = threading.Lock()
        self._this_put: list[Future[None]] = []
        self._earlier: list[Future[None]] = []

    @classmethod
    def from_conf(
        cls,
        federation_session_id: str,
        computing_session: Any,
        party: Any,
        parties: Sequence[Any],
        backend: str,
        options: Mapping[str, Any] | None,
        route_table: RouteTableArg = None,
        *,
        timeout: float | None = None,
        max_message_size: int | None = None,
    ) -> FedtransportFederation:
        """Connect a fedtransport session (``backend`` and ``options`` as in API.md) for FATE."""
        fed = Federation.connect(
            backend,
            job_id=federation_session_id,
            party=Party(*_meta(party)),
            route_table=route_table,
            options=dict(options or {}),
        )
        try:
            return cls(fed, computing_session, party, parties, timeout=timeout, max_message_size=max_message_size)
        except BaseException:
            fed.close()
            raise

    @property
    def federation(self) -> Federation:
        """The fedtransport session underneath."""
        return self._fed

    def get_default_max_message_size(self) -> int:
        """The pickle size over which FATE cuts an object into a slice table: none by default.

        FATE's brokers need the cut (their messages are capped); fedtransport frames an object
        of any size itself, so a 4 MiB array is one push of its pickle rather than a table of
        slices (written into LMDB on both sides) plus a pickle naming it. FATE's own queue
        federations override this hook the same way, with their ``max_message_size``.
        """
        return _NO_SLICING if self._max_message_size is None else self._max_message_size

    # FATE's hooks ------------------------------------------------------------------------------

    def _push_bytes(self, v: bytes, name: str, tag: str, parties: list[PartyMeta]) -> None:
        # FATE pushes a put's tables first, then its pickle (the bytes): the earlier puts' tables
        # are done (or raise) before this put counts as sent, while this put's own tables keep
        # streaming out behind the pickle that names them.
        with self._push_lock:
            earlier, self._earlier = self._earlier, []
        _wait_pushes(earlier)
        # FATE pickled v already: a PickleBuffer travels out of band, without a second pickling.
        self._fed.remote(pickle.PickleBuffer(v), name=name, tag=tag, parties=_dsts(parties))
        with self._push_lock:
            self._earlier, self._this_put = self._this_put, []

    def _pull_bytes(self, name: str, tag: str, parties: list[PartyMeta]) -> list[bytes]:
        values = self._fed.get(name=name, tag=tag, parties=_dsts(parties), timeout=self._timeout)
        return [_as_bytes(v, name, party) for v, party in zip(values, parties, strict=True)]

    def _push_table(self, table: Any, name: str, tag: str, parties: list[PartyMeta]) -> None:
        # The partitions are read in the pushing thread; `table` stays referenced until sent (a
        # standalone table deletes its LMDB store when collected, as FATE's slice tables are).
        outgoing, dsts = Table(raw_partitions(table)), _dsts(parties)

        def push(_table: Any) -> None:
            try:
                self._fed.remote(outgoing, name=name, tag=tag, parties=dsts)
            except BaseException as exc:  # raised again by the next put or destroy; logged now, when it happens
                log.warning("pushing FATE table %r/%r to %s failed: %r", name, tag, parties, exc)
                raise

        future = self._pushes.submit(push, table)
        with self._push_lock:
            self._this_put.append(future)

    def _pull_table(
        self, name: str, tag: str, parties: list[PartyMeta], table_metas: list[Any] | None = None
    ) -> list[Any]:
        tables = self._fed.get(name=name, tag=tag, parties=_dsts(parties), timeout=self._timeout)
        metas: list[Any] = list(table_metas) if table_metas is not None else [None] * len(tables)
        return [self._rebuild(t, meta, name, party) for t, meta, party in zip(tables, metas, parties, strict=True)]

    def _destroy(self) -> None:
        with self._push_lock:
            pending, self._earlier, self._this_put = self._earlier + self._this_put, [], []
        try:
            _wait_pushes(pending)  # every table is out (or failed) before the session closes
        finally:
            self._pushes.shutdown(wait=True)
            self._fed.close()
            self._fed.cleanup()

    # tables ------------------------------------------------------------------------------------

    def _rebuild(self, table: Any, meta: Any, name: str, party: PartyMeta) -> Any:
        """The received partitions as a KVTable of this party's computing session."""
        from fate.arch.computing.partitioners import get_partitioner_by_type
        from fate.arch.computing.serdes import get_serdes_by_type

        if not isinstance(table, Table):
            raise IntegrityError(f"{name!r} from {party} should be a table, got a {type(table).__name__}")
        # A pull without metadata (FATE always gives it) gets FATE's defaults: pickle serdes, type 0.
        n = table.num_partitions if meta is None else int(meta.num_partitions)
        ktype, vtype, ptype = (0, 0, 0) if meta is None else (meta.key_serdes_type, meta.value_serdes_type,
                                                              meta.partitioner_type)  # fmt: skip
        if table.num_partitions != n:
            raise IntegrityError(
                f"table {name!r} from {party} has {table.num_partitions} partitions, its metadata says {n}"
            )
        if _is_standalone(self._computing):
            return _write_standalone(self._computing, table, n, (ktype, vtype, ptype), name, party)
        # _parallelize is the computing session's own hook for records that are serialised
        # already: the public parallelize would serialise FATE's bytes once more.
        return self._computing._parallelize(
            data=_checked_records(table, name, party),
            total_partitions=n,
            key_serdes=get_serdes_by_type(ktype),
            key_serdes_type=ktype,
            value_serdes=get_serdes_by_type(vtype),
            value_serdes_type=vtype,
            partitioner=get_partitioner_by_type(ptype),
            partitioner_type=ptype,
        )

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a FedtransportFederation holds broker connections and cannot be pickled")

    def __repr__(self) -> str:
        return (
            f"FedtransportFederation(session_id={self.session_id!r}, party={self.local_party}, "
            f"backend={self._fed.backend!r})"
        )


def _wait_pushes(futures: list[Future[None]]) -> None:
    """Wait for every background table push; the first that failed raises."""
    wait(futures)
    for future in futures:
        exc = future.exception()
        if exc is not None:
            raise exc


def _is_standalone(computing: Any) -> bool:
    from fate.arch.computing.backends.standalone import CSession

    return isinstance(computing, CSession)


def _write_standalone(computing: Any, table: Table, n: int, types: tuple[int, int, int], name: str,
                      party: PartyMeta) -> Any:  # fmt: skip
    """The received table as a new table of FATE's standalone computing, written by us.

    As ``CSession._parallelize`` makes it (a uuid name in the session's namespace, cleaned up
    when collected), but each partition straight into its own LMDB store: the records of the
    sender's partition ``p`` are those FATE's partitioner places in ``p`` (same count and
    partitioner type; checked record by record), so up to :data:`WRITERS` partitions are
    written at once, a received unit per ``putmulti`` and per transaction. LMDB releases the GIL
    while it copies and syncs, so the writers overlap. A transaction per unit, not per partition:
    LMDB holds a transaction's dirty pages in memory until it commits, a whole partition's (twice
    its size: a 4 KiB value takes two pages) with one; with a unit's, the receiver's CPU for a
    256 MiB table fell from 0.94 to 0.79 s at the median (docs/benchmarks.md). The table is
    destroyed if any partition fails, so what one commits early is never seen.
    """
    from fate.arch.computing.backends.standalone import Table as StandaloneTable
    from fate.arch.computing.partitioners import get_partitioner_by_type

    ktype, vtype, ptype = types
    session = computing.get_standalone_session()
    out = session.create_table(
        name=str(uuid.uuid1()), namespace=session.session_id, partitions=n, need_cleanup=True,
        error_if_exist=True, key_serdes_type=ktype, value_serdes_type=vtype, partitioner_type=ptype,
    )  # fmt: skip
    place = get_partitioner_by_type(ptype)
    with ThreadPoolExecutor(max_workers=max(1, min(WRITERS, n)), thread_name_prefix="fedtransport-fate-lmdb") as pool:
        # Partitions in order: the sender sends a lane's partitions in order, so the writers
        # never wait on a partition queued behind one that nobody reads.
        futures = [pool.submit(_write_partition, out, table.raw_partition(p), p, n, place, name, party)
                   for p in range(n)]  # fmt: skip
        for future in futures:
            if future.exception() is not None:
                for other in futures:
                    other.cancel()  # the partitions not begun; those begun run to their end
                break
    for future in futures:
        exc = None if future.cancelled() else future.exception()
        if exc is not None:
            out.destroy()
            raise exc
    return StandaloneTable(out)


def _write_partition(out: Any, part: Iterable[tuple[Any, Any]], p: int, n: int, place: Any, name: str,
                     party: PartyMeta) -> None:  # fmt: skip
    batches = part.batches() if hasattr(part, "batches") else [list(part)]
    with out._get_env_for_partition(p, write=True) as env:
        for batch in batches:
            for key, value in batch:
                if not (type(key) is bytes and type(value) is bytes):
                    raise IntegrityError(f"table {name!r} from {party}: partition {p} holds a record that is not bytes")
                if place(key, n) != p:
                    raise IntegrityError(f"table {name!r} from {party}: a record of partition {p} belongs in "
                                         f"partition {place(key, n)} of {n}")  # fmt: skip
            with env.begin(write=True) as txn, txn.cursor() as cursor:
                cursor.putmulti(batch)


def _as_bytes(value: Any, name: str, party: PartyMeta) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview, pickle.PickleBuffer)):
        return bytes(value)
    raise IntegrityError(f"{name!r} from {party} should be FATE's bytes, got a {type(value).__name__}")


def _checked_records(table: Table, name: str, party: PartyMeta) -> Iterator[tuple[bytes, bytes]]:
    """Every record, partition by partition as they stream in; FATE stores only bytes."""
    for p in range(table.num_partitions):
        for key, value in table.iter_partition(p):
            if not (isinstance(key, bytes) and isinstance(value, bytes)):
                raise IntegrityError(f"table {name!r} from {party}: partition {p} holds a record that is not bytes")
            yield key, value


def raw_partitions(table: Any) -> list[Iterable[tuple[bytes, bytes]]]:
    """One lazy iterable of serialised ``(key, value)`` per partition of a FATE KVTable.

    On standalone computing each partition is read from its own LMDB store, in the table's
    exact layout. Elsewhere each partition is one pass over the table's serialised records
    keeping those its partitioner places there (nothing is deserialised or held in memory).
    """
    n = int(table.num_partitions)
    store = getattr(table, "table", None)
    if callable(getattr(store, "_get_env_for_partition", None)):
        return [_standalone_partition(store, p) for p in range(n)]
    return [_filtered_partition(table, p, n) for p in range(n)]


def _standalone_partition(store: Any, p: int) -> Iterator[tuple[bytes, bytes]]:
    with store._get_env_for_partition(p) as env, env.begin() as txn, txn.cursor() as cursor:
        yield from cursor


def _filtered_partition(table: Any, p: int, n: int) -> Iterator[tuple[bytes, bytes]]:
    place = table.partitioner
    for key, value in table._collect():
        if place(key, n) == p:
            yield key, value


# ------------------------------------------------------------------------------ FATE's entry points


def create_context(
    local_party: Any,
    parties: Sequence[Any],
    federation_session_id: str,
    backend: str,
    options: Mapping[str, Any] | None = None,
    route_table: RouteTableArg = None,
    *,
    computing_session: Any = None,
    computing_conf: Mapping[str, Any] | None = None,
    computing_session_id: str | None = None,
    timeout: float | None = None,
) -> Any:
    """A FATE ``Context`` over fedtransport, for launchers that build their own context.

    Without ``computing_session``, one is built as FATE's ``create_context`` does: standalone
    computing, ``computing_conf`` (``computing.standalone.data_dir`` defaults to ``/tmp``, as in
    FATE), session id ``<federation_session_id>_<role>_<party_id>``.
    """
    from fate.arch.context import Context

    local = _meta(local_party)
    if computing_session is None:
        from fate.arch.computing import ComputingBuilder, ComputingEngine

        conf = {"computing.standalone.data_dir": "/tmp", **dict(computing_conf or {})}
        csid = computing_session_id or f"{federation_session_id}_{local[0]}_{local[1]}"
        computing_session = ComputingBuilder(computing_session_id=csid).build(ComputingEngine.STANDALONE, conf)
    federation = FedtransportFederation.from_conf(
        federation_session_id, computing_session, local, parties, backend, options, route_table, timeout=timeout
    )
    return Context(computing=computing_session, federation=federation)


def install() -> None:
    """Teach an installed FATE 2.x to build this federation by the name ``"fedtransport"``.

    FATE has no plug-in registry, so this wraps its two selectors (idempotently):

    * ``FederationBuilder.build(computing_session, "fedtransport", conf)`` reads
      ``federation.fedtransport.backend``, ``.options`` and ``.route_table`` from ``conf`` (or
      FATE's config), and ``FederationBuilder.build_fedtransport(computing_session, backend,
      options, route_table=None)`` is added; FATE's ``create_context(...,
      federation_engine="fedtransport", federation_conf=...)`` goes through ``build``.
    * ``fate.components.core.load_federation`` accepts the task conf's custom federation,
      ``{"type": "custom", "metadata": {"engine": "fedtransport", "federation_id": ...,
      "parties": {"local": {"role", "partyid"}, "parties": [...]}, "backend": ...,
      "options": {...}, "route_table": ...}}`` (a ``CustomFederationSpec``), when that module
      can be imported. FATE 2.2's ``TaskConfigSpec`` does not list custom federations: a
      launcher builds the spec itself.
    """
    from fate.arch.federation import FederationBuilder

    if not getattr(FederationBuilder, "_fedtransport_installed", False):
        _patch_builder(FederationBuilder)
    try:
        from fate.components import core
        from fate.components.core import _load_federation
    except ImportError:  # FATE's component runtime needs more packages; the builder is patched
        return
    if not getattr(core.load_federation, "_fedtransport", False):
        wrapped = _wrap_load_federation(core.load_federation)
        core.load_federation = wrapped
        _load_federation.load_federation = wrapped


def _patch_builder(builder: Any) -> None:
    from fate.arch.config import cfg

    original = builder.build

    def build_fedtransport(
        self: Any, computing_session: Any, backend: str, options: Mapping[str, Any] | None = None,
        route_table: RouteTableArg = None,
    ) -> FedtransportFederation:  # fmt: skip
        return FedtransportFederation.from_conf(
            self._federation_id, computing_session, self._party, self._parties, backend, options, route_table
        )

    def build(self: Any, computing_session: Any, t: Any, conf: dict[str, Any]) -> Any:
        if str(t) != ENGINE:
            return original(self, computing_session, t, conf)
        return build_fedtransport(
            self,
            computing_session,
            backend=cfg.get_option(conf, f"federation.{ENGINE}.backend"),
            options=cfg.get_option(conf, f"federation.{ENGINE}.options", {}),
            route_table=cfg.get_option(conf, f"federation.{ENGINE}.route_table", None),
        )

    builder.build = build
    builder.build_fedtransport = build_fedtransport
    builder._fedtransport_installed = True


def _wrap_load_federation(original: Any) -> Any:
    def load_federation(federation: Any, computing: Any) -> Any:
        meta = getattr(federation, "metadata", None)
        if getattr(federation, "type", None) != "custom" or not isinstance(meta, Mapping):
            return original(federation, computing)
        if meta.get("engine") != ENGINE:
            return original(federation, computing)
        members = meta.get("parties") or {}
        local = members.get("local") or {}
        return FedtransportFederation.from_conf(
            str(meta["federation_id"]),
            computing,
            (local.get("role"), local.get("partyid")),
            [(p["role"], p["partyid"]) for p in members.get("parties", [])],
            str(meta["backend"]),
            meta.get("options") or {},
            meta.get("route_table"),
        )

    load_federation._fedtransport = True  # type: ignore[attr-defined]
    return load_federation
