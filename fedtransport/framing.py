"""Byte streams <-> broker messages of at most ``max_message_size`` bytes.

Every message is an 88-byte little-endian header followed by its payload::

    magic "FT" | version | flags | job fingerprint (8) | transfer id (16) | incarnation (8)
    | stream | nstreams | unit | seq | length | size | offset | unit_len | aux | crc32

A *transfer* (one ``remote`` of one value to one party) is made of ``nstreams``
streams; a stream is an ordered list of *units* (byte strings: an encoded object,
or one batch of table records); a unit is cut into chunks of at most the payload
budget, and each chunk travels in one message. ``offset``/``unit_len`` place a
chunk in its unit and ``size`` is its length before compression, so a receiver
can copy any chunk straight into place whatever order messages arrive in.
``seq`` numbers the messages of a stream (duplicates are dropped by it), the LAST
flag marks a stream's final message and ``aux`` carries a per-stream count the
layer above checks (records of a table partition). The CRC covers header and
payload (CRC-32 as zlib computes it, by ISA-L); the header is parsed with :mod:`struct`, never
unpickled.

The *incarnation* names what a send carries: for a send that can be resumed the api
gives a keyed digest of the value and its layout (resume.py; any other send a random
one), so a sender killed part-way and restarted with the same value sends the same
incarnation again, and a recomputed value another one. A :class:`TransferAssembly`
holds the messages of one incarnation only, so two values are never mixed into one
(the inbox keeps incarnations apart and picks one). Within one incarnation a message at
a position already held (same stream and seq) is a duplicate, and it must say the same
as the first: the same place, and the same bytes where they are still held; anything
else is an :class:`IntegrityError` ("two values under one
incarnation"). :class:`FrameWriter` alone draws a random incarnation.

This layer knows nothing about objects: payload compression and sealing are done
by a :class:`PayloadTransform` handed in from above.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

# ISA-L's CRC32: the same values as zlib.crc32 (the same polynomial, so frames from either read
# alike), about 3 times faster on 4 MiB messages; zlib's was 14 % of a large transfer's profile.
from isal.isal_zlib import crc32

from .errors import IntegrityError

__all__ = [
    "DEFAULT_MAX_STREAMS",
    "HEADER_SIZE",
    "FrameWriter",
    "Header",
    "PayloadTransform",
    "TransferAssembly",
    "UnitChunker",
    "chunk_size",
    "control_id",
    "frame_position",
    "job_fingerprint",
    "parse_frame",
    "transfer_id",
]

MAGIC = b"FT"
VERSION = 2  # 2: the incarnation field
LAST = 0x01
COMPRESSED = 0x02
SEALED = 0x04
BROADCAST = 0x08  # data of a broadcast (broadcast.py): only ever valid on a broadcast lane
_KNOWN_FLAGS = LAST | COMPRESSED | SEALED | BROADCAST

_PREFIX = struct.Struct("<2sBB8s16s8sIIIIIIQQQ")
_CRC = struct.Struct("<I")
_SIZE = struct.Struct("<I")
_SIZE_AT = struct.calcsize("<2sBB8s16s8sIIIII")  # the header's ``size`` field
HEADER_SIZE = _PREFIX.size + _CRC.size  # 88
INCARNATION_SIZE = 8
# A unit at least this big is received into an anonymous mapping once _MAP_AFTER of it
# arrived; in it, a chunk of at least _DIRECT bytes is placed at once wherever it lands (_Unit).
_MAPPED_UNIT = 8 << 20
_MAP_AFTER = 1 << 20
_DIRECT = 32 << 10
DEFAULT_MAX_STREAMS = 65536  # the max_streams option's default (options.py)
# madvise(MADV_POPULATE_WRITE), Linux 5.14+: fault pages in with one call. Python's mmap
# module does not name it before 3.13. Cleared on the first kernel that refuses it.
_POPULATE_WRITE: int | None = getattr(mmap, "MADV_POPULATE_WRITE", 23 if hasattr(mmap.mmap, "madvise") else None)
_PAGE = mmap.PAGESIZE


def job_fingerprint(job_id: str) -> bytes:
    return hashlib.blake2b(job_id.encode(), digest_size=8, person=b"ft-job").digest()


def transfer_id(job_id: str, name: str, tag: str, src: str, dst: str) -> bytes:
    """Both sides derive the same 16-byte id from ``(job_id, name, tag, src, dst)``.

    Each part is length-prefixed (see :func:`_fields`): no two distinct tuples share a key,
    whatever characters a name or tag holds.
    """
    return hashlib.blake2b(_fields(job_id, name, tag, src, dst), digest_size=16, person=b"ft-transfer").digest()


def control_id(job_id: str, kind: str, src: str, dst: str) -> bytes:
    """The id of the session's own notice ``kind`` (e.g. ``"abort"``) from ``src`` to ``dst``.

    Hashed under another personalisation than :func:`transfer_id`, so no name and tag a
    caller may choose ever give a control notice's id.
    """
    return hashlib.blake2b(_fields(job_id, kind, src, dst), digest_size=16, person=b"ft-control").digest()


def _fields(*parts: str) -> bytes:
    """The parts as UTF-8, each behind its byte length: an encoding that maps back to one tuple.

    A separator would let ``("a\\x00b", "c")`` and ``("a", "b\\x00c")`` meet. A lone surrogate
    cannot be encoded; the api layer refuses such names before they get here.
    """
    out = bytearray()
    for part in parts:
        data = part.encode()
        out += len(data).to_bytes(4, "little") + data
    return bytes(out)


class PayloadTransform(Protocol):
    """What framing needs from the codec for one direction of one job."""

    sealing: bool
    overhead: int

    def compress(self, chunk: bytes | memoryview | Sequence[bytes | memoryview]) -> bytes | None: ...
    def decompress(self, data: bytes | memoryview, size: int) -> bytes: ...
    def seal(self, data: bytes | memoryview, aad: bytes) -> bytes: ...
    def open(self, data: bytes | memoryview, aad: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Header:
    flags: int
    job: bytes
    transfer: bytes
    incarnation: bytes  # names the value sent (see the module docstring)
    stream: int
    nstreams: int
    unit: int
    seq: int
    length: int
    size: int
    offset: int
    unit_len: int
    aux: int

    @property
    def last(self) -> bool:
        return bool(self.flags & LAST)


def _crc(prefix: bytes | memoryview, flags: int, payload: Sequence[bytes | memoryview]) -> int:
    """CRC32 over the header prefix and the payload, given as the pieces it is made of."""
    # A sealed payload is covered by its AEAD tag, and the header is its associated data:
    # checksumming the payload as well would only spend time.
    crc = crc32(prefix)
    if flags & SEALED:
        return crc
    for piece in payload:
        crc = crc32(piece, crc)
    return crc


def _pack_prefix(h: Header) -> bytes:
    return _PREFIX.pack(
        MAGIC, VERSION, h.flags, h.job, h.transfer, h.incarnation, h.stream, h.nstreams, h.unit, h.seq,
        h.length, h.size, h.offset, h.unit_len, h.aux,
    )  # fmt: skip


def chunk_size(message: bytes | memoryview) -> int:
    """The uncompressed payload size a message's header declares (for progress reports)."""
    return int(_SIZE.unpack_from(message, _SIZE_AT)[0])


