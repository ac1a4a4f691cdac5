"""fedtransport.certs (private CA, star-network layout) and brokers.HAProxy (SNI router, TLS terminator)."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import socketserver
import ssl
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from party_proc import wait_for

import fedtransport as ft
from fedtransport import certs
from fedtransport.brokers.proxy import HAProxy
from fedtransport.errors import BackendError, ConfigError, FederationError

DOMAIN = "fate.test"
HAVE_HAPROXY = bool(shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin"))
needs_haproxy = pytest.mark.skipif(not HAVE_HAPROXY, reason="haproxy not installed (apt-get install -y haproxy)")
IO_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def star(tmp_path_factory: pytest.TempPathFactory) -> certs.StarCerts:
    return certs.make_star(tmp_path_factory.mktemp("star"), DOMAIN, ["9999", "10000"])


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that signed nothing we serve: clients trusting only it must fail verification."""
    _, cert = certs.make_ca("someone else's CA")
    return certs.write_cert(tmp_path_factory.mktemp("other") / "ca.cert.pem", cert)


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------- certs
def test_ca_verifies_issued_cert() -> None:
    ca_key, ca_cert = certs.make_ca()
    _, leaf = certs.issue(ca_key, ca_cert, "9999.fate.test")
    leaf.verify_directly_issued_by(ca_cert)
    # The full RFC 5280 path validation of cryptography's verifier, as a TLS client would do it.
    verification = pytest.importorskip("cryptography.x509.verification")
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([ca_cert]))
        .build_server_verifier(x509.DNSName("9999.fate.test"))
    )
    chain = verifier.verify(leaf, [])
    assert chain[-1] == ca_cert
    _, stranger = certs.make_ca("stranger")
    with pytest.raises(ValueError):  # issuer name differs
        leaf.verify_directly_issued_by(stranger)


def test_ca_extensions() -> None:
    _, ca = certs.make_ca("Party CA", days=30)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Party CA"
    assert ca.issuer == ca.subject
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)


def test_issue_san_cn_eku() -> None:
    ca_key, ca_cert = certs.make_ca()
    key, leaf = certs.issue(ca_key, ca_cert, "10000.Fate.Test", server=True, client=False)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "10000.fate.test"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["10000.fate.test"]
    assert san.get_values_for_type(x509.IPAddress) == []
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.issuer == ca_cert.subject

    _, both = certs.issue(ca_key, ca_cert, "9999.fate.test")
    eku = both.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_issue_ip_literal_gets_ip_san() -> None:
    ca_key, ca_cert = certs.make_ca()
    _, leaf = certs.issue(ca_key, ca_cert, "127.0.0.1")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == []
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "127.0.0.1"


def test_issue_rsa_option_and_validity() -> None:
    ca_key, ca_cert = certs.make_ca(key_type="rsa", days=10)
    key, leaf = certs.issue(ca_key, ca_cert, "proxy.fate.test", key_type="rsa", days=825)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    # A leaf never outlives its CA.
    assert leaf.not_valid_after_utc <= ca_cert.not_valid_after_utc
    leaf.verify_directly_issued_by(ca_cert)


@pytest.mark.parametrize("bad", ["bad host", "", "a..b", "-x.fate.test", "x_y.fate.test", "é.fate.test", "a" * 64])
def test_bad_hostname_is_config_error(bad: str) -> None:
    ca_key, ca_cert = certs.make_ca()
    with pytest.raises(ConfigError) as info:
        certs.issue(ca_key, ca_cert, bad)
    assert isinstance(info.value, FederationError)


def test_issue_rejects_bad_ca_and_arguments() -> None:
    ca_key, ca_cert = certs.make_ca()
    other_key, _ = certs.make_ca()
    with pytest.raises(ConfigError, match="does not belong"):
        certs.issue(other_key, ca_cert, "a.fate.test")
    leaf_key, leaf = certs.issue(ca_key, ca_cert, "a.fate.test")
    with pytest.raises(ConfigError, match="not a CA"):
        certs.issue(leaf_key, leaf, "b.fate.test")
    with pytest.raises(ConfigError):
        certs.issue(ca_key, ca_cert, "a.fate.test", days=0)
    with pytest.raises(ConfigError):
        certs.issue(ca_key, ca_cert, "a.fate.test", server=False, client=False)
    with pytest.raises(ConfigError):
        certs.make_ca(key_type="dsa")  # type: ignore[arg-type]


