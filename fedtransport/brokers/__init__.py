"""Local brokers for the demo, the benchmarks and the tests.

``EmbeddedPulsar`` runs the Pulsar-protocol broker shipped in the ``pulsar-lite``
wheel; ``PulsarStandalone`` runs the real Apache Pulsar broker in standalone mode
(Java 17, jars resolved with Maven once); ``RabbitNode`` runs a throw-away
``rabbitmq-server`` node. All bind to 127.0.0.1 on free ports and remove
everything they started on exit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["EmbeddedPulsar", "HAProxy", "PulsarStandalone", "RabbitNode"]

if TYPE_CHECKING:
    from .proxy import HAProxy
    from .pulsar import EmbeddedPulsar
    from .rabbitmq import RabbitNode
    from .standalone import PulsarStandalone


def __getattr__(name: str) -> Any:
    # Imported lazily so ``import fedtransport`` never pays for broker modules.
    if name == "EmbeddedPulsar":
        from .pulsar import EmbeddedPulsar

        return EmbeddedPulsar
    if name == "HAProxy":
        from .proxy import HAProxy

        return HAProxy
    if name == "PulsarStandalone":
        from .standalone import PulsarStandalone

        return PulsarStandalone
    if name == "RabbitNode":
        from .rabbitmq import RabbitNode

        return RabbitNode
    raise AttributeError(name)
