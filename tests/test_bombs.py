"""Every cost a peer can make a receiver pay is bounded by what it sent (issue 13, items 2-4).

1. Memory: a frame's header claims a unit length, and the receiver must not commit it ahead
   of the data. 64 frames of 100 bytes claiming 8 MiB - 1 each used to cost 512 MiB; many
   small units, huge mapped units and scattered tiny chunks are tried as well. Each runs in
   a child with an address-space limit, measuring its resident memory.
2. Stream count: one table head declaring millions of streams used to make ``get`` build a
   partition per stream; it is refused beyond the ``max_streams`` option.
3. CPU: allow-listed numeric constructors whose cost is superlinear in their input
   (``int(Decimal("1e300000"))``, ``Fraction("1e10000000")``, a gcd of huge ints, a Decimal
   compared with a huge int) are refused. Each bomb runs in a child with a CPU-time and a
   memory limit; its control, plain ``pickle.loads`` of the same bytes in a child with a
   2-second CPU limit, is killed by that limit: the bomb is real.

Attacks through a real broker publish their frames on the receiver's lanes, as anyone with
access to the broker could (docs/security.md, threat model).
"""

from __future__ import annotations

import base64
import decimal
import fractions
import itertools
import json
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pulsar
import pytest
from conftest import GUEST, HOST

import fedtransport as ft
from fedtransport.brokers.standalone import PulsarStandalone
from fedtransport.codec import Compressor, PayloadCodec, UnpicklePolicy, decode_object
from fedtransport.framing import HEADER_SIZE, FrameWriter, TransferAssembly, job_fingerprint, parse_frame, transfer_id
from fedtransport.transport.pulsar.admin import PulsarAdmin

ROOT = Path(__file__).resolve().parent.parent
PLAIN = PayloadCodec(Compressor(False))
JOB = job_fingerprint("bombs")
TID = transfer_id("bombs", "w", "0", str(GUEST), str(HOST))
MiB = 1 << 20


