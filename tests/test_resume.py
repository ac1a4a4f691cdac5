"""Issue 14: one value per transfer, and resuming a send whose sender was killed.

An incarnation is a keyed digest of the value and its layout (fedtransport/resume.py), so:

- the same value sent again after a SIGKILL is merged into what the receiver holds (on Pulsar
  with ``admin_url`` the restarted sender sends only what the broker does not store; on
  RabbitMQ it sends everything and the receiver drops the copies);
- a recomputed value has another incarnation and is never mixed with the first (both brokers);
- a message repeated at a position already held must match it byte for byte: two values under
  one incarnation are an ``IntegrityError``, never a mixed value.

Senders are subprocesses SIGKILLed mid-``remote``; the brokers are the real Pulsar standalone
and a real RabbitMQ node. The framing and digest rules are also checked without a broker.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import GUEST, HOST
from party_proc import big_array, digest, wait_for
from test_faults import gated_sender, partial_timeout, pulsar_opts, received

import fedtransport as ft
from fedtransport.codec import Compressor, EncodedUnit, PayloadCodec, Sealer
from fedtransport.framing import FrameWriter, TransferAssembly, frame_units, job_fingerprint, parse_frame, transfer_id
from fedtransport.resume import RandomIncarnations, incarnation, table_digest, unit_digest
from fedtransport.transfer import Outgoing

try:
    from tests.rabbit_fixtures import rabbit_installed, rabbit_node, rabbit_opts, rabbit_pool
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from rabbit_fixtures import rabbit_installed, rabbit_node, rabbit_opts, rabbit_pool  # type: ignore[no-redef]

__all__ = ["rabbit_node", "rabbit_pool"]  # fixtures, used by name

SPAWN = mp.get_context("spawn")
SECRET = "a job secret shared by every party"
needs_rabbitmq = pytest.mark.skipif(not rabbit_installed(), reason="rabbitmq-server not installed")
BROKERS = ["pulsar", pytest.param("rabbitmq", marks=[pytest.mark.rabbitmq, needs_rabbitmq])]
MIB, AT = 4, 4  # a killed sender got 4 messages per lane out
TOTAL = 65  # messages of a 4 MiB array (and its pickle header) in 64 KiB messages, 17 or 16 a lane
JOB = job_fingerprint("job-1")
TID = transfer_id("job-1", "w", "0", "guest:9999", "host:10000")
PLAIN = PayloadCodec(Compressor(False))


def value_of(kind: str) -> Any:
    if kind == "random":
        return big_array(MIB)
    if kind == "table":
        rng = np.random.default_rng(7)
        return ft.Table.from_partitions([[(f"k{p}-{i}", rng.bytes(4096)) for i in range(256)] for p in range(4)])
    return np.full(MIB * (1 << 20) // 8, float(kind))


def options_for(request: pytest.FixtureRequest, backend: str, **extra: Any) -> dict[str, Any]:
    if backend == "pulsar":
        options = pulsar_opts(request.getfixturevalue("pulsar_standalone"))
    else:
        options = rabbit_opts(request.getfixturevalue("rabbit_node"))
    options.update(max_message_size=65536, redelivery_after=2.0, **extra)
    return options


class KilledSender:
    """A sender process killed (SIGKILL) once every lane's first ``at`` messages are on the broker."""

    def __init__(self, backend: str, job_id: str, options: dict[str, Any], kind: str, at: int = AT) -> None:
        self.queue = SPAWN.Queue()
        make = functools.partial(value_of, kind)
        self.proc = SPAWN.Process(target=gated_sender, args=(backend, job_id, options, make, at, self.queue))

    def run(self) -> int:
        """Start, wait until it is stuck, kill it; the messages it got onto the broker."""
        self.proc.start()
        what, published = self.queue.get(timeout=300)
        assert what == "gated"
        self.proc.kill()
        self.proc.join(30)
        return int(published)

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(30)


@pytest.fixture
def killed(job_id: str) -> Iterator[list[KilledSender]]:
    senders: list[KilledSender] = []
    yield senders
    for s in senders:
        s.stop()


def listening(h: ft.Federation) -> None:
    with pytest.raises(ft.TransferTimeout):
        h.get("w", "0", [GUEST], timeout=0.5)  # starts listening; what arrives is kept


def entry(h: ft.Federation) -> Any:
    return h._inbox.entry(GUEST, transfer_id(h.job_id, "w", "0", str(GUEST), str(HOST)))


