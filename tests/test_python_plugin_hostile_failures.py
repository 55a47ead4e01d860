"""``dispatcher-plugin serve`` against methods that fail as no well-behaved method does.

A method may raise anything: ``sys.exit()``, ``KeyboardInterrupt``, ``GeneratorExit``, a
bare ``BaseException``, ``CancelledError`` of its own accord, an exception whose ``__str__``
raises or returns no str, or whose ``retryable`` property raises. Each such call gets
exactly one answer, a ``plugin_error`` envelope naming the exception's class, and the
server goes on serving. Before, over WebSocket ``sys.exit()`` and ``KeyboardInterrupt``
ended the whole server (every connection and call in flight with it) and the others were
never answered (the host waited for its deadline); over HTTP they were uvicorn's plain-text
500, which the dispatcher reads as a retryable ``target_unavailable``, and in a batch one
of them sank every item; a ``CancelledError`` the method raised was answered as the server
stopping (503, retryable) and cancelled every item of its batch.

Real servers (the SDK's executable, in a subprocess) and real HTTP and WebSocket clients.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest

HOSTILE_PLUGIN = """
import asyncio
import sys

from linchkit_plugin import Plugin


class BadStr(Exception):
    def __str__(self):
        raise RuntimeError("boom in __str__")


class NonStrStr(Exception):
    def __str__(self):
        return 42


class BadRetry(Exception):
    @property
    def retryable(self):
        raise RuntimeError("retryable raises")


class Unprintable(Exception):
    def __str__(self):
        return "\\udcff lone surrogate"


class Hostile(Plugin):
    def ok(self):
        return "ok"

    async def slow(self, seconds=0.5):
        await asyncio.sleep(seconds)
        return "slept"

    def exit_sync(self):
        sys.exit(3)

    async def exit_async(self):
        sys.exit(3)

    def kbi_sync(self):
        raise KeyboardInterrupt

    async def kbi_async(self):
        raise KeyboardInterrupt

    def badstr(self):
        raise BadStr()

    async def abadstr(self):
        raise BadStr()

    def nonstrstr(self):
        raise NonStrStr()

    def badretry(self):
        raise BadRetry("x")

    def unprintable(self):
        raise Unprintable()

    async def genexit(self):
        raise GeneratorExit()

    async def baseexc(self):
        raise BaseException("base")

    async def cancelled(self):
        raise asyncio.CancelledError()

    def sync_cancelled(self):
        raise asyncio.CancelledError()

    async def agen_bad(self):
        yield 1
        raise BadStr()

    async def agen_exit(self):
        yield 1
        sys.exit(2)