def test_key_files_are_0600_even_over_an_open_file(tmp_path: Path) -> None:
    key, cert = certs.make_ca()
    path = tmp_path / "k.pem"
    path.write_text("old, world-readable")
    path.chmod(0o644)
    certs.write_key(path, key)
    assert _mode(path) == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    combined = certs.write_pem(tmp_path / "c.pem", cert, key)
    assert _mode(combined) == 0o600
    cert_only = certs.write_cert(tmp_path / "cert.pem", cert)
    assert _mode(cert_only) & 0o077 != 0o077 and not _mode(cert_only) & 0o111
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ConfigError):
        certs.write_pem(tmp_path / "empty.pem")


def test_make_star_layout(star: certs.StarCerts) -> None:
    root = star.out_dir
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    expected = {"ca.cert.pem", "ca.key.pem"}
    for host in ("9999.fate.test", "10000.fate.test"):
        expected |= {f"{host}/broker.cert.pem", f"{host}/broker.key-pk8.pem", f"{host}/broker.pem"}
    expected |= {"proxy.fate.test/proxy.cert.pem", "proxy.fate.test/proxy.key.pem", "proxy.fate.test/proxy.pem"}
    assert files == expected
    for private in (star.ca_key, star.proxy.key, star.proxy.combined):
        assert _mode(private) == 0o600
    for paths in star.parties.values():
        assert _mode(paths.key) == 0o600 and _mode(paths.combined) == 0o600
        assert paths.key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
        text = paths.combined.read_text()
        assert text.index("BEGIN CERTIFICATE") < text.index("BEGIN PRIVATE KEY")

    assert set(star.parties) == {"9999", "10000"}
    assert star.hostname(9999) == "9999.fate.test"
    assert star.parties["9999"].cert == root / "9999.fate.test" / "broker.cert.pem"
    assert star.proxy.hostname == "proxy.fate.test"
    ca = _load_cert(star.ca_cert)
    for paths in [*star.parties.values(), star.proxy]:
        leaf = _load_cert(paths.cert)
        leaf.verify_directly_issued_by(ca)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [paths.hostname]


def test_make_star_reuses_ca_and_validates(tmp_path: Path) -> None:
    first = certs.make_star(tmp_path, DOMAIN, ["9999"])
    ca_pem = first.ca_cert.read_bytes()
    second = certs.make_star(tmp_path, DOMAIN, [10001])
    assert second.ca_cert.read_bytes() == ca_pem
    _load_cert(second.parties["10001"].cert).verify_directly_issued_by(_load_cert(first.ca_cert))
    with pytest.raises(ConfigError):
        certs.make_star(tmp_path / "x", DOMAIN, ["99 99"])
    with pytest.raises(ConfigError):
        certs.make_star(tmp_path / "x", DOMAIN, ["1", "1"])
    with pytest.raises(ConfigError):
        certs.make_star(tmp_path / "x", DOMAIN, ["proxy"])
    with pytest.raises(ConfigError):
        certs.make_star(tmp_path / "x", "bad domain", ["1"])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "ca.cert.pem").write_bytes(ca_pem)
    with pytest.raises(ConfigError, match="half a CA"):
        certs.make_star(tmp_path / "half", DOMAIN, ["1"])


