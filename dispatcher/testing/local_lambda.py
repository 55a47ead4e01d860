"""A local AWS Lambda: moto's control plane, the real Lambda runtime in Docker, offline.

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
  413 RequestTooLargeException; 400 InvalidRequestContentException. ``Event`` runs in the
  background, after the 202.
* Every other request (create/update/publish/alias/concurrency, IAM, …) is passed to
  moto's server unchanged; moto is the source of truth for functions, versions and
  aliases. The front keeps the zips it sees go by (``CreateFunction`` and
  ``UpdateFunctionCode`` with ``ZipFile``), by their ``CodeSha256``.

Execution environments: one container per concurrent invocation of a function version
(same code and configuration), reused while warm, removed by ``aclose()``. Containers use
the host network (the only one here) on two free loopback ports each.

Not emulated: code from S3, layers, extensions, provisioned concurrency, the async
retry/destination machinery of ``Event`` invocations, response streaming.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web

__all__ = ["DEFAULT_RUNTIME_IMAGE", "DockerEngine", "LocalLambda", "LocalLambdaError"]

log = logging.getLogger("dispatcher.testing.lambda")

DEFAULT_RUNTIME_IMAGE = os.environ.get("LAMBDA_RUNTIME_IMAGE", "linchkit-lambda-python:3.11")
DOCKER_API = "v1.41"
SYNC_PAYLOAD_LIMIT = 6 * 1024 * 1024
ASYNC_PAYLOAD_LIMIT = 256 * 1024
LOG_TAIL_BYTES = 4096
_HOP_BY_HOP = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
_ERROR_KEYS = frozenset({"errorMessage", "errorType", "stackTrace", "requestId", "cause"})


class LocalLambdaError(RuntimeError):
    """The local Lambda cannot run: no Docker engine, no runtime image, a container failed."""


class DockerEngine:
    """The few Docker Engine API calls the local Lambda needs, over the Unix socket."""

    def __init__(self, socket_path: str = "/var/run/docker.sock") -> None:
        self.socket_path = socket_path
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        import aiohttp

        if not _exists(self.socket_path):
            raise LocalLambdaError(
                f"no Docker engine at {self.socket_path}; start one (scripts/start-docker.sh)"
            )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self.socket_path),
            base_url="http://docker",
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        session = self._session
        if session is None:
            raise LocalLambdaError("the Docker client is not started")
        async with session.request(
            method, f"/{DOCKER_API}{path}", json=json, params=params
        ) as response:
            return response.status, await response.read()

    async def image_exists(self, image: str) -> bool:
        status, _ = await self.request("GET", f"/images/{image}/json")
        return status == 200

    async def run(self, body: dict[str, Any]) -> str:
        status, answer = await self.request("POST", "/containers/create", json=body)
        if status != 201:
            raise LocalLambdaError(f"docker create failed ({status}): {answer[:300]!r}")
        container = str(orjson.loads(answer)["Id"])
        status, answer = await self.request("POST", f"/containers/{container}/start")
        if status not in (204, 304):
            await self.remove(container)
            raise LocalLambdaError(f"docker start failed ({status}): {answer[:300]!r}")
        return container

    async def running(self, container: str) -> bool:
        status, answer = await self.request("GET", f"/containers/{container}/json")
        return status == 200 and bool(orjson.loads(answer)["State"]["Running"])

    async def orphans(self) -> list[str]:
        """Containers of local Lambdas whose owning process is gone (killed, crashed)."""
        filters = orjson.dumps({"label": ["linchkit.local-lambda"]}).decode()
        status, answer = await self.request(
            "GET", "/containers/json", params={"all": "1", "filters": filters}
        )
        if status != 200:
            return []
        found = []
        for container in orjson.loads(answer):
            owner = container.get("Labels", {}).get("linchkit.owner-pid", "")
            if owner.isdigit() and not _alive(int(owner)):
                found.append(str(container["Id"]))
        return found

    async def remove(self, container: str) -> None:
        await self.request("DELETE", f"/containers/{container}", params={"force": "1", "v": "1"})

    async def logs(self, container: str, *, tail: int = 400) -> list[str]:
        """The container's stdout, as lines (the engine's multiplexed stream, demuxed)."""
        status, raw = await self.request(
            "GET",
            f"/containers/{container}/logs",
            params={"stdout": "1", "stderr": "0", "tail": str(tail)},
        )
        if status != 200:
            return []
        chunks: list[bytes] = []
        offset = 0
        while offset + 8 <= len(raw):
            size = int.from_bytes(raw[offset + 4 : offset + 8], "big")
            chunks.append(raw[offset + 8 : offset + 8 + size])
            offset += 8 + size
        return b"".join(chunks).decode("utf-8", "replace").splitlines()


@dataclass(eq=False)
class _Environment:
    """One execution environment: a runtime container serving one invocation at a time."""

    key: str
    container: str
    invoke_url: str
    function_name: str
    invocations: int = 0


@dataclass
class _Function:
    """What running one function version needs, from its configuration in moto."""

    name: str
    version: str
    handler: str
    runtime: str
    timeout: int
    memory_mb: int
    code_sha256: str
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        parts = orjson.dumps(
            [
                self.name,
                self.version,
                self.handler,
                self.runtime,
                self.timeout,
                self.memory_mb,
                self.code_sha256,
                self.environment,
            ],
            option=orjson.OPT_SORT_KEYS,
        )
        return hashlib.sha256(parts).hexdigest()[:24]


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
        max_environments: int = 8,
        work_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.control_plane_url = control_plane_url.rstrip("/")
        self.image = image
        self.host = host
        self.max_environments = max_environments
        self.docker = docker or DockerEngine()
        self.cold_starts = 0
        self.invocations = 0
        self._own_work_dir = work_dir is None
        self._work_dir = Path(work_dir or tempfile.mkdtemp(prefix="local-lambda-"))
        self._zips: dict[str, bytes] = {}
        self._idle: dict[str, list[_Environment]] = defaultdict(list)
        self._all: set[_Environment] = set()
        self._in_flight: dict[str, int] = defaultdict(int)
        self._starting = 0
        self._background: set[asyncio.Task[Any]] = set()
        self._released = asyncio.Event()
        # Function configurations read from moto, until the next write passes through.
        self._configurations: dict[tuple[str, str], _Function | int | None] = {}
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise LocalLambdaError("the local Lambda is not started")
        return self._url

    def __repr__(self) -> str:
        busy = sum(self._in_flight.values())
        return (
            f"<LocalLambda {self._url or 'stopped'} environments={len(self._all)} busy={busy} "
            f"cold_starts={self.cold_starts} invocations={self.invocations}>"
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
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=SYNC_PAYLOAD_LIMIT * 2)
        app.router.add_post("/2015-03-31/functions/{name}/invocations", self._invoke)
        app.router.add_route("*", "/{tail:.*}", self._proxy)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind((self.host, 0))
        port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        self._url = f"http://{self.host}:{port}"

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        environments, self._all = list(self._all), set()
        self._idle.clear()
        await asyncio.gather(
            *(self.docker.remove(env.container) for env in environments), return_exceptions=True
        )
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.docker.aclose()
        if self._own_work_dir:
            shutil.rmtree(self._work_dir, ignore_errors=True)
        self._url = None

    # -- the control plane: moto ---------------------------------------------------------

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        body = await request.read()
        if request.method not in ("GET", "HEAD"):
            self._configurations.clear()
        status, headers, answer = await self._to_moto(
            request.method, request.path_qs, request.headers, body
        )
        if 200 <= status < 300 and request.method in ("POST", "PUT"):
            self._remember_code(request.path, body, answer)
        return web.Response(status=status, body=answer, headers=headers)

    async def _to_moto(
        self, method: str, path_qs: str, headers: Any, body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        assert self._session is not None
        forwarded = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self._session.request(
            method, self.control_plane_url + path_qs, data=body, headers=forwarded
        ) as response:
            answer = await response.read()
            kept = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP}
            return response.status, kept, answer

    def _remember_code(self, path: str, request_body: bytes, answer: bytes) -> None:
        creating = path.rstrip("/").endswith("/functions")
        updating = path.endswith("/code")
        if not (creating or updating):
            return
        try:
            sent = orjson.loads(request_body)
            received = orjson.loads(answer)
        except orjson.JSONDecodeError:
            return
        encoded = (sent.get("Code") or {}).get("ZipFile") if creating else sent.get("ZipFile")
        sha = received.get("CodeSha256") if isinstance(received, dict) else None
        if isinstance(encoded, str) and isinstance(sha, str):
            try:
                self._zips[sha] = base64.b64decode(encoded)
            except binascii.Error:
                return

    async def _function(self, request: web.Request, name: str) -> _Function | web.Response:
        from aiohttp import web

        path = f"/2015-03-31/functions/{name}"
        qualifier = request.query.get("Qualifier")
        if qualifier:
            path += f"?Qualifier={qualifier}"
        cached = self._configurations.get((path, _region(request)))
        if isinstance(cached, _Function):
            return cached
        auth = {
            k: v
            for k, v in request.headers.items()
            if k.lower().startswith(("authorization", "x-amz-date"))
        }
        status, headers, answer = await self._to_moto("GET", path, auth)
        if status != 200:
            return web.Response(status=status, body=answer, headers=headers)
        configuration = orjson.loads(answer)["Configuration"]
        function = self._configurations[(path, _region(request))] = _Function(
            name=configuration["FunctionName"],
            version=configuration.get("Version") or "$LATEST",
            handler=configuration.get("Handler") or "",
            runtime=configuration.get("Runtime") or "",
            timeout=int(configuration.get("Timeout") or 3),
            memory_mb=int(configuration.get("MemorySize") or 128),
            code_sha256=configuration.get("CodeSha256") or "",
            environment=dict((configuration.get("Environment") or {}).get("Variables") or {}),
        )
        return function

    async def _reserved_concurrency(self, request: web.Request, name: str) -> int | None:
        auth = {
            k: v
            for k, v in request.headers.items()
            if k.lower().startswith(("authorization", "x-amz-date"))
        }
        path = f"/2019-09-30/functions/{name}/concurrency"
        cache_key = (path, _region(request))
        if cache_key in self._configurations:
            cached = self._configurations[cache_key]
            return cached if isinstance(cached, int) else None
        status, _, answer = await self._to_moto("GET", path, auth)
        value = (
            orjson.loads(answer).get("ReservedConcurrentExecutions")
            if status == 200 and answer
            else None
        )
        reserved = self._configurations[cache_key] = value if isinstance(value, int) else None
        return reserved

    # -- the data plane: Invoke ----------------------------------------------------------

    async def _invoke(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

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
        function = await self._function(request, name)
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
        reserved = await self._reserved_concurrency(request, function.name)
        in_flight = self._in_flight[function.name]
        if reserved is not None and in_flight >= reserved:
            return _throttled("ReservedFunctionConcurrentInvocationLimitExceeded", request_id)
        if invocation_type == "Event":
            task = asyncio.get_running_loop().create_task(
                self._run_event(function, body, request_id)
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return web.Response(status=202, headers={"x-amzn-RequestId": request_id})
        try:
            environment = await self._acquire(function)
        except LocalLambdaError as error:
            return _aws_error(500, "ServiceException", str(error), request_id, Type="Service")
        if environment is None:
            return _throttled("ConcurrentInvocationLimitExceeded", request_id)
        client_context = request.headers.get("X-Amz-Client-Context")
        tail = request.headers.get("X-Amz-Log-Type") == "Tail"
        status, payload, function_error, log_tail = await self._run(
            environment, function, body, client_context, tail
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

    async def _run_event(self, function: _Function, body: bytes, request_id: str) -> None:
        # Lambda queues Event invocations; here they wait for a free environment.
        try:
            while (environment := await self._acquire(function)) is None:
                self._released.clear()
                await self._released.wait()
        except LocalLambdaError:
            log.exception("Event invocation %s of %s could not start", request_id, function.name)
            return
        _, payload, function_error, _ = await self._run(environment, function, body, None, False)
        if function_error:
            log.info(
                "Event invocation %s of %s failed: %s", request_id, function.name, payload[:200]
            )

    async def _run(
        self,
        environment: _Environment,
        function: _Function,
        body: bytes,
        client_context: str | None,
        tail: bool,
    ) -> tuple[int, bytes, str | None, str | None]:
        import aiohttp

        assert self._session is not None
        self.invocations += 1
        self._in_flight[function.name] += 1
        healthy = True
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
            await self._release(environment, healthy)
        payload, function_error = _classify(payload)
        log_tail = await self._log_tail(environment) if tail else None
        return 200, payload, function_error, log_tail

    async def _log_tail(self, environment: _Environment) -> str:
        # The runtime writes START/END/REPORT around each invocation's output; one
        # invocation at a time per environment, so the last START..REPORT is this one.
        lines: list[str] = []
        for _ in range(50):
            lines = await self.docker.logs(environment.container)
            starts = [i for i, line in enumerate(lines) if line.startswith("START RequestId:")]
            if starts and any(line.startswith("REPORT RequestId:") for line in lines[starts[-1] :]):
                lines = lines[starts[-1] :]
                break
            await asyncio.sleep(0.02)
        text = "\n".join(lines).encode()[-LOG_TAIL_BYTES:]
        return base64.b64encode(text).decode("ascii")

    # -- execution environments ----------------------------------------------------------

    async def _acquire(self, function: _Function) -> _Environment | None:
        idle = self._idle.get(function.key)
        if idle:
            return idle.pop()
        full = len(self._all) + self._starting >= self.max_environments
        if full and not self._evict_idle(keep=function.key):
            return None
        self._starting += 1
        try:
            try:
                environment = await self._start_environment(function)
            except LocalLambdaError as error:
                # The free ports were picked before the container bound them; another
                # process may have taken one in between. Once more, on new ports.
                log.warning(
                    "starting an environment of %s failed, retrying: %s", function.name, error
                )
                environment = await self._start_environment(function)
        finally:
            self._starting -= 1
        self._all.add(environment)
        self.cold_starts += 1
        return environment

    def _evict_idle(self, keep: str) -> bool:
        """Remove the least recently idle environment, of another function version first."""
        candidates = sorted(self._idle.items(), key=lambda item: item[0] == keep)
        for key, idle in candidates:
            if idle:
                environment = idle.pop(0)
                self._all.discard(environment)
                task = asyncio.get_running_loop().create_task(
                    self.docker.remove(environment.container)
                )
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                log.debug("evicted an idle environment of %s", key)
                return True
        return False

    async def _release(self, environment: _Environment, healthy: bool) -> None:
        if environment not in self._all:
            return
        self._released.set()
        if healthy:
            self._idle[environment.key].append(environment)
            return
        self._all.discard(environment)
        await self.docker.remove(environment.container)

    async def _start_environment(self, function: _Function) -> _Environment:
        code = self._code_dir(function)
        invoke_port, runtime_port = _free_ports(2)
        variables = {
            "AWS_LAMBDA_FUNCTION_NAME": function.name,
            "AWS_LAMBDA_FUNCTION_VERSION": function.version,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(function.memory_mb),
            "AWS_LAMBDA_FUNCTION_TIMEOUT": str(function.timeout),
            "AWS_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            **function.environment,
        }
        body = {
            "Image": self.image,
            "Cmd": [
                "--runtime-interface-emulator-address",
                f"127.0.0.1:{invoke_port}",
                "--runtime-api-address",
                f"127.0.0.1:{runtime_port}",
                "/usr/bin/python3",
                "-m",
                "awslambdaric",
                function.handler,
            ],
            "Env": [f"{key}={value}" for key, value in variables.items()],
            "Labels": {
                "linchkit.local-lambda": function.name,
                "linchkit.owner-pid": str(os.getpid()),
            },
            "HostConfig": {
                "NetworkMode": "host",
                "Binds": [f"{code}:/var/task:ro"],
                "Memory": max(function.memory_mb, 128) * 1024 * 1024,
                "MemorySwap": max(function.memory_mb, 128) * 1024 * 1024,
                "PidsLimit": 256,
                "ReadonlyRootfs": True,
                "Tmpfs": {"/tmp": "rw,mode=1777,size=512m"},
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges:true"],
            },
        }
        container = await self.docker.run(body)
        environment = _Environment(
            function.key,
            container,
            f"http://127.0.0.1:{invoke_port}/2015-03-31/functions/function/invocations",
            function.name,
        )
        try:
            await self._wait_listening(container, invoke_port)
        except BaseException:
            await self.docker.remove(container)
            raise
        return environment

    async def _wait_listening(self, container: str, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if time.monotonic() > deadline or not await self.docker.running(container):
                    logs = await self.docker.logs(container, tail=20)
                    raise LocalLambdaError(
                        f"runtime container did not listen on {port}: {' | '.join(logs)}"
                    ) from None
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return

    def _code_dir(self, function: _Function) -> Path:
        zipped = self._zips.get(function.code_sha256)
        if zipped is None:
            raise LocalLambdaError(
                f"the local Lambda has no code for {function.name} ({function.code_sha256}); "
                "create the function through this endpoint, with ZipFile"
            )
        folder = self._work_dir / hashlib.sha256(zipped).hexdigest()
        if not folder.exists():
            partial = folder.with_suffix(".partial")
            shutil.rmtree(partial, ignore_errors=True)
            with zipfile.ZipFile(io.BytesIO(zipped)) as archive:
                archive.extractall(partial)
            for path in partial.rglob("*"):
                path.chmod(0o755 if path.is_dir() else 0o644)
            partial.rename(folder)
            folder.chmod(0o755)
        return folder


def _classify(payload: bytes) -> tuple[bytes, str | None]:
    """Tell a function error from a result, as Lambda does; RIE does not say (sam does the same)."""
    text = payload.strip()
    if text.startswith(b"Task timed out after"):
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


def _region(request: web.Request) -> str:
    """The region a request is signed for (``Credential=KEY/DATE/REGION/SERVICE/...``)."""
    authorization = request.headers.get("Authorization", "")
    _, _, credential = authorization.partition("Credential=")
    parts = credential.split("/")
    return parts[2] if len(parts) > 2 else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
