"""The ``fedtransport`` command: route, certs, cleanup, doctor, bench (in-process via ``main``, once as a script).

Broker-facing commands run against real brokers: RabbitMQ nodes from tests/rabbit_fixtures.py
and the session's Apache Pulsar standalone, whose admin REST API is read back to see what the
commands did. A broker with token authentication (HTTP 401) is tried in tests/test_pulsar_tls.py.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import GUEST, HOST
from cryptography import x509
from standalone_fixtures import admin_read

import fedtransport as ft
from fedtransport import bench
from fedtransport.brokers import RabbitNode
from fedtransport.brokers.standalone import PulsarStandalone
from fedtransport.certs import san_names
from fedtransport.cli import load_options, main, parse_option
from fedtransport.transport.pulsar.admin import PulsarAdmin

try:
    from tests.rabbit_fixtures import (  # fixtures are used by parameter name
        admin_of,
        rabbit_certs,
        rabbit_installed,
        rabbit_node,
        rabbit_opts,
        rabbit_pair,
        rabbit_pool,
        unique_name,
    )
except ModuleNotFoundError:  # plain `pytest` without the repository root on sys.path
    from rabbit_fixtures import (  # type: ignore[no-redef]  # noqa: F401
        admin_of,
        rabbit_certs,
        rabbit_installed,
        rabbit_node,
        rabbit_opts,
        rabbit_pair,
        rabbit_pool,
        unique_name,
    )

ROOT = Path(__file__).resolve().parent.parent
TABLES = sorted((ROOT / "route_tables").glob("*.yaml"))
RESULTS = ROOT / "benchmarks" / "results"
needs_rabbitmq = pytest.mark.skipif(not rabbit_installed(), reason="rabbitmq-server not installed")


def run(capsys: pytest.CaptureFixture[str], command: str, *more: str) -> tuple[int, str, str]:
    """``fedtransport COMMAND MORE...`` in-process (COMMAND split like a shell): (exit code, stdout, stderr)."""
    code = main([*shlex.split(command), *more])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------- help, options


@pytest.mark.parametrize(
    "argv",
    [[], ["demo"], ["route"], ["route", "show"], ["route", "check"], ["certs"], ["cleanup"], ["doctor"], ["bench"]],
)
def test_every_subcommand_has_help_with_examples(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "fedtransport" in text


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["cleanup", "--backend", "pulsar"])  # no --job
    assert info.value.code == 2
    assert "--job" in capsys.readouterr().err


def test_option_values_are_json_when_they_parse(tmp_path: Path) -> None:
    assert parse_option("port=5672") == ("port", 5672)
    assert parse_option('ssl={"ca_file": "ca.pem"}') == ("ssl", {"ca_file": "ca.pem"})
    assert parse_option("password=s3cr=t") == ("password", "s3cr=t")
    assert parse_option("tls_validate_hostname=false") == ("tls_validate_hostname", False)
    with pytest.raises(ft.ConfigError, match="KEY=VALUE"):
        parse_option("port")
    f = tmp_path / "opts.yaml"
    f.write_text(yaml.safe_dump({"rabbitmq": {"user": "admin", "password": "from-file", "port": 1}, "pulsar": {}}))
    opts = load_options("rabbitmq", [f], ["port=5673"])
    assert opts == {"user": "admin", "password": "from-file", "port": 5673}  # --option wins over the file
    flat = tmp_path / "flat.yaml"
    flat.write_text("admin_url: http://x:8080\n")
    assert load_options("pulsar", [flat]) == {"admin_url": "http://x:8080"}
    flat.write_text("- not a mapping\n")
    with pytest.raises(ft.ConfigError, match="mapping"):
        load_options("pulsar", [flat])


# ---------------------------------------------------------------------------- route


@pytest.mark.parametrize("table", TABLES, ids=lambda p: p.name)
def test_route_show_prints_every_listed_party(capsys: pytest.CaptureFixture[str], table: Path) -> None:
    rt = ft.RouteTable.load(table)
    code, out, err = run(capsys, "route show", str(table))
    assert code == 0 and not err
    for pid in rt.parties():
        assert f"party {pid}" in out and rt.resolve(pid).host in out
    if rt.kind == "pulsar":
        assert "PUT /admin/v2/clusters/fl-pulsar-" in out and '"brokerServiceUrl"' in out
    else:
        assert "amqp://" in out and "management" in out

    code, out, _ = run(capsys, "route show", str(table), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["kind"] == rt.kind and list(doc["parties"]) == rt.parties()
    for pid, info in doc["parties"].items():
        ep = rt.resolve(pid)
        assert (info["host"], info["port"], info["ssl_port"], info["proxy"]) == (
            ep.host,
            ep.port,
            ep.ssl_port,
            ep.proxy,
        )
        if rt.kind == "pulsar":
            assert info["pulsar_cluster"] == rt.pulsar_cluster(pid)


def test_route_show_a_party_reached_through_the_star_default(capsys: pytest.CaptureFixture[str]) -> None:
    table = ROOT / "route_tables" / "pulsar_star_route_table.yaml"
    code, out, _ = run(capsys, "route show", str(table), "--party", "8888", "--json")
    info = json.loads(out)["parties"]["8888"]
    assert code == 0 and not info["listed"]
    assert info["sni"] == "8888.fate.org" and info["proxy"] == "proxy.fate.org:443"
    # what FATE's star-network walk-through registers for a party behind the proxy
    assert info["pulsar_cluster"]["proxyServiceUrl"] == "pulsar+ssl://proxy.fate.org:443"
    assert info["pulsar_cluster"]["proxyProtocol"] == "SNI"
    code, out, _ = run(capsys, "route show", str(table), "--party", "8888")
    assert "not listed" in out and "SNI 8888.fate.org" in out


@pytest.mark.parametrize("table", TABLES, ids=lambda p: p.name)
def test_route_check_accepts_the_shipped_tables(capsys: pytest.CaptureFixture[str], table: Path) -> None:
    code, out, err = run(capsys, "route check", str(table))
    assert code == 0 and "OK" in out and not err


@pytest.mark.parametrize(
    "text, key",
    [
        ("9999:\n  host: 10.0.0.1\n  port: six\n", "9999.port"),
        ("9999:\n  host: 10.0.0.1\n  proxy: proxy-without-port\n", "9999.proxy"),
        ("9999:\n  port: 6650\n", "9999.host"),  # no host and no default domain to build one from
        ("9999: [1, 2]\n", "9999"),
        ("default:\n  proxy: proxy.fate.org:443\n", "default.proxy"),  # a proxy without a domain
    ],
)
def test_route_check_rejects_a_broken_table_with_the_route_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, key: str
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(text)
    code, out, err = run(capsys, "route check", str(broken))
    assert code == 1 and not out
    assert str(broken) in err and f"'{key}'" in err
    if key != "default.proxy":  # the others are exactly what RouteTable.load raises
        with pytest.raises(ft.RouteError) as info:
            ft.RouteTable.load(broken).resolve("9999")
        assert str(info.value) in err


def test_route_check_unreadable_and_invalid_yaml(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "route check", str(tmp_path / "missing.yaml"))
    assert code == 1 and "cannot read" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("9999: {host: [unclosed\n")
    code, _, err = run(capsys, "route check", str(bad))
    assert code == 1 and "not valid YAML" in err


def test_route_check_warns_about_keys_it_ignores(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("9999:\n  hots: 10.0.0.1\n  port: 6650\ndefault:\n  domain: fate.org\n")
    code, out, err = run(capsys, "route check", str(typo))
    assert code == 0 and "OK" in out
    assert "'9999.hots' is not used" in err


def test_route_check_warns_about_pulsar_parties_listed_by_ipv6_address(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    table = tmp_path / "v6.yaml"
    table.write_text('9999: {host: "[fd00::4]", port: 6650}\n10000: {host: 10.0.0.5, port: 6650}\n')
    code, out, err = run(capsys, "route check", str(table))
    assert code == 0 and "OK" in out
    assert "'9999.host': fd00::4: pulsar-client cannot connect" in err and "10000" not in err
    code, out, err = run(capsys, "route show --party 9999", str(table))
    assert code == 0 and "pulsar://[fd00::4]:6650" in out
    rabbit = tmp_path / "v6-rabbit.yaml"
    rabbit.write_text("9999: {host: 'fd00::4', port: 5672, mng_port: 15672}\n")
    code, out, err = run(capsys, "route show --party 9999", str(rabbit))
    assert code == 0 and "amqp://[fd00::4]:5672" in out and "http://[fd00::4]:15672" in out
    assert run(capsys, "route check", str(rabbit))[2] == ""


# ---------------------------------------------------------------------------- certs


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _verify(ca: x509.Certificate, leaf: x509.Certificate, name: str) -> None:
    """RFC 5280 path validation as a TLS client does it, for server name ``name``."""
    verification = pytest.importorskip("cryptography.x509.verification")
    try:
        subject: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    verifier = verification.PolicyBuilder().store(verification.Store([ca])).build_server_verifier(subject)
    assert verifier.verify(leaf, [])[-1] == ca


def test_issue_takes_extra_sans() -> None:
    from fedtransport import certs

    ca_key, ca_cert = certs.make_ca()
    _, leaf = certs.issue(ca_key, ca_cert, "9999.fate.org", extra_sans=["localhost", "127.0.0.1", "9999.fate.org"])
    assert san_names(leaf) == ["9999.fate.org", "localhost", "127.0.0.1"]  # in order, duplicates dropped
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    for name in ("9999.fate.org", "localhost", "127.0.0.1"):
        _verify(ca_cert, leaf, name)
    with pytest.raises(ft.ConfigError, match="list of names"):
        certs.issue(ca_key, ca_cert, "a.fate.org", extra_sans="localhost")  # type: ignore[arg-type]
    with pytest.raises(ft.ConfigError, match="extra SAN"):
        certs.issue(ca_key, ca_cert, "a.fate.org", extra_sans=["not a name"])


def test_certs_writes_a_star_network(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "certs"
    sans = "--san 9999=192.168.0.4 --san proxy=localhost"
    code, out, err = run(
        capsys, f"certs --domain fate.org --party 9999 --party 10000 --proxy proxy {sans} --out", str(out_dir)
    )
    assert code == 0 and not err
    assert "party 9999: answers to SNI 9999.fate.org, 192.168.0.4" in out
    assert "party 10000: answers to SNI 10000.fate.org" in out
    assert "proxy: answers to SNI proxy.fate.org, localhost" in out
    ca = x509.load_pem_x509_certificate((out_dir / "ca.cert.pem").read_bytes())
    assert _mode(out_dir / "ca.key.pem") == 0o600
    hosts = {
        "9999.fate.org": ("broker", "broker.key-pk8.pem", ["9999.fate.org", "192.168.0.4"]),
        "10000.fate.org": ("broker", "broker.key-pk8.pem", ["10000.fate.org"]),
        "proxy.fate.org": ("proxy", "proxy.key.pem", ["proxy.fate.org", "localhost"]),
    }
    for host, (stem, key_name, names) in hosts.items():
        d = out_dir / host
        assert str(d / f"{stem}.cert.pem") in out
        assert _mode(d / key_name) == 0o600 and _mode(d / f"{stem}.pem") == 0o600
        assert (d / key_name).read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8, as Pulsar wants
        leaf = x509.load_pem_x509_certificate((d / f"{stem}.cert.pem").read_bytes())
        assert san_names(leaf) == names
        for name in names:
            _verify(ca, leaf, name)
        combined = (d / f"{stem}.pem").read_text()
        assert "BEGIN CERTIFICATE" in combined and "BEGIN PRIVATE KEY" in combined


def test_certs_adds_a_party_under_the_same_ca(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["certs", "--domain", "fate.org", "--party", "9999", "--out", str(tmp_path)]) == 0
    ca_before = (tmp_path / "ca.cert.pem").read_bytes()
    capsys.readouterr()
    code, out, _ = run(capsys, "certs --domain fate.org --party 8888 --out", str(tmp_path), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ca"]["reused"] is True
    assert (tmp_path / "ca.cert.pem").read_bytes() == ca_before
    assert doc["hosts"]["8888"]["sans"] == ["8888.fate.org"]
    ca = x509.load_pem_x509_certificate(ca_before)
    _verify(ca, x509.load_pem_x509_certificate(Path(doc["hosts"]["8888"]["cert"]).read_bytes()), "8888.fate.org")


def test_certs_bad_input_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "certs --domain fate.org --party", "99 99", "--out", str(tmp_path))
    assert code == 1 and "DNS label" in err
    code, _, err = run(capsys, "certs --domain fate.org --party 1 --san 2=x.org --out", str(tmp_path))
    assert code == 1 and "neither parties" in err
    code, _, err = run(capsys, "certs --domain fate.org --party 1 --san oops --out", str(tmp_path))
    assert code == 1 and "WHO=NAME" in err


# ---------------------------------------------------------------------------- Pulsar: cleanup and doctor


# On the session's real Apache Pulsar broker; the answers of a broker with token authentication
# (HTTP 401) are tried in tests/test_pulsar_tls.py, which runs one.


def pulsar_urls(broker: PulsarStandalone) -> str:
    return f"--option service_url={broker.service_url} --option admin_url={broker.admin_url}"


def test_pulsar_cleanup_of_a_crashed_job(
    capsys: pytest.CaptureFixture[str], pulsar_standalone: PulsarStandalone, job_id: str
) -> None:
    broker = pulsar_standalone
    opts = {"service_url": broker.service_url, "admin_url": broker.admin_url}
    g = ft.Federation.connect("pulsar", job_id=job_id, party=GUEST, options=opts)
    h = ft.Federation.connect("pulsar", job_id=job_id, party=HOST, options=opts)
    g.remote(np.arange(10), "x", "0", [HOST])
    assert np.array_equal(h.get("x", "0", [GUEST], timeout=60)[0], np.arange(10))
    g.close()  # the scheduler crashed: sessions end, cleanup() is never called
    h.close()
    ns = f"fl-tenant/{job_id}"
    topics = admin_read(broker, f"/admin/v2/persistent/{ns}")
    assert admin_read(broker, f"/admin/v2/namespaces/{ns}") is not None
    assert set(topics) >= {g.transport.topic(GUEST, HOST, lane) for lane in range(4)}  # type: ignore[attr-defined]

    code, out, _ = run(capsys, "cleanup --backend pulsar --job", job_id, "--dry-run", "--option",
                       f"admin_url={broker.admin_url}")  # fmt: skip
    assert code == 0 and f"found  namespace {ns}" in out and "nothing deleted" in out
    assert admin_read(broker, f"/admin/v2/persistent/{ns}") == topics  # a dry run deletes nothing

    code, out, err = run(capsys, "cleanup --backend pulsar --job", job_id, "--option", f"admin_url={broker.admin_url}")
    assert code == 0 and not err, err
    assert f"deleted  namespace {ns}" in out and all(f"deleted  topic {topic}" in out for topic in topics)
    assert "nothing of the job is left" in out
    assert admin_read(broker, f"/admin/v2/namespaces/{ns}") is None
    assert ns not in admin_read(broker, "/admin/v2/namespaces/fl-tenant")

    code, out, _ = run(capsys, "cleanup --backend pulsar --job", job_id, "--option", f"admin_url={broker.admin_url}")
    assert code == 0 and "already clean" in out  # idempotent


def test_pulsar_cleanup_needs_the_admin_api(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "cleanup --backend pulsar --job job-1")
    assert code == 1 and "admin_url" in err


def test_pulsar_cleanup_fills_the_admin_url_from_the_route_table(
    capsys: pytest.CaptureFixture[str], pulsar_standalone: PulsarStandalone, tmp_path: Path, job_id: str
) -> None:
    broker = pulsar_standalone
    table = tmp_path / "routes.yaml"
    table.write_text(yaml.safe_dump({9999: {"host": "127.0.0.1", "port": broker.port, "mngPort": broker.web_port}}))
    admin = PulsarAdmin(broker.admin_url)
    admin.ensure_tenant("fl-tenant", [broker.cluster])
    admin.create_namespace("fl-tenant", job_id)
    code, out, err = run(
        capsys, "cleanup --backend pulsar --job", job_id, "--route-table", str(table), "--party", "guest:9999"
    )
    assert code == 0, err
    assert f"deleted  namespace fl-tenant/{job_id}" in out
    assert admin_read(broker, f"/admin/v2/namespaces/fl-tenant/{job_id}") is None
    code, _, err = run(capsys, "cleanup --backend pulsar --job", job_id, "--route-table", str(table))
    assert code == 1 and "--party" in err


def test_pulsar_doctor_passes_on_a_good_broker(
    capsys: pytest.CaptureFixture[str], pulsar_standalone: PulsarStandalone
) -> None:
    code, out, _ = run(capsys, f"doctor --backend pulsar {pulsar_urls(pulsar_standalone)} --json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"], out
    status = {c["name"]: c["status"] for c in doc["checks"]}
    assert status == {
        "options": "ok",
        "broker": "ok",
        "protocol and token": "ok",
        "admin API": "ok",
        "cluster": "ok",
        "tenant": "ok",
        "round trip": "ok",
    }
    # the probe job cleaned up after itself
    assert admin_read(pulsar_standalone, "/admin/v2/namespaces/fl-tenant/fedtransport-doctor") is None


def test_pulsar_doctor_names_the_problem_and_the_fix(
    capsys: pytest.CaptureFixture[str], pulsar_standalone: PulsarStandalone
) -> None:
    urls = pulsar_urls(pulsar_standalone)
    code, out, _ = run(capsys, f"doctor --backend pulsar {urls} -o cluster=fl-pulsar-9999 --no-roundtrip")
    assert code == 1
    assert "'fl-pulsar-9999' is not registered" in out and f"it knows {pulsar_standalone.cluster}" in out
    assert "fix: --option cluster=NAME" in out

    from fedtransport.brokers._process import free_port

    code, out, _ = run(capsys, f"doctor --backend pulsar --option service_url=pulsar://127.0.0.1:{free_port()}")
    assert code == 1 and "nothing listens on" in out and "fix: start the broker" in out
    assert "WARN  admin API" in out  # no admin_url: said, not failed


# ---------------------------------------------------------------------------- RabbitMQ: cleanup and doctor


def job_leftovers(node: RabbitNode, job_id: str) -> list[str]:
    """What the management API shows of a job: its vhost, users, upstreams, policies, permissions."""
    admin = admin_of(node)
    vhost = f"fedtransport-{job_id}"
    left = [f"vhost {v['name']}" for v in admin.list_vhosts() if v["name"] == vhost]
    left += [f"user {u['name']}" for u in admin.list_users() if u["name"].startswith(f"{vhost}:")]
    left += [f"permission {p['user']}" for p in admin.list_permissions() if p["vhost"] == vhost]
    left += [f"upstream {u['name']}" for u in admin.list_federation_upstreams() if u["vhost"] == vhost]
    left += [f"policy {p['name']}" for p in admin.list_policies() if p["vhost"] == vhost]
    return left


@needs_rabbitmq
def test_rabbitmq_cleanup_of_a_crashed_federated_job(
    capsys: pytest.CaptureFixture[str], rabbit_pair: tuple[RabbitNode, RabbitNode], tmp_path: Path, job_id: str
) -> None:
    a, b = rabbit_pair
    routes = {
        GUEST.party_id: {"host": "127.0.0.1", "port": a.port, "mng_port": a.mng_port},
        HOST.party_id: {"host": "127.0.0.1", "port": b.port, "mng_port": b.mng_port},
    }
    secret = "a job secret shared by every party"
    g = ft.Federation.connect(
        "rabbitmq",
        job_id=job_id,
        party=GUEST,
        route_table=routes,
        options=rabbit_opts(a, mode="federated", secret=secret),
    )
    h = ft.Federation.connect(
        "rabbitmq",
        job_id=job_id,
        party=HOST,
        route_table=routes,
        options=rabbit_opts(b, mode="federated", secret=secret),
    )
    g.remote(np.arange(100), "x", "0", [HOST])
    h.remote("back", "y", "0", [GUEST])
    assert np.array_equal(h.get("x", "0", [GUEST], timeout=120)[0], np.arange(100))
    assert g.get("y", "0", [HOST], timeout=120) == ["back"]
    g.close()  # crash-like: connections go, nothing is cleaned up
    h.close()
    for node in (a, b):  # each broker holds a vhost, users, an upstream and policies of the job
        left = job_leftovers(node, job_id)
        assert any(x.startswith("vhost") for x in left) and any(x.startswith("upstream") for x in left), left
        assert any(x.startswith("policy") for x in left) and any(x.startswith("user") for x in left), left

    # party 9999 cleans its broker: address from the route table, credentials from a file
    table = tmp_path / "rabbitmq_route_table.yaml"
    table.write_text(yaml.safe_dump({int(k): v for k, v in routes.items()}))
    creds = tmp_path / "secrets.yaml"
    creds.write_text(yaml.safe_dump({"rabbitmq": {"user": a.user, "password": a.password}}))
    code, out, err = run(
        capsys,
        "cleanup --backend rabbitmq --job",
        job_id,
        "--route-table",
        str(table),
        "--party",
        "9999",
        "--options",
        str(creds),
    )
    assert code == 0, err
    assert f"deleted  vhost fedtransport-{job_id}" in out and "deleted  federation upstream from:host:10000" in out
    assert "nothing of the job is left" in out
    assert job_leftovers(a, job_id) == []
    assert job_leftovers(b, job_id) != []  # the other party's broker is its own business

    # party 10000, with plain --option flags and JSON output
    code, out, _ = run(
        capsys,
        "cleanup --backend rabbitmq --job",
        job_id,
        "--json",
        *(f"--option={k}={v}" for k, v in rabbit_opts(b).items()),
    )
    report = json.loads(out)
    assert code == 0 and report["deleted"] and report["left"] == []
    assert f"vhost fedtransport-{job_id}" in report["found"]
    assert job_leftovers(b, job_id) == []

    code, out, _ = run(
        capsys, "cleanup --backend rabbitmq --job", job_id, *(f"--option={k}={v}" for k, v in rabbit_opts(b).items())
    )
    assert code == 0 and "already clean" in out  # idempotent


@needs_rabbitmq
def test_rabbitmq_cleanup_finds_a_user_left_without_permissions(
    capsys: pytest.CaptureFixture[str], rabbit_node: RabbitNode, job_id: str
) -> None:
    # a crash between creating the job user and granting it anything: no vhost listing shows it
    user = f"fedtransport-{job_id}:guest:9999"
    admin_of(rabbit_node).put_user(user, "pw")
    code, out, _ = run(
        capsys,
        "cleanup --backend rabbitmq --job",
        job_id,
        *(f"--option={k}={v}" for k, v in rabbit_opts(rabbit_node).items()),
    )
    assert code == 0 and f"deleted  user {user}" in out
    assert admin_of(rabbit_node).get_user(user) is None


@needs_rabbitmq
def test_rabbitmq_doctor_passes_on_a_good_node(capsys: pytest.CaptureFixture[str], rabbit_node: RabbitNode) -> None:
    before = {v["name"] for v in admin_of(rabbit_node).list_vhosts()}
    code, out, _ = run(
        capsys, "doctor --backend rabbitmq", *(f"--option={k}={v}" for k, v in rabbit_opts(rabbit_node).items())
    )
    assert code == 0, out
    for name in ("AMQP listener", "management API", "administrator", "plugins", "round trip"):
        assert f"ok    {name}" in out
    assert "result: all checks passed" in out
    assert {v["name"] for v in admin_of(rabbit_node).list_vhosts()} == before  # the probe job cleaned up


@needs_rabbitmq
def test_rabbitmq_doctor_over_tls(
    capsys: pytest.CaptureFixture[str], rabbit_node: RabbitNode, rabbit_certs: dict[str, Path]
) -> None:
    certs = rabbit_certs
    good = json.dumps({"ca_file": str(certs["ca"]), "server_hostname": "party-a.fate.test"})
    opts = [f"--option={k}={v}" for k, v in rabbit_opts(rabbit_node, port=rabbit_node.ssl_port).items()]
    code, out, _ = run(capsys, "doctor --backend rabbitmq", *opts, f"--option=ssl={good}", "--no-roundtrip")
    assert code == 0 and "answers AMQP 0-9-1 over TLS as party-a.fate.test" in out, out
    wrong = json.dumps({"ca_file": str(certs["ca"]), "server_hostname": "party-z.fate.test"})
    code, out, _ = run(capsys, "doctor --backend rabbitmq", *opts, f"--option=ssl={wrong}", "--no-roundtrip")
    assert code == 1 and "TLS certificate was refused" in out and "fix: trust the CA" in out


@needs_rabbitmq
def test_rabbitmq_doctor_fails_clearly_on_a_wrong_password(
    capsys: pytest.CaptureFixture[str], rabbit_node: RabbitNode
) -> None:
    opts = rabbit_opts(rabbit_node, password="not-the-password")
    code, out, _ = run(capsys, "doctor --backend rabbitmq", *(f"--option={k}={v}" for k, v in opts.items()))
    assert code == 1
    assert "ok    AMQP listener" in out  # the broker is there; the credentials are the problem
    assert f"refused user {rabbit_node.user!r} (HTTP 401): wrong user or password" in out
    assert "fix: pass the broker administrator's credentials" in out
    assert "skip  round trip" in out and "result: 1 problem(s): management API" in out


@needs_rabbitmq
def test_rabbitmq_doctor_fails_for_a_user_who_is_not_administrator(
    capsys: pytest.CaptureFixture[str], rabbit_node: RabbitNode
) -> None:
    user = unique_name("monitor")
    admin_of(rabbit_node).put_user(user, "pw", tags="monitoring")
    try:
        opts = rabbit_opts(rabbit_node, user=user, password="pw")
        code, out, _ = run(
            capsys, "doctor --backend rabbitmq --no-roundtrip", *(f"--option={k}={v}" for k, v in opts.items())
        )
        assert code == 1 and "FAIL  administrator" in out
        assert f"fix: rabbitmqctl set_user_tags {user} administrator" in out
    finally:
        admin_of(rabbit_node).delete_user(user)


@needs_rabbitmq
def test_rabbitmq_doctor_fails_without_the_federation_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    with RabbitNode(name="no-federation", plugins=("rabbitmq_management",)) as node:
        opts = [f"--option={k}={v}" for k, v in rabbit_opts(node).items()]
        code, out, _ = run(capsys, "doctor --backend rabbitmq --no-roundtrip", *opts)
        assert code == 1
        assert "FAIL  plugins" in out and "not enabled: rabbitmq_federation, rabbitmq_federation_management" in out
        assert "fix: rabbitmq-plugins enable rabbitmq_federation rabbitmq_federation_management" in out
        # a party that only ever shares one broker does not need federation: a warning then
        code, out, _ = run(capsys, "doctor --backend rabbitmq --no-roundtrip", *opts, "--option=mode=shared")
        assert code == 0 and "WARN  plugins" in out


def test_rabbitmq_doctor_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    from fedtransport.brokers._process import free_port

    code, out, _ = run(capsys, f"doctor --backend rabbitmq --option=port={free_port()} --option=mng_port={free_port()}")
    assert code == 1
    assert "FAIL  AMQP listener" in out and "nothing listens on" in out
    assert "FAIL  management API" in out and "rabbitmq-plugins enable rabbitmq_management" in out
    code, out, _ = run(capsys, f"doctor --backend rabbitmq --option=prefetch=0 --option=port={free_port()}")
    assert code == 1 and "FAIL  options" in out and "'prefetch'" in out
    code, out, _ = run(capsys, "doctor --backend rabbitmq --option=prefetchh=1")
    assert code == 1 and "FAIL  options" in out and "unknown option(s) ['prefetchh']" in out


# ---------------------------------------------------------------------------- bench


def test_bench_charts_the_saved_results(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    files = sorted(RESULTS.glob("throughput-*.json"))
    assert files, "benchmarks/results/ holds the throughput results"
    png = tmp_path / "chart.png"
    code, out, _ = run(capsys, "bench --from-json", *map(str, files), "--chart", str(png))
    assert code == 0 and f"chart written to {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    code, _, err = run(capsys, "bench --from-json", str(files[0]))
    assert code == 1 and "--chart" in err
    code, _, err = run(capsys, "bench --from-json", str(ROOT / "pyproject.toml"), "--chart", str(png))
    assert code == 1 and "cannot read benchmark results" in err


def test_benchmarks_report_script_writes_the_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "benchmarks.png"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_bench_runs_a_workload_from_the_installed_package(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A small real run: spawned sender and receiver, an embedded broker, JSON results."""
    result = tmp_path / "r.json"
    code, out, err = run(capsys, "bench --backend pulsar --only object --mib 8 --repeat 1 --json", str(result))
    assert code == 0, err
    doc = json.loads(result.read_text())
    best = doc["workloads"]["object"]["best"]
    assert doc["backend"] == "pulsar" and best["bytes"] == 8 << 20 and best["MB_per_s"] > 0
    assert "pulsar   object" in out


