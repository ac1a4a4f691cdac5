"""TLS, JWT tokens and direct mode on the real Apache Pulsar broker.

One broker for this module (``secure``): ``PulsarStandalone`` with TLS on its binary and web
ports and token authentication (HS256 ``token_secret``), its certificate made by
``fedtransport certs`` for ``9999.fate.test`` and ``127.0.0.1``, not ``localhost``: the name
``localhost`` reaches the same broker under a name its certificate does not carry. Direct mode
runs between it and the session's plain broker: two real brokers, one per party.
"""

from __future__ import annotations

import secrets
import threading
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import GUEST, HOST

import fedtransport as ft
from fedtransport import certs
from fedtransport.brokers.standalone import PulsarStandalone, hs256_token
from fedtransport.cli import main as fedtransport_cli
from fedtransport.transport.pulsar.admin import PulsarAdmin

pytestmark = pytest.mark.timeout(600)  # a broker start, maybe after resolving its jars


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PulsarStandalone]:
    out = tmp_path_factory.mktemp("certs")
    assert fedtransport_cli(["certs", "--domain", "fate.test", "--party", "9999", "--san", "9999=127.0.0.1",
                             "--out", str(out)]) == 0  # fmt: skip
    tls = {"cert": out / "9999.fate.test" / "broker.cert.pem", "key": out / "9999.fate.test" / "broker.key-pk8.pem",
           "ca": out / "ca.cert.pem"}  # fmt: skip
    with PulsarStandalone(cluster="secure", tls=tls, token_secret=secrets.token_bytes(32)) as broker:
        yield broker


@pytest.fixture
def other_ca(tmp_path: Path) -> str:
    _, ca_cert = certs.make_ca("someone else's CA")
    return str(certs.write_cert(tmp_path / "other-ca.cert.pem", ca_cert))


def wrong_token(broker: PulsarStandalone) -> str:
    return hs256_token(secrets.token_bytes(32), broker.superuser)  # the right role, signed by someone else


def tls_options(broker: PulsarStandalone, *, host: str = "127.0.0.1", **extra: Any) -> dict[str, Any]:
    return {
        "service_url": f"pulsar+ssl://{host}:{broker.tls_port}",
        "admin_url": f"https://{host}:{broker.web_tls_port}",
        "tls_trust_certs_file_path": broker.tls_trust_certs_file_path,
        "token": broker.admin_token,
        "cluster": broker.cluster,  # the tenant is allowed on it
        "client": {"operation_timeout_seconds": 15},
        **extra,
    }


def connect(job_id: str, party: ft.Party, options: dict[str, Any], **kwargs: Any) -> ft.Federation:
    return ft.Federation.connect("pulsar", job_id=job_id, party=party, options=options, **kwargs)


def namespace_gone(broker: PulsarStandalone, job_id: str) -> bool:
    try:
        broker.admin("GET", f"/admin/v2/namespaces/fl-tenant/{job_id}")
    except urllib.error.HTTPError as err:
        return err.code == 404
    return False


# ---------------------------------------------------------------------------- TLS and the right token
def test_tls_and_token_on_both_planes(secure, job_id):
    """pulsar+ssl:// and https:// with the CA file, hostname validation on (the default), and the
    superuser's token: setup, a transfer, and cleanup through the TLS admin port."""
    opts = tls_options(secure)
    with connect(job_id, GUEST, opts) as g, connect(job_id, HOST, opts) as h:
        table = ft.Table.from_partitions([[(i, f"v{i}")] for i in range(4)])
        g.remote(np.arange(100_000), "x", "0", [HOST])
        g.remote(table, "t", "0", [HOST])
        assert np.array_equal(h.get("x", "0", [GUEST], timeout=60)[0], np.arange(100_000))
        assert h.get("t", "0", [GUEST], timeout=60)[0] == table
        assert secure.admin("GET", f"/admin/v2/namespaces/fl-tenant/{job_id}/messageTTL") == 172800
    g.cleanup()
    assert namespace_gone(secure, job_id)


def test_a_party_role_with_granted_permissions_on_the_data_plane(secure, job_id):
    """Without admin_url: the operator makes the namespace and grants each party's role produce and
    consume; each party connects with its own token."""
    ns = f"/admin/v2/namespaces/fl-tenant/{job_id}"
    admin = PulsarAdmin(secure.admin_url, token=secure.admin_token)
    admin.ensure_tenant("fl-tenant", [secure.cluster])
    admin.create_namespace("fl-tenant", job_id)
    admin.set_retention("fl-tenant", job_id, 60, -1)
    try:
        for role in ("party-9999", "party-10000"):
            secure.admin("POST", f"{ns}/permissions/{role}", ["produce", "consume"])
        base = {"service_url": secure.service_url_tls, "tls_trust_certs_file_path": secure.tls_trust_certs_file_path}
        with connect(job_id, GUEST, {**base, "token": secure.token("party-9999")}) as g, \
             connect(job_id, HOST, {**base, "token": f"token:{secure.token('party-10000')}"}) as h:  # fmt: skip
            g.remote({"w": [1, 2, 3]}, "w", "0", [HOST])
            assert h.get("w", "0", [GUEST], timeout=60) == [{"w": [1, 2, 3]}]
        # authenticated, but a role with no permission on the namespace: not authorized
        with pytest.raises(ft.BackendError, match="AuthorizationError"):
            connect(job_id, GUEST, {**base, "token": secure.token("party-8888")})
    finally:
        admin.delete_namespace("fl-tenant", job_id)


