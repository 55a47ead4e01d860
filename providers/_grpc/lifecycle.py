"""A plugin's lifecycle over the gRPC binding: the one sequence both providers run.

``begin``, once a connection to the plugin is open (the ``grpc`` provider with
``lifecycle: dispatcher`` on attach; the ``subprocess`` provider after every launch):

1. wait until the channel connects, within ``ready_timeout`` (``TargetUnavailable``);
   ``Describe`` the plugin: the connection keeps the methods it lists (``served``, which
   the provider reports to the dispatcher); if the manifest declares the plugin's
   ``protocol``, refuse (``ProviderError``) a plugin reporting another one — before it is
   initialised. Without a declared ``protocol`` a failed ``Describe`` (a plugin that does
   not implement it) only leaves the methods unknown, and it is given at most
   ``DESCRIBE_WAIT``: what it costs a plugin that answers is one RPC per start;
2. with an event sink, open the plugin's ``Events`` stream;
3. ``Init`` with the manifest's ``config``, then ``Start``, each within the plugin's
   ``lifecycle.init_timeout_ms``; a failure raises and the plugin is not started. A hook
   the plugin reports failed is ``ProviderError``, not retryable, naming the step and the
   plugin's error type (``providers._grpc.status.lifecycle_failure``). An ``Init`` that
   fails or times out gets no ``Stop`` nor ``Destroy`` (its RPC is cancelled at the
   timeout, which the SDKs pass on to the hook); a ``Start`` that fails gets ``Destroy``;
4. with an event sink, wait up to ``EVENTS_READY_WAIT`` for the plugin to answer the
   ``Events`` stream's headers, so what it emits from now on reaches the host
   (``docs/protocol.md``: plugins should send them at once; those that do not cost this
   much per start, no more).

``end``, before the connection closes: ``Stop``, then ``Destroy``, each within the
plugin's ``lifecycle.stop_timeout_ms``. A step that fails is logged and the next one
runs anyway: what follows (closing the channel, ending the process) must still happen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from linchkit_plugin.errors import DispatchError, ProviderError

if TYPE_CHECKING:
    from providers._grpc.connection import PluginConnection
    from providers.target import PluginInfo

__all__ = [
    "DESCRIBE_WAIT",
    "EVENTS_READY_WAIT",
    "again",
    "begin",
    "end",
    "hand_over",
    "restore",
]

log = logging.getLogger("dispatcher.providers.grpc")

#: How long ``begin`` waits for the ``Events`` stream's headers.
EVENTS_READY_WAIT = 0.25
#: How long ``begin`` waits for a ``Describe`` it only asks for the plugin's methods (no
#: ``protocol`` declared): the start must not wait an init timeout for a courtesy.
DESCRIBE_WAIT = 5.0


async def begin(
    connection: PluginConnection,
    plugin: PluginInfo,
    *,
    ready_timeout: float,
    event_sink: Callable[[str, Any], None] | None = None,
    destroy_on_failed_start: bool = True,
) -> None:
    """Connect, open ``Events`` (with ``event_sink``), ``Init``, ``Start``; raise on failure.

    ``destroy_on_failed_start=False``: a service another entry still uses gets no
    ``Destroy`` after a failed ``Start``; the caller puts its config back (``restore``)."""
    await connection.wait_ready(ready_timeout)
    init_timeout = plugin.lifecycle.init_timeout_ms / 1000
    if plugin.protocol is not None:
        await _check_protocol(connection, plugin, init_timeout)
    else:
        await _describe_quietly(connection, plugin, min(init_timeout, DESCRIBE_WAIT))
    _tell_identity(connection, plugin)
    if event_sink is not None:
        connection.open_events(event_sink)
    await _init_and_start(connection, plugin, init_timeout, destroy=destroy_on_failed_start)
    if event_sink is not None:
        await connection.events_ready(EVENTS_READY_WAIT)


async def again(connection: PluginConnection, plugin: PluginInfo) -> None:
    """``Describe`` (the protocol check and the identity warning as in ``begin``),
    ``Init``, ``Start``: for a plugin its connection found again after it was lost
    (``providers._grpc.restarts``). What the connection kept of the last ``Describe``
    (``served``, ``identity``) is that of the plugin found again, or None when it does not
    say: the provider reports it as after ``begin``, whether or not ``Init`` then fails.

    The protocol gives a process no identity of its own, so a lost connection to the same
    process (a proxy's reset, a server's maximum connection age) also gets them: a
    plugin's ``Init`` must take being run again with the same config.
    """
    log.info(
        "%s on %s: the connection was lost and is back: running Init and Start again"
        " (a restarted service would otherwise run unconfigured)",
        plugin.key,
        connection.describe,
    )
    # What the process before said of itself holds no longer: the one found again may be
    # another build. Its own Describe says it again, or it stays unknown (None).
    connection.served = connection.identity = None
    init_timeout = plugin.lifecycle.init_timeout_ms / 1000
    if plugin.protocol is not None:
        await _check_protocol(connection, plugin, init_timeout)
    else:
        await _describe_quietly(connection, plugin, min(init_timeout, DESCRIBE_WAIT))
    _tell_identity(connection, plugin)
    try:
        await _init_and_start(connection, plugin, init_timeout)
    except DispatchError as error:
        log.error("%s on %s: %s", plugin.key, connection.describe, error)
        raise


async def hand_over(connection: PluginConnection, plugin: PluginInfo, leaving: PluginInfo) -> None:
    """``Init`` and ``Start`` with ``plugin``'s config, for a service whose last ``Init``
    was ``leaving``'s, which no longer uses it (``providers._grpc.sharing``): nothing to
    send when their configs are equal. Raise on failure."""
    if plugin.config == leaving.config:
        return
    log.info(
        "%s on %s: %s had its last Init and is gone: running Init and Start again with %s's config",
        plugin.key,
        connection.describe,
        leaving.key,
        plugin.key,
    )
    await _init_and_start(connection, plugin, plugin.lifecycle.init_timeout_ms / 1000)


async def restore(connection: PluginConnection, plugin: PluginInfo, failed: PluginInfo) -> None:
    """``Init`` and ``Start`` with ``plugin``'s config again, on a service ``plugin`` still
    uses after ``failed``'s ``begin`` there failed (its ``Init`` may have run). Failures
    are logged: ``plugin``'s calls then fail as after a failed restart."""
    log.warning(
        "%s on %s: the failed start of %s ran its lifecycle there: running Init and Start"
        " again with %s's config",
        plugin.key,
        connection.describe,
        failed.key,
        plugin.key,
    )
    try:
        await _init_and_start(connection, plugin, plugin.lifecycle.init_timeout_ms / 1000)
    except DispatchError as error:
        log.error("%s on %s: %s", plugin.key, connection.describe, error)


