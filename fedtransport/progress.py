"""A text progress bar for the ``progress=`` callback of ``remote`` and ``get``.

    fed.remote(big, "w", "0", [host], progress=ProgressBar("sending w"))

Shown only for transfers of at least ``min_bytes`` (64 MiB by default), redrawn at
most ten times a second, on a terminal as one line rewritten in place and
elsewhere (logs, CI) as a line every 25 % (every ``min_bytes`` for tables, whose
size is not known up front).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

__all__ = ["ProgressBar"]

MiB = 1 << 20
_WIDTH = 30


class ProgressBar:
    def __init__(self, label: str, *, min_bytes: int = 64 * MiB, stream: TextIO | None = None) -> None:
        self.label = label
        self.min_bytes = min_bytes
        self.stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._lock = threading.Lock()
        self._started: float | None = None  # the first report: a get may wait long before data comes
        self._last_draw = 0.0
        self._first = 0
        self._last_step = -1
        self._finished = False

    def __call__(self, done: int, total: int | None) -> None:
        if max(done, total or 0) < self.min_bytes:
            return
        with self._lock:
            if self._finished:
                return
            now = time.monotonic()
            if self._started is None:  # rates count from the first report: what came before is unknown
                self._started, self._first = now, done
            complete = total is not None and done >= total
            elapsed = now - self._started
            rate = f"{(done - self._first) / 1e6 / elapsed:7.1f} MB/s" if elapsed >= 0.2 else "           "
            if total:
                share = min(done / total, 1.0)
                bar = "#" * int(share * _WIDTH)
                sizes = f"{done / MiB:8.1f}/{total / MiB:.1f} MiB"
                text = f"{self.label} [{bar:<{_WIDTH}}] {share:4.0%} {sizes} {rate}"
                step = int(share * 4)  # off a terminal: a line every 25 %
            else:
                text = f"{self.label} {done / MiB:8.1f} MiB {rate}"
                step = done // self.min_bytes  # size unknown (a table): a line every min_bytes
            if self._tty:
                if complete or now - self._last_draw >= 0.1:
                    self._last_draw = now
                    self.stream.write("\r" + text + ("\n" if complete else ""))
                    self.stream.flush()
            elif complete or step > self._last_step:
                self._last_step = step
                self.stream.write(text + "\n")
                self.stream.flush()
            self._finished = complete
