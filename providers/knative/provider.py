"""Knative services: calls through the cluster's ingress, routed by ``Host``.

Where a Knative call differs from a plain HTTP function (``providers/http.py``), and what
this provider does about it:

* **Routing.** Every service of a cluster sits behind one ingress (Kourier, Istio, Contour)
  that routes on the ``Host`` header: ``{service}.{namespace}.{domain}``; a tagged traffic
  target gets its own host, ``{tag}-{service}.{namespace}.{domain}``
  (https://knative.dev/docs/serving/traffic-management/). ``ingress`` is where that
  ingress listens; the host is computed from the target and sent explicitly, so one
  keep-alive pool to the ingress carries every service.
* **Payloads.** The envelope, or a CloudEvent carrying it (``cloudevents.py``).
* **Deadlines.** Each attempt gets the time left before the call's deadline as its total
  timeout; the envelope carries ``deadline_ms``. Set ``timeoutSeconds`` of the revision at
  least as high as the longest method timeout (``deploy.timeout_seconds``).
* **Scale from zero.** A revision with no pod is reached through the activator, which holds
  the request while a pod starts and answers 503 when it cannot get one in time; under load
  502/503 bursts and resets are reported while revisions activate (knative/serving #9888,
  #13525; https://knative.dev/docs/serving/autoscaling/scale-to-zero/).

Which failures this provider sends again, and why only those
-------------------------------------------------------------

The provider's resend is a *transport* concern, like a connection pool retrying a refused
connect: it resends only what provably never reached the plugin (``Failure.NOT_REACHED``
in ``activation.py``: the connection to the ingress failed, or the platform answered a
bare 503 before forwarding), with exponential backoff and jitter, honouring
``Retry-After``, until the call's deadline (then ``DeadlineExceeded`` with ``attempts`` and
``activating``). Such a resend cannot run the plugin twice, so it is right for every
method, and it needs to know nothing about the method.

A failure that *may* have reached the plugin (``Failure.MAYBE_REACHED``: a 502, a reset
after the request was written) is raised at once as a retryable ``TargetUnavailable``
with ``details`` ``resent: False`` and ``stage``. Sending it again is safe only for an
idempotent method, and whether a method is idempotent is the manifest's policy, which
belongs to the dispatcher: its retry policy (``idempotent: true`` plus ``retry``) knows,
and spends its retry budget and backoff on it. The provider does not read policies, so it
never resends such a call itself: a non-idempotent method is sent again only when no
earlier attempt can have run it.

A fleet of ingresses (``instances:``, ``providers.knative.target``): an ingress that
refuses the connection is not waited for; the error (``details["stage"] == "connect"``)
goes up at once and the dispatcher's fleet sends the call to another ingress, for any
method. Activation 503s are still resent here: every ingress reaches the same activator.

Redirects are never followed (``providers._http_common``): a 3xx is ``ProviderError``
naming the ``Location``, final. ``user:password@`` in ``ingress`` is sent as
``Authorization: Basic`` and never reaches aiohttp's URL; messages mask it. The ingress
is checked against the manifest's ``egress`` policy when a route is built (an address
literal) and after resolution (a name); a refusal is final, never resent.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    ProviderError,
    TargetUnavailable,
)
from providers._compression import Negotiation, post_compressed, request_headers
from providers._http_client import DEFAULT_CLIENT, HttpClient, HttpPool
from providers._http_common import (
    HeldRoutes,
    HttpClients,
    TargetRoutes,
    basic_authorization,
    redirect_detail,
    retry_after_seconds,
    served_at,
    status_error,
)
from providers.base import ColdStarts, Health, Provider
from providers.invocation import Invocation
from providers.knative.activation import Failure, classify_failure, made_by_function
from providers.knative.cloudevents import Answer, decode_answer, encode_request, read_event
from providers.knative.deployer import KnativeDeployer
from providers.knative.target import KnativeTarget
from providers.target import PluginInfo, masked_url
from providers.tls import ClientTlsContext

__all__ = ["KnativeProvider", "KnativeStats"]

log = logging.getLogger("dispatcher.providers.knative")

#: ``details["stage"]`` of a failed attempt: where it failed.
_STAGE_OF_STATUS = {503: "activation", 502: "forwarded"}


@dataclass(slots=True)
class KnativeStats:
    """What the provider saw of Knative's scaling, since it started.

    ``cold_starts`` counts calls that met a revision activating (platform 503s) before they
    were answered: calls that paid for a cold start, so a burst arriving at a service at
    zero counts each of its calls. ``activation_retries`` counts the resends of attempts
    that never reached the plugin. ``maybe_reached`` counts calls that failed after the
    request may have reached the plugin (502, reset): raised at once, not resent here; the
    dispatcher's retry policy resends them for idempotent methods.
    """

    calls: int = 0
    cold_starts: int = 0
    activation_retries: int = 0
    maybe_reached: int = 0


class _Route:
    """What a call of one target needs, computed once: parsed URLs and headers."""

    __slots__ = (
        "client",
        "describe_url",
        "headers",
        "health_url",
        "invoke_url",
        "negotiation",
        "tls",
    )

    def __init__(self, target: KnativeTarget, open_client: Callable[[], HttpClient]) -> None:
        from yarl import URL

        base = str(target.ingress_url()).rstrip("/")
        invoke_url = URL(base + target.effective_invoke_path)
        authorization = basic_authorization(invoke_url)
        self.invoke_url = str(invoke_url.with_user(None))
        self.health_url = str(URL(base + target.effective_readiness_path).with_user(None))
        self.describe_url = str(URL(base + "/describe").with_user(None))
        self.negotiation = Negotiation(target.compression, host=invoke_url.host or "")
        # Routed by Host: on HTTP/2 the host travels as the request's :authority, which
        # the client takes from the URL it sends to (``authority`` of its client).
        given = target.headers
        if target.http2:  # a Host of the manifest's own would contradict the authority
            given = {name: value for name, value in given.items() if name.lower() != "host"}
        routing = {} if target.http2 else {"Host": target.host}
        self.headers = request_headers({**given, **routing}, self.negotiation)
        if authorization is not None:
            self.headers["Authorization"] = authorization
        self.tls = None if target.tls is None else ClientTlsContext(target.tls)
        # Last, once nothing above can fail (TLS files unreadable now): a client of the
        # target's own opened before a failure was left open, one more per call.
        self.client = open_client()

    @property
    def urls(self) -> tuple[str, ...]:
        return self.invoke_url, self.health_url, self.describe_url


class KnativeProvider(Provider[KnativeTarget]):
    """Calls Knative services; deploys them as ``serving.knative.dev/v1`` Services."""

    name = "knative"
    target_model = KnativeTarget
    delivers_events = False  # no channel from the plugin back to the host

    def __init__(
        self,
        *,
        infra_dir: str | Path = "infra/knative",
        max_connections: int = 512,
        keepalive_seconds: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        # One pool to the ingress serves every Knative service behind it (unless a target
        # sizes a pool of its own).
        self._shared_pool = HttpPool(
            max_connections=max_connections, idle_timeout_s=keepalive_seconds
        )
        self._clients: HttpClients | None = None
        #: Routes by target key, let go at a target's last detach (``TargetRoutes``).
        self._targets: TargetRoutes[_Route] = TargetRoutes()
        #: The same dict as ``_targets.routes``, read on every attempt.
        self._routes = self._targets.routes
        self._random = rng or random.Random()
        self.infra_dir = Path(infra_dir)
        self.stats = KnativeStats()
        #: Cold starts by target key, with the target's description they are reported
        #: under; a target's go at its last detach, as its route does: an instance of a
        #: fleet that DNS or a registry stops listing takes its history with it.
        self._cold_starts: dict[str, tuple[str, ColdStarts]] = {}

    async def start(self) -> None:
        self._clients = HttpClients(DEFAULT_CLIENT, self._shared_pool, egress=self.egress)

    async def aclose(self) -> None:
        clients, self._clients = self._clients, None
        self._targets.clear()
        if clients is not None:
            await clients.aclose()

    async def attach(self, plugin: PluginInfo, target: KnativeTarget) -> None:
        """Count ``plugin`` among those calling ``target`` (one ingress of a service);
        its route is built by the first call."""
        self._targets.attach(target.key)

    async def detach(self, plugin: PluginInfo, target: KnativeTarget) -> None:
        """Once no plugin is attached to ``target`` any more, drop its route and release
        its clients: its own (a ``pool:``, HTTP/2's ``authority``) closed, the shared
        one's state for its URLs dropped where no other target calls them."""
        await self._targets.release(target.key, self._clients)
        if not self._targets.holds(target.key):
            self._cold_starts.pop(target.key, None)

    def held(self) -> HeldRoutes:
        """What the provider holds for its targets now (routes, clients, per-URL state)."""
        return self._targets.held(self._clients)

    def deployer(self) -> KnativeDeployer:
        """Renders Services into ``infra_dir`` and applies them where ``deploy.cluster`` is set."""
        return KnativeDeployer(self.infra_dir)

    async def invoke(self, target: KnativeTarget, invocation: Invocation) -> Any:
        self.stats.calls += 1
        backoff = target.activation_backoff_ms / 1000
        attempts = 0
        activating = False
        started = time.monotonic()
        while True:
            attempts += 1
            failure, outcome = await self._attempt(target, invocation)
            if failure is None:
                if activating:
                    self._cold_start(target, time.monotonic() - started)
                    log.info("%s: cold start, answered after %d attempts", target.host, attempts)
                return outcome
            error: DispatchError = outcome
            if failure is Failure.FINAL:
                if attempts > 1 and isinstance(error, DeadlineExceeded):
                    # The last wait left little time, and the last attempt ran out of it:
                    # what ended the call is the activation the earlier attempts saw.
                    raise _gave_up(target, attempts, activating, error) from error
                raise error
            if failure is Failure.MAYBE_REACHED:
                self.stats.maybe_reached += 1
                raise error.with_message(
                    f"{error.message} (not resent by the provider: the request may have"
                    " reached the plugin; the method's retry policy decides)"
                ).with_details(resent=False, attempts=attempts)
            # NOT_REACHED. A refused connection is the ingress being down, not a revision
            # activating: an instance of a fleet leaves it to the fleet, which sends the
            # call to another ingress at once (the marker says it never left).
            if target.in_fleet and error.details.get("stage") == "connect":
                raise error
            activating = activating or error.details.get("stage") != "connect"
            delay = min(backoff, target.activation_backoff_max_ms / 1000)
            delay = max(delay, error.retry_after or 0.0) * (0.5 + self._random.random() / 2)
            if invocation.remaining() <= delay:
                raise _gave_up(target, attempts, activating, error) from error
            self.stats.activation_retries += 1
            await asyncio.sleep(delay)
            backoff *= 2

    def _cold_start(self, target: KnativeTarget, seconds: float) -> None:
        self.stats.cold_starts += 1
        kept = self._cold_starts.get(target.key)
        if kept is None:
            kept = self._cold_starts[target.key] = (target.describe(), ColdStarts())
        kept[1].add(seconds)

    def cold_starts(self) -> dict[str, ColdStarts]:
        """By description: two targets that differ only in what it leaves out (a
        timeout, a header) share theirs."""
        described: dict[str, ColdStarts] = {}
        for description, each in self._cold_starts.values():
            total = described.setdefault(description, ColdStarts())
            total.count += each.count
            total.seconds += each.seconds
        return described

    async def health(self, target: KnativeTarget) -> Health:
        started = time.perf_counter()
        try:
            route = self._route(target)
            reply = await route.client.get(
                route.health_url,
                route.headers,
                timeout=5,
                limit=4096,
                target=target,
                tls=route.tls,
            )
        except TimeoutError:
            return Health("not_serving", f"{target.host} did not answer within 5 s")
        except DispatchError as error:  # unreachable, or the egress policy refused it
            return Health("not_serving", error.message, extra={"host": target.host})
        body = reply.body
        headers = {key.lower(): value for key, value in reply.headers.items()}
        status = reply.status
        latency_ms = (time.perf_counter() - started) * 1000
        redirect = redirect_detail(status, headers.get("location"))
        if redirect is not None:
            return Health("not_serving", redirect, latency_ms, {"host": target.host})
        detail = body[:200].decode("utf-8", "replace")
        if status == 200:
            return Health("serving", detail, latency_ms, {"host": target.host})
        if classify_failure(status=status, headers=headers, body=body) is Failure.NOT_REACHED:
            detail = f"activating (scaled to zero?): {detail}"
        return Health("not_serving", f"HTTP {status}: {detail}", latency_ms, {"host": target.host})

    async def served_methods(
        self, plugin: PluginInfo, target: KnativeTarget, *, timeout: float
    ) -> frozenset[str] | None:
        """``GET /describe`` through the ingress, as a call goes (a service built on the
        SDK answers it; a CloudEvents function without it says nothing)."""
        try:
            route = self._route(target)
        except DispatchError:
            return None
        return await served_at(
            route.client,
            route.describe_url,
            route.headers,
            timeout=timeout,
            target=target,
            tls=route.tls,
        )

    # -- one attempt -----------------------------------------------------------------------

    async def _attempt(
        self, target: KnativeTarget, invocation: Invocation
    ) -> tuple[Failure | None, Any]:
        """``(None, result)`` on success, else ``(failure kind, DispatchError)``."""
        remaining = invocation.remaining()
        if remaining <= 0:
            return Failure.FINAL, DeadlineExceeded(f"deadline passed before calling {target.host}")
        headers, body = encode_request(target, invocation)
        try:
            route = self._route(target)
        except ProviderError as error:  # the egress policy refused the ingress
            return Failure.FINAL, error
        try:
            reply = await post_compressed(
                route.client,
                route.negotiation,
                route.invoke_url,
                body,
                {**route.headers, **headers},
                timeout=remaining,
                limit=target.max_response_bytes,
                target=target,
                tls=route.tls,
            )
        except TimeoutError:
            return Failure.FINAL, DeadlineExceeded(
                f"{target.host} did not answer within {remaining * 1000:.0f} ms"
            )
        except TargetUnavailable as error:
            return _unavailable(error, target)
        except ProviderError as error:  # egress refused what the name resolved to; too big
            return Failure.FINAL, error
        answer = Answer(
            reply.status, {key.lower(): value for key, value in reply.headers.items()}, reply.body
        )
        if answer.status == 200:
            try:
                return None, decode_answer(target, answer)
            except DispatchError as error:
                return Failure.FINAL, error
        failure = classify_failure(status=answer.status, headers=answer.headers, body=answer.body)
        refusal: DispatchError = self._status_error(target, answer)
        if failure is not Failure.FINAL:
            refusal = refusal.with_details(stage=_STAGE_OF_STATUS.get(answer.status, "answer"))
        return failure, refusal

    def _status_error(self, target: KnativeTarget, answer: Answer) -> DispatchError:
        payload = answer.body
        runtime_message: str | None = None
        if made_by_function(answer.headers, payload) and target.mode != "envelope":
            # func-python answers its own failures as a CloudEvent: {"message": ...}.
            try:
                _, data = read_event(target, answer)
            except DispatchError:
                data = None
            if isinstance(data, dict) and "ok" in data:
                payload = orjson.dumps(data)
            elif isinstance(data, dict) and isinstance(data.get("message"), str):
                runtime_message = data["message"]
        header = answer.headers.get("retry-after")
        location = answer.headers.get("location")
        error = status_error(answer.status, payload, header, target, location=location)
        if runtime_message is not None:
            error = error.with_message(f"{error.message}: {runtime_message[:500]}")
        retry_after = retry_after_seconds(header)
        if error.retry_after is None and retry_after is not None:
            error = error.with_retry_after(retry_after)
        return error

    def _route(self, target: KnativeTarget) -> _Route:
        route = self._routes.get(target.key)
        if route is None:
            # A name is checked again after resolution (open_session); a literal only here.
            for destination in target.destinations():
                self.egress.check(destination)
            clients = self._clients
            if clients is None:
                raise ProviderError(
                    "the knative provider is not started (use the Dispatcher as a context manager)"
                )
            open_client = partial(
                clients.for_target,
                target.client,
                target.pool,
                http2=target.http2,
                authority=target.host if target.http2 else None,
            )
            route = self._routes[target.key] = _Route(target, open_client)
        return route

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<KnativeProvider calls={s.calls} cold_starts={s.cold_starts}"
            f" activation_retries={s.activation_retries} maybe_reached={s.maybe_reached}>"
        )