async def _init_and_start(
    connection: PluginConnection, plugin: PluginInfo, timeout: float, *, destroy: bool = True
) -> None:
    """``Init``, then ``Start``. An ``Init`` that fails or times out (its RPC cancelled,
    which every SDK passes on to the hook) gets nothing more: ``Destroy`` undoes an
    ``Init`` that succeeded, and is not sent while the hook may still run. A ``Start``
    that fails gets ``Destroy`` for the ``Init`` before it (unless ``destroy`` is
    False), never ``Stop``."""
    await connection.lifecycle("Init", timeout, plugin.config)
    try:
        await connection.lifecycle("Start", timeout)
    except DispatchError:
        if destroy:
            await _destroy_quietly(connection, plugin)
        raise


async def _destroy_quietly(connection: PluginConnection, plugin: PluginInfo) -> None:
    try:
        await connection.lifecycle("Destroy", plugin.lifecycle.stop_timeout_ms / 1000)
    except DispatchError as error:
        log.warning("%s Destroy after a failed Start failed: %s", plugin.key, error)


#: (plugin key, reported id, reported version) already warned of: once, not per launch.
_TOLD_IDENTITIES: set[tuple[str, str, str]] = set()


def _tell_identity(connection: PluginConnection, plugin: PluginInfo) -> None:
    """Warn once when the plugin's ``Describe`` names another id or version than the
    manifest. Not refused: the gRPC binding does not ask them to match (the WebSocket
    ``hello`` does), and calls name the plugin by the manifest's id; but a mismatch is
    most often the wrong build or a copied manifest entry. An empty field says nothing."""
    if connection.identity is None:
        return
    reported_id, reported_version = connection.identity
    differs = (reported_id and reported_id != plugin.id) or (
        reported_version and reported_version != plugin.version
    )
    told = (plugin.key, reported_id, reported_version)
    if not differs or told in _TOLD_IDENTITIES:
        return
    if len(_TOLD_IDENTITIES) >= 4096:  # bounded whatever reloads bring
        _TOLD_IDENTITIES.clear()
    _TOLD_IDENTITIES.add(told)
    log.warning(
        "%s on %s: the plugin reports itself as %s version %s, the manifest names it %s"
        " version %s: calls go to it under the manifest's id; check the build deployed"
        " there, or the manifest",
        plugin.key,
        connection.describe,
        reported_id[:64] or "(no id)",
        reported_version[:64] or "(no version)",
        plugin.id,
        plugin.version,
    )


async def _describe_quietly(
    connection: PluginConnection, plugin: PluginInfo, timeout: float
) -> None:
    """``Describe`` for the methods alone: a plugin that cannot answer still starts."""
    try:
        await connection.identify(timeout)
    except DispatchError as error:
        log.debug("%s on %s: no Describe (%s)", plugin.key, connection.describe, error)


async def _check_protocol(connection: PluginConnection, plugin: PluginInfo, timeout: float) -> None:
    reported = await connection.identify(timeout)
    # 0 is proto3's unset: a plugin that does not report one is taken at its manifest's word.
    if reported and reported != plugin.protocol:
        raise ProviderError(
            f"{plugin.key} on {connection.describe} speaks plugin protocol {reported}, but the"
            f" manifest declares protocol {plugin.protocol}: refusing to attach it; deploy a"
            " build of the plugin for that protocol or correct the manifest",
            details={"reported": reported, "declared": plugin.protocol},
        )


async def end(connection: PluginConnection, plugin: PluginInfo) -> None:
    """``Stop``, then ``Destroy``; failures are logged, never raised."""
    stop_timeout = plugin.lifecycle.stop_timeout_ms / 1000
    for step in ("Stop", "Destroy"):
        try:
            await connection.lifecycle(step, stop_timeout)
        except DispatchError as error:
            log.warning("%s %s failed: %s", plugin.key, step, error)
        except Exception:  # not the plugin's answer: a bug here, but the teardown goes on
            log.exception("%s %s on %s failed", plugin.key, step, connection.describe)
