"""Runs one plugin object: its lifecycle, its methods, and its errors as envelope errors.

The in-process provider and the HTTP server of the SDK both host plugins through this
class, so a plugin behaves the same whether it runs inside the host or as a function.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import importlib
import inspect
import logging
import os
import sys
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Coroutine
from pathlib import Path
from typing import Any, Final, Literal

from linchkit_plugin._late_answers import LATE_ANSWER_SECONDS, LateAnswers
from linchkit_plugin._method_failures import described, failure_of_method, plugin_error
from linchkit_plugin._method_threads import method_threads
from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    InvalidParams,
    MethodNotFound,
    ProviderError,
)
from linchkit_plugin.plugin import LIFECYCLE_HOOKS, _current_context
from linchkit_plugin.stopping import STOP_GRACE_SECONDS, STOP_HOOKS_SECONDS
from linchkit_plugin.tracing import MAX_PLUGIN_ID, CallSpan, CallTracing, call_tracing

__all__ = [
    "ABANDONED_EXIT_SECONDS",
    "ABANDONED_HOOK_SECONDS",
    "STOP_GRACE_SECONDS",
    "STOP_HOOKS_SECONDS",
    "PluginHost",
    "load_plugin_class",
]

log = logging.getLogger("dispatcher.plugin")

#: How long an async hook cancelled at the hooks' cap may take to end: time for its own
#: clean-up on the cancellation, bounded; never longer than the cap itself (a cap of 0
#: waits for nothing). One still running then swallowed its cancellation, and its
#: coroutine is closed: ``asyncio.run`` waits for every task still pending when the
#: plugin's main coroutine returns, so that hook would hold the exit for ever.
ABANDONED_HOOK_SECONDS = 0.5
#: How long the process of an SDK executable (a host that ``owns_process``) may take to
#: exit once its stop gave up on a hook and closed it: what the hook left behind can hold
#: the exit for ever all the same (a thread it awaited, which ``asyncio.run`` and the
#: interpreter join; an ``except GeneratorExit`` that waits on; a hook that blocks the
#: event loop, which then cannot even give up on it), so the process ends without it then,
#: ``cap + 2 * min(ABANDONED_HOOK_SECONDS, cap) + ABANDONED_EXIT_SECONDS`` after the hooks
#: began at most, the cap being the one the stop gives the hooks (``STOP_HOOKS_SECONDS``
#: unless ``LINCHKIT_PLUGIN_STOP_HOOKS_MS`` sets it: ``linchkit_plugin.stopping``).
ABANDONED_EXIT_SECONDS = 1.0

EventSink = Callable[[str, Any], None]


class _Undecided(enum.Enum):
    """Whether a host traces its calls is decided at its first call (``PluginHost.call``)."""

    AT_FIRST_CALL = enum.auto()


_UNDECIDED: Final = _Undecided.AT_FIRST_CALL


def load_plugin_class(entrypoint: str, path: str | Path | None = None) -> type[Any]:
    """Import ``package.module:Class``, optionally from the folder ``path``."""
    module_name, _, attribute = entrypoint.partition(":")
    if not module_name or not attribute:
        raise ProviderError(
            f"plugin entrypoint {entrypoint!r} must look like 'package.module:Class'"
        )
    if path is not None and str(path) not in sys.path:
        sys.path.insert(0, str(path))
    try:
        module = importlib.import_module(module_name)
        plugin_class = getattr(module, attribute)
    except (ImportError, AttributeError) as error:
        raise ProviderError(f"cannot load plugin {entrypoint!r}: {error}") from error
    except SystemExit as error:
        # The module's code ended the process with its own status and words, none of the
        # SDK's: a failed import like any other (the host embedding it lives on). Not
        # KeyboardInterrupt: Ctrl-C during the import stays an interruption.
        raise ProviderError(
            f"cannot load plugin {entrypoint!r}: its module called {_exit_call(error)}"
        ) from error
    except Exception as error:  # raised by the module's code, or a name import refuses
        # A syntax error, a module that raises as it is imported, a relative name
        # (``../etc``: TypeError): each was a traceback at the start, not this one line.
        raise ProviderError(f"cannot load plugin {entrypoint!r}: {described(error)}") from error
    if not isinstance(plugin_class, type):
        raise ProviderError(f"plugin entrypoint {entrypoint!r} is not a class")
    _declared_methods(plugin_class)
    return plugin_class


#: How much of the argument of a module's ``sys.exit`` its refusal shows.
_EXIT_ARGUMENT_CHARS = 200


def _exit_call(error: SystemExit) -> str:
    """``sys.exit(…)`` as the module called it: its argument as ``repr`` shows it (a
    control character escaped, so it cannot rewrite the operator's terminal), cut short."""
    if error.code is None:
        return "sys.exit()"
    try:
        shown = repr(error.code)
    except Exception:  # the module's own object, whose __repr__ is its code too
        shown = f"<{type(error.code).__name__}>"
    if len(shown) > _EXIT_ARGUMENT_CHARS:
        shown = shown[:_EXIT_ARGUMENT_CHARS] + "…"
    return f"sys.exit({shown})"


def _exposed_methods(
    plugin: Any, wanted: Collection[str] | None = None
) -> dict[str, Callable[..., Any]]:
    """The plugin's callable methods: its ``methods`` if it declares them, else its public
    functions that are not lifecycle hooks; with ``wanted``, only those of them named there.

    A host embedding many plugins passes the names its manifest lists: a class with a
    thousand public methods then costs what its listed ones cost (binding every public
    method of a 1,001-method class for 1,000 plugins took 3 s and 127 MB).
    """
    return {name: getattr(plugin, name) for name in _method_names(type(plugin), wanted)}


def _method_names(cls: type[Any], wanted: Collection[str] | None) -> list[str]:
    declared = _declared_methods(cls)
    if declared is not None:
        return list(declared) if wanted is None else [name for name in declared if name in wanted]
    candidates = dir(cls) if wanted is None else [name for name in wanted if hasattr(cls, name)]
    return [
        name
        for name in candidates
        if not name.startswith("_")
        and name not in LIFECYCLE_HOOKS
        and name != "methods"
        and inspect.isfunction(getattr(cls, name))
    ]


def _declared_methods(cls: type[Any]) -> list[str] | tuple[str, ...] | None:
    """The class's ``methods``: None (every public method) or a list or tuple of names.

    Anything else is refused (``ProviderError``): ``methods = ("drop")``, the 1-tuple
    missing its comma, is a str, and a set or a str used to be taken for none declared,
    exposing every public method of the class, those the author meant to keep in."""
    declared = getattr(cls, "methods", None)
    if declared is None:
        return None
    if isinstance(declared, tuple | list) and all(type(name) is str for name in declared):
        return declared
    given = type(declared).__name__
    shown = repr(declared)
    shown = shown if len(shown) <= 80 else shown[:80] + "…"
    hint = f" (one method: methods = ({shown},))" if given == "str" else ""
    raise ProviderError(
        f"plugin class {cls.__module__}.{cls.__qualname__}: `methods` must be a list or tuple"
        f" of method names, not a {given}: {shown}{hint}"
    )


class PluginHost:
    """One plugin instance and the way to call it."""

    def __init__(
        self,
        plugin: Any,
        *,
        emit: EventSink | None = None,
        methods: Collection[str] | None = None,
        owns_process: bool = False,
        plugin_id: str = "",
        tracer_provider: Any = None,
        new_traces: bool = True,
    ) -> None:
        """``methods``: expose only these of the plugin's methods (default: all of them).
        ``owns_process``: the plugin is the process's one job (an SDK executable), which
        ends once a stop that gave up on a hook is over, whatever the hook still does
        (``close_within``); never for a plugin hosted inside another program.

        Tracing (``linchkit_plugin.tracing``): ``plugin_id`` is the id the calls' spans name
        (``linchkit.plugin``; default: the plugin class's ``id``, and the servers set the
        one they serve it as); ``tracer_provider``, the OpenTelemetry provider they go to
        (default: the process's global one, if it has one); ``new_traces``, whether a call
        without a valid ``traceparent`` starts a trace (``tracing.CallTracing``)."""
        self.plugin = plugin
        self.owns_process = owns_process
        self.plugin_id = plugin_id or str(getattr(plugin, "id", "") or "")
        self._tracer_provider = tracer_provider
        self._new_traces = new_traces
        #: The spans of the calls: None when untraced (a call pays this one check).
        self._tracing: CallTracing | Literal[_Undecided.AT_FIRST_CALL] | None = _UNDECIDED
        #: Seconds of its cap ``close_within`` left unused when both hooks had ended (0
        #: before, and after a hook it gave up on): what a stop gives the spans still
        #: buffered next (``linchkit_plugin.tracing.flush_at_stop``).
        self.hooks_left = 0.0
        #: Methods that answered long after their deadline, to tell the author once a minute.
        self._late = LateAnswers()
        self.expose(methods)
        self._state = "created"
        if emit is not None and hasattr(plugin, "emit"):
            plugin._emit = emit

    @classmethod
    def load(
        cls,
        entrypoint: str,
        path: str | Path | None = None,
        *,
        emit: EventSink | None = None,
        methods: Collection[str] | None = None,
        owns_process: bool = False,
        plugin_id: str = "",
        new_traces: bool = True,
    ) -> PluginHost:
        plugin_class = load_plugin_class(entrypoint, path)
        try:
            return cls(
                plugin_class(),
                emit=emit,
                methods=methods,
                owns_process=owns_process,
                plugin_id=plugin_id,
                new_traces=new_traces,
            )
        except Exception as error:
            raise ProviderError(
                f"cannot instantiate plugin {entrypoint!r}: {described(error)}"
            ) from error

    def expose(self, methods: Collection[str] | None = None) -> None:
        """Expose these of the plugin's methods from now on (default: all of them), in
        place of those exposed so far: a host embedding the plugin whose manifest entry
        changed rebinds them without making the plugin again or running its hooks. A
        call already running goes on with the method it started."""
        exposed = _exposed_methods(self.plugin, methods)
        is_async = {name: inspect.iscoroutinefunction(fn) for name, fn in exposed.items()}
        streaming = frozenset(
            name for name, fn in exposed.items() if inspect.isasyncgenfunction(fn)
        )
        # All three at once (no await between): a call looks a method up in each.
        self.methods, self._is_async = exposed, is_async
        #: Streaming methods: async generator functions; a unary call gets their chunks as a list.
        self.streaming = streaming

    @property
    def state(self) -> str:
        return self._state

    def identity(self, plugin_id: str = "", version: str = "") -> tuple[str, str]:
        """The id and version the plugin goes by: those given, else the host's id (the
        plugin class's own ``id`` unless it was given one) and the class's ``version``, else
        its class name and ``0.0.0``. What a WebSocket ``hello`` names, and the
        ``service.name`` of the spans of a plugin served with no id of its own."""
        return (
            plugin_id or self.plugin_id or type(self.plugin).__name__,
            version or str(getattr(self.plugin, "version", "") or "0.0.0"),
        )

    def served_method_names(self) -> list[str]:
        """Every method the plugin serves, by name, whichever ``methods`` this host
        exposes: what a host embedding it names when it routes one the plugin lacks.
        Names only, nothing bound."""
        return _method_names(type(self.plugin), None)

    async def open(self, config: dict[str, Any]) -> None:
        """Run ``init(config)`` then ``start()``."""
        await self.init(config)
        await self.start()

    async def init(self, config: dict[str, Any]) -> None:
        """Run the plugin's ``init(config)`` alone (the gRPC binding has one RPC per step)."""
        await self._hook("init", config)
        self._state = "initialized"

    async def start(self) -> None:
        await self._hook("start")
        self._state = "started"

    async def stop(self, *, detached: bool = False) -> None:
        """Run the plugin's ``stop()`` once; ``detached``: a sync hook in a thread of its
        own that does not hold the process's exit (``close_within``)."""
        if self._state in {"stopped", "closed"}:
            return
        self._state = "stopped"
        await self._hook("stop", detached=detached)

    async def destroy(self, *, detached: bool = False) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        await self._hook("destroy", detached=detached)

    async def deliver(self, event: str, data: Any) -> None:
        """Hand a host event to the plugin's ``on_event(event, data)``, if it has one."""
        await self._hook("on_event", event, data)

    async def stream(
        self, method: str, params: Any, context: dict[str, Any] | None = None
    ) -> AsyncGenerator[Any, None]:
        """The chunks of streaming ``method``; a unary method yields its one result.

        Traced, a streaming method's span lasts the whole stream and is current around
        each step of the plugin's generator."""
        if method not in self.streaming:
            yield await self.call(method, params, context)
            return
        tracing = self._tracing
        if tracing is _UNDECIDED:
            tracing = self._decide_tracing()
        span = None if tracing is None else self._begin(tracing, method, context, "")
        failure: BaseException | None = None
        try:
            args, kwargs = _arguments_for(self.methods[method], params)
            try:
                chunks = self.methods[method](*args, **kwargs)
            except TypeError as error:
                raise _binding_error(self.methods[method], args, kwargs, error) from error
            # The call's context (and span) is set around each step of the plugin's
            # generator, never across a yield: a host that runs the plugin in its own
            # process (``local``) then does not see it between chunks, and may close the
            # stream from another context (a task of its own, the collector's finalizer)
            # without a ContextVar error.
            try:
                while True:
                    token = _current_context.set(context)
                    current = None if span is None else span.enter()
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        return
                    except BaseException as error:  # sys.exit() too: this call's failure
                        failure = failure_of_method(error)
                        if failure is error:
                            raise
                        raise failure from error
                    finally:
                        if span is not None and current is not None:
                            span.leave(current)
                        _current_context.reset(token)
                    yield chunk
            except DispatchError:
                raise
            except Exception as error:
                raise plugin_error(error) from error
            finally:
                token = _current_context.set(context)
                try:
                    await chunks.aclose()
                finally:
                    _current_context.reset(token)
        except BaseException as error:  # GeneratorExit, CancelledError: the host ended it
            failure = error
            raise
        finally:
            if span is not None:
                span.end(failure)
            failure = None  # no cycle through the traceback

    async def close(self) -> None:
        """Run ``stop()`` then ``destroy()``; both run even if one fails."""
        try:
            await self.stop()
        finally:
            await self.destroy()

    async def close_within(self, seconds: float = STOP_HOOKS_SECONDS) -> bool:
        """``close()`` at a stop: both hooks within ``seconds`` together, their failures
        logged. A hook still running then is abandoned with a warning, and ``destroy``
        does not run after an abandoned ``stop``: an async hook is cancelled and given
        ``ABANDONED_HOOK_SECONDS`` more to end, ``seconds`` if shorter (then its coroutine
        is closed), a sync one is left to its thread, which does not hold the process's
        exit. ``seconds`` 0 waits for neither hook: one that does not finish in its first
        step is abandoned at once. True when both hooks finished.

        A host that ``owns_process`` ends its process, with exit status 0 as after any
        graceful stop, once ``ABANDONED_EXIT_SECONDS`` have passed after the closing of a
        hook it gave up on, if the process is still there (``_ExitDeadline``)."""
        cleaning_up = min(ABANDONED_HOOK_SECONDS, seconds)
        exit_deadline = (
            _ExitDeadline(seconds, seconds + 2 * cleaning_up + ABANDONED_EXIT_SECONDS)
            if self.owns_process
            else None
        )
        loop = asyncio.get_running_loop()
        hooks_end = loop.time() + seconds
        finished = await self._close_within(seconds, exit_deadline)
        if finished:
            self.hooks_left = max(0.0, hooks_end - loop.time())
            if exit_deadline is not None:
                exit_deadline.release()
        return finished

    async def _close_within(self, seconds: float, exit_deadline: _ExitDeadline | None) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        for name, step in (("stop", self.stop), ("destroy", self.destroy)):
            if exit_deadline is not None:
                exit_deadline.hook = name
            # In a task of its own, waited for until the deadline: awaited here under a
            # timeout, a hook that swallowed its cancellation (caught CancelledError and
            # awaited on) held the stop for ever, the cap with it.
            hook = asyncio.create_task(step(detached=True), name=f"plugin-{name}-hook")
            try:
                await asyncio.wait({hook}, timeout=max(0.0, deadline - loop.time()))
            except asyncio.CancelledError:
                hook.cancel()
                raise
            if not hook.done():
                if exit_deadline is not None:
                    exit_deadline.abandoned = True
                _say_abandoned(name, seconds)
                await _abandon(hook, name, min(ABANDONED_HOOK_SECONDS, seconds))
                return False
            if hook.cancelled():  # the hook raised CancelledError itself
                log.error("the plugin's %s hook was cancelled at the stop", name)
            elif (error := hook.exception()) is not None:
                log.error("the plugin's %s hook failed at the stop", name, exc_info=error)
        return True

    async def health(self) -> tuple[bool, str]:
        if self._state != "started":
            return False, f"plugin is {self._state}"
        try:
            answer = await self._hook("health_check")
        except Exception as error:
            return False, f"health_check raised {error!r}"
        if isinstance(answer, dict):
            return bool(answer.get("ok", answer.get("healthy", True))), str(answer)
        return answer is not False, ""

    async def call(
        self, method: str, params: Any, context: dict[str, Any] | None = None, *, plugin: str = ""
    ) -> Any:
        """Run ``method`` with ``params``; any failure is raised as a ``DispatchError``.

        Traced (``linchkit_plugin.tracing``), the call runs in its span, which continues
        the context's ``traceparent``. ``plugin``: the id the caller's envelope names, for
        the span of a host that was given none (``plugin_id``)."""
        tracing = self._tracing
        if tracing is None:
            return await self._call(method, params, context)
        return await self._traced(
            tracing, method, context, plugin, self._call(method, params, context)
        )

    async def _traced(
        self,
        tracing: CallTracing | Literal[_Undecided.AT_FIRST_CALL],
        method: str,
        context: dict[str, Any] | None,
        plugin: str,
        running: Coroutine[Any, Any, Any],
    ) -> Any:
        """Await ``running``, the call of ``method``, in its span."""
        if tracing is _UNDECIDED:
            decided = self._decide_tracing()
            if decided is None:
                return await running
            tracing = decided
        # No span for a method the plugin lacks: its name is the caller's (Go, TypeScript).
        span = self._begin(tracing, method, context, plugin) if method in self.methods else None
        if span is None:
            return await running
        current = span.enter()
        try:
            result = await running
        except BaseException as error:  # CancelledError too: the host cancelled the call
            span.end(error)
            raise
        else:
            span.end(None)
            return result
        finally:
            span.leave(current)

    def _decide_tracing(self) -> CallTracing | None:
        """Whether this host traces its calls, decided once, at its first call: by then a
        plugin that sets up its own tracer provider (at import, in ``init``) has, and the
        SDK's servers have called ``configure_from_env``."""
        try:
            tracing = call_tracing(self._tracer_provider, new_traces=self._new_traces)
        except Exception:  # tracing never fails a call: the calls go untraced
            log.warning("could not set up the tracing of the plugin's calls", exc_info=True)
            tracing = None
        self._tracing = tracing
        return tracing

    def _begin(
        self, tracing: CallTracing, method: str, context: dict[str, Any] | None, plugin: str
    ) -> CallSpan | None:
        plugin_id = self.plugin_id or plugin[:MAX_PLUGIN_ID] or type(self.plugin).__name__
        return tracing.begin(method, context, plugin_id, type(self.plugin).__name__)

    async def _call(self, method: str, params: Any, context: dict[str, Any] | None) -> Any:
        function = self.methods.get(method)
        if function is None:
            # The name is the caller's: quoted (a NUL or a newline escaped) and cut short,
            # so a 10,000-character name does not come back whole in the answer and the log.
            shown = repr(method[:64]) + ("…" if len(method) > 64 else "")
            raise MethodNotFound(
                f"plugin has no method {shown}; it has: {', '.join(sorted(self.methods)) or 'none'}"
            )
        if method in self.streaming:
            return [chunk async for chunk in self.stream(method, params, context)]
        args, kwargs = _arguments_for(function, params)
        token = _current_context.set(context)
        try:
            if self._is_async[method]:
                return await function(*args, **kwargs)
            result = await method_threads(function, *args, **kwargs)
            if inspect.iscoroutine(result):
                # A plain ``def`` wrapper around an ``async def`` (a decorator written without
                # ``async``): what it returns is the call not yet run. Run here, on the loop,
                # it is the method's answer; until 2026-12-07 it was refused as "not JSON:
                # coroutine", and Python warned that it was never awaited.
                return await result
            return result
        except TypeError as error:
            raise _binding_error(function, args, kwargs, error) from error
        except BaseException as error:  # sys.exit() too: this call's failure, not the server's
            failure = failure_of_method(error)
            if failure is error:
                raise
            raise failure from error
        finally:
            _current_context.reset(token)

    async def call_with_deadline(
        self,
        method: str,
        params: Any,
        context: dict[str, Any],
        timeout: float | None,
        *,
        plugin: str = "",
    ) -> Any:
        """``call`` bounded by ``timeout`` seconds (a sync method's thread runs on, unobserved).
        Traced, its span records a call the deadline ended as ``deadline_exceeded``."""
        tracing = self._tracing
        if tracing is None:
            return await self._call_within(method, params, context, timeout)
        running = self._call_within(method, params, context, timeout)
        return await self._traced(tracing, method, context, plugin, running)

    async def _call_within(
        self, method: str, params: Any, context: dict[str, Any], timeout: float | None
    ) -> Any:
        if timeout is None:
            return await self._call(method, params, context)
        if timeout <= 0:
            raise DeadlineExceeded(f"deadline passed before {method!r} started")
        try:
            async with asyncio.timeout(timeout) as bound:
                result = await self._call(method, params, context)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{method!r} did not finish within {timeout * 1000:.0f} ms"
            ) from None
        # Answered, and the deadline's timer did not end it: either it never ran (the
        # loop was held) or its cancellation was swallowed. One clock read a call.
        deadline = bound.when()
        if deadline is not None:  # always: the bound was set with a delay
            late = asyncio.get_running_loop().time() - deadline
            if late > LATE_ANSWER_SECONDS:
                self._late.tell(method, late, cancelled=bound.expired())
        return result

    async def _hook(self, name: str, *args: Any, detached: bool = False) -> Any:
        hook: Callable[..., Any] | None = getattr(self.plugin, name, None)
        if hook is None:
            return True if name == "health_check" else None
        if inspect.iscoroutinefunction(hook):
            result = hook(*args)
        elif detached:
            result = await _in_daemon_thread(f"plugin-{name}-hook", hook, *args)
        else:
            result = await asyncio.to_thread(hook, *args)
        if isinstance(result, Awaitable):
            result = await result
        return result

    def __repr__(self) -> str:
        return f"<PluginHost {type(self.plugin).__name__} {self._state} methods={sorted(self.methods)}>"


