"""Party processes for tests that need parties (or their deaths) in separate processes.

Run with multiprocessing's spawn context; results come back on a queue.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fedtransport as ft


def digest(value: Any) -> str:
    import numpy as np

    if isinstance(value, np.ndarray):
        return hashlib.sha256(value.tobytes()).hexdigest()
    return hashlib.sha256(repr(value).encode()).hexdigest()


def big_array(mib: int, seed: int = 0) -> Any:
    import numpy as np

    return np.random.default_rng(seed).random(mib * (1 << 20) // 8)


def receiver(backend: str, job_id: str, party: tuple[str, str], peer: tuple[str, str], options: dict[str, Any],
             name: str, tag: str, out: Any, report_progress_after: int = 0) -> None:  # fmt: skip
    """Get one transfer and put its digest on ``out``; with ``report_progress_after``, also put
    ``("progress", n)`` once that many messages of it arrived (the parent may then kill us).

    SIGTERM ends the process as a container runtime's stop does: the session's ``with`` block
    unwinds and closes its connections, but nothing is handed over or acknowledged."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    src = ft.Party(*peer)
    with ft.Federation.connect(backend, job_id=job_id, party=ft.Party(*party), options=options) as fed:
        if report_progress_after:

            def watch() -> None:
                tid = ft.framing.transfer_id(job_id, name, tag, str(src), str(fed.party))
                while True:
                    inc = fed._inbox.entry(src, tid)  # test probe into the inbox
                    if inc is not None and inc.assembly.messages >= report_progress_after:
                        out.put(("progress", inc.assembly.messages))
                        return
                    time.sleep(0.01)

            threading.Thread(target=watch, daemon=True).start()
        [value] = fed.get(name, tag, [src], timeout=300)
        out.put(("done", digest(value)))


def sender(backend: str, job_id: str, party: tuple[str, str], peer: tuple[str, str], options: dict[str, Any],
           name: str, tag: str, mib: int, out: Any) -> None:  # fmt: skip
    with ft.Federation.connect(backend, job_id=job_id, party=ft.Party(*party), options=options) as fed:
        value = big_array(mib)
        fed.remote(value, name, tag, [ft.Party(*peer)])
        out.put(("sent", digest(value)))


# --- big tables, generated and checked without ever holding them whole ---------------------------

ROW = 8192  # float64 values per record: 64 KiB


def wait_for(probe: Any, what: str, bound: float = 120.0) -> Any:
    """``probe()`` once truthy; ``bound`` seconds is a liveness bound, not an assertion about speed
    (management statistics and proxy logs trail the events they record)."""
    deadline = time.monotonic() + bound
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {bound:.0f} s for {what}")
        threading.Event().wait(0.05)


