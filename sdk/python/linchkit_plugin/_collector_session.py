"""The ``requests`` session OpenTelemetry's OTLP/HTTP span exporter sends through
(``linchkit_plugin._span_export.new_span_exporter``). Every request it makes:

- ends at its timeout, however the collector answers: a collector that sends its status
  line, headers or body a byte at a time resets a socket's timeout with each byte, so a
  timer shuts the connection's socket at the deadline (before, such a collector held the
  exporter's thread for good, and no span was sent again);
- reads at most ``MAX_ANSWER_BYTES`` of the answer, never decompressed (the exporter
  needs its status only): a huge or endless body is cut, its connection dropped (before,
  the whole body was held in memory: gigabytes from an endless one in seconds);
- follows no redirect (OpenTelemetry 1.25 to 1.3x followed them, re-sending the
  exporter's headers, tokens included, wherever the collector pointed) and says once that
  the collector answered one (OpenTelemetry counts a 3xx as spans sent);
- keeps no cookie a collector sets (each would stay for the process's life);
- sends the ``Authorization`` the headers' variable sets rather than the URL's user and
  password, which ``requests`` put in its place (the other SDKs send the URL's only when
  no such header is set);
- fails with an error of the same ``requests`` type whose message names the collector by
  scheme, host and port only: ``requests``' own put the URL's path and query in it, and the
  exporter logs it, a token in the query with it;
- says an outage once: OpenTelemetry logs a line per failed batch (and per retry), which
  a collector answering 500 to a busy plugin made 16 lines a second. The session says
  when the collector stops taking spans and when it takes them again; OpenTelemetry's
  lines for the exports it made are dropped (``_OutageLines``: only on the thread that
  just made a failed request through a session, so another exporter's lines stay).
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
from http.cookiejar import DefaultCookiePolicy
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

__all__ = ["MAX_ANSWER_BYTES", "CollectorSession"]

#: The most of a collector's answer that is read (an OTLP answer is a few bytes: at most
#: a partial-success message).
MAX_ANSWER_BYTES = 64 * 1024
#: A request's time when it is given none (the exporter always gives one: OpenTelemetry's
#: default).
UNTIMED_SECONDS = 10.0

#: The deadline of the request this thread is making, for the connection it runs on.
_requesting = threading.local()


class _Deadline:
    """One request's deadline: a timer that shuts the socket of the connection it runs on
    (which ends a read a collector feeds a byte at a time: each byte resets the socket's
    own timeout)."""

    __slots__ = ("_timer", "connection", "fired", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.connection: HTTPConnection | None = None
        self.fired = False
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True
        self._timer.name = "linchkit-span-export-deadline"

    def start(self) -> None:
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()

    def _cut(self) -> None:
        self.fired = True
        sock = getattr(self.connection, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _WatchedHTTPConnection(HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(self)
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(self)
        super().request(*args, **kwargs)


def _watch(connection: HTTPConnection) -> None:
    deadline: _Deadline | None = getattr(_requesting, "deadline", None)
    if deadline is not None:
        deadline.connection = connection


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(HTTPAdapter):
    """``requests``' adapter whose connections a request's deadline can cut."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _WatchedHTTPPool,
            "https": _WatchedHTTPSPool,
        }


#: How OpenTelemetry's OTLP/HTTP exporters (1.25 and later) begin the lines they log for
#: a failed export, and for each retry of one.
_EXPORT_FAILURE_LINES = ("Failed to export", "Transient error")
#: The loggers they log them with: the span exporter's module's.
_EXPORTER_LOGGERS = ("opentelemetry.exporter.otlp.proto.http.trace_exporter",)


