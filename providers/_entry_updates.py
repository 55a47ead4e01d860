"""Handing a provider the new entry of a plugin version a reload changed.

``Provider.update`` takes it with no await, once the reload's routes are installed: the
reload is done by then, so an update that raises is logged with its traceback and raises
no further, wherever the version is attached: on a target the manifest lists
(``dispatcher._attachments``) or on an instance discovery brought to a fleet
(``dispatcher.fleet.discovered``). Both go through ``updated``, so a failure reads the same.
"""

from __future__ import annotations

import logging
from typing import Any

from providers.base import Provider
from providers.target import PluginInfo, TargetConfig

__all__ = ["updated"]

log = logging.getLogger("dispatcher")


def updated(provider: Provider[Any], plugin: PluginInfo, target: TargetConfig) -> bool:
    """``provider.update(plugin, target)``; False, logged, when it raised."""
    try:
        provider.update(plugin, target)
    except Exception:
        log.exception("reload: updating %s on %s failed", plugin.key, target.describe())
        return False
    return True
