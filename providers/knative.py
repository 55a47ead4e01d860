"""Knative services: calls through the cluster's ingress, routed by ``Host``.

Where a Knative call differs from a plain HTTP function (``providers/http.py``), and what
this provider does about it:

* **Routing.** Every service of a cluster sits behind one ingress (Kourier, Istio, Contour)
  that routes on the ``Host`` header: ``{service}.{namespace}.{domain}``; a tagged traffic
  target gets its own host, ``{tag}-{service}.{namespace}.{domain}``
  (https://knative.dev/docs/serving/traffic-management/). ``ingress`` is where that
  ingress listens; the host is computed from the target and sent explicitly, so one
  keep-alive pool to the ingress carries every service.
* **Payloads.** ``mode: envelope`` POSTs the dispatcher's JSON envelope (a function served by
  ``dispatcher-plugin serve``); ``binary`` and ``structured`` send it as the ``data`` of a
  CloudEvent (``ce-*`` headers, or ``application/cloudevents+json``), which is what a
  Knative Function in the ``func-python`` runtime accepts (``linchkit_plugin.knative``). The
  event ``id`` is the request id and stays the same on every attempt, so a receiver may
  deduplicate on ``(source, id)`` as the CloudEvents spec allows.
* **Deadlines.** Each attempt gets the time left before the call's deadline as its total
  timeout; the envelope carries ``deadline_ms``. Set ``timeoutSeconds`` of the revision at
  least as high as the longest method timeout (``deploy.timeout_seconds``).
* **Scale from zero.** A revision with no pod is reached through the activator, which holds
  the request while a pod starts and answers 503 when it cannot get one in time; under load
  502/503 bursts and resets are reported while revisions activate (knative/serving #9888,
  #13525; https://knative.dev/docs/serving/autoscaling/scale-to-zero/). Such answers are
  retried with exponential backoff within the call's deadline, and the call is counted as a
  cold start (``KnativeProvider.stats``).

When a retry is safe (``classify_failure``):

    never reached the plugin  → retried for every method
        - the TCP connection to the ingress could not be made (no byte was sent);
        - a 503 the platform made: no CloudEvent headers, not a CloudEvent or envelope
          body. The activator and queue-proxy answer 503 only *before* they forward a
          request (no capacity within the activation timeout, queue full); once they have
          forwarded it, a failure of the pod comes back as 502 (Go's ReverseProxy default).
          Functions served by ``linchkit_plugin`` never answer a bare 503 on the invoke path,
          so a bare 503 cannot be the plugin's.
    may have reached the plugin → retried only for methods marked ``idempotent: true``
        - 502 (the pod failed while or after receiving the request);
        - a connection reset or disconnect after the request was written;
        - 500/504 and timeouts are never retried here (the dispatcher's retry policy decides).

A non-idempotent method is therefore never sent twice by this provider: it is resent only
when the previous attempt provably did not reach the plugin.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, model_validator

from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    InvalidParams,
    ProviderError,
    TargetUnavailable,
)
from linchkit_plugin.wire import decode_response
from providers.base import Health, Provider
from providers.http import HttpProvider, _read_limited, _retry_after_seconds, _status_error
from providers.invocation import Invocation
from providers.target import TargetConfig

if TYPE_CHECKING:
    from providers.target import PluginInfo

__all__ = [
    "CALL_EVENT_TYPE",
    "RESPONSE_EVENT_TYPE",
    "Failure",
    "KnativeCanary",
    "KnativeCluster",
    "KnativeDeploy",
    "KnativeProvider",
    "KnativeStats",
    "KnativeTarget",
    "classify_failure",
]

log = logging.getLogger("dispatcher.providers.knative")

# The same strings as linchkit_plugin.knative, which the plugin side imports; repeated here so
# loading this module does not import the SDK.
CALL_EVENT_TYPE = "dev.linchkit.plugin.call.v1"
RESPONSE_EVENT_TYPE = "dev.linchkit.plugin.response.v1"
EVENT_SOURCE = "/linchkit/dispatcher"

_DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KnativeCanary(_Strict):
    """Split traffic between the revision of ``stable_version`` and the one being deployed."""

    stable_version: str = Field(description="Plugin version whose revision keeps the rest.")
    percent: Annotated[int, Field(ge=0, le=100)] = Field(
        description="Share of the service's traffic the new revision gets."
    )
    tag: Annotated[str, Field(pattern=_DNS_LABEL, max_length=20)] = "canary"


class KnativeCluster(_Strict):
    """Where ``dispatcher deploy`` applies the Service; unset: render only."""

    kubeconfig: Path | None = Field(
        default=None, description="Default: $KUBECONFIG or ~/.kube/config."
    )
    context: str | None = None


class KnativeDeploy(_Strict):
    """What ``dispatcher deploy`` renders into a ``serving.knative.dev/v1`` Service."""

    image: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    env: dict[Annotated[str, Field(pattern=_ENV_NAME)], str] = Field(default_factory=dict)
    requests: dict[Literal["cpu", "memory", "ephemeral-storage"], Annotated[str, Field(pattern=_QUANTITY)]] = Field(default_factory=dict)  # fmt: skip
    limits: dict[Literal["cpu", "memory", "ephemeral-storage"], Annotated[str, Field(pattern=_QUANTITY)]] = Field(default_factory=dict)  # fmt: skip
    container_concurrency: Annotated[int, Field(ge=0, le=1000)] = 0
    min_scale: Annotated[int, Field(ge=0)] = 0
    max_scale: Annotated[int, Field(ge=0)] | None = None
    timeout_seconds: Annotated[int, Field(ge=1, le=3600)] | None = None
    port: Annotated[int, Field(gt=0, lt=65536)] | None = None
    canary: KnativeCanary | None = None
    cluster: KnativeCluster | None = None

    @model_validator(mode="after")
    def _scale_bounds(self) -> KnativeDeploy:
        if self.max_scale and self.min_scale > self.max_scale:
            raise ValueError(f"min_scale {self.min_scale} is above max_scale {self.max_scale}")
        return self


class KnativeTarget(TargetConfig):
    """``provider: knative``: a Knative Service reached through the cluster's ingress."""

    provider: Literal["knative"]
    service: Annotated[str, Field(pattern=_DNS_LABEL, max_length=63)]
    namespace: Annotated[str, Field(pattern=_DNS_LABEL, max_length=63)] = "default"
    domain: str = Field(
        default="example.com",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        description="The cluster's domain (config-domain); example.com is Knative's default.",
    )
    ingress: AnyHttpUrl = Field(
        description="Where the cluster ingress listens, e.g. http://10.0.0.5"
    )
    tag: Annotated[str, Field(pattern=_DNS_LABEL, max_length=20)] | None = Field(
        default=None, description="Call this tagged traffic target instead of the main route."
    )
    mode: Literal["binary", "structured", "envelope"] = "binary"
    invoke_path: str | None = Field(
        default=None, pattern=r"^/", description="Default: / for CloudEvents, /invoke for envelope."
    )
    readiness_path: str | None = Field(
        default=None,
        pattern=r"^/",
        description="Default: /health/readiness (func-python), /health.",
    )
    headers: dict[str, str] = Field(default_factory=dict)
    max_response_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    activation_backoff_ms: Annotated[int, Field(gt=0)] = 50
    activation_backoff_max_ms: Annotated[int, Field(gt=0)] = 1000
    deploy: KnativeDeploy | None = None

    @property
    def host(self) -> str:
        prefix = f"{self.tag}-" if self.tag else ""
        return f"{prefix}{self.service}.{self.namespace}.{self.domain}"

    @property
    def effective_invoke_path(self) -> str:
        return self.invoke_path or ("/invoke" if self.mode == "envelope" else "/")

    @property
    def effective_readiness_path(self) -> str:
        return self.readiness_path or (
            "/health" if self.mode == "envelope" else "/health/readiness"
        )

    def describe(self) -> str:
        return f"knative {self.host} via {str(self.ingress).rstrip('/')} ({self.mode})"


