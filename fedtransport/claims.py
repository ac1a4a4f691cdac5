"""Claims on transfers: each ``(name, tag, party)`` is sent, or received, once per session.

A transfer is named by its ``(name, tag)`` and the party at the other end. Sending it twice,
or receiving it twice, in one session is a caller's mistake that would otherwise show up as
a hang or as a value silently dropped as a duplicate, so it raises
:class:`~fedtransport.DuplicateTransfer` at once. A call that fails before anything was
surely handed over releases its claims, so that the caller may try it again.

``Federation`` keeps one :class:`ClaimBook` for its remotes and one for its gets;
``fedtransport.spark`` keeps the same pair per driver session for its RDD transfers.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence

from .errors import DuplicateTransfer
from .party import Party

__all__ = ["ClaimBook", "Key"]

Key = tuple[str, str, Party]


class ClaimBook:
    """The ``(name, tag, party)`` keys claimed so far, under a lock of its own.

    ``duplicate`` is the message of the :class:`DuplicateTransfer` raised for a key claimed
    already; it is formatted with ``name``, ``tag`` and ``parties`` (the parties concerned,
    comma-separated).
    """

    def __init__(self, duplicate: str) -> None:
        self._duplicate = duplicate
        self._lock = threading.Lock()
        self._keys: set[Key] = set()

    def claim(self, name: str, tag: str, parties: Sequence[Party]) -> list[Key]:
        """Claim ``(name, tag, p)`` for every ``p`` of ``parties``: all of them, or none."""
        keys = [(name, tag, p) for p in parties]
        with self._lock:
            dup = [str(p) for (_, _, p) in keys if (name, tag, p) in self._keys]
            if dup:
                raise DuplicateTransfer(self._duplicate.format(name=name, tag=tag, parties=", ".join(dup)))
            self._keys.update(keys)
        return keys

    def release(self, keys: Iterable[Key]) -> None:
        """Give claims back: the transfer may be tried again."""
        with self._lock:
            self._keys.difference_update(keys)

    @contextlib.contextmanager
    def claimed(self, name: str, tag: str, parties: Sequence[Party]) -> Iterator[list[Key]]:
        """Claim for the body of a ``with``; an exception out of the body releases the claims."""
        keys = self.claim(name, tag, parties)
        try:
            yield keys
        except BaseException:
            self.release(keys)
            raise
