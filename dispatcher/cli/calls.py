"""``dispatcher call`` and ``dispatcher health``: calling plugins and probing their targets."""

from __future__ import annotations

from typing import Any

import click
import orjson

from dispatcher._dispatcher import Dispatcher, TargetHealth
from dispatcher._served import listed
from dispatcher.cli._app import (
    EXIT_FAILED,
    Seconds,
    credential_options,
    credentials_from,
    load,
    main,
    manifest_option,
    only_plugin,
    output_option,
    run_or_report,
    run_with_dispatcher,
    table,
    without_audit,
)
from linchkit_plugin.errors import DispatchError
from linchkit_plugin.wire import result_fragment


@main.command()
@click.argument("target", metavar="PLUGIN.METHOD")
@click.option("-p", "--params", default="{}", show_default=True, help="Params as JSON.")
@click.option(
    "--timeout", type=Seconds(0.001, 86_400), default=None, help="Seconds; overrides the method's."
)
@click.option("--caller", default=None, help="Caller identity sent with the call.")
@credential_options
@click.option("--version", "plugin_version", default=None, help="Plugin version (default: latest).")
@manifest_option
@click.pass_context
def call(
    context: click.Context,
    target: str,
    params: str,
    timeout: float | None,
    caller: str | None,
    api_key: str | None,
    token: str | None,
    plugin_version: str | None,
) -> None:
    """Call PLUGIN.METHOD and print its result as JSON.

    Only PLUGIN is started, with the plugins its methods fall back to: another plugin of
    the manifest that is down or slow to start does not hold this call up. With `auth` in
    the manifest, authenticate with --api-key or --token (or DISPATCHER_API_KEY /
    DISPATCHER_TOKEN, which keep the secret out of the shell's history and the process
    list); without it they are not needed and left out.
    """
    plugin, dot, method = target.rpartition(".")
    if not dot or not plugin or not method:
        raise click.UsageError(f"expected PLUGIN.METHOD, got {target!r}")
    try:
        decoded = orjson.loads(params)
    except orjson.JSONDecodeError as error:
        raise click.UsageError(f"--params is not valid JSON: {error}") from None
    manifest = only_plugin(load(context), plugin)
    credentials = credentials_from(manifest, api_key, token)

    async def call_plugin(dispatcher: Dispatcher) -> Any:
        result = await dispatcher.call(
            plugin,
            method,
            decoded,
            timeout=timeout,
            caller=caller,
            credentials=credentials,
            version=plugin_version,
        )
        # An in-process plugin's result came through no wire: what JSON cannot carry (a
        # set was a traceback, a NaN printed as null) is the call's error, as served.
        result_fragment(result)
        return result

    result = run_or_report(context, manifest, call_plugin)
    click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


@main.command()
@manifest_option
@output_option
@click.option(
    "--timeout",
    type=Seconds(0.1, 600),
    default=5.0,
    show_default=True,
    help="Seconds each probe may take before its target counts as not serving.",
)
@click.pass_context
def health(context: click.Context, output: str, timeout: float) -> None:
    """Probe every target (every instance of a fleet); exit 1 if any is not serving, or
    does not serve a method the manifest routes to it.

    STATE is an instance's state in its fleet (healthy, ejected, down, leaving); "-" for a
    target with one instance. It is the fleet of this command's own dispatcher, which has
    just started: every instance begins healthy, so a dead one reads healthy and not
    serving here; a running gateway's view is in its metrics and `dispatcher top`. A
    detail too long for the table is printed whole under it. A fleet's discovery sources (DNS, a registry) get a row each,
    STATE "source", not serving when their last read failed. A target whose plugin says
    (Describe, /describe, its WebSocket hello) it lacks methods routed to it gets a "NOT
    SERVED" line under the table: their calls fail method_not_found.
    """
    manifest = without_audit(load(context))  # a probe is not a call: nothing to record
    try:
        reports = run_with_dispatcher(
            manifest, lambda dispatcher: dispatcher.health(timeout=timeout)
        )
    except DispatchError as error:
        click.echo(f"error: {error}", err=True)
        context.exit(EXIT_FAILED)
    if output == "json":
        entries = [
            {
                "plugin": report.plugin,
                "version": report.version,
                "target": report.target,
                "fleet": report.fleet,
                "state": report.state,
                "source": report.source,
                "status": report.health.status,
                "circuit": report.circuit,
                "latency_ms": report.health.latency_ms,
                "detail": report.health.detail,
                "unenforced": list(report.unenforced),
                "missing_methods": list(report.missing_methods),
            }
            for report in reports
        ]
        click.echo(orjson.dumps(entries, option=orjson.OPT_INDENT_2).decode())
    else:
        table(
            [
                ("PLUGIN", "TARGET", "STATE", "STATUS", "CIRCUIT", "LATENCY", "DETAIL"),
                *map(_health_row, reports),
            ]
        )
        for report in reports:
            for line in _notes_of(report):
                click.echo(f"{report.plugin}@{report.version} {report.target}: {line}")
    if not all(report.ok for report in reports):
        context.exit(EXIT_FAILED)


def _health_row(report: TargetHealth) -> tuple[str, ...]:
    latency = f"{report.health.latency_ms:.1f} ms" if report.health.latency_ms is not None else "-"
    missing = report.missing_methods
    detail = (
        f"lacks {len(missing)} routed method(s): see below" if missing else report.health.detail
    )
    return (
        f"{report.plugin}@{report.version}",
        report.target,
        report.state or "-",
        report.health.status,
        report.circuit or "-",
        latency,
        _cut(detail, DETAIL_WIDTH),
    )


#: Characters of a probe's detail in the table; a longer one is printed whole below it.
DETAIL_WIDTH = 60


def _cut(text: str, width: int) -> str:
    """``text`` in ``width`` characters, cut at a word where it can be, marked with "…"."""
    if len(text) <= width:
        return text
    cut = text[: width - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > width // 2 else cut) + "…"


def _notes_of(report: TargetHealth) -> list[str]:
    """The lines under the table for ``report``: what is not enforced, what is not served."""
    notes = [f"NOT ENFORCED: {line}" for line in report.unenforced]
    detail = report.health.detail
    if not report.health.ok and len(detail) > DETAIL_WIDTH:
        notes.append(f"{report.health.status.upper()}: {detail}")
    if report.missing_methods:
        notes.append(
            f"NOT SERVED: {listed(report.missing_methods)} (the manifest routes here what the"
            " plugin does not serve: calls fail method_not_found)"
        )
    return notes
