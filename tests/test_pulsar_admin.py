"""PulsarAdmin against a stateful fake of the Pulsar admin REST v2 API."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from pulsar_admin_fake import FakePulsarAdmin

from fedtransport.errors import BackendError, ConfigError
from fedtransport.transport.pulsar_admin import PulsarAdmin

CLUSTER_A = {
    "serviceUrl": "http://party-a.fate.test:8080",
    "serviceUrlTls": "https://party-a.fate.test:8443",
    "brokerServiceUrl": "pulsar://party-a.fate.test:6650",
    "brokerServiceUrlTls": "pulsar+ssl://party-a.fate.test:6651",
    "proxyServiceUrl": "pulsar+ssl://proxy.fate.test:443",
    "proxyProtocol": "SNI",
    "peerClusterNames": [],
}


@pytest.fixture
def fake() -> Iterator[FakePulsarAdmin]:
    with FakePulsarAdmin() as server:
        yield server


@pytest.fixture
def admin(fake: FakePulsarAdmin) -> PulsarAdmin:
    return PulsarAdmin(fake.url, timeout=5.0)


def _setup_namespace(admin: PulsarAdmin) -> None:
    admin.ensure_cluster("party-a", CLUSTER_A)
    admin.ensure_tenant("fl-tenant", ["party-a"])
    admin.create_namespace("fl-tenant", "job-1")


def test_cluster_put_then_post_when_it_exists(fake: FakePulsarAdmin, admin: PulsarAdmin) -> None:
    assert admin.ensure_cluster("party-a", CLUSTER_A) is True
    updated = {**CLUSTER_A, "brokerServiceUrl": "pulsar://party-a.fate.test:6660"}
    assert admin.ensure_cluster("party-a", updated) is False
    assert fake.calls() == [
        ("PUT", "/admin/v2/clusters/party-a"),
        ("PUT", "/admin/v2/clusters/party-a"),
        ("POST", "/admin/v2/clusters/party-a"),
    ]
    assert fake.requests[0].body == CLUSTER_A
    assert fake.requests[0].headers["content-type"] == "application/json"
    assert fake.requests[2].body == updated
    assert fake.state.clusters["party-a"]["brokerServiceUrl"] == "pulsar://party-a.fate.test:6660"
    assert admin.get_clusters() == ["party-a"]
    assert admin.get_cluster("party-a") == updated
    assert admin.get_cluster("nope") is None


def test_cluster_none_values_are_not_sent(fake: FakePulsarAdmin, admin: PulsarAdmin) -> None:
    admin.ensure_cluster("party-b", {"serviceUrl": "http://b:8080", "proxyServiceUrl": None})
    assert fake.requests[0].body == {"serviceUrl": "http://b:8080"}


def test_tenant_create_and_extend(fake: FakePulsarAdmin, admin: PulsarAdmin) -> None:
    admin.ensure_cluster("party-a", CLUSTER_A)
    admin.ensure_cluster("party-b", {"serviceUrl": "http://b:8080"})
    fake.clear()
    assert admin.ensure_tenant("fl-tenant", ["party-a"]) is True
    assert fake.requests[0].method == "PUT"
    assert fake.requests[0].path == "/admin/v2/tenants/fl-tenant"
    assert fake.requests[0].body == {"adminRoles": [], "allowedClusters": ["party-a"]}
    fake.clear()
    # Already there with everything allowed: nothing to update.
    assert admin.ensure_tenant("fl-tenant", ["party-a"]) is False
    assert fake.calls() == [("PUT", "/admin/v2/tenants/fl-tenant"), ("GET", "/admin/v2/tenants/fl-tenant")]
    fake.clear()
    # A party joining later: its cluster is added, the existing one kept.
    assert admin.ensure_tenant("fl-tenant", ["party-b"]) is False
    assert fake.calls()[-1] == ("POST", "/admin/v2/tenants/fl-tenant")
    assert fake.requests[-1].body == {"adminRoles": [], "allowedClusters": ["party-a", "party-b"]}


def test_namespace_lifecycle_paths_and_bodies(fake: FakePulsarAdmin, admin: PulsarAdmin) -> None:
    _setup_namespace(admin)
    assert admin.create_namespace("fl-tenant", "job-1") is False  # 409 = exists = fine
    fake.clear()
    admin.set_replication_clusters("fl-tenant", "job-1", ["party-a"])
    admin.set_retention("fl-tenant", "job-1", 60, 1024)
    admin.set_message_ttl("fl-tenant", "job-1", 86400)
    admin.set_publish_rate("fl-tenant", "job-1", 1000, 64 * 1024 * 1024)
    base = "/admin/v2/namespaces/fl-tenant/job-1"
    assert [(r.method, r.path, r.body) for r in fake.requests] == [
        ("POST", f"{base}/replication", ["party-a"]),
        ("POST", f"{base}/retention", {"retentionTimeInMinutes": 60, "retentionSizeInMB": 1024}),
        ("POST", f"{base}/messageTTL", 86400),
        (
            "POST",
            f"{base}/publishRate",
            {"publishThrottlingRateInMsg": 1000, "publishThrottlingRateInByte": 64 * 1024 * 1024},
        ),
    ]
    policies = admin.get_namespace_policies("fl-tenant", "job-1")
    assert policies["message_ttl_in_seconds"] == 86400
    assert policies["replication_clusters"] == ["party-a"]


def test_create_namespace_sends_no_body_unless_policies(fake: FakePulsarAdmin, admin: PulsarAdmin) -> None:
    _setup_namespace(admin)
    put = [r for r in fake.requests if r.method == "PUT" and r.path.startswith("/admin/v2/namespaces/")]
    assert put[0].body is None
    admin.create_namespace("fl-tenant", "job-2", {"replication_clusters": ["party-a"]})
    assert fake.requests[-1].body == {"replication_clusters": ["party-a"]}


def test_topics_list_and_idempotent_deletes(fake: FakePulsarAdmin, admin: PulsarAdmin) -> None:
    _setup_namespace(admin)
    topics = [f"persistent://fl-tenant/job-1/guest-9999-host-10000-{lane}" for lane in range(2)]
    for t in topics:
        fake.add_topic(t)
    assert admin.list_topics("fl-tenant", "job-1") == topics
    fake.clear()
    assert admin.delete_topic(topics[0]) is True
    assert admin.delete_topic(topics[0]) is False  # 404 = already gone
    assert [(r.method, r.path, r.query) for r in fake.requests] == [
        ("DELETE", "/admin/v2/persistent/fl-tenant/job-1/guest-9999-host-10000-0", {"force": "true"}),
    ] * 2
    assert admin.delete_namespace("fl-tenant", "job-1") is True
    assert fake.requests[-1].path == "/admin/v2/namespaces/fl-tenant/job-1"
    assert fake.requests[-1].query == {"force": "true"}
    assert fake.state.topics == set()
    assert admin.delete_namespace("fl-tenant", "job-1") is False  # idempotent
    assert admin.delete_tenant("fl-tenant") is True
    assert admin.delete_tenant("fl-tenant") is False
    assert admin.delete_cluster("party-a") is True
    assert admin.delete_cluster("party-a") is False


def test_delete_topic_short_name_and_bad_names(fake: FakePulsarAdmin, admin: PulsarAdmin) -> None:
    _setup_namespace(admin)
    fake.add_topic("persistent://fl-tenant/job-1/lane-0")
    assert admin.delete_topic("fl-tenant/job-1/lane-0") is True
    with pytest.raises(ConfigError):
        admin.delete_topic("just-a-topic")
    with pytest.raises(ConfigError):
        admin.create_namespace("fl/tenant", "job-1")


def test_delete_namespace_when_force_is_refused(admin: PulsarAdmin) -> None:
    with FakePulsarAdmin(allow_force_delete=False) as strict:
        a = PulsarAdmin(strict.url)
        a.ensure_cluster("party-a", CLUSTER_A)
        a.ensure_tenant("fl-tenant", ["party-a"])
        a.create_namespace("fl-tenant", "job-1")
        strict.add_topic("persistent://fl-tenant/job-1/lane-0")
        strict.clear()
        assert a.delete_namespace("fl-tenant", "job-1") is True
        assert strict.calls() == [
            ("DELETE", "/admin/v2/namespaces/fl-tenant/job-1"),
            ("GET", "/admin/v2/namespaces/fl-tenant/job-1/topics"),
            ("DELETE", "/admin/v2/persistent/fl-tenant/job-1/lane-0"),
            ("DELETE", "/admin/v2/namespaces/fl-tenant/job-1"),
        ]
        assert strict.requests[-1].query == {}
        assert strict.state.namespaces == {}


def test_bearer_token_is_sent() -> None:
    with FakePulsarAdmin(token="jwt-abc") as secured:
        with pytest.raises(BackendError) as info:
            PulsarAdmin(secured.url).get_clusters()
        assert info.value.status == 401
        assert info.value.broker_message == "Authentication required"
        assert PulsarAdmin(secured.url, token="jwt-abc").get_clusters() == []
        assert secured.requests[-1].headers["authorization"] == "Bearer jwt-abc"
        assert PulsarAdmin(secured.url, token="token:jwt-abc").get_clusters() == []


def test_token_from_file(tmp_path: Path) -> None:
    token_file = tmp_path / "admin.jwt"
    token_file.write_text("jwt-from-file\n")
    with FakePulsarAdmin(token="jwt-from-file") as secured:
        assert PulsarAdmin(secured.url, token=f"file://{token_file}").get_clusters() == []


def test_error_carries_status_and_reason(fake: FakePulsarAdmin, admin: PulsarAdmin) -> None:
    with pytest.raises(BackendError) as info:
        admin.set_message_ttl("fl-tenant", "missing", 60)
    err = info.value
    assert err.status == 404
    assert err.broker_message == "Namespace does not exist"
    assert "POST /admin/v2/namespaces/fl-tenant/missing/messageTTL" in str(err)
    assert "404" in str(err) and "Namespace does not exist" in str(err)

    fake.fail("GET", "/admin/v2/clusters", 500, "Internal error: metadata store down")
    with pytest.raises(BackendError) as info:
        admin.get_clusters()
    assert info.value.status == 500
    assert info.value.broker_message == "Internal error: metadata store down"


def test_tolerated_statuses_only_for_the_right_calls(fake: FakePulsarAdmin, admin: PulsarAdmin) -> None:
    # 409 is fine for create_namespace, but a 409 on delete (namespace not empty) is an error.
    _setup_namespace(admin)
    fake.fail("DELETE", "/admin/v2/namespaces/fl-tenant/job-1", 409, "Cannot delete non empty namespace")
    with pytest.raises(BackendError) as info:
        admin.delete_namespace("fl-tenant", "job-1")
    assert info.value.status == 409
    # And a 404 on create (tenant missing) is an error too.
    with pytest.raises(BackendError) as info:
        admin.create_namespace("no-tenant", "job-1")
    assert info.value.status == 404
    assert info.value.broker_message == "Tenant does not exist"


def test_redirect_is_followed_with_method_body_and_token() -> None:
    with FakePulsarAdmin(token="t0k") as server:
        a = PulsarAdmin(server.url, token="t0k")
        a.ensure_cluster("party-a", CLUSTER_A)
        a.ensure_tenant("fl-tenant", ["party-a"])
        a.create_namespace("fl-tenant", "job-1")
        server.redirect_once("POST", "/admin/v2/namespaces/fl-tenant/job-1/messageTTL")
        server.clear()
        a.set_message_ttl("fl-tenant", "job-1", 120)
        first, second = server.requests
        assert (second.method, second.path, second.body) == ("POST", first.path, 120)
        assert second.query == {"redirected": "1"}
        assert second.headers["authorization"] == "Bearer t0k"
        assert server.state.namespaces["fl-tenant/job-1"]["message_ttl_in_seconds"] == 120


def test_connection_refused_names_the_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        admin = PulsarAdmin(f"http://127.0.0.1:{port}", timeout=2.0)
        with pytest.raises(BackendError) as info:
            admin.get_clusters()
    assert f"http://127.0.0.1:{port}" in str(info.value)
    assert info.value.status is None


def test_bad_configuration() -> None:
    with pytest.raises(ConfigError):
        PulsarAdmin("127.0.0.1:8080")
    with pytest.raises(ConfigError):
        PulsarAdmin("https://127.0.0.1:8443", tls_trust_certs_file_path="/nonexistent/ca.pem")
    with pytest.raises(ConfigError):
        PulsarAdmin("http://127.0.0.1:8080", timeout=0)


def test_https_trust_file_and_hostname_validation(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    ca_file, server_context = _tls_material(tmp_path, "admin.fate.test")
    with FakePulsarAdmin(ssl_context=server_context) as tls:
        # The certificate names admin.fate.test, the URL says 127.0.0.1.
        with pytest.raises(BackendError) as info:
            PulsarAdmin(tls.url, tls_trust_certs_file_path=str(ca_file), timeout=5.0).get_clusters()
        assert tls.url in str(info.value)
        relaxed = PulsarAdmin(tls.url, tls_trust_certs_file_path=str(ca_file), tls_validate_hostname=False, timeout=5.0)
        assert relaxed.get_clusters() == []
        # Without the trust file the chain itself is rejected, hostname check or not.
        with pytest.raises(BackendError):
            PulsarAdmin(tls.url, tls_validate_hostname=False, timeout=5.0).get_clusters()


def _tls_material(tmp_path: Path, host: str) -> tuple[Path, ssl.SSLContext]:
    """A CA file and a server context whose certificate (signed by that CA) names ``host``."""
    from fedtransport import certs  # needs cryptography: imported after the importorskip

    ca_key, ca_cert = certs.make_ca("fedtransport test CA")
    key, cert = certs.issue(ca_key, ca_cert, host)
    ca_file = certs.write_cert(tmp_path / "ca.pem", ca_cert)
    server_pem = certs.write_pem(tmp_path / "server.pem", cert, key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_pem)
    return ca_file, context
