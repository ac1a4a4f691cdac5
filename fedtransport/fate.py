"""FATE 1.x's federation interface over fedtransport: swap the transport of a FATE-Flow-style
scheduler by changing one class.

FATE's ``fate_arch.abc.FederationABC`` (the facts this adapter follows):

* ``remote(v, name, tag, parties, gc)`` sends an object or a table to every party in
  ``parties`` (a list of ``Party(role, party_id)``); it returns nothing.
* ``get(name, tag, parties, gc)`` returns a list of objects or tables, one per party, **in the
  order of** ``parties``.
* ``gc`` is a garbage collector (``GarbageCollectionABC``) with
  ``add_gc_action(tag, obj, method, args_dict)``; FATE's ``IterationGC`` later calls
  ``getattr(obj, method)(**args_dict)`` for the actions of old tags (``gc()`` keeps the last
  ``capacity`` tags, ``clean()`` runs them all). FATE's own federations register every table
  they send or receive, so its memory goes a few iterations later.
* ``destroy(parties)`` removes the federation session's broker resources at the end of a task.
* Implementations are built by ``Federation.from_conf(federation_session_id, party,
  runtime_conf, **kwargs)`` with ``pulsar_config=`` or ``rabbitmq_config=`` (the ``pulsar`` /
  ``rabbitmq`` section of FATE-Flow's ``service_conf.yaml``: ``host``, ``port``, ``mng_port``,
  ``user``, ``password``, ``route_table``, ``mode``, ``max_message_size``, ``topic_ttl``, ``tenant``,
  ``cluster``), and ``runtime_conf["job_parameters"]["pulsar_run" | "rabbitmq_run"]`` may override
  ``max_message_size`` / ``topic_ttl`` and carry ``producer`` / ``consumer`` client settings.
  ``federation_session_id`` is the same on every party of a task.
* ``fate_arch.common.Party(role, party_id)`` holds both as strings.

Usage::

    from fedtransport.fate import FateFederation

    fed = FateFederation.from_conf(federation_session_id, party, runtime_conf,
                                   pulsar_config=service_conf["pulsar"])
    fed.remote(w, name="w", tag="iter-0", parties=[host], gc=gc)
    [w_host] = fed.get(name="w", tag="iter-0", parties=[host], gc=gc)
    fed.destroy(parties=all_parties)

Mapping onto fedtransport
    parties       any object with ``role`` and ``party_id`` (FATE's ``Party``), a ``(role, id)``
                  pair or a ``fedtransport.Party``
    session id    the job id: broker resources are named after it
    tables        ``fedtransport.Table`` travel as tables; ``to_table`` / ``from_table`` convert
                  a scheduler's own table type (FATE's computing tables) on the way in and out
    gc            for every table sent or received that has a ``destroy()`` method (FATE's
                  computing tables do), ``gc.add_gc_action(tag, table, "destroy", {})``; a
                  ``fedtransport.Table`` is plain memory, released when dropped, so none is added
    destroy       ``close()`` then ``cleanup()``: every resource of the session on this party's
                  broker goes, idempotently (the per-pair vhosts/namespaces of FATE do not exist
                  here, so ``parties`` is accepted and not needed)
    Pulsar conf   ``host``/``port`` -> ``service_url``; ``mng_port`` -> ``admin_url`` (given, or
                  FATE's 8080 in replication mode); ``mode`` replication | client -> replication |
                  shared; ``topic_ttl`` (minutes) -> ``ttl_seconds``; ``tenant``, ``cluster``
    RabbitMQ conf ``host``, ``port``, ``mng_port``, ``user``, ``password``; ``mode`` replication |
                  client -> federated | shared
    both          ``route_table`` (a path; default ``conf/{backend}_route_table.yaml`` when it
                  exists), ``max_message_size``, and a ``fedtransport`` mapping of any other
                  option (``secret``, ``allow``...) passed through unchanged
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .api import Federation
from .errors import ConfigError
from .party import Party, as_party, check_timeout
from .routing import RouteTable, url_host
from .table import Table

__all__ = ["FateFederation", "GarbageCollection", "GarbageCollector", "fate_options", "to_party"]

log = logging.getLogger("fedtransport.fate")

_FATE_MODES = {
    "pulsar": {"replication": "replication", "client": "shared"},  # client: every party on the broker it names
    "rabbitmq": {"replication": "federated", "client": "shared"},
}
_FATE_ADMIN_PORT = 8080  # FATE's default Pulsar web service port
_ENGINES = {"pulsar": "pulsar", "rabbitmq": "rabbitmq", "standalone": "memory", "memory": "memory"}


@runtime_checkable
class GarbageCollection(Protocol):
    """FATE's ``GarbageCollectionABC``: what ``remote``/``get`` register tables with."""

    def add_gc_action(self, tag: str, obj: Any, method: str, args_dict: dict[str, Any]) -> None: ...


