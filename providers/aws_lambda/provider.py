"""AWS Lambda functions: invoke them with the dispatcher envelope as the event.

What the call looks like on the wire (AWS ``Invoke`` API):

* ``Payload`` is the request envelope (``docs/protocol.md``), or ``{"batch": [...]}`` for a
  batch; ``ClientContext`` carries the envelope's ``context`` as ``{"custom": {...}}``, so a
  handler that does not speak the envelope still sees request id, caller and traceparent.
* ``InvocationType`` ``RequestResponse`` waits for the result; ``Event`` returns at once
  with an accepted handle ``{"accepted": True, "request_id": ..., "function": ...}``.
* ``Qualifier`` selects a version or an alias; ``LogType=Tail`` (``log_tail: true``) sends
  the last 4 KB of the function's log to the ``dispatcher.providers.lambda`` debug log.

``logs`` (``dispatcher logs``) reads the function's log group in CloudWatch Logs
(``logs.py``) with the same region, endpoint and credentials as Invoke.

Failures become ``DispatchError`` in ``errors.py``; the clients (and the only import of the
AWS SDK) are in ``client.py``; ``dispatcher deploy`` goes through ``deployer()``.

Egress: an ``endpoint_url`` is checked when the manifest loads (http/https only, the
``egress`` policy) and resolved and checked again in ``attach``; botocore then resolves it
on its own for every connection, which stays unchecked (``providers.egress``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import orjson

from linchkit_plugin.errors import DeadlineExceeded, DispatchError, ProviderError
from linchkit_plugin.wire import encode_json
from providers.aws_lambda.client import LambdaClients, Service
from providers.aws_lambda.deployer import LambdaDeployer
from providers.aws_lambda.errors import function_error, translate
from providers.aws_lambda.logs import read_logs
from providers.aws_lambda.target import LambdaTarget
from providers.base import Health, Provider
from providers.envelope import decode_batch_response, decode_response
from providers.invocation import Invocation, Outcome
from providers.target import PluginInfo

__all__ = ["LambdaProvider"]

log = logging.getLogger("dispatcher.providers.lambda")

# Lambda accepts at most 3,583 bytes of base64 ClientContext.
_CLIENT_CONTEXT_LIMIT = 3583


class LambdaProvider(Provider[LambdaTarget]):
    name = "lambda"
    target_model = LambdaTarget
    delivers_events = False  # no channel from the plugin back to the host
    native_batch = True
    #: How often ``logs(follow=True)`` asks CloudWatch Logs for new events.
    logs_poll_s: float = 1.0
    #: How late after its timestamp an event may reach CloudWatch and still be followed.
    logs_lookback_s: float = 30.0

    def __init__(self, *, max_connections: int = 64, connect_timeout: float = 5.0) -> None:
        self._clients = LambdaClients(
            max_connections=max_connections, connect_timeout=connect_timeout
        )

    def __repr__(self) -> str:
        return f"<LambdaProvider {self._clients!r}>"

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._clients.open()

    async def aclose(self) -> None:
        await self._clients.aclose()

    async def attach(self, plugin: PluginInfo, target: LambdaTarget) -> None:
        for destination in target.destinations():
            await self.egress.check_connect(destination)
        # Open the region's client now, so credential and region problems show at start,
        # not on the first call, and the first call does not pay for the client.
        await self.client(target)

    async def client(
        self, target: LambdaTarget, service: Service = "lambda", *, control_plane: bool = False
    ) -> Any:
        """The shared aiobotocore client of ``service`` (Lambda, or CloudWatch Logs) for
        the target's region and endpoint; ``control_plane``: the one the deployer uses,
        with a short read timeout (``LambdaClients.get``)."""
        return await self._clients.get(target, service, control_plane=control_plane)

    def deployer(self) -> LambdaDeployer:
        """Packages a plugin and publishes it behind the target's alias (shares the clients)."""
        return LambdaDeployer(self._clients)

    # -- calls ---------------------------------------------------------------------------

    async def invoke(self, target: LambdaTarget, invocation: Invocation) -> Any:
        now = asyncio.get_running_loop().time()
        event: Any = invocation.request_wire(now) if target.envelope else invocation.params
        payload = await self._invoke(target, event, invocation.context_wire(now), invocation)
        if target.invocation_type == "Event":
            return payload
        return decode_response(payload) if target.envelope else payload

    async def invoke_batch(
        self, target: LambdaTarget, invocations: Sequence[Invocation]
    ) -> list[Outcome[Any]]:
        if not (target.batch and target.envelope) or len(invocations) == 1:
            return await super().invoke_batch(target, invocations)
        # One invocation for the whole batch, bounded by its earliest deadline; each item
        # still carries its own deadline_ms.
        earliest = min(invocations, key=lambda invocation: invocation.deadline)
        now = asyncio.get_running_loop().time()
        body = {"batch": [invocation.request_wire(now) for invocation in invocations]}
        try:
            payload = await self._invoke(target, body, earliest.context_wire(now), earliest)
        except DispatchError as error:
            return [Outcome(error=error) for _ in invocations]
        if target.invocation_type == "Event":
            return [Outcome(result=payload) for _ in invocations]
        return decode_batch_response(payload, len(invocations))

    async def health(self, target: LambdaTarget) -> Health:
        """``GetFunction``: serving when the function (at its qualifier) is Active."""
        started = time.perf_counter()
        try:
            client = await self.client(target)
            arguments: dict[str, Any] = {"FunctionName": target.function_name}
            if target.qualifier:
                arguments["Qualifier"] = target.qualifier
            answer = await client.get_function(**arguments)
        except DispatchError as error:
            return Health("not_serving", str(error))
        except Exception as error:
            translated = translate(error, target)
            return Health("not_serving", f"{type(translated).__name__}: {translated.message}")
        latency_ms = (time.perf_counter() - started) * 1000
        configuration = answer.get("Configuration", {})
        state = configuration.get("State", "Active")
        update = configuration.get("LastUpdateStatus", "Successful")
        detail = f"State {state}, last update {update}, version {configuration.get('Version')}"
        if state == "Active" and update != "Failed":
            return Health("serving", detail, latency_ms)
        reason = configuration.get("StateReason") or configuration.get("LastUpdateStatusReason")
        return Health("not_serving", f"{detail}: {reason}" if reason else detail, latency_ms)

    async def logs(
        self, plugin: PluginInfo, target: LambdaTarget, *, follow: bool, lines: int
    ) -> AsyncIterator[str]:
        """The function's output in CloudWatch Logs (``/aws/lambda/<name>``): its last
        ``lines`` lines as ``[<version>]<environment> | line``, then with ``follow`` the new
        ones, asked for every ``logs_poll_s``. ``LogsUnavailable`` while the function has
        never run (no log group)."""
        client = await self.client(target, "logs")
        async for line in read_logs(
            client,
            plugin,
            target,
            follow=follow,
            lines=lines,
            poll_s=self.logs_poll_s,
            lookback_s=self.logs_lookback_s,
        ):
            yield line

    # -- internals -----------------------------------------------------------------------

    async def _invoke(
        self,
        target: LambdaTarget,
        event: Any,
        context: dict[str, Any],
        invocation: Invocation,
    ) -> Any:
        remaining = invocation.remaining()
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline passed before calling {target.describe()}")
        arguments: dict[str, Any] = {
            "FunctionName": target.function_name,
            "InvocationType": target.invocation_type,
            "Payload": encode_json(event),
        }
        if target.qualifier:
            arguments["Qualifier"] = target.qualifier
        if target.log_tail and target.invocation_type == "RequestResponse":
            arguments["LogType"] = "Tail"
        if target.invocation_type == "RequestResponse":
            client_context = _client_context(context)
            if client_context is not None:
                arguments["ClientContext"] = client_context
        client = await self.client(target)
        try:
            # botocore's timeouts are per client and we keep one client per region, so the
            # per-call deadline is an asyncio timeout around the request.
            async with asyncio.timeout(remaining):
                answer = await client.invoke(**arguments)
                if target.invocation_type == "Event":
                    return _accepted(answer, target)
                payload = await answer["Payload"].read()
        except TimeoutError:
            raise DeadlineExceeded(
                f"{target.describe()} did not answer within {remaining * 1000:.0f} ms"
            ) from None
        except Exception as error:
            raise translate(error, target) from error
        log_result = answer.get("LogResult")
        if log_result:
            _log_tail(log_result, target, invocation)
        kind = answer.get("FunctionError")
        if kind:
            raise function_error(kind, payload, target)
        try:
            return orjson.loads(payload) if payload else None
        except orjson.JSONDecodeError:
            raise ProviderError(
                f"{target.describe()} answered a payload that is not JSON: {payload[:80]!r}"
            ) from None


def _client_context(context: dict[str, Any]) -> str | None:
    encoded = base64.b64encode(encode_json({"custom": context})).decode("ascii")
    if len(encoded) > _CLIENT_CONTEXT_LIMIT:
        log.debug("client context of %d bytes is over Lambda's limit; not sent", len(encoded))
        return None
    return encoded


def _accepted(answer: Mapping[str, Any], target: LambdaTarget) -> dict[str, Any]:
    metadata = answer.get("ResponseMetadata", {})
    return {
        "accepted": answer.get("StatusCode") == 202,
        "status": answer.get("StatusCode"),
        "request_id": metadata.get("RequestId"),
        "function": target.function_name,
        "qualifier": target.qualifier,
    }


def _log_tail(log_result: str, target: LambdaTarget, invocation: Invocation) -> None:
    if not log.isEnabledFor(logging.DEBUG):
        return
    text = base64.b64decode(log_result).decode("utf-8", "replace")
    for line in text.splitlines():
        log.debug("%s [%s] %s", target.describe(), invocation.request_id, line)
