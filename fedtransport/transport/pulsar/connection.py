"""pulsar-client connections of one session, and the client log they write.

``PulsarClients`` makes and keeps the ``pulsar.Client`` objects of a session: one per broker
the session produces to (its own, or in direct mode each destination's), and the receive
connections, ``receive_connections`` of them on our own broker, one I/O thread each, over
which the lanes we listen on are spread round robin. Closing a client closes its producers
and consumers too.

``client_logger`` hands pulsar-client a logger that cannot abort the process at exit (see
there); ``check_credentials`` asks the broker itself whether it takes our token before the
first client connects (``probe``); ``client_kwargs`` turns the backend's options into the
keyword arguments of ``pulsar.Client``.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import pulsar

from ...errors import BackendError
from .admin import read_token
from .probe import probe_connect

__all__ = ["PulsarClients", "check_credentials", "client_kwargs", "client_logger", "pulsar_call", "retrying"]

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


# Calls given up on and maybe still inside the C++ client. A daemon thread that comes back
# from it for the GIL while the interpreter shuts down aborts the process ("terminate called
# without an active exception"), so exit gives them a bounded while to finish first; one that
# never comes back (a call on a client closed under it) is left, which does not abort.
_abandoned: set[threading.Thread] = set()
_EXIT_WAIT = 10.0


@atexit.register
def _let_abandoned_calls_finish() -> None:
    deadline = time.monotonic() + _EXIT_WAIT
    for worker in list(_abandoned):
        worker.join(max(0.0, deadline - time.monotonic()))


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
            result: tuple[bool, Any] = (True, call())
        except BaseException as exc:
            result = (False, exc)
        with lock:
            box.append(result)
            done.set()
            abandoned = len(box) > 1
        if abandoned and result[0]:
            late(result[1])
        _abandoned.discard(threading.current_thread())

    worker = threading.Thread(target=run, name="ft-pulsar-call", daemon=True)
    worker.start()
    if not done.wait(timeout):
        with lock:
            if not done.is_set():
                box.append((False, None))  # marks the call abandoned
                _abandoned.add(worker)
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
    refusal is raised, at once when the session closes."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            return call()
        except Exception as exc:
            if not retryable(exc) or closed.is_set() or time.monotonic() + delay > deadline:
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
            return pulsar.Client(url, logger=client_logger(), **{**client_kwargs(self._options), **extra})
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
            try:
                client.close()
            except Exception as exc:
                log.debug("closing a Pulsar client: %s", exc)