class _OutageLines(logging.Filter):
    """Drops OpenTelemetry's line for an export that failed through a ``CollectorSession``
    (the last request made on the logging thread failed): the session says the outage."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(_requesting, "failed", False) and isinstance(record.msg, str):
            return not record.msg.startswith(_EXPORT_FAILURE_LINES)
        return True


_OUTAGE_LINES = _OutageLines()


def _names_authorization(*headers: Any) -> bool:
    """Whether any of ``headers`` (mappings, or None) sets ``Authorization``, in any case."""
    return any(name.lower() == "authorization" for each in headers if each for name in each)


def _headers_as_they_are(request: Any) -> Any:
    """An ``auth`` of ``requests`` that changes nothing (see ``CollectorSession.request``)."""
    return request


class CollectorSession(requests.Session):
    """The exporter's ``requests`` session, bounded as the module says. ``collector``: the
    collector as scheme://host:port, what its errors and lines name; ``log``: where the
    one line a redirect gets goes."""

    def __init__(self, collector: str, log: logging.Logger) -> None:
        super().__init__()
        self.collector = collector
        self._log = log
        self._redirect_said = False
        self.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        self.headers["Accept-Encoding"] = "identity"  # the answer is not read: no decoding
        adapter = _WatchedAdapter()
        self.mount("http://", adapter)
        self.mount("https://", adapter)
        #: The collector has not taken the last request (said once, until it takes one).
        self._failing = False
        for name in _EXPORTER_LOGGERS:
            logging.getLogger(name).addFilter(_OUTAGE_LINES)  # once: filters are a set

    def request(self, method: str, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        kwargs["allow_redirects"] = False
        if _names_authorization(self.headers, kwargs.get("headers")):
            # The headers' variable set an authorization: it is sent, as every SDK sends
            # it. ``requests`` puts the URL's user and password in its place unless the
            # request carries an ``auth`` of its own: this one leaves the headers as they are.
            kwargs["auth"] = _headers_as_they_are
        kwargs["stream"] = True  # the answer is read here, to a bound
        seconds = _total_seconds(kwargs.get("timeout"))
        deadline = _Deadline(seconds)
        _requesting.deadline = deadline
        deadline.start()
        try:
            response = super().request(method, url, *args, **kwargs)
            _read_answer(response, deadline)
            if deadline.fired:  # an answer cut short, its status line or headers too
                raise requests.exceptions.ReadTimeout()
        except requests.RequestException as error:
            scrubbed = _scrubbed(error, self.collector, deadline)
            self._outcome(str(scrubbed).removeprefix(f"the trace collector at {self.collector}: "))
            raise scrubbed from None
        finally:
            deadline.cancel()
            _requesting.deadline = None
        self._outcome(None if response.status_code < 400 else f"it answered {response.status_code}")
        if 300 <= response.status_code < 400 and not self._redirect_said:
            self._redirect_said = True
            self._log.warning(
                "the trace collector at %s answered %d, a redirect, which is not followed:"
                " the spans sent there are lost (said once). Point the exporter's endpoint"
                " at the collector itself",
                self.collector,
                response.status_code,
            )
        return response

    def _outcome(self, failure: str | None) -> None:
        """Say when the collector stops taking spans (``failure``: what happened) and
        when it takes them again; mark the thread for ``_OutageLines``."""
        _requesting.failed = failure is not None
        if failure is not None and not self._failing:
            self._failing = True
            self._log.warning(
                "spans are not reaching the trace collector at %s: %s. Those sent until it"
                " takes them again are dropped (said once)",
                self.collector,
                failure,
            )
        elif failure is None and self._failing:
            self._failing = False
            self._log.warning("the trace collector at %s takes spans again", self.collector)

    def __repr__(self) -> str:
        return f"<CollectorSession {self.collector} failing={self._failing}>"


def _total_seconds(timeout: Any) -> float:
    """A request's whole time, from the timeout ``requests`` is given (seconds, or a
    connect and read pair)."""
    parts = timeout if isinstance(timeout, tuple) else (timeout,)
    total = sum(part for part in parts if isinstance(part, int | float))
    if not (math.isfinite(total) and total > 0):
        return UNTIMED_SECONDS
    return float(total)


def _read_answer(response: requests.Response, deadline: _Deadline) -> None:
    """Read the answer's body, at most ``MAX_ANSWER_BYTES`` and until the deadline; one
    longer, or cut, is dropped with its connection."""
    body: bytes | None
    try:
        body = response.raw.read(MAX_ANSWER_BYTES + 1, decode_content=False)
    except Exception:  # cut at the deadline, or the connection broke mid-answer
        body = None
    if body is None or len(body) > MAX_ANSWER_BYTES or deadline.fired:
        response.close()  # not back to the pool: the rest of the answer is on it
        body = b""
    response._content = body
    response._content_consumed = True


def _scrubbed(
    error: requests.RequestException, collector: str, deadline: _Deadline
) -> requests.RequestException:
    """``error`` again, as its own type (the exporter decides on that whether to retry),
    saying what happened and naming the collector only by scheme, host and port."""
    if deadline.fired:
        return requests.exceptions.ReadTimeout(
            f"the trace collector at {collector} did not answer within {deadline.seconds:g} s"
        )
    return type(error)(f"the trace collector at {collector}: {_what_failed(error)}")


def _what_failed(error: BaseException) -> str:
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return "did not accept the connection in time"
    if isinstance(error, requests.exceptions.ReadTimeout):
        return "did not answer in time"
    if isinstance(error, requests.exceptions.SSLError):
        return "TLS failed (its certificate, or the CA the exporter trusts)"
    seen: BaseException | None = error
    for _ in range(10):  # the OS's reason, down the chain of what caused it
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.strerror:
            return f"could not be reached ({seen.strerror})"
        reason = getattr(seen, "reason", None)
        inner = seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None
        seen = (
            reason
            if isinstance(reason, BaseException)
            else inner or seen.__cause__ or seen.__context__
        )
    if isinstance(error, requests.exceptions.ConnectionError):
        return "the connection failed"
    return f"the request failed ({type(error).__name__})"
