"""The RabbitMQ connection of a session: one pika I/O thread, reconnecting on its own.

One ``SelectConnection`` per session runs on one thread of its own (pika's asynchronous
IOLoop); every channel operation happens there. Other threads hand work over with ``post``,
which batches the calls that arrive meanwhile into one wake-up of the loop.

When the connection drops (node restarted, network), it is made again with bounded
exponential back-off (``RETRY_FIRST`` doubling up to ``reconnect_max_delay``); listeners
(the publisher, the consumers) are told when it opens, when it is lost and when it shuts
down, and bring their channels back themselves. ``close`` says goodbye to the broker
(queued acks are flushed) and joins the thread.

This layer knows nothing of queues, messages or the management API.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop, SelectConnection
from pika.channel import Channel

from ...errors import BackendError, ConfigError
from ...party import Party

__all__ = ["RETRY_FIRST", "ConnectionListener", "RabbitConnection", "reason", "safe"]

log = logging.getLogger("fedtransport.rabbitmq")
_pika_log = logging.getLogger("pika")
if _pika_log.level == logging.NOTSET:
    # pika logs every lost connection at ERROR with stack traces; we report connection
    # problems ourselves (WARNING, with the broker's reply text) and retry.
    _pika_log.setLevel(logging.CRITICAL)

RETRY_FIRST = 0.2  # seconds: first reconnect / channel re-open delay, doubled up to the cap
_FIRST_REFUSALS = 5  # times the first connection is tried again when the broker refuses the job user
_CLOSE_WAIT = 15.0  # seconds close() waits for the I/O thread to say goodbye to the broker


def reason(exc: BaseException | None) -> str:
    """pika's exceptions as one readable line (they nest the broker's reply text)."""
    if exc is None:
        return "unknown reason"
    if isinstance(exc, (pika.exceptions.ChannelClosed, pika.exceptions.ConnectionClosed)):
        return f"{exc.reply_code} {exc.reply_text}"
    attempts = getattr(exc, "exceptions", None)  # a failed connection workflow: its attempts
    if attempts:
        return reason(attempts[-1])
    cause = getattr(exc, "exception", None)  # one phase of an attempt: TCP, TLS or AMQP handshake
    if isinstance(cause, BaseException):
        return reason(cause)
    if exc.args and isinstance(exc.args[0], BaseException):  # AMQPConnectionError(workflow error)
        return reason(exc.args[0])
    return f"{type(exc).__name__}: {exc}"


def safe(fn: Callable[..., None]) -> Callable[..., None]:
    """Callbacks run inside pika's IOLoop: an exception there would end the I/O thread."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("RabbitMQ I/O callback %s failed", getattr(fn, "__name__", fn))

    return wrapper


class ConnectionListener(Protocol):
    """What the layers above are told, on the I/O thread."""

    def connection_opened(self) -> None: ...

    def connection_lost(self) -> None: ...

    def shutting_down(self) -> None: ...


