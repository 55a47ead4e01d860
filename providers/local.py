"""In-process plugins: a Python class loaded into the host, the backward-compatible path.

Without ``path``, the plugin is imported from the manifest's folder, the way
``dispatcher-plugin serve`` imports from the current folder: a plugin file next to its
``plugins.yaml`` needs no more than its ``entrypoint``.

One module name comes from one folder: Python keeps one module per name in a process, so
a second ``path`` holding another ``echo.py`` would not be imported at all, its calls
running the first folder's ``echo``. The manifest refuses two folders holding one module
name (``host_module``). A reload may point a target at a new folder, though (a new
version shipped in a new folder): the module is then imported from there, the old
folder's put aside (``providers._local_imports``, which also says when that is refused:
``ModuleConflict``). A plugin instance is keyed by ``(id, version, entrypoint)`` and
where its module's code is, not by ``path``: in a manifest, the entrypoint says which code
runs, and across a reload the old folder's instance runs on beside the new folder's until
it is detached.

The provider owns each plugin instance's lifecycle: ``attach`` runs ``init``/``start``,
``detach`` runs ``stop``/``destroy``. Params must be JSON, exactly as for remote targets,
so a plugin can move out of process without its callers noticing. Streaming methods
(async generator methods) stream and host events reach ``on_event`` through the SDK's
``PluginHost``, the code the SDK's own servers run, so they behave as over subprocess or
gRPC: a unary call of a streaming method answers its chunks as a list, a stream of a
unary method yields its one result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncGenerator, Hashable
from functools import cached_property
from importlib.machinery import PathFinder
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from linchkit_plugin.errors import DeadlineExceeded, ProviderError, TargetUnavailable
from linchkit_plugin.host import PluginHost
from linchkit_plugin.wire import encode_json
from providers._local_imports import ModuleConflict, PutAside, import_from_folder
from providers.base import Health, Provider
from providers.host_events import HostEvents
from providers.invocation import Invocation
from providers.target import ManifestPath, TargetConfig

if TYPE_CHECKING:
    from providers.target import PluginInfo

__all__ = ["LocalProvider", "LocalTarget", "ModuleConflict"]

log = logging.getLogger("dispatcher.providers.local")

#: How long a plugin being detached has to take the host events queued for it.
EVENTS_GRACE_SECONDS = 1.0


class LocalTarget(TargetConfig):
    """``provider: local``: a plugin class imported into the host process."""

    provider: Literal["local"]
    entrypoint: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", examples=["echo:EchoPlugin"])
    path: ManifestPath | None = Field(
        default=None,
        validate_default=True,
        description="Folder to import from, relative to the manifest (default: its folder).",
    )

    @field_validator("path", mode="after")
    @classmethod
    def _default_to_the_manifest_folder(
        cls, path: Path | None, info: ValidationInfo
    ) -> Path | None:
        if path is not None:
            return path
        base_dir = (info.context or {}).get("base_dir")
        if base_dir is None or isinstance(base_dir, Path):
            return base_dir  # one Path for every plugin of a manifest: no re-parsing per plugin
        return Path(base_dir)

    def describe(self) -> str:
        return f"local {self.entrypoint}"

    def host_module(self) -> tuple[str, str] | None:
        return self._host_module

    @cached_property
    def _host_module(self) -> tuple[str, str] | None:
        # Found once (the manifest asks as it loads): the provider keys a plugin's
        # instance by it (``_code``), on every call. The top-level name: ``pkg.a:A`` and
        # ``pkg.b:B`` share ``pkg``, and once ``pkg`` is imported from one folder,
        # ``pkg.b`` is looked for in that folder alone. Found as the import would find it
        # in ``path`` alone, nothing imported.
        name = self.entrypoint.partition(":")[0].partition(".")[0]
        if self.path is None:
            return None
        spec = PathFinder.find_spec(name, [str(self.path)])
        if spec is None:
            return None
        where = spec.origin or next(iter(spec.submodule_search_locations or ()), None)
        return None if where is None else (name, where)

    @cached_property
    def _code(self) -> str | None:
        # Where the module's code is: the provider's key of an instance, looked up on
        # every call (a string: its hash is kept, a tuple's is not).
        found = self._host_module
        return None if found is None else found[1]


class LocalProvider(Provider[LocalTarget]):
    name = "local"
    target_model = LocalTarget

    def __init__(self) -> None:
        self._hosts: dict[_HostKey, PluginHost] = {}
        #: The target each host was attached on: an event published on another target with
        #: the same entrypoint is not delivered again (``send_event``).
        self._targets: dict[_HostKey, LocalTarget] = {}
        #: Host events on their way to each plugin, handed over in order by one task each.
        self._inboxes: dict[_HostKey, _Inbox] = {}
        #: The top-level module each host was made from, and what its attach put aside
        #: for it: a detach that undoes the attach (a reload that failed) puts that back.
        self._modules: dict[_HostKey, ModuleType] = {}
        self._put_aside: dict[_HostKey, PutAside] = {}

    async def attach(self, plugin: PluginInfo, target: LocalTarget) -> None:
        key = _host_key(plugin.id, plugin.version, target)
        if key in self._hosts:
            return
        # The module from the target's own folder, not one of its name imported from
        # another (the old folder, when a reload ships a version in a new one).
        found = target.host_module()
        put_aside = import_from_folder(found, target.path)
        try:
            host = await self._opened(plugin, target)
        except BaseException:
            if put_aside is not None:
                put_aside.put_back()
            raise
        self._hosts[key] = host
        self._targets[key] = target
        module = None if found is None else sys.modules.get(found[0])
        if module is not None:
            self._modules[key] = module
        if put_aside is not None:
            self._put_aside[key] = put_aside
        self.report_served(plugin, target, _served_by(host, plugin))

    def update(self, plugin: PluginInfo, target: LocalTarget) -> None:
        """A reload changed ``plugin``'s entry and kept ``target``: its instance exposes
        the new entry's methods (a method added is bound, one removed no longer is), and
        what the class serves is reported again, so a method it lacks is said as at
        attach. The instance is the same: no new object, no ``init`` or ``start``."""
        host = self._hosts.get(_host_key(plugin.id, plugin.version, target))
        if host is None:
            return  # not attached here
        host.expose(plugin.methods)
        self.report_served(plugin, target, _served_by(host, plugin))

    async def _opened(self, plugin: PluginInfo, target: LocalTarget) -> PluginHost:
        # Only the methods the manifest lists: nothing else can be routed to, and a wide
        # class would otherwise cost its every public method per plugin.
        # Its calls' spans name the manifest's id, as the dispatcher's own spans of them
        # do; they join the traces the dispatcher continues and start none: it traced (or
        # chose not to trace, sample_ratio) each call itself.
        host = PluginHost.load(
            target.entrypoint,
            target.path,
            emit=self.event_sink_of(plugin),
            methods=plugin.methods,
            plugin_id=plugin.id,
            new_traces=False,
        )
        try:
            async with asyncio.timeout(plugin.lifecycle.init_timeout_ms / 1000):
                await host.open(plugin.config)
        except TimeoutError:
            await self._close(host, plugin)
            raise ProviderError(
                f"{plugin.key} did not init/start within its init timeout"
            ) from None
        except Exception as error:
            await self._close(host, plugin)
            raise ProviderError(f"{plugin.key} failed to start: {error!r}") from error
        return host

    async def detach(self, plugin: PluginInfo, target: LocalTarget) -> None:
        key = _host_key(plugin.id, plugin.version, target)
        inbox = self._inboxes.pop(key, None)
        if inbox is not None:
            await inbox.close()
        self._targets.pop(key, None)
        self._put_back_for(key)
        host = self._hosts.pop(key, None)
        if host is not None:
            await self._close(host, plugin)

    def detach_queue(self, plugin: PluginInfo, target: LocalTarget) -> Hashable:
        # One instance per plugin version and class, sharing nothing with the others
        # (``_put_back_for`` reads them and ``sys.modules`` with no await between): its
        # ``stop`` may take up to the plugin's ``stop_timeout_ms`` and its host events up
        # to ``EVENTS_GRACE_SECONDS``, so a close stops them all at once.
        return _host_key(plugin.id, plugin.version, target)

    def _put_back_for(self, key: _HostKey) -> None:
        """Undo the module swap of ``key``'s attach when its detach undoes the attach: its
        module is still the one in ``sys.modules`` and a host still attached was made
        from the module it put aside (a reload that failed after this attach). A detach
        that retires an old version finds the new version's module there, and leaves it."""
        module = self._modules.pop(key, None)
        put_aside = self._put_aside.pop(key, None)
        if module is None or put_aside is None:
            return
        previous = put_aside.modules.get(put_aside.name)
        still_used = any(each is previous for each in self._modules.values())
        if sys.modules.get(put_aside.name) is module and still_used:
            put_aside.put_back()

    async def aclose(self) -> None:
        inboxes, self._inboxes = self._inboxes, {}
        for inbox in inboxes.values():
            await inbox.close()
        hosts, self._hosts = self._hosts, {}
        self._targets = {}
        self._modules, self._put_aside = {}, {}
        for host in hosts.values():
            await host.close()

    async def invoke(self, target: LocalTarget, invocation: Invocation) -> Any:
        host = self._host(target, invocation)
        encode_json(invocation.params)  # what a remote plugin could not get, a local one does not
        return await host.call_with_deadline(
            invocation.method,
            invocation.params,
            invocation.context_wire(),
            invocation.remaining(),
        )

    async def stream(
        self, target: LocalTarget, invocation: Invocation
    ) -> AsyncGenerator[Any, None]:
        """The chunks of the plugin's streaming method, as the SDK's servers stream them
        (``PluginHost.stream``): a unary method yields its one result, a plugin error
        mid-stream raises after the chunks before it. The deadline bounds the whole
        stream: past it the plugin's generator is cancelled (or closed, when it is the
        caller that is slow) and ``DeadlineExceeded`` raised; a caller that stops
        reading or is cancelled closes it."""
        host = self._host(target, invocation)
        encode_json(invocation.params)
        if invocation.remaining() <= 0:
            raise DeadlineExceeded(f"deadline passed before {invocation.method!r} started")
        chunks = host.stream(invocation.method, invocation.params, invocation.context_wire())
        try:
            while True:
                left = invocation.remaining()
                if left <= 0:
                    raise _past_deadline(invocation)
                try:
                    async with asyncio.timeout(left):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise _past_deadline(invocation) from None
                yield chunk
        finally:
            await chunks.aclose()

    async def send_event(
        self, plugin: PluginInfo, target: LocalTarget, event: str, data: Any
    ) -> None:
        """Hand the host event to the ``on_event`` of ``plugin``'s own instance, as the
        SDK's servers do: in the order published, after ``publish`` returns; a handler
        that fails is logged and the next event still delivered. Data must be JSON, as for
        a remote plugin. Other plugins of the same class, or another version of this one,
        have instances of their own: they do not get it."""
        encode_json(data)
        key = _host_key(plugin.id, plugin.version, target)
        host = self._hosts.get(key)
        if host is None:
            raise TargetUnavailable(f"{plugin.key} is not started on {target.describe()}")
        if self._targets.get(key) != target:
            # Its instance was attached on another of its targets with this entrypoint
            # (one per plugin and class): it takes the event when published there.
            return
        inbox = self._inboxes.get(key)
        if inbox is None:
            inbox = self._inboxes[key] = _Inbox(host, plugin.key)
        inbox.put(event, data)

    def _host(self, target: LocalTarget, invocation: Invocation) -> PluginHost:
        # The key written out, not ``_host_key``: a call saves the function call.
        key = (invocation.plugin, invocation.version, target.entrypoint, target._code)
        host = self._hosts.get(key)
        if host is None:
            raise TargetUnavailable(f"{invocation.plugin}@{invocation.version} is not started")
        return host

    async def served_methods(
        self, plugin: PluginInfo, target: LocalTarget, *, timeout: float
    ) -> frozenset[str] | None:
        host = self._hosts.get(_host_key(plugin.id, plugin.version, target))
        return None if host is None else _served_by(host, plugin)

    async def health(self, target: LocalTarget) -> Health:
        instance = (target.entrypoint, target._code)
        hosts = [host for key, host in self._hosts.items() if key[2:] == instance]
        if not hosts:
            return Health("not_serving", "not started")
        for host in hosts:
            healthy, detail = await host.health()
            if not healthy:
                return Health("not_serving", detail)
        return Health("serving")

    @staticmethod
    async def _close(host: PluginHost, plugin: PluginInfo) -> None:
        try:
            async with asyncio.timeout(plugin.lifecycle.stop_timeout_ms / 1000):
                await host.close()
        except Exception:  # stopping must go on for the other plugins
            log.exception("stopping %s failed", plugin.key)


