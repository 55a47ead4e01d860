"""Instances from an etcd registry: every key under a prefix, read then watched.

The registry contract is ``providers.discovery``'s: one key ``<prefix>/<instance id>`` per
instance, on a lease the instance keeps alive, whose value is JSON ``{"url": …}`` (an
HTTP server) or ``{"address": "host:port"}`` (a gRPC one), optionally ``"weight"``.

etcd is reached through its v3 JSON gateway with aiohttp (the host's HTTP client), so no
etcd client library is needed: ``/v3/kv/range`` for the read, then ``/v3/watch``, a POST
whose answer streams one JSON object per line, from the read's revision + 1, so no change
between the read and the watch is lost.

Failures and what they do:

* etcd unreachable, slower than ``timeout_ms`` (connecting, reading the range, or
  creating the watch), an HTTP error, a body that is not the gateway's JSON, a line or
  body over ``max_message_bytes``, the watch stream ending, a watch cancelled (e.g. its
  revision compacted): ``error`` says which in one line, the last list stays reported,
  and after ``retry_ms`` (growing by half each time, up to 8 times) the range is read again;
  a good read clears ``error``.
* A value off the contract (not JSON, neither url nor address, a bad weight or scheme):
  that key is left out and named in ``skipped`` with the reason (never its value, which
  may hold anything); the other keys are reported.

A watch that was created and then stays silent is a quiet registry, not a failure: etcd
sends nothing while nothing changes. A peer that dies closes the connection, which ends
the stream; a half-open connection is caught by TCP keepalive on the socket.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncGenerator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from dispatcher.fleet.sources import InstanceSource, Report
from providers.discovery import Endpoint, RegistryDiscovery

__all__ = ["EtcdSource", "RegistryFailure", "parse_registration"]

log = logging.getLogger("dispatcher.fleet.sources.etcd")

#: The largest range answer or watch line read; a registry of thousands of instances is
#: well under it, and a peer sending more is not the registry we know.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
#: The longest wait between reads, as a multiple of ``retry_ms``.
_BACKOFF_CAP = 8
_DEFAULT_PORTS = {"http": 80, "https": 443}


class RegistryFailure(Exception):
    """Reading or watching the registry failed; the message is ``error``'s text."""


def parse_registration(value: bytes) -> Endpoint:
    """The endpoint of one registry value, or ``ValueError`` saying what is wrong with it.

    Messages never quote the value: a registry is written by many hands.
    """
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise ValueError("the value is not JSON") from None
    if not isinstance(document, dict):
        raise ValueError("the value is not a JSON object")
    weight = document.get("weight", 1)
    # bool is an int to Python, not a weight to anybody.
    if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 1000:
        raise ValueError("weight must be an integer from 1 to 1000")
    url, address = document.get("url"), document.get("address")
    if (url is None) == (address is None):
        raise ValueError('the value must hold exactly one of "url" and "address"')
    if url is not None:
        return _from_url(url, weight)
    return _from_address(address, weight)


def _from_url(url: Any, weight: int) -> Endpoint:
    if not isinstance(url, str):
        raise ValueError('"url" must be a string')
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError('"url" is not a valid URL') from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError('"url" must be http:// or https://')
    if not parts.hostname:
        raise ValueError('"url" names no host')
    if parts.username is not None or parts.password is not None:
        raise ValueError('"url" must not carry credentials')
    if parts.query or parts.fragment:
        raise ValueError('"url" must not carry a query or a fragment')
    return Endpoint(
        host=parts.hostname,
        port=port if port is not None else _DEFAULT_PORTS[parts.scheme],
        weight=weight,
        scheme=parts.scheme,
        path=parts.path.rstrip("/"),
    )


