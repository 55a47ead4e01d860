"""``dispatcher rollout status|pause|resume|abort``: a running gateway's rollouts.

It reads ``GET /v1/rollouts`` and sends ``POST /v1/rollouts/{plugin}/{method}:{action}``
on the gateway at ``--url``; ``--token`` (a bearer token) or ``--api-key`` authenticate
it like a call. What a rollout is lives in ``dispatcher._rollout``; this only talks HTTP.

The gateway's answers are read as a peer's: an answer larger than ``MAX_ANSWER_BYTES``,
not JSON, or not shaped as the route's answer is an error (``GatewayFailed``, exit 1)
naming what is wrong with it, never a traceback; every string of it that is shown is
made printable first, so a gateway cannot write escape sequences to the terminal.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import click

from dispatcher.cli._app import EXIT_FAILED, credential, main
from dispatcher.cli._gateway_client import AnswerTooLarge, capped_body, check_gateway_url
from dispatcher.config.manifest import IDENTIFIER
from providers._log_lines import printable

if TYPE_CHECKING:  # imported when a request is sent: ``dispatcher --help`` does without it
    import aiohttp

#: A gateway that takes longer than this to answer is in trouble: say so, do not wait.
REQUEST_TIMEOUT = 10.0

#: The largest answer read. A rollout's stats are about 1.5 KiB (its counters and five
#: recent differences): 4 MiB is some two thousand rollouts, far more than a manifest
#: holds, and a gateway that sends more is not answering this route.
MAX_ANSWER_BYTES = 4 * 1024 * 1024

#: The longest plugin id or method name sent: the gateway refuses longer ones.
_MOST_NAME_CHARACTERS = 256

#: How much of a gateway's refusal, or of a name it sent, an error message quotes.
_QUOTED_CHARACTERS = 200

#: How an answer that is not the route's is told (a rollout listing, a rollout's state).
_UNEXPECTED = "the gateway answered something that is not"

#: The last second ``time.gmtime`` shows as a four-digit year (9999-12-31T23:59:59Z).
_LAST_SHOWN_TIME = 253_402_300_799


class GatewayFailed(Exception):
    """The gateway could not be asked, refused, or answered something else than the
    route's answer; the message says why, for the user."""


class _NotTheAnswer(Exception):
    """A part of an answer is not what the route answers; the message names the part."""


@main.group()
def rollout() -> None:
    """Watch and steer the rollouts of a running gateway (the manifest's ``rollouts:``)."""


_url = click.option(
    "--url",
    default="http://127.0.0.1:8080",
    show_default=True,
    envvar="DISPATCHER_URL",
    help="The gateway (dispatcher serve); env DISPATCHER_URL.",
)
# Checked as every command's credentials are: a header cannot carry a control character
# (aiohttp's traceback), and a token pasted with its line break is meant without it.
_token = click.option(
    "--token",
    envvar="DISPATCHER_TOKEN",
    callback=credential,
    help="Bearer token; env DISPATCHER_TOKEN.",
)
_api_key = click.option(
    "--api-key",
    envvar="DISPATCHER_API_KEY",
    callback=credential,
    help="API key; env DISPATCHER_API_KEY.",
)


@rollout.command()
@_url
@_token
@_api_key
@click.option("--json", "as_json", is_flag=True, help="Print the gateway's JSON as it is.")
@click.pass_context
def status(
    context: click.Context, url: str, token: str | None, api_key: str | None, as_json: bool
) -> None:
    """Each rollout's step, share of calls on the new version, failures; each shadow's
    comparisons and its recent differences (when, which request, what kind, how long)."""
    gateway, headers = _connection(url, token, api_key)
    try:
        answer = asyncio.run(_request("GET", f"{gateway}/v1/rollouts", headers))
        shown = _shown(answer, as_json)
    except GatewayFailed as error:
        click.echo(f"error: {error}", err=True)
        context.exit(EXIT_FAILED)
    for line in shown:
        click.echo(line)


