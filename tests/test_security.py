"""Security, proven against real brokers and hand-made attacks (docs/security.md is the threat model).

1. End-to-end sealing (option ``secret``): what the broker stores is read back raw, with a
   consumer of our own on the job's Pulsar topics and ``basic_get`` on the RabbitMQ queues,
   and a known plaintext marker must be absent, while it is present without a secret (so the
   check can fail). Tampering done *on the broker*: the sender's traffic is diverted to lanes
   the receiver does not read (``lane_offset``), captured raw, altered, and published where
   the receiver does read. Untouched frames go through (the control); a flipped bit, a header
   edited with its CRC recomputed, a frame replayed from another tag or another job, a party
   without the secret or with another one: all fail the ``get`` with ``IntegrityError``.
   Framing-level versions of these checks, without a broker, are in tests/test_framing.py.
2. Safe deserialisation: pickles made by hand (protocol opcodes GLOBAL, STACK_GLOBAL, INST,
   OBJ, EXT1, REDUCE) that run commands through os.system, subprocess, eval/exec, getattr
   chains, importlib, numpy.testing's runstring, timeit, nested pickle.loads, dotted-name
   lookups. Each is refused with ``UnsafePayload`` naming its ``module:qualname``, and its
   marker file is never created, while plain ``pickle.loads`` of the same bytes, in a
   subprocess, does create it. numpy gadgets that need nothing but the default allow-list
   (an object array over raw bytes, a dtype lying about its object fields, a dtype changed
   after use) crash plain pickle and are refused by the guarded unpickler
   (fedtransport/codec/guard.py); those run in subprocesses, so a regression shows as a
   crash report, not a dead test run. ``allow_mode="report"`` through the public API.
"""

from __future__ import annotations

import base64
import copyreg
import json
import logging
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pika
import pulsar
import pytest
from conftest import GUEST, HOST

import fedtransport as ft
from fedtransport.brokers import RabbitNode
from fedtransport.brokers.standalone import PulsarStandalone
from fedtransport.codec import SAFE_GLOBALS, UnpicklePolicy, decode_object, decode_records
from fedtransport.framing import HEADER_SIZE, job_fingerprint, transfer_id
from fedtransport.transport.pulsar.admin import PulsarAdmin

try:
    from tests.rabbit_fixtures import admin_of, rabbit_node, rabbit_opts, rabbit_pool, requires_rabbitmq
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from rabbit_fixtures import (  # type: ignore[no-redef]  # noqa: F401
        admin_of,
        rabbit_node,
        rabbit_opts,
        rabbit_pool,
        requires_rabbitmq,
    )

SECRET = "a job secret every party of the job shares"
MARKER = b"<<FEDTRANSPORT-PLAINTEXT-MARKER>>"
SAFE = UnpicklePolicy()


def marked_payload(n: int = 40) -> bytes:
    """Random bytes (lz4 backs off on them) with the marker every ~4 KiB: recognisable, incompressible."""
    rng = np.random.default_rng(5)
    return b"".join(MARKER + rng.bytes(4096) for _ in range(n))


# ==================================================================================================
# 1. sealing, end to end through real brokers
# ==================================================================================================


_JOBS: set[str] = set()  # the jobs this module's sessions made namespaces for


@pytest.fixture(scope="module")
def broker(pulsar_standalone: PulsarStandalone) -> Iterator[PulsarStandalone]:
    """The session's real Apache Pulsar broker; the module's jobs are gone from it afterwards."""
    yield pulsar_standalone
    admin = PulsarAdmin(pulsar_standalone.admin_url)
    for job in sorted(_JOBS):
        admin.delete_namespace("fl-tenant", job)


def pulsar_fed(broker: PulsarStandalone, job_id: str, party: ft.Party, **options: Any) -> ft.Federation:
    _JOBS.add(job_id)
    opts = {"service_url": broker.service_url, "admin_url": broker.admin_url, "compression": "none",
            "max_message_size": 65536, **options}  # fmt: skip
    return ft.Federation.connect("pulsar", job_id=job_id, party=party, options=opts)


def topic(job_id: str, lane: int) -> str:
    return f"persistent://fl-tenant/{job_id}/guest-9999-host-10000-{lane}"


