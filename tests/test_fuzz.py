"""Fuzzing what a receiver does with bytes it did not make.

Random and mutated input goes into every receiving-side entry point: ``parse_frame``, the
reassembler (``TransferAssembly``), the inbox's delivery callback (``Inbox.on_delivery``,
the path every broker message takes), and the codec (``decode_object``,
``decode_records``, ``decompress``, ``Sealer.open``). Each may only raise a
:class:`FederationError` subclass: never another exception, a crash or a hang.

Mutations start from real traffic (objects, numpy arrays in and out of band, tables;
raw, lz4-compressed and sealed), then flip bits, overwrite bytes and header fields with
edge values, truncate, extend, splice and insert pickle opcodes. Header-field edits
recompute the CRC, so they reach the reassembler's own checks instead of stopping at the
checksum. ``tests/test_framing.py`` already fuzzes ``parse_frame`` + ``add`` on single
frames (300 examples each); this file covers the rest, 10,000 examples in one test.

The test is marked ``slow``. The default run includes it (nothing deselects ``slow``), and
it is reproducible: ``derandomize=True``, no example database. While it runs, the process's
address space is capped at its current size + 512 MiB, so an allocation that a hostile
length asks for fails with MemoryError (which must come out as IntegrityError) instead of
taking the machine's memory.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import random
import resource
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from party_proc import status_bytes

import fedtransport as ft
from fedtransport.codec import Compressor, PayloadCodec, Sealer, UnpicklePolicy, decode_object, decode_records
from fedtransport.codec import decompress as lz4_decompress
from fedtransport.errors import FederationError, IntegrityError
from fedtransport.framing import HEADER_SIZE, FrameWriter, TransferAssembly, job_fingerprint, parse_frame, transfer_id
from fedtransport.inbox import Inbox
from fedtransport.transfer import KIND_OBJECT, Outgoing, decode_object_transfer, transfer_kind
from fedtransport.transport.base import Delivery

JOB_ID = "fuzz-job"
JOB = job_fingerprint(JOB_ID)
SRC, DST = ft.Party("guest", "9999"), ft.Party("host", "10000")
SECRET = b"fuzzing secret, 32 bytes long!!!"
POLICY = UnpicklePolicy()
EDGE_INTS = [0, 1, 2, 7, 8, 63, 64, 255, 256, 4095, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1]
# Header fields after magic/version: (offset, struct format) of flags, incarnation, stream, nstreams,
# unit, seq, length, size, offset, unit_len, aux.
FIELDS = [(3, "<B"), (28, "<Q"), (36, "<I"), (40, "<I"), (44, "<I"), (48, "<I"), (52, "<I"), (56, "<I"),
          (60, "<Q"), (68, "<Q"), (76, "<Q")]  # fmt: skip
CRC_AT = HEADER_SIZE - 4

TRANSFORMS = {
    "raw": PayloadCodec(Compressor(False)),
    "lz4": PayloadCodec(Compressor(True, sample=1024, min_size=512)),
    "sealed": PayloadCodec(
        Compressor(True, sample=1024, min_size=512), Sealer(SECRET, JOB_ID).for_pair(str(SRC), str(DST))
    ),
}


def values() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    structured = np.zeros(3, dtype=[("a", "<i4"), ("b", "O"), ("c", "<f8", (2,))])
    structured["b"] = ["x", None, 3]
    objects = np.empty(2, dtype=object)
    objects[:] = [{"k": 1}, np.arange(3)]
    return {
        "dict": {"w": [1, 2.5, "three", b"four", (5, None)], "s": {6, 7}, "n": 2**70},
        "array": rng.random(300),  # out of band
        "arrays": {"int": np.arange(50, dtype=">i2"), "strided": np.arange(40.0)[::3], "when": np.datetime64("2026")},
        "numpy-misc": [structured, objects, np.float64(1.5), np.dtype("U3"), np.zeros((2, 0))],
        "compressible": b"a" * 3000 + bytes(range(256)),
        "table": ft.Table.from_partitions([[(i, "v" * i) for i in range(30)], [(i, np.int64(i)) for i in range(20)]]),
    }


def traffic(transform: PayloadCodec, value: Any, tag: str, max_chunk: int = 400) -> list[bytes]:
    out = Outgoing(value, fanout=1)
    writer = FrameWriter(JOB, transfer_id(JOB_ID, "v", tag, str(SRC), str(DST)), out.nstreams, transform)
    return [m for msgs in out.lane_messages(writer, 2, max_chunk).values() for m in msgs]


VALUES = values()
FRAMES = {(t, name): traffic(tr, v, name) for t, tr in TRANSFORMS.items() for name, v in VALUES.items()}
UNITS = [b"".join(bytes(p) for p in Outgoing(v, fanout=1).unit.parts) for k, v in VALUES.items() if k != "table"]
RECORDS = [
    [(i, "x" * i) for i in range(40)],
    [(i, np.arange(i % 4, dtype="f4")) for i in range(40)],
    [(np.float64(i), {"i": i}) for i in range(40)],
]
BATCHES = [u.tobytes() for records in RECORDS for u, _ in ft.codec.encode_records(iter(records), 600)]
LZ4 = [
    Compressor(True, sample=512, min_size=512).compress(b"abc" * 400 + bytes(range(200))),
    Compressor(True).compress(bytes(5000)),
]
SEALED = [Sealer.seal(TRANSFORMS["sealed"]._aead, b"secret chunk " * 20, b"header as aad")]
PICKLE_OPCODES = b"()NKJMC\x8c\x93\x94hqRbs]}\x85\x86\x87tela\x81\x92\x95\x96\x97\x98.\x80\x8a\x8b\x88\x89"


# --- mutations ---------------------------------------------------------------------------------------
# Hypothesis picks the target, the input and a seed; the mutations themselves come from that seed.
# Generating them through hypothesis strategies was three quarters of the test's time, and a
# failing example still names everything needed to replay it: ``run_case(*case)``.


def mutated(rng: random.Random, data: bytes, *, header: bool = False) -> bytes:
    """``data`` after 1-4 mutations; with ``header``, the CRC is made valid again half the time."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["flip", "byte", "truncate", "extend", "splice", "opcode", "field", "zero"])
        if not buf:
            buf += rng.randbytes(rng.randint(1, 8))
            continue
        pos = rng.randrange(len(buf))
        if kind == "flip":
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == "byte":
            buf[pos] = rng.randrange(256)
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "extend":
            buf += rng.randbytes(rng.randint(1, 32))
        elif kind == "splice":  # duplicate or drop a slice
            end = min(len(buf), pos + rng.randint(0, 64))
            if rng.random() < 0.5:
                buf[pos:pos] = buf[pos:end]
            else:
                del buf[pos:end]
        elif kind == "opcode":
            buf.insert(pos, rng.choice(PICKLE_OPCODES))
        elif kind == "zero":
            end = min(len(buf), pos + rng.randint(0, 16))
            buf[pos:end] = bytes(end - pos)
        elif kind == "field" and len(buf) >= HEADER_SIZE:
            at, fmt = rng.choice(FIELDS)
            struct.pack_into(fmt, buf, at, rng.choice(EDGE_INTS) % (1 << (8 * struct.calcsize(fmt))))
    if header and rng.random() < 0.5:
        fix_crc(buf)
    return bytes(buf)


