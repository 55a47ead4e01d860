"""A local stand-in for a Knative cluster's ingress and activator. EMULATION, not Knative.

No Kubernetes runs here, so this process plays the parts of Knative Serving that a caller
of a Knative service can observe, as Knative documents them, and runs each revision as a
real local process (for example the plugin in the Knative Functions Python runtime,
``python -m linchkit_plugin.knative``):

* **Ingress, routing by Host** — ``{service}.{namespace}.{domain}`` reaches the service's
  main route, ``{tag}-{service}.{namespace}.{domain}`` its tagged traffic target; an
  unknown host gets 404. https://knative.dev/docs/serving/traffic-management/
* **Activator, scale from zero** — a request for a revision with no running process starts
  one and, while it is not ready, is held up to ``activation_hold`` seconds and then
  answered ``503`` in plain text (the platform's answer, never forwarded). The activator
  buffers requests during activation and answers 503 when it cannot get capacity in time;
  502/503 bursts while revisions activate are reported in knative/serving #9888, #13525.
  https://knative.dev/docs/serving/autoscaling/scale-to-zero/ and
  https://github.com/knative/serving/blob/main/docs/scaling/SYSTEM.md
* **Readiness** — a revision is ready once GET ``readiness_path`` on it answers 200, as the
  queue-proxy and kubelet probe the user container.
* **Scale to zero after idle** — with ``idle_seconds`` set, a revision with no request in
  flight and none for that long is stopped (SIGTERM, then SIGKILL), as the autoscaler does
  after its stable window and grace period. Keep it above the callers' retry backoff, as
  Knative's stable window (6 s at least) is, or a revision can be stopped between a
  caller's retries while it activates.
* **Proxy failures** — when the revision's process fails while a request is in flight the
  caller gets 502, like Go's ReverseProxy in the activator and queue-proxy.
* **Runtime contract** — the process gets ``PORT``, ``K_SERVICE``, ``K_CONFIGURATION`` and
  ``K_REVISION``. https://github.com/knative/specs/blob/main/specs/serving/runtime-contract.md

Not emulated: more than one pod per revision, ``containerConcurrency`` queueing, traffic
percentages (a route here goes to one revision), TLS, timeoutSeconds enforcement.

Every request forwarded to a revision is recorded in ``Revision.forwarded`` with its request
id (the CloudEvent ``ce-id``, or the envelope's ``context.request_id``), so tests can tell
exactly how many times a call reached the plugin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from aiohttp import ClientError, ClientSession, ClientTimeout, web

__all__ = ["ForwardedRequest", "KnativeStandIn", "Revision"]

log = logging.getLogger("dispatcher.testing.knative")

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)

State = Literal["scaled_to_zero", "activating", "ready"]


@dataclass(frozen=True, slots=True)
class ForwardedRequest:
    """One request the stand-in delivered to a revision's process."""

    method: str
    path: str
    request_id: str | None
    status: int | None  # None: the process failed before answering (the caller got 502)
    headers: Mapping[str, str] = field(default_factory=dict)  # as received, lower-case names


@dataclass(eq=False)
class Revision:
    """One revision: how to start its process, and what the stand-in saw of it.

    ``command`` items may contain ``{port}``, replaced by the port the process must listen on
    (also given in ``PORT`` and, for func-python, ``LISTEN_ADDRESS``).
    """

    name: str
    command: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    readiness_path: str = "/health/readiness"
    state: State = "scaled_to_zero"
    starts: int = 0
    forwarded: list[ForwardedRequest] = field(default_factory=list)
    service: str = ""
    _process: asyncio.subprocess.Process | None = None
    _port: int = 0
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _at_zero: asyncio.Event = field(default_factory=asyncio.Event)
    _watcher: asyncio.Task[None] | None = None
    _last_request: float = 0.0
    _in_flight: int = 0

    def times_forwarded(self, request_id: str) -> int:
        return sum(1 for request in self.forwarded if request.request_id == request_id)

    def __repr__(self) -> str:
        return (
            f"<Revision {self.name} {self.state} starts={self.starts}"
            f" forwarded={len(self.forwarded)} in_flight={self._in_flight}>"
        )


