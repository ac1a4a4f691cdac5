"""pulsar-client connections of one session, and the client log they write.

``PulsarClients`` makes and keeps the ``pulsar.Client`` objects of a session: one per broker
the session produces to (its own, or in direct mode each destination's), and the receive
connections, ``receive_connections`` of them on our own broker, one I/O thread each, over
which the lanes we listen on are spread round robin. Closing a client closes its producers
and consumers too.

``open_client`` and ``close_client`` are how the library opens and closes every pulsar-client
``Client`` (sessions, doctor), and ``inside_client`` marks a thread inside a client call: at
interpreter exit the open clients are shut down and the exit waits, at most ``EXIT_WAIT``
seconds, for those threads to leave (see there). ``client_logger`` hands pulsar-client a logger
that cannot abort the process at exit either; ``check_credentials`` asks the broker itself
whether it takes our token before the first client connects (``probe``); ``client_kwargs``
turns the backend's options into the keyword arguments of ``pulsar.Client``.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import pulsar

from ...errors import BackendError
from .admin import read_token
from .probe import probe_connect

__all__ = [
    "EXIT_WAIT",
    "PulsarClients",
    "check_credentials",
    "client_kwargs",
    "client_logger",
    "close_client",
    "create_producer",
    "exiting",
    "inside_client",
    "open_client",
    "pulsar_call",
    "retrying",
    "subscribe",
]

log = logging.getLogger("fedtransport.pulsar")
_client_log = logging.getLogger("fedtransport.pulsar.client")
if _client_log.level == logging.NOTSET:  # pulsar-client's C++ INFO lines drown everything else
    _client_log.setLevel(logging.WARNING)
_CPP_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING, "ERROR": logging.ERROR}
_log_pipe: tuple[int, int] | None = None  # (pid that made it, write end)
_log_pipe_lock = threading.Lock()
_T = TypeVar("_T")


def client_logger() -> pulsar.FileLogger:
    """A logger for pulsar-client that feeds ``logging.getLogger("fedtransport.pulsar.client")``.

    Not a Python logger object: pulsar-client calls such a logger from its C++ threads, and at
    interpreter exit that aborts the process now and then ("terminate called without an
    active exception", exit code 134; measured: 12 of 60 party processes, pulsar-client 3.13,
    0 of 60 with this). Its C++ file logger writes into a pipe instead; a daemon thread turns
    the lines into log records. Its console logger would write to the user's stdout.
    """
    global _log_pipe
    with _log_pipe_lock:
        if _log_pipe is None or _log_pipe[0] != os.getpid():  # a forked child reads its own pipe
            read_fd, write_fd = os.pipe()
            threading.Thread(target=_forward_client_log, args=(read_fd,), name="ft-pulsar-log", daemon=True).start()
            _log_pipe = (os.getpid(), write_fd)
        write_fd = _log_pipe[1]
    level = _client_log.getEffectiveLevel()
    cpp = (
        pulsar.LoggerLevel.Debug if level <= logging.DEBUG else
        pulsar.LoggerLevel.Info if level <= logging.INFO else
        pulsar.LoggerLevel.Warn if level <= logging.WARNING else
        pulsar.LoggerLevel.Error
    )  # fmt: skip
    return pulsar.FileLogger(cpp, f"/proc/self/fd/{write_fd}")


def _forward_client_log(read_fd: int) -> None:
    # A line: "2026-12-05 09:15:14.188 ERROR [140586391697088] ClientConnection:485 | message"
    with open(read_fd, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            parts = line.split(" ", 4)
            level = _CPP_LEVELS.get(parts[2], logging.WARNING) if len(parts) == 5 else logging.WARNING
            message = parts[4].rstrip() if len(parts) == 5 else line.rstrip()
            _client_log.log(level, "%s", message)


def client_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``pulsar.Client`` from the backend's options (``client`` wins)."""
    kwargs: dict[str, Any] = {
        "operation_timeout_seconds": 30,
        "io_threads": 2,
        "tls_validate_hostname": bool(options["tls_validate_hostname"]),
        **dict(options["client"]),
    }
    if options["token"]:
        kwargs["authentication"] = pulsar.AuthenticationToken(read_token(options["token"]))
    if options["tls_trust_certs_file_path"]:
        kwargs["tls_trust_certs_file_path"] = options["tls_trust_certs_file_path"]
    return kwargs


def pulsar_call(what: str, call: Callable[[], Any]) -> Any:
    """``call()``, with pulsar-client's own exception types turned into ``BackendError``."""
    try:
        return call()
    except Exception as exc:
        raise BackendError(f"Pulsar: {what} failed: {exc}", broker_message=str(exc)) from exc


