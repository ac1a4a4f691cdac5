"""Codec layer: pickle 5 with out-of-band buffers, the safe unpickler, lz4, sealing."""

from __future__ import annotations

import collections
import datetime
import decimal
import os
import pickle
import struct

import numpy as np
import pytest

import fedtransport as ft
from fedtransport.codec import (
    Compressor,
    Sealer,
    UnpicklePolicy,
    decode_object,
    decode_records,
    decompress,
    encode_object,
    encode_records,
)
from fedtransport.errors import IntegrityError, UnsafePayload

SAFE = UnpicklePolicy()


def roundtrip(obj, policy=SAFE):
    unit = encode_object(obj)
    return decode_object(unit.tobytes(), policy, "test")


@pytest.mark.parametrize(
    "obj",
    [
        b"",
        b"\x00\xff" * 1000,
        "héllo wörld",
        2**4096 + 1,
        -(2**521),
        3.5,
        complex(1, -2),
        None,
        True,
        {"a": [1, (2, 3), {4, 5}], "b": frozenset({"x"}), "c": bytearray(b"ba")},
        [[[[]]]],
        collections.OrderedDict(a=1, b=2),
        collections.defaultdict(list, a=[1]),
        collections.Counter("abracadabra"),
        collections.deque([1, 2, 3]),
        datetime.datetime(2026, 11, 23, 5, 28, tzinfo=datetime.timezone.utc),
        datetime.date(2026, 1, 1),
        datetime.timedelta(seconds=5),
        decimal.Decimal("3.14159"),
        range(3, 10, 2),
        slice(1, 5, 2),
    ],
    ids=lambda o: type(o).__name__,
)
def test_roundtrip_builtins(obj):
    assert roundtrip(obj) == obj


@pytest.mark.parametrize(
    "array",
    [
        np.array(7.5),  # 0-d
        np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::2],  # non-contiguous
        np.arange(10, dtype=">f8"),  # big-endian
        np.zeros((0, 3), dtype=np.float32),  # empty
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "i4"), ("b", "f8")]),
        np.array([1, "x", None], dtype=object),
        np.array(["a", "bc"]),
    ],
    ids=["0d", "noncontig", "bigendian", "empty", "fortran", "structured", "object", "unicode"],
)
def test_roundtrip_numpy(array):
    back = roundtrip(array)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_numpy_scalars_and_dtypes():
    for obj in (np.float64(1.5), np.int32(-3), np.bool_(True), np.dtype("f4"), np.datetime64("2020-01-01")):
        assert roundtrip(obj) == obj


def test_large_array_is_out_of_band_and_aligned():
    a = np.random.default_rng(0).random(8 << 20)  # 64 MiB
    unit = encode_object(a)
    # the array's memory is one of the unit's parts: nothing was copied into the pickle stream
    assert any(p.obj is not None and p.nbytes == a.nbytes for p in unit.parts)
    assert unit.size < a.nbytes + 4096
    back = decode_object(unit.tobytes(), SAFE, "test")
    assert back.flags.aligned and np.array_equal(back, a)


def test_decoded_array_uses_receive_buffer_in_place():
    a = np.arange(1000, dtype=np.float64)
    buf = bytearray(encode_object(a).tobytes())
    back = decode_object(memoryview(buf), SAFE, "test")
    assert np.shares_memory(back, np.frombuffer(buf, dtype=np.uint8))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/fedtransport-pwned",))


