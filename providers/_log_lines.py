"""How what a peer sends reaches a log line or a terminal: escaped, and not at every repeat.

A plugin's, a caller's or a registry's words may hold line breaks (which would start a
record of the peer's making in a text log) and escape sequences (which rewrite an
operator's terminal): ``printable`` escapes them. A peer that does the same wrong thing
thousands of times must not choose how many lines the host writes: ``sparingly`` says
which repeats are logged.
"""

from __future__ import annotations

__all__ = ["printable", "sparingly"]


def printable(text: str, keep: str = "") -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``), the rest and those
    in ``keep`` (a log line's tabs) as they are."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or c in keep else c.encode("unicode_escape").decode() for c in text
    )


def sparingly(count: int) -> bool:
    """Whether the ``count``-th of something a peer does again and again is logged: the
    first, the 1,000th and every 100,000th."""
    return count in (1, 1000) or count % 100_000 == 0
