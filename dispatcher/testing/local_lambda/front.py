"""The local AWS Lambda's endpoint: the Invoke API on runtime containers, the rest to moto.

``LocalLambda`` is an HTTP endpoint that AWS SDKs (aiobotocore, boto3, the CLI) use
through ``endpoint_url``, the way ``sam local start-lambda`` fronts its containers:

* ``POST /2015-03-31/functions/{name}/invocations`` (``Invoke``) runs the function's real
  code: the zip it was created with, in a container of the local runtime image
  (``infra/lambda/build-runtime-image.sh``: Debian's Python 3.11, ``awslambdaric`` and
  the AWS Runtime Interface Emulator ``aws-lambda-rie``). Its answers follow the Invoke
  API as documented by AWS, where moto's own Invoke differs: 200/202/204 for
  RequestResponse/Event/DryRun; a handler error is a 200 with ``X-Amz-Function-Error:
  Unhandled`` and ``{errorMessage, errorType, stackTrace}``; a Lambda timeout is
  ``Sandbox.Timedout``; ``X-Amz-Log-Result`` (base64, last 4 KB) for ``LogType=Tail``;
  ``X-Amz-Executed-Version``; 404 ResourceNotFoundException for an unknown function or
  qualifier (answered by moto); 429 TooManyRequestsException (``Reason``, ``Retry-After``)
  when the function's reserved concurrency or this front's container limit is reached;
  413 RequestTooLargeException; 400 InvalidRequestContentException; 500 ServiceException
  when no execution environment can be started. ``Event`` runs in the background, after
  the 202, waiting for a free environment rather than being throttled.
* Every other request (create/update/publish/alias/concurrency, IAM, CloudWatch Logs, …)
  is passed to moto's server unchanged (``control``); the zips it sees go by are kept
  (``code``).
* Each invocation's output (the runtime's ``START``/``END``/``REPORT`` lines and what the
  handler prints) goes to moto's CloudWatch Logs, group ``/aws/lambda/<FunctionName>``,
  one stream per container, shortly after the answer (``cloudwatch``); ``flush_logs()``
  waits until it is there.

This module is the Invoke semantics and the endpoint's lifecycle; the containers are
``runtime``'s. ``aclose()`` stops the endpoint, cancels background ``Event`` invocations
and removes every container it started.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import uuid
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import orjson

from dispatcher.testing.local_lambda.cloudwatch import Caller, LogShipper
from dispatcher.testing.local_lambda.code import CodeStore
from dispatcher.testing.local_lambda.control import ControlPlane
from dispatcher.testing.local_lambda.engine import DockerEngine
from dispatcher.testing.local_lambda.errors import LocalLambdaError
from dispatcher.testing.local_lambda.runtime import (
    DEFAULT_RUNTIME_IMAGE,
    Environment,
    Environments,
)

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web

    from dispatcher.testing.local_lambda.function import Function

__all__ = ["ASYNC_PAYLOAD_LIMIT", "LOG_TAIL_BYTES", "SYNC_PAYLOAD_LIMIT", "LocalLambda"]

# One logger for the whole local Lambda, as when it was one module.
log = logging.getLogger("dispatcher.testing.lambda")

SYNC_PAYLOAD_LIMIT = 6 * 1024 * 1024
ASYNC_PAYLOAD_LIMIT = 256 * 1024
LOG_TAIL_BYTES = 4096
_ERROR_KEYS = frozenset({"errorMessage", "errorType", "stackTrace", "requestId", "cause"})


class LocalLambda:
    """The Invoke API on local runtime containers, everything else proxied to moto.

    ``url`` is the ``endpoint_url`` for clients, once ``start()`` returned. Use it as an
    async context manager; ``aclose()`` removes every container it started.
    """

    def __init__(
        self,
        control_plane_url: str,
        *,
        image: str = DEFAULT_RUNTIME_IMAGE,
        docker: DockerEngine | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_environments: int = 8,
        work_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.control_plane_url = control_plane_url.rstrip("/")
        self.host = host
        self.port = port
        self.docker = docker or DockerEngine()
        self.invocations = 0
        self._code = CodeStore(work_dir)
        self._environments = Environments(
            self.docker, self._code, image=image, max_environments=max_environments
        )
        self._in_flight: dict[str, int] = defaultdict(int)
        self._background: set[asyncio.Task[Any]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._control: ControlPlane | None = None
        self._shipper: LogShipper | None = None
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    # image, max_environments and cold_starts are the environments'; kept here as the
    # attributes they always were.

    @property
    def image(self) -> str:
        return self._environments.image

    @image.setter
    def image(self, image: str) -> None:
        self._environments.image = image

    @property
    def max_environments(self) -> int:
        return self._environments.max_environments

    @max_environments.setter
    def max_environments(self, limit: int) -> None:
        self._environments.max_environments = limit

    @property
    def cold_starts(self) -> int:
        return self._environments.cold_starts

    @property
    def url(self) -> str:
        if self._url is None:
            raise LocalLambdaError("the local Lambda is not started")
        return self._url

    def __repr__(self) -> str:
        busy = sum(self._in_flight.values())
        return (
            f"<LocalLambda {self._url or 'stopped'} environments={len(self._environments)} "
            f"busy={busy} cold_starts={self.cold_starts} invocations={self.invocations}>"
        )

    async def __aenter__(self) -> LocalLambda:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        import aiohttp
        from aiohttp import web

        await self.docker.start()
        if not await self.docker.image_exists(self.image):
            await self.docker.aclose()
            raise LocalLambdaError(
                f"no local runtime image {self.image!r}; build it with "
                "infra/lambda/build-runtime-image.sh (make test does)"
            )
        # Every container is removed by aclose(); these are from processes that never got there.
        for orphan in await self.docker.orphans():
            await self.docker.remove(orphan)
        # One session for moto and the runtime containers; bodies pass through as they are.
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._control = ControlPlane(self.control_plane_url, self._session, self._code)
        self._shipper = LogShipper(self.control_plane_url, self._session, self.docker)
        app = web.Application(client_max_size=SYNC_PAYLOAD_LIMIT * 2)
        app.router.add_post("/2015-03-31/functions/{name}/invocations", self._invoke)
        app.router.add_route("*", "/{tail:.*}", self._control.proxy)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        # Bound here and handed to the site, so a free port (0) cannot be taken in between.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart on a fixed port
        try:
            sock.bind((self.host, self.port))
        except OSError as error:
            sock.close()
            await self.aclose()
            raise LocalLambdaError(
                f"cannot listen on {self.host}:{self.port}: {error.strerror}; "
                "choose another port (0: any free one)"
            ) from error
        port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        self._url = f"http://{self.host}:{port}"

    async def aclose(self) -> None:
        pending = [*self._background, *self._environments.background]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._shipper is not None:
            await self._shipper.aclose()
            self._shipper = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._environments.aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._control = None
        await self.docker.aclose()
        self._code.close()
        self._url = None

    async def flush_logs(self) -> None:
        """Wait until the output of every invocation answered so far is in CloudWatch Logs."""
        if self._shipper is not None:
            await self._shipper.flush()

    # -- the data plane: Invoke ----------------------------------------------------------

    async def _invoke(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        assert self._control is not None
        name = request.match_info["name"]
        invocation_type = request.headers.get("X-Amz-Invocation-Type", "RequestResponse")
        request_id = str(uuid.uuid4())
        body = await request.read()
        limit = ASYNC_PAYLOAD_LIMIT if invocation_type == "Event" else SYNC_PAYLOAD_LIMIT
        if len(body) > limit:
            return _aws_error(
                413,
                "RequestTooLargeException",
                f"Request must be smaller than {limit} bytes for the InvokeFunction operation",
                request_id,
            )
        if body:
            try:
                orjson.loads(body)
            except orjson.JSONDecodeError:
                return _aws_error(
                    400,
                    "InvalidRequestContentException",
                    "Could not parse request body into json",
                    request_id,
                )
        function = await self._control.function(request, name)
        if isinstance(function, web.Response):
            return function
        if not function.runtime.startswith("python3"):
            return _aws_error(
                502,
                "InvalidRuntimeException",
                f"runtime {function.runtime!r} is not available locally",
                request_id,
            )
        if invocation_type == "DryRun":
            return web.Response(status=204, headers={"x-amzn-RequestId": request_id})
        reserved = await self._control.reserved_concurrency(request, function.name)
        in_flight = self._in_flight[function.name]
        if reserved is not None and in_flight >= reserved:
            return _throttled("ReservedFunctionConcurrentInvocationLimitExceeded", request_id)
        if invocation_type == "Event":
            task = asyncio.get_running_loop().create_task(
                self._run_event(function, body, request_id, Caller.of(request.headers))
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return web.Response(status=202, headers={"x-amzn-RequestId": request_id})
        try:
            environment = await self._environments.acquire(function)
        except LocalLambdaError as error:
            return _aws_error(500, "ServiceException", str(error), request_id, Type="Service")
        if environment is None:
            return _throttled("ConcurrentInvocationLimitExceeded", request_id)
        client_context = request.headers.get("X-Amz-Client-Context")
        tail = request.headers.get("X-Amz-Log-Type") == "Tail"
        status, payload, function_error, log_tail = await self._run(
            environment, function, body, client_context, tail, Caller.of(request.headers)
        )
        headers = {
            "x-amzn-RequestId": request_id,
            "X-Amz-Executed-Version": function.version,
            "Content-Type": "application/json",
        }
        if function_error:
            headers["X-Amz-Function-Error"] = function_error
        if log_tail is not None:
            headers["X-Amz-Log-Result"] = log_tail
        return web.Response(status=status, body=payload, headers=headers)

    async def _run_event(
        self, function: Function, body: bytes, request_id: str, caller: Caller
    ) -> None:
        # Lambda queues Event invocations; here they wait for a free environment.
        try:
            environment = await self._environments.acquire_waiting(function)
        except LocalLambdaError:
            log.exception("Event invocation %s of %s could not start", request_id, function.name)
            return
        _, payload, function_error, _ = await self._run(
            environment, function, body, None, False, caller
        )
        if function_error:
            log.info(
                "Event invocation %s of %s failed: %s", request_id, function.name, payload[:200]
            )

    async def _run(
        self,
        environment: Environment,
        function: Function,
        body: bytes,
        client_context: str | None,
        tail: bool,
        caller: Caller,
    ) -> tuple[int, bytes, str | None, str | None]:
        """One invocation in ``environment``, which it releases: status, payload, error, log."""
        import aiohttp

        assert self._session is not None
        self.invocations += 1
        self._in_flight[function.name] += 1
        healthy = True
        payload = b""
        headers = {"Content-Type": "application/json"}
        if client_context:
            headers["X-Amz-Client-Context"] = client_context
        try:
            async with self._session.post(
                environment.invoke_url,
                data=body or b"{}",
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=function.timeout + 30),
            ) as response:
                payload = await response.read()
            environment.invocations += 1
        except (aiohttp.ClientError, TimeoutError) as error:
            healthy = False
            payload = orjson.dumps(
                {
                    "errorType": "Runtime.ExitError",
                    "errorMessage": f"the execution environment failed: {type(error).__name__}: {error}",
                }
            )
            return 200, payload, "Unhandled", None
        finally:
            self._in_flight[function.name] -= 1
            if self._shipper is not None:
                self._shipper.ship(environment, function, caller)
            # After a timeout the emulator resets the runtime, and an invocation that met
            # the reset was answered at once with "Sandbox.Failure ... ErrGateCanceled"
            # (seen under load); Lambda runs the next one after an init. A new environment.
            healthy = healthy and not _timed_out(payload)
            await self._environments.release(environment, healthy)
        payload, function_error = _classify(payload)
        log_tail = await self._log_tail(environment) if tail else None
        return 200, payload, function_error, log_tail

    async def _log_tail(self, environment: Environment) -> str:
        """``X-Amz-Log-Result``: the invocation's log, its last 4 KB, base64."""
        lines = await self._environments.invocation_log(environment)
        text = "\n".join(lines).encode()[-LOG_TAIL_BYTES:]
        return base64.b64encode(text).decode("ascii")


