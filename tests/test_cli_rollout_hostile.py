"""``dispatcher rollout`` against a gateway that lies, and a user who types what no gateway
takes: every answer that is not the route's is one line and exit 1 (it was an
``AttributeError``, ``KeyError``, ``ValueError`` or ``OverflowError`` traceback), nothing
the gateway sends reaches the terminal as a control character, an endless answer is cut
at ``MAX_ANSWER_BYTES`` (it grew to gigabytes), PLUGIN.METHOD is split at its last dot and
checked before it goes into the URL, and a credential a header cannot carry is a usage
error that does not show it (it was aiohttp's traceback).

The gateway here is an aiohttp app on 127.0.0.1 port 0 in the test's loop, answering
every request with what the test sets; the CLI runs in a thread (``CliRunner``) or, once,
as its own process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from dispatcher.cli import main
from dispatcher.cli.rollout import MAX_ANSWER_BYTES
from tests.conftest import ROOT
from tests.gateway_support import (
    answering_every_request,
    failed_in_one_line,
    no_control_characters,
)


@dataclass
class Asked:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class LyingGateway:
    """Answers every request with ``body`` and ``status`` (an endless body with
    ``endless``, a ``Content-Length`` it never sends with ``declared``); keeps what it was
    asked and how many bytes it sent."""

    url: str = ""
    body: bytes = b'{"rollouts": {}}'
    status: int = 200
    reason: str | None = None
    endless: bool = False
    declared: int | None = None
    asked: list[Asked] = field(default_factory=list)
    sent: int = 0
    closing: asyncio.Event = field(default_factory=asyncio.Event)

    def answer(self, value: Any, status: int = 200, reason: str | None = None) -> None:
        self.body = value if isinstance(value, bytes) else json.dumps(value).encode()
        self.status, self.reason = status, reason

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.asked.append(Asked(request.method, request.raw_path, dict(request.headers)))
        if self.endless or self.declared is not None:
            return await self._stream(request)
        return web.Response(
            body=self.body, status=self.status, reason=self.reason, content_type="application/json"
        )

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse()
        if self.declared is not None:
            answer.content_length = self.declared
        await answer.prepare(request)
        chunk = b"a" * 65536
        with contextlib.suppress(ConnectionError):
            await answer.write(b'{"rollouts": "')
            while self.endless and not self.closing.is_set():
                await answer.write(chunk)
                self.sent += len(chunk)
            await self.closing.wait()  # the declared length is never sent
        return answer


@pytest.fixture
async def gateway() -> AsyncIterator[LyingGateway]:
    lying = LyingGateway()
    async with answering_every_request(lying.handle) as url:
        lying.url = url
        try:
            yield lying
        finally:
            lying.closing.set()


async def rollout(*arguments: str, env: dict[str, str] | None = None) -> Result:
    """``dispatcher rollout ARGUMENTS`` in a thread, the test's loop serving meanwhile."""
    environment = {"DISPATCHER_TOKEN": None, "DISPATCHER_API_KEY": None, **(env or {})}
    return await asyncio.to_thread(
        CliRunner().invoke, main, ["rollout", *arguments], env=environment
    )


SHADOW = {
    "kind": "shadow",
    "from": "1.0.0",
    "to": "2.0.0",
    "percent": 5,
    "equal": 1,
    "different": 2,
    "failed": 0,
    "skipped": 0,
    "recent_differences": [
        {"time": 1_700_000_000, "kind": "result_differs", "primary_ms": 1, "shadow_ms": 2}
    ],
}


def shadow(**changes: Any) -> dict[str, Any]:
    return {"rollouts": {"svc.answer": {**SHADOW, **changes}}}


