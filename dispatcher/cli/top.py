"""``dispatcher top``: what a running gateway's plugins are doing, refreshed each second.

It reads the gateway's ``/metrics`` (``telemetry: {metrics: {enabled: true}}`` in its
manifest) every ``--interval`` and shows, per plugin method, calls per second, the share
that failed, p50 and p99 over the last interval and the cache's hit ratio, then the
breakers that are not closed and each fleet instance's state. The figures come from
``dispatcher.telemetry.snapshot``; this module only fetches and draws. ``--once`` takes
two scrapes an interval apart, prints one view and exits: for scripts and for a terminal
that is not one. A gateway that serves its metrics on an admin listener
(``telemetry.metrics.listen``) is read there (``--url`` its address; over HTTPS, a
private CA is trusted through ``SSL_CERT_FILE``); one that requires a scrape token
(``token_env``, ``token_file``) is sent it from the variable ``--token-env`` names or the
file ``--token-file`` names (read again at each scrape, so a rotation is followed), never
from the command line, where any user of the machine could read it.

What the gateway answers is read as a peer's: at most ``MAX_SCRAPE_BYTES``, UTF-8, the
dispatcher's families with their labels; anything else ends ``top`` with one line saying
what (exit 1). Every name it sends is shown printable: a label value cannot write escape
sequences to the terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dispatcher.cli._app import EXIT_FAILED, EXIT_USAGE, Seconds, main
from dispatcher.cli._gateway_client import AnswerTooLarge, capped_body, check_gateway_url
from dispatcher.config.files import read_capped
from dispatcher.telemetry.snapshot import MethodRow, Sample, method_rows
from providers._log_lines import printable

if TYPE_CHECKING:  # imported when the watch starts: ``dispatcher --help`` does without it
    import aiohttp

#: A scrape that takes longer than this is a gateway in trouble: say so, do not wait.
SCRAPE_TIMEOUT = 5.0
#: The most of a token file read (the gateway's own cap: a token is tens of bytes).
_MOST_TOKEN_BYTES = 4096
#: The largest scrape read. A plugin method adds about 2 KiB to a gateway's exposition
#: (its calls by outcome, 15 latency buckets, its cache counters) over 11 KiB of families
#: every gateway has: 8 MiB is some four thousand methods, more than a manifest holds. A
#: gateway that sends more is not sending its metrics, and parsing it would take seconds.
MAX_SCRAPE_BYTES = 8 * 1024 * 1024


class ScrapeFailed(Exception):
    """The gateway could not be read; the message says why, for the user."""


@main.command()
@click.option(
    "--url",
    default="http://127.0.0.1:8080",
    show_default=True,
    envvar="DISPATCHER_URL",
    help="The gateway (dispatcher serve) to watch, or its admin listener"
    " (telemetry.metrics.listen); env DISPATCHER_URL.",
)
@click.option(
    "--token-env",
    metavar="NAME",
    default=None,
    help="Send the bearer token in this environment variable (the gateway's"
    " telemetry.metrics.token_env).",
)
@click.option(
    "--token-file",
    metavar="PATH",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Send the bearer token in this file (a trailing newline stripped), read again at"
    " each scrape (the gateway's telemetry.metrics.token_file).",
)
@click.option(
    "--interval",
    type=Seconds(min=0.2, max=60),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes (and the window rates are computed over).",
)
@click.option("--once", is_flag=True, help="Print one view (two scrapes apart) and exit.")
@click.pass_context
def top(
    context: click.Context,
    url: str,
    token_env: str | None,
    token_file: Path | None,
    interval: float,
    once: bool,
) -> None:
    """Watch a running gateway: rate, errors, p50/p99, cache and breakers per method."""
    try:
        gateway = check_gateway_url(url)
    except ValueError as error:
        raise click.UsageError(f"--url: {error}") from None
    if token_env is not None and token_file is not None:
        click.echo("error: --token-env or --token-file: one of them, not both", err=True)
        context.exit(EXIT_USAGE)
    headers: Callable[[], dict[str, str]] = dict
    if token_env is not None:
        try:  # named, never shown
            token = _checked_token(
                os.environ.get(token_env, ""), "the variable", empty="is unset or empty"
            )
        except ValueError as error:
            click.echo(f"error: --token-env {token_env}: {error}", err=True)
            context.exit(EXIT_USAGE)
        bearer = {"Authorization": f"Bearer {token}"}

        def headers() -> dict[str, str]:
            return bearer
    elif token_file is not None:
        try:
            headers = _FileToken(token_file).headers
        except ValueError as error:  # names the file, never its content
            click.echo(f"error: --token-file {token_file}: {error}", err=True)
            context.exit(EXIT_USAGE)
    try:
        asyncio.run(_watch(gateway, interval, once, headers))
    except ScrapeFailed as error:
        click.echo(f"error: {error}", err=True)
        context.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        pass


class _FileToken:
    """The token in a file, read again at each scrape; the last one read while it holds
    none (being rewritten). ``ValueError`` from the first read, naming what is wrong."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._token = self._read()

    def _read(self) -> str:
        try:  # a file only: a FIFO there waited for a writer for ever
            content = read_capped(self._path, _MOST_TOKEN_BYTES, pipe_wait=None)
        except OSError as error:
            raise ValueError(f"the file cannot be read ({error.strerror or error})") from None
        if len(content) > _MOST_TOKEN_BYTES:
            raise ValueError(f"the file holds more than {_MOST_TOKEN_BYTES} bytes: not a token")
        try:
            text = content.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("the token in the file is not ASCII") from None
        return _checked_token(text, "the file")

    def headers(self) -> dict[str, str]:
        # The last token read while the file holds none: the gateway still takes it.
        with contextlib.suppress(ValueError):
            self._token = self._read()
        return {"Authorization": f"Bearer {self._token}"}


