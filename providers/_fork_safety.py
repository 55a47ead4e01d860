"""grpcio's fork handlers, off in a process whose children exec at once.

grpc core registers ``pthread_atfork`` handlers unless ``GRPC_ENABLE_FORK_SUPPORT`` says
not to, and reads that variable once, when ``grpc`` is first imported. The subprocess
provider starts a plugin with asyncio's subprocess support: ``fork``, then ``exec``.
With grpc's threads busy in calls (the plugins already started, the gateway's gRPC
port), the handlers skip their work ("Other threads are currently calling into gRPC,
skipping fork() handlers") and the child, before it reached ``exec``, ran grpc's poller
code and died of SIGABRT or SIGSEGV: with twelve subprocess plugins in one manifest,
``dispatcher serve`` failed to start in 4 runs of 5 (``tests/test_subprocess_fork.py``).
A child that execs never uses what it inherited of grpc, so the handlers have nothing
to do for the dispatcher's children; they only serve a process that forks to go on
using grpc in the child, which grpc supports only with the ``poll`` engine anyway.

So the variable is set, unless the environment sets it, as ``providers`` is imported:
before any provider imports grpc. A host that imported grpc earlier is too late for it;
``note_late_grpc`` says so once, when a plugin process is first started.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["FORK_SUPPORT_VARIABLE", "note_late_grpc"]

FORK_SUPPORT_VARIABLE = "GRPC_ENABLE_FORK_SUPPORT"

#: grpc was imported before this module with its fork handlers left on (the default).
_GRPC_CAME_FIRST = "grpc" in sys.modules and FORK_SUPPORT_VARIABLE not in os.environ
os.environ.setdefault(FORK_SUPPORT_VARIABLE, "false")

_noted = False


def note_late_grpc(log: logging.Logger) -> None:
    """Warn, once per process, when grpc was imported before the dispatcher could turn
    its fork handlers off: plugin processes may then die as they start."""
    global _noted
    if _GRPC_CAME_FIRST and not _noted:
        _noted = True
        log.warning(
            "grpc was imported before the dispatcher, with its fork handlers on: a plugin"
            " process may die as it starts (SIGABRT or SIGSEGV before its handshake). Set"
            " %s=false in the environment, or import the dispatcher before grpc",
            FORK_SUPPORT_VARIABLE,
        )
