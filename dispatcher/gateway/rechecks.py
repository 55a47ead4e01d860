"""When a connection admitted by its credentials checks them again.

An event stream (``/v1/events``) and a plugin dialling in (``/v1/plugins/connect``) are
authenticated at their upgrade and may stay open for days. Each checks the credentials it
presented again every ``RECHECK_SECONDS``, and once its principal's proof expires
(``Principal.expires_at``: a bearer token's ``exp``, with the leeway its check allows), so
a token expired, a key withdrawn or a manifest's token changed by a reload ends it within
that long, with ``CREDENTIALS_ENDED``. Only a refusal ends it: a check that could not be
made (a host authenticator's backend down, the dispatcher draining) leaves it open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from linchkit_plugin.errors import DispatchError, Forbidden, PluginNotFound, Unauthorized

__all__ = ["CREDENTIALS_ENDED", "RECHECK_SECONDS", "seconds_to_next_check", "until_refused"]

log = logging.getLogger("dispatcher.gateway")

#: The close code of a connection whose credentials no longer hold (RFC 6455: policy
#: violation).
CREDENTIALS_ENDED = 1008
#: How often a connection's credentials are checked again, besides when its principal's
#: proof expires: how long a revoked key or a changed role takes to reach it.
RECHECK_SECONDS = 60.0
#: How long after an ``expires_at`` the check comes: a token is refused only once the
#: clock has passed it.
_EXPIRY_MARGIN = 0.05


def seconds_to_next_check(expires_at: float | None) -> float:
    """How long to wait before the next check of credentials whose proof expires at
    ``expires_at`` (wall-clock seconds; None: never). Not at once, over and over, once it
    has passed: an authenticator that still accepts then is asked at the usual pace."""
    wait = RECHECK_SECONDS
    left = None if expires_at is None else expires_at - time.time()
    if left is not None and left > -_EXPIRY_MARGIN:
        wait = min(wait, max(left, 0.0) + _EXPIRY_MARGIN)
    return wait


async def until_refused(
    check: Callable[[], Awaitable[float | None]], expires_at: float | None
) -> None:
    """Check a connection's credentials again, as often as ``seconds_to_next_check``
    says, until they are refused: ``check`` raises ``Unauthorized``, ``Forbidden`` or
    ``PluginNotFound`` then, and returns when its new proof expires otherwise. A check
    that could not be made (another ``DispatchError``: a host authenticator's backend
    down, the dispatcher draining) is logged and made again at the next time."""
    while True:
        await asyncio.sleep(seconds_to_next_check(expires_at))
        try:
            expires_at = await check()
        except (Unauthorized, Forbidden, PluginNotFound):
            return
        except DispatchError as error:
            log.warning("could not check a connection's credentials again: %s", error)
