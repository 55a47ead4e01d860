"""How long a plugin's graceful stop waits, and how an operator sets it.

A plugin told to stop (SIGTERM, its host gone) gives the calls in flight ``grace`` to
finish, cuts off what still runs, and then gives its ``stop`` and ``destroy`` hooks
``hooks`` together; a hook still running then is abandoned and the process exits without
it (docs/protocol.md, "Stopping while called"). Both are 5 s unless set, as in every SDK.

Every executable and serve mode of the SDK (the gRPC executable in both modes, its
WebSocket modes, ``dispatcher-plugin serve`` and ``connect``) reads them once at start
from the environment, where a deployment sets them:

    LINCHKIT_PLUGIN_STOP_GRACE_MS    the drain of the calls in flight (and a WebSocket
                                     connection's goaway)
    LINCHKIT_PLUGIN_STOP_HOOKS_MS    the stop and destroy hooks, together

Each is a whole number of milliseconds from 0 to ``MAX_STOP_MS`` (10 minutes); unset or
empty keeps the default. 0 does not wait: a grace of 0 cuts the calls in flight off at
once, hooks of 0 abandon the hooks at once (the process exits without waiting for them).
Anything else (``5s``, ``1.5``, ``-1``, more than 10 minutes) is refused at start with
one line naming the variable, and the executable exits 1: a typo must not leave a plugin
that a platform kills 3 s after SIGTERM waiting 5 s, or one whose hooks flush a large
buffer cut off at a default nobody chose.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "MAX_STOP_MS",
    "STOP_GRACE_ENV",
    "STOP_GRACE_SECONDS",
    "STOP_HOOKS_ENV",
    "STOP_HOOKS_SECONDS",
    "StopCaps",
    "stop_ms",
]

#: How long the calls in flight at a stop may run on, counted from the stop (SIGTERM, the
#: host gone), before they are cut off and the plugin's ``stop`` and ``destroy`` hooks run,
#: unless ``LINCHKIT_PLUGIN_STOP_GRACE_MS`` says otherwise: 5 s, as in every SDK and every
#: binding (docs/protocol.md, "Stopping while called").
STOP_GRACE_SECONDS = 5.0
#: How long the ``stop`` and ``destroy`` hooks may take together when a plugin stops (after
#: its calls in flight were drained), unless ``LINCHKIT_PLUGIN_STOP_HOOKS_MS`` says
#: otherwise: 5 s, as in every SDK. A hook still running then is abandoned, so that the
#: process exits.
STOP_HOOKS_SECONDS = 5.0

STOP_GRACE_ENV = "LINCHKIT_PLUGIN_STOP_GRACE_MS"
STOP_HOOKS_ENV = "LINCHKIT_PLUGIN_STOP_HOOKS_MS"
#: The most either cap may be set to: 10 minutes, past any platform's wait between
#: SIGTERM and SIGKILL (a larger value is a mistake in the unit, seconds for milliseconds).
MAX_STOP_MS = 600_000

#: How much of a refused value its message quotes: the operator's own text, cut short.
_SHOWN_CHARACTERS = 40


@dataclass(frozen=True, slots=True, kw_only=True)
class StopCaps:
    """How long a stop waits, in seconds: ``grace`` for the calls in flight, then
    ``hooks`` for the ``stop`` and ``destroy`` hooks together. Each from 0 to
    ``MAX_STOP_MS`` milliseconds; ``ValueError`` otherwise."""

    grace: float = STOP_GRACE_SECONDS
    hooks: float = STOP_HOOKS_SECONDS

    def __post_init__(self) -> None:
        for name in ("grace", "hooks"):
            seconds = getattr(self, name)
            if not 0 <= seconds <= MAX_STOP_MS / 1000:  # NaN fails too
                raise ValueError(
                    f"the stop's {name} is a number of seconds from 0 to"
                    f" {MAX_STOP_MS // 1000}, not {seconds!r}"
                )

    @classmethod
    def from_environment(cls, environment: Mapping[str, str] | None = None) -> StopCaps:
        """The caps ``LINCHKIT_PLUGIN_STOP_GRACE_MS`` and ``_STOP_HOOKS_MS`` set in
        ``environment`` (default: this process's), the default for each one unset or empty;
        ``ValueError`` naming the variable for a value that is not a whole number of
        milliseconds from 0 to ``MAX_STOP_MS``."""
        environment = os.environ if environment is None else environment
        caps = {}
        for field, variable in (("grace", STOP_GRACE_ENV), ("hooks", STOP_HOOKS_ENV)):
            text = environment.get(variable, "")
            if text:
                caps[field] = stop_ms(variable, text) / 1000
        return cls(**caps)

    def __repr__(self) -> str:
        return f"<StopCaps grace={self.grace:g} s hooks={self.hooks:g} s>"


def stop_ms(name: str, text: str) -> int:
    """``text`` (the value of the variable ``name``) as a whole number of milliseconds
    from 0 to ``MAX_STOP_MS``; ``ValueError`` in one line that names ``name``, says the
    rule and quotes the value. Digits only: ``int`` would also take `` 5``, ``+5`` and
    ``5_000``, which no other SDK does."""
    if text.isascii() and text.isdigit():
        significant = text.lstrip("0") or "0"
        if len(significant) <= len(str(MAX_STOP_MS)) and int(significant) <= MAX_STOP_MS:
            return int(significant)
    shown = repr(text[:_SHOWN_CHARACTERS]) + ("…" if len(text) > _SHOWN_CHARACTERS else "")
    raise ValueError(
        f"{name} must be a whole number of milliseconds from 0 to {MAX_STOP_MS}"
        f" (10 minutes), not {shown}"
    )