def _checked_token(text: str, where: str, *, empty: str = "is empty") -> str:
    """``text`` without the line break a copy-paste or an editor leaves after it; a
    ``ValueError`` naming ``where`` (never quoting the token) if nothing is left (saying
    ``empty``), it is not ASCII or it holds another control character, which no header
    may carry (aiohttp refused it with a traceback)."""
    token = text.rstrip("\r\n")
    if not token:
        raise ValueError(f"{where} {empty}")
    if not token.isascii():
        raise ValueError(f"the token in {where} is not ASCII")
    if not token.isprintable():
        raise ValueError(f"the token in {where} holds a control character")
    return token


async def _watch(
    url: str, interval: float, once: bool, headers: Callable[[], dict[str, str]]
) -> None:
    import aiohttp
    from rich.console import Console
    from rich.live import Live

    console = Console()
    timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        before = await _scrape(session, url, headers())
        await asyncio.sleep(interval)
        now = await _scrape(session, url, headers())
        if once:
            console.print(view(url, before, now))
            return
        with Live(view(url, before, now), console=console, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(interval)
                before, now = now, await _scrape(session, url, headers())
                live.update(view(url, before, now), refresh=True)


async def _scrape(session: Any, url: str, headers: dict[str, str]) -> Sample:
    import aiohttp

    try:
        async with session.get(f"{url}/metrics", headers=headers, allow_redirects=False) as answer:
            if answer.status == 404:
                raise ScrapeFailed(
                    f"{url} serves no /metrics: enable telemetry.metrics in its manifest, or"
                    " point --url at its admin listener (telemetry.metrics.listen)"
                )
            if answer.status == 401:
                raise ScrapeFailed(
                    f"{url}/metrics needs the scrape token (telemetry.metrics.token_env):"
                    " --token-env NAME of a variable holding it, or --token-file PATH"
                )
            if answer.status != 200:
                raise ScrapeFailed(f"{url}/metrics answered {answer.status}")
            body = await _read_capped(answer, url)
    except (aiohttp.ClientError, TimeoutError) as error:
        reason = type(error).__name__ if isinstance(error, TimeoutError) else str(error)
        raise ScrapeFailed(f"cannot read {url}/metrics: {printable(reason)}") from None
    return _sample(body, url)


async def _read_capped(answer: aiohttp.ClientResponse, url: str) -> bytes:
    try:
        return await capped_body(answer, MAX_SCRAPE_BYTES)
    except AnswerTooLarge:
        most = MAX_SCRAPE_BYTES >> 20
        raise ScrapeFailed(
            f"{url}/metrics answered more than {most} MiB: not its metrics"
        ) from None


def _sample(body: bytes, url: str) -> Sample:
    """The families of a scrape: the exposition format is UTF-8, whatever the answer's
    ``Content-Type`` claims, and each family ``top`` shows has its labels."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ScrapeFailed(f"{url}/metrics is not UTF-8 text (byte {error.start})") from None
    try:
        return Sample.parse(text, time.monotonic())
    except KeyError as error:  # a family the dispatcher labels, without one of them
        raise ScrapeFailed(
            f"{url}/metrics is not a dispatcher's metrics: a sample lacks the label"
            f" {printable(str(error))}"
        ) from None
    except ValueError as error:
        reason = printable(str(error)[:200])
        raise ScrapeFailed(f"{url}/metrics is not a Prometheus exposition: {reason}") from None


def view(url: str, before: Sample, now: Sample) -> Any:
    """The whole screen: methods, then breakers and instances when there are any."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    # Every name here comes from the manifest or the gateway: a fleet's name lists its
    # instances in brackets, which rich would take for markup and drop. Cells are Text
    # (never parsed) or escaped, and printable: a label value's escape sequences would
    # rewrite the operator's terminal.
    title = f"{escape(printable(url))}   in flight {now.in_flight:g}"
    methods = Table(title=title, title_justify="left")
    for heading in ("PLUGIN", "METHOD", "CALLS/S", "ERRORS", "P50", "P99", "CACHE HITS"):
        methods.add_column(heading, justify="left" if heading in ("PLUGIN", "METHOD") else "right")
    for row in method_rows(before, now):
        methods.add_row(*(Text(printable(cell)) for cell in _cells(row)))
    parts: list[Any] = [methods]
    open_breakers = {target: state for target, state in now.breakers.items() if state != "closed"}
    if open_breakers:
        breakers = Table(title="breakers not closed", title_justify="left")
        breakers.add_column("TARGET")
        breakers.add_column("STATE")
        for target, state in sorted(open_breakers.items()):
            shown = Text(printable(state), style="red" if state == "open" else "")
            breakers.add_row(Text(printable(target)), shown)
        parts.append(breakers)
    if now.instances:
        instances = Table(title="fleet instances", title_justify="left")
        for heading in ("FLEET", "INSTANCE", "STATE"):
            instances.add_column(heading)
        for (fleet, instance), state in sorted(now.instances.items()):
            shown = Text(printable(state), style="" if state == "healthy" else "yellow")
            instances.add_row(Text(printable(fleet)), Text(printable(instance)), shown)
        parts.append(instances)
    return Group(*parts)


def _cells(row: MethodRow) -> tuple[str, ...]:
    return (
        row.plugin,
        row.method,
        f"{row.calls_per_s:.1f}",
        "-" if row.error_ratio is None else f"{row.error_ratio:.1%}",
        _duration(row.p50_s),
        _duration(row.p99_s),
        "-" if row.cache_hit_ratio is None else f"{row.cache_hit_ratio:.0%}",
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"
