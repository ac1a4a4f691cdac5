"""Party processes for tests/test_exit.py: each leaves pulsar-client busy, then the process exits.

Run as ``python tests/exit_proc.py SCENARIO SERVICE_URL ADMIN_URL JOB_ID``. The process prints
``ready`` once it has what the scenario needs and then waits for a line on stdin: the test
freezes or kills the broker in between. Whatever the scenario does next, the process then
returns from ``main`` and the interpreter exits normally (no ``os._exit``): that exit is what
the tests check.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading
import time

import fedtransport as ft

GUEST = ft.Party("guest", "9999")
HOST = ft.Party("host", "10000")
ARBITER = ft.Party("arbiter", "10001")


def frozen_send(opts: dict[str, object], job_id: str) -> None:
    """A send that times out against a frozen broker (SIGSTOP): its producer is still being made
    inside pulsar-client when the process exits, the session not closed (the send's error ended
    the script)."""
    fed = ft.Federation.connect("pulsar", job_id=job_id, party=GUEST, options={**opts, "send_timeout": 2.0})
    fed.remote("warm", "warm", "0", [HOST])  # the connection is up before the broker freezes
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        fed.remote("x", "x", "0", [ARBITER])  # a new topic: its producer is made now
    except ft.BackendError as exc:
        print(f"send failed: {exc}", flush=True)


def pending_get(opts: dict[str, object], job_id: str) -> None:
    """A live session whose broker is killed while another thread waits in ``get``; the process
    exits, without closing the session, while that thread subscribes again inside pulsar-client
    (a silent lane gets a new consumer after the second redelivery request)."""
    fed = ft.Federation.connect("pulsar", job_id=job_id, party=HOST, options={**opts, "redelivery_after": 0.5})
    with contextlib.suppress(ft.TransferTimeout):
        fed.get("warm", "0", [GUEST], timeout=0.5)  # listens on the guest's lanes first
    threading.Thread(target=lambda: fed.get("x", "0", [GUEST], timeout=300), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.readline()  # the broker is dead now
    deadline = time.monotonic() + 120
    while not _subscribing():
        assert time.monotonic() < deadline, "no thread subscribed again within 120 s"
        time.sleep(0.05)
    print("subscribing again", flush=True)


def _subscribing() -> bool:
    """Whether a thread is inside the consumers' subscribe call (a probe into the stacks)."""
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == "_subscribe" and frame.f_code.co_filename.endswith("consumer.py"):
                return True
            frame = frame.f_back
    return False


def stuck_call(opts: dict[str, object], job_id: str) -> None:
    """A thread that never leaves a (pretended) client call: the exit waits ``EXIT_WAIT`` seconds
    for it, warns and goes on. Afterwards a new client is refused. No broker is involved."""
    assert "fedtransport.transport.pulsar.connection" not in sys.modules
    atexit.register(_open_a_client_after_the_exit_began)  # before the import: runs after its handler
    from fedtransport.transport.pulsar.connection import inside_client

    entered = threading.Event()

    def stuck() -> None:
        with inside_client():
            entered.set()
            threading.Event().wait()  # never leaves; pure Python, so stopping it cannot abort

    threading.Thread(target=stuck, daemon=True).start()
    entered.wait()
    print("ready", flush=True)
    sys.stdin.readline()


def _open_a_client_after_the_exit_began() -> None:
    from fedtransport.transport.pulsar.connection import open_client

    try:
        open_client("pulsar://127.0.0.1:9")
    except ft.FederationError as exc:
        print(f"refused: {exc}", flush=True)


SCENARIOS = {"frozen-send": frozen_send, "pending-get": pending_get, "stuck-call": stuck_call}

if __name__ == "__main__":
    scenario, service_url, admin_url, job = sys.argv[1:5]
    SCENARIOS[scenario]({"service_url": service_url, "admin_url": admin_url}, job)
    print("main returned", flush=True)
