"""Party processes for tests that need parties (or their deaths) in separate processes.

Run with multiprocessing's spawn context; results come back on a queue.
"""

from __future__ import annotations

import hashlib
import signal
import sys
import threading
import time
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
                    inc = fed._inbox._incoming.get(tid)  # test probe into the inbox
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