def test_bench_registry_takes_a_new_workload(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    seen: list[str] = []

    def factory(ctx: bench.BenchContext) -> Any:
        seen.append(ctx.broker["service_url"])  # the started broker is there for the workload
        return lambda i: {"seconds": 2.0, "bytes": 4_000_000, "MB_per_s": 2.0}

    def flag(ap: Any) -> None:
        ap.add_argument("--extra-test", action="store_true")

    bench.register_workload("extra-test", factory, default=False)
    bench.register_arguments(flag)
    try:
        result = tmp_path / "r.json"
        code, _, _ = run(capsys, "bench --backend pulsar --repeat 1 --extra-test --only extra-test --json", str(result))
        assert code == 0 and seen and seen[0].startswith("pulsar://")
        assert json.loads(result.read_text())["workloads"]["extra-test"]["best"]["MB_per_s"] == 2.0
        code, _, err = run(capsys, "bench --backend pulsar --only no-such-workload")
        assert code == 1 and "unknown workload" in err
    finally:
        bench.WORKLOADS.pop("extra-test")
        bench._ARGUMENT_HOOKS.remove(flag)


# ---------------------------------------------------------------------------- the console script


def test_console_script_in_a_subprocess(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("fedtransport")
    assert script.exists(), "the package is installed with its console script"
    ok = subprocess.run(
        [str(script), "route", "check", str(ROOT / "route_tables" / "pulsar_route_table.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "OK" in ok.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text("9999:\n  host: 10.0.0.1\n  sslPort: 66510\n")
    bad = subprocess.run([str(script), "route", "check", str(broken)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "'9999.ssl_port': 66510 is not a TCP port" in bad.stderr
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("fedtransport ")
