"""``dispatcher``: validate a manifest, list, call and deploy plugins, check their health.

One module per family of commands; each registers its commands on the group in ``_app``.
"""

from __future__ import annotations

from dispatcher.cli import calls, deploy, manifest, new
from dispatcher.cli._app import main

__all__ = ["main"]

_COMMANDS = (calls, deploy, manifest, new)  # imported for the commands they register
