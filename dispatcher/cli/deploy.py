"""``dispatcher deploy``: build, publish or remove the functions behind a plugin's targets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from dispatcher.cli._app import EXIT_FAILED, load, main, manifest_option
from dispatcher.config import PluginSpec
from linchkit_plugin.errors import DispatchError
from providers import provider_class
from providers._log_lines import printable
from providers.deploy import Plan, Step
from providers.target import TargetConfig


@main.command()
@click.argument("plugins", nargs=-1, metavar="[PLUGIN]...")
@click.option(
    "--dry-run", is_flag=True, help="Print what would be deployed; write and apply nothing."
)
@click.option("--remove", is_flag=True, help="Delete what deploy created, instead.")
@click.option(
    "--package-only",
    is_flag=True,
    help="Only write each target's package (lambda: the zip) into --out; contact nothing.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("build"),
    show_default=True,
    help="Folder --package-only writes into.",
)
@manifest_option
@click.pass_context
def deploy(
    context: click.Context,
    plugins: tuple[str, ...],
    dry_run: bool,
    remove: bool,
    package_only: bool,
    out: Path,
) -> None:
    """Build or publish the function behind each target of PLUGIN (default: every plugin).

    Each provider deploys its own way (docker: builds the image locally; knative: renders a
    Service into infra/knative/ and applies it when the target's deploy.cluster is set;
    lambda: packages the plugin with its SDK and publishes it). Targets whose provider has
    nothing to deploy (local, http) are listed and skipped. --dry-run prints the plan
    instead; --remove deletes what deploy created (with --dry-run: what it would delete).
    --package-only writes the package alone (lambda: build/<function>.zip, what
    infra/lambda/template.yaml's CodeUri names), for SAM or a pipeline to deploy.
    """
    if package_only and (dry_run or remove):
        raise click.UsageError("--package-only writes the package only: no --dry-run or --remove")
    manifest = load(context)
    known = {name for plugin in manifest.plugins for name in (plugin.id, plugin.key)}
    unknown = [name for name in plugins if name not in known]
    if unknown:
        # Named as ``logs`` names them (repr): a pasted control character is shown, not run.
        raise click.UsageError(f"not in the manifest: {', '.join(map(repr, unknown))}")
    chosen = [p for p in manifest.plugins if not plugins or {p.id, p.key} & set(plugins)]

    async def run() -> bool:
        ok = True
        for plugin in chosen:
            for target in plugin.targets():
                if package_only:
                    ok = await _package_one(plugin, target, out) and ok
                    continue
                ok = await _deploy_one(plugin, target, dry_run=dry_run, remove=remove) and ok
        return ok

    if not asyncio.run(run()):
        context.exit(EXIT_FAILED)


async def _deploy_one(
    plugin: PluginSpec[Any], target: TargetConfig, *, dry_run: bool, remove: bool
) -> bool:
    provider = provider_class(target.provider)()
    deployer = provider.deployer()
    if deployer is None:
        click.echo(f"{plugin.key}: {target.describe()}: nothing to deploy")
        return True

    def progress(step: Step) -> None:
        click.echo(f"{plugin.key}: {printable(step.render())}")

    try:
        async with provider:
            if dry_run and remove:
                click.echo(f"{plugin.key}: would remove {target.describe()}")
            elif dry_run:
                click.echo(f"{plugin.key}: {_render(await deployer.plan(plugin, target))}")
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
        _report_failure(plugin, target, error)
        return False
    return True


def _render(plan: Plan) -> str:
    """``plan.render()`` with each step escaped: a step's detail quotes the server (the
    deployed CodeSha256, the alias's version), and a control character in it would drive
    the operator's terminal; a line break in it would forge a step."""
    lines = [plan.target, *(f"  {printable(step.render())}" for step in plan.steps)]
    if plan.document:
        lines += [printable(line) for line in plan.document.rstrip().splitlines()]
    return "\n".join(lines)


def _report_failure(plugin: PluginSpec[Any], target: TargetConfig, error: DispatchError) -> None:
    """One line on stderr, escaped (the message quotes the server), naming the target
    once: a provider's message that already names it is not prefixed with it again."""
    where = target.describe()
    message = str(error)
    prefix = "" if where in message else f"{where}: "
    click.echo(f"{plugin.key}: {prefix}{printable(message)}", err=True)


# -- --package-only: the deployer's package() alone; the provider is never started ------


async def _package_one(plugin: PluginSpec[Any], target: TargetConfig, out: Path) -> bool:
    deployer = provider_class(target.provider)().deployer()
    try:
        written = await deployer.package(plugin, target, out) if deployer else None
    except DispatchError as error:
        _report_failure(plugin, target, error)
        return False
    except OSError as error:
        click.echo(f"{plugin.key}: cannot write into {out}: {error.strerror}", err=True)
        return False
    if written is None:
        click.echo(f"{plugin.key}: {target.describe()}: nothing to package")
    else:
        click.echo(f"{plugin.key}: wrote {written} ({written.stat().st_size} bytes)")
    return True
