"""Presence on a RabbitMQ node: is a peer's session connected right now?

Each session (but Spark tasks' extra sessions, ``lane_offset`` > 0) declares an exclusive
queue ``{job}:present:{role}:{party_id}`` on its connection. The broker deletes an exclusive
queue the moment its connection closes, a SIGKILLed process's included (the kernel closes its
sockets), so a passive ``queue.declare`` of a peer's presence queue answers from the node's
live state: 405 RESOURCE_LOCKED (exclusive to another connection), the peer is connected;
404, it is not. A passive declare needs no permission on the queue. (The management API's
connection list was tried first and lags by its statistics interval, ~5 s: a peer that had
just connected showed as absent.) The check runs on a channel of its own, since a 404 closes
the channel. A second session of the same party finds the queue locked (405) and tries again
now and then, so it takes over when the first one ends.
"""

from __future__ import annotations

import concurrent.futures
import logging

import pika.exceptions
from pika.channel import Channel

from ...errors import BackendError
from ...party import Party
from .connection import RabbitConnection
from .naming import RabbitNames

log = logging.getLogger("fedtransport.rabbitmq")

_RETRY_LOCKED = 5.0  # seconds before a session of a party already present tries to own the queue again


class Presence:
    """This session's presence queue and passive checks of peers' (see the module docstring)."""

    def __init__(self, connection: RabbitConnection, names: RabbitNames, *, announce: bool) -> None:
        self._conn = connection
        self._names = names
        self._announce = announce
        self._epoch = 0  # bumped per connection: a retry timer of an old connection does nothing
        connection.add_listener(self)

    # ConnectionListener (I/O thread) --------------------------------------------------------

    def connection_opened(self) -> None:
        self._epoch += 1
        if self._announce:
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
            if isinstance(exc, pika.exceptions.ChannelClosedByBroker) and exc.reply_code == 405:
                self._conn.call_later(_RETRY_LOCKED, lambda: self._declare(epoch))  # another session has it
            elif isinstance(exc, pika.exceptions.ChannelClosedByBroker):
                log.warning("the presence queue %s was refused: %s", name, exc)

        def opened(ch: Channel) -> None:
            ch.add_on_close_callback(closed)
            ch.queue_declare(name, exclusive=True, auto_delete=True)

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
                code = exc.reply_code if isinstance(exc, pika.exceptions.ChannelClosedByBroker) else None
                settle({404: False, 405: True}.get(code))  # type: ignore[arg-type]

            def declared(frame: object, ch: Channel) -> None:
                settle(True)
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