def _unavailable(error: TargetUnavailable, target: KnativeTarget) -> tuple[Failure, DispatchError]:
    """How a transport failure of one attempt counts (module docstring)."""
    if error.details.get("stage") == "connect":
        where = f"the ingress {masked_url(str(target.ingress))} for {target.host}"
        refused = error.with_message(error.message.replace(target.describe(), where, 1))
        if "tls" in refused.details:
            # A certificate that does not verify will not verify on a resend either.
            return Failure.FINAL, refused
        return Failure.NOT_REACHED, refused
    if error.details.get("tls") == "client_certificate_refused":
        # Our certificate refused: not an activating revision; resending cannot help.
        return Failure.FINAL, error
    failed = error.with_message(error.message.replace(target.describe(), target.host, 1))
    return Failure.MAYBE_REACHED, failed.with_details(stage="in_flight")


def _gave_up(
    target: KnativeTarget, attempts: int, activating: bool, last: DispatchError
) -> DeadlineExceeded:
    """The deadline passed while the revision activated (or the ingress was down)."""
    state = "was still activating" if activating else "could not be reached"
    return DeadlineExceeded(
        f"{target.host} {state} when the deadline passed"
        f" ({attempts} attempts; last: {last.message})",
        details={"attempts": attempts, "activating": activating},
    )
