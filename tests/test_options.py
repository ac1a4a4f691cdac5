"""The declarative option specs: validation, defaults, and the docs tables generated from them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fedtransport as ft
from fedtransport.options import COMMON_DEFAULTS, COMMON_OPTIONS, Option, OptionSpec, doc_tables, split_options
from fedtransport.transport import get_backend
from fedtransport.transport.pulsar.options import PULSAR_OPTIONS
from fedtransport.transport.rabbitmq.options import RABBITMQ_OPTIONS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BUILTIN = ("memory", "pulsar", "rabbitmq")


# docs ------------------------------------------------------------------------------------------


def test_every_docs_table_is_the_one_its_spec_renders():
    assert doc_tables(sorted(DOCS.glob("*.md"))) == [], "run: python scripts/option_docs.py"


def test_the_common_options_and_every_builtin_backend_have_a_generated_table():
    text = (DOCS / "backends.md").read_text(encoding="utf-8")
    for name in ("common", *BUILTIN):
        assert text.count(f"<!-- options:{name} -->") == 1, name
        assert text.count(f"<!-- /options:{name} -->") == 1, name
    for name in BUILTIN:
        spec = get_backend(name).option_defaults
        assert isinstance(spec, OptionSpec), name
        # Every key of the table, in the spec's order, and nothing else.
        region = text.split(f"<!-- options:{name} -->")[1].split(f"<!-- /options:{name} -->")[0]
        assert re.findall(r"^\| `(\w+)` \|", region, re.M) == list(spec), name


def test_a_table_that_differs_from_its_spec_is_reported_and_rewritten(tmp_path):
    doc = tmp_path / "backends.md"
    shutil.copy(DOCS / "backends.md", doc)
    text = doc.read_text(encoding="utf-8")
    doc.write_text(text.replace("| `lanes` | `4` |", "| `lanes` | `8` |"), encoding="utf-8")
    assert doc_tables([doc]) == ["backends.md: common"]
    assert doc.read_text(encoding="utf-8") != text  # reporting changes nothing
    assert doc_tables([doc], write=True) == ["backends.md: common"]
    assert doc.read_text(encoding="utf-8") == text
    assert doc_tables([doc]) == []


def test_the_script_checks_and_writes_the_tables(tmp_path):
    shutil.copy(DOCS / "backends.md", tmp_path / "backends.md")
    doc = tmp_path / "backends.md"
    doc.write_text(doc.read_text(encoding="utf-8").replace('`hub` | `"default"`', '`hub` | `"x"`'), "utf-8")
    script = [sys.executable, str(ROOT / "scripts" / "option_docs.py"), "--docs", str(tmp_path)]
    check = subprocess.run([*script, "--check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and check.stdout.strip() == "stale: backends.md: memory", check
    write = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert write.returncode == 0, write.stderr
    assert doc.read_text(encoding="utf-8") == (DOCS / "backends.md").read_text(encoding="utf-8")


def test_table_cells_show_units_and_escape_pipes():
    spec = OptionSpec(
        Option("size", int, 8 << 20, "a | b", range=(64 << 10, 1 << 40), unit="bytes"),
        Option("ttl", int, 2 * 86400, "t", range=(1, 1 << 31), unit="seconds"),
        Option("wait", float, 1.5, "w", unit="seconds"),
        Option("name", str, None, "n", nullable=True),
    )
    rows = spec.table().splitlines()
    assert rows[2] == r"| `size` | `8388608` (8 MiB) | int, 64 KiB to 1 TiB | a \| b |"
    assert rows[3] == "| `ttl` | `172800` (2 days) | int, 1 to 2³¹ | t |"
    assert rows[4] == "| `wait` | `1.5` | seconds, > 0 | w |"
    assert rows[5] == "| `name` | `None` | non-empty str, or `None` | n |"


# validation ------------------------------------------------------------------------------------


def test_defaults_are_applied_and_are_fresh_copies():
    common, backend = split_options(None, "rabbitmq", RABBITMQ_OPTIONS)
    assert common.lanes == COMMON_DEFAULTS["lanes"] == 4 and common.max_message_size == 4 << 20
    assert common.compression == "lz4" and common.allow == frozenset() and common.secret is None
    assert backend == dict(RABBITMQ_OPTIONS) and backend["prefetch"] == 4 and backend["mode"] == "shared"
    backend["peer_credentials"]["9999"] = {"user": "u", "password": "p"}
    assert RABBITMQ_OPTIONS["peer_credentials"] == {}


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("lanes", "4", r"option 'lanes' must be an integer in \[1, 256\], got '4'"),
        ("lanes", 0, r"option 'lanes' must be an integer in \[1, 256\], got 0"),
        ("lanes", True, r"option 'lanes' must be an integer in \[1, 256\], got True"),
        ("max_message_size", 1 << 30, r"'max_message_size' must be an integer in \[65536, 536870912\], got 1073741824"),
        ("redelivery_after", True, "'redelivery_after' must be a positive number of seconds, got True"),
        ("redelivery_after", 0, "'redelivery_after' must be a positive number of seconds, got 0"),
        ("trust_remote_code", 1, "'trust_remote_code' must be True or False, got 1"),
        ("compression", "zstd", "'compression' must be one of 'lz4', 'none', None, got 'zstd'"),
        ("allow", ["os.system"], r"'allow' must be .*module:qualname.* \('os.system' is not 'module:qualname'\)"),
        ("allow", 3, r"'allow' must be .*\(not a list\), got 3"),
    ],
)
def test_a_bad_common_value_names_the_key_what_it_accepts_and_the_value(key, value, expected):
    with pytest.raises(ft.ConfigError, match=expected):
        split_options({key: value}, "memory", get_backend("memory").option_defaults)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("port", 0, r"'port' must be an integer in \[1, 65535\], got 0"),
        ("heartbeat", False, r"'heartbeat' must be an integer in \[0, 3600\], got False"),
        ("send_timeout", "60", "'send_timeout' must be a positive number of seconds, got '60'"),
        ("host", "", r"'host' must be a host name or an IP address \(a DNS name is labels"),
        ("host", "a b", "'host' must be a host name or an IP address"),
        ("vhost_prefix", "a/b", r"'vhost_prefix' must be a string matching .*, got 'a/b'"),
        ("mode", "multicast", "'mode' must be one of 'shared', 'federated', got 'multicast'"),
        ("ssl", {"cafile": "x"}, r"'ssl' must be a mapping with any of the keys .*\(unknown key\(s\) \['cafile'\]\)"),
        ("ssl", {"key_file": "k"}, r"'ssl' .*\('key_file' needs 'cert_file'\)"),
        ("federation_ssl", True, r"'federation_ssl' must be False or a mapping .*\(not a mapping\), got True"),
        ("peer_credentials", {"10000": {"user": "u"}}, r"\(party '10000' needs 'user' and 'password'\)"),
    ],
)  # fmt: skip
def test_a_bad_rabbitmq_value_names_the_key_what_it_accepts_and_the_value(key, value, expected):
    with pytest.raises(ft.ConfigError, match=expected):
        ft.Federation.connect("rabbitmq", job_id="j", party=ft.Party("guest", "9999"), options={key: value})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("tenant", "a/b", r"'tenant' must be a string matching .*, got 'a/b'"),
        ("cluster", "", r"'cluster' must be a string matching .*, or None, got ''"),
        ("tls_validate_hostname", 0, "'tls_validate_hostname' must be True or False, got 0"),
        ("receiver_queue_size", 0, r"'receiver_queue_size' must be an integer in \[1, 65536\], got 0"),
        ("subscribe_timeout", -1, "'subscribe_timeout' must be a positive number of seconds, got -1"),
        ("publish_rate", {"msgs": 1}, r"'publish_rate' must be .*\(unknown key\(s\) \['msgs'\]\)"),
        ("publish_rate", {"bytes": True}, r"\('bytes' is not an integer >= -1 \(-1: unlimited\)\)"),
        ("producer", [("batching_enabled", True)], r"'producer' must be a mapping of keyword arguments"),
        ("tls_trust_certs_file_path", b"/ca.pem", r"'tls_trust_certs_file_path' must be a file path .*, or None"),
        ("mode", "multicast", "'mode' must be one of 'shared', 'direct', 'replication', got 'multicast'"),
    ],
)
def test_a_bad_pulsar_value_names_the_key_what_it_accepts_and_the_value(key, value, expected):
    with pytest.raises(ft.ConfigError, match=expected):
        split_options({key: value}, "pulsar", PULSAR_OPTIONS)


def test_secrets_never_appear_in_an_error():
    for options in ({"secret": "short-secret"}, {"secret": 12345678901234567890}):
        with pytest.raises(ft.ConfigError, match="'secret' must be bytes or str of at least 16 bytes") as err:
            split_options(options, "memory", {})
        assert str(options["secret"]) not in str(err.value) and "not shown>" in str(err.value)
    with pytest.raises(ft.ConfigError, match="'password' must be a non-empty string, got <int, not shown>"):
        RABBITMQ_OPTIONS.validate({"password": 987654321})
    with pytest.raises(ft.ConfigError, match="'token' must be a non-empty string, or None, got <int, not shown>"):
        PULSAR_OPTIONS.validate({"token": 1234567})
    with pytest.raises(ft.ConfigError) as err:
        RABBITMQ_OPTIONS.validate({"peer_credentials": {"10000": {"user": "admin", "pasword": "hunter2-pw"}}})
    assert "hunter2-pw" not in str(err.value)


def test_unknown_keys_are_refused_with_the_valid_ones():
    with pytest.raises(ft.ConfigError, match=r"unknown option\(s\) \['prefech'\] for backend 'rabbitmq'") as err:
        split_options({"prefech": 4}, "rabbitmq", RABBITMQ_OPTIONS)
    assert "prefetch" in str(err.value) and "max_message_size" in str(err.value)
    with pytest.raises(ft.ConfigError, match=r"unknown option\(s\) \['lanes'\] for these options; known options: "):
        RABBITMQ_OPTIONS.validate({"lanes": 4})


def test_values_come_back_converted_and_validating_again_changes_nothing():
    given = {
        "ssl": {"ca_file": "/ca.pem", "server_hostname": None},
        "federation_ssl": False,
        "peer_credentials": {10000: {"user": "admin", "password": "pw"}},
        "secret": "s" * 16,
        "send_timeout": 5,
    }
    once = RABBITMQ_OPTIONS.validate(given)
    assert once["ssl"] == {"ca_file": "/ca.pem"} and once["federation_ssl"] is False
    assert once["peer_credentials"] == {"10000": {"user": "admin", "password": "pw"}}
    assert once["secret"] == b"s" * 16 and once["send_timeout"] == 5.0 and isinstance(once["send_timeout"], float)
    assert RABBITMQ_OPTIONS.validate(once) == once  # RabbitTransport checks its context's options again
    common, _ = split_options({"allow": "numpy:ndarray", "compression": None}, "memory", {})
    assert common.allow == frozenset({"numpy:ndarray"}) and common.compression == "none"
    assert split_options({"allow": None}, "memory", {})[0].allow == frozenset()
    trust = PULSAR_OPTIONS.validate({"tls_trust_certs_file_path": Path("/etc/ca.pem")})["tls_trust_certs_file_path"]
    assert trust == "/etc/ca.pem"


def test_a_plain_dict_of_defaults_is_passed_on_unchecked():
    """A third-party backend may declare its defaults as a dict: its keys are known, not checked."""
    common, backend = split_options({"depth": "deep", "lanes": 2}, "thirdparty", {"depth": 1, "width": 3})
    assert backend == {"depth": "deep", "width": 3} and common.lanes == 2


def test_a_spec_refuses_incomplete_declarations():
    with pytest.raises(TypeError, match="needs a range"):
        Option("n", int, 1, "doc")
    with pytest.raises(TypeError, match="choices or parse"):
        Option("x", object, None, "doc")
    with pytest.raises(TypeError, match=r"the default of option 'n' must be an integer in \[1, 2\], got 0"):
        Option("n", int, 0, "doc", range=(1, 2))
    with pytest.raises(TypeError, match="declared twice"):
        OptionSpec(Option("a", bool, True, "doc"), Option("a", bool, False, "doc"))
    assert list(COMMON_OPTIONS) == list(COMMON_DEFAULTS)