def difference(**changes: Any) -> dict[str, Any]:
    return shadow(recent_differences=[{**SHADOW["recent_differences"][0], **changes}])


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ([], "the answer is not an object"),  # was AttributeError: 'list' has no 'get'
        ({"rollouts": {"x": {}}}, "rollout x: 'from' is not a string"),  # KeyError 'from'
        ({"rollouts": [1, 2]}, "'rollouts' is not an object"),  # AttributeError 'items'
        ({"error": "nope"}, "'rollouts' is not an object"),  # was "no rollouts", exit 0
        ({"rollouts": {"x": 1}}, "rollout x is not an object"),
        (shadow(percent="NaN"), "'percent' is not a number"),  # ValueError: format code 'g'
        (shadow(equal=True), "'equal' is not a whole number"),
        (shadow(percent=10**400), "'percent' is not a number of a float's range"),
        (shadow(recent_differences={}), "'recent_differences' is not a list"),
        (shadow(recent_differences=["x"]), "a difference is not an object"),
        (difference(time=1e300), "'time' 1e+300 is not a time"),  # OverflowError
        (difference(time=-1), "'time' -1 is not a time"),
        (difference(kind=None), "'kind' is not a string"),
        (
            {"rollouts": {"svc.answer": {**SHADOW, "kind": "rollout", "window": []}}},
            "'window' is not an object",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "answered 200 with no JSON"),  # deeper than Python
        (b"\xff\xfe not JSON", "answered 200 with no JSON"),
    ],
)
async def test_a_listing_that_is_not_one_is_said_in_one_line(
    gateway: LyingGateway, answer: Any, says: str
) -> None:
    gateway.answer(answer)
    result = await rollout("status", "--url", gateway.url)
    assert says in failed_in_one_line(result)


async def test_a_control_answer_that_is_not_a_rollouts_state_is_said_in_one_line(
    gateway: LyingGateway,
) -> None:
    """Any 200 answer to pause was ``KeyError: 'rollout'``."""
    for answer in ({}, {"ok": True, "rollout": []}, {"ok": True, "rollout": {"from": 1}}):
        gateway.answer(answer)
        result = await rollout("pause", "svc.answer", "--url", gateway.url)
        assert "is not a rollout's state" in failed_in_one_line(result)


async def test_a_refusal_in_any_shape_is_said_in_one_line_and_printable(
    gateway: LyingGateway,
) -> None:
    """An error that is not the gateway's envelope was ``AttributeError: 'str' object has
    no attribute 'get'``; an envelope's message was printed with its escape sequences."""
    gateway.answer({"error": "nope"}, status=500, reason="Oops")
    stderr = failed_in_one_line(await rollout("status", "--url", gateway.url))
    assert stderr.endswith('answered 500: {"error": "nope"}\n')
    hostile = "\x1b]0;PWNED\x07\x1b[2J" + "x" * 10_000
    gateway.answer({"error": {"message": hostile}}, status=403)
    stderr = failed_in_one_line(await rollout("abort", "svc.answer", "--url", gateway.url))
    assert "answered 403: \\x1b]0;PWNED\\x07\\x1b[2J" in stderr
    assert no_control_characters(stderr) and len(stderr) < 400


async def test_what_the_gateway_names_reaches_the_terminal_printable(
    gateway: LyingGateway,
) -> None:
    """A rollout's versions, kinds and names were printed as they came: an OSC sequence
    retitled the terminal, a CSI cleared it."""
    escapes = "\x1b]0;PWNED\x07\x1b[2J\x9b"
    listing = shadow(**{"from": f"1{escapes}", "to": "2\r"})
    listing["rollouts"][f"svc{escapes}"] = listing["rollouts"].pop("svc.answer")
    listing["rollouts"][f"svc{escapes}"]["recent_differences"][0].update(
        kind=f"k{escapes}", error=f"e{escapes}", request_id=f"r{escapes}"
    )
    gateway.answer(listing)
    result = await rollout("status", "--url", gateway.url)
    assert result.exit_code == 0, result.output
    assert no_control_characters(result.output), repr(result.output)
    assert "1\\x1b]0;PWNED\\x07\\x1b[2J\\x9b -> 2\\r  shadow 5%" in result.output
    shown_json = await rollout("status", "--json", "--url", gateway.url)
    assert shown_json.exit_code == 0 and no_control_characters(shown_json.output)
    assert json.loads(shown_json.output) == listing["rollouts"]


async def test_an_endless_answer_is_cut_at_the_cap(gateway: LyingGateway) -> None:
    """It was read whole: 3.4 GB before the request's timeout."""
    gateway.endless = True
    stderr = failed_in_one_line(await rollout("status", "--url", gateway.url))
    assert f"answered more than {MAX_ANSWER_BYTES >> 20} MiB" in stderr
    assert gateway.sent < 16 * MAX_ANSWER_BYTES  # what the socket buffers take besides


