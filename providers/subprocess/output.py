"""``OutputRing``: the recent stderr lines of one plugin, across its restarts, for ``logs``.

Bounded twice, so a plugin that floods its stderr costs a fixed amount of memory: the ring
keeps the last ``capacity`` lines (each cut to ``max_line_chars``), and each follower reads
through a queue of at most ``capacity`` lines; a follower that falls that far behind is told
how many lines it missed instead of holding the plugin's output up or growing without end.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

__all__ = ["OutputRing"]


class _Follower:
    __slots__ = ("dropped", "queue")

    def __init__(self, capacity: int) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue(capacity)
        self.dropped = 0


class OutputRing:
    """The last lines a plugin wrote, and the lines it writes next to whoever follows."""

    def __init__(self, capacity: int = 1000, *, max_line_chars: int = 8192) -> None:
        self.capacity = capacity
        self.max_line_chars = max_line_chars
        self._lines: deque[str] = deque(maxlen=capacity)
        self._followers: set[_Follower] = set()

    def append(self, line: str) -> None:
        """Keep ``line`` (cut to ``max_line_chars``) and hand it to every follower."""
        if len(line) > self.max_line_chars:
            line = line[: self.max_line_chars] + " …(cut)"
        self._lines.append(line)
        for follower in self._followers:
            try:
                follower.queue.put_nowait(line)
            except asyncio.QueueFull:
                follower.dropped += 1

    def last(self, lines: int) -> list[str]:
        """The last ``lines`` lines kept (all of them when ``lines`` is negative)."""
        if lines < 0 or lines >= len(self._lines):
            return list(self._lines)
        return list(self._lines)[len(self._lines) - lines :] if lines else []

    async def follow(self, lines: int) -> AsyncIterator[str]:
        """The last ``lines`` lines, then every new one, until the caller stops iterating."""
        follower = _Follower(self.capacity)
        # Registered before the backlog is copied, with no await between: no line is lost
        # or repeated at the seam.
        self._followers.add(follower)
        try:
            for line in self.last(lines):
                yield line
            while True:
                yield await follower.queue.get()
                if follower.dropped and follower.queue.empty():
                    missed, follower.dropped = follower.dropped, 0
                    yield f"… {missed} lines missed: the reader fell behind"
        finally:
            self._followers.discard(follower)

    def __len__(self) -> int:
        return len(self._lines)

    def __repr__(self) -> str:
        return (
            f"<OutputRing {len(self._lines)}/{self.capacity} lines "
            f"followers={len(self._followers)}>"
        )
