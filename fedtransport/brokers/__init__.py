"""Local brokers for the demo, the benchmarks and the tests.

``EmbeddedPulsar`` runs the Pulsar-protocol broker shipped in the ``pulsar-lite``
wheel; ``RabbitNode`` runs a throw-away ``rabbitmq-server`` node. Both bind to
127.0.0.1 on free ports and remove everything they started on exit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["EmbeddedPulsar", "HAProxy", "RabbitNode"]

if TYPE_CHECKING:
    from .proxy import HAProxy
    from .pulsar import EmbeddedPulsar
    from .rabbitmq import RabbitNode


def __getattr__(name: str) -> Any:
    # Imported lazily so ``import fedtransport`` never pays for broker modules.
    if name == "EmbeddedPulsar":
        from .pulsar import EmbeddedPulsar

        return EmbeddedPulsar
    if name == "HAProxy":
        from .proxy import HAProxy

        return HAProxy
    if name == "RabbitNode":
        from .rabbitmq import RabbitNode

        return RabbitNode
    raise AttributeError(name)