def status_bytes(field: str) -> int:
    """A size this process's /proc/self/status gives (``VmRSS``, ``VmHWM``, ``VmSize``), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss() -> int:
    return status_bytes("VmRSS")


class PeakRSS:
    """The highest RSS of this process while the block runs (sampled, and the kernel's own mark)."""

    def __enter__(self) -> PeakRSS:
        self.start = rss()
        self.peak = self.start
        self._hwm = False
        try:  # reset the kernel's high-water mark (VmHWM) to the current RSS; ru_maxrss would not do:
            # a spawned child inherits the mark of the parent it was forked from
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm = True
        except OSError:
            pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._hwm:
            self.peak = max(self.peak, status_bytes("VmHWM"))

    @property
    def growth(self) -> int:
        return self.peak - self.start


def table_partition(p: int, records: int) -> Any:
    """Partition ``p``: ``records`` records ``(key, 64 KiB array)``, generated lazily."""
    import numpy as np

    rng = np.random.default_rng(p)
    for i in range(records):
        yield (p, i), rng.random(ROW)


def _fold(h: Any, key: Any, value: Any) -> None:
    h.update(repr(key).encode())
    h.update(value.tobytes())


def table_sender(backend: str, job_id: str, party: tuple[str, str], peer: tuple[str, str], options: dict[str, Any],
                 name: str, tag: str, parts: int, records: int, out: Any) -> None:  # fmt: skip
    """Send a table of generator partitions; report peak RSS growth over the RSS before sending."""
    with ft.Federation.connect(backend, job_id=job_id, party=ft.Party(*party), options=options) as fed:
        table = ft.Table.from_partitions([table_partition(p, records) for p in range(parts)])
        with PeakRSS() as mem:
            fed.remote(table, name, tag, [ft.Party(*peer)])
        out.put(("sent", mem.growth))


def table_receiver(backend: str, job_id: str, party: tuple[str, str], peer: tuple[str, str],
                   options: dict[str, Any], name: str, tag: str, out: Any, stop_after: int = 0) -> None:  # fmt: skip
    """Get a table and read it partition by partition; report digests, counts and peak RSS growth.

    With ``stop_after``, report ``("reading", n)`` once that many records of partition 0 were read
    and wait there, to be killed mid-partition."""
    src = ft.Party(*peer)
    with ft.Federation.connect(backend, job_id=job_id, party=ft.Party(*party), options=options) as fed:
        with PeakRSS() as mem:
            [table] = fed.get(name, tag, [src], timeout=300)
            digests, counts = [], []
            for p in range(table.num_partitions):
                h, n = hashlib.sha256(), 0
                for key, value in table.iter_partition(p):
                    _fold(h, key, value)
                    n += 1
                    if n == stop_after:
                        out.put(("reading", n))
                        threading.Event().wait(600)  # this process is killed here
                digests.append(h.hexdigest())
                counts.append(n)
        out.put(("got", mem.growth, digests, counts, fed.stats["bytes_received"]))


def expected_table_digests(parts: int, records: int) -> list[str]:
    digests = []
    for p in range(parts):
        h = hashlib.sha256()
        for key, value in table_partition(p, records):
            _fold(h, key, value)
        digests.append(h.hexdigest())
    return digests


def gate(fed: ft.Federation, at: int, release: threading.Event, reached: threading.Barrier | None = None) -> None:
    """Make every lane ``fed`` sends on pause before its message ``at`` until ``release`` is set.

    ``reached``, if given, is waited on by each lane as it gets there (a barrier the test shares).
    The waits are liveness bounds only.
    """
    real_send = fed.transport.send

    def gated_send(dst: ft.Party, lane: int, messages: Any) -> int:
        def gated() -> Iterator[bytes]:
            for i, m in enumerate(messages):
                if i == at:
                    if reached is not None:
                        reached.wait(120)
                    release.wait(300)
                yield m

        return real_send(dst, lane, gated())

    fed.transport.send = gated_send  # type: ignore[method-assign]


def pid_gone(pid: int) -> bool:
    """Whether no process ``pid`` exists any more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _address(hex_addr: str, v6: bool) -> str:
    raw = bytes.fromhex(hex_addr)
    if not v6:
        return socket.inet_ntoa(raw[::-1])
    # /proc stores an IPv6 address as four host-order 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def socket_addresses(pid: int) -> dict[str, list[tuple[str, int]]]:
    """The process's TCP listeners and bound UDP sockets: ``{"tcp": [(addr, port)], "udp": [...]}``.

    Read from /proc (both IPv4 and IPv6 tables), so a socket on 0.0.0.0 or :: shows as such.
    """
    inodes = _socket_inodes(pid)
    found: dict[str, list[tuple[str, int]]] = {"tcp": [], "udp": []}
    for kind, table, v6 in (("tcp", "tcp", False), ("tcp", "tcp6", True), ("udp", "udp", False), ("udp", "udp6", True)):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode not in inodes:
                continue
            if kind == "tcp" and state != "0A":  # 0A = LISTEN; connections are not listeners
                continue
            addr_hex, port_hex = local.split(":")
            found[kind].append((_address(addr_hex, v6), int(port_hex, 16)))
    return found


def silent_party(cfg: dict[str, Any], q: Any) -> None:
    """A benchmark party that reports nothing for ``cfg["silent"]`` seconds (then ends)."""
    time.sleep(cfg["silent"])


def failing_party(cfg: dict[str, Any], q: Any) -> None:
    """A benchmark party that fails at once, before reporting anything (exit code 1)."""
    raise SystemExit(1)
