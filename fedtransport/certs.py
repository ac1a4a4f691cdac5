"""A private CA and TLS certificates for a federation, made with ``cryptography``.

This replaces the ``openssl`` walk-through of FATE's Pulsar star network (CA, then one
certificate per party named ``{party_id}.{domain}``, then one for the SNI proxy at the centre)
with a few function calls::

    from fedtransport import certs

    star = certs.make_star("./certs", "fate.org", ["9999", "10000"])
    star.ca_cert                    # certs/ca.cert.pem       -> tlsTrustCertsFilePath
    star.parties["9999"].cert       # certs/9999.fate.org/broker.cert.pem
    star.parties["9999"].key        # certs/9999.fate.org/broker.key-pk8.pem (PKCS#8, 0600)
    star.parties["9999"].combined   # certs/9999.fate.org/broker.pem (cert + key, for haproxy ``crt``)
    star.proxy.combined             # certs/proxy.fate.org/proxy.pem

Lower level: ``make_ca`` -> ``(key, cert)``, ``issue(ca_key, ca_cert, hostname, extra_sans=[...])``
-> ``(key, cert)``, ``write_key`` / ``write_cert`` / ``write_pem`` to store them, ``san_names(cert)``
to read back the names a certificate answers to. The command line wraps ``make_star``:
``fedtransport certs --domain fate.org --party 9999 --party 10000 --proxy proxy --out ./certs``.

Choices
  * EC P-256 keys by default (generated in microseconds, accepted by Pulsar, RabbitMQ, haproxy
    and Python's ``ssl``); ``key_type="rsa"`` gives RSA 2048.
  * Leaf certificates carry SAN DNS = the host name (or an IP SAN for an IP literal), plus any
    ``extra_sans`` (more DNS names or IP addresses: ``localhost``, a broker's LAN address), CN =
    the host name, EKU serverAuth and/or clientAuth, and the key identifiers strict X.509
    verification (Python >= 3.13's default) insists on.
  * Private keys are PKCS#8 PEM without a passphrase, created with mode 0600 (never widened and
    then narrowed), and replaced atomically so a reader never sees half a key.
  * ``make_star`` reuses ``ca.cert.pem`` / ``ca.key.pem`` when both already exist in ``out_dir``,
    so parties can be added later under the same trust root; it never overwrites a CA key.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ConfigError

__all__ = [
    "CertPaths",
    "ExtraSans",
    "KeyType",
    "PrivateKey",
    "StarCerts",
    "issue",
    "load_ca",
    "make_ca",
    "make_star",
    "san_names",
    "validate_hostname",
    "write_cert",
    "write_key",
    "write_pem",
]

KeyType: TypeAlias = Literal["ec", "rsa"]
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
# make_star's extra names by party id, keyed by str or int ids: a Mapping's key type is invariant
ExtraSans: TypeAlias = Mapping[str, Iterable[str]] | Mapping[int, Iterable[str]] | Mapping[str | int, Iterable[str]]

_RSA_BITS = 2048
# Issued certificates start a little in the past so a peer whose clock lags still accepts them.
_BACKDATE = datetime.timedelta(minutes=5)
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_CN_MAX = 64  # ub-common-name: longer host names live only in the SAN


# ---------------------------------------------------------------------------- validation
def validate_hostname(hostname: str, *, what: str = "hostname", wildcard: bool = False) -> str:
    """Return ``hostname`` (lower-cased) if it is a DNS name or an IP literal; else ``ConfigError``.

    ``wildcard`` admits one leading ``*.`` label (``*.fate.org``).
    """
    if not isinstance(hostname, str):
        raise ConfigError(f"{what} must be a str, got {type(hostname).__name__}")
    try:
        return str(ipaddress.ip_address(hostname))
    except ValueError:
        pass
    name = hostname.lower()
    if not name or len(name) > 253:
        raise ConfigError(f"{what} {hostname!r} must be 1 to 253 characters")
    if not name.isascii():
        raise ConfigError(f"{what} {hostname!r} is not ASCII: give its IDNA form (xn--...)")
    labels = name.split(".")
    if wildcard and labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]
    for label in labels:
        if not _LABEL_RE.fullmatch(label):
            raise ConfigError(
                f"{what} {hostname!r} is not a valid host name: label {label!r} must be 1-63 letters, "
                "digits or '-' (not at either end), with no spaces"
            )
    return name


def _check_days(days: int, what: str) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days <= 0:
        raise ConfigError(f"{what} must be a positive number of days, got {days!r}")
    return days


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
    raise ConfigError(f"key_type must be 'ec' or 'rsa', got {key_type!r}")


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    # cryptography >= 42 has the aware attribute; older releases only the naive UTC one.
    aware: datetime.datetime | None = getattr(cert, "not_valid_after_utc", None)
    if aware is not None:
        return aware
    return cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# ---------------------------------------------------------------------------- CA and leaves
def make_ca(
    common_name: str = "fedtransport CA", days: int = 3650, *, key_type: KeyType = "ec"
) -> tuple[PrivateKey, x509.Certificate]:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    if not isinstance(common_name, str) or not 1 <= len(common_name) <= _CN_MAX or "\n" in common_name:
        raise ConfigError(f"CA common_name must be 1 to {_CN_MAX} characters on one line, got {common_name!r}")
    _check_days(days, "CA days")
    key = _new_key(key_type)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtransport"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    hostname: str,
    *,
    days: int = 825,
    server: bool = True,
    client: bool = True,
    key_type: KeyType = "ec",
    extra_sans: Iterable[str] = (),
) -> tuple[PrivateKey, x509.Certificate]:
    """A new key and a certificate for ``hostname`` signed by the CA.

    SAN = DNS ``hostname`` (IP for an IP literal) followed by ``extra_sans`` (DNS names or IP
    addresses, duplicates dropped), CN = ``hostname``, EKU serverAuth and/or clientAuth. The
    certificate never outlives the CA that signs it.
    """
    name = validate_hostname(hostname, wildcard=True)
    sans = _general_names([name, *_check_extra_sans(extra_sans)])
    _check_days(days, "certificate days")
    if not (server or client):
        raise ConfigError("issue() needs server=True or client=True: a certificate for neither is useless")
    try:
        is_ca = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"{ca_cert.subject.rfc4514_string()} is not a CA certificate (basicConstraints CA:FALSE)")
    if _public_der(ca_key.public_key()) != _public_der(ca_cert.public_key()):
        raise ConfigError("ca_key does not belong to ca_cert")

    key = _new_key(key_type)
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_after = min(now + datetime.timedelta(days=days), _not_after(ca_cert))
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, name)] if len(name) <= _CN_MAX else []
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                # RSA key exchange (TLS 1.2 without ECDHE) encrypts to the key; EC keys never do.
                key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        # An empty subject makes the SAN the only identity, and then it must be critical.
        .add_extension(x509.SubjectAlternativeName(sans), critical=not subject)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _check_extra_sans(extra_sans: Iterable[str]) -> list[str]:
    if isinstance(extra_sans, (str, bytes)):
        # A lone string would otherwise be split into one SAN per character.
        raise ConfigError(f"extra_sans must be a list of names, got the string {extra_sans!r}")
    return [validate_hostname(n, what="extra SAN", wildcard=True) for n in extra_sans]


def _general_names(names: Iterable[str]) -> list[x509.GeneralName]:
    """DNS or IP SAN entries for already validated names, in order, without duplicates."""
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(n))
        except ValueError:
            entry = x509.DNSName(n)
        if entry not in out:
            out.append(entry)
    return out


def san_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate answers to (its SAN), in order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in san if isinstance(n, (x509.DNSName, x509.IPAddress))]


# ---------------------------------------------------------------------------- files
def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _atomic_write(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a new file created with ``mode``, then rename it over ``path``.

    Creating the file with its final mode means a key is never readable by others, not even
    for an instant; the rename means readers see the old file or the new one, never a mix.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_pem(path: str | os.PathLike[str], *items: x509.Certificate | PrivateKey) -> Path:
    """Write certificates and keys, in the given order, to one PEM file.

    The file is 0600 when it holds a private key, else 0644 (both less the umask).
    """
    if not items:
        raise ConfigError(f"write_pem({os.fspath(path)!r}) was given nothing to write")
    chunks = []
    private = False
    for item in items:
        if isinstance(item, x509.Certificate):
            chunks.append(item.public_bytes(serialization.Encoding.PEM))
        elif isinstance(item, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            chunks.append(_key_pem(item))
            private = True
        else:
            raise ConfigError(f"write_pem cannot write a {type(item).__name__}: give certificates or private keys")
    return _atomic_write(Path(path), b"".join(chunks), 0o600 if private else 0o644)


def write_key(path: str | os.PathLike[str], key: PrivateKey) -> Path:
    """A private key as unencrypted PKCS#8 PEM (what Pulsar brokers want), mode 0600."""
    return write_pem(path, key)


