"""provider: wasm and the network a plugin is granted: Extism's ``http_request``, answered by
the dispatcher (``providers.wasm.http_host``), against real HTTP(S) servers on the loopback
that redirect, never answer, trickle, answer too much, or are not granted at all, and
against a real DNS server that never answers (the system resolver pointed at it in a mount
namespace of the test's own).

The modules are written in the WebAssembly text format, each request baked in: ``fetch``
answers the response's body, ``status`` its status code, ``headers`` its headers' JSON
(``http_status_code`` and ``http_headers``), ``forged`` sends the request after writing
over the length the Extism allocator keeps for it; ``straight_line_module`` sends and sleeps
in an order a test gives, with no instruction between where a cancel would stop it. One
test sends through the Go PDK (``pdk.NewHTTPRequest``, the hostile Go plugin), whose
``Send`` frees what it passed and reads the headers.
"""

from __future__ import annotations

import hashlib
import http.server
import logging
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme

from dispatcher import DeadlineExceeded, Dispatcher, ProviderError, parse_manifest
from linchkit_plugin.wire import encode_json
from providers.capabilities import Capabilities, LimitExceeded
from providers.egress import EgressRefused
from providers.wasm import trial
from providers.wasm.http_host import NetworkRefused
from providers.wasm.resolver import Resolver, ResolverBusy
from providers.wasm.sandbox import sandbox_of
from tests.conftest import ROOT
from tests.services import until
from tests.wasm_support import build_hostile, wasm_plugin

#: Where the request's JSON and body sit in the module's data.
REQUEST_AT = 1024


@dataclass
class Server:
    port: int
    #: ``METHOD host/path`` of every request that reached the server.
    seen: list[str] = field(default_factory=list)
    #: Connections accepted, requests or not.
    connections: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


