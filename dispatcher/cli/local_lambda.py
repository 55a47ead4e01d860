"""``dispatcher local-lambda``: a local AWS Lambda that stays up, like ``sam local start-lambda``.

moto's server (functions, versions, aliases, IAM) behind the local front that runs each
function in the real Lambda runtime in Docker (``dispatcher.testing.local_lambda``), on
one loopback endpoint. ``dispatcher deploy``, ``dispatcher call`` and a plugin author's
own tests then talk to it like to AWS, given its URL and dummy credentials, which it
prints. It runs until Ctrl-C or SIGTERM, then removes the containers it started.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import click

from dispatcher.cli._app import EXIT_FAILED, load, main, manifest_option, session
from dispatcher.config import Manifest
from dispatcher.testing.local_lambda import (
    DEFAULT_RUNTIME_IMAGE,
    FAKE_CREDENTIALS,
    LocalLambdaError,
    LocalLambdaServer,
)
from dispatcher.testing.local_lambda.server import ACCOUNT
from providers.aws_lambda import LambdaTarget

#: ``sam local start-lambda``'s port, so habits carry over.
DEFAULT_PORT = 3001


@main.command(name="local-lambda")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Loopback port of the endpoint; 0 picks a free one.",
)
@click.option(
    "--role",
    "roles",
    multiple=True,
    metavar="NAME",
    help="Create this execution role too (the manifest's deploy roles are created anyway).",
)
@click.option(
    "--image",
    default=DEFAULT_RUNTIME_IMAGE,
    show_default=True,
    help="Runtime image the functions run in (infra/lambda/build-runtime-image.sh builds it).",
)
@manifest_option
@click.pass_context
def local_lambda(context: click.Context, port: int, roles: tuple[str, ...], image: str) -> None:
    """Run a local AWS Lambda until Ctrl-C: moto plus the real runtime in Docker.

    Prints its endpoint and the environment to give `dispatcher deploy`, `dispatcher call`
    or your tests. Everything it holds is in memory and gone when it stops; its containers
    are removed. Needs moto[server], a Docker engine and the runtime image.
    """
    wanted = dict.fromkeys(roles)
    manifest_path = Path(session(context).manifest)
    if manifest_path.exists():
        wanted.update(dict.fromkeys(_deploy_roles(load(context))))
    try:
        asyncio.run(_serve(port, image, list(wanted)))
    except LocalLambdaError as error:
        click.echo(f"local-lambda: {error}", err=True)
        context.exit(EXIT_FAILED)


def _deploy_roles(manifest: Manifest[Any]) -> list[str]:
    """The execution roles the manifest's lambda targets deploy with (moto wants them)."""
    found = []
    for plugin in manifest.plugins:
        for target in plugin.targets():
            if isinstance(target, LambdaTarget) and target.deploy is not None:
                arn = target.deploy.role
                account = arn.split(":")[4]
                if account != ACCOUNT:
                    click.echo(
                        f"warning: {plugin.key}: role {arn} is in account {account}; the local "
                        f"Lambda's account is {ACCOUNT}, so deploying it will be refused",
                        err=True,
                    )
                found.append(arn.rpartition("/")[2])
    return found


async def _serve(port: int, image: str, roles: list[str]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop.set)
    try:
        async with LocalLambdaServer(port=port, image=image) as server:
            arns = [await server.create_role(name) for name in roles]
            click.echo(_instructions(server.url, image, arns))
            await stop.wait()
            click.echo("local-lambda: stopping, removing its containers", err=True)
    finally:
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signal_number)
    click.echo("local-lambda: stopped", err=True)


def _instructions(url: str, image: str, role_arns: list[str]) -> str:
    credentials = " ".join(f"{name}={value}" for name, value in FAKE_CREDENTIALS.items())
    roles = ", ".join(role_arns) or f"none yet (--role NAME: arn:aws:iam::{ACCOUNT}:role/NAME)"
    return f"""\
Local Lambda listening on {url}
  control plane: moto, in memory (gone when this stops)
  runtime:       {image}, one container per warm execution environment
  roles:         {roles}

Point the manifest's lambda targets at it:
    endpoint_url: {url}
or leave the manifest alone and set, where dispatcher or your tests run (the second
for `dispatcher logs`: what the functions print is in its CloudWatch Logs):
    export AWS_ENDPOINT_URL_LAMBDA={url} AWS_ENDPOINT_URL_CLOUDWATCH_LOGS={url}
and, either way, dummy credentials (moto takes any; these keep real ones out of it):
    export {credentials}

Then: dispatcher deploy && dispatcher call PLUGIN.METHOD && dispatcher logs PLUGIN
Ctrl-C stops it and removes its containers."""