def test_token_from_a_file_on_both_planes(secure, job_id, tmp_path):
    token_file = tmp_path / "admin.jwt"
    token_file.write_text(secure.admin_token + "\n")
    with connect(job_id, GUEST, tls_options(secure, token=f"file://{token_file}")) as g:
        g.remote(1, "x", "0", [GUEST])  # to itself
        assert g.get("x", "0", [GUEST], timeout=60) == [1]
    g.cleanup()
    assert namespace_gone(secure, job_id)


# ---------------------------------------------------------------------------- wrong or missing tokens
@pytest.mark.parametrize("tls", [False, True], ids=["pulsar", "pulsar+ssl"])
def test_data_plane_wrong_or_missing_token_says_authentication_failed(secure, job_id, tls):
    """pulsar-client alone would retry until its operation timeout and report Timeout; connect()
    asks the broker and reports its answer."""
    url = secure.service_url_tls if tls else secure.service_url
    base = {"service_url": url, "tls_trust_certs_file_path": secure.tls_trust_certs_file_path,
            "client": {"operation_timeout_seconds": 120}}  # fmt: skip
    with pytest.raises(ft.BackendError, match="authentication failed") as info:
        connect(job_id, GUEST, {**base, "token": wrong_token(secure)})
    assert "the broker rejected the token" in str(info.value) and "AuthenticationError" in str(info.value)
    assert url in str(info.value)
    with pytest.raises(ft.BackendError, match=r"authentication failed .*\(no token given\)"):
        connect(job_id, GUEST, base)
    with pytest.raises(ft.BackendError, match="authentication failed"):
        connect(job_id, GUEST, {**base, "token": "not.a.token"})


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_admin_plane_wrong_or_missing_token_says_authentication_failed(secure, job_id, tls):
    url = secure.admin_url_tls if tls else secure.admin_url
    trust = secure.tls_trust_certs_file_path
    for token, given in ((wrong_token(secure), "the broker rejected the token"), (None, "no token given")):
        with pytest.raises(ft.BackendError) as info:
            PulsarAdmin(url, token=token, tls_trust_certs_file_path=trust).get_clusters()
        assert info.value.status == 401 and f"authentication failed ({given})" in str(info.value)
        # connect() meets it at its first admin call (the tenant), before the data plane
        opts = {"service_url": secure.service_url, "admin_url": url, "tls_trust_certs_file_path": trust}
        with pytest.raises(ft.BackendError, match=rf"authentication failed \({given}\)"):
            connect(job_id, GUEST, {**opts, "token": token})
    # a valid token of a role that is no superuser: authenticated, not authorized
    with pytest.raises(ft.BackendError, match="not authorized") as info:
        PulsarAdmin(url, token=secure.token("party-9999"), tls_trust_certs_file_path=trust).ensure_tenant("x", ["y"])
    assert "authentication failed" not in str(info.value)
    assert PulsarAdmin(url, token=f"token:{secure.admin_token}", tls_trust_certs_file_path=trust).get_clusters() == [
        "secure"
    ]
    assert namespace_gone(secure, job_id)


# ---------------------------------------------------------------------------- certificates and names
def test_cli_cleanup_and_doctor_say_the_token_was_rejected(secure, job_id, capsys):
    """``fedtransport cleanup`` and ``doctor`` against a broker with token authentication: a wrong
    token is named as such (HTTP 401) with the fix, a right one cleans the job up."""
    admin = PulsarAdmin(secure.admin_url, token=secure.admin_token)
    admin.ensure_tenant("fl-tenant", [secure.cluster])
    admin.create_namespace("fl-tenant", job_id)
    cleanup = ["cleanup", "--backend", "pulsar", "--job", job_id, "--option", f"admin_url={secure.admin_url}"]
    assert fedtransport_cli([*cleanup, "--option", f"token={wrong_token(secure)}"]) == 1
    assert "HTTP 401" in capsys.readouterr().err
    assert f"{job_id}" in str(admin.request("GET", "/admin/v2/namespaces/fl-tenant"))  # nothing deleted
    assert fedtransport_cli([*cleanup, "--option", f"token={secure.admin_token}"]) == 0
    assert f"deleted  namespace fl-tenant/{job_id}" in capsys.readouterr().out
    assert f"fl-tenant/{job_id}" not in admin.request("GET", "/admin/v2/namespaces/fl-tenant")

    doctor = ["doctor", "--backend", "pulsar", "--option", f"service_url={secure.service_url}",
              "--option", f"admin_url={secure.admin_url}", "--option", f"token={wrong_token(secure)}"]  # fmt: skip
    assert fedtransport_cli(doctor) == 1
    out = capsys.readouterr().out
    assert "FAIL  admin API" in out and "rejected the token (HTTP 401)" in out and "fix: --option token=" in out
    assert "skip  round trip" in out, out


