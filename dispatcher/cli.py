"""``dispatcher``: validate a manifest, list, call and deploy plugins, check their health.

Exit codes: 0 success; 1 a call failed or a target is unhealthy; 2 bad usage or an
invalid manifest. Errors are printed as one line (or one JSON object for ``call``),
never as a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import click
import orjson

from dispatcher._dispatcher import Dispatcher, TargetHealth
from dispatcher.config import DEFAULT_TIMEOUT_MS, Manifest, ManifestError, PluginSpec, load_manifest
from linchkit_plugin.errors import DispatchError
from providers import provider_classes
from providers.deploy import Step
from providers.target import TargetConfig

T = TypeVar("T")

EXIT_FAILED = 1
EXIT_USAGE = 2


MANIFEST_HELP = "Manifest file (YAML or TOML)."


@dataclass(slots=True)
class _Session:
    """What the group's options decide for every command."""

    manifest: str


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-m",
    "--manifest",
    default="plugins.yaml",
    show_default=True,
    envvar="DISPATCHER_MANIFEST",
    show_envvar=True,
    help=MANIFEST_HELP,
)
@click.option("-v", "--verbose", count=True, help="Log more: -v for info, -vv for debug.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default=None,
    help="Log level (overrides -v). Logs, plugin output included, go to stderr.",
)
@click.version_option(package_name="linchkit-dispatcher", prog_name="dispatcher")
@click.pass_context
def main(context: click.Context, manifest: str, verbose: int, log_level: str | None) -> None:
    """Call LinchKit plugins wherever they run.

    Shell completion: eval "$(_DISPATCHER_COMPLETE=bash_source dispatcher)" (zsh_source,
    fish_source for the other shells).
    """
    level = log_level.upper() if log_level else ("WARNING", "INFO", "DEBUG")[min(verbose, 2)]
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    context.obj = _Session(manifest)


def _session(context: click.Context) -> _Session:
    session = context.find_object(_Session)
    assert session is not None, "set by main() before any command runs"
    return session


def _override_manifest(context: click.Context, _: click.Parameter, value: str | None) -> None:
    if value is not None:
        _session(context).manifest = value


#: ``-m`` after the command name as well as before it (``dispatcher call x.y -m other.yaml``).
manifest_option = click.option(
    "-m",
    "--manifest",
    default=None,
    expose_value=False,
    callback=_override_manifest,
    help="Manifest file, if not given before the command.",
)

#: ``--output json`` for the commands that print tables.
output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Print a table, or JSON for scripts.",
)


def _manifest(context: click.Context) -> Manifest[Any]:
    try:
        return load_manifest(_session(context).manifest)
    except ManifestError as error:
        click.echo(str(error), err=True)
        context.exit(EXIT_USAGE)
        raise  # unreachable: exit raises


@main.command()
@manifest_option
@click.pass_context
def validate(context: click.Context) -> None:
    """Check the manifest; print every problem found."""
    manifest = _manifest(context)
    methods = sum(len(plugin.methods) for plugin in manifest.plugins)
    click.echo(
        f"{_session(context).manifest}: ok ({len(manifest.plugins)} plugins, {methods} methods)"
    )


@main.command(name="list")
@manifest_option
@output_option
@click.pass_context
def list_plugins(context: click.Context, output: str) -> None:
    """List plugins, their methods and where each runs."""
    manifest = _manifest(context)
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
    _table(rows)


@main.command()
@click.argument("target", metavar="PLUGIN.METHOD")
@click.option("-p", "--params", default="{}", show_default=True, help="Params as JSON.")
@click.option("--timeout", type=float, default=None, help="Seconds; overrides the method's.")
@click.option("--caller", default=None, help="Caller identity sent with the call.")
@click.option("--version", "plugin_version", default=None, help="Plugin version (default: latest).")
@manifest_option
@click.pass_context
def call(
    context: click.Context,
    target: str,
    params: str,
    timeout: float | None,
    caller: str | None,
    plugin_version: str | None,
) -> None:
    """Call PLUGIN.METHOD and print its result as JSON.

    Only PLUGIN is started: another plugin of the manifest that is down or slow to start
    does not hold this call up.
    """
    plugin, dot, method = target.rpartition(".")
    if not dot or not plugin or not method:
        raise click.UsageError(f"expected PLUGIN.METHOD, got {target!r}")
    try:
        decoded = orjson.loads(params)
    except orjson.JSONDecodeError as error:
        raise click.UsageError(f"--params is not valid JSON: {error}") from None
    manifest = _only(_manifest(context), plugin)

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
@manifest_option
@output_option
@click.pass_context
def health(context: click.Context, output: str) -> None:
    """Probe every target; exit 1 if any is not serving."""
    manifest = _manifest(context)
    try:
        reports = _run(manifest, lambda dispatcher: dispatcher.health())
    except DispatchError as error:
        click.echo(f"error: {error}", err=True)
        context.exit(EXIT_FAILED)
    if output == "json":
        entries = [
            {
                "plugin": report.plugin,
                "version": report.version,
                "target": report.target,
                "status": report.health.status,
                "circuit": report.circuit,
                "latency_ms": report.health.latency_ms,
                "detail": report.health.detail,
            }
            for report in reports
        ]
        click.echo(orjson.dumps(entries, option=orjson.OPT_INDENT_2).decode())
    else:
        _table(
            [
                ("PLUGIN", "TARGET", "STATUS", "CIRCUIT", "LATENCY", "DETAIL"),
                *map(_health_row, reports),
            ]
        )
    if not all(report.health.ok for report in reports):
        context.exit(EXIT_FAILED)


def _health_row(report: TargetHealth) -> tuple[str, ...]:
    latency = f"{report.health.latency_ms:.1f} ms" if report.health.latency_ms is not None else "-"
    return (
        f"{report.plugin}@{report.version}",
        report.target,
        report.health.status,
        report.circuit or "-",
        latency,
        report.health.detail[:60],
    )


@main.command()
@click.argument("plugins", nargs=-1, metavar="[PLUGIN]...")
@click.option(
    "--dry-run", is_flag=True, help="Print what would be deployed; write and apply nothing."
)
@click.option("--remove", is_flag=True, help="Delete what deploy created, instead.")
@manifest_option
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


def _only(manifest: Manifest[Any], plugin_id: str) -> Manifest[Any]:
    """``manifest`` with only the versions of ``plugin_id`` (all of them, if none matches,
    so the dispatcher's own "no plugin … known: …" answer still lists what exists)."""
    wanted = [plugin for plugin in manifest.plugins if plugin.id == plugin_id]
    return manifest.model_copy(update={"plugins": wanted}) if wanted else manifest


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
