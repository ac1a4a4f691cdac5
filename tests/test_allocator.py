"""transport/allocator.py: glibc keeps message-sized buffers in its heap, set once per process.

malloc's settings are process-wide and cannot be undone, so each case runs in a fresh Python
process (whatever this test process did to its own malloc does not count) and reads glibc's own
accounting (``mallinfo2``): bytes in mmapped blocks, and free bytes kept in the heap.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Any

import pytest

MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt and mallinfo2 are glibc's"
)

# Allocates and frees a 6 MiB buffer (above glibc's default mmap threshold, below 2 x 4 MiB) and
# reports where it came from. argv[1]: the max_message_size values to call keep_message_buffers
# with, in order (JSON), before the buffer is taken.
_PROBE = r"""
import ctypes, json, sys
from fedtransport.transport import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
calls = [allocator.keep_message_buffers(size) for size in json.loads(sys.argv[1])]
before = libc.mallinfo2()
buf = bytearray(6 << 20)
held = libc.mallinfo2()
del buf
after = libc.mallinfo2()
print(json.dumps({"calls": calls, "applied": allocator.applied_threshold(),
                  "mmapped": held.hblkhd - before.hblkhd, "kept_free": after.fordblks - before.fordblks}))
"""


def probe(*sizes: int, **env: str) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(sizes)], env={**clean, **env},
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_a_message_sized_buffer_comes_from_the_heap_and_stays_there_once_freed() -> None:
    untouched = probe()
    assert untouched["applied"] is None
    assert untouched["mmapped"] >= 6 * MiB and untouched["kept_free"] < MiB  # mapped, then unmapped
    kept = probe(4 * MiB)
    assert kept["calls"] == [8 * MiB] and kept["applied"] == 8 * MiB
    assert kept["mmapped"] == 0  # from the heap
    assert kept["kept_free"] > 5 * MiB  # freed, and still there for the next buffer (less what it merged into)


def test_set_once_per_process_and_only_ever_raised() -> None:
    r = probe(4 * MiB, 4 * MiB, 1 * MiB, 12 * MiB, 512 * MiB, 64 * MiB)
    # the second and a smaller one change nothing; a larger one raises it, up to glibc's 32 MiB ceiling
    assert r["calls"] == [8 * MiB, None, None, 24 * MiB, 32 * MiB, None]
    assert r["applied"] == 32 * MiB and r["mmapped"] == 0


@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_ARENA_MAX": "2"},
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"},
    ],
)
def test_an_operator_who_tuned_malloc_keeps_their_settings(env: dict[str, str]) -> None:
    r = probe(4 * MiB, **env)
    assert r["calls"] == [None] and r["applied"] is None
    assert r["mmapped"] >= 6 * MiB  # glibc's own behaviour, untouched


# A Pulsar session opened (and its job cleaned up) in a fresh process; argv[1]: its options (JSON).
_SESSION = r"""
import json, sys
import fedtransport as ft
from fedtransport.transport import allocator

options = json.loads(sys.argv[1])
with ft.Federation.connect("pulsar", job_id="alloc-job", party=ft.Party("guest", "9999"), options=options) as fed:
    print(json.dumps(allocator.applied_threshold()))
fed.cleanup()
"""


@pytest.mark.parametrize(
    ("options", "applied"),
    [({}, 8 * MiB), ({"keep_message_buffers": True, "max_message_size": 12 * MiB}, 24 * MiB),
     ({"keep_message_buffers": False}, None)],
)  # fmt: skip
def test_a_pulsar_session_honours_keep_message_buffers(
    options: dict[str, Any], applied: int | None, pulsar_standalone: Any
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    broker = {"service_url": pulsar_standalone.service_url, "admin_url": pulsar_standalone.admin_url}
    out = subprocess.run([sys.executable, "-c", _SESSION, json.dumps({**broker, **options})], env=clean,
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert json.loads(out.stdout.splitlines()[-1]) == applied


def test_keep_message_buffers_takes_a_bool() -> None:
    import fedtransport as ft
    from fedtransport.errors import ConfigError

    options = {"service_url": "pulsar://127.0.0.1:1", "keep_message_buffers": "yes"}
    with pytest.raises(ConfigError, match="keep_message_buffers"):
        ft.Federation.connect("pulsar", job_id="j", party=ft.Party("guest", "9999"), options=options)