"""

#: Each hostile method and the error type its call is answered with.
FAILURES = {
    "exit_sync": "SystemExit",
    "exit_async": "SystemExit",
    "kbi_sync": "KeyboardInterrupt",
    "kbi_async": "KeyboardInterrupt",
    "badstr": "BadStr",
    "abadstr": "BadStr",
    "nonstrstr": "NonStrStr",
    "badretry": "BadRetry",
    "unprintable": "Unprintable",
    "genexit": "GeneratorExit",
    "baseexc": "BaseException",
    "cancelled": "CancelledError",
    "sync_cancelled": "CancelledError",
    "agen_bad": "BadStr",
    "agen_exit": "SystemExit",
}
#: Those of them that neither exit nor interrupt: before, each went unanswered over WebSocket.
UNANSWERED = {
    method: error_type
    for method, error_type in FAILURES.items()
    if error_type not in ("SystemExit", "KeyboardInterrupt")
}
#: Bounds every wait: far past what a call takes, far short of pytest's own timeout.
WAIT = 20.0


@asynccontextmanager
async def hostile_server(tmp_path: Path, *flags: str) -> AsyncIterator[tuple[Any, str]]:
    """``dispatcher-plugin serve`` of the hostile plugin on a free port with ``flags``: the
    process and the URL it listens on. Ended with the block, unless the block ended it."""
    (tmp_path / "hostile_plugin.py").write_text(HOSTILE_PLUGIN)
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "linchkit_plugin.cli", "serve", "hostile_plugin:Hostile"),
        *("--path", str(tmp_path), "--port", "0", *flags),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        said = ""
        async with asyncio.timeout(30):
            while not (found := re.search(r"listening on ((?:ws|http)://[0-9.:]+)", said)):
                line = (await process.stderr.readline()).decode()
                assert line, said
                said += line
        yield process, found[1]
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


def request(method: str, **params: Any) -> dict[str, Any]:
    context = {"request_id": f"r-{method}", "deadline_ms": int(WAIT * 1000)}
    return {"v": 1, "plugin": "hostile", "method": method, "params": params, "context": context}


def assert_the_method_s_failure(response: dict[str, Any], error_type: str) -> None:
    assert response["ok"] is False, response
    error = response["error"]
    assert error["type"] == error_type, response
    assert error["retryable"] is False, response
    assert isinstance(error["message"], str) and error["message"], response


async def answers(socket: Any, wanted: set[int]) -> dict[int, dict[str, Any]]:
    """The ``response`` frame of each id in ``wanted``, read within ``WAIT``; a second
    response to one id fails."""
    got: dict[int, dict[str, Any]] = {}
    async with asyncio.timeout(WAIT):
        while set(got) != wanted:
            message = await socket.receive()
            assert message.type == aiohttp.WSMsgType.TEXT, (message.type, message.data)
            frame = orjson.loads(message.data)
            if frame["type"] == "response":
                assert frame["id"] not in got, frame
                got[frame["id"]] = frame["response"]
    return got


async def test_over_websocket_sys_exit_and_keyboard_interrupt_fail_only_their_call(
    tmp_path: Path,
) -> None:
    """A method calling ``sys.exit()`` or raising ``KeyboardInterrupt`` is answered
    ``plugin_error`` naming it, and the server goes on: a call in flight on another
    connection meanwhile is answered, and so are later calls on the same one."""
    async with (
        hostile_server(tmp_path, "--websocket", "--id", "hostile", "--version", "1") as (
            process,
            url,
        ),
        aiohttp.ClientSession() as client,
        client.ws_connect(url) as bystander,
        client.ws_connect(url) as host,
    ):
        for socket in (bystander, host):
            assert orjson.loads((await socket.receive()).data)["type"] == "hello"
        await bystander.send_json({"type": "call", "id": 1, "request": request("slow")})
        methods = ["exit_sync", "exit_async", "kbi_sync", "kbi_async"]
        for call_id, method in enumerate(methods, 1):
            await host.send_json({"type": "call", "id": call_id, "request": request(method)})
        got = await answers(host, set(range(1, len(methods) + 1)))
        for call_id, method in enumerate(methods, 1):
            assert_the_method_s_failure(got[call_id], FAILURES[method])
        assert (await answers(bystander, {1}))[1] == {"ok": True, "result": "slept"}
        await host.send_json({"type": "call", "id": 99, "request": request("ok")})
        assert (await answers(host, {99}))[99] == {"ok": True, "result": "ok"}
        assert process.returncode is None


async def test_over_websocket_every_hostile_failure_gets_exactly_one_answer(
    tmp_path: Path,
) -> None:
    """Each call (and stream) whose method fails in a hostile way is answered once, an
    error envelope naming the exception's class, none left to the host's deadline."""
    async with (
        hostile_server(tmp_path, "--websocket", "--id", "hostile", "--version", "1") as (
            process,
            url,
        ),
        aiohttp.ClientSession() as client,
        client.ws_connect(url) as host,
    ):
        assert orjson.loads((await host.receive()).data)["type"] == "hello"
        ids: dict[int, str] = {}
        for call_id, method in enumerate(UNANSWERED, 1):
            kind = "stream" if method.startswith("agen") else "call"
            await host.send_json({"type": kind, "id": call_id, "request": request(method)})
            ids[call_id] = method
        got = await answers(host, set(ids))
        for call_id, method in ids.items():
            assert_the_method_s_failure(got[call_id], FAILURES[method])
        await host.send_json({"type": "call", "id": 999, "request": request("ok")})
        assert (await answers(host, {999}))[999] == {"ok": True, "result": "ok"}
        assert process.returncode is None
        process.terminate()
        _, said = await asyncio.wait_for(process.communicate(), WAIT)
    assert b"never retrieved" not in said, said.decode(errors="replace")


async def test_over_http_every_hostile_failure_is_a_200_envelope_for_that_call_alone(
    tmp_path: Path,
) -> None:
    """Over HTTP each such call is a 200 with its ``plugin_error`` (not a plain-text 500,
    which the dispatcher would take for ``target_unavailable`` and retry), and in a batch
    it fails only its own item: the good items' results come back."""
    async with (
        hostile_server(tmp_path) as (process, url),
        httpx.AsyncClient(base_url=url, timeout=WAIT) as client,
    ):
        for method, error_type in FAILURES.items():
            answer = await client.post("/invoke", json=request(method))
            assert answer.status_code == 200, (method, answer.status_code, answer.text[:200])
            assert_the_method_s_failure(answer.json(), error_type)
        items = [request("ok"), *(request(method) for method in FAILURES), request("ok")]
        answer = await client.post("/invoke", json={"batch": items})
        assert answer.status_code == 200, answer.text[:200]
        results = answer.json()["results"]
        assert results[0] == results[-1] == {"ok": True, "result": "ok"}
        for method, result in zip(FAILURES, results[1:-1], strict=True):
            assert_the_method_s_failure(result, FAILURES[method])
        assert process.returncode is None


@pytest.mark.parametrize("method", ["cancelled", "sync_cancelled"])
async def test_a_cancelled_error_the_method_raised_is_its_failure_not_a_stop(
    tmp_path: Path, method: str
) -> None:
    """A ``CancelledError`` the method raised itself is that call's failure (not retryable),
    not "the plugin is stopping" (503 ``target_unavailable``, retryable, which invited a
    retry); in a batch the other items are not cancelled with it. A call the server does
    cancel (the client gone) is still cancelled: the server serves on after one."""
    async with (
        hostile_server(tmp_path) as (process, url),
        httpx.AsyncClient(base_url=url, timeout=WAIT) as client,
    ):
        answer = await client.post("/invoke", json=request(method))
        assert answer.status_code == 200, answer.text[:200]
        assert_the_method_s_failure(answer.json(), "CancelledError")
        batch = {"batch": [request("slow", seconds=0.2), request(method), request("ok")]}
        answer = await client.post("/invoke", json=batch)
        assert answer.status_code == 200, answer.text[:200]
        slow, failed, ok = answer.json()["results"]
        assert slow == {"ok": True, "result": "slept"}
        assert_the_method_s_failure(failed, "CancelledError")
        assert ok == {"ok": True, "result": "ok"}
        with pytest.raises(httpx.ReadTimeout):  # the client goes away mid-call
            await client.post("/invoke", json=request("slow", seconds=5), timeout=0.3)
        assert (await client.post("/invoke", json=request("ok"))).json()["result"] == "ok"
        assert process.returncode is None
