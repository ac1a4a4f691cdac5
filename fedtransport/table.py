"""Tables: a sequence of partitions of ``(key, value)`` records."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["Table"]

Record = tuple[Any, Any]


class Table:
    """A partitioned table as it crosses parties.

    ``remote(table)`` sends each partition as its own stream; ``get`` returns a
    ``Table``. Partitions given as generators or other one-shot iterables are
    consumed once, by the sender, without being materialised; a table built that
    way materialises on first access to ``partitions``.
    """

    __slots__ = ("__weakref__", "_partitions")

    def __init__(self, partitions: Iterable[Iterable[Record]]) -> None:
        if isinstance(partitions, (str, bytes, Table)):
            raise TypeError("Table needs a list of partitions, each an iterable of (key, value) pairs")
        self._partitions: list[Iterable[Record]] = list(partitions)

    @classmethod
    def from_partitions(cls, partitions: Iterable[Iterable[Record]]) -> Table:
        return cls(partitions)

    @property
    def num_partitions(self) -> int:
        return len(self._partitions)

    @property
    def partitions(self) -> list[list[Record]]:
        """Every partition as a list of records (materialised once)."""
        for i, p in enumerate(self._partitions):
            if not isinstance(p, list):
                self._partitions[i] = [(k, v) for k, v in p]
        return self._partitions  # type: ignore[return-value]  # each one is a list now (just above)

    def iter_partition(self, index: int) -> Iterator[Record]:
        yield from self._partitions[index]

    def raw_partition(self, index: int) -> Iterable[Record]:
        """The partition as given, for a sender that streams it without materialising."""
        return self._partitions[index]

    def collect(self) -> list[Record]:
        """All records, partition by partition."""
        return [rec for part in self.partitions for rec in part]

    def count(self) -> int:
        return sum(len(p) for p in self.partitions)

    def __len__(self) -> int:
        return self.count()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Table):
            return NotImplemented
        return [list(map(tuple, p)) for p in self.partitions] == [list(map(tuple, p)) for p in other.partitions]

    __hash__ = None  # type: ignore[assignment]  # unhashable: equal tables compare their contents

    def __repr__(self) -> str:
        return f"Table(num_partitions={self.num_partitions})"

    def __reduce__(self) -> tuple[Any, ...]:
        # A Table nested inside another object pickles as a plain list of lists,
        # rebuilt through the allow-listed constructor.
        return (Table, (self.partitions,))
