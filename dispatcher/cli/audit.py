"""``dispatcher audit verify FILE``: is an audit log's hash chain intact?

Exit 0 and ``N records, chain intact, head <hash>``; exit 1 naming the first bad line
and why (changed, removed, reordered, cut short, forged); exit 2 if the file cannot be
read. ``--head HASH`` (the head the dispatcher logged when it closed the log, or
``stats()["audit"]["head"]``) also catches records removed from the end.
"""

from __future__ import annotations

import re

import click

from dispatcher.audit import verify
from dispatcher.cli._app import EXIT_FAILED, EXIT_USAGE, main

_HEX64 = re.compile(r"[0-9a-f]{64}")


@main.group()
def audit() -> None:
    """Work with audit logs (the manifest's `audit`)."""


@audit.command(name="verify")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--head", default=None, help="The hash the log must end with (64 hex).")
@click.pass_context
def verify_command(context: click.Context, file: str, head: str | None) -> None:
    """Check FILE's hash chain: every line sealed, each following the one before."""
    if head is not None and not _HEX64.fullmatch(head):
        raise click.UsageError("--head must be 64 lowercase hex digits")
    try:
        report = verify(file, head=head)
    except OSError as error:
        click.echo(f"{file}: cannot read: {error.strerror}", err=True)
        context.exit(EXIT_USAGE)
        return
    if report.intact:
        click.echo(f"{file}: {report.records} records, chain intact, head {report.head or 'none'}")
        return
    click.echo(
        f"{file}:{report.bad_line}: {report.problem} ({report.records} records before it intact)",
        err=True,
    )
    context.exit(EXIT_FAILED)
