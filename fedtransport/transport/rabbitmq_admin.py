"""Old import path of the RabbitMQ management client: it lives in ``fedtransport.transport.rabbitmq.admin``.

Kept because test fixtures and user code import ``RabbitAdmin`` from here.
"""

from .rabbitmq.admin import DEFAULT_FEDERATION_PREFETCH, RabbitAdmin

__all__ = ["DEFAULT_FEDERATION_PREFETCH", "RabbitAdmin"]
