"""fedtransport: move data between the parties of a federated-learning job over
the message brokers they already run (Apache Pulsar, RabbitMQ).

    import fedtransport as ft
    with ft.Federation.connect("pulsar", job_id="job-1", party=ft.Party("guest", "9999")) as fed:
        fed.remote(weights, name="w", tag="iter-0", parties=[ft.Party("host", "10000")])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .api import Federation
from .errors import (
    BackendError,
    ConfigError,
    DuplicateTransfer,
    FederationError,
    IntegrityError,
    PeerAborted,
    PeerGone,
    RouteError,
    SerializationError,
    TransferTimeout,
    UnsafePayload,
)
from .party import Party
from .routing import Endpoint, RouteTable
from .table import Table
from .transport import Transport, available, register

if TYPE_CHECKING:
    from . import brokers

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "ConfigError",
    "DuplicateTransfer",
    "Endpoint",
    "Federation",
    "FederationError",
    "IntegrityError",
    "Party",
    "PeerAborted",
    "PeerGone",
    "RouteError",
    "RouteTable",
    "SerializationError",
    "Table",
    "TransferTimeout",
    "Transport",
    "UnsafePayload",
    "available",
    "brokers",
    "register",
]


def __getattr__(name: str) -> Any:
    if name == "brokers":  # imported on first use: launchers are not needed to use the library
        import importlib

        return importlib.import_module(".brokers", __name__)
    raise AttributeError(f"module 'fedtransport' has no attribute {name!r}")
