"""How a plugin executable's log lines reach its stderr."""

from __future__ import annotations

import logging

__all__ = ["LOG_FORMAT", "log_to_stderr"]

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def log_to_stderr(*, info_from: str | None = None) -> None:
    """Print what the plugin logs on stderr, each line starting with its level, so a host
    reading this process's stderr keeps it (a WARNING here stays one there). A plugin that
    configured its own logging before keeps its own, and nothing changes.

    ``info_from``: a logger whose INFO lines are printed too (Python's default level is
    WARNING). A dialling plugin's ``linchkit_plugin.websocket`` says there that it cannot
    reach the gateway and that it reconnects, as the other SDKs print it: without it, a
    plugin given a wrong URL said nothing after "dialling", for ever."""
    if logging.getLogger().handlers:
        return
    logging.basicConfig(format=LOG_FORMAT)
    if info_from is not None:
        logging.getLogger(info_from).setLevel(logging.INFO)