def read_raw(url: str, topics: list[str], count: int) -> list[bytes]:
    """``count`` messages off ``topics`` through a subscription of our own: what the broker holds."""
    client = pulsar.Client(url, operation_timeout_seconds=30)
    try:
        consumers = [
            client.subscribe(
                t,
                "security-spy",
                consumer_type=pulsar.ConsumerType.Shared,
                initial_position=pulsar.InitialPosition.Earliest,
                receiver_queue_size=1,
            )
            for t in topics
        ]
        out: list[bytes] = []
        idle = 0
        while len(out) < count and idle < 3 * len(consumers) * 10:  # liveness bound: ~30 s of silence
            got = False
            for c in consumers:
                try:
                    msg = c.receive(timeout_millis=1000 // len(consumers) + 1)
                except pulsar.Timeout:
                    continue
                c.acknowledge(msg)
                out.append(msg.data())
                got = True
            idle = 0 if got else idle + 1
        assert len(out) == count, f"read {len(out)} of {count} messages off the broker"
        return out
    finally:
        client.close()


def publish_raw(url: str, job_id: str, frames: list[bytes]) -> None:
    """Publish ``frames`` on the receiver's lanes (0..3), as anyone with broker access could."""
    client = pulsar.Client(url, operation_timeout_seconds=30)
    try:
        producers = [client.create_producer(topic(job_id, lane), batching_enabled=False) for lane in range(4)]
        for i, frame in enumerate(frames):
            producers[i % 4].send(frame)
    finally:
        client.close()


@pytest.mark.parametrize("secret", [SECRET, None], ids=["sealed", "plaintext-control"])
def test_pulsar_broker_never_holds_plaintext(broker, job_id, secret):
    data = marked_payload()
    with pulsar_fed(broker, job_id, GUEST, secret=secret) as g:
        g.remote(data, "w", "0", [HOST])
        raw = read_raw(broker.service_url, [topic(job_id, lane) for lane in range(4)], g.stats["messages_sent"])
    assert (MARKER in b"".join(raw)) is (secret is None)
    assert sum(MARKER in m for m in raw) == (0 if secret else len(raw)), "every message carries the marker in clear"
    with pulsar_fed(broker, job_id, HOST, secret=secret) as h:
        assert h.get("w", "0", [GUEST], timeout=60) == [data]


@requires_rabbitmq
@pytest.mark.rabbitmq
@pytest.mark.parametrize("secret", [SECRET, None], ids=["sealed", "plaintext-control"])
def test_rabbitmq_queue_never_holds_plaintext(rabbit_node: RabbitNode, job_id, secret):
    node = rabbit_node
    opts = rabbit_opts(node, compression="none", max_message_size=65536, secret=secret)
    data = marked_payload()
    g = ft.Federation.connect("rabbitmq", job_id=job_id, party=GUEST, options=opts)
    try:
        with g:
            g.remote(data, "w", "0", [HOST])
            vhost = g.transport.vhost  # type: ignore[attr-defined]
            sent = g.stats["messages_sent"]
        queues = [q["name"] for q in admin_of(node).list_queues(vhost)]  # the lanes that carried something
        # Before the receiver consumes: the broker's copy, read with basic_get and left in place.
        admin_of(node).set_permissions(vhost, node.user)
        params = pika.ConnectionParameters(
            "127.0.0.1", node.port, vhost, pika.PlainCredentials(node.user, node.password)
        )
        raw: list[bytes] = []
        with pika.BlockingConnection(params) as conn:
            ch = conn.channel()
            for q in queues:
                while (got := ch.basic_get(q, auto_ack=False))[0] is not None:
                    raw.append(got[2])
            ch.close()  # nothing acknowledged: every message goes back to its queue
        assert len(raw) == sent
        assert sum(MARKER in m for m in raw) == (0 if secret else len(raw))
        with ft.Federation.connect("rabbitmq", job_id=job_id, party=HOST, options=opts) as h:
            assert h.get("w", "0", [GUEST], timeout=60) == [data]
    finally:
        g.cleanup()


# --- tampering on the broker ----------------------------------------------------------------------

DIVERTED = 100  # the sender's lane_offset: topics ...-100..103, which the receiver never reads
CASES = ["untouched", "flipped-payload-bit", "edited-header", "replayed-from-another-tag",
         "replayed-from-another-job", "foreign-job-as-is"]  # fmt: skip


def fix_crc(frame: bytearray) -> None:
    """What an attacker can always do: the CRC is a checksum, not a MAC (sealed: header only)."""
    struct.pack_into("<I", frame, HEADER_SIZE - 4, zlib.crc32(bytes(frame[: HEADER_SIZE - 4])))


def tampered(case: str, frames: list[bytes], job_id: str, foreign: list[bytes]) -> list[bytes]:
    out = [bytearray(f) for f in (foreign if "job" in case else frames)]
    if case == "flipped-payload-bit":
        out[0][HEADER_SIZE + 40] ^= 0x10
    elif case == "edited-header":
        struct.pack_into("<Q", out[0], 60, struct.unpack_from("<Q", out[0], 60)[0] ^ 1)  # the chunk's offset
        fix_crc(out[0])
    elif case == "replayed-from-another-tag" or case == "replayed-from-another-job":
        for f in out:  # readdressed to the transfer the receiver is waiting for
            f[4:12] = job_fingerprint(job_id)
            f[12:28] = transfer_id(job_id, "w", case, str(GUEST), str(HOST))
            fix_crc(f)
    return [bytes(f) for f in out]


@pytest.fixture(scope="module")
def captured(broker) -> dict[str, Any]:
    """Sealed traffic of one job (one transfer per case) and of another job, captured raw off the broker."""
    url = broker.service_url
    job, other = f"tamper-{os.getpid()}", f"tamper-other-{os.getpid()}"
    value = {"weights": np.arange(3000.0), "note": "the transfer an attacker would like to alter"}
    frames: dict[str, list[bytes]] = {}
    with pulsar_fed(broker, job, GUEST, secret=SECRET, lane_offset=DIVERTED, lanes=1) as g:
        for case in CASES:
            before = g.stats["messages_sent"]
            tag = "genuine" if "another" in case else case
            if tag not in frames:
                g.remote(value, "w", tag, [HOST])
                frames[tag] = read_raw(url, [topic(job, DIVERTED)], g.stats["messages_sent"] - before)
    with pulsar_fed(broker, other, GUEST, secret=SECRET, lane_offset=DIVERTED, lanes=1) as g:
        g.remote(value, "w", "0", [HOST])
        foreign = read_raw(url, [topic(other, DIVERTED)], g.stats["messages_sent"])
    return {"broker": broker, "url": url, "job": job, "value": value, "frames": frames, "foreign": foreign}


@pytest.mark.parametrize("case", CASES)
def test_tampering_on_the_broker_is_detected(captured, case):
    url, job = captured["url"], captured["job"]
    frames = captured["frames"].get(case, captured["frames"].get("genuine"))
    publish_raw(url, job, tampered(case, frames, job, captured["foreign"]))
    with pulsar_fed(captured["broker"], job, HOST, secret=SECRET) as h:
        if case == "untouched":  # the control: forwarding as such is not what is refused
            [back] = h.get("w", case, [GUEST], timeout=60)
            assert np.array_equal(back["weights"], captured["value"]["weights"])
        elif case == "foreign-job-as-is":
            # Not readdressed: the frames name another job and another transfer. They are dropped
            # as foreign, never attributed to anything this job waits for.
            with pytest.raises(ft.TransferTimeout) as err:
                h.get("w", case, [GUEST], timeout=3)
            assert err.value.missing == {"guest:9999": "nothing"}
        else:
            with pytest.raises(ft.IntegrityError, match="authentication"):
                h.get("w", case, [GUEST], timeout=60)


@pytest.mark.parametrize(
    ("sender", "receiver", "match"),
    [
        (SECRET, None, "no 'secret'"),
        (None, SECRET, "unsealed"),  # a downgrade to plaintext is refused
        (SECRET, "another secret, just as long as the first", "authentication"),
    ],
    ids=["receiver-without-secret", "sender-without-secret", "different-secrets"],
)
def test_a_party_without_the_secret_gets_an_integrity_error(broker, job_id, sender, receiver, match):
    with (
        pulsar_fed(broker, job_id, GUEST, secret=sender) as g,
        pulsar_fed(broker, job_id, HOST, secret=receiver) as h,
    ):
        g.remote({"w": np.ones(10)}, "w", "0", [HOST])
        with pytest.raises(ft.IntegrityError, match=match):
            h.get("w", "0", [GUEST], timeout=60)


# ==================================================================================================
# 2. safe deserialisation
# ==================================================================================================


class Asm:
    """A pickle assembler: opcodes written by hand, so no gadget depends on how pickle.dumps works."""

    def __init__(self, proto: int = 4) -> None:
        self.b = bytearray(b"\x80" + bytes([proto]))

    def s(self, text: str) -> Asm:
        data = text.encode()
        self.b += b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE
        return self

    def raw(self, code: bytes) -> Asm:
        self.b += code
        return self

    def glob(self, module: str, name: str) -> Asm:
        return self.s(module).s(name).raw(b"\x93")  # STACK_GLOBAL

    def call(self, *args: str) -> Asm:  # args as a tuple, then REDUCE
        self.raw(b"(")
        for a in args:
            self.s(a)
        return self.raw(b"tR")

    def done(self) -> bytes:
        return bytes(self.b + b".")


COMMAND_GADGETS = ("os-system-proto0", "posix-system", "popen-inst", "check-output-obj", "eval", "exec",
                   "getattr-chain", "runstring", "timeit", "nested-loads", "ext1-registry", "py2-eval")  # fmt: skip


def shell(marker: Path) -> str:
    return f"touch {marker}"


def gadgets(tmp: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle bytes, the global the safe unpickler must name). Each creates tmp/name if run."""
    m = {n: tmp / n for n in COMMAND_GADGETS}
    inner = Asm().glob("os", "system").call(shell(m["nested-loads"])).done()
    return {
        # protocol 0: GLOBAL opcode, text arguments
        "os-system-proto0": (f"cos\nsystem\n(S'{shell(m['os-system-proto0'])}'\ntR.".encode(), "os:system"),
        # what pickle.dumps writes for a __reduce__ returning os.system on Linux
        "posix-system": (Asm().glob("posix", "system").call(shell(m["posix-system"])).done(), "posix:system"),
        # INST: MARK, the argument list, then module and name as text lines
        "popen-inst": (f"((lp0\nS'touch'\naS'{m['popen-inst']}'\naisubprocess\nPopen\n.".encode(), "subprocess:Popen"),
        # OBJ: MARK, the callable, its arguments
        "check-output-obj": (
            f"(csubprocess\ncheck_output\n(lp0\nS'touch'\naS'{m['check-output-obj']}'\nao.".encode(),
            "subprocess:check_output",
        ),
        "eval": (
            Asm().glob("builtins", "eval").call(f"__import__('os').system('{shell(m['eval'])}')").done(),
            "builtins:eval",
        ),
        "exec": (
            Asm().glob("builtins", "exec").call(f"import os; os.system('{shell(m['exec'])}')").done(),
            "builtins:exec",
        ),
        # getattr(__import__("os"), "system")("touch ...")
        "getattr-chain": (
            Asm()
            .glob("builtins", "getattr")
            .glob("builtins", "__import__")
            .call("os")
            .s("system")
            .raw(b"\x86R")
            .call(shell(m["getattr-chain"]))
            .done(),
            "builtins:getattr",
        ),
        "importlib": (Asm().glob("importlib", "import_module").call("os").done(), "importlib:import_module"),
        "runstring": (
            Asm()
            .glob("numpy.testing._private.utils", "runstring")
            .raw(b"(")
            .s(f"import os; os.system('{shell(m['runstring'])}')")
            .raw(b"}tR")
            .done(),
            "numpy.testing._private.utils:runstring",
        ),
        "timeit": (  # the command as setup: it runs once, then "pass" a million times
            Asm().glob("timeit", "timeit").call("pass", f"__import__('os').system('{shell(m['timeit'])}')").done(),
            "timeit:timeit",
        ),
        "nested-loads": (
            Asm().glob("pickle", "loads").raw(b"C" + bytes([len(inner)]) + inner + b"\x85R").done(),
            "pickle:loads",
        ),
        # EXT1: a code from copyreg's extension registry, resolved through find_class all the same
        "ext1-registry": (b"\x80\x02\x82\xf0" + f"(S'{shell(m['ext1-registry'])}'\ntR.".encode(), "os:system"),
        # Python 2's name for builtins: protocol 2 maps it, after the allow-list has seen it
        "py2-eval": (
            b"\x80\x02" + f"c__builtin__\neval\n(S\"__import__('os').system('{shell(m['py2-eval'])}')\"\ntR.".encode(),
            "__builtin__:eval",
        ),
        # dotted names walk attributes from an allowed class (protocol 4)
        "dotted-globals": (
            Asm().glob("fedtransport.table", "Table.__init__.__globals__").done(),
            "fedtransport.table:Table.__init__.__globals__",
        ),
        "dotted-subclasses": (
            Asm().glob("builtins", "object.__subclasses__").raw(b")R").done(),
            "builtins:object.__subclasses__",
        ),
        "copyreg-reconstructor": (Asm().glob("copyreg", "_reconstructor").done(), "copyreg:_reconstructor"),
        "functools-partial": (Asm().glob("functools", "partial").done(), "functools:partial"),
        "operator-methodcaller": (
            Asm().glob("operator", "methodcaller").call("system").done(),
            "operator:methodcaller",
        ),
    }


EXT_CODE = 0xF0


@pytest.fixture
def ext_registry() -> Iterator[None]:
    """Register ("os", "system") under an extension code, as a careless process might have."""
    copyreg.add_extension("os", "system", EXT_CODE)
    try:
        yield
    finally:
        copyreg.remove_extension("os", "system", EXT_CODE)


def as_object_unit(pickled: bytes) -> bytes:
    """``pickled`` inside the unit preamble decode_object and decode_records expect (no out-of-band buffers)."""
    head = struct.pack("<4sIQ", b"FTO1", 0, len(pickled))
    head += bytes(-len(head) % 64)
    return head + pickled


GADGET_NAMES = sorted(gadgets(Path("/x")))


@pytest.mark.parametrize("name", GADGET_NAMES)
def test_pickle_gadgets_are_refused_and_nothing_runs(tmp_path, ext_registry, name):
    data, expected = gadgets(tmp_path)[name]
    for decode, payload in ((decode_object, as_object_unit(data)), (decode_records, as_object_unit(data))):
        with pytest.raises(ft.UnsafePayload) as err:
            decode(payload, SAFE, "host:10000")
        assert err.value.global_name == expected
        assert repr(expected) in str(err.value) and "host:10000" in str(err.value)
    assert not (tmp_path / name).exists(), "the gadget ran"
    assert list(tmp_path.iterdir()) == []


CONTROL = textwrap.dedent(
    """
    import base64, copyreg, json, pickle, subprocess, sys
    copyreg.add_extension("os", "system", 0xF0)
    results = {}
    for name, data in json.loads(sys.stdin.read()).items():
        try:
            value = pickle.loads(base64.b64decode(data))
            if isinstance(value, subprocess.Popen):
                value.wait()
            results[name] = "ran"
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(results))
    """
)


def test_the_same_gadgets_do_run_under_plain_pickle(tmp_path):
    """The control: each command gadget is live, so the refusal above is what stops it."""
    live = {n: d for n, (d, _) in gadgets(tmp_path).items() if n in COMMAND_GADGETS}
    payload = json.dumps({n: base64.b64encode(d).decode() for n, d in live.items()})
    out = subprocess.run([sys.executable, "-c", CONTROL], input=payload, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, check=True)  # fmt: skip
    results = json.loads(out.stdout)
    created = {p.name for p in tmp_path.iterdir()}
    assert created == set(live), f"plain pickle.loads: {results}"


# --- numpy: gadgets from the default allow-list alone ----------------------------------------------


def np_gadgets() -> dict[str, bytes]:
    """Memory-corruption gadgets naming only numpy globals that are on SAFE_GLOBALS."""

    def dtype(a: Asm, spec: str, state: bytes | None = None) -> Asm:
        a.glob("numpy", "dtype").s(spec).raw(b"\x89\x88\x87R")  # dtype(spec, False, True)
        return a.raw(state + b"b") if state is not None else a

    def obj_field_state(flags: int) -> bytes:  # (3, '|', None, ('a',), {'a': (dtype('O'), 0)}, 8, 1, flags)
        inner = Asm()
        inner.b = bytearray()
        inner.raw(b"(K\x03").s("|").raw(b"N").s("a").raw(b"\x85}").s("a")
        dtype(inner, "O8", bytes(Asm(0).raw(b"(K\x03").s("|").raw(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?t").b[2:]))
        inner.raw(b"K\x00\x86sK\x08K\x01J" + struct.pack("<i", flags) + b"t")
        return bytes(inner.b)

    def raw8() -> bytes:
        return b"C\x08" + b"A" * 8

    out = {}
    out["ndarray-over-raw-bytes"] = (
        Asm().glob("numpy", "ndarray").raw(b"K\x01\x85").s("O").raw(raw8() + b"\x87R").done()
    )
    out["ndarray-newobj"] = Asm().glob("numpy", "ndarray").raw(b"K\x01\x85").s("O").raw(raw8() + b"\x87\x81").done()
    a = Asm().glob("numpy._core.numeric", "_frombuffer").raw(b"(" + raw8())
    out["dtype-denying-its-object-field"] = (
        dtype(a, "V8", obj_field_state(0)).raw(b"K\x01\x85").s("C").raw(b"tR").done()
    )
    a = Asm().glob("numpy._core.multiarray", "_reconstruct").glob("numpy", "ndarray").raw(b"K\x00\x85C\x01b\x87R")
    a.raw(b"(K\x01K\x01\x85")
    out["array-state-with-lying-dtype"] = dtype(a, "V8", obj_field_state(0)).raw(b"\x89" + raw8() + b"tb").done()
    # a plain dtype used for an array of raw bytes, then given an object field (with honest flags)
    a = dtype(Asm(), "V8").raw(b"\x94")  # memo 0
    a.glob("numpy._core.numeric", "_frombuffer").raw(b"(" + raw8() + b"h\x00K\x01\x85").s("C").raw(b"tR\x94")  # memo 1
    out["dtype-changed-after-use"] = a.raw(b"0h\x00" + obj_field_state(27) + b"b0h\x01").done()
    # a datetime dtype given structured fields: numpy's own __setstate__ crashes on it
    out["datetime-dtype-given-fields"] = dtype(Asm(), "M8", obj_field_state(27)).done()
    return out


NUMPY_CHILD = textwrap.dedent(
    """
    import base64, json, struct, sys
    from fedtransport.codec import UnpicklePolicy, decode_records
    from fedtransport.errors import FederationError, UnsafePayload
    results = {}
    for name, data in json.loads(sys.stdin.read()).items():
        pickled = base64.b64decode(data)
        head = struct.pack("<4sIQ", b"FTO1", 0, len(pickled))
        try:
            decode_records(head + bytes(-len(head) % 64) + pickled, UnpicklePolicy(), "peer")
            results[name] = "decoded"
        except UnsafePayload as exc:
            results[name] = "UnsafePayload " + exc.global_name
        except FederationError as exc:
            results[name] = type(exc).__name__ + " " + str(exc)
    print(json.dumps(results))
    """
)


def run_child(code: str, payload: dict[str, bytes]) -> subprocess.CompletedProcess[str]:
    stdin = json.dumps({n: base64.b64encode(d).decode() for n, d in payload.items()})
    env = {**os.environ, "PYTHONPATH": str(Path(ft.__file__).parent.parent)}
    return subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True, timeout=120,
                          env=env, check=False)  # fmt: skip


def test_numpy_gadgets_on_the_default_allow_list_are_refused():
    done = run_child(NUMPY_CHILD, np_gadgets())
    assert done.returncode == 0, f"the decoder crashed (rc {done.returncode}): {done.stderr[-2000:]}"
    results = json.loads(done.stdout)
    expected = {
        "ndarray-over-raw-bytes": "UnsafePayload numpy:ndarray",
        "ndarray-newobj": "UnsafePayload numpy:ndarray",
        "dtype-denying-its-object-field": "UnsafePayload numpy:dtype",
        "array-state-with-lying-dtype": "UnsafePayload numpy:dtype",
        "dtype-changed-after-use": "UnsafePayload numpy:dtype",
        "datetime-dtype-given-fields": "UnsafePayload numpy:dtype",
    }
    assert results == expected


@pytest.mark.parametrize("name", ["ndarray-over-raw-bytes", "dtype-denying-its-object-field"])
def test_the_numpy_gadgets_crash_plain_pickle(name):
    """The control: unguarded, these give element pointers the peer chose; reading one crashes."""
    code = "import base64, json, pickle, sys\nv = pickle.loads(base64.b64decode(json.load(sys.stdin)['g']))\nv.tolist()"
    done = run_child(code, {"g": np_gadgets()[name]})
    assert done.returncode < 0, f"expected a crash, got rc {done.returncode}: {done.stdout} {done.stderr[-500:]}"


def test_legitimate_numpy_values_still_round_trip():
    """What the guard must not refuse (tests/test_codec.py has more): dtypes of every kind, in and out of band."""
    structured = np.zeros(2, dtype=np.dtype([("a", "<i4"), ("b", "O"), ("c", ">f8", (2,))], align=True))
    structured["b"] = [{"x": 1}, None]
    values = [np.arange(5, dtype=">u4"), np.array(["ab", "c"]), np.array(["2026-01-01"], dtype="M8[s]"),
              np.timedelta64(3, "ms"), structured, np.dtype([("t", "m8[2ms]")]), np.dtype(float, metadata={"k": 1}),
              np.arange(12.0).reshape(3, 4)[:, ::2], np.float32(1.5), np.bool_(True)]  # fmt: skip
    back = decode_object(ft.codec.encode_object(values).tobytes(), SAFE, "peer")
    for a, b in zip(values, back, strict=True):
        assert type(a) is type(b)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape and pickle.dumps(a[a.dtype.names[0]] if a.dtype.names
                                                                              else a) == pickle.dumps(
                b[b.dtype.names[0]] if b.dtype.names else b)  # fmt: skip
        else:
            assert a == b
    assert back[4]["b"].tolist() == [{"x": 1}, None]


# --- memory: constructors that copy or expand what they are given ---------------------------------


def long1(n: int) -> bytes:
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def memory_bombs() -> dict[str, bytes]:
    """Pickles of 20 bytes to 1.5 MiB, naming only allow-listed globals, each asking for 64 GiB or more."""
    huge, mib = 1 << 36, 1 << 20

    def rng(a: Asm) -> Asm:  # range(0, 2**36): lazy, until a constructor expands it
        return a.glob("builtins", "range").raw(b"K\x00" + long1(huge) + b"\x86R")

    def copies(a: Asm, memoised: int, call: bytes) -> bytes:  # 65536 calls, all on memo 0 .. memoised - 1
        gets = b"".join(b"h" + bytes([i]) for i in range(memoised))
        return a.raw(b"0" * memoised + b"](" + (gets + call) * (huge // mib) + b"e").done()

    out = {
        "bytearray-of-a-count": Asm().glob("builtins", "bytearray").raw(long1(huge) + b"\x85R").done(),
        "bytes-of-a-count": Asm().glob("builtins", "bytes").raw(long1(huge) + b"\x85R").done(),
        "list-of-a-range": rng(Asm().glob("builtins", "list")).raw(b"\x85R").done(),
        "counter-of-a-range": rng(Asm().glob("collections", "Counter")).raw(b"\x85R").done(),
        "table-of-a-range": rng(Asm().glob("fedtransport.table", "Table")).raw(b"\x85R").done(),
        "tuple-new-of-a-range": rng(Asm().glob("builtins", "tuple")).raw(b"\x85\x81").done(),  # NEWOBJ
    }
    one_mib = b"B" + struct.pack("<I", mib) + b"x" * mib + b"\x94"  # BINBYTES, memoised
    a = Asm().glob("builtins", "bytearray").raw(b"\x94" + one_mib)  # bytearray(b) again and again
    out["bytearray-copies-of-one-string"] = copies(a, 2, b"\x85R")
    a = Asm().glob("numpy._core.multiarray", "scalar").raw(b"\x94").glob("numpy", "dtype").s(f"S{mib}")
    a.raw(b"\x89\x88\x87R\x94" + one_mib)  # scalar(dtype("S1048576"), b) again and again
    out["numpy-scalar-copies-of-one-string"] = copies(a, 3, b"\x86R")
    return out


BOMB_CHILD = textwrap.dedent(
    """
    import base64, json, resource, struct, sys
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a regression fails, it does not swap
    from fedtransport.codec import UnpicklePolicy, decode_object, decode_records
    from fedtransport.errors import FederationError
    results = {}
    for name, data in json.loads(sys.stdin.read()).items():
        pickled = base64.b64decode(data)
        head = struct.pack("<4sIQ", b"FTO1", 0, len(pickled))
        unit = head + bytes(-len(head) % 64) + pickled
        for decode in (decode_object, decode_records):
            try:
                decode(unit, UnpicklePolicy(), "peer")
                results[name] = "decoded"
            except FederationError as exc:
                results.setdefault(name, []).append(type(exc).__name__ + ": " + str(exc))
    with open("/proc/self/status") as f:
        results["peak"] = [int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM:")][0]
    print(json.dumps(results))
    """
)


def test_memory_bombs_are_refused_before_they_allocate():
    bombs = memory_bombs()
    assert max(map(len, bombs.values())) < 2 << 20
    done = run_child(BOMB_CHILD, bombs)
    assert done.returncode == 0, f"the decoder failed (rc {done.returncode}): {done.stderr[-2000:]}"
    results = json.loads(done.stdout)
    assert results.pop("peak") < 512 << 20
    for name in bombs:
        errors = results[name]
        assert isinstance(errors, list) and len(errors) == 2, (name, errors)
        for e in errors:
            assert e.startswith("IntegrityError: ") and "more than its own size allows" in e, (name, e)


def test_the_memory_bombs_exhaust_plain_pickle():
    """The control: under plain pickle.loads, with 3 GiB of address space, each runs out of memory."""
    code = textwrap.dedent(
        """
        import base64, json, pickle, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        out = {}
        for name, data in json.loads(sys.stdin.read()).items():
            try:
                pickle.loads(base64.b64decode(data))
                out[name] = "decoded"
            except MemoryError:
                out[name] = "MemoryError"
        print(json.dumps(out))
        """
    )
    bombs = memory_bombs()
    done = run_child(code, bombs)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == dict.fromkeys(bombs, "MemoryError")


def test_values_that_name_copying_constructors_still_round_trip():
    """The guard's allowance is for bombs: what pickle itself writes for these types fits in it."""
    import collections
    import decimal
    import fractions

    values = [collections.defaultdict(list, {"a": [1, 2]}), collections.Counter("abracadabra" * 1000),
              collections.deque(range(5000), maxlen=6000), collections.OrderedDict((str(i), i) for i in range(5000)),
              decimal.Decimal("3.14159" + "2" * 4000), fractions.Fraction(10**4000, 7), np.bytes_(b"x" * 300_000),
              np.str_("y" * 70_000), ft.Table.from_partitions([[(1, "a")], [(2, "b")]]), {"t": list}]  # fmt: skip
    back = decode_object(ft.codec.encode_object(values).tobytes(), SAFE, "peer")
    assert back == values and [type(v) for v in back] == [type(v) for v in values]
    old = [{1, 2}, frozenset({3}), bytearray(b"z" * 100_000), ["s"] * 10]  # protocol 3: constructor calls
    assert decode_object(as_object_unit(pickle.dumps(old, protocol=3)), SAFE, "peer") == old


# --- the allow-list itself -------------------------------------------------------------------------


def test_the_allow_list_names_constructors_only():
    """Every entry resolves to a class, to one of numpy's three reconstructors (guarded), or to one
    of our own numpy constructors, which check their plain arguments (codec/arrays.py)."""
    import importlib

    from fedtransport.codec.arrays import REBUILDERS

    numpy_functions = {"_reconstruct", "scalar", "_frombuffer"} | {e.split(":")[1] for e in REBUILDERS}
    for entry in sorted(SAFE_GLOBALS):
        module, name = entry.split(":")
        try:
            obj = getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)
        except ImportError:
            continue
        assert isinstance(obj, type) or obj in (Ellipsis, NotImplemented) or name in numpy_functions, entry
        assert "." not in name, entry  # no attribute walks
    import _compat_pickle

    assert not {e.split(":")[0] for e in SAFE_GLOBALS} & set(_compat_pickle.IMPORT_MAPPING)
    assert not {tuple(e.split(":")) for e in SAFE_GLOBALS} & set(_compat_pickle.NAME_MAPPING)


