"""``dispatcher``: validate a manifest, list, call and deploy plugins, check their health.

Exit codes: 0 success; 1 a call failed or a target is unhealthy; 2 bad usage or an
invalid manifest. Errors are printed as one line (or one JSON object for ``call``),
never as a traceback.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import click
import orjson

from dispatcher._dispatcher import Dispatcher
from dispatcher.config import DEFAULT_TIMEOUT_MS, Manifest, ManifestError, PluginSpec, load_manifest
from linchkit_plugin.errors import DispatchError
from providers import provider_classes
from providers.deploy import Step
from providers.target import TargetConfig

T = TypeVar("T")

EXIT_FAILED = 1
EXIT_USAGE = 2


@click.group()
@click.option(
    "-m",
    "--manifest",
    default="plugins.yaml",
    show_default=True,
    envvar="DISPATCHER_MANIFEST",
    help="Manifest file (YAML or TOML).",
)
@click.pass_context
def main(context: click.Context, manifest: str) -> None:
    """Call LinchKit plugins wherever they run."""
    context.obj = manifest


def _manifest(context: click.Context) -> Manifest[Any]:
    try:
        return load_manifest(context.obj)
    except ManifestError as error:
        click.echo(str(error), err=True)
        context.exit(EXIT_USAGE)
        raise  # unreachable: exit raises


@main.command()
@click.pass_context
def validate(context: click.Context) -> None:
    """Check the manifest; print every problem found."""
    manifest = _manifest(context)
    methods = sum(len(plugin.methods) for plugin in manifest.plugins)
    click.echo(f"{context.obj}: ok ({len(manifest.plugins)} plugins, {methods} methods)")


@main.command(name="list")
@click.pass_context
def list_plugins(context: click.Context) -> None:
    """List plugins, their methods and where each runs."""
    manifest = _manifest(context)
    rows = [("PLUGIN", "METHOD", "TIMEOUT", "TARGET")]
    for plugin in manifest.plugins:
        for name in plugin.methods:
            timeout_ms = plugin.policies_of(name).timeout_ms or DEFAULT_TIMEOUT_MS
            rows.append((plugin.key, name, f"{timeout_ms} ms", plugin.target_of(name).describe()))
    _table(rows)


@main.command()
@click.argument("target", metavar="PLUGIN.METHOD")
@click.option("-p", "--params", default="{}", show_default=True, help="Params as JSON.")
@click.option("--timeout", type=float, default=None, help="Seconds; overrides the method's.")
@click.option("--caller", default=None, help="Caller identity sent with the call.")
@click.option("--version", "plugin_version", default=None, help="Plugin version (default: latest).")
@click.pass_context
def call(
    context: click.Context,
    target: str,
    params: str,
    timeout: float | None,
    caller: str | None,
    plugin_version: str | None,
) -> None:
    """Call PLUGIN.METHOD and print its result as JSON."""
    plugin, dot, method = target.rpartition(".")
    if not dot or not plugin or not method:
        raise click.UsageError(f"expected PLUGIN.METHOD, got {target!r}")
    try:
        decoded = orjson.loads(params)
    except orjson.JSONDecodeError as error:
        raise click.UsageError(f"--params is not valid JSON: {error}") from None
    manifest = _manifest(context)

    async def run(dispatcher: Dispatcher) -> Any:
        return await dispatcher.call(
            plugin, method, decoded, timeout=timeout, caller=caller, version=plugin_version
        )

    try:
        result = _run(manifest, run)
    except DispatchError as error:
        click.echo(orjson.dumps({"error": error.to_wire()}).decode(), err=True)
        context.exit(EXIT_FAILED)
    click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


@main.command()
@click.pass_context
def health(context: click.Context) -> None:
    """Probe every target; exit 1 if any is not serving."""
    manifest = _manifest(context)
    try:
        reports = _run(manifest, lambda dispatcher: dispatcher.health())
    except DispatchError as error:
        click.echo(f"error: {error}", err=True)
        context.exit(EXIT_FAILED)
    rows = [("PLUGIN", "TARGET", "STATUS", "CIRCUIT", "LATENCY", "DETAIL")]
    for report in reports:
        latency = (
            f"{report.health.latency_ms:.1f} ms" if report.health.latency_ms is not None else "-"
        )
        rows.append(
            (
                f"{report.plugin}@{report.version}",
                report.target,
                report.health.status,
                report.circuit or "-",
                latency,
                report.health.detail[:60],
            )
        )
    _table(rows)
    if not all(report.health.ok for report in reports):
        context.exit(EXIT_FAILED)


@main.command()
@click.argument("plugins", nargs=-1, metavar="[PLUGIN]...")
@click.option(
    "--dry-run", is_flag=True, help="Print what would be deployed; write and apply nothing."
)
@click.option("--remove", is_flag=True, help="Delete what deploy created, instead.")
@click.pass_context
def deploy(context: click.Context, plugins: tuple[str, ...], dry_run: bool, remove: bool) -> None:
    """Build or publish the function behind each target of PLUGIN (default: every plugin).

    Each provider deploys its own way (docker: builds the image locally; knative: renders a
    Service into infra/knative/ and applies it when the target's deploy.cluster is set;
    lambda: packages the plugin with its SDK and publishes it). Targets whose provider has
    nothing to deploy (local, http) are listed and skipped. --dry-run prints the plan
    instead; --remove deletes what deploy created (with --dry-run: what it would delete).
    """
    manifest = _manifest(context)
    known = {name for plugin in manifest.plugins for name in (plugin.id, plugin.key)}
    unknown = [name for name in plugins if name not in known]
    if unknown:
        raise click.UsageError(f"not in the manifest: {', '.join(unknown)}")
    chosen = [p for p in manifest.plugins if not plugins or {p.id, p.key} & set(plugins)]

    async def run() -> bool:
        ok = True
        for plugin in chosen:
            for target in plugin.targets():
                ok = await _deploy_one(plugin, target, dry_run=dry_run, remove=remove) and ok
        return ok

    if not asyncio.run(run()):
        context.exit(EXIT_FAILED)


async def _deploy_one(
    plugin: PluginSpec[Any], target: TargetConfig, *, dry_run: bool, remove: bool
) -> bool:
    provider = provider_classes()[target.provider]()
    deployer = provider.deployer()
    if deployer is None:
        click.echo(f"{plugin.key}: {target.describe()}: nothing to deploy")
        return True

    def progress(step: Step) -> None:
        click.echo(f"{plugin.key}: {step.render()}")

    try:
        async with provider:
            if dry_run and remove:
                click.echo(f"{plugin.key}: would remove {target.describe()}")
            elif dry_run:
                click.echo(f"{plugin.key}: {(await deployer.plan(plugin, target)).render()}")
            elif remove:
                plan = await deployer.remove(plugin, target, progress)
                click.echo(
                    f"{plugin.key}: removed {plan.target}"
                    if plan.changes
                    else f"{plugin.key}: {plan.target}: nothing to remove"
                )
            else:
                plan = await deployer.apply(plugin, target, progress)
                click.echo(
                    f"{plugin.key}: deployed {plan.target}"
                    if plan.changes
                    else f"{plugin.key}: {plan.target}: up to date"
                )
    except DispatchError as error:
        click.echo(f"{plugin.key}: {target.describe()}: {error}", err=True)
        return False
    return True


def _run(manifest: Manifest[Any], job: Callable[[Dispatcher], Awaitable[T]]) -> T:
    async def session() -> T:
        async with Dispatcher(manifest) as dispatcher:
            return await job(dispatcher)

    return asyncio.run(session())


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