def to_party(party: Any) -> Party:
    """A FATE ``Party`` (anything with ``role`` and ``party_id``), a pair or a Party -> ``Party``."""
    if isinstance(party, Party):
        return party
    role, pid = getattr(party, "role", None), getattr(party, "party_id", None)
    if role is not None and pid is not None:
        return Party(str(role), str(pid))
    return as_party(party)


def _parties(parties: Any) -> list[Party]:
    if isinstance(parties, (list, tuple)) and not (
        len(parties) == 2 and all(isinstance(p, (str, int)) for p in parties)  # one (role, id) pair
    ):
        return [to_party(p) for p in parties]
    return [to_party(parties)]


class GarbageCollector:
    """A stand-in for FATE's ``IterationGC`` where FATE is not installed.

    ``add_gc_action`` groups actions by tag; ``gc()`` runs the groups of all but the newest
    ``capacity`` tags; ``clean()`` runs every group. A failing action is logged, not raised:
    freeing memory must never fail a training step.
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._groups: deque[tuple[str, list[tuple[Any, str, dict[str, Any]]]]] = deque()

    def add_gc_action(self, tag: str, obj: Any, method: str, args_dict: dict[str, Any]) -> None:
        if self._groups and self._groups[-1][0] == tag:
            self._groups[-1][1].append((obj, method, dict(args_dict)))
        else:
            self._groups.append((tag, [(obj, method, dict(args_dict))]))

    def gc(self) -> None:
        while len(self._groups) > self.capacity:
            self._run(self._groups.popleft()[1])

    def clean(self) -> None:
        while self._groups:
            self._run(self._groups.pop()[1])

    def pending(self) -> int:
        return sum(len(actions) for _, actions in self._groups)

    @staticmethod
    def _run(actions: list[tuple[Any, str, dict[str, Any]]]) -> None:
        for obj, method, kwargs in actions:
            try:
                getattr(obj, method)(**kwargs)
            except Exception as exc:
                log.debug("gc action %s.%s failed: %s", type(obj).__name__, method, exc)


class FateFederation:
    """FATE 1.x's federation (``remote``/``get``/``destroy``) on a fedtransport session.

    Build it with :meth:`from_conf` (FATE-Flow's configuration), :meth:`connect` (fedtransport
    options) or around an open :class:`~fedtransport.Federation`. ``timeout`` bounds each
    ``get`` (``None``: wait as long as it takes, as FATE does). ``to_table(v)`` returns a
    ``fedtransport.Table`` for values that are the scheduler's tables (``None`` otherwise);
    ``from_table(table)`` turns a received table into the scheduler's type.
    """

    def __init__(
        self,
        federation: Federation,
        *,
        timeout: float | None = None,
        to_table: Callable[[Any], Table | None] | None = None,
        from_table: Callable[[Table], Any] | None = None,
    ) -> None:
        self._fed = federation
        self._timeout = check_timeout(timeout)  # refused now, not at the first get
        self._to_table = to_table
        self._from_table = from_table

    # construction -------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        backend: str,
        federation_session_id: str,
        party: Any,
        route_table: str | Path | Mapping[str, Any] | RouteTable | None = None,
        options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> FateFederation:
        """Open a session with fedtransport's own options; ``kwargs`` go to the constructor."""
        fed = Federation.connect(
            backend, job_id=federation_session_id, party=to_party(party), route_table=route_table, options=options
        )
        return cls(fed, **kwargs)

    @classmethod
    def from_conf(
        cls,
        federation_session_id: str,
        party: Any,
        runtime_conf: Mapping[str, Any] | None = None,
        service_conf: Mapping[str, Any] | None = None,
        *,
        backend: str | None = None,
        options: Mapping[str, Any] | None = None,
        pulsar_config: Mapping[str, Any] | None = None,
        rabbitmq_config: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> FateFederation:
        """FATE's constructor: ``from_conf(federation_session_id, party, runtime_conf,
        pulsar_config=...)`` (or ``rabbitmq_config=``, or ``service_conf=`` with ``backend=``).

        Without an explicit backend it is taken from which config was given, else from
        ``runtime_conf["job_parameters"]["federation_engine"]`` (also under ``common``).
        ``options`` (fedtransport options) win over what the FATE configuration says.
        """
        runtime_conf = dict(runtime_conf or {})
        if pulsar_config is not None and rabbitmq_config is not None:
            raise ConfigError("from_conf: give pulsar_config or rabbitmq_config, not both")
        conf = service_conf if service_conf is not None else (pulsar_config or rabbitmq_config or {})
        if backend is None:
            backend = "pulsar" if pulsar_config is not None else "rabbitmq" if rabbitmq_config is not None else None
        if backend is None:
            backend = _engine(runtime_conf)
        if backend not in ("pulsar", "rabbitmq", "memory"):
            raise ConfigError(f"from_conf: backend {backend!r} is not one of pulsar, rabbitmq, memory")
        run = _run_conf(runtime_conf, backend)
        opts, routes = fate_options(backend, conf, run)
        opts.update(options or {})
        return cls.connect(backend, federation_session_id, party, route_table=routes, options=opts, **kwargs)

    # FATE's interface -----------------------------------------------------------------------

    @property
    def session_id(self) -> str:
        return self._fed.job_id

    @property
    def party(self) -> Party:
        return self._fed.party

    @property
    def federation(self) -> Federation:
        """The fedtransport session underneath."""
        return self._fed

    def remote(self, v: Any, name: str, tag: str, parties: Sequence[Any], gc: Any = None) -> None:
        """Send ``v`` (an object or a table) to each of ``parties``."""
        _check_gc(gc)
        dsts = _parties(parties)
        value = v
        if self._to_table is not None and not isinstance(v, Table):
            converted = self._to_table(v)
            if converted is not None:
                value = converted
        self._fed.remote(value, name=name, tag=tag, parties=dsts)
        if isinstance(value, Table):  # FATE lets the gc free tables it sent a few iterations later
            _track(gc, tag, v)

    def get(self, name: str, tag: str, parties: Sequence[Any], gc: Any = None) -> list[Any]:
        """Receive ``(name, tag)`` from each of ``parties``: a list in the order of ``parties``."""
        _check_gc(gc)
        srcs = _parties(parties)
        values = self._fed.get(name=name, tag=tag, parties=srcs, timeout=self._timeout)
        out = []
        for value in values:
            if isinstance(value, Table):
                value = self._from_table(value) if self._from_table is not None else value
                _track(gc, tag, value)
            out.append(value)
        return out

    def destroy(self, parties: Sequence[Any] | None = None) -> None:
        """End of the task: close the session and delete its broker resources; idempotent."""
        self._fed.close()
        self._fed.cleanup()

    # older FATE federations named it cleanup(parties)
    cleanup = destroy

    def close(self) -> None:
        """Release connections only (broker resources stay until ``destroy``)."""
        self._fed.close()

    def __enter__(self) -> FateFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # FATE keeps federations out of Spark closures too; a session holds sockets and threads.
        raise TypeError(
            "a FateFederation holds broker connections and cannot be pickled; "
            "inside Spark executors use fedtransport.spark"
        )

    def __repr__(self) -> str:
        return f"FateFederation(session_id={self.session_id!r}, party={self.party}, backend={self._fed.backend!r})"


def _check_gc(gc: Any) -> None:
    # Checked before anything moves: a wrong gc must not fail a transfer half-way.
    if gc is not None and not isinstance(gc, GarbageCollection):
        raise ConfigError(f"gc must have add_gc_action(tag, obj, method, args_dict), got {type(gc).__name__}")


def _track(gc: Any, tag: str, value: Any) -> None:
    """Register a table with FATE's garbage collector when it has something to free."""
    if gc is not None and callable(getattr(value, "destroy", None)):
        gc.add_gc_action(tag, value, "destroy", {})


# ---------------------------------------------------------------------------- FATE configuration


def _engine(runtime_conf: Mapping[str, Any]) -> str:
    params = runtime_conf.get("job_parameters") or {}
    engine = params.get("federation_engine") or (params.get("common") or {}).get("federation_engine")
    if not engine:
        raise ConfigError(
            "from_conf: say which backend: pulsar_config=, rabbitmq_config=, backend=, or "
            "job_parameters.federation_engine in the runtime conf"
        )
    name = _ENGINES.get(str(engine).lower())
    if name is None:
        raise ConfigError(
            f"from_conf: federation_engine {engine!r} is not served by fedtransport (PULSAR, RABBITMQ or STANDALONE)"
        )
    return name


def _run_conf(runtime_conf: Mapping[str, Any], backend: str) -> dict[str, Any]:
    """``job_parameters.{backend}_run``, flat (as FATE-Flow passes it) or under ``common``."""
    params = runtime_conf.get("job_parameters") or {}
    key = f"{backend}_run"
    run = params.get(key) or (params.get("common") or {}).get(key) or {}
    if not isinstance(run, Mapping):
        raise ConfigError(f"from_conf: job_parameters.{key} must be a mapping, got {run!r}")
    return dict(run)


def _int(conf: Mapping[str, Any], key: str) -> int | None:
    value = conf.get(key)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"from_conf: {key} must be an integer, got {value!r}") from None