@contextlib.contextmanager
def holding_a_killed_send(
    request: pytest.FixtureRequest, backend: str, job_id: str, killed: list[KilledSender]
) -> Iterator[tuple[dict[str, Any], ft.Federation, int]]:
    """Sealing on: the receiver holds every message of an all-1.0 send whose sender was SIGKILLed
    after 4 messages a lane. Yields the options, the receiver and that count; cleans up after."""
    options = options_for(request, backend, secret=SECRET)
    killed.append(sender := KilledSender(backend, job_id, options, "1.0"))
    with ft.Federation.connect(backend, job_id=job_id, party=HOST, options=options) as h:
        listening(h)
        published = sender.run()
        partial_timeout(h, published)
        yield options, h, published
    ft.Federation.connect(backend, job_id=job_id, party=GUEST, options=options).cleanup()


# ==================================================================================================
# without a broker: the incarnation names the value; a repeated position must match
# ==================================================================================================


def test_the_incarnation_names_the_value_its_layout_and_is_keyed():
    ones, twos = (EncodedUnit.of([np.full(1000, f).tobytes()]) for f in (1.0, 2.0))
    layout = {"max_chunk": 65000, "lanes": 4, "nstreams": 1, "table": False}
    first = incarnation(TID, TID, unit_digest(ones), **layout)
    assert first == incarnation(TID, TID, unit_digest(EncodedUnit.of([np.full(1000, 1.0).tobytes()])), **layout)
    assert first != incarnation(TID, TID, unit_digest(twos), **layout)  # a recomputed value
    assert first != incarnation(TID, TID, unit_digest(ones), **{**layout, "max_chunk": 32000})  # other places
    assert first != incarnation(TID, TID, unit_digest(ones), **{**layout, "lanes": 2})
    key = Sealer(SECRET.encode(), "job-1").digest_key("guest:9999", "host:10000")
    assert first != incarnation(key, TID, unit_digest(ones), **layout)  # sealing on: needs the direction's key
    assert key != Sealer(b"another secret", "job-1").digest_key("guest:9999", "host:10000")


def test_a_table_is_digested_only_when_its_partitions_can_be_read_twice():
    rows = [[("a", 1), ("b", 2)], [("c", 3)]]
    assert table_digest(ft.Table(rows), 65000) == table_digest(ft.Table([list(p) for p in rows]), 65000)
    assert table_digest(ft.Table(rows), 65000) != table_digest(ft.Table([[("a", 1)], [("b", 2), ("c", 3)]]), 65000)
    assert table_digest(ft.Table([iter(p) for p in rows]), 65000) is None  # one-shot: a random incarnation


@pytest.mark.parametrize("secret", [None, SECRET.encode()], ids=["plain", "sealed"])
def test_two_values_under_one_incarnation_raise_never_mix(secret):
    """A send cut short, then another value framed under the same incarnation: the first repeated
    position whose bytes differ is an IntegrityError."""
    codec = PayloadCodec(Compressor(False), Sealer(secret, "job-1").for_pair("g", "h") if secret else None)
    inc = b"\x01" * 8
    ones = list(frame_units(FrameWriter(JOB, TID, 1, codec, inc), 0, [(np.full(8192, 1.0).tobytes(), 1)], 4096))
    twos = list(frame_units(FrameWriter(JOB, TID, 1, codec, inc), 0, [(np.full(8192, 2.0).tobytes(), 1)], 4096))
    asm = TransferAssembly(TID, codec)
    for m in ones[:4]:
        asm.add(*parse_frame(m, JOB))
    with pytest.raises(ft.IntegrityError, match="two values under one incarnation"):
        for m in twos:
            asm.add(*parse_frame(m, JOB))


def test_the_same_value_under_one_incarnation_merges_its_sends():
    """Sealed (a fresh nonce per message, so the repeated messages differ on the wire): a send cut
    after 4 messages and the whole resend complete one value, every position placed once."""
    codec = PayloadCodec(Compressor(True), Sealer(SECRET.encode(), "job-1").for_pair("g", "h"))
    value = np.random.default_rng(3).random(8192).tobytes()
    inc = b"\x02" * 8
    first = list(frame_units(FrameWriter(JOB, TID, 1, codec, inc), 0, [(value, 1)], 4096))
    again = list(frame_units(FrameWriter(JOB, TID, 1, codec, inc), 0, [(value, 1)], 4096))
    assert first[0] != again[0]
    asm = TransferAssembly(TID, codec)
    placed = [asm.add(*parse_frame(m, JOB)) for m in first[:4] + again]
    assert asm.complete and placed.count(True) == len(again) and bytes(asm.stream_units(0)[0]) == value


