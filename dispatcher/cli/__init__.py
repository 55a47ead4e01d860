"""``dispatcher``: validate a manifest, list, call and load-test plugins, deploy and
remove them, check their health, submit async jobs and tend their dead letters, inspect
their sandboxes, read their logs, verify audit logs, print the manifest's JSON Schema,
scaffold a new plugin, run a local Lambda, serve the plugins over HTTP (the gateway),
watch a running gateway and steer its rollouts.

One module per family of commands; each registers its commands on the group in ``_app``.
"""

from __future__ import annotations

from dispatcher.cli import (
    audit,
    bench,
    calls,
    deploy,
    inspect,
    jobs,
    local_lambda,
    logs,
    manifest,
    new,
    remove,
    rollout,
    schema,
    serve,
    top,
)
from dispatcher.cli._app import main

__all__ = ["main"]

# Imported for the commands they register.
_COMMANDS = (
    audit,
    bench,
    calls,
    deploy,
    inspect,
    jobs,
    local_lambda,
    logs,
    manifest,
    new,
    remove,
    rollout,
    schema,
    serve,
    top,
)