def _control(action: str) -> Any:
    @rollout.command(name=action, help=f"{action.capitalize()} the rollout of PLUGIN.METHOD.")
    @click.argument("name", metavar="PLUGIN.METHOD")
    @_url
    @_token
    @_api_key
    @click.pass_context
    def command(
        context: click.Context, name: str, url: str, token: str | None, api_key: str | None
    ) -> None:
        plugin, method = _plugin_and_method(name)
        gateway, headers = _connection(url, token, api_key)
        target = f"{gateway}/v1/rollouts/{quote(plugin, safe='')}/{quote(method, safe='')}"
        try:
            answer = asyncio.run(_request("POST", f"{target}:{action}", headers))
            line = _controlled(name, answer)
        except GatewayFailed as error:
            click.echo(f"error: {error}", err=True)
            context.exit(EXIT_FAILED)
        click.echo(line)

    return command


pause = _control("pause")
resume = _control("resume")
abort = _control("abort")


# -- what the user gives -----------------------------------------------------------------


def _plugin_and_method(name: str) -> tuple[str, str]:
    """PLUGIN.METHOD split at its last dot, as ``dispatcher call`` splits it: a plugin id
    may hold dots, a method named here may not. Neither is quoted back: what was typed in
    its place may be anything pasted there."""
    plugin, dot, method = name.rpartition(".")
    if not dot:
        raise click.BadParameter("expected PLUGIN.METHOD", param_hint="PLUGIN.METHOD")
    for part, text in (("plugin id", plugin), ("method name", method)):
        if len(text) > _MOST_NAME_CHARACTERS or not re.fullmatch(IDENTIFIER, text):
            raise click.BadParameter(
                f"the {part} is not one a manifest can hold: a letter, then letters, digits,"
                f" '_', '.' or '-', at most {_MOST_NAME_CHARACTERS}",
                param_hint="PLUGIN.METHOD",
            )
    return plugin, method


def _connection(url: str, token: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    """The gateway's URL, checked before any connection (a usage error otherwise), and the
    headers that authenticate to it."""
    try:
        gateway = check_gateway_url(url)
    except ValueError as error:
        raise click.UsageError(f"--url: {error}") from None
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if api_key is not None:
        headers["X-API-Key"] = api_key
    return gateway, headers


# -- what the gateway answers ------------------------------------------------------------


async def _request(method: str, url: str, headers: dict[str, str]) -> Any:
    """The JSON the gateway answered with 200; ``GatewayFailed`` for anything else."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, url, headers=headers, allow_redirects=False) as answer,
        ):
            body = await _read_capped(answer, url)
    except (aiohttp.ClientError, TimeoutError) as error:
        reason = type(error).__name__ if isinstance(error, TimeoutError) else str(error)
        raise GatewayFailed(f"cannot reach {url}: {printable(reason)}") from None
    try:
        decoded = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python goes
        raise GatewayFailed(f"{url} answered {answer.status} with no JSON") from None
    if answer.status != 200:
        raise GatewayFailed(f"{url} answered {answer.status}: {_refusal(decoded)}")
    return decoded


async def _read_capped(answer: aiohttp.ClientResponse, url: str) -> bytes:
    try:
        return await capped_body(answer, MAX_ANSWER_BYTES)
    except AnswerTooLarge:
        most = MAX_ANSWER_BYTES >> 20
        raise GatewayFailed(
            f"{url} answered more than {most} MiB: not a rollout's answer"
        ) from None


def _refusal(decoded: Any) -> str:
    """The message of the gateway's error envelope, or (another server's) its JSON."""
    error = decoded.get("error") if isinstance(decoded, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        message = json.dumps(decoded)
    return _quoted(message)


def _quoted(text: str) -> str:
    cut = text if len(text) <= _QUOTED_CHARACTERS else f"{text[:_QUOTED_CHARACTERS]}…"
    return printable(cut)


def _shown(answer: Any, as_json: bool) -> list[str]:
    """The lines ``status`` prints of the gateway's listing."""
    try:
        rollouts = _listing(answer)
        # ``json.dumps`` escapes every control character (``ensure_ascii``).
        return [json.dumps(rollouts, indent=2)] if as_json else _lines(rollouts)
    except _NotTheAnswer as error:
        raise GatewayFailed(f"{_UNEXPECTED} a rollout listing: {error}") from None