def fate_options(
    backend: str, conf: Mapping[str, Any], run: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], str | Path | None]:
    """fedtransport options and route table from FATE-Flow's service conf and the job's ``*_run``."""
    conf, run = dict(conf), dict(run or {})
    opts: dict[str, Any] = {}
    extra = conf.pop("fedtransport", None) or {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"from_conf: the 'fedtransport' section must be a mapping of options, got {extra!r}")
    routes: str | Path | None = conf.get("route_table") or None
    if routes is None and backend in ("pulsar", "rabbitmq"):
        default = Path("conf") / f"{backend}_route_table.yaml"  # FATE-Flow's default location
        routes = default if default.is_file() else None
    size = _int(run, "max_message_size") or _int(conf, "max_message_size")
    if size is not None:
        opts["max_message_size"] = size
    mode = conf.get("mode")
    if backend in _FATE_MODES:
        if mode is None and routes is not None:
            mode = "replication"  # FATE's default once parties are on brokers of their own
        if mode is not None:
            opts["mode"] = _FATE_MODES[backend].get(str(mode), str(mode))
    host = conf.get("host")
    if backend == "pulsar":
        port, mng_port = _int(conf, "port"), _int(conf, "mng_port")
        if host:
            opts["service_url"] = f"pulsar://{url_host(str(host))}:{port or 6650}"
        if mng_port is None and opts.get("mode") == "replication":
            mng_port = _FATE_ADMIN_PORT
        if host and mng_port is not None:
            opts["admin_url"] = f"http://{url_host(str(host))}:{mng_port}"
        ttl = _int(run, "topic_ttl") or _int(conf, "topic_ttl")
        if ttl:  # FATE's topic_ttl is in minutes
            opts["ttl_seconds"] = ttl * 60
        for key in ("tenant", "cluster"):
            if conf.get(key):
                opts[key] = str(conf[key])
        for key in ("producer", "consumer"):  # pulsar-client keyword arguments, as in FATE
            if run.get(key):
                opts[key] = dict(run[key])
    elif backend == "rabbitmq":
        if host:
            opts["host"] = str(host)
        for key in ("port", "mng_port"):
            value = _int(conf, key)
            if value is not None:
                opts[key] = value
        for key in ("user", "password"):
            if conf.get(key):
                opts[key] = str(conf[key])
    opts.update(extra)
    return opts, routes
