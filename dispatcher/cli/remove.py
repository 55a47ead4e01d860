"""``dispatcher remove``: delete what ``dispatcher deploy`` created, as a command of its own.

Exactly ``dispatcher deploy --remove`` (the same code runs), except that it wants the
plugins named: removing every plugin of a manifest stays the longer, explicit spelling.
"""

from __future__ import annotations

import click

from dispatcher.cli._app import main, manifest_option
from dispatcher.cli.deploy import deploy


@main.command()
@click.argument("plugins", nargs=-1, required=True, metavar="PLUGIN...")
@click.option("--dry-run", is_flag=True, help="Print what would be removed; remove nothing.")
@manifest_option
@click.pass_context
def remove(context: click.Context, plugins: tuple[str, ...], dry_run: bool) -> None:
    """Delete what `dispatcher deploy` created for each PLUGIN (id or id@version): the
    Docker image it built, the Knative Service it rendered and applied, the Lambda function
    and alias it published. Same as `dispatcher deploy --remove PLUGIN...`; to remove every
    plugin of the manifest, use that without naming any.
    """
    # invoke() fills every other option of deploy with its default, so an option deploy
    # gains later keeps its meaning here.
    context.invoke(deploy, plugins=plugins, dry_run=dry_run, remove=True)
