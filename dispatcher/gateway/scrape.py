"""``GET /metrics``: the dispatcher's registry as Prometheus reads it, behind a bearer
token when ``telemetry.metrics.token_env`` names one.

A scraper holds none of the credentials the gateway's callers present (``auth``), so
``/metrics`` has a token of its own: the value of the variable ``token_env`` names, read
once when the route is made (as a gateway starts). Unset, empty, or holding what no
``Authorization`` header could carry (a space, a control or non-ASCII character), it is a
``TelemetryEnvironmentError`` naming the variable, never its value. With a token, a
scrape is answered only when it sends ``Authorization: Bearer <token>`` (the scheme in
any case, RFC 9110 §11.1), as Prometheus does with ``authorization: {credentials_file:
…}``; anything else gets 401 ``unauthorized`` in the gateway's envelope with
``WWW-Authenticate: Bearer``, and is not logged (a scraper misconfigured shows as a target
down in Prometheus, which says 401).

The comparison takes the same time whatever is presented: both sides are hashed
(SHA-256) and the digests compared with ``hmac.compare_digest``, so neither the token's
characters nor its length shows in how long a refusal takes. Only the digest is kept.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry

from dispatcher.config.telemetry import MetricsSettings, TelemetryEnvironmentError
from dispatcher.gateway.errors import error_answer
from dispatcher.telemetry.metrics import metrics_handler
from linchkit_plugin.errors import Unauthorized

__all__ = ["ScrapeToken", "metrics_route", "scrape_token"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: What a bearer token may hold to be sent in a header as it is: visible ASCII.
_SENDABLE = re.compile(r"[\x21-\x7e]+")
_BEARER = "bearer "


class ScrapeToken:
    """The token ``/metrics`` requires; ``admits`` an ``Authorization`` header's value."""

    __slots__ = ("_digest", "variable")

    def __init__(self, variable: str, token: str) -> None:
        #: The variable it was read from, to name in messages.
        self.variable = variable
        self._digest = hashlib.sha256(token.encode()).digest()

    @classmethod
    def from_environment(
        cls, variable: str, environ: Mapping[str, str] | None = None
    ) -> ScrapeToken:
        """The token in ``variable``; ``TelemetryEnvironmentError`` naming it when it is
        unset, empty, or not sendable as a header's value."""
        env = os.environ if environ is None else environ
        token = env.get(variable)
        if not token:
            raise TelemetryEnvironmentError(
                variable,
                "telemetry.metrics.token_env names this variable for the token /metrics"
                " requires, but it is unset or empty: set it to the token your scrapers"
                " send (Authorization: Bearer …), or drop token_env",
            )
        if not _SENDABLE.fullmatch(token):
            raise TelemetryEnvironmentError(
                variable,
                "the token /metrics requires holds a space, a control or a non-ASCII"
                " character, which no scraper sends as it is in a header: use letters,"
                " digits and punctuation only (base64 or hex, say)",
            )
        return cls(variable, token)

    def admits(self, authorization: str | None) -> bool:
        """Whether ``authorization`` is ``Bearer <the token>``, in time independent of
        what either holds."""
        if authorization is None or authorization[:7].lower() != _BEARER:
            presented = b""
        else:
            presented = authorization[7:].encode("utf-8", "surrogateescape")
        digest = hashlib.sha256(presented).digest()
        # Compared even when no token was presented: every refusal costs the same.
        return hmac.compare_digest(digest, self._digest) and bool(presented)

    def __repr__(self) -> str:
        return f"<ScrapeToken from ${self.variable}>"


def scrape_token(
    settings: MetricsSettings, environ: Mapping[str, str] | None = None
) -> ScrapeToken | None:
    """The token ``settings.token_env`` names (read now), or None: ``/metrics`` is open."""
    if settings.token_env is None:
        return None
    return ScrapeToken.from_environment(settings.token_env, environ)


def metrics_route(registry: CollectorRegistry, token: ScrapeToken | None) -> Handler:
    """The handler of ``GET /metrics``: ``registry``'s exposition, to the holder of
    ``token`` only when there is one."""
    expose = metrics_handler(registry)
    if token is None:
        return expose

    async def guarded(request: web.Request) -> web.StreamResponse:
        presented = request.headers.getall("Authorization", ())
        # One header: two would leave which one counts to whoever reads them next.
        if len(presented) != 1 or not token.admits(presented[0]):
            refusal = Unauthorized("/metrics needs the scrape token: Authorization: Bearer …")
            return error_answer(refusal, close=request.body_exists)
        return await expose(request)

    return guarded