class KnativeStandIn:
    """Ingress + activator emulation on 127.0.0.1; an async context manager.

    ``url`` (after start) is what a knative target's ``ingress`` points at.
    """

    def __init__(
        self,
        *,
        domain: str = "example.com",
        activation_hold: float = 0.0,
        idle_seconds: float | None = None,
        ready_timeout: float = 60.0,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.domain = domain
        self.activation_hold = activation_hold
        self.idle_seconds = idle_seconds
        self.ready_timeout = ready_timeout
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="knative-"))
        self.url = ""
        self._hosts: dict[str, Revision] = {}
        self._revisions: list[Revision] = []
        self._runner: web.ServerRunner | None = None
        self._client: ClientSession | None = None
        self._reaper: asyncio.Task[None] | None = None

    def add_service(
        self,
        name: str,
        revision: Revision,
        *,
        namespace: str = "default",
        tags: Mapping[str, Revision] | None = None,
    ) -> None:
        """Route ``name.namespace.domain`` to ``revision`` and each tag host to its revision."""
        routes = {f"{name}.{namespace}.{self.domain}": revision}
        for tag, tagged in (tags or {}).items():
            routes[f"{tag}-{name}.{namespace}.{self.domain}"] = tagged
        for host, target in routes.items():
            target.service = name
            self._hosts[host] = target
            if target not in self._revisions:
                self._revisions.append(target)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> str:
        self._client = ClientSession(auto_decompress=False, skip_auto_headers=("User-Agent",))
        self._runner = web.ServerRunner(web.Server(self._handle), handle_signals=False)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        if self.idle_seconds is not None:
            self._reaper = asyncio.create_task(self._reap_idle(self.idle_seconds))
        return self.url

    async def aclose(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for revision in self._revisions:
            await self.scale_to_zero(revision)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()

    async def __aenter__(self) -> KnativeStandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- scaling -----------------------------------------------------------------------

    async def wait_ready(self, revision: Revision, timeout: float | None = None) -> None:
        """Activate ``revision`` (if it is at zero) and wait until it is ready."""
        if revision.state == "scaled_to_zero":
            await self._activate(revision)
        async with asyncio.timeout(timeout or self.ready_timeout):
            await revision._ready.wait()

    async def wait_scaled_to_zero(self, revision: Revision, timeout: float = 60.0) -> None:
        """Wait until ``revision`` has no process (the idle reaper or a failure stopped it)."""
        async with asyncio.timeout(timeout):
            await revision._at_zero.wait()

    async def scale_to_zero(self, revision: Revision) -> None:
        """Stop the revision's process now (SIGTERM, SIGKILL after 10 s)."""
        process, revision._process = revision._process, None
        watcher, revision._watcher = revision._watcher, None
        revision.state = "scaled_to_zero"
        revision._ready.clear()
        revision._at_zero.set()
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()

    async def _activate(self, revision: Revision) -> None:
        port = _free_port()
        revision.starts += 1
        revision.state = "activating"
        revision._at_zero.clear()
        revision._port = port
        env = {
            **os.environ,
            "PORT": str(port),
            "LISTEN_ADDRESS": f"127.0.0.1:{port}",
            "K_SERVICE": revision.service,
            "K_CONFIGURATION": revision.service,
            "K_REVISION": revision.name,
            **revision.env,
        }
        command = [part.replace("{port}", str(port)) for part in revision.command]
        log_path = self.log_dir / f"{revision.name}.{revision.starts}.log"
        with log_path.open("wb") as output:
            revision._process = await asyncio.create_subprocess_exec(
                *command, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output
            )
        revision._watcher = asyncio.create_task(self._watch_readiness(revision))

    async def _watch_readiness(self, revision: Revision) -> None:
        assert self._client is not None
        assert revision._process is not None
        process = revision._process
        url = f"http://127.0.0.1:{revision._port}{revision.readiness_path}"
        deadline = time.monotonic() + self.ready_timeout
        while process.returncode is None and time.monotonic() < deadline:
            with contextlib.suppress(ClientError, TimeoutError):
                async with self._client.get(url, timeout=ClientTimeout(total=1)) as response:
                    if response.status == 200:
                        # Becoming ready counts as activity: the activator had requests
                        # waiting, and the autoscaler's window starts from them.
                        revision._last_request = time.monotonic()
                        revision.state = "ready"
                        revision._ready.set()
                        return
            await asyncio.sleep(0.05)
        log.warning("revision %s did not become ready; scaling it back to zero", revision.name)
        await self.scale_to_zero(revision)

    async def _reap_idle(self, idle_seconds: float) -> None:
        while True:
            await asyncio.sleep(min(0.25, idle_seconds / 4))
            now = time.monotonic()
            for revision in self._revisions:
                if (
                    revision.state == "ready"
                    and revision._in_flight == 0
                    and now - revision._last_request > idle_seconds
                ):
                    await self.scale_to_zero(revision)

    # -- requests ------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        host = (request.headers.get("Host") or "").rsplit(":", 1)[0].lower()
        revision = self._hosts.get(host)
        if revision is None:
            return web.Response(status=404, text=f"no Route for host {host!r}\n")
        body = await request.read()
        revision._last_request = time.monotonic()
        revision._in_flight += 1
        try:
            process = revision._process
            if process is not None and process.returncode is not None:
                # The pod is gone; Knative would have taken it out of the endpoints.
                await self.scale_to_zero(revision)
            if revision.state == "scaled_to_zero":
                await self._activate(revision)
            if revision.state != "ready" and self.activation_hold > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.activation_hold):
                        await revision._ready.wait()
            if revision.state != "ready":
                return web.Response(
                    status=503, text=f"revision {revision.name} is activating; try again\n"
                )
            return await self._forward(revision, request, body)
        finally:
            revision._in_flight -= 1
            revision._last_request = time.monotonic()

    async def _forward(
        self, revision: Revision, request: web.BaseRequest, body: bytes
    ) -> web.StreamResponse:
        assert self._client is not None
        request_id = _request_id(request.headers.get("ce-id"), body)
        seen = {key.lower(): value for key, value in request.headers.items()}
        headers = {
            key: value for key, value in request.headers.items() if key.lower() not in _HOP_BY_HOP
        }
        url = f"http://127.0.0.1:{revision._port}{request.path_qs}"
        try:
            async with self._client.request(
                request.method, url, headers=headers, data=body, timeout=ClientTimeout(total=300)
            ) as response:
                payload = await response.read()
                answer_headers = {
                    key: value
                    for key, value in response.headers.items()
                    if key.lower() not in _HOP_BY_HOP
                }
                status = response.status
        except (ClientError, TimeoutError) as error:
            revision.forwarded.append(
                ForwardedRequest(request.method, request.path, request_id, None, seen)
            )
            process = revision._process
            if process is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        await process.wait()
                if process.returncode is not None:
                    await self.scale_to_zero(revision)
            return web.Response(status=502, text=f"error proxying to {revision.name}: {error}\n")
        revision.forwarded.append(
            ForwardedRequest(request.method, request.path, request_id, status, seen)
        )
        return web.Response(status=status, headers=answer_headers, body=payload)


def _request_id(ce_id: str | None, body: bytes) -> str | None:
    if ce_id is not None:
        return ce_id
    try:
        payload: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(payload, dict):
        if isinstance(payload.get("id"), str):  # a structured-mode CloudEvent
            return str(payload["id"])
        context = payload.get("context")
        if isinstance(context, dict) and isinstance(context.get("request_id"), str):
            return str(context["request_id"])
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