def test_a_restarted_sender_of_the_same_value_continues_its_send_on_the_memory_backend(job_id):
    """The receiver holds the first send's messages; the resend has the same incarnation, so it
    completes that send (no rival send, nothing dropped)."""
    from test_api_memory import Lossy

    ft.register("memory-lossy", Lossy)
    opts = {"max_message_size": 65536, "lanes": 1}
    value = big_array(1)
    with ft.Federation.connect("memory", job_id=job_id, party=HOST, options=opts) as h:
        listening(h)
        with ft.Federation.connect("memory-lossy", job_id=job_id, party=GUEST, options=opts) as g:
            g.remote(value, "w", "0", [HOST])
        wait_for(lambda: entry(h) is not None and entry(h).assembly.messages == Lossy.keep, "the cut send")
        first = entry(h).assembly.incarnation
        with ft.Federation.connect("memory", job_id=job_id, party=GUEST, options=opts) as g2:
            g2.remote(value, "w", "0", [HOST])
        inc = entry(h)
        assert inc.assembly.incarnation == first and not inc.dropped and not inc.rivals
        [back] = h.get("w", "0", [GUEST], timeout=10)
    assert digest(back) == digest(value)


def test_only_a_send_that_can_be_resumed_is_digested(job_id, monkeypatch):
    """The keyed digest costs a SHA-256 pass per ``remote`` and buys only a resume: a send of fewer
    than MIN_RESUME_MESSAGES messages a lane takes a random incarnation instead."""
    import fedtransport.api as api_module

    passes: list[int] = []
    real = api_module.unit_digest
    monkeypatch.setattr(api_module, "unit_digest", lambda unit: passes.append(unit.size) or real(unit))
    opts = {"max_message_size": 65536, "lanes": 1}
    with ft.Federation.connect("memory", job_id=job_id, party=HOST, options=opts) as h:
        with ft.Federation.connect("memory", job_id=job_id, party=GUEST, options=opts) as g:
            g.remote(b"x" * 1024, "small", "0", [HOST])
            assert passes == []  # one message: nothing to resume, no digest
            g.remote(big_array(1), "big", "0", [HOST])  # 17 messages on its one lane
            assert len(passes) == 1
        assert h.get("small", "0", [GUEST], timeout=10) == [b"x" * 1024]


def test_a_small_remote_draws_its_random_incarnation_without_a_system_call(job_id, monkeypatch):
    """os.urandom lets go of the GIL, and taking it back behind the I/O thread showed in a small
    remote's profile: a session draws one key and hashes a counter under it."""
    import types

    import fedtransport.resume as resume_module

    draws: list[int] = []
    real = resume_module.os
    counting = types.SimpleNamespace(urandom=lambda n: draws.append(n) or real.urandom(n))
    monkeypatch.setattr(resume_module, "os", counting)
    with ft.Federation.connect("memory", job_id=job_id, party=HOST) as h:
        with ft.Federation.connect("memory", job_id=job_id, party=GUEST) as g:
            for i in range(20):
                g.remote(i, "small", str(i), [HOST])
        assert len(draws) <= 2  # each session's key, not one draw per remote
        assert [h.get("small", str(i), [GUEST], timeout=10)[0] for i in range(20)] == list(range(20))
    first, second = RandomIncarnations(), RandomIncarnations()
    drawn = [first() for _ in range(1000)] + [second() for _ in range(1000)]
    assert len(set(drawn)) == len(drawn) and all(len(x) == 8 for x in drawn)


@pytest.mark.parametrize("same", [True, False], ids=["same-value", "recomputed"])
def test_a_small_send_made_again_by_a_restarted_sender_arrives_once(job_id, same):
    """A one-message send is atomic: the receiver holds it whole or not at all. Sent again by a new
    session (a restarted sender; a random incarnation each time), the copy is dropped and acked:
    the receiver gets the first value, never a second one."""
    opts = {"max_message_size": 65536, "lanes": 1}
    with ft.Federation.connect("memory", job_id=job_id, party=HOST, options=opts) as h:
        listening(h)
        for value in (b"first" * 200, b"first" * 200 if same else b"again" * 200):
            with ft.Federation.connect("memory", job_id=job_id, party=GUEST, options=opts) as g:
                g.remote(value, "w", "0", [HOST])
        wait_for(lambda: entry(h) is not None and len(entry(h).tokens) == 2, "both sends")
        assert entry(h).assembly.messages == 1  # the first send, whole; the copy placed nowhere
        assert h.get("w", "0", [GUEST], timeout=10) == [b"first" * 200]


# ==================================================================================================
# real brokers, senders SIGKILLed mid-remote
# ==================================================================================================


