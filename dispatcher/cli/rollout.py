"""``dispatcher rollout status|pause|resume|abort``: a running gateway's rollouts.

It reads ``GET /v1/rollouts`` and sends ``POST /v1/rollouts/{plugin}/{method}:{action}``
on the gateway at ``--url``; ``--token`` (a bearer token) or ``--api-key`` authenticate
it like a call. What a rollout is lives in ``dispatcher._rollout``; this only talks HTTP.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import click

from dispatcher.cli._app import EXIT_FAILED, main

#: A gateway that takes longer than this to answer is in trouble: say so, do not wait.
REQUEST_TIMEOUT = 10.0


class GatewayFailed(Exception):
    """The gateway could not be asked, or refused; the message says why, for the user."""


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
_token = click.option(
    "--token", envvar="DISPATCHER_TOKEN", help="Bearer token; env DISPATCHER_TOKEN."
)
_api_key = click.option(
    "--api-key", envvar="DISPATCHER_API_KEY", help="API key; env DISPATCHER_API_KEY."
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
    try:
        answer = asyncio.run(_request("GET", f"{url.rstrip('/')}/v1/rollouts", token, api_key))
    except GatewayFailed as error:
        click.echo(f"error: {error}", err=True)
        context.exit(EXIT_FAILED)
    rollouts: dict[str, Any] = answer.get("rollouts", {})
    if as_json:
        click.echo(json.dumps(rollouts, indent=2))
        return
    if not rollouts:
        click.echo("no rollouts")
    for name, each in sorted(rollouts.items()):
        click.echo(_line(name, each))
        for difference in each.get("recent_differences", ()):
            click.echo(_difference(difference))


def _line(name: str, each: dict[str, Any]) -> str:
    moving = f"{name}  {each['from']} -> {each['to']}"
    if each["kind"] == "shadow":
        return (
            f"{moving}  shadow {each['percent']:g}%  equal {each['equal']}"
            f"  different {each['different']}  failed {each['failed']}  skipped {each['skipped']}"
        )
    window = each["window"]
    p99 = "-" if window["p99_ms"] is None else f"{window['p99_ms']:g} ms"
    line = (
        f"{moving}  {each['status']} {each['percent']:g}%  step {each['step'] + 1}"
        f"  window: {window['errors']}/{window['calls']} failed, p99 {p99}"
    )
    return f"{line}  ({each['reason']})" if each["reason"] else line


def _difference(each: dict[str, Any]) -> str:
    """One of a shadow's recent differences: when, which request (another caller's call:
    ``-``, the gateway shows a request id to its caller only), what kind, how long."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(each["time"]))
    kind = each["kind"].replace("_", " ")
    if each.get("error") is not None:
        kind = f"{kind}: {each['error']}"
    took = f"primary {each['primary_ms']:g} ms, shadow {each['shadow_ms']:g} ms"
    return f"  {when}  {each.get('request_id', '-')}  {kind}  ({took})"


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
        plugin, _, method = name.partition(".")
        if not method:
            raise click.BadParameter("expected PLUGIN.METHOD", param_hint="PLUGIN.METHOD")
        target = f"{url.rstrip('/')}/v1/rollouts/{plugin}/{method}:{action}"
        try:
            answer = asyncio.run(_request("POST", target, token, api_key))
        except GatewayFailed as error:
            click.echo(f"error: {error}", err=True)
            context.exit(EXIT_FAILED)
        click.echo(_line(name, answer["rollout"]))

    return command


pause = _control("pause")
resume = _control("resume")
abort = _control("abort")


async def _request(method: str, url: str, token: str | None, api_key: str | None) -> Any:
    import aiohttp

    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if api_key is not None:
        headers["X-API-Key"] = api_key
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, url, headers=headers, allow_redirects=False) as answer,
        ):
            body = await answer.read()
    except (aiohttp.ClientError, TimeoutError) as error:
        reason = type(error).__name__ if isinstance(error, TimeoutError) else str(error)
        raise GatewayFailed(f"cannot reach {url}: {reason}") from None
    try:
        decoded = json.loads(body)
    except ValueError:
        raise GatewayFailed(f"{url} answered {answer.status} with no JSON") from None
    if answer.status != 200:
        refusal = decoded.get("error", {}) if isinstance(decoded, dict) else {}
        raise GatewayFailed(f"{url} answered {answer.status}: {refusal.get('message', decoded)}")
    return decoded
