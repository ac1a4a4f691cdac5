"""Party identities and pair keys: X25519 key agreement between the two parties of a direction.

With one job ``secret`` every party can compute every direction's key, so sealing cannot tell
which party wrote a frame. With identities, each party holds a long-term X25519 private key
(option ``identity``) and publishes its public key (route table ``public_key``, or the option
``peer_keys``). The two parties of a pair, and only they, compute the same Diffie-Hellman
value, from which HKDF-SHA256 derives the *pair key*, bound to the job id, the two parties
(role and id) and, when set, the job secret. Sealing keys (codec/seal.py) and RabbitMQ
federation link passwords are derived from the pair key, so a third party of the same job
can compute neither.

A public key is written as the unpadded or padded base64 of its raw 32 bytes.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ConfigError
from .party import Party

__all__ = [
    "PairKeys",
    "X25519PrivateKey",
    "X25519PublicKey",
    "new_identity",
    "pair_keys",
    "parse_identity",
    "parse_peer_keys",
    "parse_public_key",
    "public_key_text",
]

_PAIR_SALT = b"fedtransport/pair/v1"


def parse_identity(value: Any) -> X25519PrivateKey:
    """This party's private key: a key object, a path to its PEM file, PEM text, or the raw 32 bytes.

    Raises ``ValueError`` saying what is wrong (the option spec turns it into a ConfigError).
    """
    if isinstance(value, X25519PrivateKey):
        return value
    if isinstance(value, bytes) and len(value) == 32:
        return X25519PrivateKey.from_private_bytes(value)
    if isinstance(value, str) and not value.lstrip().startswith("-----BEGIN"):
        value = Path(value)
    if isinstance(value, Path):
        try:
            value = value.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {value}: {exc.strerror or exc}") from None
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes):
        raise ValueError(f"not a key, a path or bytes but {type(value).__name__}")
    try:
        key = serialization.load_pem_private_key(value, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, X25519PrivateKey):
        raise ValueError(f"a {type(key).__name__}, not an X25519 private key")
    return key


def parse_public_key(value: Any) -> X25519PublicKey:
    """A peer's public key: a key object, the raw 32 bytes, or their base64 text."""
    if isinstance(value, X25519PublicKey):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            value = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not base64") from None
    if not isinstance(value, bytes) or len(value) != 32:
        raise ValueError("not the 32 bytes of an X25519 public key")
    return X25519PublicKey.from_public_bytes(value)


def parse_peer_keys(value: Any) -> dict[str, X25519PublicKey]:
    """The ``peer_keys`` option: party id -> public key."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("not a mapping of party ids")
    out: dict[str, X25519PublicKey] = {}
    for pid, key in value.items():
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise ValueError(f"party id {pid!r} is not a str or int")
        try:
            out[str(pid)] = parse_public_key(key)
        except ValueError as exc:
            raise ValueError(f"party {pid}: {exc}") from None
    return out


def public_key_text(key: X25519PrivateKey | X25519PublicKey) -> str:
    """The base64 text a route table's ``public_key`` holds."""
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def new_identity(path: Path) -> X25519PrivateKey:
    """Write a fresh private key to ``path`` (PEM, mode 0600; an existing file is refused)."""
    key = X25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists: refusing to overwrite a private key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def pair_keys(
    job_id: str,
    me: Party,
    identity: X25519PrivateKey | None,
    peer_keys: Mapping[str, X25519PublicKey],
    listed: Mapping[str, X25519PublicKey],
    secret: bytes | None,
    *,
    source: str = "",
) -> PairKeys | None:
    """The pair keys of a session (None without ``identity``): peers' keys from the ``peer_keys``
    option and those ``listed`` in the route table ``source``, which must agree."""
    if identity is None:
        return None
    peers = dict(listed)
    for pid, key in peer_keys.items():
        if pid in peers and public_key_text(peers[pid]) != public_key_text(key):
            raise ConfigError(f"party {pid}: option 'peer_keys' and route table {source} name different public keys")
        peers[pid] = key
    mine = peers.get(me.party_id)
    if mine is not None and public_key_text(mine) != public_key_text(identity):
        raise ConfigError(
            f"party {me.party_id}: the public key published for it is not that of its 'identity' "
            "(a wrong key file, or a stale route table)"
        )
    where = f" (route table {source})" if source else ""
    return PairKeys(job_id, me.party_id, identity, peers, secret, where=where)


class PairKeys:
    """This party's side of the key agreement with each peer, for one job.

    ``peers`` maps party ids to public keys; a peer sharing this party's id (another role of the
    same site) uses this party's own public key when not listed.
    """

    def __init__(
        self,
        job_id: str,
        me: str,
        identity: X25519PrivateKey,
        peers: Mapping[str, X25519PublicKey],
        secret: bytes | None = None,
        *,
        where: str = "",
    ) -> None:
        self._job = job_id
        self._me = me  # this party's id
        self._identity = identity
        self._peers = dict(peers)
        self._peers.setdefault(me, identity.public_key())
        self._secret = secret or b""
        self._where = where  # where peers' keys were looked up, for the error
        self._cache: dict[tuple[str, str], bytes] = {}  # guarded by the GIL: a race computes it twice

    def public_key(self, party_id: str) -> X25519PublicKey:
        key = self._peers.get(party_id)
        if key is None:
            raise ConfigError(
                f"job {self._job}: 'identity' is set but party {party_id} has no public key: add its "
                f"'public_key' to its route table entry or to the 'peer_keys' option{self._where}"
            )
        return key

    def pair_key(self, a: Party, b: Party) -> bytes:
        """The 32-byte key of the unordered pair of parties ``a`` and ``b``, one of them this party.

        Only the two parties can compute it: the Diffie-Hellman value of their key pairs is its
        input; the job id and both parties (role and id) are its context.
        """
        lo, hi = sorted((a, b), key=lambda p: (p.role, p.party_id))
        cached = self._cache.get((str(lo), str(hi)))
        if cached is not None:
            return cached
        if self._me not in (a.party_id, b.party_id):
            raise ValueError(f"party {self._me} is neither {a} nor {b}")
        peer = b.party_id if a.party_id == self._me else a.party_id
        shared = self._identity.exchange(self.public_key(peer))
        # Length-prefixed fields: no two different contexts encode alike.
        fields = (self._job, lo.role, lo.party_id, hi.role, hi.party_id)
        info = b"".join(len(f.encode()).to_bytes(4, "big") + f.encode() for f in fields)
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=_PAIR_SALT, info=info).derive(shared + self._secret)
        self._cache[(str(lo), str(hi))] = key
        return key
