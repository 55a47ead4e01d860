"""What a reader of an etcd prefix keeps of it: the first keys in key order, a bounded number.

Whoever may write the prefix chooses how many keys it holds. A reader that kept every one
(to know which comes next when one of those it uses leaves) held them all: a million junk
keys, written one at a time while the prefix is watched, were a million entries in the
dispatcher's memory, when at most ``bound`` of them are ever used. ``FirstKeys`` keeps
those ``bound`` and only counts the others (``beyond``). The keys past the bound are not
known, so when one of the first leaves while some are past it, the reader cannot say
which comes next: ``remove`` says so, and the reader reads the prefix again
(``EtcdPrefix.follow``: ``on_change`` answering True), which tells it.

``beyond`` is exact after each read. Between reads it counts what it can tell from a
change it does not keep: a key etcd says is new (its ``version`` 1) adds one; a key
written again adds none, but makes ``beyond`` at least 1 (that key is past the bound);
a key past the bound that is deleted is not seen (its key is not kept), so ``beyond``
may be too high until the next read, which costs at most one read more than needed.
Free of I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["FirstKeys"]

T = TypeVar("T")


class FirstKeys(Generic[T]):
    """The first ``bound`` keys in key order, with their values; the others counted."""

    __slots__ = ("_keys", "_values", "beyond", "bound")

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._values: dict[str, T] = {}
        #: The keys of ``_values`` in order (at most ``bound``).
        self._keys: list[str] = []
        #: Keys with a value past the first ``bound`` (module docstring: exact after a read).
        self.beyond = 0

    def clear(self) -> None:
        """Before a read's keys are put again, in any order."""
        self._values, self._keys, self.beyond = {}, [], 0

    def put(self, key: str, value: T, *, created: bool) -> bool:
        """Keep ``key`` if it is among the first ``bound``; whether it is kept.

        ``created``: the key is new to the prefix (every key of a read, a put etcd says
        made the key), so one not kept counts one more past the bound."""
        if self.past(key, created=created):
            return False
        values, keys = self._values, self._keys
        if key not in values:
            if len(keys) == self.bound:
                # Among the first: the last kept one is now the first past the bound.
                del values[keys.pop()]
                self.beyond += 1
            bisect.insort(keys, key)
        values[key] = value
        return True

    def past(self, key: str, *, created: bool) -> bool:
        """Whether ``key`` falls past the bound, so would not be kept whatever its value:
        counted then (``put`` says how), and its value need not even be read."""
        keys = self._keys
        if len(keys) < self.bound or key <= keys[-1]:
            return False
        self.beyond = self.beyond + 1 if created else max(self.beyond, 1)
        return True

    def remove(self, key: str) -> bool:
        """Forget ``key``; True when it was kept and keys past the bound may take its
        place: only a new read of the prefix can tell which."""
        if key not in self._values:
            return False
        del self._values[key]
        del self._keys[bisect.bisect_left(self._keys, key)]
        return self.beyond > 0

    def get(self, key: str) -> T | None:
        return self._values.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def items(self) -> list[tuple[str, T]]:
        """The kept keys and their values, in key order."""
        values = self._values
        return [(key, values[key]) for key in self._keys]

    def values(self) -> list[T]:
        values = self._values
        return [values[key] for key in self._keys]

    def __repr__(self) -> str:
        return f"<FirstKeys {len(self._keys)}/{self.bound} beyond={self.beyond}>"