def test_os_system_payload_is_refused(tmp_path):
    data = encode_object(Evil()).tobytes()
    with pytest.raises(UnsafePayload) as err:
        decode_object(data, SAFE, "host:10000")
    msg = str(err.value)
    assert "posix:system" in msg or "os:system" in msg
    assert "allow" in msg and "trust_remote_code" in msg and "host:10000" in msg
    assert not os.path.exists("/tmp/fedtransport-pwned")


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(S'1+1'\ntR.",
        b"cbuiltins\nexec\n(S'import os'\ntR.",
        b"cbuiltins\ngetattr\n(cbuiltins\nobject\nS'__subclasses__'\ntR.",
        b"csubprocess\nPopen\n((S'true'\nltR.",
        b"cimportlib\nimport_module\n(S'os'\ntR.",
        b"cbuiltins\n__import__\n(S'os'\ntR.",
        b"cnumpy.testing._private.utils\nrunstring\n(S'1'\n(dtR.",
        b"cbuiltins\ntype\n(S'X'\n(t(dtR.",
    ],
    ids=["eval", "exec", "getattr", "subprocess", "importlib", "__import__", "numpy-runstring", "type"],
)
def test_known_gadgets_refused(payload):
    head = struct.pack("<4sIQ", b"FTO1", 0, len(payload))  # the unit preamble, no out-of-band buffers
    with pytest.raises(UnsafePayload):
        decode_records(head + bytes(-len(head) % 64) + payload, SAFE, "peer")


def test_allow_option_admits_a_class():
    unit = encode_object(collections.ChainMap({"a": 1}))
    with pytest.raises(UnsafePayload, match="collections:ChainMap"):
        decode_object(unit.tobytes(), SAFE, "peer")
    policy = UnpicklePolicy(allow=frozenset({"collections:ChainMap"}))
    assert decode_object(unit.tobytes(), policy, "peer") == collections.ChainMap({"a": 1})


def test_trust_remote_code_admits_anything_and_cloudpickle_sends_lambdas():
    unit = encode_object(lambda x: x + 1, cloudpickle_fallback=True)
    with pytest.raises(UnsafePayload):
        decode_object(unit.tobytes(), SAFE, "peer")
    f = decode_object(unit.tobytes(), UnpicklePolicy(trust_remote_code=True), "peer")
    assert f(1) == 2


def test_report_mode_logs_and_still_refuses(caplog):
    policy = UnpicklePolicy(mode="report")
    with pytest.raises(UnsafePayload):
        decode_object(encode_object(collections.ChainMap()).tobytes(), policy, "peer")
    assert "collections:ChainMap" in caplog.text
    assert policy.refused == ["collections:ChainMap"]


def test_table_nested_in_object():
    t = ft.Table.from_partitions([[(1, "a")], [(2, np.arange(3))]])
    back = roundtrip({"t": t})["t"]
    assert back.num_partitions == 2 and back.partitions[0] == [(1, "a")]


@pytest.mark.parametrize("data", [b"", b"\x80", b"\x80\x05\x95", os.urandom(64), b"garbage that is not a pickle"])
def test_malformed_object_payload_is_integrity_error(data):
    with pytest.raises(IntegrityError):
        decode_object(data, SAFE, "peer")


def test_records_batches_respect_target_and_roundtrip():
    records = [(i, "v" * (i % 50)) for i in range(5000)]
    batches = list(encode_records(iter(records), 4096))
    assert sum(n for _, n in batches) == len(records)
    assert all(b.size <= 4096 for b, n in batches if n > 1)
    back = [r for b, _ in batches for r in decode_records(b.tobytes(), SAFE, "p")]
    assert back == records


def test_serialised_records_travel_as_one_pickle_a_run_in_order():
    """(bytes, bytes) records (FATE's serialised tables) are pickled as a list per run, between
    records of other kinds, in their order; the unit stays within its target."""
    arr = np.arange(4.0)
    records = [(b"k%d" % i, b"v" * (i % 300)) for i in range(400)]
    records[100:100] = [(1, arr), (2, {"a": 1})]
    records += [(b"last", bytearray(b"not bytes"))]
    batches = list(encode_records(iter(records), 4096))
    assert sum(n for _, n in batches) == len(records)
    assert all(b.size <= 4096 + 64 for b, n in batches if n > 1)
    back = [r for b, _ in batches for r in decode_records(b.tobytes(), SAFE, "p")]
    assert [k for k, _ in back] == [k for k, _ in records]
    assert all(type(v) is type(w) and (v == w if not isinstance(v, np.ndarray) else (v == w).all())
               for (_, v), (_, w) in zip(back, records, strict=True))  # fmt: skip
    pickles = batches[0][0].tobytes().count(b"\x95")  # FRAME opcodes: one per pickle of protocol 5
    assert pickles < 20  # not one per record