def _from_address(address: Any, weight: int) -> Endpoint:
    if not isinstance(address, str):
        raise ValueError('"address" must be a string')
    host, separator, port_text = address.rpartition(":")
    if "/" in host or any(c.isspace() for c in host):
        raise ValueError('"address" must be host:port')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError('"address" has brackets around something not IPv6') from None
    elif ":" in host:
        raise ValueError('"address" must put an IPv6 host in brackets: [::1]:50051')
    if not separator or not host:
        raise ValueError('"address" must be host:port')
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError('"address" must end in a port from 1 to 65535')
    return Endpoint(host=host, port=int(port_text), weight=weight)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(field: Any) -> bytes:
    if not isinstance(field, str):
        raise RegistryFailure("etcd answered a key or value that is not base64 text")
    try:
        return base64.b64decode(field, validate=True)
    except (binascii.Error, ValueError):
        raise RegistryFailure("etcd answered a key or value that is not base64") from None


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class EtcdSource(InstanceSource):
    """Reports the instances registered under ``spec.prefix`` and watches for changes."""

    def __init__(
        self, spec: RegistryDiscovery, *, max_message_bytes: int = MAX_MESSAGE_BYTES
    ) -> None:
        super().__init__(spec.describe())
        self._spec = spec
        self._base = str(spec.etcd).rstrip("/")
        self._timeout = spec.timeout_ms / 1000
        self._max_bytes = max_message_bytes
        self._key_start = f"{spec.prefix}/"
        # The key just after every "<prefix>/…" key: "/" is followed by "0" in ASCII.
        self._range = {"key": _b64(self._key_start), "range_end": _b64(f"{spec.prefix}0")}
        self._session: aiohttp.ClientSession | None = None
        #: Every well-formed registration, by key: what is reported.
        self._found: dict[str, Endpoint] = {}
        #: Keys left out because their value is off the contract, with the reason.
        self.skipped: dict[str, str] = {}

    # -- the loop --------------------------------------------------------------------------

    async def run(self, report: Report) -> None:
        delay = self._spec.retry_ms / 1000
        while True:
            try:
                revision = await self._read()
                self.error = None
                self.reads += 1
                delay = self._spec.retry_ms / 1000
                self._report(report)
                await self._watch(revision + 1, report)
                raise RegistryFailure("the watch stream ended")
            except RegistryFailure as failure:
                self._fail(str(failure), delay)
            except TimeoutError:
                self._fail(f"no answer within {self._spec.timeout_ms} ms", delay)
            except (aiohttp.ClientError, OSError) as failure:
                reason = _one_line(str(failure)) or type(failure).__name__
                self._fail(f"cannot reach etcd: {reason}", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, _BACKOFF_CAP * self._spec.retry_ms / 1000)

    def _fail(self, reason: str, delay: float) -> None:
        kept = len(self._found)
        self.error = (
            f"{reason}; keeping the last {kept} instance(s), reading again in {delay:.3g} s"
        )
        log.warning("registry %s: %s", self.name, self.error)

    def _report(self, report: Report) -> None:
        report([self._found[key] for key in sorted(self._found)])

    # -- reading ---------------------------------------------------------------------------

    async def _read(self) -> int:
        """Read every key under the prefix; the revision the read saw."""
        async with asyncio.timeout(self._timeout):
            async with self._http().post(
                f"{self._base}/v3/kv/range", data=orjson.dumps(self._range)
            ) as answer:
                body = await self._bounded_body(answer)
        document = self._decode(body, "the range read")
        if answer.status != 200:
            raise RegistryFailure(
                f"etcd answered HTTP {answer.status} to the range read{_why(document)}"
            )
        revision = _revision(document)
        found: dict[str, Endpoint] = {}
        self.skipped = {}
        kvs = document.get("kvs", [])
        if not isinstance(kvs, list):
            raise RegistryFailure("etcd's range answer has no list of keys")
        for kv in kvs:
            if not isinstance(kv, dict):
                raise RegistryFailure("etcd's range answer holds something that is not a key")
            self._apply_put(found, kv)
        self._found = found
        return revision

    async def _watch(self, start_revision: int, report: Report) -> None:
        """Apply every change from ``start_revision`` on, reporting after each batch."""
        request = {"create_request": {**self._range, "start_revision": str(start_revision)}}
        async with self._http().post(
            f"{self._base}/v3/watch",
            data=orjson.dumps(request),
            # No total: a watch lasts as long as the registry does. Connecting and the
            # "created" answer are bounded below.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout),
        ) as answer:
            if answer.status != 200:
                async with asyncio.timeout(self._timeout):
                    body = await self._bounded_body(answer)
                raise RegistryFailure(
                    f"etcd answered HTTP {answer.status} to the watch{_why(self._decode(body, 'the watch'))}"
                )
            if answer.connection is not None and answer.connection.transport is not None:
                _keep_alive(answer.connection.transport.get_extra_info("socket"))
            async with contextlib.aclosing(self._lines(answer.content)) as lines:
                async with asyncio.timeout(self._timeout):
                    created = await anext(lines, None)
                if created is None:
                    return  # ended before it began: run() says so
                self._apply_watch_message(created)
                async for line in lines:
                    if self._apply_watch_message(line):
                        self._report(report)

    def _apply_watch_message(self, line: bytes) -> bool:
        """Apply one line of the watch stream; whether it changed anything."""
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
            reason = _one_line(str(result.get("cancel_reason") or "no reason given"))
            raise RegistryFailure(f"etcd cancelled the watch: {reason}")
        events = result.get("events") or []
        if not isinstance(events, list):
            raise RegistryFailure("etcd's watch answer has no list of events")
        for event in events:
            kv = event.get("kv") if isinstance(event, dict) else None
            if not isinstance(kv, dict):
                raise RegistryFailure("etcd's watch answer holds an event without a key")
            if event.get("type", "PUT") == "DELETE":
                key = _unb64(kv.get("key")).decode(errors="replace")
                self._found.pop(key, None)
                self.skipped.pop(key, None)
            else:
                self._apply_put(self._found, kv)
        return bool(events)

    def _apply_put(self, found: dict[str, Endpoint], kv: dict[str, Any]) -> None:
        key = _unb64(kv.get("key")).decode(errors="replace")
        try:
            endpoint = parse_registration(_unb64(kv.get("value", "")))
        except ValueError as wrong:
            found.pop(key, None)
            if self.skipped.get(key) != str(wrong):
                log.warning("registry %s: key %s left out: %s", self.name, key, wrong)
            self.skipped[key] = str(wrong)
            return
        self.skipped.pop(key, None)
        found[key] = endpoint

    # -- HTTP, bounded ---------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers={"content-type": "application/json"},
            )
        return self._session

    async def _bounded_body(self, answer: aiohttp.ClientResponse) -> bytes:
        body = bytearray()
        async for chunk in answer.content.iter_any():
            body += chunk
            if len(body) > self._max_bytes:
                raise RegistryFailure(f"etcd's answer is over {self._max_bytes} bytes")
        return bytes(body)

    async def _lines(self, stream: aiohttp.StreamReader) -> AsyncGenerator[bytes, None]:
        """The stream's lines, none longer than the limit (readline would wait for ever)."""
        pending = bytearray()
        async for chunk in stream.iter_any():
            pending += chunk
            while (end := pending.find(b"\n")) >= 0:
                line = bytes(pending[:end]).strip()
                del pending[: end + 1]
                if line:
                    yield line
            if len(pending) > self._max_bytes:
                raise RegistryFailure(f"a line of etcd's watch is over {self._max_bytes} bytes")
        if pending.strip():
            yield bytes(pending).strip()

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

    def __repr__(self) -> str:
        state = f" error={self.error!r}" if self.error else ""
        skipped = f" skipped={sorted(self.skipped)}" if self.skipped else ""
        return (
            f"<EtcdSource {self.name} instances={len(self._found)} reads={self.reads}"
            f"{state}{skipped}>"
        )


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
    return f": {_one_line(str(message))}" if message else ""


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
