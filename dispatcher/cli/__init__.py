"""``dispatcher``: validate a manifest, list, call and load-test plugins, deploy and
remove them, check their health, submit async jobs and tend their dead letters, inspect
their sandboxes, read their logs, verify audit logs, print the manifest's JSON Schema,
scaffold a new plugin, run a local Lambda, serve the plugins over HTTP (the gateway),
watch a running gateway and steer its rollouts.

One module per family of commands; each registers its commands on the group in ``_app``,
once a command of it is looked up (``_app.COMMAND_MODULES``).
"""

from __future__ import annotations

from dispatcher.cli._app import COMMAND_MODULES, main

__all__ = ["COMMAND_MODULES", "main"]
