"""The least an aiohttp.web server can do per call: read the body, answer a fixed envelope.

``bench_gateway`` measures it beside the gateway, so its figures show how much of the
gateway's cost is aiohttp's own. Prints ``listening on URL`` like ``dispatcher serve``.
"""

from __future__ import annotations

import asyncio

import uvloop
from aiohttp import web

REPLY = b'{"ok":true,"result":{"text":"hi"}}'


async def answer(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=REPLY, content_type="application/json")


async def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/plugins/bench/methods/echo", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(f"listening on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main())