def _say_abandoned(name: str, seconds: float) -> None:
    log.warning(
        "the plugin's %s hook did not finish within %g s of the stop; exiting without it",
        name,
        seconds,
    )


class _ExitDeadline:
    """The latest an SDK executable's process exits after its stop began running the hooks
    (``PluginHost.close_within``): a daemon thread that, unless released (both hooks
    finished), ends the process then with ``os._exit(0)``. The event loop cannot bound what
    an abandoned hook leaves: a thread it awaited (``asyncio.run`` waits for the default
    executor, the interpreter joins its threads), a coroutine that awaits again on
    ``GeneratorExit`` too, a hook that blocks the loop itself (then this thread says the
    warning the loop could not)."""

    def __init__(self, cap: float, seconds: float) -> None:
        self.cap = cap
        #: The hook under way, and whether the stop already said it gave up on it.
        self.hook = "stop"
        self.abandoned = False
        self._released = threading.Event()
        watch = threading.Thread(
            target=self._watch, args=(seconds,), name="plugin-exit-deadline", daemon=True
        )
        watch.start()

    def release(self) -> None:
        self._released.set()

    def __repr__(self) -> str:
        state = "released" if self._released.is_set() else "armed"
        return f"<_ExitDeadline {state} {self.hook} hook abandoned={self.abandoned}>"

    def _watch(self, seconds: float) -> None:
        if self._released.wait(seconds):
            return
        if not self.abandoned:  # the loop is blocked: it never got to give up on the hook
            _say_abandoned(self.hook, self.cap)
        log.warning(
            "the process is still there %g s after the stop gave up on the plugin's %s hook;"
            " exiting now",
            seconds - self.cap,
            self.hook,
        )
        for handler in (*log.handlers, *logging.getLogger().handlers):
            with contextlib.suppress(Exception):
                handler.flush()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)