def test_bytes_values_under_int_and_str_keys_travel_as_one_pickle_a_run():
    """FATE-like records of int or str keys and bytes values are batched like (bytes, bytes) ones:
    a list per run, in order, the unit within its target even for keys of wide characters."""
    records: list = [(i, bytes([i % 256]) * 700) for i in range(300)]
    records += [(f"ключ-{i}" * 20, b"v" * 50) for i in range(100)]  # 2-byte UTF-8: the estimate must hold
    records += [(10**400 + i, b"big key") for i in range(20)] + [(True, b"a bool is not an int here")]
    batches = list(encode_records(iter(records), 8192))
    assert sum(n for _, n in batches) == len(records)
    assert all(b.size <= 8192 + 64 for b, n in batches if n > 1)
    back = [r for b, _ in batches for r in decode_records(b.tobytes(), SAFE, "p")]
    assert back == records and type(back[-1][0]) is bool
    first = batches[0][0].tobytes()
    assert first.count(b"\x95") < 4, "a pickle per record, not one per run"  # FRAME: one per pickle


@pytest.mark.parametrize("run", [[b"not a pair"], [(b"k",)], [(b"k", b"v", b"w")], [[b"k", b"v"]]])
def test_a_run_that_is_not_of_records_is_an_integrity_error(run):
    payload = pickle.dumps(run, protocol=5)
    head = struct.pack("<4sIQ", b"FTO1", 0, len(payload))  # the unit preamble, no out-of-band buffers
    with pytest.raises(IntegrityError, match="not of records"):
        decode_records(head + bytes(-len(head) % 64) + payload, SAFE, "peer")


def test_array_records_travel_as_row_batches_and_come_back_equal():
    rng = np.random.default_rng(3)
    rows = rng.random((300, 64))
    records = [(f"k{i}", rows[i]) for i in range(200)]
    records += [(200, "not an array"), (201, np.arange(5, dtype="i4")), (202, np.arange(5, dtype="i4"))]
    records += [(i, rows[i].astype("f4")) for i in range(203, 300)]  # another dtype: another run
    batches = list(encode_records(iter(records), 16 << 10))
    assert sum(n for _, n in batches) == len(records)
    assert all(b.size <= 16 << 10 for b, n in batches if n > 1)
    back = [r for b, _ in batches for r in decode_records(b.tobytes(), SAFE, "p")]
    assert [k for k, _ in back] == [k for k, _ in records]
    for (_, want), (_, got) in zip(records, back, strict=True):
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
        else:
            assert got == want
    assert len(batches) < 40  # a pickle call per record would not bring 64-float rows to 16 KiB batches


def test_a_generator_that_reuses_its_array_sends_every_row():
    def rows():
        buf = np.zeros(16)
        for i in range(100):
            buf[:] = i  # the same array object for every record
            yield i, buf

    back = [r for b, _ in encode_records(rows(), 4096) for r in decode_records(b.tobytes(), SAFE, "p")]
    assert [int(v[0]) for _, v in back] == list(range(100))

    def blobs():  # a mutable buffer big enough to be written on its own by the pickler
        buf = bytearray(100_000)
        for i in range(5):
            buf[:] = bytes([i]) * len(buf)
            yield i, buf

    back = [r for b, _ in encode_records(blobs(), 1 << 20) for r in decode_records(b.tobytes(), SAFE, "p")]
    assert [v[0] for _, v in back] == list(range(5)) and all(len(set(v)) == 1 for _, v in back)

    def shared():  # objects shared inside a record stay shared, and one record's never leak into the next
        for i in range(50):
            x = [i]
            yield i, (x, x, {"i": i})

    back = [r for b, _ in encode_records(shared(), 256) for r in decode_records(b.tobytes(), SAFE, "p")]
    assert [v for _, v in back] == [([i], [i], {"i": i}) for i in range(50)]
    assert all(v[0] is v[1] for _, v in back)