# Interpreter exit. pulsar-client's blocking calls give the GIL up and take it back every 100 ms;
# a Python thread still inside one when the interpreter finalises is stopped right there, and
# that aborts the process ("terminate called without an active exception", exit code 134). So
# the library tracks every client it opens and every thread inside a client call; at exit
# (atexit runs before the finalisation) it shuts the open clients down, which ends their pending
# calls, and waits at most EXIT_WAIT seconds for those threads to leave. From then on no client
# is opened and no call entered: retries stop and receive loops end.
EXIT_WAIT = 10.0
_registry = threading.Condition()
_open_clients: list[pulsar.Client] = []
_inside: dict[int, int] = {}  # thread ident -> depth of its client calls
_exiting = False
_pid = os.getpid()  # a forked child's exit leaves its parent's clients alone


def exiting() -> bool:
    """Whether the interpreter's exit has begun (the exit handler below ran)."""
    return _exiting


def open_client(url: str, **kwargs: Any) -> pulsar.Client:
    """A ``pulsar.Client`` writing to the library's client log, shut down at exit unless closed
    by ``close_client`` first. Refused (``BackendError``) once the exit has begun."""
    with _registry:
        if _exiting:
            raise BackendError(f"Pulsar: the process is exiting; no new client for {url}")
        client = pulsar.Client(url, logger=client_logger(), **kwargs)
        _open_clients.append(client)
    return client


def close_client(client: pulsar.Client) -> None:
    """Close a client of ``open_client`` (its producers and consumers with it); a failure is logged."""
    with _registry:
        if _exiting:
            return  # the exit handler shut it down, or does now
        if client in _open_clients:
            _open_clients.remove(client)
    try:
        with inside_client():
            client.close()
    except Exception as exc:
        log.debug("closing a Pulsar client: %s", exc)


@contextlib.contextmanager
def inside_client() -> Iterator[None]:
    """Marks the calling thread as inside a pulsar-client call, which the exit waits for.
    Refused (``BackendError``) once the exit has begun."""
    me = threading.get_ident()
    with _registry:
        if _exiting:
            raise BackendError("Pulsar: the process is exiting; no more client calls")
        _inside[me] = _inside.get(me, 0) + 1
    try:
        yield
    finally:
        with _registry:
            if _inside[me] == 1:
                del _inside[me]
                _registry.notify_all()
            else:
                _inside[me] -= 1


@atexit.register
def _shut_down_at_exit() -> None:
    global _exiting
    if os.getpid() != _pid:
        return
    with _registry:
        _exiting = True
        clients = list(_open_clients)
        _open_clients.clear()
    for client in clients:
        try:
            client.shutdown()  # fails the calls still pending on it, without waiting for the broker
        except Exception as exc:
            log.debug("shutting a Pulsar client down at exit: %s", exc)
    deadline = time.monotonic() + EXIT_WAIT
    with _registry:
        while _inside:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "Pulsar: %d thread(s) still inside pulsar-client %g s into the interpreter's exit; "
                    "exiting anyway (the process may abort)",
                    len(_inside),
                    EXIT_WAIT,
                )
                return
            _registry.wait(left)


def create_producer(client: pulsar.Client, topic: str, **kwargs: Any) -> pulsar.Producer:
    """``client.create_producer(topic, **kwargs)``, waited for in Python (see ``_WaitInPython``)."""
    return _waiting_in_python(client).create_producer(topic, **kwargs)


def subscribe(client: pulsar.Client, topic: str, subscription: str, **kwargs: Any) -> pulsar.Consumer:
    """``client.subscribe(topic, subscription, **kwargs)``, waited for in Python (see ``_WaitInPython``)."""
    return _waiting_in_python(client).subscribe(topic, subscription, **kwargs)


def _waiting_in_python(client: pulsar.Client) -> Any:
    shim = copy.copy(client)  # pulsar.Client builds the configuration, then asks its native client
    shim._client = _WaitInPython(client._client)
    return shim


class _WaitInPython:
    """A pulsar-client native client whose producer and consumer creation waits in Python, on
    the native async call's callback. A create_producer whose client is shut down mid-lookup
    may never return (seen: 1 of 8 exits with a frozen broker), and a thread left in the native
    wait loop aborts the process at exit; a thread waiting here leaves once the exit began."""

    def __init__(self, native: Any) -> None:
        self._native = native

    def __getattr__(self, name: str) -> Any:
        return getattr(self._native, name)

    def create_producer(self, topic: str, conf: Any) -> Any:
        return _wait_for(lambda done: self._native.create_producer_async(topic, conf, done))

    def subscribe(self, topic: str, subscription: str, conf: Any) -> Any:
        return _wait_for(lambda done: self._native.subscribe_async(topic, subscription, conf, done))


def _wait_for(start: Callable[[Callable[[Any, Any], None]], None]) -> Any:
    box: list[tuple[Any, Any]] = []
    came = threading.Event()

    def done(result: Any, value: Any) -> None:
        box.append((result, value))
        came.set()

    start(done)
    while not came.wait(0.1):
        if _exiting:
            raise BackendError("Pulsar: the process is exiting; the call was given up")
    result, value = box[0]
    if result != pulsar.Result.Ok:  # the exception type the blocking call raises
        raise getattr(pulsar.exceptions, result.name, pulsar.exceptions.PulsarException)(f"Pulsar error: {result.name}")
    return value


