"""A TCP relay for tests: a door on another loopback address to a broker that listens on 127.0.0.1.

The launchers bind every broker to 127.0.0.1; a test of IPv6 route hosts reaches them through
``Relay("::1", port)``, which accepts on a free port of ``[::1]`` and copies bytes both ways.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

__all__ = ["Relay", "ipv6_loopback"]


def ipv6_loopback() -> bool:
    """Whether this machine can listen on ``::1`` (containers without IPv6 cannot)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class Relay:
    """Accepts on ``listen_host`` (a free port, ``.port``) and connects each client to ``127.0.0.1:target_port``."""

    def __init__(self, listen_host: str, target_port: int) -> None:
        family = socket.AF_INET6 if ":" in listen_host else socket.AF_INET
        self._server = socket.socket(family, socket.SOCK_STREAM)
        self._server.bind((listen_host, 0))
        self._server.listen(64)
        self.port: int = self._server.getsockname()[1]
        self.accepted = 0
        self._target = ("127.0.0.1", target_port)
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name=f"relay:{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self._target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self.accepted += 1
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:  # one side ended: end the other, as a direct connection would
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._open = self._open, []
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; close alone would not
        self._server.close()
        for s in sockets:
            s.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