class _Handler(http.server.BaseHTTPRequestHandler):
    """``/start`` redirects to 127.0.0.2 (not granted); ``/echo`` answers what it got;
    ``/length`` the length of the body it got; ``/big?N`` answers N bytes
    (``/big-unsized``: without a Content-Length); ``/silent`` never answers; ``/trickle``
    answers a byte of its head at a time, for ever."""

    server_state: Server

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def _answer(self) -> None:
        state = self.server_state
        state.seen.append(f"{self.command} {self.headers['Host']}{self.path}")
        path, _, query = self.path.partition("?")
        if path == "/start":
            self._send(302, b'"moved"', Location=f"http://127.0.0.2:{state.port}/private")
        elif path == "/echo":
            length = int(self.headers.get("Content-Length") or 0)
            echo = {
                "method": self.command,
                "body": self.rfile.read(length).decode(),
                "content_type": self.headers["Content-Type"],
                "x_test": self.headers["X-Test"],
            }
            self.send_response(200)
            self.send_header("X-Answer", "yes")
            self.send_header("X-Twice", "a")
            self.send_header("X-Twice", "b")
            body = orjson.dumps(echo)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/length":
            length = int(self.headers.get("Content-Length") or 0)
            self._send(200, orjson.dumps(len(self.rfile.read(length))))
        elif path in ("/big", "/big-unsized"):
            body = b'"' + b"a" * (int(query) - 2) + b'"'
            self.send_response(200)
            if path == "/big":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/silent":
            state.release.wait()
        elif path == "/trickle":
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            while not state.release.wait(0.05):
                self.wfile.write(b"X")
                self.wfile.flush()
        else:
            self._send(200, orjson.dumps(path.strip("/")))

    def _send(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


class _CountingServer(http.server.ThreadingHTTPServer):
    state: Server

    def process_request(self, request: Any, client_address: Any) -> None:
        self.state.connections.append(client_address[0])
        super().process_request(request, client_address)


def _serve(tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    # Every loopback address, 127.0.0.2 (the redirect's) among them.
    httpd = _CountingServer(("0.0.0.0", 0), _Handler)
    state = Server(httpd.server_port)
    httpd.state = state
    httpd.RequestHandlerClass = type("Handler", (_Handler,), {"server_state": state})
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()  # the handlers that never answer
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    yield from _serve()


#: A WAT function of the test modules: ``size`` bytes of the module's memory from ``from``
#: copied into a new Extism block; the block's offset.
_WAT_COPY = """(func $copy (param $from i32) (param $size i32) (result i64) (local $at i64) (local $i i32)
    (local.set $at (call $alloc (i64.extend_i32_u (local.get $size))))
    (block $copied (loop $next
      (br_if $copied (i32.ge_u (local.get $i) (local.get $size)))
      (call $store_u8 (i64.add (local.get $at) (i64.extend_i32_u (local.get $i)))
        (i32.load8_u (i32.add (local.get $from) (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (local.get $at))"""


def _wat_string(data: bytes) -> str:
    return "".join(
        chr(byte) if 0x20 <= byte < 0x7F and byte not in b'"\\' else f"\\{byte:02x}"
        for byte in data
    )


def http_module(
    folder: Path,
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Path:
    request = encode_json({"url": url, "method": method, "headers": headers or {}})
    body_at = REQUEST_AT + len(request) + 16
    end = body_at + len(body or b"")
    pages = end // 65536 + 2
    send_body = (
        f"(call $copy (i32.const {body_at}) (i32.const {len(body)}))" if body else "(i64.const 0)"
    )
    wat = f"""(module
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "length" (func $length (param i64) (result i64)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (import "extism:host/env" "http_request" (func $http (param i64 i64) (result i64)))
  (import "extism:host/env" "http_status_code" (func $status (result i32)))
  (import "extism:host/env" "http_headers" (func $headers (result i64)))
  (memory (export "memory") {pages})
  (data (i32.const {REQUEST_AT}) "{_wat_string(request)}")
  (data (i32.const {body_at}) "{_wat_string(body or b"")}")
  {_WAT_COPY}
  (func $request (result i64) (call $copy (i32.const {REQUEST_AT}) (i32.const {len(request)})))
  (func $answer (param $at i64) (call $output_set (local.get $at) (call $length (local.get $at))))
  (func (export "fetch") (result i32)
    (call $answer (call $http (call $request) {send_body}))
    (i32.const 0))
  (func (export "headers") (result i32)
    (drop (call $http (call $request) {send_body}))
    (call $answer (call $headers))
    (i32.const 0))
  (func (export "status") (result i32) (local $code i32) (local $at i64)
    (drop (call $http (call $request) {send_body}))
    (local.set $code (call $status))
    (local.set $at (call $alloc (i64.const 3)))
    (call $store_u8 (local.get $at)
      (i32.add (i32.const 48) (i32.div_u (local.get $code) (i32.const 100))))
    (call $store_u8 (i64.add (local.get $at) (i64.const 1))
      (i32.add (i32.const 48) (i32.rem_u (i32.div_u (local.get $code) (i32.const 10)) (i32.const 10))))
    (call $store_u8 (i64.add (local.get $at) (i64.const 2))
      (i32.add (i32.const 48) (i32.rem_u (local.get $code) (i32.const 10))))
    (call $output_set (local.get $at) (i64.const 3))
    (i32.const 0))
  (func (export "forged") (result i32) (local $at i64)
    ;; The allocator's record of a block ends with its length (4 bytes, little-endian)
    ;; right before the block: claim 1 MiB (what a request may be) for a few bytes.
    (local.set $at (call $request))
    (call $store_u8 (i64.sub (local.get $at) (i64.const 4)) (i32.const 0))
    (call $store_u8 (i64.sub (local.get $at) (i64.const 3)) (i32.const 0))
    (call $store_u8 (i64.sub (local.get $at) (i64.const 2)) (i32.const 16))
    (call $store_u8 (i64.sub (local.get $at) (i64.const 1)) (i32.const 0))
    (call $answer (call $http (local.get $at) (i64.const 0)))
    (i32.const 0))
)"""
    module = folder / f"fetch-{hashlib.sha256(wat.encode()).hexdigest()[:12]}.wat"
    module.write_text(wat)
    return module


def _in_a_process_of_its_own(
    script: str, *, wrapper: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a Python process of its own (a crash there ends only it), which
    must exit 0; what it printed. ``wrapper``: the command that runs that process."""
    done = subprocess.run(
        [*wrapper, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def fetcher(module: Path, network: list[str], **capabilities: Any) -> dict[str, Any]:
    return {
        "id": "fetcher",
        "version": "1.0.0",
        "target": {
            "provider": "wasm",
            "module": str(module),
            "sha256": hashlib.sha256(module.read_bytes()).hexdigest(),
            "pool_size": 1,
        },
        "capabilities": {"network": network, **capabilities},
        "methods": {"fetch": {}, "status": {}, "headers": {}, "forged": {}},
    }


def dispatcher_of(*plugins: dict[str, Any], egress: dict[str, Any] | None = None) -> Dispatcher:
    document: dict[str, Any] = {"version": 1, "plugins": list(plugins)}
    if egress is not None:
        document["egress"] = egress
    return Dispatcher(parse_manifest(document, base_dir=ROOT))


def security_incidents(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "dispatcher.providers.wasm"
        and record.levelno == logging.ERROR
        and record.getMessage().startswith("security:")
    ]


# -- what a grant reaches, and no further --------------------------------------------------


async def test_a_granted_name_is_reached(tmp_path: Path, server: Server) -> None:
    module = http_module(tmp_path, f"http://localhost:{server.port}/public")
    async with dispatcher_of(fetcher(module, ["localhost"])) as dispatcher:
        assert await dispatcher.call("fetcher", "fetch", None) == "public"
    assert server.seen == [f"GET localhost:{server.port}/public"]


async def test_the_threads_that_look_names_up_end_with_the_dispatcher(
    tmp_path: Path, server: Server
) -> None:
    module = http_module(tmp_path, f"http://localhost:{server.port}/public")
    async with dispatcher_of(fetcher(module, ["localhost"])) as dispatcher:
        assert await dispatcher.call("fetcher", "fetch", None) == "public"
        assert _resolver_threads()
    await until(lambda: not _resolver_threads(), "end of the resolver's threads", timeout=5)


def _resolver_threads() -> list[threading.Thread]:
    return [each for each in threading.enumerate() if each.name.startswith("wasm-resolver")]


async def test_a_redirect_from_a_granted_name_is_answered_to_the_module_not_followed(
    tmp_path: Path, server: Server
) -> None:
    module = http_module(tmp_path, f"http://localhost:{server.port}/start")
    async with dispatcher_of(fetcher(module, ["localhost"])) as dispatcher:
        assert await dispatcher.call("fetcher", "status", None) == 302
        assert await dispatcher.call("fetcher", "fetch", None) == "moved"
    assert server.seen == [f"GET localhost:{server.port}/start"] * 2, "127.0.0.2 was reached"


async def test_a_host_not_granted_is_refused_and_nothing_reaches_it(
    tmp_path: Path, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    refused = http_module(tmp_path, f"http://127.0.0.2:{server.port}/private")
    allowed = http_module(tmp_path, f"http://localhost:{server.port}/public")
    async with dispatcher_of(
        fetcher(refused, ["localhost"]),
        {**fetcher(allowed, ["localhost"]), "id": "allowed"},
    ) as dispatcher:
        with pytest.raises(NetworkRefused) as caught:
            await dispatcher.call("fetcher", "fetch", None)
        # The plugin keeps serving: the next call gets a fresh instance and the same answer.
        with pytest.raises(NetworkRefused):
            await dispatcher.call("fetcher", "fetch", None)
        assert await dispatcher.call("allowed", "fetch", None) == "public"
    message = caught.value.message
    assert message.startswith("fetcher.fetch: HTTP request to 127.0.0.2 refused")
    assert "not granted (capabilities.network: localhost)" in message
    assert caught.value.details["host"] == "127.0.0.2"
    assert not caught.value.retryable
    assert server.seen == [f"GET localhost:{server.port}/public"]
    assert server.connections == ["127.0.0.1"]
    assert len(security_incidents(caplog)) == 2  # once per refused request
    assert "127.0.0.2" in security_incidents(caplog)[0]


async def test_an_address_in_a_granted_network_is_reached_a_name_is_not(
    tmp_path: Path, server: Server
) -> None:
    by_address = http_module(tmp_path, f"http://127.0.0.2:{server.port}/public")
    by_name = http_module(tmp_path, f"http://localhost:{server.port}/public")
    async with dispatcher_of(
        fetcher(by_address, ["127.0.0.0/8"]),
        {**fetcher(by_name, ["127.0.0.0/8"]), "id": "named"},
    ) as dispatcher:
        assert await dispatcher.call("fetcher", "fetch", None) == "public"
        with pytest.raises(NetworkRefused, match="localhost is not granted"):
            await dispatcher.call("named", "fetch", None)
    assert server.seen == [f"GET 127.0.0.2:{server.port}/public"]


async def test_a_granted_name_that_resolves_only_where_egress_forbids_is_refused_unconnected(
    tmp_path: Path, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    module = http_module(tmp_path, f"http://localhost:{server.port}/public")
    plugin = fetcher(module, ["localhost"])
    async with dispatcher_of(plugin, egress={"allow": ["10.0.0.0/8"]}) as dispatcher:
        with pytest.raises(EgressRefused) as caught:
            await dispatcher.call("fetcher", "fetch", None)
    message = caught.value.message
    assert message.startswith("fetcher.fetch: HTTP request to localhost refused: egress policy")
    assert "127.0.0.1 is not in egress.allow (10.0.0.0/8)" in message
    assert server.connections == []
    assert len(security_incidents(caplog)) == 1


async def test_a_link_local_address_is_refused_even_inside_a_granted_network(
    tmp_path: Path,
) -> None:
    module = http_module(tmp_path, "http://169.254.169.254/latest/meta-data/")
    async with dispatcher_of(fetcher(module, ["169.254.0.0/16"])) as dispatcher:
        with pytest.raises(EgressRefused, match=r"169\.254\.169\.254 is link-local"):
            await dispatcher.call("fetcher", "fetch", None)


async def test_the_metadata_address_carried_in_an_ipv6_one_is_refused(tmp_path: Path) -> None:
    """A module granted an IPv6 network reached 169.254.169.254 written IPv4-compatible
    (``::a9fe:a9fe``): the egress policy took it for an IPv6 address like any other."""
    module = http_module(tmp_path, "http://[::a9fe:a9fe]/latest/meta-data/")
    async with dispatcher_of(fetcher(module, ["::/96"])) as dispatcher:
        with pytest.raises(EgressRefused, match=r"169\.254\.169\.254 is link-local"):
            await dispatcher.call("fetcher", "fetch", None)


# -- answers: bounded in size and time, status and headers readable ------------------------


@pytest.mark.parametrize("path", ["big", "big-unsized"])
async def test_an_answer_larger_than_the_bound_is_refused(
    tmp_path: Path, server: Server, path: str
) -> None:
    # memory_mb 4: the bound is a quarter, 1 MiB.
    bound = 1024 * 1024
    small = http_module(tmp_path, f"http://localhost:{server.port}/{path}?{bound}")
    large = http_module(tmp_path, f"http://localhost:{server.port}/{path}?{bound + 1}")
    async with dispatcher_of(
        fetcher(small, ["localhost"], memory_mb=4),
        {**fetcher(large, ["localhost"], memory_mb=4), "id": "large"},
    ) as dispatcher:
        assert len(await dispatcher.call("fetcher", "fetch", None)) == bound - 2
        with pytest.raises(LimitExceeded) as caught:
            await dispatcher.call("large", "fetch", None)
    assert caught.value.details["limit"] == "http_response_bytes"
    assert caught.value.details["host"] == "localhost"
    assert f"larger than {bound} bytes" in caught.value.message


@pytest.mark.parametrize("path", ["silent", "trickle"])
async def test_a_server_that_never_answers_is_bounded_by_the_deadline(
    tmp_path: Path, server: Server, path: str
) -> None:
    stuck = http_module(tmp_path, f"http://localhost:{server.port}/{path}")
    async with dispatcher_of(fetcher(stuck, ["localhost"])) as dispatcher:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await dispatcher.call("fetcher", "fetch", None, timeout=0.5)
        assert time.monotonic() - started < 0.5 + 0.3
        # The request ended with the call: the pool's one thread is free again at once,
        # not when the server lets go (a call waiting for it would end busy).
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="the call's deadline passed; the wasm"):
            await dispatcher.call("fetcher", "fetch", None, timeout=0.5)
        assert time.monotonic() - started < 0.5 + 0.3
    assert server.seen == [f"GET localhost:{server.port}/{path}"] * 2


async def test_a_request_body_and_headers_are_passed_on(tmp_path: Path, server: Server) -> None:
    module = http_module(
        tmp_path,
        f"http://localhost:{server.port}/echo",
        method="post",
        headers={"Content-Type": "application/json", "X-Test": "yes", "Connection": "close"},
        body=b'{"x": 1}',
    )
    async with dispatcher_of(fetcher(module, ["localhost"])) as dispatcher:
        assert await dispatcher.call("fetcher", "fetch", None) == {
            "method": "POST",
            "body": '{"x": 1}',
            "content_type": "application/json",
            "x_test": "yes",
        }


async def test_a_request_body_larger_than_the_bound_is_refused_before_anything_is_sent(
    tmp_path: Path, server: Server
) -> None:
    # memory_mb 4: the bound is a quarter, 1 MiB, as for an answer's body.
    bound = 1024 * 1024
    url = f"http://localhost:{server.port}/length"
    fits = http_module(tmp_path, url, method="POST", body=b"a" * bound)
    too_large = http_module(tmp_path, url, method="POST", body=b"a" * (bound + 1))
    elsewhere = f"http://127.0.0.2:{server.port}/length"
    refused = http_module(tmp_path, elsewhere, method="POST", body=b"a" * (bound + 1))
    async with dispatcher_of(
        fetcher(fits, ["localhost"], memory_mb=4),
        {**fetcher(too_large, ["localhost"], memory_mb=4), "id": "large"},
        {**fetcher(refused, ["localhost"], memory_mb=4), "id": "refused"},
    ) as dispatcher:
        assert await dispatcher.call("fetcher", "fetch", None) == bound
        with pytest.raises(LimitExceeded) as caught:
            await dispatcher.call("large", "fetch", None)
        # Both too large and not granted: the refusal is told (and logged), not the limit.
        with pytest.raises(NetworkRefused, match=r"127\.0\.0\.2 is not granted"):
            await dispatcher.call("refused", "fetch", None)
    assert caught.value.details["limit"] == "http_request_body_bytes"
    assert caught.value.details["host"] == "localhost"
    assert not caught.value.retryable
    message = caught.value.message
    assert f"the request's body is {bound + 1} bytes, larger than {bound}" in message
    assert server.connections == ["127.0.0.1"], "the large body's request was sent"


async def test_status_and_headers_are_readable(tmp_path: Path, server: Server) -> None:
    module = http_module(tmp_path, f"http://localhost:{server.port}/echo", method="POST")
    async with dispatcher_of(fetcher(module, ["localhost"])) as dispatcher:
        assert await dispatcher.call("fetcher", "status", None) == 200
        headers = await dispatcher.call("fetcher", "headers", None)
    assert headers["x-answer"] == "yes"
    assert headers["x-twice"] == "a, b"
    echo = {"method": "POST", "body": "", "content_type": None, "x_test": None}
    assert headers["content-length"] == str(len(orjson.dumps(echo)))


@pytest.fixture(scope="module")
def go_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hostile(tmp_path_factory.mktemp("wasm"))


async def test_a_go_pdk_plugin_sends_and_reads_through_the_dispatcher(
    go_module: Path, server: Server
) -> None:
    plugin = wasm_plugin(go_module, capabilities={"network": ["localhost"]}, pool_size=1)
    base = f"http://localhost:{server.port}"
    async with dispatcher_of(plugin) as dispatcher:
        echo = await dispatcher.call("hostile", "fetch", {"url": f"{base}/echo", "body": "[1]"})
        moved = await dispatcher.call("hostile", "fetch", {"url": f"{base}/start"})
        assert await dispatcher.call("hostile", "remember", None) == 1
        with pytest.raises(NetworkRefused, match=r"127\.0\.0\.2 is not granted"):
            await dispatcher.call("hostile", "fetch", {"url": f"http://127.0.0.2:{server.port}/"})
        # The refused call's instance was dropped (stopped wherever it was): a fresh one.
        assert await dispatcher.call("hostile", "remember", None) == 1
        again = await dispatcher.call("hostile", "fetch", {"url": f"{base}/echo", "body": "[2]"})
    assert echo["status"] == 200
    assert orjson.loads(echo["body"]) == {
        "method": "POST",
        "body": "[1]",
        "content_type": "application/json",
        "x_test": None,
    }
    assert echo["headers"]["x-answer"] == "yes"
    assert echo["headers"]["x-twice"] == "a, b"
    assert moved["status"] == 302
    assert moved["body"] == '"moved"'
    assert orjson.loads(again["body"])["body"] == "[2]"
    assert server.seen == [
        f"POST localhost:{server.port}/echo",
        f"GET localhost:{server.port}/start",
        f"POST localhost:{server.port}/echo",
    ]


# -- malformed and hostile requests --------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"X-Test": "a\r\nX-Injected: 1"}, "the header X-Test holds a control character"),
        ({"X-Test\r\nX-Injected": "1"}, "is not a token"),
        ({"X-Test": "a\nb"}, "holds a control character"),
        ({"X-Test": "a" * 100_000}, "its headers hold 100006 bytes, at most 65536"),
        ({f"X-{n}": "1" for n in range(101)}, "101 headers, at most 100"),
        ({"Host": "other.example"}, "the dispatcher sets Host itself"),
        ({"Transfer-Encoding": "chunked"}, "the dispatcher sets Transfer-Encoding itself"),
    ],
    ids=["crlf-value", "crlf-name", "lf", "huge", "many", "host", "framing"],
)
async def test_a_malformed_header_is_refused_before_anything_is_sent(
    tmp_path: Path, server: Server, headers: dict[str, str], reason: str
) -> None:
    module = http_module(tmp_path, f"http://localhost:{server.port}/echo", headers=headers)
    async with dispatcher_of(fetcher(module, ["localhost"])) as dispatcher:
        with pytest.raises(NetworkRefused) as caught:
            await dispatcher.call("fetcher", "fetch", None)
    assert caught.value.message.startswith("fetcher.fetch: HTTP request to localhost refused")
    assert reason in caught.value.message
    assert server.connections == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "only http and https URLs are allowed, not file:"),
        ("http://user:secret@localhost:{port}/public", "the URL holds credentials"),
        ("http://localhost:{port}/a b", "printable ASCII characters, without spaces"),
        ("http://localhost\\@127.0.0.2:{port}/", "without spaces or backslashes"),
        ("http://localhost:0/public", "port 0"),
    ],
    ids=["scheme", "credentials", "space", "backslash", "port-0"],
)
async def test_a_malformed_url_is_refused(
    tmp_path: Path, server: Server, url: str, reason: str
) -> None:
    module = http_module(tmp_path, url.format(port=server.port))
    async with dispatcher_of(fetcher(module, ["localhost", "127.0.0.2"])) as dispatcher:
        with pytest.raises(NetworkRefused, match=r"HTTP request to .* refused") as caught:
            await dispatcher.call("fetcher", "fetch", None)
    assert reason in caught.value.message
    assert server.connections == []


@pytest.mark.parametrize(
    "url",
    ["http:/user:secret@localhost/public", "ftp:user:secret@localhost", "http:user:secret@x"],
    ids=["one-slash", "scheme", "no-slash"],
)
async def test_credentials_in_a_refused_url_are_not_repeated(
    tmp_path: Path, server: Server, caplog: pytest.LogCaptureFixture, url: str
) -> None:
    # A URL refused before it is parsed is shown in the refusal (to the caller, in the
    # security log): what its userinfo would be is not, however the URL is malformed.
    module = http_module(tmp_path, url)
    async with dispatcher_of(fetcher(module, ["localhost"])) as dispatcher:
        with pytest.raises(NetworkRefused) as caught:
            await dispatcher.call("fetcher", "fetch", None)
    told = [caught.value.message, str(caught.value.details), *security_incidents(caplog)]
    assert len(told) == 3
    assert not [each for each in told if "secret" in each], told
    assert server.connections == []


def test_a_forged_block_length_is_refused_not_read_past_the_memory(
    tmp_path: Path, server: Server
) -> None:
    """In a process of its own: reading past the module's memory would end it (SIGSEGV)."""
    module = http_module(tmp_path, f"http://localhost:{server.port}/public")
    script = f"""
import asyncio
from tests.test_wasm_hostile_network import dispatcher_of, fetcher
from pathlib import Path

async def main():
    async with dispatcher_of(fetcher(Path({str(module)!r}), ["localhost"])) as dispatcher:
        try:
            await dispatcher.call("fetcher", "forged", None)
        except Exception as error:
            print(type(error).__name__, error)

asyncio.run(main())
"""
    done = _in_a_process_of_its_own(script)
    assert done.stdout.startswith("NetworkRefused fetcher.forged: HTTP request refused:")
    assert "claims 1048576 bytes, past the end of the module's memory" in done.stdout
    assert server.connections == []


def start_code_module(
    folder: Path, url: str, host_function: str, kind: str, *, body_bytes: int = 0
) -> Path:
    """A module whose start code calls ``host_function``; its ``fetch`` answers ``"served"``.
    A ``reactor``'s start code is its ``_initialize`` (Go's ``init`` functions), which
    libextism runs as it links the module and again as it instantiates it at the first
    call; a ``command``'s (it exports ``_start``) is ``__wasm_call_ctors``, run at the
    first call only. ``body_bytes``: the start code's request has a body block of that
    many bytes, and ``fetch`` takes a block as large (and traps when it cannot)."""
    request = encode_json({"url": url, "method": "GET", "headers": {}})
    body = f"(call $alloc (i64.const {body_bytes}))" if body_bytes else "(i64.const 0)"
    calls = {
        "http_request": f"(drop (call $http (call $copy (i32.const {REQUEST_AT})"
        f" (i32.const {len(request)})) {body}))",
        "http_status_code": "(drop (call $status))",
        "http_headers": "(drop (call $headers))",
    }
    start = {
        "reactor": f'(func (export "_initialize") {calls[host_function]})',
        "command": '(func (export "_start"))'
        f' (func (export "__wasm_call_ctors") {calls[host_function]})',
    }
    served = encode_json("served")
    wat = f"""(module
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (import "extism:host/env" "http_request" (func $http (param i64 i64) (result i64)))
  (import "extism:host/env" "http_status_code" (func $status (result i32)))
  (import "extism:host/env" "http_headers" (func $headers (result i64)))
  (memory (export "memory") 2)
  (data (i32.const {REQUEST_AT}) "{_wat_string(request)}")
  (data (i32.const 64) "{_wat_string(served)}")
  {_WAT_COPY}
  {start[kind]}
  (func (export "fetch") (result i32)
    {f"(if (i64.eqz {body}) (then unreachable))" if body_bytes else ""}
    (call $output_set (call $copy (i32.const 64) (i32.const {len(served)})) (i64.const {len(served)}))
    (i32.const 0))
)"""
    module = folder / f"start-{kind}-{host_function}-{body_bytes}.wat"
    module.write_text(wat)
    return module


@pytest.mark.parametrize(
    ("kind", "host_function"),
    [
        ("reactor", "http_status_code"),
        ("reactor", "http_headers"),
        ("command", "http_request"),
        ("command", "http_status_code"),
        ("command", "http_headers"),
    ],
)
def test_a_request_in_the_module_s_start_code_is_not_sent_and_harms_nothing(
    tmp_path: Path, server: Server, kind: str, host_function: str
) -> None:
    """In a process of its own: libextism runs start code before the instance's pointers to
    its store are set (null as it links the module, stale at the first call until its
    input is set), so a host function that reaches the instance then would end the
    process (SIGSEGV). The start code's request is not sent (no call, no deadline, nobody
    to answer), and the plugin serves its calls."""
    url = f"http://localhost:{server.port}/public"
    module = start_code_module(tmp_path, url, host_function, kind)
    script = f"""
import asyncio
from tests.test_wasm_hostile_network import dispatcher_of, fetcher
from pathlib import Path

async def main():
    plugin = {{**fetcher(Path({str(module)!r}), ["localhost"]), "methods": {{"fetch": {{}}}}}}
    async with dispatcher_of(plugin) as dispatcher:
        for _ in range(2):
            print(await dispatcher.call("fetcher", "fetch", None))

asyncio.run(main())
"""
    done = _in_a_process_of_its_own(script)
    assert done.stdout.split() == ["served", "served"]
    assert server.connections == []


@pytest.mark.parametrize("host_function", ["http_request", "config_get"])
def test_start_code_that_would_end_the_process_as_it_links_is_refused_at_attach(
    tmp_path: Path, server: Server, host_function: str
) -> None:
    """libextism's wrapper of a host function reads its arguments through the instance's
    store pointer, null while a reactor's start code runs as the module is linked: such
    start code that calls ``http_request`` (the dispatcher's) or ``config_get``
    (libextism's own) ended the dispatcher's process with SIGSEGV as the plugin attached,
    before any function of the dispatcher's was reached. A first instance is now made in
    a child process (``providers.wasm.trial``): the module is refused at attach, typed,
    saying why, and the dispatcher's process goes on (a plugin beside it still serves)."""
    url = f"http://localhost:{server.port}/public"
    if host_function == "config_get":
        module = tmp_path / "start-config-get.wat"
        module.write_text(
            """(module
  (import "extism:host/env" "config_get" (func $config_get (param i64) (result i64)))
  (memory (export "memory") 1)
  (func (export "_initialize") (drop (call $config_get (i64.const 0))))
  (func (export "fetch") (result i32) (i32.const 0)))"""
        )
    else:
        module = start_code_module(tmp_path, url, host_function, "reactor")
    beside = start_code_module(tmp_path, url, "http_status_code", "reactor")
    script = f"""
import asyncio
from tests.test_wasm_hostile_network import dispatcher_of, fetcher
from pathlib import Path

async def main():
    crashing = {{**fetcher(Path({str(module)!r}), ["localhost"]), "methods": {{"fetch": {{}}}}}}
    try:
        async with dispatcher_of(crashing):
            print("attached")
    except Exception as error:
        print(type(error).__name__, error)
    fine = {{**fetcher(Path({str(beside)!r}), ["localhost"]), "methods": {{"fetch": {{}}}}}}
    async with dispatcher_of(fine) as dispatcher:
        print(await dispatcher.call("fetcher", "fetch", None))

asyncio.run(main())
"""
    done = _in_a_process_of_its_own(script)
    refusal, served = done.stdout.strip().splitlines()[-2:]
    assert "ModuleRefused" in refusal or "ended a process of its own" in refusal, refusal
    assert "ended a process of its own (SIGSEGV) as its first instance was made" in refusal
    assert "move that work from start code into the plugin's methods" in refusal
    assert served == "served"
    assert server.connections == []


async def test_without_an_interpreter_to_try_modules_in_the_attach_goes_on_and_says_so(
    tmp_path: Path,
    server: Server,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A host whose ``sys.executable`` cannot be run (an embedded Python) makes no trial:
    its plugins attach as before, and the dispatcher says once what that leaves open."""
    monkeypatch.setattr(trial.sys, "executable", str(tmp_path / "no-python-here"))
    monkeypatch.setattr(trial, "_LINKED", set())
    monkeypatch.setattr(trial, "_UNTRIED_SAID", False)
    url = f"http://localhost:{server.port}/public"
    module = start_code_module(tmp_path, url, "http_status_code", "reactor")
    plugin = {**fetcher(module, ["localhost"]), "methods": {"fetch": {}}}
    for _ in range(2):
        async with dispatcher_of(plugin) as dispatcher:
            assert await dispatcher.call("fetcher", "fetch", None) == "served"
    said = [r.getMessage() for r in caplog.records if "not tried in a child" in r.getMessage()]
    assert len(said) == 1 and "would end this process" in said[0]


def test_the_blocks_of_a_request_in_start_code_do_not_outlive_it(
    tmp_path: Path, server: Server
) -> None:
    """Start code's request is answered without reaching the instance, so the dispatcher
    cannot free its blocks (``providers.wasm.runtime``); libextism's reset, as the call that
    made the instance sets its input, frees every block. Start code that asks with a body
    of 2.5 MiB leaves its call room for 2.5 MiB of its own, in 4 MiB in all: nothing kept
    the first."""
    url = f"http://localhost:{server.port}/public"
    module = start_code_module(tmp_path, url, "http_request", "command", body_bytes=5 << 19)
    script = f"""
import asyncio
from tests.test_wasm_hostile_network import dispatcher_of, fetcher
from pathlib import Path

async def main():
    plugin = fetcher(Path({str(module)!r}), ["localhost"], memory_mb=4)
    async with dispatcher_of({{**plugin, "methods": {{"fetch": {{}}}}}}) as dispatcher:
        for _ in range(2):
            print(await dispatcher.call("fetcher", "fetch", None))

asyncio.run(main())
"""
    done = _in_a_process_of_its_own(script)
    assert done.stdout.split() == ["served", "served"]
    assert server.connections == []


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def trusted(authority: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """The test's CA in the trust store of the standard library's default context."""
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    return authority


def tls_server(authority: trustme.CA, name: str) -> Iterator[Server]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert(name).configure_cert(context)
    yield from _serve(context)


async def test_https_reaches_a_granted_name_whose_certificate_names_it(
    tmp_path: Path, trusted: trustme.CA
) -> None:
    for server in tls_server(trusted, "localhost"):
        module = http_module(tmp_path, f"https://localhost:{server.port}/public")
        async with dispatcher_of(fetcher(module, ["localhost"])) as dispatcher:
            assert await dispatcher.call("fetcher", "fetch", None) == "public"
        assert server.seen == [f"GET localhost:{server.port}/public"]


async def test_https_refuses_a_certificate_for_another_name(
    tmp_path: Path, trusted: trustme.CA
) -> None:
    for server in tls_server(trusted, "other.example"):
        module = http_module(tmp_path, f"https://localhost:{server.port}/public")
        async with dispatcher_of(fetcher(module, ["localhost"])) as dispatcher:
            with pytest.raises(ProviderError) as caught:
                await dispatcher.call("fetcher", "fetch", None)
        assert "HTTP request to localhost failed: its certificate is not trusted for localhost" in (
            caught.value.message
        )
        assert server.seen == []


async def test_https_sends_a_request_body(tmp_path: Path, trusted: trustme.CA) -> None:
    for server in tls_server(trusted, "localhost"):
        url = f"https://localhost:{server.port}/length"
        module = http_module(tmp_path, url, method="PUT", body=b"b" * 300_000)
        async with dispatcher_of(fetcher(module, ["localhost"])) as dispatcher:
            assert await dispatcher.call("fetcher", "fetch", None) == 300_000
        assert server.seen == [f"PUT localhost:{server.port}/length"]


# -- deadlines: a resolver that never answers, a refusal when the call's end comes ---------


def straight_line_module(folder: Path, *steps: float | str) -> Path:
    """A module whose ``fetch`` makes the blocks of its requests first, then takes
    ``steps`` one after the other: a string sends a request to that URL (its answer
    dropped), a float sleeps that many seconds in WASI's poll_oneoff (a host call, which a
    cancel waits for). wasmtime stops a cancelled module where a function or a loop begins,
    and there is none between the steps: each is taken even once the call was stopped.
    Its ``one`` answers ``1``."""
    urls = [step for step in steps if isinstance(step, str)]
    requests = [encode_json({"url": url, "method": "GET", "headers": {}}) for url in urls]
    assert all(len(request) < 1024 for request in requests)
    data = "\n".join(
        f'  (data (i32.const {REQUEST_AT + 1024 * n}) "{_wat_string(request)}")'
        for n, request in enumerate(requests)
    )
    locals_ = " ".join(f"(local $r{n} i64)" for n in range(len(requests)))
    blocks = " ".join(
        f"(local.set $r{n} (call $copy (i32.const {REQUEST_AT + 1024 * n})"
        f" (i32.const {len(request)})))"
        for n, request in enumerate(requests)
    )
    taken: list[str] = []
    for step in steps:
        if isinstance(step, str):
            taken.append(f"(drop (call $http (local.get $r{urls.index(step)}) (i64.const 0)))")
        else:
            taken.append(
                f"(i64.store (i32.const 24) (i64.const {round(step * 1e9)}))"
                " (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))"
            )
    wat = f"""(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (import "extism:host/env" "http_request" (func $http (param i64 i64) (result i64)))
  (memory (export "memory") 2)
{data}
  (data (i32.const 512) "1")
  {_WAT_COPY}
  (func (export "fetch") (result i32) {locals_}
    {blocks}
    ;; one subscription at 0, a relative clock (its timeout at 24); events at 64, their count at 128
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    {" ".join(taken)}
    (i32.const 0))
  (func (export "one") (result i32)
    (call $output_set (call $copy (i32.const 512) (i32.const 1)) (i64.const 1))
    (i32.const 0))
)"""
    module = folder / f"steps-{hashlib.sha256(wat.encode()).hexdigest()[:12]}.wat"
    module.write_text(wat)
    return module


def stepper(module: Path, network: list[str]) -> dict[str, Any]:
    return {**fetcher(module, network), "methods": {"fetch": {}, "one": {}}}


@pytest.mark.parametrize(
    ("url", "network", "refusal"),
    [
        ("http://127.0.0.2:9/private", ["localhost"], NetworkRefused),
        ("http://169.254.169.254/latest/meta-data/", ["169.254.0.0/16"], EgressRefused),
    ],
    ids=["grant", "egress"],
)
async def test_a_refusal_is_told_and_logged_though_the_deadline_came_before_the_thread_was_back(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    url: str,
    network: list[str],
    refusal: type[Exception],
) -> None:
    # Refused at once, the module goes on into a host call (a sleep) before the stop takes
    # effect, and its thread is back just past the deadline, within the pool's grace for
    # a thread to come back: the pool's timer has cancelled the call meanwhile.
    deadline = 0.3
    module = straight_line_module(tmp_path, url, deadline + 0.03)
    async with dispatcher_of(stepper(module, network)) as dispatcher:
        started = time.monotonic()
        with pytest.raises(refusal) as caught:
            await dispatcher.call("fetcher", "fetch", None, timeout=deadline)
        assert time.monotonic() - started > deadline
    assert caught.value.message.startswith("fetcher.fetch: HTTP request to ")
    incidents = security_incidents(caplog)
    assert len(incidents) == 1
    assert incidents[0].startswith("security: fetcher.fetch: HTTP request to ")


async def test_a_refusal_whose_thread_is_back_after_the_caller_was_answered_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As above, but the sleep outlasts the pool's grace: the caller is answered at the
    # deadline, and the refusal is logged when the thread is back.
    deadline = 0.3
    module = straight_line_module(tmp_path, "http://127.0.0.2:9/private", deadline + 0.4)
    async with dispatcher_of(stepper(module, ["localhost"])) as dispatcher:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await dispatcher.call("fetcher", "fetch", None, timeout=deadline)
        assert time.monotonic() - started < deadline + 0.2
        assert security_incidents(caplog) == []  # the module sleeps on
        # pool_size 1: this call starts once the sleeper's thread is back and settled.
        assert await dispatcher.call("fetcher", "one", None, timeout=5) == 1
    incidents = security_incidents(caplog)
    assert len(incidents) == 1
    assert incidents[0].startswith("security: fetcher.fetch: HTTP request to 127.0.0.2 refused")
    assert "after its caller was answered" in incidents[0]


@pytest.mark.parametrize(
    ("steps", "sent"),
    [
        (("{base}/silent", "http://127.0.0.2:9/private"), ["/silent"]),
        ((0.5, "{base}/public"), []),
    ],
    ids=["after-a-request-timed-out", "after-the-deadline-cancelled-it"],
)
async def test_a_request_made_once_the_call_was_stopped_is_neither_sent_nor_refused(
    tmp_path: Path,
    server: Server,
    caplog: pytest.LogCaptureFixture,
    steps: tuple[float | str, ...],
    sent: list[str],
) -> None:
    """A stopped module that asks for more before the stop takes effect: libextism ends
    every call into Extism's own functions then, so its request cannot even be read. It
    is not sent, and no refusal is made up from the length of 0 Extism gives (a false
    security incident): the call ended at its deadline, and says so."""
    base = f"http://localhost:{server.port}"
    taken = (step.format(base=base) if isinstance(step, str) else step for step in steps)
    module = straight_line_module(tmp_path, *taken)
    async with dispatcher_of(stepper(module, ["localhost"])) as dispatcher:
        with pytest.raises(DeadlineExceeded, match="the call's deadline passed"):
            await dispatcher.call("fetcher", "fetch", None, timeout=0.3)
        # pool_size 1: this call starts once the first one's thread is back and settled.
        assert await dispatcher.call("fetcher", "one", None, timeout=5) == 1
    assert security_incidents(caplog) == []
    assert server.seen == [f"GET localhost:{server.port}{path}" for path in sent]


needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="binds the port of DNS, and mounts a resolv.conf in a mount namespace of its own",
)


def _a_resolver_that_never_answers(folder: Path) -> tuple[list[str], str]:
    """The command to run a process whose system resolver asks only a DNS server on the
    loopback that reads every query and never answers (resolv.conf, bind-mounted in a mount
    namespace of its own), and the Python that starts that server, in the process."""
    address = f"127.53.{secrets.randbelow(256)}.{1 + secrets.randbelow(254)}"
    conf = folder / "resolv.conf"
    # glibc's longest wait per attempt: the test is long over by then.
    conf.write_text(f"nameserver {address}\noptions timeout:30 attempts:1\n")
    wrapper = [
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(conf),
    ]  # fmt: skip
    server = f"""
import socket, threading
silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
silent.bind(({address!r}, 53))
def never_answer():
    while True:
        silent.recv(4096)
threading.Thread(target=never_answer, daemon=True).start()
"""
    return wrapper, server


@needs_root
def test_a_name_the_resolver_never_answers_ends_at_the_deadline_and_frees_the_thread(
    tmp_path: Path,
) -> None:
    """The caller is answered at the deadline, and the lane's thread (pool_size 1) stops
    waiting for the resolver then too: the next call runs, and ends at its own deadline,
    instead of finding the pool busy for as long as the resolver takes (30 s here)."""
    module = http_module(tmp_path, "http://slow.test/public")
    wrapper, server = _a_resolver_that_never_answers(tmp_path)
    script = f"""{server}
import asyncio, time
from pathlib import Path
from tests.test_wasm_hostile_network import dispatcher_of, fetcher

async def main():
    async with dispatcher_of(fetcher(Path({str(module)!r}), ["slow.test"])) as dispatcher:
        for _ in range(2):
            started = time.monotonic()
            try:
                await dispatcher.call("fetcher", "fetch", None, timeout=0.5)
            except Exception as error:
                print(f"{{time.monotonic() - started:.3f}}", type(error).__name__, error)

asyncio.run(main())
"""
    done = _in_a_process_of_its_own(script, wrapper=wrapper)
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    for line in lines:
        seconds, kind, message = line.split(" ", 2)
        assert kind == "DeadlineExceeded", line
        assert "the call's deadline passed; the wasm call was stopped" in message, line
        assert float(seconds) < 0.5 + 0.3, line


@needs_root
def test_lookups_the_resolver_never_answers_are_capped_and_the_next_fails_at_once(
    tmp_path: Path,
) -> None:
    """Each call gives up on its lookup at its deadline, and the lookup stays under way on
    a resolver thread until the system resolver gives up: at most MAX_LOOKUPS of them, and
    the request past them fails at once, typed, with no new thread."""
    module = http_module(tmp_path, "http://slow.test/public")
    wrapper, server = _a_resolver_that_never_answers(tmp_path)
    script = f"""{server}
import asyncio, threading, time
from pathlib import Path
from providers.wasm.resolver import MAX_LOOKUPS
from tests.test_wasm_hostile_network import dispatcher_of, fetcher

async def main():
    plugin = fetcher(Path({str(module)!r}), ["slow.test"])
    plugin["target"]["pool_size"] = 8
    async with dispatcher_of(plugin) as dispatcher:
        async def call(timeout):
            started = time.monotonic()
            try:
                await dispatcher.call("fetcher", "fetch", None, timeout=timeout)
            except Exception as error:
                return f"{{time.monotonic() - started:.3f}} {{type(error).__name__}} {{error}}"
        print("limit", MAX_LOOKUPS)
        for _ in range(MAX_LOOKUPS // 8):
            for outcome in await asyncio.gather(*(call(0.3) for _ in range(8))):
                print(outcome)
        threads = threading.active_count()
        print(await call(5.0))
        print("threads", threads, threading.active_count())

asyncio.run(main())
"""
    done = _in_a_process_of_its_own(script, wrapper=wrapper)
    limit, *waited, refused, threads = done.stdout.splitlines()
    lookups = int(limit.split()[1])
    assert lookups % 8 == 0
    assert len(waited) == lookups, done.stdout
    for line in waited:
        assert "DeadlineExceeded" in line and "the call's deadline passed" in line, line
    seconds, kind, message = refused.split(" ", 2)
    assert kind == "ProviderError", refused
    assert float(seconds) < 0.5, refused
    assert "HTTP request to slow.test failed: cannot resolve slow.test:" in message
    assert f"{lookups} lookups are waiting for the system resolver" in message
    before, after = threads.split()[1:]
    assert before == after


# -- what the sandbox reports --------------------------------------------------------------


def test_a_network_grant_is_reported_enforced_redirects_and_egress_included() -> None:
    translation = sandbox_of(
        Capabilities(network=["api.example.com", "10.0.0.0/8"]), {}
    ).translation
    assert translation.unenforced == []
    network = next(line for line in translation.enforced if line.startswith("network:"))
    assert "api.example.com, 10.0.0.0/8 (URLs naming an address in it)" in network
    assert "egress policy checked on every resolved address" in network
    assert "never followed" in network
    assert f"request bodies and answers of at most {32 * 1024 * 1024} bytes" in network


def test_a_name_the_hosts_file_gives_is_answered_with_every_lookup_under_way(
    tmp_path: Path,
) -> None:
    """With every lookup the resolver may run stuck in an unanswering DNS server, the
    system resolver would still have answered a name of ``/etc/hosts`` from the file
    (``localhost``, a service's fixed name): so does the resolver, without a thread. A
    name the file does not give is refused at once, as before. Checked against the
    system's own answer for ``localhost``, and with a file of the test's own."""
    system = socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)
    full = Resolver(limit=0)  # every lookup it may run is under way
    assert {info[4][0] for info in full.resolve("localhost", 80, timeout=1)} == {
        info[4][0] for info in system
    }
    hosts = tmp_path / "hosts"
    hosts.write_text(
        "# a comment\n"
        "127.0.0.9 Hosted.test alias.test # a trailing comment\n"
        "::1 hosted.test\n"
        "fe80::1%eth0 hosted.test\n"
        "not-an-address hosted.test\n"
        "127.0.0.10\n"
    )
    full = Resolver(limit=0, hosts_file=str(hosts))
    assert full.resolve("HOSTED.test.", 8080, timeout=1) == [
        (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.9", 8080)),
        (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::1", 8080, 0, 0)),
    ]
    with pytest.raises(ResolverBusy):
        full.resolve("elsewhere.test", 80, timeout=1)
    hosts.write_text("127.0.0.11 elsewhere.test\n")
    os.utime(hosts, ns=(0, 1))  # a change the file's size alone might not show
    assert [info[4] for info in full.resolve("elsewhere.test", 80, timeout=1)] == [
        ("127.0.0.11", 80)
    ]
    assert full.threads == []