class Failure(Enum):
    """How far a failed attempt got, which decides whether it may be sent again."""

    NOT_REACHED = "not_reached"  # provably never reached the plugin: safe to resend
    MAYBE_REACHED = "maybe_reached"  # may have run: resend only idempotent methods
    FINAL = "final"  # an answer to report as it is


def classify_failure(
    *,
    connect_failed: bool = False,
    reset: bool = False,
    status: int | None = None,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> Failure:
    """Sort one failed attempt; free of I/O so the rule is tested on its own (module docstring)."""
    if connect_failed:
        return Failure.NOT_REACHED
    if reset:
        return Failure.MAYBE_REACHED
    if status == 503 and not _made_by_function(headers or {}, body):
        return Failure.NOT_REACHED
    if status == 502:
        return Failure.MAYBE_REACHED
    return Failure.FINAL


def _made_by_function(headers: dict[str, str], body: bytes) -> bool:
    if "ce-specversion" in headers or headers.get("content-type", "").startswith(
        "application/cloudevents"
    ):
        return True
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(payload, dict) and "ok" in payload


@dataclass(slots=True)
class KnativeStats:
    """What the provider saw of Knative's scaling, since it started.

    ``cold_starts`` counts calls that met a revision activating (503/502/reset answers)
    before they were answered: calls that paid for a cold start, so a burst arriving at a
    service at zero counts each of its calls. ``unsafe_retries_refused`` counts calls not
    resent because they may have reached the plugin and are not idempotent.
    """

    calls: int = 0
    cold_starts: int = 0
    activation_retries: int = 0
    unsafe_retries_refused: int = 0


class _Answer:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class _Route:
    __slots__ = ("headers", "health_url", "invoke_url")

    def __init__(self, target: KnativeTarget) -> None:
        from yarl import URL

        base = str(target.ingress).rstrip("/")
        self.invoke_url = URL(base + target.effective_invoke_path)
        self.health_url = URL(base + target.effective_readiness_path)
        self.headers = {**target.headers, "Host": target.host}


class KnativeProvider(Provider[KnativeTarget]):
    """Calls Knative services; deploys them as ``serving.knative.dev/v1`` Services."""

    name = "knative"
    target_model = KnativeTarget

    def __init__(
        self,
        *,
        infra_dir: str | Path = "infra/knative",
        max_connections: int = 512,
        rng: random.Random | None = None,
    ) -> None:
        # The HTTP provider's aiohttp session (pool, keep-alive, no auto headers) carries the
        # calls; one pool to the ingress serves every Knative service behind it.
        self._http = HttpProvider(max_connections=max_connections)
        self._routes: dict[int, _Route] = {}
        self._idempotent: set[tuple[str, str, str]] = set()
        self._random = rng or random.Random()
        self.infra_dir = Path(infra_dir)
        self.stats = KnativeStats()

    async def start(self) -> None:
        await self._http.start()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def attach(self, plugin: PluginInfo, target: KnativeTarget) -> None:
        for method in plugin.methods:
            if plugin.target_of(method) == target and plugin.policies_of(method).idempotent:
                self._idempotent.add((plugin.id, plugin.version, method))

    async def invoke(self, target: KnativeTarget, invocation: Invocation) -> Any:
        self.stats.calls += 1
        idempotent = (invocation.plugin, invocation.version, invocation.method) in self._idempotent
        backoff = target.activation_backoff_ms / 1000
        attempts = 0
        activating = False
        while True:
            attempts += 1
            failure, outcome = await self._attempt(target, invocation)
            if failure is None:
                if activating:
                    self.stats.cold_starts += 1
                    log.info("%s: cold start, answered after %d attempts", target.host, attempts)
                return outcome
            error: DispatchError = outcome
            if failure is Failure.FINAL:
                raise error
            if failure is Failure.MAYBE_REACHED and not idempotent:
                self.stats.unsafe_retries_refused += 1
                error.details.setdefault("resent", False)
                error.message += (
                    " (not resent: the request may have reached the plugin and"
                    f" {invocation.method!r} is not marked idempotent)"
                )
                error.args = (error.message,)
                raise error
            # A refused connection is the ingress being down, not a revision activating.
            activating = activating or error.details.get("stage") != "connect"
            delay = min(backoff, target.activation_backoff_max_ms / 1000)
            delay = max(delay, error.retry_after or 0.0) * (0.5 + self._random.random() / 2)
            if invocation.remaining() <= delay:
                state = "was still activating" if activating else "could not be reached"
                raise DeadlineExceeded(
                    f"{target.host} {state} when the deadline passed"
                    f" ({attempts} attempts; last: {error.message})",
                    details={"attempts": attempts, "activating": activating},
                ) from error
            self.stats.activation_retries += 1
            await asyncio.sleep(delay)
            backoff *= 2

    async def health(self, target: KnativeTarget) -> Health:
        import aiohttp

        route = self._route(target)
        session = self._http._require_session()
        started = time.perf_counter()
        try:
            async with session.get(
                route.health_url, headers=route.headers, timeout=aiohttp.ClientTimeout(total=5)
            ) as response:
                body = await response.content.read(4096)
                headers = {key.lower(): value for key, value in response.headers.items()}
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            return Health("not_serving", f"{type(error).__name__}: {error}")
        latency_ms = (time.perf_counter() - started) * 1000
        detail = body[:200].decode("utf-8", "replace")
        if status == 200:
            return Health("serving", detail, latency_ms, {"host": target.host})
        if classify_failure(status=status, headers=headers, body=body) is Failure.NOT_REACHED:
            detail = f"activating (scaled to zero?): {detail}"
        return Health("not_serving", f"HTTP {status}: {detail}", latency_ms, {"host": target.host})

    async def deploy(self, plugin: PluginInfo, target: KnativeTarget) -> str:
        """Render the Service into ``infra_dir``; apply it when ``deploy.cluster`` is set."""
        from providers._knative_service import deploy

        return await deploy(plugin, target, self.infra_dir)

    def render_deployment(self, plugin: PluginInfo, target: KnativeTarget) -> str:
        """The Service as YAML, validated, without writing or applying it (``--dry-run``)."""
        from providers._knative_service import render_yaml

        return render_yaml(plugin, target)

    # -- one attempt -----------------------------------------------------------------------

    async def _attempt(
        self, target: KnativeTarget, invocation: Invocation
    ) -> tuple[Failure | None, Any]:
        """``(None, result)`` on success, else ``(failure kind, DispatchError)``."""
        import aiohttp

        remaining = invocation.remaining()
        if remaining <= 0:
            return Failure.FINAL, DeadlineExceeded(f"deadline passed before calling {target.host}")
        headers, body = self._encode(target, invocation)
        route = self._route(target)
        session = self._http._require_session()
        try:
            async with session.post(
                route.invoke_url,
                data=body,
                headers={**route.headers, **headers},
                timeout=aiohttp.ClientTimeout(total=remaining),
            ) as response:
                payload = await _read_limited(response, target.max_response_bytes, target)
                answer = _Answer(
                    response.status,
                    {key.lower(): value for key, value in response.headers.items()},
                    payload,
                )
        except TimeoutError:
            return Failure.FINAL, DeadlineExceeded(
                f"{target.host} did not answer within {remaining * 1000:.0f} ms"
            )
        except aiohttp.ClientConnectorError as error:
            return Failure.NOT_REACHED, TargetUnavailable(
                f"cannot connect to the ingress {target.ingress} for {target.host}: {error.os_error}",
                details={"stage": "connect"},
            )
        except aiohttp.ClientError as error:
            return Failure.MAYBE_REACHED, TargetUnavailable(
                f"{target.host} failed mid-call: {type(error).__name__}: {error}"
            )
        if answer.status == 200:
            try:
                return None, self._decode(target, answer)
            except DispatchError as error:
                return Failure.FINAL, error
        failure = classify_failure(status=answer.status, headers=answer.headers, body=answer.body)
        return failure, self._status_error(target, answer)

    def _encode(
        self, target: KnativeTarget, invocation: Invocation
    ) -> tuple[dict[str, str], bytes]:
        envelope = invocation.request_wire()
        if target.mode == "envelope":
            try:
                return {"Content-Type": "application/json"}, orjson.dumps(envelope)
            except TypeError as error:
                raise InvalidParams(f"params must be JSON-serializable: {error}") from None
        from cloudevents.core.bindings.http import to_binary_event, to_structured_event
        from cloudevents.core.v1.event import CloudEvent

        attributes: dict[str, Any] = {
            "type": CALL_EVENT_TYPE,
            "source": EVENT_SOURCE,
            "id": invocation.request_id,
            "subject": f"{invocation.plugin}.{invocation.method}",
            "datacontenttype": "application/json",
        }
        if invocation.traceparent is not None:
            # The CloudEvents distributed-tracing extension carries W3C trace context.
            attributes["traceparent"] = invocation.traceparent
        try:
            # orjson first: it refuses what JSON cannot carry, where the SDK's encoder would
            # fall back to str() and send a corrupt payload.
            orjson.dumps(envelope)
        except TypeError as error:
            raise InvalidParams(f"params must be JSON-serializable: {error}") from None
        event = CloudEvent(attributes=attributes, data=envelope)
        message = to_binary_event(event) if target.mode == "binary" else to_structured_event(event)
        return dict(message.headers), message.body

    def _decode(self, target: KnativeTarget, answer: _Answer) -> Any:
        if target.mode == "envelope":
            try:
                payload = orjson.loads(answer.body)
            except orjson.JSONDecodeError:
                raise ProviderError(
                    f"{target.host} answered a body that is not JSON: {answer.body[:80]!r}"
                ) from None
            return decode_response(payload)
        event_type, data = _read_event(target, answer)
        if event_type != RESPONSE_EVENT_TYPE:
            raise ProviderError(
                f"{target.host} answered a {event_type!r} event, expected {RESPONSE_EVENT_TYPE}"
            )
        return decode_response(data)

    def _status_error(self, target: KnativeTarget, answer: _Answer) -> DispatchError:
        payload = answer.body
        runtime_message: str | None = None
        if _made_by_function(answer.headers, payload) and target.mode != "envelope":
            # func-python answers its own failures as a CloudEvent: {"message": ...}.
            try:
                _, data = _read_event(target, answer)
            except ProviderError:
                data = None
            if isinstance(data, dict) and "ok" in data:
                payload = orjson.dumps(data)
            elif isinstance(data, dict) and isinstance(data.get("message"), str):
                runtime_message = data["message"]
        error = _status_error(answer.status, payload, answer.headers.get("retry-after"), target)
        if runtime_message is not None:
            error.message = f"{error.message}: {runtime_message[:500]}"
            error.args = (error.message,)
        if error.retry_after is None:
            error.retry_after = _retry_after_seconds(answer.headers.get("retry-after"))
        return error

    def _route(self, target: KnativeTarget) -> _Route:
        route = self._routes.get(id(target))
        if route is None:
            route = self._routes[id(target)] = _Route(target)
        return route

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<KnativeProvider calls={s.calls} cold_starts={s.cold_starts}"
            f" activation_retries={s.activation_retries}>"
        )


def _read_event(target: KnativeTarget, answer: _Answer) -> tuple[str, Any]:
    from cloudevents.core.bindings.http import HTTPMessage, from_http_event
    from cloudevents.core.exceptions import BaseCloudEventException

    try:
        event = from_http_event(HTTPMessage(headers=answer.headers, body=answer.body))
    except (BaseCloudEventException, ValueError) as error:
        raise ProviderError(
            f"{target.host} answered something that is not a CloudEvent: {error}"
        ) from None
    return event.get_type(), event.get_data()
