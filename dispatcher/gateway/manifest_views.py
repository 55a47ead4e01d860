"""What a caller may see of the manifest (``ManifestViews``): the bodies of
``GET /v1/plugins`` and ``/openapi.json``, and the plugins it may call a method of.

Under the manifest's ``access`` a caller sees only what it may call: a caller refused a
method learns nothing of what exists beyond it, here as from a call's ``Forbidden``. Each
view is encoded once per manifest (a reload brings a new one), or once per set of roles
under ``access``, and kept for at most ``MAX_VIEWS`` role sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson

from dispatcher._dispatcher import Dispatcher
from dispatcher.config import Manifest
from dispatcher.gateway.openapi import Allows, openapi_document
from dispatcher.identity import Principal, refused

__all__ = ["MAX_VIEWS", "ManifestViews", "View"]

#: Role sets whose view of the manifest is kept (``ManifestViews.of``); past this, it
#: starts over.
MAX_VIEWS = 256


@dataclass(frozen=True, slots=True)
class View:
    """What a caller may see of the manifest: the bodies of ``GET /v1/plugins`` and
    ``/openapi.json``, and the plugins it may call a method of (whose errors it counts)."""

    plugins: bytes
    openapi: bytes
    plugin_ids: frozenset[str]


class ManifestViews:
    """The views of the dispatcher's manifest, made as callers ask and kept."""

    def __init__(
        self, dispatcher: Dispatcher, *, authenticated: bool, max_timeout_ms: int | None
    ) -> None:
        """``authenticated``: the gateway checks credentials (the OpenAPI document says
        so). ``max_timeout_ms``: the longest timeout a caller may ask for (None: no bound)."""
        self._dispatcher = dispatcher
        self._authenticated = authenticated
        self._max_timeout_ms = max_timeout_ms
        self._manifest = dispatcher.manifest
        #: Everything, as a caller sees it without ``access``.
        self.everything = self._view_of(None)
        self._views: dict[frozenset[str], View] = {}

    def of(self, principal: Principal | None) -> View:
        """What ``principal`` may see of the manifest: everything without ``access``;
        with it, what its roles allow (made on a role set's first request, then kept
        until a reload changes the manifest)."""
        dispatcher = self._dispatcher
        if dispatcher.manifest is not self._manifest:
            self._manifest = dispatcher.manifest
            self.everything = self._view_of(None)
            self._views.clear()
        if not dispatcher.checks_access:
            return self.everything
        if principal is None:  # access needs a principal, as a call does
            raise refused()
        roles = principal.roles
        view = self._views.get(roles)
        if view is None:
            if len(self._views) >= MAX_VIEWS:  # role sets come from tokens: bounded
                self._views.clear()
            view = self._views[roles] = self._view_of(partial(dispatcher.may_call, principal))
        return view

    def _view_of(self, allows: Allows | None) -> View:
        manifest = self._manifest
        return View(
            plugins=orjson.dumps({"plugins": _plugin_list(manifest, allows)}),
            openapi=orjson.dumps(
                openapi_document(
                    manifest,
                    authenticated=self._authenticated,
                    allows=allows,
                    max_timeout_ms=self._max_timeout_ms,
                )
            ),
            plugin_ids=frozenset(
                plugin.id
                for plugin in manifest.plugins
                if allows is None
                or any(allows(plugin.id, plugin.version, method) for method in plugin.methods)
            ),
        )


def _plugin_list(manifest: Manifest[Any], allows: Allows | None) -> list[dict[str, Any]]:
    """Each plugin version with the methods ``allows`` (None: every one); a version with
    none left is not listed."""
    listed = []
    for plugin in manifest.plugins:
        methods = [
            {
                "name": name,
                "description": spec.description,
                "path": f"/v1/plugins/{plugin.id}/methods/{name}",
                "params_schema": spec.params_schema,
            }
            for name, spec in sorted(plugin.methods.items())
            if allows is None or allows(plugin.id, plugin.version, name)
        ]
        if methods or allows is None:
            listed.append(
                {
                    "id": plugin.id,
                    "version": plugin.version,
                    "description": plugin.description,
                    "methods": methods,
                }
            )
    return listed
