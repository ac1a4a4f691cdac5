"""End-to-end sealing: AES-256-GCM with a key per (job, source, destination).

Two ways to get the keys (docs/security.md):

* ``secret`` only: HKDF-SHA256 of the job secret. A key sealed for one direction of one job
  opens nothing else, but every party holding the secret can compute every direction's key.
* pair keys (``identity``): HKDF-SHA256 of the pair key of source and destination
  (fedtransport/identity.py: X25519 agreement, bound to the job id and both parties), so
  only those two parties can seal or open the direction's messages.

Each message gets a fresh random 96-bit nonce (carried in front of the ciphertext) and the
frame header as associated data: a flipped bit anywhere, a message replayed into another
job, transfer or position, or a peer without the key all fail to open.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import IntegrityError
from ..identity import PairKeys
from ..party import Party

__all__ = ["OVERHEAD", "Sealer"]

NONCE = 12
TAG = 16
OVERHEAD = NONCE + TAG
_SALT = b"fedtransport/seal/v1"


class Sealer:
    """Seals and opens payloads for one job; ``for_pair`` picks the direction key.

    With ``pair_keys`` the direction key comes from the pair key of its two parties (the
    secret, if any, is already bound into it); else from ``secret``.
    """

    def __init__(self, secret: bytes | None, job_id: str, pair_keys: PairKeys | None = None) -> None:
        if secret is None and pair_keys is None:
            raise ValueError("a Sealer needs a secret or pair keys")
        self._secret = secret
        self._job = job_id
        self._pairs = pair_keys
        self._keys: dict[tuple[str, str], AESGCM] = {}
        self.mode = "pair keys" if pair_keys is not None else "secret"

    def for_pair(self, src: Party | str, dst: Party | str) -> AESGCM:
        """The key of direction ``src`` -> ``dst`` (parties, or ``"role:id"`` in secret mode)."""
        key = self._keys.get((str(src), str(dst)))
        if key is None:
            key = self._keys[(str(src), str(dst))] = AESGCM(self._derive(src, dst, b""))
        return key

    def digest_key(self, src: Party | str, dst: Party | str) -> bytes:
        """A key of direction ``src`` -> ``dst`` for digests (resume.py's incarnations), derived
        like the sealing key under another label: whoever cannot seal cannot compute it either."""
        return self._derive(src, dst, b"digest\x00")

    def _derive(self, src: Party | str, dst: Party | str, label: bytes) -> bytes:
        info = label + f"{self._job}\x00{src}\x00{dst}".encode()
        if self._pairs is not None:
            if not (isinstance(src, Party) and isinstance(dst, Party)):
                raise TypeError("pair keys need the two Party objects")
            ikm = self._pairs.pair_key(src, dst)
        else:
            assert self._secret is not None
            ikm = self._secret
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=info).derive(ikm)

    @staticmethod
    def seal(aead: AESGCM, data: bytes | memoryview, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + aead.encrypt(nonce, data, aad)

    @staticmethod
    def open(aead: AESGCM, data: bytes | memoryview, aad: bytes) -> bytes:
        if len(data) < OVERHEAD:
            raise IntegrityError("sealed payload is shorter than its nonce and tag")
        view = memoryview(data)
        try:
            return aead.decrypt(view[:NONCE], view[NONCE:], aad)
        except InvalidTag:
            raise IntegrityError(
                "sealed payload failed authentication: tampered, replayed from another job, transfer or "
                "direction, or the parties do not share the same 'secret' (or, with 'identity', the sender "
                "is not who the lane says or holds another key than its published public key)"
            ) from None
