"""Per-message lz4 frame compression that backs off on incompressible data.

A 64 KiB sample of each chunk is compressed first (tens of microseconds); when it
does not shrink by at least 10 % the chunk is sent raw, so float arrays and
ciphertext cost nothing. A chunk under 4 KiB is not tried at all: it saves at most
a few KiB of a message whose cost is its broker round trip, and lz4 lets go of the
GIL, which on a small transfer's path hands it to the I/O thread. Decompression is
bounded by the length the frame header promises, so a hostile peer cannot make us
inflate a bomb.
"""

from __future__ import annotations

from collections.abc import Sequence

import lz4.block
import lz4.frame

from ..errors import IntegrityError

__all__ = ["Compressor", "decompress"]

SAMPLE = 64 * 1024
MIN_SAVING = 0.10
MIN_SIZE = 4096  # smaller chunks travel raw (see the module docstring)


class Compressor:
    def __init__(
        self, enabled: bool = True, *, sample: int = SAMPLE, min_saving: float = MIN_SAVING, min_size: int = MIN_SIZE
    ) -> None:
        self.enabled = enabled
        self._sample = sample
        self._keep = 1.0 - min_saving
        self._min_size = min_size

    def compress(self, chunk: bytes | memoryview | Sequence[bytes | memoryview]) -> bytes | None:
        """Compressed bytes, or ``None`` when the chunk should travel raw.

        ``chunk`` may be given as the pieces it is made of: they are joined only if
        the sample says compressing is worth it.
        """
        pieces = [chunk] if isinstance(chunk, (bytes, bytearray, memoryview)) else chunk
        n = sum(len(p) for p in pieces)
        if not self.enabled or n < self._min_size:
            return None
        if n > self._sample:
            probe = lz4.block.compress(_head(pieces, self._sample), store_size=False)
            if len(probe) > self._sample * self._keep:
                return None
        whole = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        out = lz4.frame.compress(whole, store_size=True)
        return out if len(out) <= n * self._keep else None


def _head(pieces: Sequence[bytes | memoryview], n: int) -> bytes | bytearray | memoryview:
    """The first ``n`` bytes of the concatenation of ``pieces``."""
    first = pieces[0]
    if len(first) >= n:
        return first[:n]
    out = bytearray()
    for p in pieces:
        out += p[: n - len(out)]
        if len(out) >= n:
            break
    return out


# LZ4 cannot inflate more than 255 bytes out of one input byte (a match length grows by at
# most 255 per extension byte); a header that promises more is refused before lz4 allocates it.
MAX_RATIO = 255


def decompress(data: bytes | memoryview, expected: int) -> bytes:
    if expected > MAX_RATIO * len(data) + 64:
        raise IntegrityError(f"lz4 payload of {len(data)} bytes cannot inflate to the {expected} its frame promised")
    inflater = lz4.frame.LZ4FrameDecompressor()
    try:
        out: bytes = inflater.decompress(data, max_length=expected)
    except RuntimeError as exc:  # lz4 reports every decode failure as RuntimeError
        raise IntegrityError(f"corrupt lz4 payload: {exc}") from exc
    except (MemoryError, OverflowError, ValueError) as exc:  # lz4 allocates max_length up front
        raise IntegrityError(f"lz4 payload promising {expected} bytes: {type(exc).__name__}: {exc}") from None
    if len(out) != expected or not inflater.eof or inflater.unused_data:
        raise IntegrityError(f"lz4 payload does not inflate to the {expected} bytes its frame promised")
    return out
