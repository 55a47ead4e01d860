"""AWS Lambda functions: invoke them with the dispatcher envelope as the event.

The only module that knows aiobotocore. It is imported in ``start()``, so loading the
target model (every manifest load does) costs nothing. One client per (region, endpoint)
lives for the dispatcher's life and is closed in ``aclose()``.

What the call looks like on the wire (AWS ``Invoke`` API):

* ``Payload`` is the request envelope (``docs/protocol.md``), or ``{"batch": [...]}`` for a
  batch; ``ClientContext`` carries the envelope's ``context`` as ``{"custom": {...}}``, so a
  handler that does not speak the envelope still sees request id, caller and traceparent.
* ``InvocationType`` ``RequestResponse`` waits for the result; ``Event`` returns at once
  with an accepted handle ``{"accepted": True, "request_id": ..., "function": ...}``.
* ``Qualifier`` selects a version or an alias; ``LogType=Tail`` (``log_tail: true``) sends
  the last 4 KB of the function's log to the ``dispatcher.providers.lambda`` debug log.

Outcome mapping (every botocore exception stops here):

    200 + payload envelope                    the result, or the plugin's error
    200 + X-Amz-Function-Error                PluginError(remote errorType, errorMessage);
                                              a Lambda timeout (Sandbox.Timedout) → DeadlineExceeded
    202 (Event)                               the accepted handle
    ResourceNotFoundException (404)           PluginNotFound
    TooManyRequestsException (429)            RateLimited, retry_after from Retry-After
    RequestTooLargeException (413)            InvalidParams
    AccessDenied / credentials refused        Forbidden / Unauthorized
    ResourceNotReady / ResourceConflict,
    5xx, connection errors                    TargetUnavailable (retryable)
    other 4xx (bad zip, KMS, …)               ProviderError (misconfigured function)
    the invocation's deadline passes          DeadlineExceeded

botocore's own retries are off: the dispatcher's retry policy decides, and a silent SDK
retry of a throttle would spend the caller's deadline behind its back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    Forbidden,
    InvalidParams,
    PluginError,
    PluginNotFound,
    ProviderError,
    RateLimited,
    TargetUnavailable,
    Unauthorized,
)
from providers.base import Health, Provider
from providers.envelope import decode_batch_response, decode_response
from providers.invocation import Invocation, Outcome
from providers.target import ManifestPath, TargetConfig

if TYPE_CHECKING:
    from dispatcher.deploy import FunctionSpec, Package, Step
    from providers.target import PluginInfo

__all__ = ["LambdaDeploySettings", "LambdaProvider", "LambdaTarget"]

log = logging.getLogger("dispatcher.providers.lambda")

# Lambda accepts at most 3,583 bytes of base64 ClientContext.
_CLIENT_CONTEXT_LIMIT = 3583
_FUNCTION_NAME = (
    r"^(arn:aws[a-zA-Z-]*:lambda:[a-z0-9-]+:\d{12}:function:)?[a-zA-Z0-9_-]{1,140}(:[\w$-]+)?$"
)

_THROTTLES = frozenset({"TooManyRequestsException", "ThrottlingException"})
_NOT_READY = frozenset(
    {
        "ResourceNotReadyException",
        "ResourceConflictException",
        "ServiceException",
        "EC2ThrottledException",
        "ENILimitReachedException",
        "SubnetIPAddressLimitReachedException",
        "SnapStartNotReadyException",
        "SnapStartTimeoutException",
    }
)
_CREDENTIALS_REFUSED = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "IncompleteSignature",
        "MissingAuthenticationToken",
    }
)


class LambdaDeploySettings(BaseModel):
    """How ``dispatcher deploy`` builds and configures the function behind a target."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str = Field(
        pattern=r"^arn:aws[a-zA-Z-]*:iam::\d{12}:role/.+$",
        description="Execution role ARN (infra/lambda/template.yaml creates a least-privilege one).",
    )
    entrypoint: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", examples=["echo:EchoPlugin"])
    path: ManifestPath | None = Field(
        default=None, description="Folder holding the plugin's modules, relative to the manifest."
    )
    requirements: list[str] = Field(
        default_factory=list,
        description="Extra installed distributions to vendor into the zip (the SDK's own are always included).",
    )
    runtime: Literal["python3.11"] = "python3.11"
    memory_mb: int = Field(default=256, ge=128, le=10240)
    timeout_s: int = Field(default=30, ge=1, le=900)
    alias: str = Field(default="live", pattern=r"^[a-zA-Z0-9_-]*[a-zA-Z_-][a-zA-Z0-9_-]*$")
    environment: dict[str, str] = Field(default_factory=dict)
    architecture: Literal["x86_64"] = "x86_64"


