"""Presence on a RabbitMQ node: is a peer's session connected right now?

Every session of a party consumes from the party's presence queue ``{job}:present:{role}:{id}``,
an auto-delete queue: the broker deletes it the moment its last consumer goes, and a consumer
goes the moment its connection closes, a SIGKILLed process's included (the kernel closes its
sockets). A peer asks with a passive ``queue.declare``, answered from the node's live state:
declare-ok with consumers, the party is connected; 404 (or no consumer), it is not. (The
management API's connection list was tried first: it lags by its statistics interval, ~5 s,
so a peer that had just connected showed as absent.) The check runs on a channel of its own,
since a 404 closes the channel. Sessions of one party (Spark tasks, a restarted process) share
the queue; one that declares it just as the last other consumer leaves tries again.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any

import pika.exceptions
from pika.channel import Channel

from ...errors import BackendError
from ...party import Party
from .connection import RabbitConnection
from .naming import RabbitNames

log = logging.getLogger("fedtransport.rabbitmq")

_RETRY = 1.0  # seconds before the presence queue is declared again after the broker refused it


class Presence:
    """This session's presence queue and passive checks of peers' (see the module docstring)."""

    def __init__(self, connection: RabbitConnection, names: RabbitNames) -> None:
        self._conn = connection
        self._names = names
        self._epoch = 0  # bumped per connection: a retry timer of an old connection does nothing
        connection.add_listener(self)

    # ConnectionListener (I/O thread) --------------------------------------------------------

    def connection_opened(self) -> None:
        self._epoch += 1
        self._declare(self._epoch)

    def connection_lost(self) -> None:
        self._epoch += 1

    def shutting_down(self) -> None:
        self._epoch += 1

    def _declare(self, epoch: int) -> None:
        if epoch != self._epoch or not self._conn.is_open:
            return
        name = self._names.presence(self._names.me)

        def closed(ch: Channel, exc: BaseException) -> None:
            if isinstance(exc, pika.exceptions.ChannelClosedByBroker):  # e.g. deleted between declare and consume
                log.info("the presence queue %s: %s; declaring it again", name, exc)
                self._conn.call_later(_RETRY, lambda: self._declare(epoch))

        def opened(ch: Channel) -> None:
            ch.add_on_close_callback(closed)
            consume = lambda frame: ch.basic_consume(name, lambda *_: None, auto_ack=True)  # noqa: E731
            ch.queue_declare(name, auto_delete=True, callback=consume)

        self._conn.open_channel(opened)

    # caller threads -------------------------------------------------------------------------

    def present(self, party: Party, timeout: float) -> bool | None:
        """True/False as the node sees it now; None when it could not be asked in ``timeout``."""
        answer: concurrent.futures.Future[bool | None] = concurrent.futures.Future()
        name = self._names.presence(party)

        def settle(value: bool | None) -> None:
            if not answer.done():
                answer.set_result(value)

        def ask() -> None:
            if not self._conn.is_open:
                settle(None)
                return

            def closed(ch: Channel, exc: BaseException) -> None:
                gone = isinstance(exc, pika.exceptions.ChannelClosedByBroker) and exc.reply_code == 404
                settle(False if gone else None)

            def declared(frame: Any, ch: Channel) -> None:
                settle(frame.method.consumer_count > 0)
                ch.close()

            def opened(ch: Channel) -> None:
                ch.add_on_close_callback(closed)
                ch.queue_declare(name, passive=True, callback=lambda frame: declared(frame, ch))

            self._conn.open_channel(opened)

        try:
            self._conn.post(ask)
            return answer.result(timeout)
        except (BackendError, concurrent.futures.TimeoutError):
            return None