async def _abandon(hook: asyncio.Task[Any], name: str, seconds: float) -> None:
    """Give up on ``hook`` at the stop: cancel it, and give it ``seconds`` to end
    (``ABANDONED_HOOK_SECONDS``, or the hooks' cap when shorter). One still running then
    swallowed its cancellation: its coroutine is closed (GeneratorExit at the await it is
    stuck in, as for a generator its consumer drops), which ends the task on the loop's
    next turn, before ``asyncio.run`` would wait for it. What
    can still hold the exit after that (a thread the hook awaited, a hook that blocks the
    loop on GeneratorExit) does not hold an SDK executable's: ``_ExitDeadline``."""
    hook.cancel()
    await asyncio.wait({hook}, timeout=seconds)
    if not hook.done():
        log.warning("the plugin's %s hook went on after its cancellation; closing it", name)
        with contextlib.suppress(RuntimeError):  # it awaited again on GeneratorExit
            hook.get_coro().close()
        hook.cancel()  # wakes the task, which finds its coroutine closed and ends
        await asyncio.wait({hook}, timeout=seconds)
    if hook.done() and not hook.cancelled():
        hook.exception()  # taken here: nobody else awaits it, and it is no news


def _in_daemon_thread(name: str, function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """``function(*args)`` in a daemon thread: unlike ``asyncio.to_thread``'s executor, whose
    threads the interpreter joins at exit, one stuck forever does not keep the process."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(error: BaseException | None, result: Any) -> None:
        if future.done():  # the stop gave up on the hook
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        result = None
        try:
            result = context.run(function, *args)
        except BaseException as raised:  # handed to the awaiting task, as to_thread does
            error = raised
        # The loop may have closed: nobody waits for the hook any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, error, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _arguments_for(
    function: Callable[..., Any], params: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if getattr(function, "__plugin_raw_params__", False):
        return (params,), {}
    return _arguments(params)


def _arguments(params: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if params is None:
        return (), {}
    if type(params) is dict:
        return (), params
    if type(params) is list:
        return tuple(params), {}
    return (params,), {}


def _binding_error(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], error: TypeError
) -> DispatchError:
    # Tell "the caller sent the wrong params" from "plugin code raised TypeError": only the
    # former fails to bind to the signature. Checked on failure only, so calls pay nothing.
    # A bound method's signature hides ``self``, so ``{"self": 1}`` would seem to bind to
    # ``**kwargs`` while the call itself fails: bind to the function with its instance.
    target = getattr(function, "__func__", function)
    instance = getattr(function, "__self__", None)
    bound_args = (instance, *args) if target is not function else args
    try:
        signature = inspect.signature(target)
        signature.bind(*bound_args, **kwargs)
    except TypeError as binding:
        return InvalidParams(_mismatch(function, binding, kwargs))
    except ValueError:  # no signature to compare with (a builtin): the plugin's own error
        return plugin_error(error)
    return plugin_error(error)


#: How many of the caller's unknown parameter names an ``invalid_params`` quotes, and
#: how much of each: the names are the caller's, and one 4 MB name, or 300,000 of them,
#: came back whole in the answer (and the log).
_SHOWN_NAMES = 5
_SHOWN_NAME_CHARS = 64
#: How much of Python's own binding message it quotes (which names a caller's keyword).
_SHOWN_BINDING_CHARS = 200


def _mismatch(function: Callable[..., Any], binding: TypeError, kwargs: dict[str, Any]) -> str:
    name = getattr(function, "__name__", "method")
    said = _cut(str(binding), _SHOWN_BINDING_CHARS)
    try:
        signature = inspect.signature(function)
    except ValueError:
        return f"params do not match {name}: {said}"
    message = f"params do not match {name}{signature}: {said}"
    # Python names only the first thing wrong: with ``{"amnt": 5}`` the missing
    # ``amount``, never the misspelt name the caller sent, which is the one to fix.
    takes = signature.parameters
    if not any(each.kind is inspect.Parameter.VAR_KEYWORD for each in takes.values()):
        unknown = [key for key in kwargs if key not in takes]
        if unknown and "unexpected keyword" not in str(binding):
            message += f"; it takes no {_names(unknown)}"
    return message


def _names(unknown: list[str]) -> str:
    """The first few of the caller's ``unknown`` names, each quoted and cut short, and how
    many there are when that is more."""
    shown = ", ".join(repr(_cut(key, _SHOWN_NAME_CHARS)) for key in unknown[:_SHOWN_NAMES])
    more = len(unknown) - _SHOWN_NAMES
    return shown if more <= 0 else f"{shown} and {more} more ({len(unknown)} in all)"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
