"""The gateway's rollout routes (``docs/gateway.md``), registered by
``dispatcher.gateway.app``:

    GET  /v1/rollouts                            every rollout and shadow, step and counters
    POST /v1/rollouts/{plugin}/{method}:{action} pause, resume or abort a rollout (no body)

Both are authenticated as a call is. A caller sees the rollouts of the methods it may call
(at the version each rolls out to), and steers one only if ``access`` lets it call the
method. Neither takes a body: one sent is refused, and the answer closes the connection.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from dispatcher._dispatcher import Dispatcher
from dispatcher._rollout import shown_to
from dispatcher.gateway.errors import error_answer
from dispatcher.gateway.manifest_views import ManifestViews
from dispatcher.identity import Principal
from linchkit_plugin.errors import DispatchError, InvalidParams

__all__ = ["RolloutRoutes"]

#: A plugin id or method name as the manifest admits it (``IDENTIFIER``), at most 256 long.
_MANIFEST_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,255}\Z")


class RolloutRoutes:
    """The handlers of ``/v1/rollouts`` over one started ``Dispatcher``."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        views: ManifestViews,
        *,
        authenticate: Callable[[web.Request], Awaitable[Principal | None]],
    ) -> None:
        """``authenticate``: the gateway's, which raises ``Unauthorized``/``Forbidden``."""
        self.dispatcher = dispatcher
        self._views = views
        self._authenticate = authenticate

    async def rollouts(self, request: web.Request) -> web.Response:
        """Every rollout and shadow with its step and counters (``stats()["rollouts"]``)
        of a method the caller may call (at the version it rolls out to)."""
        try:
            principal = await self._authenticate(request)
            view = self._views.of(principal)
            _no_body(request)
        except DispatchError as error:
            return error_answer(error, close=request.body_exists)
        rollouts = self.dispatcher.stats()["rollouts"]
        if view is not self._views.everything:
            may_call = self.dispatcher.may_call
            rollouts = {
                name: rollout
                for name, rollout in rollouts.items()
                if may_call(principal, rollout["plugin"], rollout["to"], rollout["method"])
            }
        caller = principal.id if principal is not None else None
        shown = {name: shown_to(rollout, caller) for name, rollout in rollouts.items()}
        return web.json_response({"rollouts": shown})

    async def control_rollout(self, request: web.Request) -> web.Response:
        """``POST /v1/rollouts/{plugin}/{method}:pause|resume|abort``, authenticated and
        checked against ``access`` like a call of the method. The names are checked here,
        before ``access`` sees them: a name no manifest could hold is the caller's mistake
        (400), not a refusal (403), and is never echoed back."""
        try:
            principal = await self._authenticate(request)
            _no_body(request)
            plugin, method, action = _rollout_target(request.match_info)
            stats = self.dispatcher.control_rollout(plugin, method, action, caller=principal)
        except DispatchError as error:
            return error_answer(error, close=request.body_exists)
        return web.json_response({"ok": True, "rollout": stats})


def _no_body(request: web.Request) -> None:
    """Refuse a body on a route that takes none: it is a client expecting its parameters
    read, and left unread it must not be taken for the next request (the answer closes)."""
    if request.body_exists:
        raise InvalidParams(f"{request.path[:80]} takes no body: the URL says everything")


def _rollout_target(match: Any) -> tuple[str, str, str]:
    """``plugin``, ``method`` and ``action`` of ``/v1/rollouts/{plugin}/{method}:{action}``."""
    plugin = match["plugin"]
    method, colon, action = match["action"].rpartition(":")
    if not colon:
        raise InvalidParams("say what to do: /v1/rollouts/{plugin}/{method}:pause|resume|abort")
    if not _MANIFEST_NAME.match(plugin):
        raise InvalidParams("the plugin in the URL is not a plugin id of any manifest")
    if not _MANIFEST_NAME.match(method):
        raise InvalidParams("the method in the URL is not a method name of any manifest")
    return plugin, method, action
