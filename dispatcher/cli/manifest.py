"""``dispatcher validate`` and ``dispatcher list``: what the manifest says."""

from __future__ import annotations

import click
import orjson

from dispatcher.cli._app import load, main, manifest_option, output_option, session, table
from dispatcher.config import DEFAULT_TIMEOUT_MS


@main.command()
@manifest_option
@click.pass_context
def validate(context: click.Context) -> None:
    """Check the manifest; print every problem found."""
    manifest = load(context)
    methods = sum(len(plugin.methods) for plugin in manifest.plugins)
    click.echo(
        f"{session(context).manifest}: ok ({len(manifest.plugins)} plugins, {methods} methods)"
    )


@main.command(name="list")
@manifest_option
@output_option
@click.pass_context
def list_plugins(context: click.Context, output: str) -> None:
    """List plugins, their methods and where each runs."""
    manifest = load(context)
    entries = [
        {
            "plugin": plugin.id,
            "version": plugin.version,
            "method": name,
            "timeout_ms": plugin.policies_of(name).timeout_ms or DEFAULT_TIMEOUT_MS,
            "target": plugin.target_of(name).describe(),
        }
        for plugin in manifest.plugins
        for name in plugin.methods
    ]
    if output == "json":
        click.echo(orjson.dumps(entries, option=orjson.OPT_INDENT_2).decode())
        return
    rows = [("PLUGIN", "METHOD", "TIMEOUT", "TARGET")]
    rows += [
        (f"{e['plugin']}@{e['version']}", e["method"], f"{e['timeout_ms']} ms", e["target"])
        for e in entries
    ]
    table(rows)
