"""A credential in the gateway's URL never shows in what ``connect`` prints, in any SDK
that dials the gateway: the URL is shown as the dispatcher shows one
(``providers.model.masked_url``: a password, a user without one, each query value and a
query item without ``=`` read ``***``; the fragment reads ``***`` or is left out), or not
at all.

A token can sit in four places of ``--url``: the userinfo (``ws://me:TOKEN@host/…`` or
``ws://TOKEN@host/…``), a query value (``?token=TOKEN``), a bare query item (``?TOKEN``)
and the fragment (``#TOKEN``). Each is tried where the URL is shown:

* refused before dialling (an ``ftp://`` scheme, a port past 65535): one line, status 1,
  naming the host with the credential masked;
* a gateway that does not answer (a closed port on 127.0.0.1), dialled again for a second
  or two: whatever line names the gateway masks it, and the plugin goes on dialling;
* a gateway that answers the upgrade 401: one line, status 1, without the token.

(The Rust SDK takes no credentials in the URL: a user or a password there is refused
before dialling, masked.) Before, the Rust and TypeScript refusals quoted the URL as
written, Rust's "dialling" and "cannot reach" lines showed its query, Go's and Python's
showed a bare query item, Go's quoted a fragment (in the dial's error), and TypeScript
crashed on a URL with a fragment. The Java SDK's ``connect`` (since 2026-12-06) masks alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import subprocess
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.conformance.conftest import (
    LANGUAGES,
    START_TIMEOUT,
    WEBSOCKET_MODES,
    _stop_service,
    executable,
)
from tests.conformance.test_serve_cli import CRASHES, one_clear_line
from tests.hostile_peers import http_peer
from tests.services import CLEAN_ENVIRONMENT

DIALLING = [language for language in LANGUAGES if "inbound" in WEBSOCKET_MODES.get(language, ())]
#: Distinctive enough that no other text holds it; long enough to be a real token.
TOKEN = "tok" + secrets.token_hex(12)
PATH = "/v1/plugins/connect"
#: Where the token sits: the URL as a template of the scheme and the host (with its port).
PLACES = {
    "password": "{scheme}://me:" + TOKEN + "@{host}" + PATH,
    "user": "{scheme}://" + TOKEN + "@{host}" + PATH,
    "query value": "{scheme}://{host}" + PATH + "?token=" + TOKEN + "&region=eu",
    "bare query item": "{scheme}://{host}" + PATH + "?" + TOKEN,
    "fragment": "{scheme}://{host}" + PATH + "#" + TOKEN,
}
#: The SDKs whose example plugin says that it cannot reach the gateway: all of them (before,
#: Python's said it at INFO, which ``dispatcher-plugin connect`` did not print).
NAMING_AN_UNREACHABLE_GATEWAY = {"go", "java", "python", "rust", "typescript"}
#: The SDKs that take no credentials in the URL (the token is for them): a user or a
#: password there is refused before dialling, as a URL that cannot name a gateway is.
REFUSING_USERINFO = {"rust"}
ENVIRONMENT = {
    key: value
    for key, value in CLEAN_ENVIRONMENT.items()
    if key not in ("LINCHKIT_PLUGIN_TOKEN", "LINCHKIT_PLUGIN_TOKEN_FILE")
}


def _url(place: str, host: str, scheme: str = "ws") -> str:
    return PLACES[place].format(scheme=scheme, host=host)


def _refused_before_dialling(language: str, place: str) -> bool:
    return language in REFUSING_USERINFO and place in ("password", "user")


def _assert_masked(place: str, text: str, host: str) -> None:
    """``text`` names ``host`` with the credential of ``place`` masked, never the token."""
    assert TOKEN not in text, f"the token in the URL's {place} shows:\n{text}"
    assert host in text, f"no line names {host}:\n{text}"
    if place != "fragment":  # a fragment may be masked or left out
        assert "***" in text, f"the URL's {place} is not masked:\n{text}"


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize(
    ("scheme", "host"),
    [
        pytest.param("ftp", "127.0.0.1:9", id="not WebSocket"),
        pytest.param("ws", "127.0.0.1:99999", id="port over 65535"),
    ],
)
@pytest.mark.parametrize("language", DIALLING)
def test_a_refused_url_is_shown_masked(language: str, scheme: str, host: str, place: str) -> None:
    done = subprocess.run(
        [str(executable(language)), "connect", "--url", _url(place, host, scheme)],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        env=ENVIRONMENT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert TOKEN not in done.stdout + done.stderr, done.stdout + done.stderr
    line = one_clear_line(done)
    assert "--url" in line, line
    _assert_masked(place, line, host)


class Running:
    """``connect --url …`` running, and the lines it printed so far."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.closed = 0  # of its two streams
        self.changed = asyncio.Condition()

    async def read(self, stream: asyncio.StreamReader, into: list[str]) -> None:
        while line := await stream.readline():
            async with self.changed:
                into.append(line.decode(errors="replace"))
                self.changed.notify_all()
        async with self.changed:
            self.closed += 1
            self.changed.notify_all()

    async def said_or_ended(self, text: str) -> None:
        """Until a line holds ``text``, or the process closed its output."""
        async with self.changed:
            await self.changed.wait_for(lambda: text in self.said() or self.closed == 2)

    async def ended(self) -> None:
        """Until the process exited and all it printed is read (its exit may come before
        the readers took its last line)."""
        await self.process.wait()
        async with self.changed:
            await self.changed.wait_for(lambda: self.closed == 2)

    def said(self) -> str:
        return "".join(self.stdout + self.stderr)

    def done(self) -> subprocess.CompletedProcess[str]:
        code = self.process.returncode
        return subprocess.CompletedProcess([], code, "".join(self.stdout), "".join(self.stderr))


