"""``dispatcher top`` against a gateway that lies, and a user who types what no gateway
takes: a scrape that is not UTF-8 or lacks a label the view reads is one line and exit 1
(it was a ``UnicodeDecodeError`` or ``KeyError`` traceback), label values reach the
terminal printable (escape sequences went through), an endless scrape is cut at
``MAX_SCRAPE_BYTES`` (it grew to gigabytes), and a URL or token no request can carry is
a usage error (the token one a traceback from aiohttp).

The gateway here is an aiohttp app on 127.0.0.1 port 0 in the test's loop, answering
``/metrics`` with what the test sets; the CLI runs in a thread (``CliRunner``) or, once,
as its own process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from dispatcher.cli import main
from dispatcher.cli.top import MAX_SCRAPE_BYTES
from tests.conftest import ROOT
from tests.gateway_support import (
    answering_every_request,
    failed_in_one_line,
    no_control_characters,
)

CALLS = "# TYPE dispatcher_calls_total counter\ndispatcher_calls_total{{{labels}}} 5\n"
BREAKERS = "# TYPE dispatcher_breaker_state gauge\ndispatcher_breaker_state{{{labels}}} 1\n"
INSTANCES = (
    "# TYPE dispatcher_fleet_instance_state gauge\ndispatcher_fleet_instance_state{{{labels}}} 1\n"
)
#: What no terminal may be sent raw: an OSC that retitles it, a CSI that clears it, BEL,
#: and C1's CSI.
ESCAPES = "\x1b]0;PWNED\x07\x1b[2J\x9b"


@dataclass
class LyingGateway:
    """Answers every request with ``body`` (an endless one with ``endless``); keeps the
    ``Authorization`` headers it was sent and how many bytes it sent."""

    url: str = ""
    body: bytes = b""
    endless: bool = False
    authorizations: list[str | None] = field(default_factory=list)
    sent: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.authorizations.append(request.headers.get("Authorization"))
        if not self.endless:
            return web.Response(body=self.body, content_type="text/plain", charset="utf-8")
        answer = web.StreamResponse()
        await answer.prepare(request)
        chunk = b"#" * 65536
        with contextlib.suppress(ConnectionError):
            while True:
                await answer.write(chunk)
                self.sent += len(chunk)
        return answer


@pytest.fixture
async def gateway() -> AsyncIterator[LyingGateway]:
    lying = LyingGateway()
    async with answering_every_request(lying.handle) as url:
        lying.url = url
        yield lying


async def top(*arguments: str, env: dict[str, str | None] | None = None) -> Result:
    """``dispatcher top --once`` (two scrapes 0.2 s apart) in a thread, the test's loop
    serving meanwhile."""
    return await asyncio.to_thread(
        CliRunner().invoke, main, ["top", "--once", "--interval", "0.2", *arguments], env=env
    )


async def test_a_scrape_that_is_not_utf8_is_said_in_one_line(gateway: LyingGateway) -> None:
    """It was ``UnicodeDecodeError`` from ``answer.text()``."""
    gateway.body = b"# \xff\xfe bad\ndispatcher_calls_in_flight 1\n"
    stderr = failed_in_one_line(await top("--url", gateway.url))
    assert stderr == f"error: {gateway.url}/metrics is not UTF-8 text (byte 2)\n"


@pytest.mark.parametrize(
    ("body", "label"),
    [
        (CALLS.format(labels='outcome="ok"'), "'plugin'"),
        (CALLS.format(labels='plugin="p",outcome="ok"'), "'method'"),
        (CALLS.format(labels='plugin="p",method="m"'), "'outcome'"),
        (BREAKERS.format(labels='state="open"'), "'target'"),
        (INSTANCES.format(labels='fleet="f",state="down"'), "'instance'"),
    ],
    ids=["calls-plugin", "calls-method", "calls-outcome", "breaker-target", "fleet-instance"],
)
async def test_a_family_without_its_labels_is_said_in_one_line(
    gateway: LyingGateway, body: str, label: str
) -> None:
    """It was ``KeyError`` out of ``Sample.parse``."""
    gateway.body = body.encode()
    stderr = failed_in_one_line(await top("--url", gateway.url))
    assert f"is not a dispatcher's metrics: a sample lacks the label {label}" in stderr


async def test_label_values_reach_the_terminal_printable(gateway: LyingGateway) -> None:
    """Every cell was a rich ``Text`` of the label as it came: escape sequences went to
    the terminal as they were (a retitled, cleared terminal)."""
    gateway.body = (
        CALLS.format(labels=f'plugin="p{ESCAPES}",method="m{ESCAPES}",outcome="ok"')
        + BREAKERS.format(labels=f'target="t{ESCAPES}",state="open{ESCAPES}"')
        + INSTANCES.format(labels=f'fleet="f{ESCAPES}",instance="i{ESCAPES}",state="s{ESCAPES}"')
    ).encode()
    result = await top("--url", gateway.url, env={"COLUMNS": "400"})  # no cell cut short
    assert result.exit_code == 0, result.output
    assert no_control_characters(result.output), repr(result.output)
    for name in ("p", "m", "t", "open", "f", "i", "s"):
        assert f"{name}\\x1b]0;PWNED\\x07\\x1b[2J\\x9b" in result.output, name


async def test_an_endless_scrape_is_cut_at_the_cap(gateway: LyingGateway) -> None:
    """It was read whole: 2.2 GB in 5 s, then the scrape's timeout."""
    gateway.endless = True
    stderr = failed_in_one_line(await top("--url", gateway.url))
    assert f"answered more than {MAX_SCRAPE_BYTES >> 20} MiB: not its metrics" in stderr
    assert gateway.sent < 8 * MAX_SCRAPE_BYTES  # what the socket buffers take besides


