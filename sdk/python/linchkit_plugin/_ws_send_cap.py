"""The largest message a WebSocket session sends: its send cap, and what goes in place of
a frame over it.

The host closes a connection (1009) on a message over its read cap, and with it every
call and stream in flight there. So a session sends nothing over
``min(its own read cap, the host's announced cap)``: the host announces its cap in the
header ``ws_protocol.MAX_MESSAGE_BYTES_HEADER`` of the upgrade (the dispatcher's request
when it dials in; in reverse mode the gateway's answer, before the plugin sends anything)
and in reverse mode again in the gateway's ``welcome`` frame (``max_message_bytes``),
which replaces the answer's. An announcement
that is not a whole number from 1,024 to 2**53 is ignored: the session keeps its own cap.

In place of a frame over the cap:

* a ``response``: a ``response`` with the same id whose error is ``provider_error``,
  ``details`` ``{"reason": "too_large", "bytes": N, "limit": L}``;
* a stream's ``chunk``: the same error ends the stream, its producer stopped as a
  ``cancel`` stops it;
* an ``event``: nothing; the first on a connection is logged at WARNING.

The connection stays open for the other calls, streams and events.
"""

from __future__ import annotations

import re

from linchkit_plugin.errors import ProviderError
from linchkit_plugin.ws_protocol import announced_cap

__all__ = ["bare_name", "cap_of_header", "too_large"]

_DIGITS = re.compile(r"[0-9]{1,16}")


def cap_of_header(values: list[str]) -> int | None:
    """The cap an upgrade's ``LinchKit-Max-Message-Bytes`` headers announce
    (``values``, each one sent), or None: none, more than one, or not 1-16 ASCII digits
    of a value ``announced_cap`` takes. (A ``welcome``'s is ``announced_cap`` itself.)"""
    if len(values) != 1 or _DIGITS.fullmatch(values[0]) is None:
        return None
    return announced_cap(int(values[0]))


def bare_name(name: str) -> str:
    """A method's or event's name as these refusals show it: escaped as the SDK's messages
    show a name (a NUL or a newline written ``\\x00``, ``\\n``) and cut to 64 characters,
    but not quoted (``the result of config``), as in every SDK."""
    return repr(name[:64])[1:-1] + ("…" if len(name) > 64 else "")


def too_large(what: str, size: int, limit: int) -> ProviderError:
    """The error sent in place of a frame of ``size`` bytes over the cap ``limit``;
    ``what`` names the frame's payload (``the result of echo``)."""
    return ProviderError(
        f"{what} is {size} bytes, over the WebSocket message cap of {limit} bytes",
        details={"reason": "too_large", "bytes": size, "limit": limit},
    )
