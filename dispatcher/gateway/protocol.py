"""aiohttp's protocol as the gateway runs it: what aiohttp answers by itself is answered
with the gateway's error envelope, and logged in one line that quotes nothing a client sent.

aiohttp answers a request head its parser refuses (a line over 8,190 bytes, lines ended
by a bare LF, a malformed header or request line, too many headers) before any route or
middleware sees it, in ``RequestHandler.handle_error``: ``text/plain`` with the parser's
message, which quotes the bytes it choked on (``Got more than 8190 bytes when reading:
b'Bearer eyJ…'``, a whole request head with its ``X-API-Key``), and the same message with
a traceback at ERROR on the ``aiohttp.server`` logger, outside the ``logs`` format. It
offers no hook for that answer (aio-libs/aiohttp#3287, open since 2018; middlewares and
``on_response_prepare`` never see such a request), so ``GatewayProtocol`` overrides the
method:

    what aiohttp met                        answer (closes the connection)   log line
    a line of the head over 8,190 bytes     431 invalid_params               WARNING
    any other head its parser refuses       400 invalid_params               WARNING
      (a first request that is not HTTP at all: DEBUG, as aiohttp: TLS on the plain
      port, scanners)
    a handler that raised (a bug)           500 provider_error               ERROR, with
                                                                              the stack
    a handler that raised TimeoutError      504 deadline_exceeded            (aiohttp's)

Each line names the peer, what was wrong (the parser error's class, a fixed text) and the
status; a bug's line carries its exception's type and stack but not its message, which
may quote what a client sent (``invalid literal for int(): '²'``). The envelope's message
is fixed per case.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from dispatcher.gateway.connections import Seat
from dispatcher.gateway.errors import error_answer
from linchkit_plugin.errors import DeadlineExceeded, DispatchError, InvalidParams, ProviderError

__all__ = ["GatewayProtocol", "log_failure"]

log = logging.getLogger("dispatcher.gateway")


class GatewayProtocol(RequestHandler):
    """aiohttp's ``RequestHandler`` with the gateway's answers to what aiohttp answers
    itself (the module's docstring). Made by ``GatewayServer`` for each connection it
    serves with aiohttp, with the options its ``AppRunner`` got, and the connection's
    ``seat`` in the port's counts, given back when it closes."""

    def __init__(self, *args: Any, seat: Seat | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seat = seat

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._seat is not None:
            self._seat.release()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # ``message`` is aiohttp's text for the answer: the parser's, quoting the request.
        if request.writer.output_size > 0:
            # Part of an answer went out already: the connection is broken (as aiohttp).
            raise ConnectionError("an answer was being sent: no error answer can follow it")
        error: DispatchError
        if isinstance(exc, HttpProcessingError):
            status, error = _refusal(exc)
            level = logging.WARNING
            if isinstance(exc, BadHttpMethod) and self._request_count == 1:
                level = logging.DEBUG  # not HTTP at all: TLS on this port, a scanner
            log.log(
                level,
                "refused a request from %s that aiohttp's parser cannot read: %s (%d)",
                request.remote or "an unknown peer",
                type(exc).__name__,
                status,
            )
        elif status == 504:
            error = DeadlineExceeded("the gateway did not answer this request in time")
        else:
            status = 500
            log_failure(f"the gateway failed to answer a request on {_route_of(request)}", exc)
            error = ProviderError("the gateway failed to answer this request")
        answer = error_answer(error, status=status, close=True)
        answer.force_close()
        return answer


def _route_of(request: web.BaseRequest) -> str:
    """The route a request matched, as the app declares it (never the path it sent)."""
    match_info = getattr(request, "match_info", None)
    route = getattr(match_info, "route", None)
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else "no route"


def _refusal(exc: HttpProcessingError) -> tuple[int, InvalidParams]:
    if isinstance(exc, LineTooLong):
        return 431, InvalidParams(
            "a line of the request head (a header, or the request line) is over 8190 bytes"
        )
    return 400, InvalidParams(
        "the request is not HTTP/1.1 this gateway reads: a malformed request line or"
        " header, lines ended by a bare LF, or too many headers"
    )


def log_failure(what: str, error: BaseException | None) -> None:
    """Log a bug at ERROR: ``what`` failed, with the exception's type and where it was
    raised, but not its message, which may quote what a client sent."""
    if error is None:
        log.error("%s", what)
        return
    stack = "".join(traceback.format_list(traceback.extract_tb(error.__traceback__)))
    log.error("%s: %s (message withheld) at\n%s", what, type(error).__name__, stack.rstrip())