def write_cert(path: str | os.PathLike[str], *certs: x509.Certificate) -> Path:
    """One or more certificates (leaf first, then its chain), mode 0644."""
    return write_pem(path, *certs)


def load_ca(cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> tuple[PrivateKey, x509.Certificate]:
    """Read a CA written by ``make_star`` / ``write_pem`` back: ``(key, cert)``."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load the CA from {os.fspath(cert_path)} and {os.fspath(key_path)}: {exc}") from exc
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ConfigError(f"{os.fspath(key_path)} holds a {type(key).__name__}; only EC and RSA keys are supported")
    return key, cert


# ---------------------------------------------------------------------------- star network
@dataclass(frozen=True)
class CertPaths:
    """Where one host's certificate, key and haproxy-style combined file are."""

    hostname: str
    cert: Path
    key: Path
    combined: Path
    #: every name the certificate answers to: ``hostname`` first, then the extra SANs
    sans: tuple[str, ...] = ()


@dataclass(frozen=True)
class StarCerts:
    """What ``make_star`` wrote. ``parties`` maps party id -> its broker's files."""

    out_dir: Path
    domain: str
    ca_cert: Path
    ca_key: Path
    parties: dict[str, CertPaths]
    proxy: CertPaths

    def hostname(self, party_id: str | int) -> str:
        return f"{party_id}.{self.domain}"


def _write_host(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    directory: Path,
    hostname: str,
    stem: str,
    key_name: str,
    days: int,
    key_type: KeyType,
    extra_sans: Sequence[str] = (),
) -> CertPaths:
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = issue(ca_key, ca_cert, hostname, days=days, key_type=key_type, extra_sans=extra_sans)
    return CertPaths(
        hostname=hostname,
        sans=tuple(san_names(cert)),
        cert=write_cert(directory / f"{stem}.cert.pem", cert),
        key=write_key(directory / key_name, key),
        # haproxy's ``crt`` wants the certificate and its key in one file.
        combined=write_pem(directory / f"{stem}.pem", cert, key),
    )


def make_star(
    out_dir: str | os.PathLike[str],
    domain: str,
    parties: Iterable[str | int],
    proxy: str = "proxy",
    *,
    key_type: KeyType = "ec",
    days: int = 825,
    ca_days: int = 3650,
    ca_common_name: str | None = None,
    extra_sans: ExtraSans | None = None,
) -> StarCerts:
    """Write the certificates of an SNI-proxy star network under ``out_dir``.

    ``extra_sans`` maps a party id (or the proxy name) to more names its certificate answers
    to, e.g. ``{"9999": ["192.168.0.4"], "proxy": ["proxy.example.com"]}``.

    Layout (``{h}`` = ``{party_id}.{domain}``, ``{p}`` = ``{proxy}.{domain}``)::

        ca.cert.pem  ca.key.pem (0600)
        {h}/broker.cert.pem  {h}/broker.key-pk8.pem (0600)  {h}/broker.pem (cert+key, 0600)
        {p}/proxy.cert.pem   {p}/proxy.key.pem (0600)       {p}/proxy.pem (cert+key, 0600)

    An existing ``ca.cert.pem`` + ``ca.key.pem`` pair in ``out_dir`` is reused.
    """
    domain = validate_hostname(domain, what="domain")
    ids = [str(p) for p in parties]
    for pid in [*ids, proxy]:
        if not isinstance(pid, str) or not _LABEL_RE.fullmatch(pid):
            raise ConfigError(
                f"party id {pid!r} cannot be a DNS label: use 1-63 letters, digits or '-' (not at either end)"
            )
    if len(set(ids)) != len(ids):
        raise ConfigError(f"duplicate party ids in {ids}")
    if proxy in ids:
        raise ConfigError(f"the proxy name {proxy!r} is also a party id")
    _check_days(days, "certificate days")
    extra = {str(k): _check_extra_sans(v) for k, v in (extra_sans or {}).items()}
    unknown = sorted(set(extra) - {*ids, proxy})
    if unknown:
        raise ConfigError(f"extra_sans names {unknown}, which are neither parties {ids} nor the proxy {proxy!r}")

    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"out_dir {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = root / "ca.cert.pem", root / "ca.key.pem"
    if ca_cert_path.exists() and ca_key_path.exists():
        ca_key, ca_cert = load_ca(ca_cert_path, ca_key_path)
    elif ca_cert_path.exists() or ca_key_path.exists():
        raise ConfigError(
            f"{root} holds only half a CA ({ca_cert_path.name} or {ca_key_path.name}); remove it or restore the other"
        )
    else:
        ca_key, ca_cert = make_ca(ca_common_name or f"{domain} CA", ca_days, key_type=key_type)
        write_key(ca_key_path, ca_key)
        write_cert(ca_cert_path, ca_cert)

    party_paths = {
        pid: _write_host(ca_key, ca_cert, root / f"{pid}.{domain}", f"{pid}.{domain}", "broker",
                         "broker.key-pk8.pem", days, key_type, extra.get(pid, ()))
        for pid in ids
    }  # fmt: skip
    proxy_paths = _write_host(ca_key, ca_cert, root / f"{proxy}.{domain}", f"{proxy}.{domain}", "proxy",
                              "proxy.key.pem", days, key_type, extra.get(proxy, ()))  # fmt: skip
    return StarCerts(
        out_dir=root, domain=domain, ca_cert=ca_cert_path, ca_key=ca_key_path, parties=party_paths, proxy=proxy_paths
    )
