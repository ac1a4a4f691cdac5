"""End-to-end sealing: AES-256-GCM with a key per (job, source, destination).

Keys come from the job secret through HKDF-SHA256, so a key sealed for one
direction of one job opens nothing else. Each message gets a fresh random 96-bit
nonce (carried in front of the ciphertext) and the frame header as associated
data: a flipped bit anywhere, a message replayed into another job, transfer or
position, or a peer without the secret all fail to open.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import IntegrityError

__all__ = ["OVERHEAD", "Sealer"]

NONCE = 12
TAG = 16
OVERHEAD = NONCE + TAG
_SALT = b"fedtransport/seal/v1"


class Sealer:
    """Seals and opens payloads for one job; ``for_pair`` picks the direction key."""

    def __init__(self, secret: bytes, job_id: str) -> None:
        self._secret = secret
        self._job = job_id
        self._keys: dict[tuple[str, str], AESGCM] = {}

    def for_pair(self, src: str, dst: str) -> AESGCM:
        key = self._keys.get((src, dst))
        if key is None:
            info = f"{self._job}\x00{src}\x00{dst}".encode()
            raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=info).derive(self._secret)
            key = self._keys[(src, dst)] = AESGCM(raw)
        return key

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
                "sealed payload failed authentication: tampered, replayed from another job or "
                "transfer, or the parties do not share the same 'secret'"
            ) from None