def run_child(code: str, stdin: str = "", *, cpu: int = 60, memory: int = 3 << 30) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter whose CPU time and address space are limited."""
    limits = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu + 5}))\n"  # SIGXCPU at the soft limit
        f"resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", limits + textwrap.dedent(code)],
        input=stdin, capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


# ==================================================================================================
# 1. memory: claimed unit lengths
# ==================================================================================================


SEND = b"bombsend"  # the incarnation of the crafted frames: they are all of one send


def frame(unit: int, unit_len: int, offset: int, chunk: bytes, *, stream: int = 0, nstreams: int = 1,
          seq: int | None = None, last: bool = False) -> bytes:  # fmt: skip
    writer = FrameWriter(JOB, TID, nstreams, PLAIN, incarnation=SEND)  # one send: every frame of it
    seq = unit if seq is None else seq
    return writer.frame(stream=stream, unit=unit, seq=seq, offset=offset, unit_len=unit_len, chunk=chunk, last=last)


def claimed_length_attacks() -> dict[str, list[bytes]]:
    """name -> frames of one transfer, each frame carrying 100 bytes of a unit it claims is far longer."""
    data = b"x" * 100
    scattered = [frame(0, 256 * MiB, 0, b"y" * MiB, seq=0)]  # 1 MiB arrives: the unit is mapped
    scattered += [frame(0, 256 * MiB, (i + 2) * 3 * 4096, data, seq=i + 1) for i in range(20_000)]  # a page each
    return {
        # the attack: units just below the mapping threshold were a bytearray of their claimed size
        "64-units-of-8MiB": [frame(u, 8 * MiB - 1, 0, data, stream=1, nstreams=2) for u in range(64)],
        "64-units-of-64MiB": [frame(u, 64 * MiB, 0, data, stream=1, nstreams=2) for u in range(64)],
        "20000-units-of-64KiB": [frame(u, 64 << 10, 0, data, stream=1, nstreams=2) for u in range(20_000)],
        "20000-chunks-scattered-over-a-mapped-unit": scattered,
    }


MEMORY_CHILD = """
    import base64, json, sys
    from fedtransport.codec import Compressor, PayloadCodec
    from fedtransport.framing import TransferAssembly, parse_frame

    def rss():
        with open("/proc/self/status") as f:
            return [int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:")][0]

    frames = [base64.b64decode(f) for f in json.loads(sys.stdin.read())]
    wire = sum(map(len, frames))
    before = rss()
    asm = TransferAssembly(parse_frame(frames[0])[0].transfer, PayloadCodec(Compressor(False)))
    for f in frames:
        asm.add(*parse_frame(f))
    print(json.dumps({"grew": rss() - before, "wire": wire, "complete": asm.complete}))
"""


@pytest.mark.parametrize("attack", list(claimed_length_attacks()))
def test_claimed_unit_lengths_commit_only_what_arrived(attack):
    frames = claimed_length_attacks()[attack]
    done = run_child(MEMORY_CHILD, json.dumps([base64.b64encode(f).decode() for f in frames]), memory=2 << 30)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    # Python's own objects cost a few hundred bytes per message (the 100-byte pieces, the unit,
    # the seen-set entry): linear in what was sent, never in what was claimed.
    assert out["grew"] < 4 * out["wire"] + 16 * MiB, out
    assert not out["complete"]


@pytest.mark.parametrize("size", [5 * MiB + 7, 9 * MiB + 7, 40 * MiB + 3], ids=["small", "mapped", "large"])
def test_units_received_in_any_order_and_chunk_size_arrive_whole(size):
    """The honest value still arrives: chunks of every size, shuffled, duplicated, tiny ones scattered."""
    import random

    rng = random.Random(size)
    unit = rng.randbytes(size)
    cuts = sorted({0, size, *rng.sample(range(1, size), 200), *range(3 * MiB, 3 * MiB + 50_000, 1000)})
    pieces = list(itertools.pairwise(cuts))
    rng.shuffle(pieces)
    asm = TransferAssembly(TID, PLAIN)
    received = bytearray(1 << 20)  # one receive buffer, reused for every message
    for seq, (a, b) in enumerate(pieces):
        msg = frame(0, size, a, unit[a:b], seq=seq, last=seq == len(pieces) - 1)
        received[: len(msg)] = msg
        assert asm.add(*parse_frame(memoryview(received)[: len(msg)], JOB))
        assert not asm.add(*parse_frame(msg, JOB))  # a duplicate
    assert asm.complete
    [got] = asm.stream_units(0)
    assert got == unit


@pytest.fixture
def broker(pulsar_standalone: PulsarStandalone, job_id: str) -> Iterator[PulsarStandalone]:
    """The session's real Apache Pulsar broker; the test's namespace is gone afterwards."""
    yield pulsar_standalone
    PulsarAdmin(pulsar_standalone.admin_url).delete_namespace("fl-tenant", job_id)


def publish(url: str, job_id: str, frames: list[bytes], lanes: int = 4) -> None:
    """``frames`` on the receiver's lanes from GUEST, as anyone with broker access could publish them."""
    client = pulsar.Client(url, operation_timeout_seconds=30)
    try:
        producers = [
            client.create_producer(f"persistent://fl-tenant/{job_id}/guest-9999-host-10000-{lane}",
                                   batching_enabled=False)
            for lane in range(lanes)
        ]  # fmt: skip
        for i, f in enumerate(frames):
            producers[i % lanes].send(f)
    finally:
        client.close()


def connect(broker: PulsarStandalone, job_id: str, party: ft.Party, **options: Any) -> ft.Federation:
    """A session that makes the job's namespace (``admin_url``), as a real deployment's does."""
    opts = {"service_url": broker.service_url, "admin_url": broker.admin_url, "compression": "none", **options}
    return ft.Federation.connect("pulsar", job_id=job_id, party=party, options=opts)


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def readdressed(frames: list[bytes], job_id: str, tag: str) -> list[bytes]:
    """The frames re-made for ``job_id``'s transfer ``("w", tag)`` from GUEST to HOST."""
    out = []
    for f in frames:
        header, payload = parse_frame(f)
        writer = FrameWriter(job_fingerprint(job_id), transfer_id(job_id, "w", tag, str(GUEST), str(HOST)),
                             header.nstreams, PLAIN, incarnation=header.incarnation)  # fmt: skip
        h = header
        out.append(writer.frame(stream=h.stream, unit=h.unit, seq=h.seq, offset=h.offset, unit_len=h.unit_len,
                                chunk=bytes(payload), last=h.last, aux=h.aux))  # fmt: skip
    return out


def test_claimed_lengths_through_a_real_broker_cost_the_receiver_what_was_sent(broker, job_id):
    """The issue's attack, end to end: 64 frames of 100 bytes claiming 8 MiB - 1 each, published
    where a waiting receiver reads. Its RSS used to grow by 512 MiB; the get still gets what was
    really sent afterwards."""
    url = broker.service_url
    attack = readdressed(claimed_length_attacks()["64-units-of-8MiB"], job_id, "0")
    with connect(broker, job_id, HOST) as h:
        with pytest.raises(ft.TransferTimeout):  # listens; nothing there yet
            h.get("w", "warm-up", [GUEST], timeout=0.5)
        before = rss()
        publish(url, job_id, attack)
        deadline = time.monotonic() + 60
        with pytest.raises(ft.TransferTimeout) as err:  # the forged transfer never completes
            while time.monotonic() < deadline:
                try:
                    h.get("w", "0", [GUEST], timeout=1)
                except ft.TransferTimeout as exc:
                    if exc.missing.get(str(GUEST)) == "64 messages so far":
                        raise
        assert err.value.missing == {str(GUEST): "64 messages so far"}
        grew = rss() - before
        assert grew < 32 * MiB, f"the receiver's RSS grew by {grew >> 20} MiB for {sum(map(len, attack))} bytes"
        with connect(broker, job_id, GUEST) as g:  # the honest control on the same session
            g.remote({"w": list(range(100))}, "w", "honest", [HOST])
        assert h.get("w", "honest", [GUEST], timeout=60) == [{"w": list(range(100))}]


# ==================================================================================================
# 2. the stream count of a table head
# ==================================================================================================


def table_head(nstreams: int, tid: bytes = TID, job: bytes = JOB) -> bytes:
    writer = FrameWriter(job, tid, nstreams, PLAIN)
    return writer.frame(stream=0, unit=0, seq=0, offset=0, unit_len=0, chunk=b"", last=True, aux=1)  # KIND_TABLE


def test_a_head_declaring_more_streams_than_max_streams_is_refused():
    head = table_head(3_000_000)
    assert len(head) == HEADER_SIZE  # a bare header: no payload
    with pytest.raises(ft.IntegrityError, match=r"3000000 streams.*max_streams"):
        TransferAssembly(TID, PLAIN).add(*parse_frame(head, JOB))
    with pytest.raises(ft.IntegrityError, match="max_streams"):
        TransferAssembly(TID, PLAIN, max_streams=100).add(*parse_frame(table_head(101), JOB))
    assert TransferAssembly(TID, PLAIN, max_streams=101).add(*parse_frame(table_head(101), JOB))


def test_a_forged_table_head_through_a_real_broker_is_refused_and_its_control_builds_partitions(broker, job_id):
    url = broker.service_url
    tid = transfer_id(job_id, "t", "0", str(GUEST), str(HOST))
    with connect(broker, job_id, HOST) as h:  # its lanes exist before the attacker publishes
        publish(url, job_id, [table_head(3_000_000, tid, job_fingerprint(job_id))], lanes=1)
        t0 = time.monotonic()
        with pytest.raises(ft.IntegrityError, match="max_streams"):
            h.get("t", "0", [GUEST], timeout=60)
        assert time.monotonic() - t0 < 30
    # The control: a receiver that admits that many streams builds a partition per stream.
    tid = transfer_id(job_id, "t", "1", str(GUEST), str(HOST))
    publish(url, job_id, [table_head(70_001, tid, job_fingerprint(job_id))], lanes=1)
    with connect(broker, job_id, HOST, max_streams=70_001) as h:
        [table] = h.get("t", "1", [GUEST], timeout=60)
        assert table.num_partitions == 70_000
    with connect(broker, job_id, HOST) as h, pytest.raises(ft.IntegrityError, match="70001 streams"):
        h.get("t", "1", [GUEST], timeout=60)  # the default refuses it


def test_an_honest_table_of_many_partitions_still_arrives(broker, job_id):
    table = ft.Table.from_partitions([[(p, p * p)] for p in range(300)])
    with connect(broker, job_id, GUEST, max_message_size=65536) as g:
        g.remote(table, "t", "0", [HOST])
    with connect(broker, job_id, HOST, max_streams=301) as h:
        [back] = h.get("t", "0", [GUEST], timeout=60)
        assert back.partitions == table.partitions


# ==================================================================================================
# 3. CPU: superlinear numeric constructors
# ==================================================================================================


def s(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def glob(module: str, name: str) -> bytes:
    return s(module) + s(name) + b"\x93"  # STACK_GLOBAL


def long4(n: int) -> bytes:
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8b" + struct.pack("<I", len(data)) + data  # LONG4


def cpu_bombs() -> dict[str, bytes]:
    """Pickles naming only allow-listed constructors, each worth seconds to hours of CPU."""
    dec = glob("decimal", "Decimal")
    big = 7 ** (2**20)  # 2.9 Mbit: a 370 KB LONG4
    return {
        # int(Decimal("1e300000")): 2.3 s, and quadratic in the exponent
        "int-of-a-decimal": b"\x80\x04" + glob("builtins", "int") + dec + s("1e3000000") + b"\x85R\x85R.",
        # NEWOBJ: int.__new__(int, Decimal(...)), the same conversion without REDUCE
        "int-new-of-a-decimal": b"\x80\x04" + glob("builtins", "int") + dec + s("1e3000000") + b"\x85R\x85\x81.",
        # Fraction("1e10000000"): 10**10000000 computed, a 4 MB numerator from 10 bytes
        "fraction-of-an-exponent": b"\x80\x04" + glob("fractions", "Fraction") + s("1e10000000") + b"\x85R.",
        # Fraction.__new__(Fraction, numerator=...) through NEWOBJ_EX's keywords
        "fraction-new-ex-keywords": b"\x80\x04" + glob("fractions", "Fraction") + b")}" + s("numerator")
        + s("1e10000000") + b"s\x92.",
        "fraction-of-a-decimal": b"\x80\x04" + glob("fractions", "Fraction") + dec + s("1e10000000")
        + b"\x85R\x85R.",
        # Fraction(a, b): the gcd of two huge ints, quadratic in their length
        "fraction-gcd-of-huge-ints": b"\x80\x04" + glob("fractions", "Fraction") + long4(big)
        + long4(3 ** (2**21)) + b"\x86R.",
        # Decimal(huge int): binary to decimal, quadratic
        "decimal-of-a-huge-int": b"\x80\x04" + dec + long4(big) + b"\x85R.",
        # {y, Decimal(hash(y))}: equal hashes, so the set compares them, converting y to a Decimal
        "set-of-an-int-and-a-decimal-with-its-hash": b"\x80\x04\x8f(" + long4(big) + dec + s(str(hash(big)))
        + b"\x85R\x90.",
    }  # fmt: skip


GUARDED_CHILD = """
    import base64, json, sys, time
    from fedtransport.codec import UnpicklePolicy, decode_object
    from fedtransport.errors import FederationError
    out = {}
    for name, data in json.loads(sys.stdin.read()).items():
        pickled = base64.b64decode(data)
        head = b"FTO1" + (0).to_bytes(4, "little") + len(pickled).to_bytes(8, "little")
        unit = head + bytes(-len(head) % 64) + pickled
        t0 = time.process_time()
        try:
            decode_object(unit, UnpicklePolicy(), "peer")
            out[name] = ["decoded"]
        except FederationError as exc:
            out[name] = [type(exc).__name__ + ": " + str(exc)]
        out[name].append(time.process_time() - t0)
    print(json.dumps(out))
"""

PLAIN_CHILD = """
    import base64, pickle, sys
    pickle.loads(base64.b64decode(sys.stdin.read()))
    print("decoded")
"""


def encoded(bombs: dict[str, bytes]) -> str:
    return json.dumps({k: base64.b64encode(v).decode() for k, v in bombs.items()})


def test_cpu_bombs_are_refused_at_once():
    bombs = cpu_bombs()
    assert max(map(len, bombs.values())) < 1 * MiB
    done = run_child(GUARDED_CHILD, encoded(bombs), cpu=20, memory=2 << 30)
    assert done.returncode == 0, f"the decoder failed (rc {done.returncode}): {done.stderr[-2000:]}"
    for name, (error, seconds) in json.loads(done.stdout).items():
        assert error.startswith("UnsafePayload: ") and "superlinear" in error, (name, error)
        assert seconds < 0.5, (name, seconds)


@pytest.mark.parametrize("name", list(cpu_bombs()))
def test_the_cpu_bombs_are_real_under_plain_pickle(name):
    """The control: plain pickle.loads of the same bytes runs out of a 2-second CPU allowance."""
    data = base64.b64encode(cpu_bombs()[name]).decode()
    done = run_child(PLAIN_CHILD, data, cpu=2, memory=2 << 30)
    assert done.returncode == -signal.SIGXCPU, (done.returncode, done.stdout, done.stderr[-500:])


def test_numbers_pickle_writes_still_round_trip():
    values = [decimal.Decimal("1e300000"), decimal.Decimal("-3.14159" + "2" * 4000), decimal.Decimal("NaN"),
              fractions.Fraction(10**4000, 7), fractions.Fraction("-1.5e-300"), 10**19000, -(2**65535),
              [decimal.Decimal("2.5"), 2**60], {fractions.Fraction(1, 3): decimal.Decimal("0.1")}]  # fmt: skip
    for v in values:
        back = decode_object(ft.codec.encode_object(v).tobytes(), UnpicklePolicy(), "peer")
        assert back == v or (v != v and back != back)
        assert type(back) is type(v)


def test_a_pickle_naming_decimal_may_not_carry_a_huge_int():
    unit = ft.codec.encode_object([decimal.Decimal("1.5"), 2**70_000]).tobytes()
    with pytest.raises(ft.UnsafePayload, match="more than 65536 bits"):
        decode_object(unit, UnpicklePolicy(), "peer")
    assert decode_object(unit, UnpicklePolicy(trust_remote_code=True), "peer")[1] == 2**70_000


def test_reconstruct_is_charged_the_shape_it_asks_for():
    """``_reconstruct(ndarray, (2**32,), b"b")``: numpy's own pickles ask for shape (0,)."""
    pickled = (b"\x80\x04" + glob("numpy._core.multiarray", "_reconstruct") + glob("numpy", "ndarray")
               + b"\x8a\x05" + (1 << 32).to_bytes(5, "little") + b"\x85C\x01b\x87R.")  # fmt: skip
    head = b"FTO1" + (0).to_bytes(4, "little") + len(pickled).to_bytes(8, "little")
    with pytest.raises(ft.IntegrityError, match="more than its own size allows"):
        decode_object(head + bytes(-len(head) % 64) + pickled, UnpicklePolicy(), "peer")