class LambdaTarget(TargetConfig):
    """``provider: lambda``: an AWS Lambda function answering the dispatcher envelope."""

    provider: Literal["lambda"]
    function_name: str = Field(pattern=_FUNCTION_NAME, description="Name, ARN or partial ARN.")
    qualifier: str | None = Field(default=None, description="A version number or an alias.")
    region: str | None = Field(
        default=None, description="AWS region; unset: the standard chain (AWS_REGION, profile)."
    )
    endpoint_url: str | None = Field(
        default=None, description="Another endpoint (moto, LocalStack, a local Invoke front)."
    )
    invocation_type: Literal["RequestResponse", "Event"] = "RequestResponse"
    log_tail: bool = Field(default=False, description="LogType=Tail: log the function's output.")
    envelope: bool = Field(
        default=True,
        description="The function speaks the envelope; false: params are the event, the payload the result.",
    )
    batch: bool = Field(
        default=True, description="Send batches in one invocation (batch envelope)."
    )
    deploy: LambdaDeploySettings | None = None

    def describe(self) -> str:
        where = f"{self.function_name}:{self.qualifier}" if self.qualifier else self.function_name
        region = f" ({self.region})" if self.region else ""
        event = " [Event]" if self.invocation_type == "Event" else ""
        return f"lambda {where}{region}{event}"