@pytest.mark.parametrize(
    "args",
    [([], "<f8", (2,), bytes(16)), ((1, 2), "<f8", (2,), bytes(32)), ([1, 2], "<f8", (2,), bytes(24)),
     ([1], "<f8", (), bytes(8)), ([1], "<f8", (-1,), bytes(8)), ([1], "|O", (1,), bytes(8))],
    ids=["no-keys", "keys-not-a-list", "short-data", "no-row-shape", "negative-shape", "object-dtype"],
)  # fmt: skip
def test_malformed_row_batches_are_refused(args):
    from fedtransport.codec.arrays import _rows

    with pytest.raises((ft.IntegrityError, ft.UnsafePayload)):
        _rows(*args)


def test_records_must_be_pairs():
    with pytest.raises(ft.SerializationError):
        list(encode_records([(1, 2, 3)], 100))


def test_oversized_record_gets_its_own_unit():
    big = (1, b"x" * 10000)
    batches = list(encode_records([(0, 0), big, (2, 2)], 1000))
    assert [n for _, n in batches] == [1, 1, 1]


def test_compressor_backs_off_on_random_data_and_compresses_zeros():
    c = Compressor(True)
    assert c.compress(os.urandom(1 << 20)) is None
    z = bytes(1 << 20)
    packed = c.compress(z)
    assert packed is not None and len(packed) < 10000
    assert decompress(packed, len(z)) == z
    assert Compressor(False).compress(z) is None


def test_decompress_refuses_a_bomb_and_garbage():
    packed = Compressor(True).compress(bytes(1 << 20))
    with pytest.raises(IntegrityError):
        decompress(packed, 1000)  # the header promised far less than it inflates to
    with pytest.raises(IntegrityError):
        decompress(b"\x04\x22\x4d\x18garbage", 100)


def test_sealing_keys_are_per_direction_and_detect_tampering():
    s = Sealer(b"k" * 32, "job")
    ab, ba = s.for_pair("a", "b"), s.for_pair("b", "a")
    sealed = Sealer.seal(ab, b"secret data", b"aad")
    assert b"secret data" not in sealed
    assert Sealer.open(ab, sealed, b"aad") == b"secret data"
    for aead, data, aad in [
        (ba, sealed, b"aad"),
        (ab, sealed, b"other"),
        (ab, sealed[:-1] + bytes([sealed[-1] ^ 1]), b"aad"),
        (Sealer(b"k" * 32, "job2").for_pair("a", "b"), sealed, b"aad"),
        (ab, sealed[:10], b"aad"),
    ]:
        with pytest.raises(IntegrityError):
            Sealer.open(aead, data, aad)


def test_pickle_protocol_is_5():
    unit = encode_object({"a": 1})
    raw = unit.tobytes()
    assert pickle.PROTO[0] in raw and b"\x80\x05" in raw


def test_compressor_leaves_chunks_under_4_kib_raw():
    """A small chunk is not worth lz4 (nor its GIL hand-off): compressible or not, it travels raw."""
    c = Compressor(True)
    assert c.compress(bytes(4095)) is None
    assert c.compress([bytes(2048), memoryview(bytes(2047))]) is None
    packed = c.compress([bytes(2048), memoryview(bytes(2048))])  # 4 KiB: tried, and it pays
    assert packed is not None and decompress(packed, 4096) == bytes(4096)
    assert Compressor(True, min_size=512).compress(bytes(1024)) is not None
