"""Arguments are checked before a call touches the session, and ids never alias (issue 13, items 5-6).

The memory backend: these are tests of the api layer. A refused ``remote``/``get`` raises
``ConfigError`` and leaves the session exactly as it was (claim books, inbox, listened
parties, what is on the broker), so the same call with good arguments then works. Transfer
ids encode their parts length-prefixed: two distinct (name, tag) pairs never share one.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import numbers
import os
import re
import time
from typing import Any

import pytest
from conftest import GUEST, HOST
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fedtransport as ft
from fedtransport.framing import control_id, transfer_id
from fedtransport.party import NAME_MAX_BYTES
from fedtransport.transport.memory import hub

_jobs = itertools.count()
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Every code point, surrogates and control characters included: what a caller's str may hold.
ANY_CHAR = st.characters(codec=None, categories=None, exclude_categories=())
NAMES = st.one_of(
    st.text(ANY_CHAR, max_size=12),
    st.text(st.sampled_from("ab\x00\n\ud800é:"), max_size=6),  # near misses of each rule
    st.integers(),
    st.builds(str.__mul__, st.sampled_from(["a", "é"]), st.sampled_from([NAME_MAX_BYTES - 1, NAME_MAX_BYTES, 4097])),
    st.sampled_from([None, b"bytes", 1.5, True, ("a",)]),
)
TIMEOUTS = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.booleans(),
    st.text(max_size=3),
    st.sampled_from([float("nan"), -0.0, 0, "10", b"1", 10**400, [1]]),
)


def name_ok(value: Any) -> bool:
    """The documented rule (docs/concepts.md#names-and-limits), written apart from the code."""
    if isinstance(value, int) and not isinstance(value, bool):
        return len(str(value)) <= NAME_MAX_BYTES
    if not isinstance(value, str) or re.search("[\x00-\x1f\x7f-\x9f\ud800-\udfff]", value):
        return False
    return len(value.encode()) <= NAME_MAX_BYTES


def timeout_ok(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        seconds = float(value)
    except OverflowError:  # an int past float's range is no finite number of seconds
        return False
    return math.isfinite(seconds) and seconds >= 0


def connect(job_id: str, party: ft.Party) -> ft.Federation:
    return ft.Federation.connect("memory", job_id=job_id, party=party)


def session_state(fed: ft.Federation) -> dict[str, Any]:
    """Everything a call may change in a session: what a refused one must leave as it was."""
    inbox = fed._inbox
    with inbox._lock:
        return {
            "sent": set(fed._sent._keys),
            "got": set(fed._got._keys),
            "incoming": {tid: (inc.src, inc.assembly.messages) for tid, inc in inbox._incoming.items()},
            "finished": set(inbox._finished),
            "listening": set(inbox._listening),
            "waiting": len(inbox._waiting),
            "peers": set(fed._peers),
            "peers_heard": set(fed._peers_heard),
            "stats": fed.stats,
        }


def broker_state(job_id: str) -> dict[Any, int]:
    """Messages on the memory broker's lanes of the job, ready or delivered."""
    h = hub()
    with h.lock:
        lanes = {k: v for k, v in h.lanes.items() if k[0] == job_id}
    return {k: len(lane.ready) + len(lane.unacked) for k, lane in lanes.items()}


def get(fed: ft.Federation, use_async: bool, *args: Any, **kwargs: Any) -> list[Any]:
    if use_async:
        return asyncio.run(fed.get_async(*args, **kwargs))
    return fed.get(*args, **kwargs)


@PROPERTY
@given(name=NAMES, tag=NAMES, timeout=TIMEOUTS, use_async=st.booleans(), warm=st.booleans())
@example(name="w", tag="0", timeout="10", use_async=False, warm=False)  # the TypeError, then "already done"
@example(name="w", tag="0", timeout=float("nan"), use_async=False, warm=False)  # blocked for ever
@example(name="\ud800", tag="0", timeout=10, use_async=False, warm=False)  # UnicodeEncodeError
@example(name="a\x00b", tag="c", timeout=10, use_async=True, warm=True)
def test_a_refused_call_leaves_the_session_as_it_was(
    name: Any, tag: Any, timeout: Any, use_async: bool, warm: bool
) -> None:
    job_id = f"args-{os.getpid()}-{next(_jobs)}"
    good_key = name_ok(name) and name_ok(tag)
    with connect(job_id, GUEST) as g, connect(job_id, HOST) as h:
        if warm:  # a session that already moved something: listened, claimed, handed over
            g.remote("before", "warm", "0", [HOST])
            assert h.get("warm", "0", [GUEST], timeout=10) == ["before"]
        g_before, h_before, broker_before = session_state(g), session_state(h), broker_state(job_id)

        if not good_key:
            with pytest.raises(ft.ConfigError):
                g.remote("value", name, tag, [HOST])
            assert session_state(g) == g_before and broker_state(job_id) == broker_before
        if not (good_key and timeout_ok(timeout)):
            with pytest.raises(ft.ConfigError):
                get(h, use_async, name, tag, [GUEST], timeout=timeout)
            assert session_state(h) == h_before and broker_state(job_id) == broker_before
        if not good_key:
            return
        # the same transfer with good arguments (the drawn timeout if it is one) works
        g.remote({"v": 1}, name, tag, [HOST])
        wait = timeout if timeout_ok(timeout) and (timeout is None or timeout >= 5) else 10
        assert get(h, use_async, name, tag, [GUEST], timeout=wait) == [{"v": 1}]
        g.cleanup()


@PROPERTY
@given(
    a=st.tuples(st.text(st.sampled_from("ab\x00:é"), max_size=5), st.text(st.sampled_from("ab\x00:é"), max_size=5)),
    b=st.tuples(st.text(st.sampled_from("ab\x00:é"), max_size=5), st.text(st.sampled_from("ab\x00:é"), max_size=5)),
)
@example(a=("a\x00b", "c"), b=("a", "b\x00c"))  # the aliasing pair
def test_distinct_names_and_tags_never_share_a_transfer_id(a: tuple[str, str], b: tuple[str, str]) -> None:
    same = transfer_id("job", *a, str(GUEST), str(HOST)) == transfer_id("job", *b, str(GUEST), str(HOST))
    assert same == (a == b)
    # nor do the notice ids, whose kinds are ours
    assert (control_id("job", a[0], a[1], "x") == control_id("job", b[0], b[1], "x")) == (a == b)


def test_names_that_once_met_at_the_separator_travel_apart(memory_pair):
    """A name and tag that shared a separator's place: two transfers, each got as sent."""
    g, h = memory_pair
    g.remote("first", "a:b", "c", [HOST])
    g.remote("second", "a", "b:c", [HOST])
    assert h.get("a", "b:c", [GUEST], timeout=10) == ["second"]
    assert h.get("a:b", "c", [GUEST], timeout=10) == ["first"]


def test_refusals_say_what_is_wrong(memory_pair):
    g, h = memory_pair
    with pytest.raises(ft.ConfigError, match="lone surrogate"):
        g.remote(1, "w\ud800", "0", [HOST])
    with pytest.raises(ft.ConfigError, match="control character"):
        g.remote(1, "w", "0\n", [HOST])
    with pytest.raises(ft.ConfigError, match="4096"):
        g.remote(1, "w" * 4097, "0", [HOST])
    with pytest.raises(ft.ConfigError, match="finite"):
        h.get("w", "0", [GUEST], timeout=float("nan"))
    with pytest.raises(ft.ConfigError, match="finite"):
        h.get("w", "0", [GUEST], timeout=-1)
    with pytest.raises(ft.ConfigError, match="number of seconds"):
        h.get("w", "0", [GUEST], timeout="10")


def test_timeout_zero_returns_what_is_there(memory_pair):
    g, h = memory_pair
    with pytest.raises(ft.TransferTimeout):
        h.get("w", "0", [GUEST], timeout=0)
    g.remote("here", "w", "1", [HOST])
    deadline = time.monotonic() + 10
    while True:  # a value complete in the inbox is returned at once, not timed out
        try:
            assert h.get("w", "1", [GUEST], timeout=0) == ["here"]
            break
        except ft.TransferTimeout:  # not delivered yet: a refused get may be tried again
            assert time.monotonic() < deadline, "timeout=0 never returned the value"
            time.sleep(0.01)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0, 0, "10", True])
@pytest.mark.parametrize("key", ["redelivery_after"])
def test_a_timeout_option_must_be_finite_and_positive(key: str, bad: Any) -> None:
    with pytest.raises(ft.ConfigError, match=key):
        ft.Federation.connect("memory", job_id="j", party=GUEST, options={key: bad})


@pytest.mark.parametrize("backend,key", [("rabbitmq", "send_timeout"), ("pulsar", "send_timeout"),
                                         ("pulsar", "subscribe_timeout"), ("rabbitmq", "connect_timeout")])  # fmt: skip
def test_backend_timeout_options_refuse_infinity(backend: str, key: str) -> None:
    """Refused by the option check, before any connection is tried (nothing listens on port 1)."""
    url = {"service_url": "pulsar://127.0.0.1:1"} if backend == "pulsar" else {"port": 1, "mng_port": 1}
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ft.ConfigError, match=key):
            ft.Federation.connect(backend, job_id="j", party=GUEST, options={**url, key: bad})


def test_adapters_refuse_a_bad_timeout_when_made(memory_pair):
    from fedtransport.fate import FateFederation

    g, _ = memory_pair
    with pytest.raises(ft.ConfigError, match="finite"):
        FateFederation(g, timeout=float("nan"))