# ---------------------------------------------------------------------------- echo servers
class _EchoServer(socketserver.ThreadingTCPServer):
    """Replies ``{name}:{line}`` to one line; TLS when given a context. Runs in its own thread."""

    daemon_threads = True
    block_on_close = True  # server_close() joins the handler threads

    def __init__(self, name: str, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.name = name
        self.tls = tls
        self.connections = 0
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name=f"echo-{name}", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def handle_error(self, request: object, client_address: object) -> None:
        # A refused handshake is expected in some tests: record it instead of printing a traceback.
        exc = sys.exc_info()[1]
        if exc is not None:
            self.errors.append(exc)

    def __enter__(self) -> _EchoServer:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(IO_TIMEOUT)
        assert not self._thread.is_alive()


class _EchoHandler(socketserver.BaseRequestHandler):
    server: _EchoServer

    def handle(self) -> None:
        self.server.connections += 1
        sock: socket.socket = self.request
        sock.settimeout(IO_TIMEOUT)
        if self.server.tls is not None:
            sock = self.server.tls.wrap_socket(sock, server_side=True)
        try:
            line = _read_line(sock)
            sock.sendall(f"{self.server.name}:".encode() + line)
        finally:
            if isinstance(sock, ssl.SSLSocket):
                sock.close()


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _server_ctx(paths: certs.CertPaths) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(paths.cert, paths.key)
    return ctx


def _client_ctx(cafile: Path, cert: certs.CertPaths | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    # Python >= 3.13 verifies strictly by default: our certificates must pass that too.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


def _talk(port: int, server_hostname: str, ctx: ssl.SSLContext, line: bytes = b"hello\n") -> tuple[bytes, dict]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        tls.sendall(line)
        reply = _read_line(tls)
        return reply, tls.getpeercert()


def _peer_cn(cert: dict) -> str:
    return dict(pair[0] for pair in cert["subject"])["commonName"]


@pytest.fixture
def party_servers(star: certs.StarCerts) -> Iterator[dict[str, _EchoServer]]:
    with (
        _EchoServer("9999", _server_ctx(star.parties["9999"])) as s9999,
        _EchoServer("10000", _server_ctx(star.parties["10000"])) as s10000,
    ):
        yield {"9999": s9999, "10000": s10000}


# ---------------------------------------------------------------------------- HAProxy: SNI router
@needs_haproxy
def test_sni_router_routes_by_server_name(
    star: certs.StarCerts, other_ca: Path, party_servers: dict[str, _EchoServer]
) -> None:
    routes = {star.hostname(pid): ("127.0.0.1", srv.port) for pid, srv in party_servers.items()}
    with HAProxy(sni_routes=routes) as router:
        assert router.running and router.host == "127.0.0.1"
        assert "req.ssl_sni -i '9999.fate.test'" in router.config_text
        assert router.config_path is not None and router.config_path.read_text() == router.config_text
        ctx = _client_ctx(star.ca_cert)
        for pid in ("9999", "10000"):
            reply, peer = _talk(router.port, f"{pid}.fate.test", ctx, f"hi {pid}\n".encode())
            assert reply == f"{pid}:hi {pid}\n".encode()
            # End-to-end TLS: the certificate seen through the proxy is the backend's own.
            assert _peer_cn(peer) == f"{pid}.fate.test"

        with pytest.raises(ssl.SSLCertVerificationError):
            _talk(router.port, "9999.fate.test", _client_ctx(other_ca))

        seen = {pid: srv.connections for pid, srv in party_servers.items()}
        with pytest.raises(OSError) as info:  # SSLEOFError or a reset: closed, never verified
            _talk(router.port, "nobody.fate.test", ctx)
        assert not isinstance(info.value, ssl.SSLCertVerificationError)
        assert {pid: srv.connections for pid, srv in party_servers.items()} == seen

        assert router.log is not None
        log_path = router.log

        def refused_logged() -> str:  # haproxy logs a session when it ends, which may trail our close
            text = log_path.read_text()
            return text if "<NOSRV>" in text else ""

        log = wait_for(refused_logged, "haproxy's <NOSRV> line")
        assert "be_0/s0" in log and "sni=9999.fate.test" in log
        pid = router.pid
    assert not router.running and router.pid is None and router.run_dir is None
    assert pid is not None and not Path(f"/proc/{pid}").exists()
    router.stop()  # idempotent


@needs_haproxy
def test_sni_router_closes_non_tls(star: certs.StarCerts, party_servers: dict[str, _EchoServer]) -> None:
    with HAProxy(sni_routes={"9999.fate.test": ("127.0.0.1", party_servers["9999"].port)}) as router:
        with socket.create_connection(router.address, timeout=IO_TIMEOUT) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert sock.recv(100) == b""
        assert party_servers["9999"].connections == 0


# ---------------------------------------------------------------------------- HAProxy: TLS terminator
@needs_haproxy
def test_tls_terminator(star: certs.StarCerts, other_ca: Path) -> None:
    with _EchoServer("plain") as plain:
        tls = {"backend": ("127.0.0.1", plain.port), "certfile": star.proxy.combined}
        with HAProxy(tls_terminate=tls) as proxy:
            assert f"ssl crt '{star.proxy.combined.resolve()}'" in proxy.config_text
            reply, peer = _talk(proxy.port, "proxy.fate.test", _client_ctx(star.ca_cert))
            assert reply == b"plain:hello\n"
            assert _peer_cn(peer) == "proxy.fate.test"
            with pytest.raises(ssl.SSLCertVerificationError) as info:
                _talk(proxy.port, "9999.fate.test", _client_ctx(star.ca_cert))
            assert info.value.verify_code == 62  # X509_V_ERR_HOSTNAME_MISMATCH
            with pytest.raises(ssl.SSLCertVerificationError):
                _talk(proxy.port, "proxy.fate.test", _client_ctx(other_ca))
        assert not proxy.running


@needs_haproxy
def test_tls_terminator_requires_client_cert_with_cafile(star: certs.StarCerts) -> None:
    with _EchoServer("plain") as plain:
        tls = {"backend": ("127.0.0.1", plain.port), "certfile": star.proxy.combined, "cafile": star.ca_cert}
        with HAProxy(tls_terminate=tls) as proxy:
            reply, _ = _talk(proxy.port, "proxy.fate.test", _client_ctx(star.ca_cert, star.parties["9999"]))
            assert reply == b"plain:hello\n"
            # TLS 1.3 reports the missing client certificate on the first read, as an alert.
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _talk(proxy.port, "proxy.fate.test", _client_ctx(star.ca_cert))


@needs_haproxy
def test_tls_terminator_ip_san(tmp_path: Path) -> None:
    ca_key, ca_cert = certs.make_ca()
    key, cert = certs.issue(ca_key, ca_cert, "127.0.0.1")
    combined = certs.write_pem(tmp_path / "ip.pem", cert, key)
    cafile = certs.write_cert(tmp_path / "ca.pem", ca_cert)
    with (
        _EchoServer("plain") as plain,
        HAProxy(tls_terminate={"backend": ("127.0.0.1", plain.port), "certfile": combined}) as proxy,
    ):
        reply, _ = _talk(proxy.port, "127.0.0.1", _client_ctx(cafile))
        assert reply == b"plain:hello\n"


# ---------------------------------------------------------------------------- HAProxy: errors
def test_haproxy_config_errors(star: certs.StarCerts, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        HAProxy()
    with pytest.raises(ConfigError, match="exactly one"):
        HAProxy(
            sni_routes={"a.fate.test": ("127.0.0.1", 1)},
            tls_terminate={"backend": ("127.0.0.1", 1), "certfile": star.proxy.combined},
        )
    with pytest.raises(ConfigError):
        HAProxy(sni_routes={"bad name": ("127.0.0.1", 1)})
    with pytest.raises(ConfigError, match="IP address"):
        HAProxy(sni_routes={"127.0.0.1": ("127.0.0.1", 1)})
    with pytest.raises(ConfigError, match="twice"):
        HAProxy(sni_routes={"a.fate.test": ("127.0.0.1", 1), "A.fate.test": ("127.0.0.1", 2)})
    with pytest.raises(ConfigError, match="port"):
        HAProxy(sni_routes={"a.fate.test": ("127.0.0.1", 70000)})
    with pytest.raises(ConfigError, match="unknown tls_terminate keys"):
        HAProxy(tls_terminate={"backend": ("127.0.0.1", 1), "certfile": star.proxy.combined, "key": "x"})
    with pytest.raises(ConfigError, match="does not exist"):
        HAProxy(tls_terminate={"backend": ("127.0.0.1", 1), "certfile": tmp_path / "missing.pem"})
    with pytest.raises(ConfigError, match="needs 'certfile'"):
        HAProxy(tls_terminate={"backend": ("127.0.0.1", 1)})


def test_haproxy_not_installed(tmp_path: Path) -> None:
    proxy = HAProxy(sni_routes={"a.fate.test": ("127.0.0.1", 1)}, binary=tmp_path / "haproxy")
    with pytest.raises(BackendError, match="apt-get install -y haproxy"):
        proxy.start()
    assert not proxy.running and proxy.run_dir is None


@needs_haproxy
def test_haproxy_start_failure_has_log_tail(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    proxy = HAProxy(tls_terminate={"backend": ("127.0.0.1", 1), "certfile": garbage})
    with pytest.raises(BackendError, match="ALERT") as info:
        proxy.start()
    assert "haproxy" in str(info.value)
    assert not proxy.running and proxy.run_dir is None


@needs_haproxy
def test_haproxy_port_taken() -> None:
    routes = {"a.fate.test": ("127.0.0.1", 1)}
    proxy = HAProxy(sni_routes=routes)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", proxy.port))
        squatter.listen()
        taken = proxy.port
        # A picked port that someone took meanwhile: a new one is picked, not a false "ready".
        with proxy:
            assert proxy.port != taken and proxy.running
        # A port the caller chose is not changed behind their back.
        fixed = HAProxy(sni_routes=routes, port=taken)
        with pytest.raises(BackendError, match="cannot bind"):
            fixed.start()
        assert not fixed.running and fixed.run_dir is None


def test_lazy_export() -> None:
    assert ft.brokers.HAProxy is HAProxy
    assert "HAProxy" in ft.brokers.__all__