def frame_position(message: bytes | memoryview) -> tuple[int, int]:
    """``(stream, seq)`` of a message this side framed (no checks: for a sender's own messages)."""
    fields = _PREFIX.unpack_from(message)
    return int(fields[6]), int(fields[9])


def parse_frame(data: bytes | memoryview, job: bytes | None = None) -> tuple[Header, memoryview]:
    """Check magic, version, length and CRC; return the header and a view of the payload."""
    view = memoryview(data).cast("B")
    if view.nbytes < HEADER_SIZE:
        raise IntegrityError(f"frame of {view.nbytes} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, *fields = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise IntegrityError(f"not a fedtransport frame (magic {bytes(magic)!r})")
    if version != VERSION:
        raise IntegrityError(f"frame version {version} is not supported (this side speaks {VERSION})")
    header = Header(*fields)
    payload = view[HEADER_SIZE:]
    if header.length != payload.nbytes:
        raise IntegrityError(f"frame says {header.length} payload bytes but carries {payload.nbytes}: truncated")
    (crc,) = _CRC.unpack_from(view, _PREFIX.size)
    if _crc(view[: _PREFIX.size], header.flags, (payload,)) != crc:
        raise IntegrityError("frame checksum mismatch: the message was corrupted in transit")
    if header.flags & ~_KNOWN_FLAGS:
        raise IntegrityError(f"frame has unknown flags {header.flags:#x}")
    if job is not None and header.job != job:
        raise IntegrityError("frame belongs to another job (job fingerprint mismatch)")
    return header, payload


def open_payload(header: Header, payload: memoryview, transform: PayloadTransform) -> bytes | memoryview:
    """Undo sealing and compression; refuses a downgrade to plaintext when sealing is on."""
    data: bytes | memoryview = payload
    if header.flags & SEALED:
        data = transform.open(data, _pack_prefix(header))
    elif transform.sealing:
        raise IntegrityError("received an unsealed message but this job requires sealing ('secret' is set)")
    if header.flags & COMPRESSED:
        return transform.decompress(data, header.size)
    if len(data) != header.size:
        raise IntegrityError(f"raw chunk of {len(data)} bytes, header says {header.size}")
    return data


class FrameWriter:
    """Frames the chunks of one send of one transfer towards one destination.

    ``incarnation`` (default: 8 random bytes) marks every message of this send; ``flags``
    are set on every message (``BROADCAST``).
    """

    def __init__(
        self,
        job: bytes,
        transfer: bytes,
        nstreams: int,
        transform: PayloadTransform,
        incarnation: bytes | None = None,
        flags: int = 0,
    ) -> None:
        if incarnation is None:
            incarnation = os.urandom(INCARNATION_SIZE)
        elif len(incarnation) != INCARNATION_SIZE:
            raise ValueError(f"an incarnation is {INCARNATION_SIZE} bytes")
        self.incarnation = incarnation
        self._job = job
        self._transfer = transfer
        self._nstreams = nstreams
        self._transform = transform
        self._flags = flags

    def frame(
        self,
        *,
        stream: int,
        unit: int,
        seq: int,
        offset: int,
        unit_len: int,
        chunk: bytes | memoryview | Sequence[memoryview],
        last: bool,
        aux: int = 0,
    ) -> bytes:
        """One message; a chunk given as pieces (see :meth:`UnitChunker.pieces`) is copied once, here."""
        t = self._transform
        flags = self._flags | (LAST if last else 0)
        body: list[bytes | memoryview] = [chunk] if isinstance(chunk, (bytes, bytearray, memoryview)) else list(chunk)
        size = length = sum(len(p) for p in body)
        packed = t.compress(body)
        if packed is not None:
            body, flags, length = [packed], flags | COMPRESSED, len(packed)
        if t.sealing:
            flags |= SEALED
            length += t.overhead
        header = Header(
            flags, self._job, self._transfer, self.incarnation, stream, self._nstreams,
            unit, seq, length, size, offset, unit_len, aux,
        )  # fmt: skip
        prefix = _pack_prefix(header)
        if t.sealing:
            body = [t.seal(body[0] if len(body) == 1 else b"".join(body), prefix)]
        return b"".join((prefix, _CRC.pack(_crc(prefix, flags, body)), *body))


class UnitChunker:
    """Random access to the ``max_chunk``-sized chunks of a unit held as several buffers.

    The unit is never concatenated: a chunk is a view into one buffer, or the views of
    the buffers it straddles, which :meth:`FrameWriter.frame` joins once, into its message.
    """

    def __init__(self, parts: Sequence[memoryview], size: int, max_chunk: int) -> None:
        if max_chunk <= 0:
            raise ValueError("max_chunk must be positive")
        self._parts = [p for p in parts if p.nbytes]
        self._starts: list[int] = []
        pos = 0
        for p in self._parts:
            self._starts.append(pos)
            pos += p.nbytes
        self.size = size
        self.max_chunk = max_chunk

    def __len__(self) -> int:
        return max(1, -(-self.size // self.max_chunk))

    def pieces(self, i: int) -> tuple[int, list[memoryview]]:
        """``(offset, views)`` of chunk ``i``: the views of the buffers it spans, not joined."""
        start = i * self.max_chunk
        end = min(start + self.max_chunk, self.size)
        pieces: list[memoryview] = []
        k = self._find(start)
        pos = start
        while pos < end:
            p, p0 = self._parts[k], self._starts[k]
            take = min(end, p0 + p.nbytes) - pos
            pieces.append(p[pos - p0 : pos - p0 + take])
            pos += take
            k += 1
        return start, pieces or [memoryview(b"")]

    def _find(self, pos: int) -> int:
        lo, hi = 0, len(self._starts) - 1
        while lo < hi:  # last part starting at or before pos
            mid = (lo + hi + 1) // 2
            if self._starts[mid] <= pos:
                lo = mid
            else:
                hi = mid - 1
        return lo


def frame_units(
    writer: FrameWriter,
    stream: int,
    units: Iterable[tuple[Sequence[memoryview] | bytes, int]],
    max_chunk: int,
    aux: int | None = None,
) -> Iterator[bytes]:
    """Frame a stream of units lazily, in order; ``units`` yields ``(unit, count)``.

    ``aux`` defaults to the sum of the counts, carried by the stream's LAST message.
    The stream always has at least one message, so an empty one still completes.
    """
    seq = 0
    total = 0
    pending: tuple[int, int, int, bytes | memoryview | list[memoryview], int] | None = None  # held back to set LAST
    for unit_no, (unit, count) in enumerate(units):
        parts = [memoryview(unit)] if isinstance(unit, (bytes, bytearray, memoryview)) else list(unit)
        size = sum(p.nbytes for p in parts)
        chunker = UnitChunker(parts, size, max_chunk)
        total += count
        for i in range(len(chunker)):
            offset, data = chunker.pieces(i)
            if pending is not None:
                yield _frame_pending(writer, stream, pending, last=False, aux=0)
            pending = (unit_no, seq, offset, data, size)
            seq += 1
    if pending is None:  # an empty stream: one empty unit
        pending = (0, 0, 0, b"", 0)
    yield _frame_pending(writer, stream, pending, last=True, aux=total if aux is None else aux)


def _frame_pending(
    writer: FrameWriter,
    stream: int,
    p: tuple[int, int, int, bytes | memoryview | list[memoryview], int],
    *,
    last: bool,
    aux: int,
) -> bytes:
    unit, seq, offset, data, size = p
    return writer.frame(stream=stream, unit=unit, seq=seq, offset=offset, unit_len=size, chunk=data, last=last, aux=aux)


class _Unit:
    """One unit being received. Memory follows the bytes that arrived, never the length a
    header claims (a peer may claim any length it likes and send 100 bytes of it):

    - a unit that arrives in one message is that message's payload, not copied;
    - otherwise the chunks that continue what arrived so far are appended to a buffer that
      grows with them (chunks in order, the usual case, are copied once, while in cache), and
      any other chunk waits as it came (``pieces``) until the buffer reaches it or the unit is
      complete;
    - a unit of at least ``_MAPPED_UNIT`` bytes moves, once ``_MAP_AFTER`` of it arrived, into an
      anonymous mapping whose pages are committed as data lands (:meth:`_place`), so a large
      array is never held twice. A small chunk beyond the committed part waits as a piece, so
      scattered tiny chunks cannot commit a page each.
    """

    __slots__ = ("buf", "filled", "got", "pieces", "ready", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.got = 0
        self.ready = 0  # a mapped buffer's populated prefix
        self.filled = False  # an empty unit is complete only once its message arrived
        self.buf: mmap.mmap | bytearray | bytes | memoryview | None = None
        self.pieces: dict[int, bytes | memoryview] = {}  # offset -> a chunk not yet copied into ``buf``

    def put(self, offset: int, data: bytes | memoryview) -> None:
        if self.size > sys.maxsize:  # no buffer can ever hold it: fail now, not once data piled up
            raise IntegrityError(f"cannot hold a unit of {self.size} bytes: longer than any address space")
        n = len(data)
        if offset + n > self.size or self.got + n > self.size:
            raise IntegrityError(f"chunk at {offset}+{n} overflows its {self.size}-byte unit")
        self.got += n
        self.filled = True
        if n == self.size:  # the whole unit in one message: keep it, no copy
            self.buf = data
            return
        buf = self.buf
        if isinstance(buf, mmap.mmap):
            self._place(buf, offset, data)
        elif self.size >= _MAPPED_UNIT and self.got >= _MAP_AFTER:
            self.buf = mapped = self._map()
            arrived, self.got = self.got, 0
            held = [(0, memoryview(buf))] if isinstance(buf, bytearray) else []
            pieces, self.pieces = [*held, *self.pieces.items(), (offset, data)], {}
            for at, piece in pieces:  # replayed so each commits what it would have on arrival
                self.got += len(piece)
                self._place(mapped, at, piece)
            self.got = arrived
        else:
            if buf is None:
                buf = self.buf = bytearray()
            assert isinstance(buf, bytearray)
            if offset == len(buf):
                buf += data
                while (nxt := self.pieces.pop(len(buf), None)) is not None:
                    buf += nxt
            else:
                self._keep(offset, data)
        if self.got == self.size and self.pieces:  # complete: every byte is here, commit them
            buf = self.buf
            if isinstance(buf, bytearray) and len(buf) < self.size:
                buf += bytes(self.size - len(buf))
            view = memoryview(buf)  # type: ignore[arg-type]  # a bytearray or a mapping here
            for at, piece in self.pieces.items():
                view[at : at + len(piece)] = piece
            self.pieces = {}

    def matches(self, offset: int, data: bytes | memoryview) -> bool | None:
        """Whether ``data`` equals the bytes held at ``offset``; ``None`` once they are let go."""
        n = len(data)
        piece = self.pieces.get(offset)
        if piece is not None:
            return len(piece) == n and bytes(piece) == bytes(data)
        buf = self.buf
        if buf is None or (isinstance(buf, bytearray) and offset + n > len(buf)):
            return None
        with memoryview(buf) as view:  # released at once: a bytearray cannot grow while viewed
            return view[offset : offset + n] == memoryview(data).cast("B")

    def _keep(self, offset: int, data: bytes | memoryview) -> None:
        # A writable view is a buffer its owner may reuse once add() returns: keep a copy of it.
        self.pieces[offset] = data if isinstance(data, bytes) or data.readonly else bytes(data)

    def _map(self) -> mmap.mmap:
        try:  # address space only: pages are committed by _place
            return mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OverflowError, OSError, ValueError) as exc:  # the length comes from the header
            raise IntegrityError(f"cannot hold a unit of {self.size} bytes: {exc}") from None

    def _place(self, buf: mmap.mmap, offset: int, data: bytes | memoryview) -> None:
        """Copy a chunk into the mapping, faulting its pages in first in few big kernel calls:
        faulting them one by one, on the thread that also reads the socket, cost more than the
        copy itself.

        The populated prefix doubles with the bytes received (a few calls per unit) and never
        passes twice what has arrived (``got``, this chunk included). A chunk beyond it gets its
        own pages if it is big enough to fill most of them, else it waits as a piece."""
        n = len(data)
        end, limit = offset + n, 2 * self.got
        if end > self.ready:
            if end > limit:
                if n < _DIRECT:
                    self._keep(offset, data)
                    return
                _madvise_populate(buf, offset, end)
            else:
                target = min(self.size, limit)
                _madvise_populate(buf, self.ready, target)
                self.ready = target
        memoryview(buf)[offset:end] = data

    @property
    def complete(self) -> bool:
        return self.filled and self.got == self.size

    def view(self) -> memoryview:
        return memoryview(self.buf if self.buf is not None else b"").cast("B")


def _madvise_populate(buf: mmap.mmap, start: int, end: int) -> None:
    global _POPULATE_WRITE
    if _POPULATE_WRITE is None or end <= start:
        return
    start -= start % _PAGE
    try:
        buf.madvise(_POPULATE_WRITE, start, end - start)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # a kernel older than 5.14: plain page faults from now on
            _POPULATE_WRITE = None


class _Stream:
    __slots__ = ("aux", "done_units", "held", "last_seq", "last_unit", "seen", "taken", "units")

    def __init__(self) -> None:
        self.units: dict[int, _Unit] = {}
        self.seen: dict[int, tuple[int, int, int, int, int]] = {}  # seq -> (unit, offset, size, last, aux)
        self.last_unit: int | None = None
        self.last_seq: int | None = None
        self.aux = 0
        self.done_units = 0
        self.taken = 0  # units handed out by take(); their buffers are released
        self.held = 0  # bytes placed and not yet taken

    @property
    def complete(self) -> bool:
        return self.last_unit is not None and self.done_units == self.last_unit + 1


class TransferAssembly:
    """Reassembles one send (incarnation) of one transfer from messages arriving in any
    order, duplicates included. It takes the incarnation of its first message; a message
    of another is refused (the inbox routes each incarnation to its own assembly).

    ``add`` raises :class:`IntegrityError` on anything inconsistent; the caller
    decides what that means for the transfer (the api fails the waiting ``get``).
    """

    def __init__(self, transfer: bytes, transform: PayloadTransform, max_streams: int = DEFAULT_MAX_STREAMS) -> None:
        self.transfer = transfer
        self._transform = transform
        self.incarnation: bytes | None = None
        self._max_streams = max_streams
        self.nstreams: int | None = None
        self._streams: dict[int, _Stream] = {}
        self.messages = 0
        self.bytes = 0
        self.value_bytes = 0  # payload bytes placed, uncompressed (progress)
        self._done_streams = 0

    def add(self, header: Header, payload: memoryview) -> bool:
        """Place one message; ``False`` if it was a duplicate."""
        if header.transfer != self.transfer:
            raise IntegrityError("message of another transfer handed to this one")
        if self.incarnation is None:
            self.incarnation = header.incarnation
        elif header.incarnation != self.incarnation:
            raise IntegrityError("a message of another send of this transfer handed to this one")
        if self.nstreams is None:
            if header.nstreams == 0:
                raise IntegrityError("frame declares a transfer of zero streams")
            if header.nstreams > self._max_streams:  # a table's get would build a partition per stream
                raise IntegrityError(
                    f"frame declares a transfer of {header.nstreams} streams, more than the {self._max_streams} "
                    "this receiver accepts (option max_streams)"
                )
            self.nstreams = header.nstreams
        elif header.nstreams != self.nstreams:
            raise IntegrityError(f"frames disagree on the stream count ({header.nstreams} != {self.nstreams})")
        if header.stream >= self.nstreams:
            raise IntegrityError(f"stream {header.stream} outside the transfer's {self.nstreams} streams")
        st = self._streams.get(header.stream)
        if st is None:
            st = self._streams[header.stream] = _Stream()
        if header.seq in st.seen:
            self._check_duplicate(st, header, payload)
            return False
        if st.last_seq is not None and header.seq > st.last_seq:
            raise IntegrityError(f"message {header.seq} after the stream's last ({st.last_seq})")
        if st.last_unit is not None and header.unit > st.last_unit:
            raise IntegrityError(f"unit {header.unit} after the stream's last unit ({st.last_unit})")
        unit = st.units.get(header.unit)
        if unit is None:
            unit = st.units[header.unit] = _Unit(header.unit_len)
        elif unit.size != header.unit_len:
            raise IntegrityError(f"frames disagree on the length of unit {header.unit}")
        if header.unit < st.taken:
            raise IntegrityError(f"a new chunk of unit {header.unit}, which was complete and taken")
        data = open_payload(header, payload, self._transform)
        stream_was_complete = st.complete
        unit_was_complete = unit.complete
        unit.put(header.offset, data)
        st.held += len(data)
        self.value_bytes += len(data)
        st.seen[header.seq] = (header.unit, header.offset, header.size, header.flags & LAST, header.aux)
        if header.last:
            if any(u > header.unit for u in st.units):
                raise IntegrityError("a unit arrived beyond the stream's last one")
            st.last_unit, st.last_seq, st.aux = header.unit, header.seq, header.aux
        if unit.complete and not unit_was_complete:
            st.done_units += 1
        if st.complete and not stream_was_complete:
            self._done_streams += 1
        self.messages += 1
        self.bytes += HEADER_SIZE + payload.nbytes  # as on the wire, like the sender counts
        return True

    def _check_duplicate(self, st: _Stream, header: Header, payload: memoryview) -> None:
        """A message at a position already held: the same send repeated (a broker's redelivery, a
        restarted sender's resend), so it must say what the first said. Its bytes are compared
        while the unit still holds them; a table's batch already read is compared by place only."""
        place = (header.unit, header.offset, header.size, header.flags & LAST, header.aux)
        if st.seen[header.seq] != place:
            raise IntegrityError(
                f"two values under one incarnation: message {header.seq} of stream {header.stream} was received "
                "before with another place in the value"
            )
        unit = st.units.get(header.unit)
        if unit is None or header.unit < st.taken:
            return
        if unit.matches(header.offset, open_payload(header, payload, self._transform)) is False:
            raise IntegrityError(
                f"two values under one incarnation: message {header.seq} of stream {header.stream} was received "
                "before with other bytes"
            )

    @property
    def complete(self) -> bool:
        return self.nstreams is not None and self._done_streams == self.nstreams

    @property
    def expected_messages(self) -> int | None:
        """Total message count once every stream's LAST message has been seen."""
        if self.nstreams is None or len(self._streams) < self.nstreams:
            return None
        total = 0
        for s in self._streams.values():
            if s.last_seq is None:
                return None
            total += s.last_seq + 1
        return total

    def stream_units(self, stream: int) -> list[memoryview]:
        st = self._streams[stream]
        return [st.units[i].view() for i in range(st.done_units)]

    @property
    def value_size(self) -> int | None:
        """The uncompressed size of an object transfer once its first message is in; None for tables."""
        st = self._streams.get(0)
        if self.nstreams != 1 or st is None or not st.units:
            return None
        return next(iter(st.units.values())).size

    def stream_complete(self, stream: int) -> bool:
        st = self._streams.get(stream)
        return st is not None and st.complete

    def held(self, stream: int) -> int:
        """Bytes of ``stream`` placed here and not yet taken."""
        st = self._streams.get(stream)
        return 0 if st is None else st.held

    def ready(self, stream: int) -> bool:
        """True if :meth:`take` would hand out a unit or finish the stream."""
        st = self._streams.get(stream)
        if st is None:
            return False
        unit = st.units.get(st.taken)
        return (unit is not None and unit.complete) or (st.last_unit is not None and st.taken > st.last_unit)

    def take(self, stream: int) -> tuple[list[memoryview], bool]:
        """Hand out the stream's complete units that follow those already taken, in order.

        The assembly lets go of them (a streamed table partition is never held whole).
        Returns ``(units, finished)``; ``finished`` once every unit of the stream is taken.
        """
        st = self._streams.get(stream)
        if st is None:
            return [], False
        out: list[memoryview] = []
        while (unit := st.units.get(st.taken)) is not None and unit.complete:
            out.append(unit.view())
            st.held -= unit.size
            unit.buf = None
            st.taken += 1
        return out, st.last_unit is not None and st.taken == st.last_unit + 1

    @property
    def units_taken(self) -> int:
        """Units handed out by :meth:`take` over every stream."""
        return sum(st.taken for st in self._streams.values())

    def stream_aux(self, stream: int) -> int:
        return self._streams[stream].aux

    def describe(self) -> str:
        exp = self.expected_messages
        return f"{self.messages} of {exp} messages" if exp is not None else f"{self.messages} messages so far"
