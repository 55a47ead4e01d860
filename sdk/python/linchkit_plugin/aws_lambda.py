"""Serve a plugin class as an AWS Lambda function, speaking the dispatcher envelope.

    # handler.py, deployed with the plugin (``dispatcher deploy`` writes this for you)
    from linchkit_plugin.aws_lambda import lambda_handler
    from my_plugin import MyPlugin

    handler = lambda_handler(MyPlugin)

The same class runs in-process, over HTTP and here. Per execution environment (one cold
start): the plugin is made, ``init(config)`` and ``start()`` run once, when the module is
imported, in Lambda's init phase; an exception there fails the init, so Lambda retries it
on the next invocation. Each invocation's event is a request envelope or a batch
(``{"batch": [...]}`` → ``{"results": [...]}``); the answer is always a response
envelope: the plugin's exceptions become ``ok: false`` envelopes, never a Lambda
function error, so the caller gets the plugin's own error type and message.

``config`` is the argument, else the JSON object in ``LINCHKIT_PLUGIN_CONFIG`` (set by
``dispatcher deploy`` from the manifest). The call's context is the envelope's, with
what the client context (``context.client_context.custom``) adds; the deadline is the
sooner of the envelope's ``deadline_ms`` and Lambda's remaining time, less a margin so the
plugin answers ``deadline_exceeded`` before Lambda kills the invocation.

Lambda sends no shutdown signal to a runtime without extensions, so ``stop``/``destroy``
run only on SIGTERM (sent when an extension is registered).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from typing import Any

import orjson

from linchkit_plugin.errors import DispatchError, ProviderError
from linchkit_plugin.host import PluginHost
from linchkit_plugin.wire import checked_ok_response, error_response, parse_request

__all__ = ["CONFIG_ENVIRONMENT_VARIABLE", "LambdaPlugin", "lambda_handler"]

CONFIG_ENVIRONMENT_VARIABLE = "LINCHKIT_PLUGIN_CONFIG"
#: Time kept back from Lambda's remaining time, to answer before the runtime is killed.
DEADLINE_MARGIN_MS = 50


class LambdaPlugin:
    """One plugin instance for the life of a Lambda execution environment."""

    def __init__(self, plugin_class: type[Any], config: dict[str, Any] | None = None) -> None:
        if config is None:
            config = _config_from_environment()
        self.host = PluginHost(plugin_class())
        # Lambda runs one invocation at a time per environment: one loop, reused, keeps
        # whatever the plugin opened in init (clients, pools) bound to a live loop.
        self.loop = asyncio.new_event_loop()
        self.invocations = 0
        self.loop.run_until_complete(self.host.open(config))
        _stop_on_sigterm(self)

    def __call__(self, event: Any, context: Any) -> dict[str, Any]:
        self.invocations += 1
        return self.loop.run_until_complete(self.answer(event, context))

    async def answer(self, event: Any, context: Any) -> dict[str, Any]:
        lambda_context = _lambda_context(context)
        remaining_ms = _remaining_ms(context)
        if isinstance(event, dict) and "batch" in event:
            items = event["batch"]
            if not isinstance(items, list):
                return error_response(ProviderError("'batch' must be a list of request envelopes"))
            answers = await asyncio.gather(
                *(self._answer_one(item, lambda_context, remaining_ms) for item in items)
            )
            return {"results": answers}
        return await self._answer_one(event, lambda_context, remaining_ms)

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.run_until_complete(self.host.close())
            self.loop.close()

    async def _answer_one(
        self, item: Any, lambda_context: dict[str, Any], remaining_ms: int | None
    ) -> dict[str, Any]:
        try:
            request = parse_request(item)
        except DispatchError as error:
            return error_response(error)
        call_context = {**lambda_context, **request.context}
        budgets = [ms for ms in (request.deadline_ms, remaining_ms) if ms is not None]
        timeout = (min(budgets) - DEADLINE_MARGIN_MS) / 1000 if budgets else None
        if timeout is not None:
            timeout = max(timeout, 0.001)
        try:
            result = await self.host.call_with_deadline(
                request.method, request.params, call_context, timeout, plugin=request.plugin
            )
        except DispatchError as error:
            return error_response(error)
        return checked_ok_response(result)


def lambda_handler(
    plugin_class: type[Any], *, config: dict[str, Any] | None = None
) -> Callable[[Any, Any], dict[str, Any]]:
    """A Lambda handler ``(event, context)`` serving a new instance of ``plugin_class``."""
    return LambdaPlugin(plugin_class, config)


def _config_from_environment() -> dict[str, Any]:
    raw = os.environ.get(CONFIG_ENVIRONMENT_VARIABLE)
    if not raw:
        return {}
    config = orjson.loads(raw)
    if not isinstance(config, dict):
        raise ProviderError(f"{CONFIG_ENVIRONMENT_VARIABLE} must hold a JSON object")
    return config


def _lambda_context(context: Any) -> dict[str, Any]:
    """What the Lambda context adds to the call's context: the client context's ``custom``."""
    client_context = getattr(context, "client_context", None)
    custom = getattr(client_context, "custom", None) if client_context is not None else None
    found: dict[str, Any] = dict(custom) if isinstance(custom, dict) else {}
    request_id = getattr(context, "aws_request_id", None)
    if request_id:
        found.setdefault("lambda_request_id", request_id)
    return found


def _remaining_ms(context: Any) -> int | None:
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if remaining is None:
        return None
    value = remaining()
    return int(value) if isinstance(value, int | float) else None


def _stop_on_sigterm(plugin: LambdaPlugin) -> None:
    if "AWS_LAMBDA_RUNTIME_API" not in os.environ:  # not inside a Lambda runtime
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except ValueError:  # not the main thread (tests): nobody to signal us anyway
        return

    def stop(signum: int, frame: Any) -> None:
        plugin.close()
        if callable(previous):
            previous(signum, frame)
        raise SystemExit(0)

    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:
        return
