"""``WasmProvider``: WebAssembly plugins in the dispatcher's process (``providers.wasm``).

Attach reads the module, checks its pin, compiles it (in a thread; once per lane of
the pool, ``providers.wasm.pool``), checks that it exports every method of the manifest and keeps a pool of its
instances; calls run on the pool's threads. Error mapping, at this boundary:

    the plugin's own error (``pdk.SetError``)   its JSON error → the typed error of its
                                                ``type``; plain text → PluginError
                                                (remote_type ``ExtismError``)
    the call's deadline passed                  DeadlineExceeded (the instance is dropped)
    every instance busy until the deadline      DeadlineExceeded (naming ``pool_size``)
    the plugin detached before the call began   TargetUnavailable (retryable)
    ``cpu_s`` of its capabilities used up       LimitExceeded(limit="cpu_s")
    linear memory past ``memory_mb``            LimitExceeded(limit="memory_mb")
    a trap or an exit (Go panic, unreachable)   ProviderError; the dispatcher keeps serving
    a method the module does not export         MethodNotFound (refused at attach; a
                                                reload adding one to an attached version
                                                says it, as for any plugin that does not
                                                serve a routed method: ``update``)
    a module missing, unreadable, not pinned    ModuleRefused (a ProviderError) at attach
    an HTTP request refused (not granted, a     NetworkRefused / EgressRefused (ProviderErrors,
    malformed one, the egress policy)           naming the host), logged as a security
                                                incident; nothing was sent
    an HTTP request's body past the bound       LimitExceeded(limit="http_request_body_bytes")
    an HTTP answer past the bound               LimitExceeded(limit="http_response_bytes")
    libextism could not set the call up on the  TargetUnavailable (stage connect: the module
    instance (``runtime``)                      did not run); the instance is replaced
    an HTTP request that failed                 ProviderError naming the host and why
                                                (``providers.wasm.http_host``)

A refused HTTP request comes first: it stopped the module, and the deadline (or cpu_s)
reached before the module's thread was back (a host call it made after, a WASI sleep)
does not hide it as a timeout. A refusal whose thread comes back after its caller was
answered is logged then (``InstancePool``'s ``on_late_failure``).

The names the modules' requests look up are resolved on the provider's own ``Resolver``
(``providers.wasm.resolver``), started with it, shared by its plugins and closed with it.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import shutil
import tempfile
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from linchkit_plugin.errors import (
    DeadlineExceeded,
    MethodNotFound,
    PluginError,
    ProviderError,
    TargetUnavailable,
    error_from_wire,
)
from linchkit_plugin.wire import encode_json
from providers.base import CONNECT_STAGE, Health, Provider
from providers.capabilities import LimitExceeded, Translation
from providers.served import served_names
from providers.wasm.http_host import HttpGrant, is_refusal
from providers.wasm.module import exported_functions, read_pinned
from providers.wasm.pool import CallResult, InstancePool
from providers.wasm.resolver import Resolver
from providers.wasm.sandbox import sandbox_of
from providers.wasm.target import WasmTarget
from providers.wasm.trial import link_in_a_child

if TYPE_CHECKING:
    from types import ModuleType

    from linchkit_plugin.errors import DispatchError
    from providers.invocation import Invocation
    from providers.target import PluginInfo
    from providers.wasm.runtime import CallFailed

__all__ = ["WasmProvider"]

log = logging.getLogger("dispatcher.providers.wasm")


class _Attached:
    """One plugin on one target: its pool and the limits its calls run under."""

    def __init__(
        self, pool: InstancePool, memory_mb: int, cpu_s: float | None, translation: Translation
    ) -> None:
        self.pool = pool
        self.memory_mb = memory_mb
        self.cpu_s = cpu_s
        self.translation = translation
        #: The functions the module exports (``exported_functions``); None for a module
        #: in the text format, whose exports only its instances can say.
        self.exported: frozenset[str] | None = frozenset()
        #: The manifest's methods, and whether the module exports each.
        self.exports: dict[str, bool] = {}


class WasmProvider(Provider[WasmTarget]):
    name = "wasm"
    target_model = WasmTarget
    delivers_events = False  # no channel from the plugin back to the host

    def __init__(self) -> None:
        self._runtime: ModuleType | None = None
        self._attached: dict[tuple[str, str, str], _Attached] = {}
        self._scratch: Path | None = None
        self._resolver: Resolver | None = None

    async def start(self) -> None:
        try:
            self._runtime = importlib.import_module("providers.wasm.runtime")
        except ImportError as error:
            raise ProviderError(
                f"wasm targets need the Extism runtime ({error}): "
                "pip install 'linchkit-dispatcher[wasm]'"
            ) from error
        # Targets without a cache_dir compile into this one: their lanes reuse the first
        # compile, and nothing is left behind when the dispatcher stops.
        self._scratch = Path(tempfile.mkdtemp(prefix="linchkit-wasm-"))
        self._resolver = Resolver()

    async def attach(self, plugin: PluginInfo, target: WasmTarget) -> None:
        key = (plugin.id, plugin.version, target.key)
        if key in self._attached:
            return
        runtime = self._runtime
        if runtime is None or self._scratch is None or self._resolver is None:
            raise ProviderError("the wasm provider is not started")
        module = await asyncio.to_thread(read_pinned, target.module, target.sha256)
        sandbox = sandbox_of(plugin.capabilities, plugin.config)
        for line in sandbox.translation.unenforced:
            log.warning("%s on %s: %s", plugin.key, target.describe(), line)
        network = (
            HttpGrant(
                sandbox.hosts,
                sandbox.networks,
                self.egress,
                max_response_bytes=sandbox.max_response_bytes,
                max_request_body_bytes=sandbox.max_request_body_bytes,
                resolver=self._resolver,
            )
            if sandbox.hosts or sandbox.networks
            else None
        )
        cache_dir = target.cache_dir or self._scratch
        pool = InstancePool(
            plugin.key,
            functools.partial(
                runtime.Compiled,
                module.code,
                module.sha256,
                sandbox.manifest_options,
                cache_dir,
                network,
            ),
            sandbox.config,
            size=target.pool_size,
            reuse=target.instances == "pooled",
            on_late_failure=functools.partial(_failed_late, plugin.id),
        )
        attached = _Attached(pool, sandbox.memory_mb, sandbox.cpu_s, sandbox.translation)
        try:
            async with asyncio.timeout(target.start_timeout_ms / 1000):
                # Start code that would end this process ends a child's instead.
                await link_in_a_child(module, sandbox.manifest_options, sandbox.config, cache_dir)
                instance = await pool.warm()
            missing = [name for name in plugin.methods if not instance.exports(name)]
        except BaseException as error:
            # Cancelled too (a reload's caller gave up): the pool's thread would wait for
            # jobs for as long as the process lives.
            await pool.aclose()
            if isinstance(error, runtime.CallFailed):
                raise ProviderError(f"{plugin.key}: {module.path}: {error.message}") from None
            if isinstance(error, TimeoutError):
                raise ProviderError(
                    f"{plugin.key}: {module.path}: compiling the module and starting an"
                    f" instance took longer than start_timeout_ms ({target.start_timeout_ms}"
                    " ms): its start code may never return"
                ) from None
            raise
        if missing:
            await pool.aclose()
            raise ProviderError(
                f"{plugin.key}: the module {module.path.name} exports no function for the "
                f"manifest's method(s) {', '.join(missing)}"
            )
        try:
            attached.exported = exported_functions(module.code)
        except BaseException:
            await pool.aclose()
            raise
        attached.exports = {name: True for name in plugin.methods}
        self._attached[key] = attached

    def update(self, plugin: PluginInfo, target: WasmTarget) -> None:
        """A reload changed ``plugin``'s entry and kept ``target``: its calls go to the
        new entry's methods, each checked against the module's exports. The reload is done
        by now, so a method the module does not export is not refused as at attach: it is
        reported as one the target does not serve (the dispatcher says so, and health
        names it) and its calls fail ``MethodNotFound``. The pool is the same."""
        attached = self._attached.get((plugin.id, plugin.version, target.key))
        if attached is None:
            return  # not attached here
        exported = attached.exported
        if exported is None:
            # A text-format module: what attach checked stays; a method added is left
            # to its call, where the runtime fails it typed if the module lacks it.
            attached.exports = {name: attached.exports.get(name, True) for name in plugin.methods}
            return
        attached.exports = {name: name in exported for name in plugin.methods}
        self.report_served(plugin, target, served_names(exported))

    async def detach(self, plugin: PluginInfo, target: WasmTarget) -> None:
        attached = self._attached.pop((plugin.id, plugin.version, target.key), None)
        if attached is not None:
            await attached.pool.aclose()

    def detach_queue(self, plugin: PluginInfo, target: WasmTarget) -> Hashable:
        # A pool of instances per plugin version and target, sharing nothing with the
        # others; its close waits up to ``CLOSE_WAIT_SECONDS`` for a thread in a host call
        # (a WASI sleep, an HTTP request): a close stops them all at once.
        return plugin.id, plugin.version, target.key

    async def aclose(self) -> None:
        attached, self._attached = self._attached, {}
        await asyncio.gather(*(each.pool.aclose() for each in attached.values()))
        if self._resolver is not None:
            self._resolver.close()
            self._resolver = None
        if self._scratch is not None:
            await asyncio.to_thread(shutil.rmtree, self._scratch, True)
            self._scratch = None

    def sandbox(self, plugin: PluginInfo, target: WasmTarget) -> Translation | None:
        attached = self._attached.get((plugin.id, plugin.version, target.key))
        if attached is not None:
            return attached.translation
        return sandbox_of(plugin.capabilities, plugin.config).translation

    async def served_methods(
        self, plugin: PluginInfo, target: WasmTarget, *, timeout: float
    ) -> frozenset[str] | None:
        attached = self._attached.get((plugin.id, plugin.version, target.key))
        if attached is None or attached.exported is None:
            return None
        return served_names(attached.exported)

    async def invoke(self, target: WasmTarget, invocation: Invocation) -> Any:
        attached = self._attached.get((invocation.plugin, invocation.version, target.key))
        if attached is None:
            raise TargetUnavailable(f"{invocation.plugin}@{invocation.version} is not started")
        exported = attached.exports.get(invocation.method)
        if not exported:
            raise MethodNotFound(
                f"{invocation.plugin} has no method {invocation.method!r} in its manifest"
                if exported is None
                else f"{invocation.plugin}: the module exports no function for the"
                f" manifest's method {invocation.method!r}"
            )
        payload = encode_json(invocation.params)
        remaining = invocation.remaining()
        if remaining <= 0:
            raise DeadlineExceeded(f"{invocation.plugin}.{invocation.method}: deadline passed")
        result = await attached.pool.call(
            invocation.method, payload, remaining=remaining, cpu_s=attached.cpu_s
        )
        return _result(invocation, result, attached)

    async def health(self, target: WasmTarget) -> Health:
        pools = [each.pool for key, each in self._attached.items() if key[2] == target.key]
        if not pools:
            return Health("not_serving", "not attached")
        return Health("serving", ", ".join(repr(pool) for pool in pools))

    def __repr__(self) -> str:
        return f"<WasmProvider plugins={len(self._attached)} {self._resolver!r}>"


def _result(invocation: Invocation, result: CallResult, attached: _Attached) -> Any:
    where = f"{invocation.plugin}.{invocation.method}"
    failure = result.failure
    if failure is not None and failure.error is not None and is_refusal(failure.error):
        # The pool's timer may have fired before the thread was back (module docstring).
        raise _http_failure(where, failure.error)
    if result.cancelled_by == "deadline":
        raise DeadlineExceeded(f"{where}: the call's deadline passed; the wasm call was stopped")
    if result.cancelled_by == "busy":
        raise DeadlineExceeded(
            f"{where}: every instance stayed busy until the call's deadline "
            f"(pool_size {attached.pool.size}); the call did not start"
        )
    if result.cancelled_by == "closed":
        raise TargetUnavailable(
            f"{where}: the plugin was detached (a reload, or the dispatcher closing) before"
            " the call started"
        )
    if result.cancelled_by == "cpu":
        raise LimitExceeded(
            f"{where}: ran past its cpu_s ({attached.cpu_s} s); the wasm call was stopped",
            limit="cpu_s",
            value=attached.cpu_s,
        )
    if failure is not None and failure.error is not None:  # an HTTP request of the module
        raise _http_failure(where, failure.error)
    if failure is None:
        output = result.output or b""
        try:
            return orjson.loads(output)
        except orjson.JSONDecodeError:
            raise ProviderError(
                f"{where}: the module's output is not JSON: {output[:200]!r}"
            ) from None
    if failure.kind == "memory":
        raise LimitExceeded(
            f"{where}: the module grew its memory past memory_mb ({attached.memory_mb} MiB)",
            limit="memory_mb",
            value=attached.memory_mb,
        )
    if failure.kind == "plugin":
        return _plugin_error(failure.message)
    if failure.kind == "runtime":  # the instance is dropped: the next call gets a new one
        raise TargetUnavailable(
            f"{where}: the wasm runtime could not set the call up on its instance"
            f" ({failure.message[:200]}); the module did not run, and the instance is replaced",
            details=CONNECT_STAGE,
        )
    if failure.kind == "host":  # the dispatcher's side (its compile cache), not the module
        raise ProviderError(f"{where}: {failure.message[:500]}")
    raise ProviderError(f"{where}: the wasm module failed: {failure.message[:500]}")


def _http_failure(where: str, error: DispatchError) -> DispatchError:
    told = error.with_message(f"{where}: {error.message}")
    if is_refusal(told):
        log.error("security: %s; nothing was sent, and the call was stopped", told.message)
    return told


def _failed_late(plugin: str, function: str, failure: CallFailed) -> None:
    """A call's failure that came after its caller was answered: a refusal is logged all
    the same (``InstancePool``'s ``on_late_failure``)."""
    if failure.error is not None and is_refusal(failure.error):
        log.error(
            "security: %s.%s: %s; nothing was sent, and the call was stopped (after its"
            " caller was answered: its deadline or cpu_s came first)",
            plugin,
            function,
            failure.error.message,
        )


def _plugin_error(message: str) -> Any:
    if message.startswith("{"):
        try:
            error = orjson.loads(message)
        except orjson.JSONDecodeError:
            error = None
        if isinstance(error, dict):
            raise error_from_wire(error)
    raise PluginError(message, remote_type="ExtismError")