def _controlled(name: str, answer: Any) -> str:
    """The line of the rollout in ``{"ok": true, "rollout": stats}``."""
    try:
        stats = _object(_object(answer, "the answer").get("rollout"), "'rollout'")
        return _line(name, stats)
    except _NotTheAnswer as error:
        raise GatewayFailed(f"{_UNEXPECTED} a rollout's state: {error}") from None


def _listing(answer: Any) -> dict[str, dict[str, Any]]:
    """``{"rollouts": {name: stats}}``, each stats an object."""
    rollouts = _object(answer, "the answer").get("rollouts")
    listed = _object(rollouts, "'rollouts'")
    for name, each in listed.items():
        _object(each, f"rollout {_quoted(name)}")
    return listed


def _lines(rollouts: dict[str, dict[str, Any]]) -> list[str]:
    if not rollouts:
        return ["no rollouts"]
    shown = []
    for name, each in sorted(rollouts.items()):
        try:
            shown.append(_line(printable(name), each))
            differences = each.get("recent_differences", [])
            if not isinstance(differences, list):
                raise _NotTheAnswer("'recent_differences' is not a list")
            shown.extend(
                _difference(_object(difference, "a difference")) for difference in differences
            )
        except _NotTheAnswer as error:
            raise _NotTheAnswer(f"rollout {_quoted(name)}: {error}") from None
    return shown


def _line(name: str, each: dict[str, Any]) -> str:
    moving = f"{name}  {_text(each, 'from')} -> {_text(each, 'to')}"
    if _text(each, "kind") == "shadow":
        return (
            f"{moving}  shadow {_number(each, 'percent'):g}%  equal {_count(each, 'equal')}"
            f"  different {_count(each, 'different')}  failed {_count(each, 'failed')}"
            f"  skipped {_count(each, 'skipped')}"
        )
    window = _object(each.get("window"), "'window'")
    p99 = "-" if window.get("p99_ms") is None else f"{_number(window, 'p99_ms'):g} ms"
    line = (
        f"{moving}  {_text(each, 'status')} {_number(each, 'percent'):g}%"
        f"  step {_count(each, 'step') + 1}"
        f"  window: {_count(window, 'errors')}/{_count(window, 'calls')} failed, p99 {p99}"
    )
    reason = None if each.get("reason") is None else _text(each, "reason")
    return f"{line}  ({reason})" if reason else line


def _difference(each: dict[str, Any]) -> str:
    """One of a shadow's recent differences: when, which request (another caller's call:
    ``-``, the gateway shows a request id to its caller only), what kind, how long."""
    seconds = _number(each, "time")
    if not 0 <= seconds <= _LAST_SHOWN_TIME:  # NaN too
        raise _NotTheAnswer(f"'time' {seconds:g} is not a time of the years 1970 to 9999")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
    kind = _text(each, "kind").replace("_", " ")
    if each.get("error") is not None:
        kind = f"{kind}: {_text(each, 'error')}"
    took = f"primary {_number(each, 'primary_ms'):g} ms, shadow {_number(each, 'shadow_ms'):g} ms"
    request = "-" if "request_id" not in each else _text(each, "request_id")
    return f"  {when}  {request}  {kind}  ({took})"


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _NotTheAnswer(f"{what} is not an object")
    return value


def _text(record: dict[str, Any], key: str) -> str:
    """``record[key]``, a string, printable."""
    value = record.get(key)
    if not isinstance(value, str):
        raise _NotTheAnswer(f"{key!r} is not a string")
    return printable(value)


def _count(record: dict[str, Any], key: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _NotTheAnswer(f"{key!r} is not a whole number")
    return value


def _number(record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _NotTheAnswer(f"{key!r} is not a number")
    try:
        return float(value)  # an integer of 400 digits is none ``:g`` can show
    except OverflowError:
        raise _NotTheAnswer(f"{key!r} is not a number of a float's range") from None