@pytest.mark.parametrize("backend", BROKERS)
def test_same_value_after_sigkill_resumes_pulsar_sends_only_the_rest(request, backend, job_id, killed):
    """Pulsar (shared mode, admin_url): the restarted sender sends only what the broker does not
    store. RabbitMQ cannot tell: it sends everything, and the receiver drops what it has."""
    options = options_for(request, backend, secret=SECRET)
    value = value_of("random")
    killed.append(sender := KilledSender(backend, job_id, options, "random"))
    with ft.Federation.connect(backend, job_id=job_id, party=HOST, options=options) as h:
        listening(h)
        published = sender.run()
        assert published == 4 * AT
        with ft.Federation.connect(backend, job_id=job_id, party=GUEST, options=options) as g:
            g.remote(value, "w", "0", [HOST])
            stats = g.stats
        [back] = h.get("w", "0", [GUEST], timeout=120)
        assert digest(back) == digest(value)
        assert h.stats["messages_received"] == TOTAL  # one send, each position placed once
    if backend == "pulsar":
        assert (stats["messages_resumed"], stats["messages_sent"]) == (published, TOTAL - published)
    else:
        assert (stats["messages_resumed"], stats["messages_sent"]) == (0, TOTAL)
    ft.Federation.connect(backend, job_id=job_id, party=GUEST, options=options).cleanup()


@pytest.mark.parametrize("backend", BROKERS)
def test_recomputed_value_after_sigkill_arrives_whole_never_mixed(request, backend, job_id, killed):
    """The issue's case (sealing on): all-1.0 killed after 4 messages a lane, then all-2.0 under the
    same name and tag. On Pulsar the restarted sender finds the stored messages but not of its
    send (another incarnation), so it sends all of it; the receiver gets all-2.0 whole."""
    with holding_a_killed_send(request, backend, job_id, killed) as (options, h, published):
        assert received(h, "w", "0", GUEST) == published
        with ft.Federation.connect(backend, job_id=job_id, party=GUEST, options=options) as g:
            g.remote(value_of("2.0"), "w", "0", [HOST])
            assert (g.stats["messages_resumed"], g.stats["messages_sent"]) == (0, TOTAL)
        [value] = h.get("w", "0", [GUEST], timeout=120)
        ones, twos = int((value == 1.0).sum()), int((value == 2.0).sum())
        assert (ones, twos) == (0, value.size), f"{ones} ones and {twos} twos"


@pytest.mark.parametrize("backend", BROKERS)
def test_another_value_under_the_killed_sends_incarnation_is_an_integrity_error(
    request, backend, job_id, killed, monkeypatch
):
    """A sender that claims the killed send's incarnation for another value (only a holder of the
    direction's key can): the receiver's get raises IntegrityError, it never returns a mix.
    Sent whole (no resume on Pulsar), so its messages repeat the positions the receiver holds."""
    with holding_a_killed_send(request, backend, job_id, killed) as (options, h, _):
        with ft.Federation.connect(backend, job_id=job_id, party=GUEST, options=options) as g:
            real = ft.Federation._incarnation
            ones = Outgoing(value_of("1.0"), fanout=1)

            def of_the_ones(self: ft.Federation, out: Any, *args: Any, **kwargs: Any) -> bytes:
                return real(self, ones, *args, **kwargs)

            monkeypatch.setattr(ft.Federation, "_incarnation", of_the_ones)
            monkeypatch.setattr(ft.Federation, "_stored_point", lambda *args: None)
            g.remote(value_of("2.0"), "w", "0", [HOST])
        with pytest.raises(ft.IntegrityError, match="two values under one incarnation"):
            h.get("w", "0", [GUEST], timeout=120)


def test_a_resumable_table_resumes_on_pulsar(request, job_id, killed):
    """``resumable_tables``: the restarted sender of the same table sends only the rest."""
    options = options_for(request, "pulsar", resumable_tables=True)
    table = value_of("table")
    killed.append(sender := KilledSender("pulsar", job_id, options, "table", at=3))
    with ft.Federation.connect("pulsar", job_id=job_id, party=HOST, options=options) as h:
        listening(h)
        published = sender.run()
        with ft.Federation.connect("pulsar", job_id=job_id, party=GUEST, options=options) as g:
            g.remote(table, "w", "0", [HOST])
            stats = g.stats
        [back] = h.get("w", "0", [GUEST], timeout=120)
        assert back == table
    assert stats["messages_resumed"] == published > 0
    ft.Federation.connect("pulsar", job_id=job_id, party=GUEST, options=options).cleanup()
