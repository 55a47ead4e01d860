"""Plugins that dial in (reverse mode): who may connect as which plugin, and the hand-over.

The gateway accepts ``/v1/plugins/connect``, but it sits above the core and knows no
provider; ``Dispatcher.admit_plugin`` (this module's ``admit``) finds the plugin the
upgrade names among the manifest's plugins with an inbound target, authenticates the
credentials it presented (the target's own token, or a principal of the manifest's
``auth``: API key, JWT, client certificate), asks the provider whether that admits it,
and returns an ``Admission`` the gateway serves the upgraded connection through. The
provider then registers it as an instance of the plugin's fleet.

Refusals come before the upgrade, as HTTP statuses: ``Unauthorized`` (401), ``Forbidden``
(403), ``PluginNotFound`` (404) for an id that no inbound target of the manifest names —
to a principal of the manifest's ``auth`` only: without one, an unknown id is refused as
a known one with wrong credentials is (401, the same words), so ids cannot be probed.
A plugin holding one plugin's token cannot claim another's id: each target checks its own.

The gateway checks a connection's credentials again while it is open
(``dispatcher.gateway.rechecks``): ``admit`` again with the same ones, and the moment its
principal's proof expires is the ``Admission``'s ``expires_at``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dispatcher.config import Manifest, PluginSpec
from dispatcher.identity import ChainAuthenticator, Credentials
from linchkit_plugin.errors import DispatchError, PluginNotFound, Unauthorized
from providers.base import Provider
from providers.target import TargetConfig, connection_heartbeat

__all__ = ["WRONG_CREDENTIALS", "Admission", "admit"]

#: What a connection without credentials that admit it is told, whether or not its id is
#: one the manifest names (the websocket provider's refusal says the same).
WRONG_CREDENTIALS = "missing or wrong credentials for this plugin"


@dataclass(frozen=True, slots=True)
class Admission:
    """A plugin connection the dispatcher accepted; ``serve`` runs it until it closes."""

    plugin: PluginSpec[Any]
    provider: Provider[Any]
    targets: Sequence[TargetConfig]
    #: When the principal it presented stops being proven (``Principal.expires_at``); None:
    #: none, or one without an end. The next check may find it admitted by its token alone.
    expires_at: float | None = None

    @property
    def max_message_bytes(self) -> int | None:
        """The largest message the plugin may send on its connection: the largest its
        targets allow (``TargetConfig.inbound_message_limit``), the answer to each call
        then held to its own target's by the provider; None if none says."""
        limits = [limit for t in self.targets if (limit := t.inbound_message_limit())]
        return max(limits) if limits else None

    @property
    def heartbeat(self) -> float | None:
        """Seconds between pings of the plugin's connection: the heartbeat its provider
        bounds the connection's other liveness checks by (``connection_heartbeat``);
        None if its targets do not say."""
        return connection_heartbeat(self.targets)

    @property
    def compress(self) -> bool:
        """Whether the gateway accepts permessage-deflate on the plugin's connection, when
        the plugin offers it: as its targets say (``TargetConfig.inbound_compression``;
        the manifest refuses targets of one plugin that disagree), else not."""
        return any(target.inbound_compression() for target in self.targets)

    async def serve(self, connection: Any, peer: tuple[str, int]) -> None:
        await self.provider.accept(self.plugin, self.targets, connection, peer)


async def admit(
    manifest: Manifest[Any],
    providers: dict[str, Provider[Any]],
    authenticator: ChainAuthenticator | None,
    plugin_id: str,
    version: str | None,
    credentials: Credentials,
) -> Admission:
    candidates = [
        plugin
        for plugin in manifest.plugins
        if plugin.id == plugin_id
        and (version is None or plugin.version == version)
        and any(target.accepts_connections() for target in plugin.targets())
    ]
    principal = None
    expires_at = None
    if authenticator is not None:
        try:
            authenticated = await authenticator.authenticate(credentials)
        except DispatchError:
            pass  # the target's own token may still admit it
        else:
            principal, expires_at = authenticated.id, authenticated.expires_at
    if not candidates:
        if principal is None:
            raise Unauthorized(WRONG_CREDENTIALS)
        wanted = plugin_id if version is None else f"{plugin_id}@{version}"
        raise PluginNotFound(f"no plugin {wanted[:200]!r} takes inbound connections here")
    plugin = max(candidates, key=lambda each: _version_key(each.version))
    bearer = _bearer(credentials.authorization)
    targets = [target for target in plugin.targets() if target.accepts_connections()]
    provider = providers[targets[0].provider]
    for target in targets:
        await provider.admit(target, bearer=bearer, principal=principal)
    return Admission(plugin, provider, targets, expires_at)


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _version_key(version: str) -> tuple[Any, ...]:
    core = version.split("+", 1)[0].split("-", 1)[0]
    return tuple(int(part) if part.isdigit() else 0 for part in core.split("."))
