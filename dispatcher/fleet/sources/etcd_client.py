"""Every key under an etcd prefix, read then followed: the v3 JSON gateway, with no client library.

Two readers share it: the fleet's ``EtcdSource`` (instances, ``sources/etcd.py``) and the
registry of plugin entries (``dispatcher._entries``). ``EtcdPrefix.follow`` reads every key
under ``<prefix>/`` (``/v3/kv/range``) into a ``PrefixRead`` that ``on_read`` makes, then
watches (``/v3/watch``, one JSON object per line) from the read's revision + 1, so no change
between the read and the watch is lost, and hands each batch of changes to ``on_change``.

A read goes in pages, as etcd's own clients read a large range: at most ``PAGE_KEYS`` keys a
request, each request starting just after the last key of the one before and pinned to the
revision of the first, so the pages together are one snapshot. One answer for the whole
prefix passes ``max_message_bytes`` (8 MiB) as soon as the prefix holds a few hundred
values of 32 KiB: read whole, such a prefix failed every read, for ever (and whatever the
bound, some prefix passes it). A page over the bound is asked again with half as many keys
(and the smaller size kept), down to one key: only a single value over the bound fails the
read. The reader is handed each page as it comes and keeps what it keeps of it
(``first_keys``), so memory is one page, not the prefix; what it builds replaces what it had
only when the read is whole (``PrefixRead.done``), so a read failing midway, or a concurrent
look at the reader, never sees half a prefix. A reader that keeps only part of the prefix (``first_keys``) may answer True from ``on_change`` to
have the prefix read again (one of the keys it keeps left, and it cannot tell which key
takes its place): the watch ends and a read follows, at once the first time, then at most
once per ``retry`` (a writer deleting a key at a time must not have the registry read
whole at each delete).

Failures (``on_failure(reason, delay)``, then a new read after ``delay``, growing by half each
time up to 8 times ``retry``): etcd unreachable, slower than ``timeout`` (connecting,
reading the range, creating the watch), an HTTP error, a body that is not the gateway's
JSON, a line over ``max_message_bytes`` or a value that is even alone, a range answer whose
keys go backwards (each page must start after the last), the watch stream ending, a watch
cancelled or a page's revision compacted between two pages. The reader keeps what it had: nothing here reports an
empty set because etcd went away. A silent watch is a quiet registry, not a failure; a
half-open connection is caught by TCP keepalive; a frozen etcd (whose kernel answers
keepalive) by a small read after each ``idle_probe`` of silence, which it does not answer.

TLS and etcd's users (``EtcdAccess``: an ``https://`` URL, ``tls``, ``auth``): every request
goes with the current ``ssl.SSLContext`` of the target's TLS files (``ClientTlsContext``,
read again when they change: the connections opened after a rotation present the new
certificate) and, with ``auth``, the user's token (``etcd_login``). A token etcd no longer
takes is asked for again and the request repeated once: a range page answered HTTP 401, a
watch cancelled for its token as it is created. A password etcd refuses, a user without
permission on the prefix and a certificate either side refuses are failures as above,
each saying so (never quoting a password or a token), and the reader keeps what it had.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import math
import socket
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from dispatcher.fleet.sources.etcd_login import (
    EtcdLogin,
    LoginFailure,
    cancelled_for_token,
    token_refused,
)
from providers.discovery import EtcdAuth
from providers.tls import ClientTlsContext

__all__ = [
    "IDLE_PROBE_SECONDS",
    "MAX_MESSAGE_BYTES",
    "PAGE_KEYS",
    "Change",
    "EtcdPrefix",
    "OnChange",
    "PrefixRead",
    "RegistryFailure",
    "one_line",
]

#: The largest range answer (one page) or watch line read. A peer sending more for a
#: single key, or a single change, is not the registry we know.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
#: Keys asked for in one range request (etcd's clients page by a count of keys too); fewer
#: when that many values are over ``max_message_bytes`` together (module docstring).
PAGE_KEYS = 512
#: The longest wait between reads, as a multiple of ``retry``.
_BACKOFF_CAP = 8
#: A watch silent this long has etcd asked a small read (``_still_there``): an etcd
#: frozen (SIGSTOP, a paused VM) keeps its connections open, and the kernel answers TCP
#: keepalive for it, so its silence looked like a quiet registry for ever.
IDLE_PROBE_SECONDS = 10.0


class RegistryFailure(Exception):
    """Reading or watching the registry failed; the message says how, in one line."""


class _OverBound(RegistryFailure):
    """An answer over ``max_message_bytes``: a range page is asked again, smaller."""


@dataclass(frozen=True, slots=True)
class PrefixRead:
    """One read of the prefix as a reader builds it: ``page(values)`` with each page's keys
    and values in key order, then ``done()`` once the read is whole. What the reader builds
    from the pages is kept aside until ``done``: a read that fails midway is never done,
    and changes nothing the reader had."""

    page: Callable[[list[tuple[str, bytes]]], None]
    done: Callable[[], None]


@dataclass(frozen=True, slots=True)
class Change:
    """One key put (``value`` its bytes) or deleted (``value`` None); ``created``: the put
    made the key (etcd's ``version`` 1), rather than writing it again."""

    key: str
    value: bytes | None
    created: bool = False


#: ``on_change(changes)``: True asks for the prefix to be read again (module docstring).
OnChange = Callable[[list[Change]], bool | None]


class EtcdPrefix:
    """Reads and watches every key under ``<prefix>/`` of the etcd at ``base_url``."""

    def __init__(
        self,
        base_url: str,
        prefix: str,
        *,
        timeout: float,
        retry: float,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        tls: ClientTlsContext | None = None,
        auth: EtcdAuth | None = None,
        idle_probe: float = IDLE_PROBE_SECONDS,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._idle_probe = idle_probe
        self._tls = tls
        self._login = EtcdLogin(auth) if auth is not None else None
        self._timeout = timeout
        self._retry = retry
        self._max_bytes = max_message_bytes
        # The key just after every "<prefix>/…" key: "/" is followed by "0" in ASCII.
        self._first, self._end = f"{prefix}/".encode(), f"{prefix}0".encode()
        self._range = {"key": _b64(self._first), "range_end": _b64(self._end)}
        #: Keys a range page asks for: halved for good while a page is over the bound.
        self._page_keys = PAGE_KEYS
        self._session: aiohttp.ClientSession | None = None

    async def follow(
        self,
        on_read: Callable[[], PrefixRead],
        on_change: OnChange,
        on_failure: Callable[[str, float], None],
    ) -> None:
        """Read (into a fresh ``on_read()`` each time), watch, and read again after a
        failure, or when ``on_change`` asks, until cancelled; never raises."""
        loop = asyncio.get_running_loop()
        delay = self._retry
        asked_at = -math.inf  # when on_change last asked for a read
        while True:
            try:
                revision = await self.read(on_read())
                delay = self._retry
                if await self._watch(revision + 1, on_change):
                    await asyncio.sleep(max(0.0, asked_at + self._retry - loop.time()))
                    asked_at = loop.time()
                    continue
                raise RegistryFailure("the watch stream ended")
            except RegistryFailure as failure:
                on_failure(str(failure), delay)
            except TimeoutError:
                on_failure(f"no answer within {self._timeout * 1000:g} ms", delay)
            except (aiohttp.ClientError, OSError) as failure:
                on_failure(_unreachable(failure), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, _BACKOFF_CAP * self._retry)

    async def read_or_reason(self, into: PrefixRead) -> str | None:
        """One ``read`` into ``into``, or why it failed (in one line) instead of raising."""
        try:
            await self.read(into)
        except RegistryFailure as failure:
            return str(failure)
        except TimeoutError:
            return f"no answer within {self._timeout * 1000:g} ms"
        except (aiohttp.ClientError, OSError) as failure:
            return _unreachable(failure)
        return None

    async def read(self, into: PrefixRead) -> int:
        """Every key under the prefix with its value, a page at a time into ``into``
        (``done`` once whole); the revision the read saw. Each page is bounded by
        ``timeout``; together they are one snapshot, at the first page's revision."""
        start, revision = self._first, None
        while True:
            request: dict[str, Any] = {
                "key": _b64(start),
                "range_end": self._range["range_end"],
                "limit": str(self._page_keys),
            }
            if revision is not None:
                request["revision"] = str(revision)
            try:
                document = await self._range_page(request)
            except _OverBound:
                if self._page_keys == 1:
                    raise RegistryFailure(
                        f"etcd's answer is over {self._max_bytes} bytes for a single key"
                    ) from None
                self._page_keys //= 2
                continue
            if revision is None:
                revision = _revision(document)
            kvs = document.get("kvs", [])
            if not isinstance(kvs, list):
                raise RegistryFailure("etcd's range answer has no list of keys")
            page: list[tuple[str, bytes]] = []
            for kv in kvs:
                if not isinstance(kv, dict):
                    raise RegistryFailure("etcd's range answer holds something that is not a key")
                key = _unb64(kv.get("key"))
                # In key order and after the page before: a peer repeating a page with
                # "more" set would otherwise be read for ever.
                if key < start or not key < self._end:
                    raise RegistryFailure("etcd's range answer holds a key out of order")
                start = key + b"\0"
                page.append((key.decode(errors="replace"), _unb64(kv.get("value", ""))))
            into.page(page)
            if not document.get("more"):
                into.done()
                return revision
            if not page:
                raise RegistryFailure("etcd's range answer says more keys follow but holds none")

    async def _range_page(self, request: dict[str, Any]) -> dict[str, Any]:
        body = orjson.dumps(request)
        for first in (True, False):
            async with asyncio.timeout(self._timeout):
                token = await self._token()
                async with self._post("/v3/kv/range", body, token) as answer:
                    raw = await self._bounded_body(answer)
            document = self._decode(raw, "the range read")
            if first and self._token_failed(token, answer.status, document):
                continue  # asked again with a new token
            if answer.status != 200:
                raise RegistryFailure(
                    f"etcd answered HTTP {answer.status} to the range read{self._why(document)}"
                )
            return document
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _watch(self, start_revision: int, on_change: OnChange) -> bool:
        """Follow the watch until it ends (False) or ``on_change`` asks for a read (True)."""
        request = {"create_request": {**self._range, "start_revision": str(start_revision)}}
        body = orjson.dumps(request)
        for first in (True, False):
            async with contextlib.AsyncExitStack() as stack:
                # Bounded: the token, connecting, the answer's head (an etcd frozen as the
                # watch is made sends none, and the watch waited for it for ever, the
                # source saying nothing) and the "created" line below.
                async with asyncio.timeout(self._timeout):
                    token = await self._token()
                    answer = await stack.enter_async_context(
                        self._post(
                            "/v3/watch",
                            body,
                            token,
                            # No total: a watch lasts as long as the registry does.
                            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout),
                        )
                    )
                if answer.status != 200:
                    async with asyncio.timeout(self._timeout):
                        document = self._decode(await self._bounded_body(answer), "the watch")
                    if first and self._token_failed(token, answer.status, document):
                        continue
                    raise RegistryFailure(
                        f"etcd answered HTTP {answer.status} to the watch{self._why(document)}"
                    )
                if answer.connection is not None and answer.connection.transport is not None:
                    _keep_alive(answer.connection.transport.get_extra_info("socket"))
                async with contextlib.aclosing(self._lines(answer.content)) as lines:
                    async with asyncio.timeout(self._timeout):
                        created = await anext(lines, None)
                    if created is None:
                        return False  # ended before it began: follow() says so
                    if first and self._watch_refused_token(token, created):
                        continue
                    self._changes(created)
                    return await self._follow_lines(answer, lines, on_change)
            return False
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _follow_lines(
        self,
        answer: aiohttp.ClientResponse,
        lines: AsyncGenerator[bytes, None],
        on_change: OnChange,
    ) -> bool:
        """Hand each line's changes to ``on_change`` until the stream ends (False) or it
        asks for a read (True); etcd is asked a small read after each ``idle_probe`` of
        silence, and one it does not answer ends the watch (``RegistryFailure``)."""
        loop = asyncio.get_running_loop()
        heard = [loop.time()]
        failed: list[str] = []
        probe = asyncio.create_task(self._still_there(answer, heard, failed))
        try:
            async for line in lines:
                heard[0] = loop.time()
                if (changes := self._changes(line)) and on_change(changes):
                    return True
        except (aiohttp.ClientError, OSError):
            if not failed:
                raise
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        if failed:
            raise RegistryFailure(f"the watch went silent and etcd does not answer: {failed[0]}")
        return False

    async def _still_there(
        self, answer: aiohttp.ClientResponse, heard: list[float], failed: list[str]
    ) -> None:
        """While the watch is silent, ask etcd to count the prefix's keys every
        ``idle_probe``; if it does not answer, note why in ``failed`` and close the watch."""
        loop = asyncio.get_running_loop()
        request = {**self._range, "count_only": True}
        while True:
            await asyncio.sleep(max(0.0, heard[0] + self._idle_probe - loop.time()))
            if loop.time() - heard[0] < self._idle_probe:
                continue  # a line came meanwhile
            try:
                await self._range_page(request)
            except RegistryFailure as failure:
                failed.append(str(failure))
            except TimeoutError:
                failed.append(f"no answer within {self._timeout * 1000:g} ms")
            except (aiohttp.ClientError, OSError) as failure:
                failed.append(_unreachable(failure))
            if failed:
                answer.close()
                return
            heard[0] = loop.time()

    def _watch_refused_token(self, token: str | None, created: bytes) -> bool:
        """Whether etcd cancelled the watch for its token as it created it (the watch
        stream answers 200 and says so in its first line); if so, the token is dropped."""
        if self._login is None or token is None:
            return False
        result = self._decode(created, "the watch").get("result")
        if isinstance(result, dict) and cancelled_for_token(result):
            self._login.failed(token)
            return True
        return False

    def _changes(self, line: bytes) -> list[Change]:
        """The changes one line of the watch stream carries."""
        message = self._decode(line, "the watch")
        result = message.get("result")
        if not isinstance(result, dict):
            raise RegistryFailure(f"etcd's watch failed{_why(message)}")
        if result.get("canceled"):
            compacted = result.get("compact_revision")
            if compacted:
                raise RegistryFailure(
                    f"etcd cancelled the watch: revisions up to {compacted} are compacted"
                )
            reason = one_line(str(result.get("cancel_reason") or "no reason given"))
            raise RegistryFailure(f"etcd cancelled the watch: {reason}")
        events = result.get("events") or []
        if not isinstance(events, list):
            raise RegistryFailure("etcd's watch answer has no list of events")
        changes = []
        for event in events:
            kv = event.get("kv") if isinstance(event, dict) else None
            if not isinstance(kv, dict):
                raise RegistryFailure("etcd's watch answer holds an event without a key")
            if event.get("type", "PUT") == "DELETE":
                changes.append(Change(_key(kv), None))
            else:
                # int64 fields are strings in the gateway's JSON; a key's first version is 1.
                created = str(kv.get("version", "")) == "1"
                changes.append(Change(_key(kv), _unb64(kv.get("value", "")), created))
        return changes

    # -- HTTP, bounded ---------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers={"content-type": "application/json"},
            )
        return self._session

    def _post(
        self, path: str, body: bytes, token: str | None, **options: Any
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """A POST to etcd with the current TLS context and, with ``auth``, ``token``."""
        if token is not None:
            options["headers"] = {"authorization": token}
        if self._tls is not None:
            options["ssl"] = self._tls.current()
            options["server_hostname"] = self._tls.server_name
        return self._http().post(f"{self._base}{path}", data=body, **options)

    async def _token(self) -> str | None:
        """The user's token (None without ``auth``); asked for now if there is none."""
        if self._login is None:
            return None
        try:
            return await self._login.token(self._post_without_token)
        except LoginFailure as failure:
            raise RegistryFailure(str(failure)) from None

    async def _post_without_token(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        async with self._post(path, body, None) as answer:
            raw = await self._bounded_body(answer)
        return answer.status, self._decode(raw, "the authentication")

    def _token_failed(self, token: str | None, status: int, document: dict[str, Any]) -> bool:
        """Whether etcd refused ``token``; if so, the next request asks for a new one."""
        if self._login is None or token is None or not token_refused(status, document):
            return False
        self._login.failed(token)
        return True

    def _why(self, document: dict[str, Any]) -> str:
        """``: <etcd's message>``, and what the message means for this reader's settings."""
        why = _why(document)
        if self._login is None and "user name is empty" in why:
            return f"{why} (etcd has authentication on: give the dispatcher auth: {{username, password}})"
        if self._login is not None and "permission denied" in why:
            return f"{why} (user {self._login.username!r} may not read this prefix)"
        return why

    async def _bounded_body(self, answer: aiohttp.ClientResponse) -> bytes:
        body = bytearray()
        async for chunk in answer.content.iter_any():
            body += chunk
            if len(body) > self._max_bytes:
                raise _OverBound(f"etcd's answer is over {self._max_bytes} bytes")
        return bytes(body)

    async def _lines(self, stream: aiohttp.StreamReader) -> AsyncGenerator[bytes, None]:
        """The stream's lines, none longer than the limit (readline would wait for ever)."""
        pending = bytearray()
        async for chunk in stream.iter_any():
            pending += chunk
            while (end := pending.find(b"\n")) >= 0:
                # A line that came whole in one read is held to the limit too: checked only
                # while it was unfinished, it passed or not as the socket cut the stream.
                if end > self._max_bytes:
                    raise RegistryFailure(self._line_over)
                line = bytes(pending[:end]).strip()
                del pending[: end + 1]
                if line:
                    yield line
            if len(pending) > self._max_bytes:
                raise RegistryFailure(self._line_over)
        if pending.strip():
            yield bytes(pending).strip()

    @property
    def _line_over(self) -> str:
        return f"a line of etcd's watch is over {self._max_bytes} bytes"

    def _decode(self, body: bytes, what: str) -> dict[str, Any]:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise RegistryFailure(f"etcd's answer to {what} is not JSON") from None
        if not isinstance(document, dict):
            raise RegistryFailure(f"etcd's answer to {what} is not a JSON object")
        return document

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def one_line(text: str, limit: int = 200) -> str:
    """``text`` flattened to one line of at most ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


#: What OpenSSL names the alerts of a server refusing our certificate (or its absence) by.
_CERTIFICATE_REFUSED = (
    "ALERT_BAD_CERTIFICATE",
    "CERTIFICATE_REQUIRED",
    "ALERT_UNKNOWN_CA",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_CERTIFICATE_REVOKED",
)


def _unreachable(failure: BaseException) -> str:
    """Why etcd could not be reached, in one line; a TLS refusal says which side refused."""
    reason = one_line(str(failure)) or type(failure).__name__
    if any(alert in reason for alert in _CERTIFICATE_REFUSED):
        return f"etcd refused the client certificate (tls.cert_file, or none given): {reason}"
    if "CERTIFICATE_VERIFY_FAILED" in reason:
        return f"etcd's certificate is not trusted (tls.ca_file, tls.server_name): {reason}"
    return f"cannot reach etcd: {reason}"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(field: Any) -> bytes:
    if not isinstance(field, str):
        raise RegistryFailure("etcd answered a key or value that is not base64 text")
    try:
        return base64.b64decode(field, validate=True)
    except (binascii.Error, ValueError):
        raise RegistryFailure("etcd answered a key or value that is not base64") from None


def _key(kv: dict[str, Any]) -> str:
    return _unb64(kv.get("key")).decode(errors="replace")


def _revision(document: dict[str, Any]) -> int:
    header = document.get("header")
    revision = header.get("revision") if isinstance(header, dict) else None
    try:
        return int(revision)  # type: ignore[arg-type]  # checked just below
    except (TypeError, ValueError):
        raise RegistryFailure("etcd's range answer has no revision") from None


def _why(document: dict[str, Any]) -> str:
    """``: <etcd's message>`` from an error answer of the gateway, or nothing."""
    error = document.get("error")
    message = document.get("message") or (
        error.get("message") if isinstance(error, dict) else error
    )
    return f": {one_line(str(message))}" if message else ""


def _keep_alive(sock: socket.socket | None) -> None:
    """TCP keepalive on the watch's socket: a watch on a peer that vanished without closing
    (a cable pulled, a VM frozen) fails within about a minute instead of never."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 20), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
