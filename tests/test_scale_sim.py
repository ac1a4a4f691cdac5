"""benchmarks/scale_sim.py at a small size: its counts must add up. Timings are not checked."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "scale_sim.py"


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("scale_sim", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_sim"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("scale_sim", None)


def run(sim, *argv: str) -> dict:
    res = sim.run(sim.parse_args([*argv, "--timeout", "60"]))
    assert res["ok"], res["errors"]
    return res


def check_common(res: dict, pairs: int, lanes: int) -> None:
    assert res["lanes"]["ordered_pairs_exchanging"] == pairs
    assert res["lanes"]["created"] == res["lanes"]["expected"] == pairs * lanes
    assert res["lanes"]["pairs_covered"] == pairs and res["lanes"]["pairs_match"]
    assert res["lanes"]["per_pair"] == [lanes]
    assert res["lanes"]["lane_numbers"] == list(range(lanes))
    assert res["lanes"]["left_after_cleanup"] == 0
    for kind, r in res["rounds"].items():
        assert r["transfers_delivered"] == r["transfers_expected"] == pairs, kind
        assert r["latency"]["count"] == pairs, kind
        assert r["messages_sent"] == r["messages_received"] == r["messages_counted_on_lanes"], kind
        assert r["bytes_sent"] == r["bytes_received"] == r["bytes_counted_on_lanes"], kind
        assert r["messages_sent"] % pairs == 0, kind  # every destination gets the same messages
    assert res["totals"]["transfers"] == 2 * pairs
    assert res["totals"]["messages"] == sum(r["messages_sent"] for r in res["rounds"].values())
    assert res["resources"]["rss_peak_mib"] >= res["resources"]["rss_start_mib"] > 0


def test_six_parties_all_to_all(sim):
    n, lanes = 6, 4
    res = run(sim, "--parties", "6", "--lanes", "4", "--mib", "0.25", "--records", "16")
    pairs = n * (n - 1)
    check_common(res, pairs, lanes)
    obj, table = res["rounds"]["object"], res["rounds"]["table"]
    # a 256 KiB array fits one 4 MiB message: one message per transfer, on lane 0 only
    assert obj["messages_per_transfer"] == 1 and obj["lanes_with_traffic"] == pairs
    assert 256 * 1024 < obj["bytes_per_transfer"] < 256 * 1024 + 4096
    # 8 partitions of 16 KiB: a head message plus one batch per partition, on every lane
    assert table["messages_per_transfer"] == 1 + 8
    assert table["lanes_with_traffic"] == pairs * lanes
    assert res["lanes"]["carried_messages"] == pairs * lanes


def test_objects_are_striped_over_the_lanes(sim):
    n, lanes, size = 5, 3, 65536
    res = run(sim, "--parties", str(n), "--lanes", str(lanes), "--mib", "0.25", "--max-message-size", str(size),
              "--partitions", "2", "--records", "4", "--idle-wait", "5")  # fmt: skip
    pairs = n * (n - 1)
    check_common(res, pairs, lanes)
    obj = res["rounds"]["object"]
    chunks = math.ceil((256 * 1024 + 100) / (size - 80))  # payload per message: size minus the header
    assert obj["messages_per_transfer"] == chunks
    assert obj["lanes_with_traffic"] == pairs * min(lanes, chunks)
    assert res["rounds"]["table"]["lanes_with_traffic"] == pairs * 2  # partitions 0 and 1 (head on 0)
    assert res["config"]["idle_wait_s"] == 5


def test_star_pattern_counts_only_the_pairs_that_talk(sim, tmp_path):
    n, lanes = 7, 2
    out = tmp_path / "scale.json"
    argv = ["--parties", str(n), "--lanes", str(lanes), "--pattern", "star", "--mib", "0.1", "--records", "8"]
    assert sim.main([*argv, "--json", str(out), "--timeout", "60"]) == 0
    assert sim.main([*argv, "--json", str(out), "--timeout", "60", "--secret"]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 and [r["config"]["secret"] for r in runs] == [False, True]
    for res in runs:
        check_common(res, 2 * (n - 1), lanes)
    # sealing adds a nonce and a tag to every message
    assert runs[1]["rounds"]["object"]["bytes_sent"] > runs[0]["rounds"]["object"]["bytes_sent"]