#: A plugin instance: plugin id, version, entrypoint, and where the module's code is
#: (``host_module``; None when the target's folder does not hold it).
_HostKey = tuple[str, str, str, str | None]


def _host_key(plugin_id: str, version: str, target: LocalTarget) -> _HostKey:
    # The code's place, not the ``path``: two spellings of one folder share an instance,
    # and an old folder's instance stays apart from a new folder's during a reload.
    return plugin_id, version, target.entrypoint, target._code


def _past_deadline(invocation: Invocation) -> DeadlineExceeded:
    return DeadlineExceeded(f"{invocation.method!r} did not finish before its deadline")


class _Inbox:
    """The host events of one local plugin, delivered one at a time and in order by a task
    of their own (``deliver_host_events`` of the SDK's gRPC server does the same); at most
    ``HOST_EVENTS_HELD`` wait, past that the oldest goes (``providers.host_events``)."""

    def __init__(self, host: PluginHost, describe: str) -> None:
        self._host = host
        self._queue: HostEvents[tuple[str, Any]] = HostEvents(describe)
        self._task = asyncio.get_running_loop().create_task(self._deliver())

    def put(self, event: str, data: Any) -> None:
        self._queue.hold((event, data))

    async def close(self) -> None:
        """Deliver what is queued, for ``EVENTS_GRACE_SECONDS`` at most, then stop: an
        ``on_event`` that hangs is cancelled, as a stopping server cancels its reader."""
        self._queue.end()
        task = self._task
        try:
            await asyncio.wait({task}, timeout=EVENTS_GRACE_SECONDS)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _deliver(self) -> None:
        while (item := await self._queue.get()) is not None:
            event, data = item
            try:
                await self._host.deliver(event, data)
            except Exception:  # one bad event must not stop the next
                log.exception("host event %r failed", event)


def _served_by(host: PluginHost, plugin: PluginInfo) -> frozenset[str]:
    """What the plugin class serves: the host binds only the methods the manifest lists
    (``attach``), so when it bound them all that is the answer, and the class's every
    method is looked up (by name) only when some are missing, for the message."""
    if len(host.methods) == len(plugin.methods):
        return frozenset(host.methods)
    return frozenset(host.served_method_names())
