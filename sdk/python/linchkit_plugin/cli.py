"""``dispatcher-plugin``: serve a plugin class as an HTTP function with uvicorn.

argparse, not click: a deployed plugin installs nothing it does not need.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import orjson

from linchkit_plugin.asgi import PluginApp
from linchkit_plugin.errors import ProviderError
from linchkit_plugin.host import PluginHost

_ENV = "LINCHKIT_PLUGIN_"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispatcher-plugin", description="Tools for plugin authors."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve a plugin class over HTTP",
        description=(
            "Serve ENTRYPOINT (package.module:Class) over HTTP, speaking the dispatcher envelope."
            " --host, --port, --uds and --config can also come from the environment as"
            " LINCHKIT_PLUGIN_HOST, _PORT, _UDS and _CONFIG: that is how the docker provider"
            " tells a plugin container where to listen and what to pass to init()."
        ),
    )
    serve.add_argument("entrypoint", metavar="ENTRYPOINT")
    env = os.environ.get
    serve.add_argument(
        "--host",
        default=env(_ENV + "HOST", "127.0.0.1"),
        help="interface to bind (default: %(default)s)",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=int(env(_ENV + "PORT", "8081")),
        help="port, 0 for any (default: %(default)s)",
    )
    serve.add_argument(
        "--uds", default=env(_ENV + "UDS"), help="listen on this Unix socket, not --host/--port"
    )
    serve.add_argument(
        "--path", dest="search_path", default=None, help="folder to import the plugin from"
    )
    serve.add_argument(
        "--config",
        dest="config_json",
        default=env(_ENV + "CONFIG", "{}"),
        help="JSON object for init()",
    )
    serve.add_argument(
        "--log-level", default="warning", help="uvicorn's log level (default: %(default)s)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    options = _parser().parse_args(argv)
    serve(options)


def serve(options: argparse.Namespace) -> None:
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - depends on the installed extras
        _fail("serving needs uvicorn: pip install 'linchkit-plugin[http]'")
    try:
        config: Any = orjson.loads(options.config_json)
        plugin_host = PluginHost.load(options.entrypoint, options.search_path)
    except (orjson.JSONDecodeError, ProviderError) as error:
        _fail(str(error))
    if not isinstance(config, dict):
        _fail("--config must be a JSON object")
    app = PluginApp(plugin_host, config=config)
    uvicorn.run(
        app,
        host=options.host,
        port=options.port,
        uds=options.uds,
        log_level=options.log_level,
        access_log=False,
        lifespan="on",
        loop=_fastest_loop(),
        http="httptools" if _has("httptools") else "h11",
    )


def _fail(message: str) -> NoReturn:
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(1)


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
