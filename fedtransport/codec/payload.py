"""The per-message payload transform the framing layer applies: lz4, then AES-GCM."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import IntegrityError
from .compress import Compressor, decompress
from .seal import OVERHEAD, Sealer

__all__ = ["PayloadCodec"]


class PayloadCodec:
    """Compression and optional sealing for one direction (source -> destination)."""

    def __init__(self, compressor: Compressor, aead: AESGCM | None = None) -> None:
        self._compressor = compressor
        self._aead = aead
        self.sealing = aead is not None
        self.overhead = OVERHEAD if aead is not None else 0

    def compress(self, chunk: bytes | memoryview | Sequence[bytes | memoryview]) -> bytes | None:
        return self._compressor.compress(chunk)

    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        return decompress(data, size)

    def seal(self, data: bytes | memoryview, aad: bytes) -> bytes:
        assert self._aead is not None
        return Sealer.seal(self._aead, data, aad)

    def open(self, data: bytes | memoryview, aad: bytes) -> bytes:
        if self._aead is None:
            raise IntegrityError(
                "received a sealed message but this party has no 'secret': every party of the job "
                "must set the same secret"
            )
        return Sealer.open(self._aead, data, aad)
