"""``dispatcher serve``: the gateway, until SIGTERM or SIGINT drains it.

On either signal it stops taking calls (``/readyz`` answers 503, new calls 503
``shutting_down``), lets the calls in flight finish for ``--grace`` seconds, then closes
the listener and every connection, then the dispatcher. SIGHUP reloads the TLS
certificate (it is also reloaded when its files change).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dispatcher._dispatcher import Dispatcher
from dispatcher.cli._app import EXIT_USAGE, load, main, manifest_option
from dispatcher.config import Manifest
from dispatcher.gateway import GatewayServer, GatewaySettings
from linchkit_plugin.errors import DispatchError

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_DEFAULTS = GatewaySettings()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="0: any free port.",
)
@click.option(
    "--grpc-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Also serve the gRPC gateway (proto/gateway.proto) on this port; 0: any free port.",
)
@click.option("--tls-cert", type=_FILE, default=None, help="PEM certificate (chain): serve HTTPS.")
@click.option("--tls-key", type=_FILE, default=None, help="PEM private key of --tls-cert.")
@click.option(
    "--client-ca", type=_FILE, default=None, help="PEM CA that signs client certificates."
)
@click.option(
    "--client-cert",
    type=click.Choice(["none", "optional", "required"]),
    default="none",
    show_default=True,
    help="Ask TLS clients for a certificate (verified against --client-ca).",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_body_bytes,
    show_default=True,
    help="Largest request body; larger ones get 413.",
)
@click.option(
    "--grace",
    type=click.FloatRange(0, 86_400),
    default=_DEFAULTS.grace,
    show_default=True,
    help="Seconds calls in flight may take to finish on SIGTERM/SIGINT.",
)
@click.option("--access-log", is_flag=True, help="Log every request (aiohttp.access, to stderr).")
@manifest_option
@click.pass_context
def serve(
    context: click.Context,
    host: str,
    port: int,
    grpc_port: int | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    client_ca: Path | None,
    client_cert: str,
    max_body_bytes: int,
    grace: float,
    access_log: bool,
) -> None:
    """Serve the manifest's plugins over HTTP (and a WebSocket for events), and gRPC
    with --grpc-port.

    Prints "listening on URL" once it listens (and "grpc listening on HOST:PORT"). Routes:
    POST /v1/plugins/PLUGIN/methods/METHOD, GET /v1/plugins, /v1/events (WebSocket),
    /openapi.json, /healthz, /readyz (docs/gateway.md). The manifest's gateway: section
    sets the same as these options; an option given here wins. Callers authenticate as
    the manifest's auth: says; without it, keep the gateway on a private network.
    """
    given = {
        name: value
        for name, value in (
            ("host", host),
            ("port", port),
            ("grpc_port", grpc_port),
            ("tls_cert", tls_cert),
            ("tls_key", tls_key),
            ("client_ca", client_ca),
            ("client_cert", client_cert),
            ("max_body_bytes", max_body_bytes),
            ("grace", grace),
        )
        if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    }
    manifest = load(context)
    try:
        settings = GatewaySettings.from_config(manifest.gateway, **given)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(manifest, settings, access_log))
    except DispatchError as error:  # a plugin that cannot start
        click.echo(f"error: {error}", err=True)
        context.exit(1)
    except OSError as error:  # the address is taken, a certificate cannot be read
        click.echo(f"error: {error}", err=True)
        context.exit(EXIT_USAGE)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (the plugin SDK's ``http`` extra brings it): the gateway's
    per-request cost is mostly the event loop's and aiohttp's, and uvloop cuts the former."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _serve(manifest: Manifest[Any], settings: GatewaySettings, access_log: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Leaving closes the server first (listener, connections), then the dispatcher.
    async with (
        Dispatcher(manifest) as dispatcher,
        GatewayServer(dispatcher, settings, access_log=access_log) as server,
    ):
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, server.reload_certificates)
        try:
            click.echo(f"listening on {server.url}")
            if server.grpc is not None:
                click.echo(f"grpc listening on {server.grpc.address}")
            await stop.wait()
            click.echo(f"draining: calls in flight have {settings.grace:g} s", err=True)
            await dispatcher.drain(settings.grace)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
