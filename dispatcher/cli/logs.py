"""``dispatcher logs``: what a plugin writes, where its provider can read it.

A subprocess plugin's stderr (kept by the dispatcher that launched it, so this command
starts the plugin and shows its own launch's output), the engine's log of a Docker
plugin's containers (every container of the plugin on this engine, whichever dispatcher
started it) and a Lambda function's log group in CloudWatch Logs. Other providers keep no
output and say where to look instead. Every line is shown escaped (``printable``, tabs
kept): a plugin's output must not drive the operator's terminal.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import click

from dispatcher._dispatcher import Dispatcher
from dispatcher.cli._app import (
    EXIT_FAILED,
    load,
    main,
    manifest_option,
    run_with_dispatcher,
    without_audit,
)
from dispatcher.config import PluginSpec
from linchkit_plugin.errors import DispatchError
from providers._log_lines import printable
from providers.target import TargetConfig

#: The most recent lines ``-n`` asks for.
MAX_LINES = 100_000


@main.command()
@click.argument("plugin", metavar="PLUGIN")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@click.option(
    "-n",
    "--lines",
    # Bounded: the recent lines are held in memory (a deque of that size) before printing.
    type=click.IntRange(min=0, max=MAX_LINES),
    default=100,
    show_default=True,
    help="How many recent lines to print first.",
)
@manifest_option
@click.pass_context
def logs(context: click.Context, plugin: str, follow: bool, lines: int) -> None:
    """Print what PLUGIN (id or id@version) writes: a subprocess plugin's stderr, the
    engine's log of a Docker plugin's containers (`name | line`), or a Lambda function's
    CloudWatch Logs (`[version]environment | line`).

    Only PLUGIN is started. A subprocess plugin's output is that of the process this
    command launches (one started by another dispatcher is not visible to it); Docker
    containers are all of PLUGIN's on this engine, whichever dispatcher started them, and
    --follow also prints those started meanwhile. A Lambda function's log group holds every
    execution environment's output (--follow asks for new lines every second); before the
    function's first call there is none: exit 1. Providers that keep no output (local, http,
    grpc, knative) say so; exit 1.
    """
    manifest = load(context)
    chosen = [spec for spec in manifest.plugins if plugin in (spec.id, spec.key)]
    if not chosen:
        known = sorted({spec.id for spec in manifest.plugins})
        raise click.UsageError(f"no plugin {plugin!r} in the manifest (known: {', '.join(known)})")
    manifest = without_audit(manifest.model_copy(update={"plugins": chosen}))

    async def show(dispatcher: Dispatcher) -> list[DispatchError]:
        streams = [
            dispatcher.providers[target.provider].logs(spec, target, follow=follow, lines=lines)
            for spec, target in _targets(chosen)
        ]
        return await (_follow_all(streams) if follow else _print_each(streams))

    try:
        errors = run_with_dispatcher(manifest, show)
    except KeyboardInterrupt:
        if not follow:  # interrupted before it printed all it was asked for: exit 130
            raise
        return  # Ctrl-C is how --follow ends; the dispatcher has stopped the plugin
    except DispatchError as error:
        click.echo(f"error: {printable(str(error))}", err=True)
        context.exit(EXIT_FAILED)
    if not follow:  # --follow printed each failure as it happened
        for failure in errors:
            click.echo(f"error: {printable(str(failure))}", err=True)
    if errors:
        context.exit(EXIT_FAILED)


def _targets(plugins: list[PluginSpec[Any]]) -> list[tuple[PluginSpec[Any], TargetConfig]]:
    """Each distinct target of each plugin (methods may share or override the target)."""
    return [(spec, target) for spec in plugins for target in spec.targets()]


async def _print_each(streams: list[AsyncIterator[str]]) -> list[DispatchError]:
    """Without --follow: each target's recent lines in turn; the failures, to report."""
    errors: list[DispatchError] = []
    for stream in streams:
        try:
            async for line in stream:
                click.echo(printable(line, keep="\t"))
        except DispatchError as error:
            errors.append(error)
    return errors


async def _follow_all(streams: list[AsyncIterator[str]]) -> list[DispatchError]:
    """With --follow: every target's lines as they come, until each stream ends or fails
    (a stream that fails is reported at once; the others go on)."""
    errors: list[DispatchError] = []
    queue: asyncio.Queue[str | None] = asyncio.Queue(1000)

    async def pump(stream: AsyncIterator[str]) -> None:
        try:
            async for line in stream:
                await queue.put(line)
        except DispatchError as error:
            errors.append(error)
            click.echo(f"error: {printable(str(error))}", err=True)
        finally:
            await queue.put(None)

    pumps = [asyncio.create_task(pump(stream)) for stream in streams]
    ended = 0
    try:
        while ended < len(pumps):
            line = await queue.get()
            if line is None:
                ended += 1
            else:
                click.echo(printable(line, keep="\t"))
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
    # Reported as they happened; a non-zero exit if nothing could be followed at all.
    return errors if len(errors) == len(pumps) else []
