"""``fedtransport demo``: two parties run a secure sum and a table round trip.

guest 9999 and host 10000 each hold a private vector. Each splits its vector
into two additive shares, keeps one and sends the other; each then publishes the
sum of what it holds, and both add the two partial sums. Both results must equal
the plain sum, which neither party could compute alone. Then guest sends a table
of 4 partitions to host, which sends it back, and guest checks it is unchanged.
Last, guest sends host a 96 MiB model, with a progress bar on both sides.

With a broker backend the parties are two processes; with ``memory`` they are
two threads of one process (the in-process hub cannot cross processes).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from .api import Federation
from .errors import ConfigError
from .party import Party
from .progress import ProgressBar
from .table import Table
from .transport import get_backend

GUEST = Party("guest", "9999")
HOST = Party("host", "10000")
VECTOR = 1 << 20  # float64 elements: 8 MiB per vector
PARTITIONS = 4
RECORDS = 25_000  # per partition
MODEL_MIB = 96  # past the 64 MiB from which transfers show a progress bar
_DEMO_TIMEOUT = 600.0  # seconds for both parties together: a bound, not an expectation


def _vector(party: Party) -> Any:
    import numpy as np

    return np.random.default_rng(int(party.party_id)).standard_normal(VECTOR)


def _table() -> Table:
    return Table.from_partitions(
        [[(f"id-{p}-{i}", (i * 0.5, f"feature-{i % 97}")) for i in range(RECORDS)] for p in range(PARTITIONS)]
    )


def run_party(backend: str, job_id: str, me: Party, options: dict[str, Any], out: Any) -> None:
    """One party's side; puts its result, or its traceback when it fails, on ``out``."""
    try:
        out.put(_party_side(backend, job_id, me, options))
    except BaseException as exc:
        out.put({"party": str(me), "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


def _party_side(backend: str, job_id: str, me: Party, options: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    peer = HOST if me == GUEST else GUEST
    started = time.perf_counter()
    with Federation.connect(backend, job_id=job_id, party=me, options=options) as fed:
        x = _vector(me)
        mask = np.random.default_rng().standard_normal(VECTOR)
        keep, share = mask, x - mask
        fed.remote(share, name="share", tag="0", parties=[peer])
        [theirs] = fed.get(name="share", tag="0", parties=[peer], timeout=120)
        partial = keep + theirs
        fed.remote(partial, name="partial", tag="0", parties=[peer])
        [other] = fed.get(name="partial", tag="0", parties=[peer], timeout=120)
        total = partial + other
        plain = _vector(GUEST) + _vector(HOST)  # the check only: in real life nobody holds both
        sum_ok = bool(np.allclose(total, plain))

        table_ok = True
        if me == GUEST:
            sent = _table()
            fed.remote(sent, name="table", tag="0", parties=[HOST])
            [back] = fed.get(name="table-back", tag="0", parties=[HOST], timeout=120)
            table_ok = back == sent
        else:
            [t] = fed.get(name="table", tag="0", parties=[GUEST], timeout=120)
            fed.remote(t, name="table-back", tag="0", parties=[GUEST])

        model = np.random.default_rng(7).standard_normal(MODEL_MIB << 17)
        if me == GUEST:
            fed.remote(model, name="model", tag="0", parties=[HOST], progress=ProgressBar(f"  {me}: model sent    "))
            [model_ok] = fed.get(name="model-ok", tag="0", parties=[HOST], timeout=120)
        else:
            [got] = fed.get(name="model", tag="0", parties=[GUEST], timeout=120,
                            progress=ProgressBar(f"  {me}: model received"))  # fmt: skip
            model_ok = bool(np.array_equal(got, model))
            fed.remote(model_ok, name="model-ok", tag="0", parties=[GUEST])
        stats = fed.stats
    fed.cleanup()  # the scheduler's job at the end: each party deletes what the job left on the broker
    return {"party": str(me), "sum_ok": sum_ok, "table_ok": table_ok, "model_ok": model_ok,
            "seconds": time.perf_counter() - started, **stats}  # fmt: skip


def demo(backend: str = "pulsar", options: dict[str, Any] | None = None) -> bool:
    """Run the demo; print what moved and whether it checks out. Returns success."""
    try:
        import numpy  # noqa: F401 - the parties compute with it
    except ImportError:
        raise ConfigError("the demo computes with numpy: pip install 'fedtransport[embedded]'") from None
    options = dict(options or {})
    job_id = f"demo-{os.getpid()}-{int(time.time())}"
    with ExitStack() as stack:
        where = get_backend(backend).local_broker(options, stack)
        print(f"fedtransport demo: backend {backend} ({where}), job {job_id}")
        print(f"  secure sum of two {VECTOR * 8 >> 20} MiB vectors, then a table of "
              f"{PARTITIONS} x {RECORDS:,} records there and back, then a {MODEL_MIB} MiB model")  # fmt: skip
        results = _run_both(backend, job_id, options)
    failed = [r for r in results if "error" in r]
    if failed:
        for r in failed:
            print(f"  {r['party']} failed:\n{r['traceback']}", file=sys.stderr)
        print(f"  result: FAILED: {failed[0]['party']}: {failed[0]['error']}")
        return False
    ok = True
    for r in sorted(results, key=lambda r: r["party"]):
        moved = r["bytes_sent"] + r["bytes_received"]
        print(
            f"  {r['party']:>12}: sent {r['bytes_sent'] / 1e6:7.1f} MB in {r['messages_sent']:4d} messages, "
            f"received {r['bytes_received'] / 1e6:7.1f} MB in {r['messages_received']:4d} messages, "
            f"{moved / 1e6 / r['seconds']:6.1f} MB/s over {r['seconds']:.2f} s; "
            f"secure sum {'OK' if r['sum_ok'] else 'WRONG'}, table {'OK' if r['table_ok'] else 'WRONG'}, "
            f"model {'OK' if r['model_ok'] else 'WRONG'}"
        )
        ok = ok and r["sum_ok"] and r["table_ok"] and r["model_ok"]
    print("  result:", "both sums match the plain sum, the table came back unchanged and the model arrived intact"
          if ok else "FAILED")  # fmt: skip
    return ok


def _run_both(backend: str, job_id: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Both parties' results; stops at the first failure (a party that raises, or whose process dies)."""
    if get_backend(backend).in_process:
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        # Daemon threads: after a failure the other party may wait out its get, and nobody needs it.
        for p in (GUEST, HOST):
            threading.Thread(target=run_party, args=(backend, job_id, p, options, q), daemon=True).start()
        return _collect(q.get, lambda: None)
    ctx = mp.get_context("spawn")
    mq = ctx.Queue()
    procs = {str(p): ctx.Process(target=run_party, args=(backend, job_id, p, options, mq)) for p in (GUEST, HOST)}
    for proc in procs.values():
        proc.start()

    def died() -> dict[str, Any] | None:
        for party, proc in procs.items():
            if proc.exitcode not in (None, 0):
                reason = f"its process died with exit code {proc.exitcode}"
                return {"party": party, "error": reason, "traceback": f"({reason}; no traceback)"}
        return None

    results: list[dict[str, Any]] = []
    try:
        results = _collect(mq.get, died)
    finally:
        failed = len(results) < 2 or any("error" in r for r in results)
        for proc in procs.values():
            proc.join(0 if failed else 30)  # a party left waiting for a failed peer is ended
            if proc.is_alive():
                proc.terminate()
                proc.join(10)
    return results


def _collect(get: Callable[..., dict[str, Any]], died: Callable[[], dict[str, Any] | None]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + _DEMO_TIMEOUT
    while len(results) < 2:
        try:
            results.append(get(timeout=0.5))
        except queue.Empty:
            dead = died()
            if dead is not None:
                return [*results, dead]
            if time.monotonic() > deadline:
                return [*results, {"party": "demo", "error": f"no result after {_DEMO_TIMEOUT:.0f} s",
                                   "traceback": ""}]  # fmt: skip
            continue
        if "error" in results[-1]:
            return results
    return results