# --- report mode, through the public API -----------------------------------------------------------


class Custom:
    """A class no allow-list admits (a module-level class so that pickle can name it)."""

    def __init__(self, v: int) -> None:
        self.v = v


def test_report_mode_logs_every_refused_global_and_still_refuses(job_id, caplog):
    h = ft.Federation.connect("memory", job_id=job_id, party=HOST, options={"allow_mode": "report"})
    with ft.Federation.connect("memory", job_id=job_id, party=GUEST) as g, h:
        g.remote({"a": Custom(1)}, "c", "0", [HOST])
        g.remote(threading.Lock, "l", "0", [HOST])  # a second refused name, in another transfer
        with caplog.at_level(logging.WARNING, logger="fedtransport"):
            with pytest.raises(ft.UnsafePayload, match=f"{__name__}:Custom") as first:
                h.get("c", "0", [GUEST], timeout=10)
            with pytest.raises(ft.UnsafePayload, match="_thread:allocate_lock"):
                h.get("l", "0", [GUEST], timeout=10)
    assert first.value.global_name == f"{__name__}:Custom"
    refused = [r.getMessage() for r in caplog.records if "report mode" in r.getMessage()]
    assert len(refused) == 2
    assert f"{__name__}:Custom" in refused[0] and "_thread:allocate_lock" in refused[1]
    assert all("guest:9999" in m for m in refused)
    with pytest.raises(ft.ConfigError, match="allow_mode"):
        ft.Federation.connect("memory", job_id=job_id, party=HOST, options={"allow_mode": "log"})