def _timed_out(payload: bytes) -> bool:
    """Whether the emulator's answer says the function ran past its timeout."""
    return payload.lstrip().startswith(b"Task timed out after")


def _classify(payload: bytes) -> tuple[bytes, str | None]:
    """Tell a function error from a result, as Lambda does; RIE does not say (sam does the same)."""
    text = payload.strip()
    if _timed_out(text):
        message = text.decode("utf-8", "replace")
        return orjson.dumps({"errorType": "Sandbox.Timedout", "errorMessage": message}), "Unhandled"
    if text.startswith(b"{"):
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError:
            return payload, None
        if (
            isinstance(body, dict)
            and {"errorMessage", "errorType"} <= body.keys()
            and body.keys() <= _ERROR_KEYS
        ):
            return payload, "Unhandled"
    return payload, None


def _aws_error(status: int, code: str, message: str, request_id: str, **extra: Any) -> web.Response:
    from aiohttp import web

    body = {"Type": "User", "message": message} | extra
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        headers={
            "x-amzn-ErrorType": code,
            "x-amzn-RequestId": request_id,
            "Content-Type": "application/json",
        },
    )


def _throttled(reason: str, request_id: str) -> web.Response:
    response = _aws_error(
        429, "TooManyRequestsException", "Rate Exceeded.", request_id, Reason=reason
    )
    response.headers["Retry-After"] = "1"
    return response
