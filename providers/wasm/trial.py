"""A module's first instance made once in a process of its own, before the dispatcher's.

libextism runs a reactor module's start code (``_initialize``: Go's ``init`` functions) as
it links the module, when the instance's pointer to its store is still null; start code
that calls a host function with arguments then (``http_request``, libextism's own
``config_get`` or ``var_get``: a Go ``init`` that reads the plugin's config) ends the
process inside libextism with SIGSEGV, before any function of the dispatcher's is reached
(``providers.wasm.runtime``). In the dispatcher's process that is every plugin's outage,
and a restart meets it again. So before the first instance of a module is made in the
dispatcher, one is made here, in a child process, from the same bytes, sandbox options
and config: a child that a signal ends is the module refused at attach, in one line that
says why and what to move; the dispatcher stays up.

A verdict holds for the process (``_LINKED``, by module digest, options and config): a
module the trial passed is not tried again by later attaches, reloads or dispatchers.
Start code that behaves otherwise from one instance to the next (the clock, random bytes)
can still pass the trial and crash later: the trial catches the honest mistake, it does
not make libextism safe against a module written to evade it.

The child's instance gets no files (``allowed_paths`` emptied) and its output goes
nowhere, and ``http_request`` sends nothing from start code: the extra run of the start
code leaves nothing the plugin could see (a start code that counts its runs in a file, or
traps after its first, sees only the dispatcher's). Start code that needs its files may
trap there first; the trial then passes, as for any trap.

The child reads the module's bytes from its stdin (not the file again: it may have
changed since its pin was checked), compiles through the same wasmtime cache (so the
dispatcher's own compile that follows is a cache hit), makes one instance and exits 0;
its output goes nowhere. A trap or a failure to compile also exits 0: the dispatcher's
own attempt reports those, typed. The trial is bounded by the attach's
``start_timeout_ms`` like the rest of the attach; a child past it is killed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import orjson

from providers.wasm.module import ModuleRefused, PinnedModule

__all__ = ["link_in_a_child"]

#: Verdicts kept before they are forgotten (one more trial each, not memory growing).
_KEPT = 1024
_LINKED: set[str] = set()
_UNTRIED_SAID = False

log = logging.getLogger("dispatcher.providers.wasm")


async def link_in_a_child(
    module: PinnedModule, options: dict[str, Any], config: dict[str, str], cache_dir: Path
) -> None:
    """Make one instance of ``module`` in a child process; ``ModuleRefused`` if a signal
    ended it. Cancelling (the attach's timeout) kills the child."""
    verdict = _verdict_key(module, options, config)
    if verdict in _LINKED:
        return
    unseen = {**options, "allowed_paths": {}}
    header = orjson.dumps({"options": unseen, "config": config, "cache_dir": str(cache_dir)})
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            __name__,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)},
        )
    except (OSError, ValueError) as error:  # no interpreter to run (an embedded Python)
        _say_untried(error)
        return
    try:
        await child.communicate(header + b"\n" + module.code)
    except BaseException:
        if child.returncode is None:
            child.kill()
            await child.wait()
        raise
    if child.returncode is not None and child.returncode < 0:
        raise ModuleRefused(_refusal(module, -child.returncode))
    if len(_LINKED) >= _KEPT:
        _LINKED.clear()
    _LINKED.add(verdict)


def _say_untried(error: BaseException) -> None:
    global _UNTRIED_SAID
    if not _UNTRIED_SAID:
        _UNTRIED_SAID = True
        log.warning(
            "wasm modules are not tried in a child process first (%s cannot be run: %s):"
            " start code that libextism cannot link would end this process",
            sys.executable or "no Python interpreter",
            type(error).__name__,
        )


def _verdict_key(module: PinnedModule, options: dict[str, Any], config: dict[str, str]) -> str:
    settings = orjson.dumps([options, config], option=orjson.OPT_SORT_KEYS)
    return module.sha256 + hashlib.sha256(settings).hexdigest()


def _refusal(module: PinnedModule, signal_number: int) -> str:
    try:
        name = signal.Signals(signal_number).name
    except ValueError:
        name = f"signal {signal_number}"
    return (
        f"the wasm module {module.path.name} ended a process of its own ({name}) as its"
        " first instance was made: libextism cannot run start code (a reactor's"
        " _initialize, Go's init functions) that calls a host function with arguments"
        " (http_request, config_get, var_get) as it links the module. Refused, so it"
        " cannot end the dispatcher's process: move that work from start code into the"
        " plugin's methods"
    )


def _main() -> None:
    from providers.wasm.runtime import CallFailed, Compiled

    header, _, code = sys.stdin.buffer.read().partition(b"\n")
    settings = orjson.loads(header)
    sha256 = hashlib.sha256(code).hexdigest()
    try:
        compiled = Compiled(code, sha256, settings["options"], Path(settings["cache_dir"]))
        compiled.instantiate(settings["config"]).close()
    except CallFailed:
        pass  # a trap or a compile error: the dispatcher's own attempt reports it, typed


if __name__ == "__main__":
    _main()
