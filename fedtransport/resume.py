"""Incarnations that name a value, and resuming a send a killed sender left half done.

Every frame carries the *incarnation* of its send (framing.py). It is a keyed digest of what
the send carries, not a random draw:

* an object of at least ``MIN_RESUME_MESSAGES`` messages a lane: HMAC-SHA256 over the encoded
  value and the layout that places its bytes in messages (payload bytes per message, lanes,
  streams), so the same value sent the same way gets the same incarnation and any other value
  or layout another one. A smaller object cannot be resumed, so it skips the SHA-256 pass and
  takes a random one: a one-message send is atomic (the receiver drops a resend once it holds
  the first), and a few-message send cut short is sent whole again, assembled apart;
* a table: the same over every partition's record batches, but only with the option
  ``resumable_tables`` (a second encoding pass over the whole table, before sending) and only
  when each partition can be read twice; else (and for generator partitions) a random one;
* the session's own notices (abort): random.

The key is the direction's digest key when sealing is on (``secret`` or ``identity``: derived
like the sealing key, so a party that does not hold it cannot compute or steer the
incarnation), else the transfer id. A digested value is hashed once per ``remote`` (SHA-256);
each destination then keys that hash.

What it buys: a sender killed mid-send and restarted with the same value sends under the same
incarnation, so the receiver merges the resend into what it already holds (a message at a
position it holds must match it byte for byte: framing.TransferAssembly). A recomputed,
different value has another incarnation and is never mixed with the first (inbox.py picks one).

Resume: where the transport can tell which of a lane's messages the broker stores and the
receiver has not acknowledged (``Transport.last_stored``: Pulsar in shared mode with an
``admin_url``), a restarted sender skips a lane's messages up to that last stored one when it
belongs to the same send (same transfer, same incarnation, and it opens with the direction's
key). Elsewhere the restarted sender sends everything again and the receiver drops what it has.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import struct
from collections.abc import Callable, Iterable, Iterator

from .codec import EncodedUnit, encode_records
from .errors import FederationError
from .framing import INCARNATION_SIZE, PayloadTransform, frame_position, open_payload, parse_frame
from .table import Table

__all__ = [
    "MIN_RESUME_MESSAGES",
    "Digest",
    "RandomIncarnations",
    "incarnation",
    "random_incarnation",
    "resume_point",
    "skip_through",
    "table_digest",
    "unit_digest",
]

#: A send of fewer messages per lane than this is sent whole again: asking the broker what it
#: stores costs admin round trips that such a lane does not repay.
MIN_RESUME_MESSAGES = 8

Digest = bytes  # SHA-256 of what a send carries, before it is keyed per destination
_LAYOUT = struct.Struct("<QIIB")  # payload bytes per message, lanes, streams, kind (object/table)


def random_incarnation() -> bytes:
    return os.urandom(INCARNATION_SIZE)


class RandomIncarnations:
    """A session's random incarnations, without a system call each: a counter hashed under a key
    drawn once. ``os.urandom`` lets go of the GIL, and taking it back from the I/O thread showed
    in a small ``remote``'s profile. Another session (a restarted sender) draws another key, so
    its incarnations differ from these but for a 2**-64 chance, as two ``os.urandom`` draws do.
    """

    def __init__(self) -> None:
        self._key = os.urandom(32)
        self._counter = itertools.count()  # next() is atomic: concurrent remotes never share one

    def __call__(self) -> bytes:
        n = next(self._counter).to_bytes(8, "little")
        return hashlib.blake2b(n, key=self._key, digest_size=INCARNATION_SIZE, person=b"ft-incarnation").digest()


def unit_digest(unit: EncodedUnit) -> Digest:
    """SHA-256 of an encoded object, over its buffers as they are (no concatenation)."""
    h = hashlib.sha256(b"ft-object\x00")
    for part in unit.parts:
        h.update(part)
    return h.digest()


def table_digest(table: Table, max_chunk: int) -> Digest | None:
    """SHA-256 of a table's record batches as they would be sent, or ``None`` if a partition is
    one-shot (a generator): reading it here would leave nothing to send."""
    if not all(isinstance(p, (list, tuple)) for p in table._partitions):
        return None
    h = hashlib.sha256(b"ft-table\x00")
    h.update(table.num_partitions.to_bytes(8, "little"))
    for p in range(table.num_partitions):
        for unit, count in encode_records(table.raw_partition(p), max_chunk):
            h.update(struct.pack("<QQ", unit.size, count))  # unit boundaries are part of the layout
            for part in unit.parts:
                h.update(part)
        h.update(b"\xff" * 16)  # end of partition: batches cannot slide from one to the next
    return h.digest()


def incarnation(key: bytes, transfer: bytes, digest: Digest, *, max_chunk: int, lanes: int, nstreams: int,
                table: bool) -> bytes:  # fmt: skip
    """The incarnation of one send to one destination: ``digest`` and layout, keyed."""
    layout = _LAYOUT.pack(max_chunk, lanes, nstreams, int(table))
    return hmac.new(key, b"ft-incarnation\x00" + transfer + layout + digest, "sha256").digest()[:INCARNATION_SIZE]


def resume_point(
    stored: bytes | None, job: bytes, transfer: bytes, incarnation: bytes, transform: PayloadTransform
) -> tuple[int, int] | None:
    """``(stream, seq)`` of a lane's last stored message if it belongs to this very send.

    It must parse, name this transfer and incarnation, and open with the direction's key: a
    message someone else wrote on the broker never makes the sender skip anything (sealing on).
    """
    if stored is None:
        return None
    try:
        header, payload = parse_frame(stored, job)
        if header.transfer != transfer or header.incarnation != incarnation:
            return None
        open_payload(header, payload, transform)
    except Exception:  # anything that is not our own message: send everything
        return None
    return header.stream, header.seq


def skip_through(
    messages: Iterable[bytes], point: tuple[int, int], on_skip: Callable[[bytes], None]
) -> Iterator[bytes]:
    """``messages`` without those up to and including the one at ``point`` (each handed to
    ``on_skip``). A lane's messages are stored in the order they are sent, so everything before
    its last stored message is stored too. The caller checked that ``point`` is on this lane.
    """
    it = iter(messages)
    for msg in it:
        on_skip(msg)
        if frame_position(msg) == point:
            break
    else:  # cannot happen for a point of this lane: say so rather than lose messages silently
        raise FederationError(f"resuming a send: message {point} is not on its lane; send it whole again")
    yield from it
