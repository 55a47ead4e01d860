"""``dispatcher inspect``: the effective sandbox of a plugin on each of its targets.

Reads the manifest and asks each target's provider how it would enforce the plugin's
``capabilities`` (``Provider.sandbox``): nothing is started, no container or process. A
provider that does not sandbox a target says so: that plugin runs with whatever rights
its host gives it.
"""

from __future__ import annotations

from typing import Any

import click

from dispatcher.cli._app import load, main, manifest_option
from dispatcher.config import PluginSpec
from providers import provider_class
from providers.capabilities import Capabilities


def _capabilities_line(capabilities: Capabilities) -> str:
    files = ", ".join(f"{grant.path} ({grant.mode})" for grant in capabilities.files)
    return (
        f"network: {', '.join(capabilities.network) or 'none'}; files: {files or 'none'}; "
        f"env: {', '.join(capabilities.env) or 'none'}; cpu_s: {capabilities.cpu_s or '-'}; "
        f"memory_mb: {capabilities.memory_mb or '-'}; pids: {capabilities.pids or '-'}"
    )


def _describe(spec: PluginSpec[Any]) -> list[str]:
    lines = [spec.key, f"  capabilities: {_capabilities_line(spec.capabilities)}"]
    for target in spec.targets():
        provider = provider_class(target.provider)()
        translation = provider.sandbox(spec, target)
        lines.append(f"  target {target.describe()}:")
        if translation is None:
            lines.append(
                f"    not sandboxed by the {target.provider} provider: the plugin has the "
                "rights of wherever it runs"
            )
            continue
        lines.extend(f"    {line}" for line in translation.lines())
    return lines


@main.command()
@click.argument("plugin", metavar="PLUGIN")
@manifest_option
@click.pass_context
def inspect(context: click.Context, plugin: str) -> None:
    """Print the effective sandbox of PLUGIN (id or id@version) on each of its targets:
    what its provider enforces of the plugin's capabilities, and, marked NOT ENFORCED,
    what it cannot on this machine. Starts nothing."""
    manifest = load(context)
    chosen = [spec for spec in manifest.plugins if plugin in (spec.id, spec.key)]
    if not chosen:
        known = sorted({spec.id for spec in manifest.plugins})
        raise click.UsageError(f"no plugin {plugin!r} in the manifest (known: {', '.join(known)})")
    for spec in chosen:
        click.echo("\n".join(_describe(spec)))