def header_edited(rng: random.Random, data: bytes) -> bytes:
    """1-3 header fields set to edge values or nudged, with the CRC made valid again."""
    buf = bytearray(data)
    if len(buf) < HEADER_SIZE:
        return data
    for _ in range(rng.randint(1, 3)):
        at, fmt = rng.choice(FIELDS)
        (old,) = struct.unpack_from(fmt, buf, at)
        value = rng.choice(EDGE_INTS) if rng.random() < 0.5 else old + rng.randint(-3, 3)
        struct.pack_into(fmt, buf, at, value % (1 << (8 * struct.calcsize(fmt))))
    fix_crc(buf)
    return bytes(buf)


def fix_crc(buf: bytearray) -> None:
    if len(buf) < HEADER_SIZE:
        return
    crc = zlib.crc32(bytes(buf[:CRC_AT]))
    if not buf[3] & 0x04:  # unsealed: the CRC covers the payload too
        crc = zlib.crc32(bytes(buf[HEADER_SIZE:]), crc)
    struct.pack_into("<I", buf, CRC_AT, crc)


def frame_sequence(rng: random.Random, keys: list[tuple[str, str]]) -> tuple[str, list[bytes]]:
    """Real messages of one or two transfers, some mutated, reordered, duplicated or dropped."""
    transform = keys[0][0]
    out = []
    for m in (m for k in keys if k[0] == transform for m in FRAMES[k]):
        roll = rng.randrange(10)
        if roll == 0:
            continue  # lost
        if roll == 1:
            m = mutated(rng, m, header=True)
        elif roll == 2:
            m = header_edited(rng, m)
        out.append(m)
        if roll == 3:
            out.append(m)  # duplicated
    if rng.random() < 0.5:
        rng.shuffle(out)
    if rng.random() < 0.5:
        out.append(rng.randbytes(rng.randint(0, 200)))  # plain noise
    return transform, out


