"""``dispatcher-plugin``: serve a plugin class as an HTTP function with uvicorn."""

from __future__ import annotations

import sys
from typing import Any

import click
import orjson

from dispatcher.errors import ProviderError
from dispatcher.sdk.asgi import PluginApp
from dispatcher.sdk.host import PluginHost

_ENV = "LINCHKIT_PLUGIN_"


@click.group()
def main() -> None:
    """Tools for plugin authors."""


@main.command()
@click.argument("entrypoint")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    envvar=_ENV + "HOST",
    help="Interface to bind.",
)
@click.option(
    "--port", default=8081, show_default=True, type=int, envvar=_ENV + "PORT", help="Port (0: any)."
)
@click.option("--uds", envvar=_ENV + "UDS", help="Listen on this Unix socket, not --host/--port.")
@click.option("--path", "search_path", default=None, help="Folder to import the plugin from.")
@click.option(
    "--config", "config_json", default="{}", envvar=_ENV + "CONFIG", help="JSON for init()."
)
@click.option("--log-level", default="warning", show_default=True)
def serve(
    entrypoint: str,
    host: str,
    port: int,
    uds: str | None,
    search_path: str | None,
    config_json: str,
    log_level: str,
) -> None:
    """Serve ENTRYPOINT (package.module:Class) over HTTP, speaking the dispatcher envelope.

    --host, --port, --uds and --config can also come from the environment as
    LINCHKIT_PLUGIN_HOST, _PORT, _UDS and _CONFIG: that is how the docker provider tells
    a plugin container where to listen and what to pass to init().
    """
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise click.ClickException(
            "serving needs uvicorn: pip install 'linchkit-dispatcher[plugin]'"
        ) from None
    try:
        config: Any = orjson.loads(config_json)
        plugin_host = PluginHost.load(entrypoint, search_path)
    except (orjson.JSONDecodeError, ProviderError) as error:
        raise click.ClickException(str(error)) from None
    if not isinstance(config, dict):
        raise click.ClickException("--config must be a JSON object")
    app = PluginApp(plugin_host, config=config)
    uvicorn.run(
        app,
        host=host,
        port=port,
        uds=uds,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        loop=_fastest_loop(),
        http="httptools" if _has("httptools") else "h11",
    )


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _fastest_loop() -> str:
    return "uvloop" if sys.platform != "win32" and _has("uvloop") else "asyncio"


if __name__ == "__main__":  # pragma: no cover
    main()