def bounded(call: Callable[[], _T], timeout: float, message: str, late: Callable[[_T], None]) -> _T:
    """``call()``, waited for at most ``timeout`` seconds, then :class:`TimeoutError` ``message``.

    For pulsar-client calls that block for the client's operation timeout (30 s) whatever
    the caller's own bound. The call runs on a thread of its own; what it returns after the
    caller gave up goes to ``late`` (to close it)."""
    box: list[tuple[bool, Any]] = []
    lock = threading.Lock()
    done = threading.Event()

    def run() -> None:
        try:
            with inside_client():
                result: tuple[bool, Any] = (True, call())
        except BaseException as exc:
            result = (False, exc)
        with lock:
            box.append(result)
            done.set()
            abandoned = len(box) > 1
        if abandoned and result[0]:
            with contextlib.suppress(BackendError), inside_client():  # refused at exit: shut down with its client
                late(result[1])

    # A daemon: a call on a client closed under it may never return. The exit handler shuts
    # its client down and waits (bounded) for it to leave the call.
    threading.Thread(target=run, name="ft-pulsar-call", daemon=True).start()
    if not done.wait(timeout):
        with lock:
            if not done.is_set():
                box.append((False, None))  # marks the call abandoned
                raise TimeoutError(message)
    ok, value = box[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value


def retrying(
    call: Callable[[], _T],
    *,
    retryable: Callable[[Exception], bool],
    timeout: float,
    closed: threading.Event,
    note: Callable[[Exception, float], None],
) -> _T:
    """``call()``, again after a refusal that ``retryable`` accepts, for up to ``timeout``
    seconds: waits from 0.2 s doubling to 5 s, each announced by ``note(exc, delay)``. The last
    refusal is raised, at once when the session closes or the interpreter exits."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            return call()
        except Exception as exc:
            if not retryable(exc) or closed.is_set() or _exiting or time.monotonic() + delay > deadline:
                raise
            note(exc, delay)
            closed.wait(delay)
            delay = min(delay * 2, 5.0)


def check_credentials(url: str, options: Mapping[str, Any]) -> str:
    """Ask the broker itself whether it takes our token (or none): pulsar-client would retry a
    refusal until its operation timeout and then say only ``Timeout``. Raises BackendError
    saying authentication failed; else returns a note for a failing round trip (" (why)")."""
    kwargs = client_kwargs(options)
    if "authentication" in dict(options["client"]):
        return ""  # an authentication plugin of the caller's: only pulsar-client can speak it
    answer = probe_connect(
        url,
        token=read_token(options["token"]),
        tls_trust_certs_file_path=kwargs.get("tls_trust_certs_file_path"),
        tls_validate_hostname=bool(kwargs.get("tls_validate_hostname", True)),
        tls_allow_insecure_connection=bool(kwargs.get("tls_allow_insecure_connection", False)),
        timeout=min(10.0, float(kwargs["operation_timeout_seconds"])),
    )
    if answer.authentication_refused:
        given = "the broker rejected the token" if options["token"] else "no token given"
        raise BackendError(
            f"Pulsar: authentication failed at {url} ({given}): the broker answered {answer.error}: {answer.message}",
            broker_message=answer.message,
        )
    return f" ({answer.problem})" if answer.problem else ""


class PulsarClients:
    """The ``pulsar.Client`` objects of one session (see the module docstring).

    ``service_url`` is this party's own broker; the transport sets it at open when it
    starts the embedded broker.
    """

    def __init__(self, options: Mapping[str, Any], service_url: str | None) -> None:
        self.service_url = service_url
        self._options = options
        self._lock = threading.Lock()
        self._clients: dict[str, pulsar.Client] = {}
        self._receive_clients: list[pulsar.Client] = []  # our own broker, one connection each
        self._lanes_placed = 0

    def new(self, url: str, **extra: Any) -> pulsar.Client:
        """A client of its own, which the caller closes."""
        try:
            return open_client(url, **{**client_kwargs(self._options), **extra})
        except BackendError:
            raise
        except Exception as exc:  # pulsar raises its own exception types
            raise BackendError(f"cannot create a Pulsar client for {url}: {exc}", broker_message=str(exc)) from exc

    def client(self, url: str) -> pulsar.Client:
        """The shared client of the broker at ``url`` (producers, the connect check)."""
        with self._lock:
            client = self._clients.get(url)
            if client is None:
                client = self._clients[url] = self.new(url)
            return client

    def receive_client(self) -> pulsar.Client:
        """The connection for the next lane we listen on: round robin over ``receive_connections``."""
        assert self.service_url is not None
        with self._lock:
            index = self._lanes_placed % int(self._options["receive_connections"])
            self._lanes_placed += 1
            if index == len(self._receive_clients):  # one connection needs one I/O thread
                self._receive_clients.append(self.new(self.service_url, io_threads=1))
            return self._receive_clients[index]

    def close(self) -> None:
        """Close every client, and with them their producers and consumers."""
        with self._lock:
            clients = [*self._clients.values(), *self._receive_clients]
            self._clients.clear()
            self._receive_clients.clear()
        for client in clients:
            close_client(client)
