"""Framing layer: header, chunking, reassembly in any order with duplicates, corruption."""

from __future__ import annotations

import contextlib
import platform
import random
import re
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from party_proc import status_bytes

from fedtransport import framing
from fedtransport.codec import Compressor, PayloadCodec, Sealer
from fedtransport.errors import FederationError, IntegrityError
from fedtransport.framing import (
    HEADER_SIZE,
    FrameWriter,
    TransferAssembly,
    UnitChunker,
    frame_units,
    job_fingerprint,
    parse_frame,
    transfer_id,
)

JOB = job_fingerprint("job-1")
TID = transfer_id("job-1", "w", "0", "guest:9999", "host:10000")
PLAIN = PayloadCodec(Compressor(False))


def messages_for(units, max_chunk, transform=PLAIN, nstreams=1):
    writer = FrameWriter(JOB, TID, nstreams, transform)
    return list(frame_units(writer, 0, [(u, 1) for u in units], max_chunk))


def assemble(messages, transform=PLAIN):
    asm = TransferAssembly(TID, transform)
    for m in messages:
        header, payload = parse_frame(m, JOB)
        asm.add(header, payload)
    return asm


def test_header_is_88_bytes_and_parsed_without_pickle():
    [msg] = messages_for([b"hello"], 1024)
    assert HEADER_SIZE == 88 and len(msg) == HEADER_SIZE + 5 and msg[:2] == b"FT" and msg[2] == 2
    header, payload = parse_frame(msg, JOB)
    assert (header.stream, header.seq, header.unit, header.last, header.aux) == (0, 0, 0, True, 1)
    assert bytes(payload) == b"hello"


def test_no_message_exceeds_the_budget():
    msgs = messages_for([bytes(10_000), b"x" * 3, bytes(999)], 1000)
    assert all(len(m) <= HEADER_SIZE + 1000 for m in msgs)
    asm = assemble(msgs)
    assert asm.complete and [bytes(u) for u in asm.stream_units(0)] == [bytes(10_000), b"x" * 3, bytes(999)]


def test_chunker_does_not_concatenate_the_unit():
    parts = [memoryview(b"a" * 10), memoryview(b"b" * 10), memoryview(b"c" * 5)]
    ch = UnitChunker(parts, 25, 8)
    chunks = [ch.pieces(i) for i in range(len(ch))]
    assert [o for o, _ in chunks] == [0, 8, 16, 24]
    assert b"".join(bytes(p) for _, d in chunks for p in d) == b"a" * 10 + b"b" * 10 + b"c" * 5
    assert len(chunks[0][1]) == 1 and isinstance(chunks[0][1][0], memoryview)  # inside one buffer: a view, no copy
    assert [len(d) for _, d in chunks] == [1, 2, 2, 1]  # straddling chunks are views too, joined only by the frame


def test_empty_stream_still_completes():
    writer = FrameWriter(JOB, TID, 1, PLAIN)
    msgs = list(frame_units(writer, 0, [], 100))
    assert len(msgs) == 1
    asm = assemble(msgs)
    assert asm.complete and [bytes(u) for u in asm.stream_units(0)] == [b""]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=6),
    max_chunk=st.integers(1, 1500),
    dup_rate=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
    compress=st.booleans(),
)
def test_reassembly_any_order_with_duplicates(sizes, max_chunk, dup_rate, seed, compress):
    rng = random.Random(seed)
    units = [bytes(rng.getrandbits(8) if rng.random() < 0.5 else 0 for _ in range(n)) for n in sizes]
    transform = PayloadCodec(Compressor(compress))
    msgs = messages_for(units, max_chunk, transform)
    stream = msgs + [m for m in msgs if rng.random() < dup_rate]
    rng.shuffle(stream)
    asm = TransferAssembly(TID, transform)
    fresh = 0
    for m in stream:
        header, payload = parse_frame(m, JOB)
        fresh += asm.add(header, payload)
    assert fresh == len(msgs) and asm.complete
    assert [bytes(u) for u in asm.stream_units(0)] == units
    assert asm.expected_messages == len(msgs)


def test_incomplete_until_the_last_piece():
    msgs = messages_for([bytes(range(256)) * 10], 100)
    rng = random.Random(1)
    rng.shuffle(msgs)
    asm = TransferAssembly(TID, PLAIN)
    for m in msgs:
        assert not asm.complete
        asm.add(*parse_frame(m, JOB))
    assert asm.complete
    assert "messages" in asm.describe()


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_frames_raise_integrity_error_only(data):
    msgs = messages_for([b"payload" * 50, b"second"], 64)
    msg = bytearray(data.draw(st.sampled_from(msgs)))
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if kind == "flip":
        pos = data.draw(st.integers(0, len(msg) - 1))
        msg[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        del msg[data.draw(st.integers(0, len(msg) - 1)) :]
    else:
        msg += data.draw(st.binary(min_size=1, max_size=10))
    with pytest.raises(IntegrityError):
        TransferAssembly(TID, PLAIN).add(*parse_frame(bytes(msg), JOB))


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=300))
def test_random_bytes_never_escape_the_hierarchy(blob):
    with contextlib.suppress(FederationError):  # anything else fails the test
        TransferAssembly(TID, PLAIN).add(*parse_frame(blob, JOB))


