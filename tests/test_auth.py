"""Per-pair authentication (docs/security.md, "Two sealing modes"): a third party of the same job
can neither forge nor spoil another pair's transfers.

The attacker is the arbiter of a guest/host/arbiter job. It sends, on its own lanes to the
host, (a) a value framed under the guest->host transfer id while the host's get from the
guest waits, (b) the guest's own captured frames replayed, (c) a forged head sent before the
guest's real transfer. Each time the host's get from the guest returns the guest's value, and
the forgery is refused as an IntegrityError (logged, counted in ``stats["forged_refused"]``).
That holds in both sealing modes: the inbox files frames by the lane's sender. What only pair
keys add, (d): a party that publishes on the guest's own lanes (broker access, or connecting
in the guest's name) cannot seal for the guest->host direction; with the job secret alone it
can, the limit docs/security.md states. Run on the memory backend, a real Apache Pulsar
standalone and a real RabbitMQ node (shared mode); link passwords of federated RabbitMQ at
unit level.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ARBITER, GUEST, HOST

import fedtransport as ft
from fedtransport.cli import main as cli_main
from fedtransport.framing import FrameWriter, transfer_id
from fedtransport.identity import PairKeys, X25519PrivateKey, parse_public_key, public_key_text
from fedtransport.options import max_chunk
from fedtransport.transfer import Outgoing
from fedtransport.transport.rabbitmq.management import RabbitManagement
from fedtransport.transport.rabbitmq.naming import RabbitNames

try:
    from tests.rabbit_fixtures import (  # by parameter name
        admin_of,
        rabbit_installed,
        rabbit_node,
        rabbit_opts,
        rabbit_pair,
        rabbit_pool,
    )
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from rabbit_fixtures import (  # type: ignore[no-redef]  # noqa: F401
        admin_of,
        rabbit_installed,
        rabbit_node,
        rabbit_opts,
        rabbit_pair,
        rabbit_pool,
    )

pytestmark = pytest.mark.timeout(600)

SECRET = "a job secret every party of the job shares"
WAIT = 120.0  # seconds a condition may take on a shared machine


def keys() -> dict[str, X25519PrivateKey]:
    return {p.party_id: X25519PrivateKey.generate() for p in (GUEST, HOST, ARBITER)}


def published(ks: dict[str, X25519PrivateKey]) -> dict[str, str]:
    return {pid: public_key_text(k) for pid, k in ks.items()}


Connect = Callable[..., ft.Federation]


@pytest.fixture(params=["memory", "pulsar", "rabbitmq"])
def backend(request: pytest.FixtureRequest) -> Callable[[], tuple[str, dict[str, Any]]]:
    kind = request.param
    if kind == "memory":
        return lambda: ("memory", {})
    if kind == "pulsar":
        broker = request.getfixturevalue("pulsar_standalone")
        return lambda: ("pulsar", {"service_url": broker.service_url, "admin_url": broker.admin_url})
    if not rabbit_installed():
        pytest.skip("rabbitmq-server is not installed (scripts/test.sh installs it)")
    node = request.getfixturevalue("rabbit_node")
    return lambda: ("rabbitmq", rabbit_opts(node))


@pytest.fixture(params=["pair-keys", "secret"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def connect(backend: Callable[[], tuple[str, dict[str, Any]]], mode: str, job_id: str) -> Iterator[Connect]:
    """``connect(party, identity_of=party)``: a session in ``mode``; ``identity_of`` picks whose
    private key it holds (an impostor connects in one party's name with its own key)."""
    ks = keys()
    opened: list[ft.Federation] = []

    def make(party: ft.Party, identity_of: ft.Party | None = None) -> ft.Federation:
        kind, options = backend()
        options = {**options, "max_message_size": 65536, "compression": "none"}
        if mode == "pair-keys":
            me = identity_of or party
            peers = {pid: k for pid, k in published(ks).items() if pid != party.party_id or me == party}
            options |= {"identity": ks[me.party_id], "peer_keys": peers}
        else:
            options |= {"secret": SECRET}
        fed = ft.Federation.connect(kind, job_id=job_id, party=party, options=options)
        opened.append(fed)
        return fed

    yield make
    for fed in opened:
        fed.close()
    if opened:
        opened[0].cleanup()


def wait_for(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


class Waiter:
    """A ``get`` in a thread; ``outcome()`` is its value or the exception it raised."""

    def __init__(self, fed: ft.Federation, name: str, src: ft.Party) -> None:
        self.result: list[Any] = []
        self.ended = threading.Event()
        threading.Thread(target=self._run, args=(fed, name, src), daemon=True).start()

    def _run(self, fed: ft.Federation, name: str, src: ft.Party) -> None:
        try:
            self.result.append(fed.get(name, "0", [src], timeout=WAIT))
        except BaseException as exc:  # the outcome under test
            self.result.append(exc)
        self.ended.set()

    def outcome(self) -> Any:
        assert self.ended.wait(WAIT + 30), "the get never returned"
        return self.result[0]


def frames(fed: ft.Federation, value: Any, tid: bytes, dst: ft.Party) -> dict[int, list[bytes]]:
    """``value`` framed by ``fed`` as its own transfer to ``dst``, but under the id ``tid``:
    sealed with the key ``fed`` really has for that direction."""
    out = Outgoing(value, fanout=1)
    transform = fed._transform(fed.party, dst)
    writer = FrameWriter(fed._job, tid, out.nstreams, transform)
    limit = max_chunk(fed._opts, transform.overhead)
    return {lane: list(msgs) for lane, msgs in out.lane_messages(writer, fed._opts.lanes, limit).items()}


def send_frames(fed: ft.Federation, dst: ft.Party, by_lane: dict[int, list[bytes]]) -> int:
    """Publish raw frames on ``fed``'s own lanes to ``dst``; returns how many."""
    for lane, msgs in by_lane.items():
        fed.transport.send(dst, lane, iter(msgs))
    return sum(map(len, by_lane.values()))


def exchange(a: ft.Federation, b: ft.Federation) -> None:
    """One value each way: the sessions have met (and listen to each other)."""
    a.remote("hi", "hello", "0", [b.party])
    b.remote("hi", "hello", "0", [a.party])
    assert b.get("hello", "0", [a.party], timeout=WAIT) == ["hi"]
    assert a.get("hello", "0", [b.party], timeout=WAIT) == ["hi"]


Trio = tuple[ft.Federation, ft.Federation, ft.Federation]


@pytest.fixture
def trio(connect: Connect, caplog: pytest.LogCaptureFixture) -> Iterator[Trio]:
    """Guest, host and arbiter, the host listening to both; afterwards, every forgery the host
    refused was logged as an IntegrityError naming the arbiter, whose own transfers still work."""
    caplog.set_level(logging.WARNING, logger="fedtransport.inbox")
    guest, host, arbiter = connect(GUEST), connect(HOST), connect(ARBITER)
    exchange(guest, host)
    exchange(arbiter, host)
    yield guest, host, arbiter
    logs = [r.getMessage() for r in caplog.get_records("call") if r.name == "fedtransport.inbox"]
    assert logs and all("IntegrityError" in line and "arbiter:10001" in line for line in logs), logs
    arbiter.remote("mine", "own", "0", [HOST])
    assert host.get("own", "0", [ARBITER], timeout=WAIT) == ["mine"]


def refused(fed: ft.Federation) -> int:
    return fed.stats["forged_refused"]


REAL, FORGED = os.urandom(150_000), os.urandom(150_000)  # several messages each


def test_a_forgery_on_the_third_party_s_own_lanes_is_refused(trio: Trio, job_id: str) -> None:
    # (a) under the guest->host id, while the host's get from the guest waits
    guest, host, arbiter = trio
    waiting = Waiter(host, "a", GUEST)
    wait_for(lambda: host._inbox.pending() == 1, "the host's get claimed its transfer")
    tid = transfer_id(job_id, "a", "0", str(GUEST), str(HOST))
    n = send_frames(arbiter, HOST, frames(arbiter, FORGED, tid, HOST))
    wait_for(lambda: refused(host) >= n or waiting.ended.is_set(), "the forged frames were refused")
    assert not waiting.ended.is_set(), waiting.result
    guest.remote(REAL, "a", "0", [HOST])
    assert waiting.outcome() == [REAL]
    assert refused(host) == n


def test_replayed_frames_of_another_pair_are_refused(trio: Trio) -> None:
    # (b) the guest's own frames, captured and replayed on the arbiter's lanes before the get
    guest, host, arbiter = trio
    captured: dict[int, list[bytes]] = {}
    send = guest.transport.send

    def capture(dst: ft.Party, lane: int, messages: Iterator[bytes]) -> None:
        msgs = list(messages)
        captured.setdefault(lane, []).extend(msgs)
        send(dst, lane, iter(msgs))

    guest.transport.send = capture  # type: ignore[method-assign]
    guest.remote(REAL, "b", "0", [HOST])
    guest.transport.send = send  # type: ignore[method-assign]
    n = send_frames(arbiter, HOST, captured)
    wait_for(lambda: host._inbox.pending() == 2, "the replayed frames arrived, filed apart from the real ones")
    assert host.get("b", "0", [GUEST], timeout=WAIT) == [REAL]
    # every replayed frame is refused, those still on their way once the get claimed included
    wait_for(lambda: refused(host) >= n, "every replayed frame was refused")
    assert refused(host) == n


def test_a_forged_head_before_the_real_one_is_refused(trio: Trio, job_id: str) -> None:
    # (c) the first frame of a forged transfer, in before the guest's real one
    guest, host, arbiter = trio
    tid = transfer_id(job_id, "c", "0", str(GUEST), str(HOST))
    send_frames(arbiter, HOST, {0: frames(arbiter, FORGED, tid, HOST)[0][:1]})
    wait_for(lambda: host._inbox.pending() == 1, "the forged head arrived")
    guest.remote(REAL, "c", "0", [HOST])
    assert host.get("c", "0", [GUEST], timeout=WAIT) == [REAL]
    assert refused(host) == 1


@pytest.mark.parametrize("backend", ["memory", "pulsar", "rabbitmq"], indirect=True)
def test_only_pair_keys_stop_a_party_publishing_on_the_source_s_own_lanes(connect: Connect, mode: str) -> None:
    # (d) The arbiter connects in the guest's name (as anyone able to publish on the guest's
    # lanes could) holding only its own private key.
    host = connect(HOST)
    impostor = connect(GUEST, identity_of=ARBITER)
    impostor.remote("forged", "d", "0", [HOST])
    if mode == "secret":  # the documented limit of secret mode: any party of the job can seal
        assert host.get("d", "0", [GUEST], timeout=WAIT) == ["forged"]
    else:
        with pytest.raises(ft.IntegrityError, match="failed authentication"):
            host.get("d", "0", [GUEST], timeout=WAIT)


# ---------------------------------------------------------------------------- set-up errors


def test_a_peer_without_a_public_key_is_a_config_error_naming_it(job_id: str) -> None:
    ks = keys()
    pub = published(ks)
    guest = ft.Federation.connect(
        "memory", job_id=job_id, party=GUEST, options={"identity": ks["9999"], "peer_keys": {"9999": pub["9999"]}}
    )
    with guest:
        with pytest.raises(ft.ConfigError, match="party 10000 has no public key"):
            guest.remote(1, "x", "0", [HOST])
        with pytest.raises(ft.ConfigError, match="party 10000 has no public key"):
            guest.get("x", "0", [HOST], timeout=1)
    with pytest.raises(ft.ConfigError, match="different public keys"):
        ft.Federation.connect(
            "memory", job_id=job_id, party=GUEST, route_table={"10000": {"host": "h", "public_key": pub["10000"]}},
            options={"identity": ks["9999"], "peer_keys": {"10000": pub["10001"]}},
        )  # fmt: skip
    with pytest.raises(ft.ConfigError, match="not that of its 'identity'"):
        ft.Federation.connect(
            "memory", job_id=job_id, party=GUEST, options={"identity": ks["9999"], "peer_keys": {"9999": pub["10000"]}}
        )
    with pytest.raises(ft.RouteError, match=r"10000\.public_key"):
        ft.RouteTable.load({"10000": {"host": "h", "public_key": "not a key"}})
    with pytest.raises(ft.ConfigError, match="'identity'"):
        ft.Federation.connect("memory", job_id=job_id, party=GUEST, options={"identity": b"short"})


def test_keys_cli_writes_a_private_key_and_the_route_table_line(
    tmp_path: Path, job_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tables: dict[str, dict[str, str]] = {}
    for party in (GUEST, HOST):
        path = tmp_path / f"{party.party_id}.pem"
        assert cli_main(["keys", "new", "--out", str(path), "--party", party.party_id]) == 0
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        line = capsys.readouterr().out.splitlines()[-1].strip()
        pid, _, rest = line.partition(": ")
        assert pid == party.party_id
        text = rest.split('"')[1]
        parse_public_key(text)
        tables[pid] = {"host": "127.0.0.1", "public_key": text}
    assert cli_main(["keys", "new", "--out", str(tmp_path / "9999.pem")]) == 1  # never overwritten
    assert "refusing to overwrite" in capsys.readouterr().err
    # A party id a Party refuses is refused before a key is written: the printed line must load
    # as a route table entry, and "x: {y" would have made it other YAML.
    for bad in ("", "x: {y", "a b"):
        with pytest.raises(SystemExit) as refused:
            cli_main(["keys", "new", "--out", str(tmp_path / "bad.pem"), "--party", bad])
        assert refused.value.code == 2 and "argument --party" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            cli_main(["keys", "public", str(tmp_path / "9999.pem"), "--party", bad])
    assert not (tmp_path / "bad.pem").exists()

    def connect(party: ft.Party) -> ft.Federation:
        options = {"identity": str(tmp_path / f"{party.party_id}.pem")}
        return ft.Federation.connect("memory", job_id=job_id, party=party, route_table=tables, options=options)

    with connect(GUEST) as g, connect(HOST) as h:
        g.remote({"w": [1, 2]}, "x", "0", [HOST])
        assert h.get("x", "0", [GUEST], timeout=WAIT) == [{"w": [1, 2]}]


# ---------------------------------------------------------------------------- federated links


def link_management(
    me: ft.Party, *, secret: bytes | None, pairs: PairKeys | None, job_id: str = "job-1"
) -> RabbitManagement:
    names = RabbitNames(job_id, me, f"fedtransport-{job_id}", 0)
    options = {"mode": "federated", "ttl_seconds": 60}
    return RabbitManagement(
        names, options, route_table=None, fed_ssl=None, peer_credentials={}, secret=secret, pair_keys=pairs,
        data_user="u", data_password="p",
    )  # fmt: skip


def test_federated_link_passwords_come_from_the_pair_key() -> None:
    ks = keys()
    peers = {pid: k.public_key() for pid, k in ks.items()}

    def party(p: ft.Party, key_of: ft.Party | None = None) -> RabbitManagement:
        pairs = PairKeys("job-1", p.party_id, ks[(key_of or p).party_id], peers, SECRET.encode())
        return link_management(p, secret=SECRET.encode(), pairs=pairs)

    guest, host, arbiter = party(GUEST), party(HOST), party(ARBITER)
    # the two ends agree, and each pair and direction has its own
    g_h = guest.link_password(GUEST, HOST)
    assert g_h == host.link_password(GUEST, HOST)
    others = {
        guest.link_password(HOST, GUEST),
        guest.link_password(GUEST, ARBITER),
        arbiter.link_password(ARBITER, HOST),
    }
    assert g_h not in others and len(others) == 3
    # the arbiter cannot compute it: not a party of the pair, nor with its key in the guest's name
    with pytest.raises(ValueError, match="neither"):
        arbiter.link_password(GUEST, HOST)
    assert party(GUEST, key_of=ARBITER).link_password(GUEST, HOST) != g_h
    # while with the job secret alone it can (the control: what pair keys change)
    secret_only = [link_management(p, secret=SECRET.encode(), pairs=None) for p in (GUEST, ARBITER)]
    assert secret_only[0].link_password(GUEST, HOST) == secret_only[1].link_password(GUEST, HOST)


def test_federated_rabbitmq_links_authenticate_with_pair_key_passwords(rabbit_pair: Any, job_id: str) -> None:
    # Guest and host on brokers of their own, public keys in the route table: the host's broker
    # pulls the guest's queues as the link user whose password both derived from their pair key.
    nodes = dict(zip((GUEST, HOST), rabbit_pair, strict=True))
    ks = keys()
    routes = {
        p.party_id: {
            "host": "127.0.0.1",
            "port": n.port,
            "mng_port": n.mng_port,
            "public_key": public_key_text(ks[p.party_id]),
        }
        for p, n in nodes.items()
    }

    def connect(party: ft.Party) -> ft.Federation:
        options = rabbit_opts(nodes[party], mode="federated", identity=ks[party.party_id], secret=SECRET)
        return ft.Federation.connect("rabbitmq", job_id=job_id, party=party, route_table=routes, options=options)

    with connect(GUEST) as g, connect(HOST) as h:
        try:
            g.remote({"w": REAL[:1000]}, "w", "0", [HOST])
            assert h.get("w", "0", [GUEST], timeout=WAIT) == [{"w": REAL[:1000]}]
            management = g.transport.management  # type: ignore[attr-defined]
            password = management.link_password(GUEST, HOST)
            vhost = management.vhost
            [up] = admin_of(nodes[HOST]).list_federation_upstreams(vhost)
            assert up["name"] == "from:guest:9999" and password in up["value"]["uri"]
            secret_only = link_management(GUEST, secret=SECRET.encode(), pairs=None, job_id=job_id)
            assert secret_only.vhost == vhost
            assert secret_only.link_password(GUEST, HOST) not in up["value"]["uri"]
        finally:
            g.cleanup()
            h.cleanup()


def test_route_check_knows_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "routes.yaml"
    key = public_key_text(X25519PrivateKey.generate())
    table.write_text(f'9999: {{host: 127.0.0.1, port: 6650, public_key: "{key}"}}\n')
    assert cli_main(["route", "check", str(table)]) == 0
    assert "public_key" not in capsys.readouterr().err  # a key it uses, not a typo
    table.write_text('9999: {host: 127.0.0.1, port: 6650, public_key: "c2hvcnQ="}\n')
    assert cli_main(["route", "check", str(table)]) == 1
    assert "9999.public_key" in capsys.readouterr().err