async def test_a_declared_length_over_the_cap_is_refused_before_reading(
    gateway: LyingGateway,
) -> None:
    """A ``Content-Length`` of a terabyte, never sent: refused at once, not waited for."""
    gateway.declared = 10**12
    stderr = failed_in_one_line(await rollout("resume", "svc.answer", "--url", gateway.url))
    assert f"answered more than {MAX_ANSWER_BYTES >> 20} MiB" in stderr


async def test_plugin_method_is_split_at_its_last_dot(gateway: LyingGateway) -> None:
    """A plugin id may hold dots (``dispatcher call`` splits at the last one): ``my.plugin.
    say`` was plugin ``my``, method ``plugin.say``."""
    gateway.answer({"ok": True, "rollout": SHADOW})
    result = await rollout("pause", "my.plugin.say", "--url", gateway.url)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("my.plugin.say  1.0.0 -> 2.0.0  shadow 5%")
    assert [(asked.method, asked.path) for asked in gateway.asked] == [
        ("POST", "/v1/rollouts/my.plugin/say:pause")
    ]


@pytest.mark.parametrize(
    "name",
    [
        "a.b/../../../x",  # was POST /v1/x:pause
        "echo.say#frag",  # was POST /v1/rollouts/echo/say: the action lost
        "echo.say?x=1",
        "echo.s%61y",
        "echo.say\n",
        "echo.s ay",
        "ec/ho.say",
        "1echo.say",
        "echo.",
        ".say",
        "nodot",
        "echo." + "s" * 257,
    ],
)
async def test_what_cannot_be_a_plugin_id_or_method_is_a_usage_error(
    gateway: LyingGateway, name: str
) -> None:
    result = await rollout("pause", name, "--url", gateway.url)
    stderr = failed_in_one_line(result, code=2)
    assert "PLUGIN.METHOD" in stderr and name.strip() not in stderr
    assert gateway.asked == []


async def test_a_credential_pasted_with_its_line_break_goes_without_it(
    gateway: LyingGateway,
) -> None:
    result = await rollout(
        "status", "--url", gateway.url, "--api-key", "key\r\n", env={"DISPATCHER_TOKEN": "abc\n"}
    )
    assert result.exit_code == 0, result.output
    assert gateway.asked[0].headers["Authorization"] == "Bearer abc"
    assert gateway.asked[0].headers["X-API-Key"] == "key"


@pytest.mark.parametrize(
    ("arguments", "env", "named"),
    [
        ((), {"DISPATCHER_TOKEN": "abc\nsecret"}, "(from DISPATCHER_TOKEN)"),
        ((), {"DISPATCHER_API_KEY": "secret\x7f"}, "(from DISPATCHER_API_KEY)"),
        (("--token", "a\x1bsecret"), {}, "'--token'"),
        (("--api-key", "secret\tkey"), {}, "'--api-key'"),
        (("--token", "\n"), {}, "'--token'"),
    ],
)
async def test_a_credential_no_header_can_carry_is_a_usage_error_that_does_not_show_it(
    gateway: LyingGateway, arguments: tuple[str, ...], env: dict[str, str], named: str
) -> None:
    """It was aiohttp's ``ValueError: Forbidden control character detected in headers``."""
    result = await rollout("status", "--url", gateway.url, *arguments, env=env)
    stderr = failed_in_one_line(result, code=2)
    assert named in stderr and "control character" in stderr
    assert "secret" not in result.output
    assert gateway.asked == []


@pytest.mark.parametrize("url", ["garbage", "ftp://127.0.0.1:1", "http://h:1/?q=1", "http://"])
async def test_a_url_that_is_no_gateways_is_a_usage_error(url: str) -> None:
    """It was ``error: cannot reach garbage/v1/rollouts``, exit 1, as if a gateway were down."""
    for arguments in (("status",), ("abort", "svc.answer")):
        stderr = failed_in_one_line(await rollout(*arguments, "--url", url), code=2)
        assert "--url: " in stderr


async def test_the_command_itself_says_a_lie_in_one_line(gateway: LyingGateway) -> None:
    """The real executable, in its own process: no traceback, nothing raw on stderr."""
    gateway.answer(difference(time=1e300, kind="\x1b]0;PWNED\x07"))
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'sdk' / 'python'}"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher.cli", "rollout", "status", "--url", gateway.url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1, err.decode()
    assert out == b""
    assert err.decode() == (
        "error: the gateway answered something that is not a rollout listing:"
        " rollout svc.answer: 'time' 1e+300 is not a time of the years 1970 to 9999\n"
    )