@contextlib.asynccontextmanager
async def connecting(
    language: str, url: str, *more: str, env: dict[str, str] = ENVIRONMENT
) -> AsyncIterator[Running]:
    """``connect --url url`` (and ``more`` arguments) running in ``env``; stopped
    (SIGTERM, then SIGKILL) on the way out, once all it printed is read."""
    process = await asyncio.create_subprocess_exec(
        str(executable(language)), "connect", "--url", url, *more,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    running = Running(process)
    readers = [
        asyncio.ensure_future(running.read(process.stdout, running.stdout)),
        asyncio.ensure_future(running.read(process.stderr, running.stderr)),
    ]
    try:
        yield running
    finally:
        await _stop_service(process)
        async with asyncio.timeout(10):
            await asyncio.gather(*readers)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("language", DIALLING)
async def test_an_unreachable_gateway_is_named_masked(language: str, place: str) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{closed.getsockname()[1]}"  # nothing listens there once closed
    async with connecting(language, _url(place, host)) as running:
        if _refused_before_dialling(language, place):
            async with asyncio.timeout(START_TIMEOUT):
                await running.ended()
            _assert_masked(place, one_clear_line(running.done()), host)
            return
        if language in NAMING_AN_UNREACHABLE_GATEWAY:
            # Bounded: a slow start on a busy machine, then the first failed dial's line.
            async with asyncio.timeout(START_TIMEOUT):
                await running.said_or_ended(host)
        await asyncio.sleep(1.5)  # a few more dials, each with its line
        ended = running.process.returncode
    text = running.said()
    assert TOKEN not in text, f"the token in the URL's {place} shows:\n{text}"
    assert not any(crash in text for crash in CRASHES), text
    assert ended is None, f"connect ended ({ended}) instead of dialling again:\n{text}"
    assert running.stdout == [], text  # stdout is the handshake line's place
    if language in NAMING_AN_UNREACHABLE_GATEWAY:
        lines = "".join(line for line in running.stderr if host in line)
        _assert_masked(place, lines, host)


@contextlib.asynccontextmanager
async def _refusing_gateway() -> AsyncIterator[str]:
    """A gateway that answers every upgrade 401; yields its host:port."""

    async def refusing(request: web.Request) -> web.Response:
        return web.json_response({"ok": False}, status=401)

    async with http_peer(PATH, refusing) as address:
        yield address


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("language", DIALLING)
async def test_a_gateway_that_answers_401_ends_it_without_the_token(
    language: str, place: str
) -> None:
    async with _refusing_gateway() as host, connecting(language, _url(place, host)) as running:
        async with asyncio.timeout(START_TIMEOUT):
            await running.process.wait()
    text = running.said()
    assert TOKEN not in text, f"the token in the URL's {place} shows:\n{text}"
    line = one_clear_line(running.done())
    if _refused_before_dialling(language, place):
        _assert_masked(place, line, host)
    else:
        assert "refused" in line and "401" in line, line
