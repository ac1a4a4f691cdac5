"""Pulsar TLS and token options, as far as pulsar-lite lets them be exercised.

pulsar-lite has no TLS listener, so TLS is terminated by haproxy in front of it. The TLS
handshake, certificate trust and host-name validation are real; what pulsar-lite cannot do is
advertise a ``pulsar+ssl://`` address in its lookup answers, so producing and consuming through
the terminator stop at the first topic lookup (docs/pulsar.md says what was and was not run).
``Federation.connect`` makes one round trip to the broker, and that is what these tests check.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GUEST, HOST
from pulsar_admin_fake import FakePulsarAdmin

import fedtransport as ft
from fedtransport import certs
from fedtransport.brokers import EmbeddedPulsar, HAProxy


@pytest.fixture(scope="module")
def tls_front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedPulsar, HAProxy, Path, Path]]:
    d = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert = certs.make_ca("test CA")
    key, cert = certs.issue(ca_key, ca_cert, "localhost")
    combined = certs.write_pem(d / "localhost.pem", cert, key)
    ca_file = certs.write_cert(d / "ca.cert.pem", ca_cert)
    _, other_ca = certs.make_ca("someone else's CA")
    wrong_ca = certs.write_cert(d / "wrong-ca.cert.pem", other_ca)
    with EmbeddedPulsar() as broker:
        front = {"backend": (broker.host, broker.port), "certfile": combined}
        with HAProxy(tls_terminate=front) as proxy:
            yield broker, proxy, ca_file, wrong_ca


def tls_connect(job_id: str, url: str, ca: Path, **options) -> ft.Federation:
    opts = {"service_url": url, "tls_trust_certs_file_path": str(ca), "client": {"operation_timeout_seconds": 5}}
    return ft.Federation.connect("pulsar", job_id=job_id, party=GUEST, options={**opts, **options})


def test_tls_handshake_with_the_right_ca_and_host_name(tls_front, job_id):
    _, proxy, ca, _ = tls_front
    with tls_connect(job_id, f"pulsar+ssl://localhost:{proxy.port}", ca) as fed:
        assert fed.backend == "pulsar"


def test_tls_refused_with_a_wrong_ca(tls_front, job_id):
    _, proxy, _, wrong_ca = tls_front
    with pytest.raises(ft.BackendError, match=f"localhost:{proxy.port}"):
        tls_connect(job_id, f"pulsar+ssl://localhost:{proxy.port}", wrong_ca)


def test_tls_refused_when_the_host_name_does_not_match(tls_front, job_id):
    _, proxy, ca, _ = tls_front
    # the certificate names "localhost"; 127.0.0.1 is the same server under a name it does not carry
    with pytest.raises(ft.BackendError):
        tls_connect(job_id, f"pulsar+ssl://127.0.0.1:{proxy.port}", ca)
    with tls_connect(job_id, f"pulsar+ssl://127.0.0.1:{proxy.port}", ca, tls_validate_hostname=False):
        pass  # the chain is still verified; only the name check is off


def test_token_goes_to_the_broker_and_the_admin_api(tls_front, job_id):
    broker = tls_front[0]
    with FakePulsarAdmin(token="s3cr3t.jwt") as fake:
        fake.state.clusters["standalone"] = {}
        opts = {"service_url": broker.service_url, "admin_url": fake.url, "token": "s3cr3t.jwt"}
        with ft.Federation.connect("pulsar", job_id=job_id, party=GUEST, options=opts) as g, \
             ft.Federation.connect("pulsar", job_id=job_id, party=HOST, options=opts) as h:  # fmt: skip
            g.remote(b"with a token", "x", "0", [HOST])
            assert h.get("x", "0", [GUEST], timeout=30) == [b"with a token"]
        sent = {{k.lower(): v for k, v in r.headers.items()}.get("authorization") for r in fake.requests}
        assert sent == {"Bearer s3cr3t.jwt"}
        with pytest.raises(ft.BackendError, match="401"):
            ft.Federation.connect("pulsar", job_id=job_id + "x", party=GUEST,
                                  options={**opts, "token": "wrong"})  # fmt: skip
        g.cleanup()
