"""provider: wasm and the network a plugin is granted: Extism's HTTP host function, against
a real HTTP server on the loopback that redirects a granted name to an address not granted.

The module is written in the WebAssembly text format, the request baked in: it asks for
the URL through ``http_request`` and answers the response's body.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher import Dispatcher
from linchkit_plugin.wire import encode_json
from providers.capabilities import Capabilities
from providers.wasm.sandbox import sandbox_of
from tests.conftest import manifest


class _Redirecting(http.server.BaseHTTPRequestHandler):
    """``/start`` redirects to 127.0.0.2 (not a granted name); anything else answers."""

    seen: list[str]

    def do_GET(self) -> None:
        self.seen.append(f"{self.headers['Host']}{self.path}")
        if self.path == "/start":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{self.server.server_port}/private")
            self.end_headers()
            return
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'"private"')

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[int, list[str]]]:
    seen: list[str] = []
    handler = type("Handler", (_Redirecting,), {"seen": seen})
    # Every loopback address, 127.0.0.2 (the redirect's) among them.
    httpd = http.server.ThreadingHTTPServer(("0.0.0.0", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_port, seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def fetching_module(folder: Path, url: str) -> Path:
    request = encode_json({"url": url, "method": "GET", "headers": {}}).decode()
    quoted = request.replace('"', "\\22")  # a WAT string's escape for a double quote
    wat = f"""(module
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "length" (func $length (param i64) (result i64)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (import "extism:host/env" "http_request" (func $http (param i64 i64) (result i64)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "{quoted}")
  (func (export "fetch") (result i32) (local $at i64) (local $i i32) (local $body i64)
    (local.set $at (call $alloc (i64.const {len(request)})))
    (block $copied (loop $copy
      (br_if $copied (i32.ge_u (local.get $i) (i32.const {len(request)})))
      (call $store_u8 (i64.add (local.get $at) (i64.extend_i32_u (local.get $i)))
        (i32.load8_u (i32.add (i32.const 1024) (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $copy)))
    (local.set $body (call $http (local.get $at) (i64.const 0)))
    (call $output_set (local.get $body) (call $length (local.get $body)))
    (i32.const 0))
)"""
    module = folder / "fetch.wat"
    module.write_text(wat)
    return module


def fetcher(module: Path) -> dict[str, object]:
    return {
        "id": "fetcher",
        "version": "1.0.0",
        "target": {
            "provider": "wasm",
            "module": str(module),
            "sha256": hashlib.sha256(module.read_bytes()).hexdigest(),
        },
        "capabilities": {"network": ["localhost"]},
        "methods": {"fetch": {}},
    }


async def test_a_granted_name_is_reached(tmp_path: Path, server: tuple[int, list[str]]) -> None:
    port, seen = server
    module = fetching_module(tmp_path, f"http://localhost:{port}/public")
    async with Dispatcher(manifest(fetcher(module))) as dispatcher:
        assert await dispatcher.call("fetcher", "fetch", None) == "private"
    assert seen == [f"localhost:{port}/public"]


@pytest.mark.xfail(
    strict=True,
    reason="libextism's HTTP host function follows redirects to any host; the dispatcher "
    "cannot turn that off (reported at attach as not enforced)",
)
async def test_a_redirect_from_a_granted_name_to_another_host_is_not_followed(
    tmp_path: Path, server: tuple[int, list[str]]
) -> None:
    port, seen = server
    module = fetching_module(tmp_path, f"http://localhost:{port}/start")
    async with Dispatcher(manifest(fetcher(module))) as dispatcher:
        with contextlib.suppress(Exception):  # refused is what should happen
            await dispatcher.call("fetcher", "fetch", None)
    assert seen == [f"localhost:{port}/start"], "the redirect reached 127.0.0.2"


def test_what_a_host_grant_does_not_enforce_is_reported() -> None:
    translation = sandbox_of(Capabilities(network=["api.example.com"]), {}).translation
    reported = " ".join(translation.unenforced)
    assert "redirect" in reported
    assert "egress" in reported