# --- the receiving side as a broker feeds it -------------------------------------------------------


class _NullTransport:
    max_unacked_per_lane = 8

    def __init__(self) -> None:
        self.acked = 0

    def ack(self, tokens: Any) -> None:
        self.acked += len(tokens)

    def listen(self, *_: Any) -> None:
        pass

    def redeliver(self, *_: Any) -> None:
        pass

    def make_room(self, *_: Any) -> None:
        pass


def make_inbox(transform: str) -> Inbox:
    kwargs: dict[str, Any] = {}
    if "window" in inspect.signature(Inbox).parameters:
        kwargs["window"] = 1 << 40  # never hold the delivering thread: nobody reads here
    return Inbox(_NullTransport(), JOB, lambda _src: TRANSFORMS[transform], 2, **kwargs)  # type: ignore[arg-type]


def decode_complete(assembly: TransferAssembly) -> None:
    """Decode what a complete transfer holds, as a get would (objects whole, tables unit by unit)."""
    if transfer_kind(assembly, "peer") == KIND_OBJECT:
        decode_object_transfer(assembly, POLICY, "peer")
        return
    for stream in range(1, assembly.nstreams or 1):
        for unit in assembly.take(stream)[0]:
            decode_records(unit, POLICY, "peer")


def through_assembly(transform: str, frames: list[bytes]) -> None:
    assemblies: dict[bytes, TransferAssembly] = {}
    for m in frames:
        try:
            header, payload = parse_frame(m, JOB)
            asm = assemblies.setdefault(header.transfer, TransferAssembly(header.transfer, TRANSFORMS[transform]))
            asm.add(header, payload)
        except FederationError:
            continue
    for asm in assemblies.values():
        if asm.complete:
            with contextlib.suppress(FederationError):
                decode_complete(asm)


def through_inbox(transform: str, frames: list[bytes]) -> None:
    inbox = make_inbox(transform)
    for i, m in enumerate(frames):
        inbox.on_delivery(Delivery(SRC, i % 2, m, i))  # must never raise into the transport
    for inc in list(inbox._incoming.values()):  # test probe: every transfer the inbox started
        if not inc.done.done():
            continue
        error = inc.done.exception()
        assert error is None or isinstance(error, FederationError), repr(error)
        if error is None:
            with contextlib.suppress(FederationError):
                decode_complete(inc.assembly)


# --- the test --------------------------------------------------------------------------------------


KEYS = sorted(FRAMES)


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, Any]:
    target = draw(st.sampled_from(["frame", "assembly", "inbox", "object", "records", "lz4", "unseal", "noise"]))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    if target == "frame":
        key = draw(st.sampled_from(KEYS))
        return target, (key[0], [header_edited(rng, rng.choice(FRAMES[key]))])
    if target in ("assembly", "inbox"):
        first = draw(st.sampled_from(KEYS))
        keys = [first] + ([rng.choice(KEYS)] if rng.random() < 0.5 else [])
        return target, frame_sequence(rng, keys)
    if target == "object":
        return target, mutated(rng, draw(st.sampled_from(UNITS)))
    if target == "records":
        return target, mutated(rng, draw(st.sampled_from(BATCHES)))
    if target == "lz4":
        return target, (mutated(rng, draw(st.sampled_from(LZ4))), rng.choice([0, 1, 1200, 1400, 5000, 2**31]))
    if target == "unseal":
        return target, mutated(rng, rng.choice(SEALED))
    return target, rng.randbytes(rng.randint(0, 400))