class LambdaProvider(Provider[LambdaTarget]):
    name = "lambda"
    target_model = LambdaTarget
    native_batch = True

    def __init__(self, *, max_connections: int = 64, connect_timeout: float = 5.0) -> None:
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._session: Any = None
        self._clients: dict[tuple[str | None, str | None], Any] = {}
        self._exits = contextlib.AsyncExitStack()
        self._opening = asyncio.Lock()
        #: Called with each deploy step as it ends (the CLI prints them).
        self.deploy_progress: Callable[[Step], None] | None = None

    def __repr__(self) -> str:
        regions = sorted(f"{region or 'default'}@{url or 'aws'}" for region, url in self._clients)
        return f"<LambdaProvider clients={regions}>"

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        try:
            from aiobotocore.session import get_session
        except ImportError:  # pragma: no cover - depends on the installed extras
            raise ProviderError(
                "the lambda provider needs aiobotocore: pip install 'linchkit-dispatcher[lambda]'"
            ) from None
        self._session = get_session()

    async def aclose(self) -> None:
        self._clients.clear()
        exits, self._exits = self._exits, contextlib.AsyncExitStack()
        await exits.aclose()

    async def attach(self, plugin: PluginInfo, target: LambdaTarget) -> None:
        # Open the region's client now, so credential and region problems show at start,
        # not on the first call, and the first call does not pay for the client.
        await self.client(target)

    async def client(self, target: LambdaTarget) -> Any:
        """The shared aiobotocore Lambda client for the target's region and endpoint."""
        key = (target.region, target.endpoint_url)
        client = self._clients.get(key)
        if client is not None:
            return client
        async with self._opening:  # concurrent first calls share one client
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = await self._open_client(target)
            return client

    async def _open_client(self, target: LambdaTarget) -> Any:
        if self._session is None:
            raise ProviderError(
                "the lambda provider is not started (use the Dispatcher as a context manager)"
            )
        from aiobotocore.config import AioConfig
        from botocore.exceptions import BotoCoreError

        config = AioConfig(
            connect_timeout=self._connect_timeout,
            # The longest a Lambda can run; each call is bounded by its own deadline.
            read_timeout=905,
            retries={"max_attempts": 1, "mode": "standard"},
            max_pool_connections=self._max_connections,
            tcp_keepalive=True,
        )
        try:
            client = await self._exits.enter_async_context(
                self._session.create_client(
                    "lambda",
                    region_name=target.region,
                    endpoint_url=target.endpoint_url,
                    config=config,
                )
            )
        except BotoCoreError as error:
            raise ProviderError(
                f"cannot make a Lambda client for {target.describe()}: {error}"
            ) from error
        return client

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
            translated = _translate(error, target, None)
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

    # -- deploy (the Lambda API side of ``dispatcher.deploy``) ----------------------------

    async def deploy(self, plugin: PluginInfo, target: LambdaTarget) -> str:
        """Package ``plugin`` and deploy it as the function behind ``target``; idempotent.

        Each step goes to ``deploy_progress`` as it ends; the summary lists them all.
        """
        from dispatcher.deploy import deploy_plugin

        steps = await deploy_plugin(self, plugin, target, progress=self.deploy_progress)
        return _summary(target, steps)

    async def plan_deployment(self, plugin: PluginInfo, target: LambdaTarget) -> str:
        """What ``deploy`` would change, read from the live function (``--dry-run``)."""
        from dispatcher.deploy import deploy_plugin

        steps = await deploy_plugin(
            self, plugin, target, dry_run=True, progress=self.deploy_progress
        )
        return _summary(target, steps, dry_run=True)

    def render_deployment(self, plugin: PluginInfo, target: LambdaTarget) -> str:
        """The function ``deploy`` makes, without asking AWS what exists."""
        from dispatcher.deploy import build_package, function_spec

        spec = function_spec(plugin, target)
        package = build_package(plugin, target)
        configuration = spec.configuration()
        variables = sorted(configuration.pop("Environment")["Variables"])
        lines = [f"function {spec.name} ({spec.architecture})"]
        lines += [f"  {key}: {value}" for key, value in configuration.items()]
        lines.append(f"  Environment: {', '.join(variables) or '-'}")
        lines.append(f"  CodeSha256: {package.code_sha256} ({len(package.zip_bytes)} bytes)")
        lines.append(f"  alias {spec.alias} → the version published from it")
        return "\n".join(lines)

    async def apply_function(
        self,
        target: LambdaTarget,
        spec: FunctionSpec,
        package: Package,
        *,
        dry_run: bool,
        report: Callable[[Step], None],
        wait_timeout: float = 300.0,
    ) -> None:
        """Create or update the function, wait until Active, publish, move the alias."""
        from dispatcher.deploy import Step

        client = await self.client(target)
        would = "would " if dry_run else ""
        try:
            deployed = await self._configuration(client, spec.name)
            if deployed is None:
                if not dry_run:
                    await client.create_function(
                        FunctionName=spec.name,
                        Code={"ZipFile": package.zip_bytes},
                        PackageType="Zip",
                        Architectures=[spec.architecture],
                        Publish=False,
                        **spec.configuration(),
                    )
                report(Step("function", f"{would}create", f"{spec.name} ({spec.runtime})"))
            else:
                await self._update(client, spec, package, deployed, dry_run, report)
            if dry_run and deployed is None:
                report(Step("active", "would wait", "until State Active"))
                report(Step("version", "would publish", ""))
                report(Step("alias", "would create", f"{spec.alias} → the new version"))
                return
            if not dry_run:
                waited = await self._wait_active(client, spec.name, wait_timeout)
                report(Step("active", "waited", waited))
            version = await self._publish(client, spec, package, dry_run, report)
            await self._move_alias(client, spec, version, dry_run, report)
        except DispatchError:
            raise
        except Exception as error:
            raise _translate(error, target, None) from error

    async def _configuration(self, client: Any, name: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            answer = await client.get_function_configuration(FunctionName=name)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                return None
            raise
        return dict(answer)

    async def _update(
        self,
        client: Any,
        spec: FunctionSpec,
        package: Package,
        deployed: dict[str, Any],
        dry_run: bool,
        report: Callable[[Step], None],
    ) -> None:
        from dispatcher.deploy import Step

        would = "would " if dry_run else ""
        if deployed.get("CodeSha256") != package.code_sha256:
            if not dry_run:
                await self._wait_active(client, spec.name, 300.0)
                await client.update_function_code(
                    FunctionName=spec.name, ZipFile=package.zip_bytes, Publish=False
                )
            old = str(deployed.get("CodeSha256", ""))[:12]
            report(Step("code", f"{would}update", f"sha256 {old}… → {package.code_sha256[:12]}…"))
        else:
            report(Step("code", "unchanged", f"sha256 {package.code_sha256[:12]}…"))
        changed = spec.differences(deployed)
        if changed:
            if not dry_run:
                await self._wait_active(client, spec.name, 300.0)
                await client.update_function_configuration(
                    FunctionName=spec.name, **spec.configuration()
                )
            report(Step("config", f"{would}update", ", ".join(changed)))
        else:
            report(Step("config", "unchanged", ""))

    async def _wait_active(self, client: Any, name: str, timeout: float) -> str:
        started = time.monotonic()
        delay = 0.05
        while True:
            configuration = await client.get_function_configuration(FunctionName=name)
            state = configuration.get("State", "Active")
            update = configuration.get("LastUpdateStatus", "Successful")
            if state == "Failed" or update == "Failed":
                reason = configuration.get("StateReason") or configuration.get(
                    "LastUpdateStatusReason"
                )
                raise ProviderError(f"function {name} failed to become active: {reason}")
            if state == "Active" and update != "InProgress":
                return f"State {state}, last update {update}"
            if time.monotonic() - started > timeout:
                raise TargetUnavailable(
                    f"function {name} is still {state}/{update} after {timeout:.0f} s"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _publish(
        self,
        client: Any,
        spec: FunctionSpec,
        package: Package,
        dry_run: bool,
        report: Callable[[Step], None],
    ) -> str:
        from dispatcher.deploy import Step

        newest: dict[str, Any] | None = None
        paginator = client.get_paginator("list_versions_by_function")
        async for page in paginator.paginate(FunctionName=spec.name):
            for version in page.get("Versions", []):
                if version.get("Version") != "$LATEST" and (
                    newest is None or int(version["Version"]) > int(newest["Version"])
                ):
                    newest = version
        if (
            newest is not None
            and newest.get("CodeSha256") == package.code_sha256
            and not spec.differences(newest)
        ):
            report(Step("version", "unchanged", f"{newest['Version']} has this code and config"))
            return str(newest["Version"])
        if dry_run:
            report(Step("version", "would publish", ""))
            return "(new)"
        published = await client.publish_version(
            FunctionName=spec.name, CodeSha256=package.code_sha256, Description=spec.description
        )
        report(Step("version", "published", str(published["Version"])))
        return str(published["Version"])

    async def _move_alias(
        self,
        client: Any,
        spec: FunctionSpec,
        version: str,
        dry_run: bool,
        report: Callable[[Step], None],
    ) -> None:
        from botocore.exceptions import ClientError

        from dispatcher.deploy import Step

        would = "would " if dry_run else ""
        try:
            alias = await client.get_alias(FunctionName=spec.name, Name=spec.alias)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                raise
            alias = None
        if alias is None:
            if not dry_run:
                await client.create_alias(
                    FunctionName=spec.name, Name=spec.alias, FunctionVersion=version
                )
            report(Step("alias", f"{would}create", f"{spec.alias} → {version}"))
        elif alias.get("FunctionVersion") != version:
            if not dry_run:
                await client.update_alias(
                    FunctionName=spec.name, Name=spec.alias, FunctionVersion=version
                )
            report(
                Step(
                    "alias", f"{would}move", f"{spec.alias}: {alias['FunctionVersion']} → {version}"
                )
            )
        else:
            report(Step("alias", "unchanged", f"{spec.alias} → {version}"))

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
        try:
            body = orjson.dumps(event)
        except TypeError as error:
            raise InvalidParams(f"params must be JSON-serializable: {error}") from None
        arguments: dict[str, Any] = {
            "FunctionName": target.function_name,
            "InvocationType": target.invocation_type,
            "Payload": body,
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
            raise _translate(error, target, invocation) from error
        log_result = answer.get("LogResult")
        if log_result:
            _log_tail(log_result, target, invocation)
        function_error = answer.get("FunctionError")
        if function_error:
            raise _function_error(function_error, payload, target)
        try:
            return orjson.loads(payload) if payload else None
        except orjson.JSONDecodeError:
            raise ProviderError(
                f"{target.describe()} answered a payload that is not JSON: {payload[:80]!r}"
            ) from None


def _summary(target: LambdaTarget, steps: list[Step], *, dry_run: bool = False) -> str:
    changed = any(step.changed for step in steps)
    verdict = (
        ("would change" if changed else "up to date")
        if dry_run
        else ("deployed" if changed else "up to date: nothing changed")
    )
    return f"{target.describe()}: {verdict} ({'; '.join(f'{s.name} {s.action}' for s in steps)})"


def _client_context(context: dict[str, Any]) -> str | None:
    encoded = base64.b64encode(orjson.dumps({"custom": context})).decode("ascii")
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


def _function_error(kind: str, payload: bytes, target: LambdaTarget) -> DispatchError:
    try:
        body = orjson.loads(payload) if payload else {}
    except orjson.JSONDecodeError:
        body = {"errorMessage": payload[:500].decode("utf-8", "replace")}
    if not isinstance(body, dict):
        body = {"errorMessage": str(body)}
    error_type = str(body.get("errorType") or "Lambda.FunctionError")
    message = str(body.get("errorMessage") or "the function failed without a message")
    details: dict[str, Any] = {"function_error": kind, "function": target.function_name}
    if isinstance(body.get("stackTrace"), list):
        details["stack_trace"] = body["stackTrace"]
    if error_type == "Sandbox.Timedout" or "Task timed out after" in message:
        return DeadlineExceeded(f"{target.describe()} timed out: {message}", details=details)
    return PluginError(message, remote_type=error_type, details=details)


def _translate(
    error: Exception, target: LambdaTarget, invocation: Invocation | None
) -> DispatchError:
    """The dispatcher's error for a botocore/aiohttp exception raised by a Lambda call."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        ConnectTimeoutError,
        HTTPClientError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    where = target.describe()
    if isinstance(error, DispatchError):
        return error
    if isinstance(error, ClientError):
        return _client_error(error, where, target)
    if isinstance(error, ConnectTimeoutError | ReadTimeoutError):
        return DeadlineExceeded(f"{where} timed out: {error}")
    if isinstance(error, ConnectionError | HTTPClientError):
        return TargetUnavailable(f"cannot reach Lambda for {where}: {error}")
    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return Unauthorized(
            f"no usable AWS credentials for {where} ({error}); set them in the environment, "
            "~/.aws or the instance role"
        )
    if isinstance(error, NoRegionError):
        return ProviderError(f"{where} has no region: set 'region' on the target or AWS_REGION")
    return ProviderError(f"{where} failed: {type(error).__name__}: {error}")


def _client_error(error: Any, where: str, target: LambdaTarget) -> DispatchError:
    response = error.response
    code = str(response.get("Error", {}).get("Code", "Unknown"))
    message = str(response.get("Error", {}).get("Message") or response.get("message") or code)
    metadata = response.get("ResponseMetadata", {})
    status = int(metadata.get("HTTPStatusCode") or 0)
    headers = {key.lower(): value for key, value in (metadata.get("HTTPHeaders") or {}).items()}
    details: dict[str, Any] = {"aws_error": code, "status": status}
    if response.get("Reason"):
        details["reason"] = response["Reason"]
    if code == "ResourceNotFoundException":
        return PluginNotFound(
            f"{where} does not exist ({message}); deploy it with `dispatcher deploy`",
            details=details,
        )
    if code in _THROTTLES or status == 429:
        return RateLimited(
            f"{where} is throttled: {message}",
            retry_after=_retry_after(headers.get("retry-after")),
            details=details,
        )
    if code == "RequestTooLargeException" or status == 413:
        return InvalidParams(f"the request is too large for {where}: {message}", details=details)
    if code == "AccessDeniedException" or (status == 403 and code not in _CREDENTIALS_REFUSED):
        return Forbidden(f"not allowed to invoke {where}: {message}", details=details)
    if code in _CREDENTIALS_REFUSED or status == 401:
        return Unauthorized(f"AWS refused the credentials for {where}: {message}", details=details)
    if code in _NOT_READY or (status >= 500 and not code.startswith(("KMS", "Invalid", "EFS"))):
        return TargetUnavailable(f"{where} is unavailable: {code}: {message}", details=details)
    return ProviderError(f"{where} failed: {code}: {message}", details=details)


def _retry_after(header: str | None) -> float | None:
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        return None
