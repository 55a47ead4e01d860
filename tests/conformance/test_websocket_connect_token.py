"""The bearer token of each SDK's ``connect`` (docs/protocol.md, "WebSocket binding"):
the plugin presents the token, and a gateway refusing it (``401`` at the upgrade) ends the
plugin with status 1 and one line that does not show the token, after one dial: the same
dial would get the same answer. (``serve --websocket``'s token: ``test_websocket_token.py``.)
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess

import pytest
from aiohttp import web

from tests.conformance.conftest import LANGUAGES, START_TIMEOUT, WEBSOCKET_MODES, executable
from tests.conformance.test_serve_cli import one_clear_line
from tests.services import CLEAN_ENVIRONMENT

DIALLING = [language for language in LANGUAGES if "inbound" in WEBSOCKET_MODES.get(language, ())]
TOKEN_VARIABLES = ("LINCHKIT_PLUGIN_TOKEN", "LINCHKIT_PLUGIN_TOKEN_FILE")


def _environment(**token: str) -> dict[str, str]:
    clean = {k: v for k, v in CLEAN_ENVIRONMENT.items() if k not in TOKEN_VARIABLES}
    return {**clean, **token}


@pytest.mark.parametrize("language", DIALLING)
async def test_connect_presents_its_token_and_ends_when_refused(language: str) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    seen: list[dict[str, str]] = []

    async def refusing(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"ok": False}, status=401)

    app = web.Application()
    app.router.add_get("/v1/plugins/connect", refusing)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"ws://127.0.0.1:{runner.addresses[0][1]}/v1/plugins/connect"
        command = [str(executable(language)), "connect", "--url", url]
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_environment(LINCHKIT_PLUGIN_TOKEN=token),
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(process.communicate(), START_TIMEOUT)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    finally:
        await runner.cleanup()
    done = subprocess.CompletedProcess(command, process.returncode, out.decode(), err.decode())
    line = one_clear_line(done)
    assert "refused" in line and "401" in line, line
    assert token not in done.stderr, done.stderr
    assert len(seen) == 1, f"dialled {len(seen)} times after a 401"
    (headers,) = seen
    assert headers.get("Authorization") == f"Bearer {token}", headers
    assert headers.get("X-Plugin-Id") == "example" and headers.get("X-Plugin-Version") == "1.0.0"
