"""The Extism runtime (libextism, wasmtime inside), behind the few calls the provider makes.

The only module that imports ``extism``; the provider imports this one when it starts,
so loading a manifest never loads the native library. Everything here blocks and runs on
the provider's worker threads, except ``Instance.cancel``, which any thread may call:
libextism releases the GIL for the length of a call (cffi), so calls on several threads
run in parallel and the event loop keeps running.

Extism reports every failure as one string; ``CallFailed.kind`` sorts them: the host's
cancel (our deadline), the memory limit, a trap or exit of the module, or an error the
plugin set itself (``pdk.SetError``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import extism
from extism import extism as _extism

__all__ = ["CallFailed", "Compiled", "Instance", "runtime_version"]

#: The environment variable libextism reads, when it compiles, for wasmtime's cache config.
_CACHE_VARIABLE = "EXTISM_CACHE_CONFIG"
_cache_lock = threading.Lock()

#: ``host``: the dispatcher's side failed (its compile cache folder cannot be written).
FailureKind = Literal["cancelled", "memory", "trap", "plugin", "host"]


def runtime_version() -> str:
    return str(extism.extism_version())


class CallFailed(Exception):
    """One call ended without output."""

    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind: FailureKind = kind
        self.message = message


def _kind_of(message: str) -> FailureKind:
    if message == "timeout":  # libextism's word for a cancelled call
        return "cancelled"
    if message == "oom":
        return "memory"
    # A trap (unreachable, stack overflow…) carries wasmtime's backtrace; an exit (a Go
    # panic calls proc_exit) names its code. Anything else the plugin set itself.
    if "wasm backtrace" in message or message.startswith(("Error code", "Plugin exited")):
        return "trap"
    return "plugin"


class Compiled:
    """A module compiled with its sandbox options; instances are made from it.

    Always through wasmtime's on-disk cache in ``cache_dir``: libextism keeps no compiled
    module in memory between compiles (each costs seconds for a Go module), and a pool
    compiles once per lane. Left unset, libextism would use ``~/.cache/wasmtime``; the
    provider names the folder instead (the target's ``cache_dir`` or a private one).
    """

    def __init__(self, code: bytes, sha256: str, options: dict[str, Any], cache_dir: Path) -> None:
        manifest = {"wasm": [{"data": code, "hash": sha256}], **options}
        try:
            self._compiled = self._compile_cached(manifest, cache_dir)
        except extism.Error as error:
            raise CallFailed("trap", f"cannot compile the module: {error}") from error
        except OSError as error:  # the cache folder: not writable, not a folder, disk full
            raise CallFailed(
                "host", f"cannot use the compile cache in {cache_dir}: {error.strerror or error}"
            ) from error

    @staticmethod
    def _compile_cached(manifest: dict[str, Any], cache_dir: Path) -> Any:
        # wasmtime keys its cache by the module's bytes, the compiler settings and its own
        # version; a folder per libextism version keeps upgrades from sharing one.
        folder = cache_dir / f"extism-{runtime_version()}"
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "wasmtime-cache.toml"
        text = f'[cache]\ndirectory = "{folder}"\n'
        # libextism reads the variable (and the file) when it compiles; the lock keeps two
        # compiles from seeing each other's folder or a half-written file.
        with _cache_lock:
            if not config.exists() or config.read_text() != text:
                partial = config.with_suffix(".tmp")
                partial.write_text(text)
                partial.replace(config)
            previous = os.environ.get(_CACHE_VARIABLE)
            os.environ[_CACHE_VARIABLE] = str(config)
            try:
                return _extism.CompiledPlugin(manifest, wasi=True, functions=[])
            finally:
                if previous is None:
                    del os.environ[_CACHE_VARIABLE]
                else:
                    os.environ[_CACHE_VARIABLE] = previous

    def instantiate(self, config: dict[str, str]) -> Instance:
        try:
            plugin = extism.Plugin(self._compiled, wasi=True, config=config, functions=[])
        except extism.Error as error:
            raise CallFailed("trap", f"cannot instantiate the module: {error}") from error
        return Instance(plugin)

    def close(self) -> None:
        self._compiled.__del__()  # frees the native module now, not when collected


@dataclass(eq=False, slots=True)
class Instance:
    """One instance of a module: one call at a time, on any thread."""

    _plugin: Any
    _cancel: Any = None
    #: False once a call trapped: what is left of its memory is not to be trusted.
    healthy: bool = True

    def __post_init__(self) -> None:
        self._cancel = self._plugin.cancel_handle()

    def exports(self, name: str) -> bool:
        return bool(self._plugin.function_exists(name))

    def call(self, function: str, payload: bytes) -> bytes:
        try:
            return bytes(self._plugin.call(function, payload))
        except extism.Error as error:
            message = str(error)
            raise CallFailed(_kind_of(message), message) from None

    def cancel(self) -> None:
        """Stop the running call at its next instruction boundary (any thread)."""
        self._cancel.cancel()

    def close(self) -> None:
        self._plugin.__del__()