def test_foreign_job_is_refused():
    [msg] = messages_for([b"x"], 100)
    with pytest.raises(IntegrityError, match="another job"):
        parse_frame(msg, job_fingerprint("job-2"))


def test_inconsistent_frames_are_refused():
    w1 = FrameWriter(JOB, TID, 1, PLAIN)
    w2 = FrameWriter(JOB, TID, 2, PLAIN, w1.incarnation)  # the same send, lying about its streams
    asm = TransferAssembly(TID, PLAIN)
    asm.add(*parse_frame(w1.frame(stream=0, unit=0, seq=0, offset=0, unit_len=10, chunk=b"12345", last=False), JOB))
    with pytest.raises(IntegrityError, match="stream count"):
        asm.add(*parse_frame(w2.frame(stream=0, unit=0, seq=1, offset=5, unit_len=10, chunk=b"6789", last=False), JOB))
    with pytest.raises(IntegrityError, match="overflows"):
        asm.add(*parse_frame(w1.frame(stream=0, unit=0, seq=2, offset=8, unit_len=10, chunk=b"abcd", last=True), JOB))
    with pytest.raises(IntegrityError, match="disagree on the length"):
        asm.add(*parse_frame(w1.frame(stream=0, unit=0, seq=3, offset=0, unit_len=11, chunk=b"a", last=True), JOB))


def test_a_claimed_unit_length_commits_no_memory_until_its_bytes_arrive():
    """A header may claim a 4 GiB unit; only the chunks that actually arrive take memory."""
    if tuple(map(int, re.findall(r"\d+", platform.release())[:2])) >= (5, 14):  # MADV_POPULATE_WRITE
        assert framing._POPULATE_WRITE == 23  # pages are still faulted in by the batch
    claimed, chunk = 4 << 30, b"x" * (1 << 20)
    w = FrameWriter(JOB, TID, 1, PLAIN)
    asm = TransferAssembly(TID, PLAIN)
    before = status_bytes("VmRSS")
    for i, offset in enumerate((0, 2 << 30, claimed - len(chunk))):  # start, middle, end
        asm.add(*parse_frame(w.frame(stream=0, unit=0, seq=i, offset=offset, unit_len=claimed, chunk=chunk,
                                     last=False), JOB))  # fmt: skip
    assert status_bytes("VmRSS") - before < 256 << 20
    assert not asm.complete and asm.held(0) == 3 * len(chunk)
    # Another unit, whose chunks each land as far ahead as the receiver populates: commitment
    # must stay in proportion to the 96 MiB that arrive, not grow with the square of it.
    got, before = 0, status_bytes("VmRSS")
    for i in range(96):
        offset = 2 * (got + len(chunk)) - len(chunk)
        asm.add(*parse_frame(w.frame(stream=0, unit=1, seq=3 + i, offset=offset, unit_len=claimed, chunk=chunk,
                                     last=False), JOB))  # fmt: skip
        got += len(chunk)
    assert status_bytes("VmRSS") - before < 512 << 20


def test_crc_detects_a_tampered_header_field():
    [msg] = messages_for([b"abc"], 100)
    tampered = bytearray(msg)
    struct.pack_into("<I", tampered, 36, 7)  # the stream index
    with pytest.raises(IntegrityError, match="checksum"):
        parse_frame(bytes(tampered), JOB)