@pytest.mark.parametrize("url", ["garbage", "ftp://127.0.0.1:1", "http://h:1/?q=1", "http://"])
async def test_a_url_that_is_no_gateways_is_a_usage_error(url: str) -> None:
    """It was ``error: cannot read garbage/metrics``, exit 1, as if a gateway were down."""
    stderr = failed_in_one_line(await top("--url", url), code=2)
    assert "--url: " in stderr


async def test_a_token_pasted_with_its_line_break_goes_without_it(
    gateway: LyingGateway, tmp_path: Path
) -> None:
    gateway.body = CALLS.format(labels='plugin="p",method="m",outcome="ok"').encode()
    result = await top("--url", gateway.url, "--token-env", "TOP_TOKEN", env={"TOP_TOKEN": "a\r\n"})
    assert result.exit_code == 0, result.output
    token_file = tmp_path / "token"
    token_file.write_text("b\n")
    result = await top("--url", gateway.url, "--token-file", str(token_file))
    assert result.exit_code == 0, result.output
    assert gateway.authorizations == ["Bearer a"] * 2 + ["Bearer b"] * 2


@pytest.mark.parametrize("token", ["a\r\nsecret", "secret\x1b[2J", "secret\tkey", "\x7fsecret"])
async def test_a_token_no_header_can_carry_is_a_usage_error_that_does_not_show_it(
    gateway: LyingGateway, tmp_path: Path, token: str
) -> None:
    """It was aiohttp's ``ValueError: Forbidden control character detected in headers``,
    from the variable as from the file."""
    result = await top("--url", gateway.url, "--token-env", "TOP_TOKEN", env={"TOP_TOKEN": token})
    stderr = failed_in_one_line(result, code=2)
    assert stderr == (
        "error: --token-env TOP_TOKEN: the token in the variable holds a control character\n"
    )
    token_file = tmp_path / "token"
    token_file.write_text(token, newline="")
    result = await top("--url", gateway.url, "--token-file", str(token_file))
    stderr = failed_in_one_line(result, code=2)
    assert stderr.endswith(": the token in the file holds a control character\n")
    assert "secret" not in stderr
    assert gateway.authorizations == []


async def test_a_token_file_that_is_a_fifo_is_refused_not_waited_on(
    gateway: LyingGateway, tmp_path: Path
) -> None:
    # It was opened as a file: a FIFO nobody writes to held `top` for ever.
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    result = await asyncio.wait_for(top("--url", gateway.url, "--token-file", str(fifo)), 30)
    stderr = failed_in_one_line(result, code=2)
    assert "not a regular file (a FIFO)" in stderr, stderr
    assert gateway.authorizations == []


async def test_the_command_itself_says_a_lie_in_one_line(gateway: LyingGateway) -> None:
    """The real executable, in its own process: no traceback."""
    gateway.body = BREAKERS.format(labels='state="open"').encode()
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'sdk' / 'python'}"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher.cli", "top", "--once", "--interval", "0.2",
        "--url", gateway.url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1, err.decode()
    assert out == b""
    assert err.decode() == (
        f"error: {gateway.url}/metrics is not a dispatcher's metrics:"
        " a sample lacks the label 'target'\n"
    )
