"""Transport layer: the backend interface and the registry of backends.

Built-in backends are named here and imported on first use; third parties add
theirs through the ``fedtransport.backends`` entry-point group (the entry point's
value is the ``Transport`` subclass), or at run time with :func:`register`.
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib.metadata import EntryPoint, entry_points

from ..errors import ConfigError
from .base import DeliverFn, Delivery, JobContext, Transport

__all__ = ["DeliverFn", "Delivery", "JobContext", "Transport", "available", "get_backend", "register"]

ENTRY_POINT_GROUP = "fedtransport.backends"

_BUILTIN = {
    "memory": "fedtransport.transport.memory:MemoryTransport",
    "pulsar": "fedtransport.transport.pulsar:PulsarTransport",
    "rabbitmq": "fedtransport.transport.rabbitmq:RabbitTransport",
}
# The broker client each built-in backend drives: (module, the PyPI package that provides it).
_DRIVERS = {"pulsar": ("pulsar", "pulsar-client"), "rabbitmq": ("pika", "pika")}
_registered: dict[str, type[Transport]] = {}


def register(name: str, cls: type[Transport]) -> None:
    """Make ``cls`` available as ``Federation.connect(name, ...)``."""
    if not (isinstance(cls, type) and issubclass(cls, Transport)):
        raise ConfigError(f"backend {name!r} must be a Transport subclass, got {cls!r}")
    _registered[name] = cls


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Every backend name that ``get_backend`` would accept."""
    names = set(_registered) | set(_entry_points())
    names.update(name for name in _BUILTIN if _missing_driver(name) is None)
    return sorted(names)


def _missing_driver(name: str) -> str | None:
    """The PyPI package a built-in backend needs and cannot import, else None."""
    module, package = _DRIVERS.get(name, (None, None))
    if module is None or importlib.util.find_spec(module) is not None:
        return None
    return package


def get_backend(name: str) -> type[Transport]:
    if name in _registered:
        return _registered[name]
    target = _BUILTIN.get(name)
    if target is not None:
        missing = _missing_driver(name)
        if missing is not None:
            raise ConfigError(f"the {name} backend needs its broker client: pip install {missing}")
        module, _, attr = target.partition(":")
        cls: type[Transport] = getattr(importlib.import_module(module), attr)
    else:
        ep = _entry_points().get(name)
        if ep is None:
            raise ConfigError(f"unknown backend {name!r}; known backends: {', '.join(available())}")
        loaded = ep.load()
        if not (isinstance(loaded, type) and issubclass(loaded, Transport)):
            raise ConfigError(f"entry point {name!r} in {ENTRY_POINT_GROUP} is not a Transport subclass")
        cls = loaded
    _registered[name] = cls
    return cls
