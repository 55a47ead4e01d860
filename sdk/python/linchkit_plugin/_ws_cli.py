"""``dispatcher-plugin serve --websocket`` and ``dispatcher-plugin connect``: the plugin
over WebSocket, served (the dispatcher dials in) or dialling the gateway (reverse mode).

Kept apart from ``cli`` so that the HTTP server's command line imports no aiohttp; this
module is imported only when one of these commands runs (the ``websocket`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from typing import Any

from linchkit_plugin._connect_tls import ConnectTls
from linchkit_plugin._masked_url import masked_url
from linchkit_plugin._starting import StartFailed, signals_end_the_start
from linchkit_plugin.auth import TOKEN_ENV, TOKEN_FILE_ENV, BearerToken
from linchkit_plugin.host import PluginHost
from linchkit_plugin.ws_server import (
    Refused,
    WebSocketPluginServer,
    checked_gateway_url,
    dial,
    stop_on_signals,
)

__all__ = ["connect", "gateway_tls", "serve_websocket"]


def serve_websocket(
    options: argparse.Namespace,
    host: PluginHost,
    config: dict[str, Any],
    token: BearerToken | None,
    identity: tuple[str, str],
) -> None:
    async def main() -> int:
        # Watched before the line that says it serves: a SIGTERM right after that line
        # ended it by the default action, its stop hooks never run.
        stop = asyncio.Event()
        stop_on_signals(stop)
        server = WebSocketPluginServer(
            host,
            config=config,
            token=token,
            plugin_id=identity[0],
            version=identity[1],
            max_connections=options.max_connections,
            header_timeout=options.header_timeout,
            stop_caps=options.stop_caps,
        )
        # The plugin's init/start run in it: a signal before they finish ends the process.
        try:
            with signals_end_the_start():
                url = await server.start(options.host, options.port)
        except StartFailed as failed:  # nothing listens, and no hook is owed a stop (start())
            print(f"serve: {failed}", file=sys.stderr, flush=True)
            return 1
        methods = ", ".join(sorted(host.methods)) or "no methods"
        print(
            f"dispatcher-plugin: serving {options.entrypoint} ({methods}) over WebSocket,"
            f" listening on {url} (Ctrl+C stops it)",
            file=sys.stderr,
            flush=True,
        )
        if token is None:
            print(
                f"Warning: no bearer token configured (--token-file, {TOKEN_FILE_ENV} or"
                f" {TOKEN_ENV}): anybody who can reach {url} can call this plugin.",
                file=sys.stderr,
                flush=True,
            )
        try:
            await stop.wait()
        finally:
            await server.aclose()
        return 0

    if code := asyncio.run(main()):
        raise SystemExit(code)


def gateway_tls(options: argparse.Namespace) -> ssl.SSLContext | bool:
    """What ``connect`` dials ``--url`` with (``ConnectTls.context``), ``--url`` and the TLS
    files checked first: one that cannot be used ends ``connect`` in one line, exit 2. Called
    before the plugin's module is imported, whose code would otherwise run (and may take
    its time) for a command that was never going to dial."""
    try:
        checked_gateway_url(options.url)
        return ConnectTls.configured(options.ca_file, options.cert_file, options.key_file).context(
            options.url
        )
    except ValueError as error:  # ConnectTlsError's too: it names the file, not its bytes
        print(f"connect: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def connect(
    options: argparse.Namespace,
    host: PluginHost,
    config: dict[str, Any],
    token: BearerToken | None,
    context: ssl.SSLContext | bool,
) -> int:
    """Dial the gateway (``context``: ``gateway_tls``'s) until stopped; 1 when it refuses
    this plugin (not retried)."""

    async def main() -> int:
        # A signal does not cancel the dialling: it says goaway, the gateway finishes the
        # calls it sent, and only then does it return.
        stopping = asyncio.Event()
        stop_on_signals(stopping)
        print(
            f"dispatcher-plugin: {options.plugin_id}@{options.plugin_version} dialling"
            f" {masked_url(options.url)} (Ctrl+C stops it)",
            file=sys.stderr,
            flush=True,
        )
        try:
            await dial(
                host,
                options.url,
                plugin_id=options.plugin_id,
                version=options.plugin_version,
                token=token.secret() if token is not None else None,
                config=config,
                ssl=context,
                stopping=stopping,
                stop_caps=options.stop_caps,
            )
        except Refused as refused:
            print(f"connect: {refused}", file=sys.stderr)
            return 1
        return 0

    return asyncio.run(main())