class RabbitConnection:
    """One session's connection and its I/O thread (see the module docstring).

    ``options`` are the backend's checked options (``host``, ``port``, ``heartbeat``,
    ``connect_timeout``, ``blocked_connection_timeout``, ``reconnect_max_delay``); the
    connection logs in to ``vhost`` as the job's data user.
    """

    def __init__(
        self,
        options: Mapping[str, Any],
        *,
        vhost: str,
        user: str,
        password: str,
        ssl_settings: Mapping[str, str] | None,
        job_id: str,
        party: Party,
    ) -> None:
        self.host: str = options["host"]
        self.port: int = options["port"]
        self.vhost = vhost
        self.user = user
        self._password = password
        self._ssl = ssl_settings
        self._job_id = job_id
        self._party = party
        self._heartbeat = int(options["heartbeat"])
        self._blocked_timeout = float(options["blocked_connection_timeout"])
        self._max_delay = float(options["reconnect_max_delay"])
        self.connect_timeout = float(options["connect_timeout"])
        self._listeners: list[ConnectionListener] = []
        self._close_lock = threading.Lock()
        self.closed = False
        self.problem = ""  # the last connection problem, for error messages

        # I/O thread state: touched only on that thread once it runs.
        self._loop: IOLoop | None = None
        self._thread: threading.Thread | None = None
        self._io_ident: int | None = None
        self._params: pika.ConnectionParameters | None = None
        self._conn: SelectConnection | None = None
        self.stopping = False
        self._connected_once = False
        self._first_refusals = 0
        self._first = threading.Event()  # first publisher channel ready, or first failure
        self._first_error: str | None = None
        self._backoff = RETRY_FIRST
        self._outage_since: float | None = None
        self._reconnect_timer: Any = None
        self._posted: list[Callable[[], None]] = []  # calls for the I/O thread, run by one wake-up
        self._posted_lock = threading.Lock()
        self._drain_scheduled = False

    def add_listener(self, listener: ConnectionListener) -> None:
        """Told in the order added: the publisher's channel opens before the consumers'."""
        self._listeners.append(listener)

    @property
    def scheme(self) -> str:
        return "amqps" if self._ssl is not None else "amqp"

    # caller threads ------------------------------------------------------------------------

    def _parameters(self) -> pika.ConnectionParameters:
        ssl_options = None
        if self._ssl is not None:
            s = self._ssl
            try:
                context = ssl.create_default_context(cafile=s.get("ca_file"))
                if "cert_file" in s:
                    context.load_cert_chain(s["cert_file"], s.get("key_file"))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"option 'ssl': cannot load the CA or client certificate: {exc}") from exc
            ssl_options = pika.SSLOptions(context, server_hostname=s.get("server_hostname", self.host))
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(self.user, self._password),
            ssl_options=ssl_options,
            heartbeat=self._heartbeat,
            blocked_connection_timeout=self._blocked_timeout,
            connection_attempts=1,  # retries are ours, with back-off
            socket_timeout=self.connect_timeout,
            stack_timeout=self.connect_timeout,
            client_properties={"connection_name": f"fedtransport {self._job_id} {self._party}"},
        )

    def start(self) -> None:
        """Start the I/O thread; return once the first publisher channel is ready.

        Raises ``BackendError`` with the broker's reason when the first connection fails;
        the caller then closes."""
        self._params = self._parameters()
        self._loop = IOLoop()
        self._thread = threading.Thread(target=self._run, name=f"ft-rabbit-{self._party}", daemon=True)
        self._thread.start()
        if not self._first.wait(self.connect_timeout * 2 + 5) or self._first_error is not None:
            why = self._first_error or f"no answer in {self.connect_timeout:.0f} s"
            raise BackendError(
                f"RabbitMQ: cannot connect to {self.scheme}://{self.host}:{self.port}/{self.vhost} "
                f"as {self.user}: {why}",
                broker_message=why,
            )

    def close(self) -> bool:
        """Stop the I/O thread; False when it was closed already (idempotent)."""
        with self._close_lock:
            if self.closed:
                return False
            self.closed = True
        thread, loop = self._thread, self._loop
        if thread is not None and loop is not None and thread.is_alive():
            with contextlib.suppress(Exception):  # the loop may have ended and closed meanwhile
                loop.add_callback_threadsafe(self._shutdown)
            thread.join(_CLOSE_WAIT)
            if thread.is_alive():
                log.warning("the RabbitMQ I/O thread of %s did not stop in %.0f s", self._party, _CLOSE_WAIT)
        return True

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the I/O thread (now, when already on it)."""
        if threading.get_ident() == self._io_ident:
            fn()
            return
        loop = self._loop
        if loop is None or self.closed:
            raise BackendError("the RabbitMQ transport is closed")
        # Calls queue up here and one wake-up of the loop runs all that arrived meanwhile: waking
        # pika's loop is a syscall under a lock, and with many transfers in flight it was the cost.
        with self._posted_lock:
            self._posted.append(fn)
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        try:
            loop.add_callback_threadsafe(self._drain_posted)
        except Exception as exc:  # the loop was closed under us
            raise BackendError(f"the RabbitMQ transport is closed ({exc})") from None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    # I/O thread: for the layers above ------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Open and not shutting down: channels may be opened."""
        conn = self._conn
        return not self.stopping and conn is not None and conn.is_open

    def open_channel(self, on_open: Callable[[Channel], None]) -> None:
        assert self._conn is not None
        self._conn.channel(on_open_callback=safe(on_open))

    def call_later(self, delay: float, fn: Callable[[], None]) -> Any:
        assert self._loop is not None
        return self._loop.call_later(delay, safe(fn))

    def remove_timeout(self, timer: Any) -> None:
        if self._loop is not None:
            self._loop.remove_timeout(timer)

    def established(self) -> None:
        """The publisher's channel is ready: the connection counts as up (again)."""
        self._backoff = RETRY_FIRST
        self._connected_once = True
        self.problem = ""
        if self._outage_since is not None:
            down = time.monotonic() - self._outage_since
            self._outage_since = None
            log.warning("RabbitMQ connection of %s is back after %.1f s", self._party, down)
        self._first.set()

    # I/O thread: the connection's own life -------------------------------------------------

    def _run(self) -> None:
        assert self._loop is not None
        self._io_ident = threading.get_ident()
        self._connect()
        while True:
            try:
                self._loop.start()
                break
            except Exception:  # a pika bug must not silently end the session's I/O
                log.exception("the RabbitMQ I/O loop failed")
                if self.stopping:
                    break
        try:
            self._loop.close()
        finally:
            self._first.set()

    def _drain_posted(self) -> None:
        with self._posted_lock:
            calls, self._posted = self._posted, []
            self._drain_scheduled = False
        for fn in calls:
            try:
                fn()
            except Exception:  # as safe(): an exception must not end the I/O thread
                log.exception("RabbitMQ I/O call %s failed", fn)

    @safe
    def _connect(self) -> None:
        self._reconnect_timer = None
        if self.stopping:
            return
        assert self._params is not None
        self._conn = SelectConnection(
            self._params,
            on_open_callback=safe(self._on_open),
            on_open_error_callback=safe(self._on_open_error),
            on_close_callback=safe(self._on_closed),
            custom_ioloop=self._loop,
        )

    def _retry_connect(self, why: str) -> None:
        assert self._loop is not None
        if self._outage_since is None:  # one warning per outage, the attempts at INFO
            self._outage_since = time.monotonic()
            log.warning("RabbitMQ connection of %s: %s; reconnecting", self._party, why)
        self.problem = why
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self._max_delay)
        log.info("RabbitMQ connection of %s: %s; next attempt in %.1f s", self._party, why, delay)
        self._reconnect_timer = self._loop.call_later(delay, self._connect)

    def _on_open(self, conn: SelectConnection) -> None:
        if self.stopping:
            conn.close()
            return
        self._conn = conn
        for listener in self._listeners:
            listener.connection_opened()

    def _on_open_error(self, conn: SelectConnection, exc: BaseException) -> None:
        self._conn = None
        if self.stopping:
            self._loop_stop()
        elif (
            not self._connected_once
            and self._first_refusals < _FIRST_REFUSALS
            and isinstance(exc, (pika.exceptions.ProbableAccessDeniedError, pika.exceptions.ConnectionClosedByBroker))
        ):
            # A vhost or permission the management API has just created may not be in force on
            # the node yet (seen when two parties create a job's vhost at once): try again shortly.
            self._first_refusals += 1
            self._retry_connect(f"the broker refused the new job user: {reason(exc)}")
        elif not self._connected_once:
            self._first_error = reason(exc)  # start() reports it; nothing to retry for
            self.stopping = True
            self._loop_stop()
        else:
            self._retry_connect(f"reconnecting failed: {reason(exc)}")

    def _on_closed(self, conn: SelectConnection, exc: BaseException) -> None:
        self._conn = None
        for listener in self._listeners:
            listener.connection_lost()
        if self.stopping:
            self._loop_stop()
        else:
            self._retry_connect(f"connection lost: {reason(exc)}")

    def _loop_stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()

    @safe
    def _shutdown(self) -> None:
        self.stopping = True
        if self._reconnect_timer is not None:
            self.remove_timeout(self._reconnect_timer)
            self._reconnect_timer = None
        for listener in self._listeners:
            listener.shutting_down()
        conn = self._conn
        if conn is not None and not (conn.is_closing or conn.is_closed):
            try:
                conn.close()  # flushes queued acks first; _on_closed stops the loop
                return
            except pika.exceptions.ConnectionWrongStateError:
                pass
        self._loop_stop()
