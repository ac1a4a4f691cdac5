"""Transport layer: the backend interface and the registry of backends.

Built-in backends are named here and imported on first use; third parties add
theirs through the ``fedtransport.backends`` entry-point group (the entry point's
value is the ``Transport`` subclass), or at run time with :func:`register`.
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib.metadata import entry_points

from ..errors import ConfigError
from .base import DeliverFn, Delivery, JobContext, Transport

__all__ = ["DeliverFn", "Delivery", "JobContext", "Transport", "available", "get_backend", "register"]

ENTRY_POINT_GROUP = "fedtransport.backends"

_BUILTIN = {
    "memory": "fedtransport.transport.memory:MemoryTransport",
    "pulsar": "fedtransport.transport.pulsar:PulsarTransport",
    "rabbitmq": "fedtransport.transport.rabbitmq:RabbitTransport",
}
_registered: dict[str, type[Transport]] = {}


def register(name: str, cls: type[Transport]) -> None:
    """Make ``cls`` available as ``Federation.connect(name, ...)``."""
    if not (isinstance(cls, type) and issubclass(cls, Transport)):
        raise ConfigError(f"backend {name!r} must be a Transport subclass, got {cls!r}")
    _registered[name] = cls


def _entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Every backend name that ``get_backend`` would accept."""
    names = set(_registered) | set(_entry_points())
    for name, target in _BUILTIN.items():
        if importlib.util.find_spec(target.split(":")[0]) is not None:
            names.add(name)
    return sorted(names)


def get_backend(name: str) -> type[Transport]:
    if name in _registered:
        return _registered[name]
    target = _BUILTIN.get(name)
    if target is not None and importlib.util.find_spec(target.split(":")[0]) is not None:
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
    else:
        ep = _entry_points().get(name)
        if ep is None:
            raise ConfigError(f"unknown backend {name!r}; known backends: {', '.join(available())}")
        cls = ep.load()  # type: ignore[attr-defined]
        if not (isinstance(cls, type) and issubclass(cls, Transport)):
            raise ConfigError(f"entry point {name!r} in {ENTRY_POINT_GROUP} is not a Transport subclass")
    _registered[name] = cls
    return cls
