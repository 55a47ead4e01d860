"""``dispatcher serve``: the gateway, until SIGTERM or SIGINT drains it.

On either signal it stops taking calls (``/readyz`` answers 503, new calls 503
``shutting_down``), lets the calls in flight finish for ``--grace`` seconds, then closes
the listener and every connection, then the dispatcher. SIGHUP reloads the TLS
certificate (it is also reloaded when its files change) and the manifest
(``Dispatcher.reload``: an invalid one is logged and changes nothing); with ``--watch``
the manifest is also reloaded when its file's modification time changes, or that of a
file it includes or of a folder an include globs in (polled: no platform file-watching
API to depend on, and a manifest changes rarely).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dispatcher._dispatcher import Dispatcher
from dispatcher.audit import AuditLogError
from dispatcher.cli._app import EXIT_USAGE, Seconds, load, main, manifest_option, session
from dispatcher.config import Manifest, ManifestError, TelemetryEnvironmentError, watched_paths
from dispatcher.gateway import GatewayServer, GatewaySettings
from dispatcher.gateway.scrape import scrape_token
from linchkit_plugin.errors import DispatchError

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_DEFAULTS = GatewaySettings()

log = logging.getLogger("dispatcher")


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
    type=Seconds(0, 86_400),
    default=_DEFAULTS.grace,
    show_default=True,
    help="Seconds calls in flight may take to finish on SIGTERM/SIGINT.",
)
@click.option(
    "--access-log",
    is_flag=True,
    help="Log every request (aiohttp.access, to stderr); every request then goes through aiohttp.web.",
)
@click.option(
    "--call-lane/--no-call-lane",
    default=_DEFAULTS.call_lane,
    show_default=True,
    help="Answer plain calls on the call lane (httptools) instead of aiohttp.web.",
)
@click.option(
    "--watch",
    type=Seconds(0.05, 3600),
    default=None,
    metavar="SECONDS",
    help="Reload the manifest when its file changes, checking every SECONDS (SIGHUP always reloads it).",
)
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
    call_lane: bool,
    watch: float | None,
) -> None:
    """Serve the manifest's plugins over HTTP (and a WebSocket for events), and gRPC
    with --grpc-port.

    Prints "listening on URL" once it listens (and "grpc listening on HOST:PORT", "admin
    listening on URL" with telemetry.metrics.listen). Routes: POST
    /v1/plugins/PLUGIN/methods/METHOD, GET /v1/plugins, /v1/events (WebSocket),
    /openapi.json, /metrics (unless on the admin listener), /healthz, /readyz
    (docs/gateway.md). The manifest's gateway: section
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
            ("call_lane", call_lane),
        )
        if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    }
    manifest = load(context)
    path = session(context).manifest
    try:
        settings = GatewaySettings.from_config(manifest.gateway, **given)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    try:
        # Here too, not only as the gateway starts: before any plugin is started for nothing.
        scrape_token(manifest.telemetry.metrics)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(manifest, settings, access_log, path, watch))
    except TelemetryEnvironmentError as error:  # names the variable, never its value
        click.echo(f"error: {error}", err=True)
        context.exit(EXIT_USAGE)
    except DispatchError as error:  # a plugin that cannot start
        click.echo(f"error: {error}", err=True)
        context.exit(1)
    except AuditLogError as error:  # cut short, or locked by a stuck writer
        click.echo(f"error: {error}", err=True)
        context.exit(EXIT_USAGE)
    except OSError as error:  # an address is taken, a certificate cannot be read
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


def _freeze_what_start_built() -> None:
    """Take what start built (manifest, routes, clients, the aiohttp app, imported modules)
    out of the cyclic collector's sight: it lives as long as the process, and each full
    collection walked all of it, ~70,000 objects, ~50 ms with every call waiting, every
    ~12,000 calls at concurrency 64: ~4 us per call (docs/gateway.md). The garbage of
    start is collected first. What a manifest reload later drops of it is freed by
    reference counting; only its reference cycles, if any, stay (once: later objects are
    not frozen)."""
    gc.collect()
    gc.freeze()


async def _reload(dispatcher: Dispatcher, path: str, grace: float) -> None:
    try:  # a reload that applies is logged by the dispatcher, at INFO, in words
        await dispatcher.reload_from_file(path, grace=grace)
    except ManifestError as error:
        log.error("manifest not reloaded, nothing changed: %s", error)
    except DispatchError as error:
        # A target that cannot start (an executable not built, a service not listening):
        # the operator's to fix, and its message says what; a traceback would only repeat it.
        log.error("manifest not reloaded, nothing changed: %s", error)
    except Exception:
        log.exception("manifest not reloaded, nothing changed")


async def _watch(dispatcher: Dispatcher, path: str, interval: float, grace: float) -> None:
    """Reload when the modification time (or size) of the file, of a file it includes or
    of a folder an include globs in (a file added or removed there) changes."""

    def stamp() -> tuple[tuple[str, int, int], ...] | None:
        stamps = []
        for watched in watched_paths(path):
            try:
                status = os.stat(watched)
            except OSError:
                if os.fspath(watched) == path:
                    return None  # an editor replacing the file: wait for it to come back
                continue  # an included file just removed: its folder's stamp changed
            stamps.append((os.fspath(watched), status.st_mtime_ns, status.st_size))
        return tuple(stamps)

    seen = stamp()
    while True:
        await asyncio.sleep(interval)
        now = stamp()
        if now is not None and now != seen:
            seen = now
            await _reload(dispatcher, path, grace)


async def _serve(
    manifest: Manifest[Any],
    settings: GatewaySettings,
    access_log: bool,
    path: str,
    watch: float | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()
    # Leaving closes the server first (listener, connections), then the dispatcher.
    async with (
        Dispatcher(manifest) as dispatcher,
        GatewayServer(dispatcher, settings, access_log=access_log) as server,
    ):
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        dispatcher.manifest_path = path

        def on_hangup() -> None:
            server.reload_certificates()
            task = loop.create_task(_reload(dispatcher, path, settings.grace))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        if watch is not None:
            watcher = loop.create_task(_watch(dispatcher, path, watch, settings.grace))
            reloads.add(watcher)
        _freeze_what_start_built()
        try:
            _announce(f"listening on {server.url}")
            if server.grpc is not None:
                _announce(f"grpc listening on {server.grpc.address}")
            if server.admin is not None:
                _announce(f"admin listening on {server.admin.url}")
            await stop.wait()
            # A log line (in the manifest's log format); "listening on" above is not: it
            # is what scripts read on stdout to learn the address.
            log.warning("draining: calls in flight have %g s", settings.grace)
            await dispatcher.drain(settings.grace)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            for task in reloads:  # the watcher and reloads under way end with the server
                task.cancel()
            await asyncio.gather(*reloads, return_exceptions=True)


def _announce(line: str) -> None:
    """A line for whoever reads standard output (scripts learning the address). A gateway
    whose standard output is gone (closed, a full disk) serves on: it says so in its log."""
    try:
        click.echo(line)
    except OSError as error:
        log.warning("cannot write %r to standard output: %s", line, error.strerror or error)