def run_case(target: str, arg: Any) -> None:
    if target in ("frame", "assembly"):
        through_assembly(*arg)
    elif target == "inbox":
        through_inbox(*arg)
    elif target == "object":
        decode_object(arg, POLICY, "peer")
    elif target == "records":
        decode_records(arg, POLICY, "peer")
    elif target == "lz4":
        lz4_decompress(*arg)
    elif target == "unseal":
        Sealer.open(TRANSFORMS["sealed"]._aead, arg, b"header as aad")
    else:
        for fn in (lambda b: parse_frame(b, JOB), lambda b: decode_object(b, POLICY, "p"),
                   lambda b: decode_records(b, POLICY, "p"), lambda b: lz4_decompress(b, 100)):  # fmt: skip
            with contextlib.suppress(FederationError):
                fn(arg)


@pytest.fixture
def capped_address_space():
    """Allocations a hostile length asks for fail (MemoryError) instead of eating the machine's RAM."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = status_bytes("VmSize") + (512 << 20)
    if hard != resource.RLIM_INFINITY and hard < cap:
        cap = hard
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    quiet = logging.getLogger("fedtransport")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the inbox warns about every frame it drops: thousands here
    try:
        yield
    finally:
        quiet.setLevel(level)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


FUZZ = settings(
    max_examples=10_000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


@pytest.mark.slow
@FUZZ
@given(case=cases())
def test_receiving_side_raises_only_federation_errors(capped_address_space, case):
    target, arg = case
    with contextlib.suppress(FederationError):  # anything else fails the test
        run_case(target, arg)


# --- what the fuzzer found, pinned -----------------------------------------------------------------


@pytest.mark.parametrize("unit_len", [2**63, 2**40], ids=["overflow", "terabyte"])
def test_a_unit_longer_than_memory_is_an_integrity_error(capped_address_space, unit_len):
    """A unit longer than any address space fails at its first chunk; one longer than this process
    may map, once 1 MiB of it has arrived and it is mapped (was OverflowError/OSError)."""
    tid = transfer_id(JOB_ID, "v", "0", str(SRC), str(DST))
    writer = FrameWriter(JOB, tid, 1, TRANSFORMS["raw"])
    asm = TransferAssembly(tid, TRANSFORMS["raw"])
    with pytest.raises(IntegrityError, match="cannot hold a unit"):
        for seq, (offset, chunk) in enumerate([(0, b"abcd"), (4, bytes(1 << 20))]):
            msg = writer.frame(stream=0, unit=0, seq=seq, offset=offset, unit_len=unit_len, chunk=chunk, last=False)
            asm.add(*parse_frame(msg, JOB))
            assert unit_len < 2**63 and seq == 0  # only the mapping of the terabyte unit may fail later


def test_the_inbox_fails_that_transfer_and_keeps_delivering(capped_address_space):
    """Through the inbox the error fails that transfer's get; the delivering thread carries on."""
    inbox = make_inbox("raw")
    bad = FrameWriter(JOB, transfer_id(JOB_ID, "v", "bad", str(SRC), str(DST)), 1, TRANSFORMS["raw"])
    inbox.on_delivery(Delivery(SRC, 0, bad.frame(stream=0, unit=0, seq=0, offset=0, unit_len=2**63, chunk=b"ab",
                                                 last=False), 1))  # fmt: skip
    for i, m in enumerate(FRAMES[("raw", "dict")]):
        inbox.on_delivery(Delivery(SRC, i % 2, m, 10 + i))
    failed = inbox.entry(SRC, transfer_id(JOB_ID, "v", "bad", str(SRC), str(DST)))
    assert isinstance(failed.done.exception(), IntegrityError)
    good = inbox.entry(SRC, transfer_id(JOB_ID, "v", "dict", str(SRC), str(DST)))
    assert good.done.done() and good.done.exception() is None
    assert decode_object_transfer(good.assembly, POLICY, "peer") == VALUES["dict"]
