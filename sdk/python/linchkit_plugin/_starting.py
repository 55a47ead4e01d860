"""How a server's start ends before it serves: a signal during the plugin's
``init``/``start`` hooks, or one of them failing.

A SIGTERM or SIGINT while the plugin's ``init``/``start`` hooks run ends the process.

A server told to stop before it serves has nothing to drain, and no hook to wait for: the
start it is in has not finished, and may never (an ``init`` waiting on a database that
never answers). Both ``dispatcher-plugin serve`` modes used to note the signal and go on
waiting for the start, so only SIGKILL ended a plugin stuck there, and an orchestrator
waited out its whole kill timeout for it.

So a signal then says, in one line, that the start did not finish, and exits 1 at once
with ``os._exit``: a sync hook runs on a thread the interpreter would join at exit, and an
async one may swallow its cancellation, so no orderly exit is prompt. Nothing is listening
yet, nothing is registered, no call has run: nothing is lost.

A hook that fails (raises anything, ``sys.exit()`` too) is ``StartFailed``, which the
command says in one line and exit 1 (``open_plugin``): over HTTP it was uvicorn's two
log lines and exit 3, over WebSocket a traceback, or for ``sys.exit(5)`` exit 5 unsaid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any, NoReturn

from linchkit_plugin._method_failures import described
from linchkit_plugin.host import PluginHost

__all__ = ["StartFailed", "end_the_start", "open_plugin", "signals_end_the_start"]

#: The signals that stop a server, and end a start.
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def end_the_start(signal_number: int, command: str = "serve") -> NoReturn:
    """Say that the plugin's start did not finish because of ``signal_number`` and exit 1
    now, in one line that ``command`` begins, as its other refusals to serve do."""
    name = signal.Signals(signal_number).name
    with contextlib.suppress(Exception):
        print(
            f"{command}: {name} before the plugin's init/start finished: exiting without serving",
            file=sys.stderr,
            flush=True,
        )
    for handler in logging.getLogger().handlers:  # what the plugin logged before
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(1)


@contextlib.contextmanager
def signals_end_the_start(command: str = "serve") -> Iterator[None]:
    """While inside it, SIGTERM and SIGINT end the process (``end_the_start``); the
    handlers before it are put back after. Handled in the main thread by Python itself,
    not on the event loop: a hook that blocks the loop cannot hold the signal back. Off
    the main thread, where no signal can be watched, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ended(signal_number: int, frame: FrameType | None) -> None:
        end_the_start(signal_number, command)

    previous = {each: signal.signal(each, ended) for each in _SIGNALS}
    try:
        yield
    finally:
        for each, handler in previous.items():
            signal.signal(each, handler)


class StartFailed(Exception):
    """The plugin's ``init`` or ``start`` hook failed; its text says which, and how."""


async def open_plugin(host: PluginHost, config: dict[str, Any]) -> None:
    """``host.open(config)``, a hook's failure (anything it raised but its cancellation)
    raised as ``StartFailed``, described as a refusal's line can carry it."""
    try:
        await host.open(config)
    except asyncio.CancelledError:
        raise
    except BaseException as error:  # sys.exit() in a hook too: the start failed
        hook = "init" if host.state == "created" else "start"
        raise StartFailed(f"the plugin's {hook} hook failed: {described(error)}") from error
