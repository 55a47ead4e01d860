"""WebAssembly plugins: a WASI module run inside the dispatcher's process, sandboxed.

A ``provider: wasm`` target names a module file pinned by SHA-256; the module speaks the
Extism plugin ABI (``docs/protocol.md``, "WebAssembly"), so a plugin written with any
Extism PDK runs unchanged and the Go SDK builds one with the standard toolchain
(``sdk/go/wasm``). One job per module:

    target.py    the manifest's model; no runtime import, so a manifest loads without it
    module.py    reading the module file and refusing one that is not the pinned one
    sandbox.py   the plugin's capabilities in Extism's words (pure)
    http_host.py the module's HTTP requests, made by the dispatcher (grant, egress, bounds)
    http_request.py    a request's form: Extism's JSON, the URL, the method, the headers
    http_connection.py a request's connection, TLS and answer, every wait bounded
    resolver.py  the names those requests look up, each waited for until its call's end
    runtime.py   libextism through the ``extism`` package (its only importer), and the
                 host functions that hand ``http_request`` to ``http_host``
    pool.py      instances, pooled or fresh, the threads calls run on, deadlines
    provider.py  WasmProvider: attach, calls, and the error mapping

``extism`` (the ``wasm`` extra, with its native ``extism-sys`` wheel) is imported when the
provider starts.
"""

from __future__ import annotations

from providers.wasm.module import ModuleRefused
from providers.wasm.provider import WasmProvider
from providers.wasm.target import WasmTarget

__all__ = ["ModuleRefused", "WasmProvider", "WasmTarget"]