@pytest.mark.parametrize("size", [0, 1, 4095, 64 << 10, (4 << 20) - 88])
def test_the_frame_crc_is_zlibs_crc32_so_frames_read_alike_everywhere(size: int) -> None:
    """ISA-L computes the CRC now: its value must be zlib.crc32's, over the header and the payload
    given in pieces, or frames from a peer on the previous version would all fail their check."""
    from isal import isal_zlib

    payload = random.Random(size).randbytes(size)
    assert isal_zlib.crc32(payload) == zlib.crc32(payload)
    assert isal_zlib.crc32(payload[size // 3 :], isal_zlib.crc32(payload[: size // 3])) == zlib.crc32(payload)
    writer = FrameWriter(JOB, TID, 1, PLAIN)
    view = memoryview(payload)
    msg = writer.frame(stream=0, unit=0, seq=0, offset=0, unit_len=size, chunk=[view[:7], view[7:]], last=True)
    (crc,) = struct.unpack_from("<I", msg, HEADER_SIZE - 4)
    assert crc == zlib.crc32(msg[HEADER_SIZE:], zlib.crc32(msg[: HEADER_SIZE - 4]))
    assert bytes(parse_frame(msg, JOB)[1]) == payload
    if size:  # one flipped bit anywhere in the payload is caught
        corrupt = bytearray(msg)
        corrupt[HEADER_SIZE + size // 2] ^= 0x10
        with pytest.raises(IntegrityError, match="checksum"):
            parse_frame(bytes(corrupt), JOB)


def sealed(src="guest:9999", dst="host:10000", secret=b"s" * 32, job="job-1"):
    return PayloadCodec(Compressor(True), Sealer(secret, job).for_pair(src, dst))


def test_sealed_frames_roundtrip_and_hide_plaintext():
    t = sealed()
    msgs = messages_for([b"top secret weights " * 100], 500, t)
    assert all(b"top secret" not in m for m in msgs)
    asm = assemble(msgs, t)
    assert bytes(asm.stream_units(0)[0]) == b"top secret weights " * 100


@pytest.mark.parametrize(
    "receiver",
    [
        lambda: PLAIN,  # no secret at all
        lambda: sealed(secret=b"x" * 32),  # another secret
        lambda: sealed(src="host:10000", dst="guest:9999"),  # the other direction's key
        lambda: sealed(job="job-2"),  # another job's key
    ],
    ids=["no-secret", "wrong-secret", "wrong-direction", "other-job"],
)
def test_sealed_frames_refused_without_the_right_key(receiver):
    [msg] = messages_for([b"secret"], 100, sealed())
    with pytest.raises(IntegrityError):
        TransferAssembly(TID, receiver()).add(*parse_frame(msg, JOB))


def test_unsealed_frame_refused_when_sealing_is_on():
    [msg] = messages_for([b"plain"], 100, PLAIN)
    with pytest.raises(IntegrityError, match="unsealed"):
        TransferAssembly(TID, sealed()).add(*parse_frame(msg, JOB))


def test_sealed_message_replayed_into_another_transfer_is_refused():
    t = sealed()
    other = transfer_id("job-1", "w", "1", "guest:9999", "host:10000")
    writer = FrameWriter(JOB, TID, 1, t)
    msg = bytearray(writer.frame(stream=0, unit=0, seq=0, offset=0, unit_len=3, chunk=b"abc", last=True))
    msg[12:28] = other  # rewrite the transfer id; recompute the CRC so only the AEAD can tell
    struct.pack_into("<I", msg, HEADER_SIZE - 4, zlib.crc32(msg[: HEADER_SIZE - 4]))  # sealed: header only
    with pytest.raises(IntegrityError, match="authentication"):
        TransferAssembly(other, t).add(*parse_frame(bytes(msg), JOB))


def test_every_send_has_its_own_incarnation_and_an_assembly_holds_one():
    """A sender killed part-way and restarted sends under a new incarnation: its frames are
    never placed into the assembly of the first send, whatever their seq numbers."""
    first, second = FrameWriter(JOB, TID, 1, PLAIN), FrameWriter(JOB, TID, 1, PLAIN)
    assert len(first.incarnation) == 8 and first.incarnation != second.incarnation
    ones = list(frame_units(first, 0, [(b"\x01" * 10, 1)], 4))
    twos = list(frame_units(second, 0, [(b"\x02" * 10, 1)], 4))
    header, _ = parse_frame(ones[0], JOB)
    assert header.incarnation == first.incarnation
    asm = TransferAssembly(TID, PLAIN)
    asm.add(*parse_frame(ones[0], JOB))  # the first send, then killed
    for msg in twos[1:]:  # the new send's other chunks would have completed the unit
        with pytest.raises(IntegrityError, match="another send"):
            asm.add(*parse_frame(msg, JOB))
    assert not asm.complete and asm.incarnation == first.incarnation
    assert bytes(assemble(twos).stream_units(0)[0]) == b"\x02" * 10
    with pytest.raises(ValueError, match="8 bytes"):
        FrameWriter(JOB, TID, 1, PLAIN, b"short")


def test_a_sealed_frames_incarnation_is_authenticated():
    t = sealed()
    writer = FrameWriter(JOB, TID, 1, t)
    msg = bytearray(writer.frame(stream=0, unit=0, seq=0, offset=0, unit_len=3, chunk=b"abc", last=True))
    assert msg[28:36] == writer.incarnation
    msg[28:36] = bytes(8)  # move the chunk to another send; the CRC recomputed so only the AEAD can tell
    struct.pack_into("<I", msg, HEADER_SIZE - 4, zlib.crc32(msg[: HEADER_SIZE - 4]))
    with pytest.raises(IntegrityError, match="authentication"):
        TransferAssembly(TID, t).add(*parse_frame(bytes(msg), JOB))