def test_a_certificate_from_another_ca_is_refused(secure, job_id, other_ca):
    with pytest.raises(ft.BackendError, match=r"TLS handshake .* failed: (unable to get local issuer|certificate)"):
        connect(job_id, GUEST, {**tls_options(secure, tls_trust_certs_file_path=other_ca), "admin_url": None})
    with pytest.raises(ft.BackendError, match="CERTIFICATE_VERIFY_FAILED"):
        PulsarAdmin(secure.admin_url_tls, token=secure.admin_token, tls_trust_certs_file_path=other_ca).get_clusters()
    with pytest.raises(ft.BackendError, match="CERTIFICATE_VERIFY_FAILED"):  # no trust file: the system's CAs
        PulsarAdmin(secure.admin_url_tls, token=secure.admin_token).get_clusters()


def test_a_host_name_the_certificate_does_not_carry_is_refused(secure, job_id):
    """``localhost`` is the same broker, but not a name in its certificate."""
    with pytest.raises(ft.BackendError, match="Hostname mismatch"):
        connect(job_id, GUEST, {**tls_options(secure, host="localhost"), "admin_url": None})
    with pytest.raises(ft.BackendError, match="Hostname mismatch"):
        PulsarAdmin(f"https://localhost:{secure.web_tls_port}", token=secure.admin_token,
                    tls_trust_certs_file_path=secure.tls_trust_certs_file_path).get_clusters()  # fmt: skip
    # Without the name check the chain is still verified, and everything works.
    relaxed = tls_options(secure, host="localhost", tls_validate_hostname=False)
    with connect(job_id, GUEST, relaxed) as g:
        g.remote("over localhost", "x", "0", [GUEST])
        assert g.get("x", "0", [GUEST], timeout=60) == ["over localhost"]
    g.cleanup()
    assert namespace_gone(secure, job_id)


# ---------------------------------------------------------------------------- direct mode, two brokers
def test_direct_mode_produces_to_the_destination_broker(secure, pulsar_standalone, job_id):
    """Guest's broker is the session's plain one, host's is this module's (plain port, token);
    each party produces into the other's broker and consumes from its own."""
    plain = pulsar_standalone
    routes = {
        "9999": {"host": "127.0.0.1", "port": plain.port, "cluster": plain.cluster},
        "10000": {"host": "127.0.0.1", "port": secure.port, "cluster": secure.cluster},
    }
    common = {"mode": "direct", "token": secure.admin_token}  # the plain broker ignores the token
    g = connect(job_id, GUEST, {"service_url": plain.service_url, "admin_url": plain.admin_url, **common},
                route_table=routes)  # fmt: skip
    try:
        # Host has not connected yet: its namespace is not on its broker, so guest's producer
        # waits for it; the table is sent meanwhile.
        sent: dict[str, Any] = {}
        table = ft.Table.from_partitions([[(i, i * i)] for i in range(4)])
        t = threading.Thread(target=lambda: sent.update(done=g.remote(table, "t", "0", [HOST])))
        t.start()
        h = connect(job_id, HOST, {"service_url": secure.service_url, "admin_url": secure.admin_url, **common},
                    route_table=routes)  # fmt: skip
        with h:
            h.remote(np.arange(10), "x", "0", [GUEST])
            assert np.array_equal(g.get("x", "0", [HOST], timeout=60)[0], np.arange(10))
            assert h.get("t", "0", [GUEST], timeout=120)[0] == table
            t.join(60)
            assert "done" in sent
        # guest -> host traffic lives on host's broker only, and the other way round
        on_secure = secure.admin("GET", f"/admin/v2/persistent/fl-tenant/{job_id}")
        on_plain = plain.admin("GET", f"/admin/v2/persistent/fl-tenant/{job_id}")
        assert {t.rsplit("/", 1)[1].rsplit("-", 1)[0] for t in on_secure} == {"guest-9999-host-10000"}
        assert {t.rsplit("/", 1)[1].rsplit("-", 1)[0] for t in on_plain} == {"host-10000-guest-9999"}
        h.cleanup()
    finally:
        g.close()
        g.cleanup()
    assert namespace_gone(secure, job_id) and namespace_gone(plain, job_id)
