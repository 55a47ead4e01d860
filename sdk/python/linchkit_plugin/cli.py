"""``dispatcher-plugin``: serve a plugin class as an HTTP function with uvicorn.

argparse, not click: a deployed plugin installs nothing it does not need. ``serve``'s
options but ``--path`` (it goes with the ENTRYPOINT, which only the command line names)
and ``--log-level`` (no SDK reads a log level from a ``LINCHKIT_*`` variable) can also
come from a ``LINCHKIT_PLUGIN_*`` variable, each named in its help, because the docker
provider and container orchestrators configure a server through its environment (the
registry's from ``LINCHKIT_REGISTER_*`` ones: ``_registry_options``, shared with the gRPC
service). A flag given on the command line that its mode would not use is a usage error
(``_unused_flag``). The bearer token and etcd's password can only come from a file or the
environment, never the command line (``ps`` shows it). How long a stop waits comes from
the environment alone (``LINCHKIT_PLUGIN_STOP_GRACE_MS`` and ``_STOP_HOOKS_MS``,
``linchkit_plugin.stopping``), as in every executable of every SDK.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import socket
import ssl
import stat
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import orjson

from linchkit_plugin._connect_tls import (
    CLIENT_CERT_FILE_ENV,
    CLIENT_KEY_FILE_ENV,
    GATEWAY_CA_FILE_ENV,
)
from linchkit_plugin._log_setup import log_to_stderr
from linchkit_plugin._registry_options import (
    RegistrySettings,
    add_registry_options,
    flags_given,
    registry_settings,
    websocket_refusal,
)
from linchkit_plugin._setting_files import PEM_FILE_BYTES, check_setting_file
from linchkit_plugin._starting import StartFailed
from linchkit_plugin.argument_parser import RedactingArgumentParser
from linchkit_plugin.asgi import PluginApp
from linchkit_plugin.auth import TOKEN_ENV, TOKEN_FILE_ENV, BearerToken, TokenError
from linchkit_plugin.errors import ProviderError
from linchkit_plugin.host import PluginHost
from linchkit_plugin.limits import ServerLimits
from linchkit_plugin.registry import Registration
from linchkit_plugin.stopping import MAX_STOP_MS, STOP_GRACE_ENV, STOP_HOOKS_ENV, StopCaps
from linchkit_plugin.tracing import exporting

_ENV = "LINCHKIT_PLUGIN_"
#: What puts ``serve`` in WebSocket mode without ``--websocket``: "1" or "true".
_WEBSOCKET_ENV = _ENV + "WEBSOCKET"
#: The spellings of ``LINCHKIT_PLUGIN_WEBSOCKET``, and whether each serves over WebSocket;
#: unset or empty: HTTP. Any other is refused (``_websocket_from``): ``True``, ``yes`` or
#: ``on`` served HTTP unsaid, to a dispatcher dialling a WebSocket.
_WEBSOCKET_SPELLINGS = {"1": True, "true": True, "0": False, "false": False, "": False}
_DEFAULTS = ServerLimits()

#: The levels ``--log-level`` takes, uvicorn's (``trace``: below debug, uvicorn's own). Any
#: other was uvicorn's ``KeyError`` and its traceback, once the plugin had been imported.
_LOG_LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": 5,
}

# (option, ServerLimits field, type, what it guards): each also reads LINCHKIT_PLUGIN_<FIELD>.
_LIMIT_OPTIONS: tuple[tuple[str, str, type[int] | type[float], str], ...] = (
    ("--max-body-bytes", "max_body_bytes", int, "largest request body; 413 above it"),
    ("--max-batch-items", "max_batch_items", int, "most items in one batch; 413 above it"),
    (
        "--body-timeout",
        "body_timeout",
        float,
        "seconds for a request body to arrive once its head has; 408 after",
    ),
    (
        "--header-timeout",
        "header_timeout",
        float,
        "seconds for a request head to complete, from its first byte (or from a new"
        " connection's opening); closed after (--websocket: from the connection's opening)",
    ),
    (
        "--keep-alive-timeout",
        "keep_alive_timeout",
        float,
        "seconds an idle connection is kept between requests",
    ),
    ("--max-header-bytes", "max_header_bytes", int, "largest request head; 431 above it"),
    (
        "--max-connections",
        "max_connections",
        int,
        "open connections at most; more are closed as they are accepted (--websocket:"
        " upgraded ones; past them an upgrade is refused 503)",
    ),
    (
        "--compress-min-bytes",
        "compress_min_bytes",
        int,
        "answers this large or larger are compressed for a caller that accepts it",
    ),
)


#: Each limit's flag, by its ``ServerLimits`` field.
_LIMIT_FLAGS = {field: option for option, field, _, _ in _LIMIT_OPTIONS}


class _Given(argparse.Action):
    """``store``, noting that the command line gave the option (``options.given``, the
    options' ``dest``): a default read from a ``LINCHKIT_PLUGIN_*`` variable is not given,
    and the same value from both is."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}


class _GivenSwitch(_Given):
    """``store_true``, noting that the command line gave the switch, as ``_Given`` notes an
    option: a refusal names ``--websocket`` when it was typed, its variable when not."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        super().__call__(parser, namespace, True, option_string)


def _number_from(
    variable: str, kind: type[int] | type[float], default: float, malformed: dict[str, str]
) -> Any:
    """``variable``'s number, or ``default`` when it is unset; one that is no number gives
    ``default`` too, its refusal kept in ``malformed`` (by variable) for ``serve`` to say,
    should it read it (``_malformed_variable``): ``connect`` reads none of them."""
    text = os.environ.get(variable)
    if text is None:
        return kind(default)
    try:
        return _strict_number(kind, text)
    except ValueError as error:
        malformed[variable] = f"{variable} {error}"
        return kind(default)


#: How a number given to ``serve`` is spelled: ASCII digits, a minus sign (refused by the
#: range each is checked against, with its own words), a decimal point for seconds.
#: ``int`` and ``float`` took more, each unsaid: ``٣٣٣٣`` (Arabic-Indic digits), ``1_000``,
#: `` 1``, ``inf``, ``nan``, ``1e308``; ``STOP_GRACE_MS`` refused them already.
_WHOLE = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
#: How much of a refused value its message quotes: the operator's own text, cut short.
_SHOWN_CHARACTERS = 40


def _strict_number(kind: type[int] | type[float], text: str) -> Any:
    """``text`` as ``kind`` when spelled as ``_WHOLE`` (``int``) or ``_DECIMAL`` says;
    ``ValueError`` saying what it must be, quoting it cut short, otherwise. ``serve``'s
    flags are read by it too, as their variables."""
    pattern = _WHOLE if kind is int else _DECIMAL
    if not pattern.fullmatch(text):
        what = "a whole number" if kind is int else "a number"
        shown = repr(text[:_SHOWN_CHARACTERS]) + ("…" if len(text) > _SHOWN_CHARACTERS else "")
        raise ValueError(f"must be {what}, not {shown} (ASCII digits only)")
    return kind(text)


def _whole_number(text: str) -> int:
    """``type=`` of an ``int`` flag: ``_strict_number``, a usage error otherwise."""
    try:
        return int(_strict_number(int, text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _decimal_number(text: str) -> float:
    """``type=`` of a ``float`` flag (seconds): ``_strict_number``, a usage error otherwise."""
    try:
        return float(_strict_number(float, text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _websocket_from(malformed: dict[str, str]) -> bool:
    """Whether ``LINCHKIT_PLUGIN_WEBSOCKET`` asks for WebSocket (``_WEBSOCKET_SPELLINGS``);
    a spelling not there is kept in ``malformed`` for ``serve`` to refuse, as a number
    variable that is none is, unless ``--websocket`` was typed."""
    text = os.environ.get(_WEBSOCKET_ENV, "")
    if text in _WEBSOCKET_SPELLINGS:
        return _WEBSOCKET_SPELLINGS[text]
    shown = repr(text[:_SHOWN_CHARACTERS]) + ("…" if len(text) > _SHOWN_CHARACTERS else "")
    malformed[_WEBSOCKET_ENV] = (
        f"{_WEBSOCKET_ENV} must be 1 or true (WebSocket), or 0, false or empty (HTTP), not {shown}"
    )
    return False


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """``dispatcher-plugin``'s parser and its ``serve`` command's, which refuses a flag its
    mode would not use (``_unused_flag``)."""
    # Its refusals never quote a value (argument_parser): a token may sit in a mistyped option.
    parser = RedactingArgumentParser(
        prog="dispatcher-plugin", description="Tools for plugin authors."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve a plugin class over HTTP",
        description=(
            "Serve ENTRYPOINT (package.module:Class) over HTTP, speaking the dispatcher envelope."
            " Each option can also come from the variable its help names in brackets,"
            " LINCHKIT_PLUGIN_<OPTION> (the registry's: LINCHKIT_REGISTER_<OPTION>,"
            " LINCHKIT_ADVERTISE, LINCHKIT_LEAVE_DELAY), a flag given winning over it;"
            " --path and --log-level read none. LINCHKIT_PLUGIN_HOST, _PORT, _UDS and _CONFIG"
            " are how the docker provider tells a plugin container where to listen and what"
            " to pass to init()."
            f" On SIGTERM the calls in flight get {STOP_GRACE_ENV} milliseconds to finish,"
            f" then the stop and destroy hooks {STOP_HOOKS_ENV} together"
            f" (0-{MAX_STOP_MS}; default 5000 each; 0 does not wait)."
            f" Calls need 'Authorization: Bearer <token>' when a token is configured:"
            f" --token-file, {TOKEN_FILE_ENV} or {TOKEN_ENV}; without one anybody who can"
            " reach the server can call the plugin, which suits local development only."
            " /health stays open for orchestrators' probes."
        ),
    )
    serve.add_argument("entrypoint", metavar="ENTRYPOINT")
    env = os.environ.get
    malformed: dict[str, str] = {}  # a number variable that is none: _malformed_variable
    serve.add_argument(
        "--host",
        action=_Given,
        default=env(_ENV + "HOST", "127.0.0.1"),
        help=f"interface to bind (default: %(default)s) [{_ENV}HOST]",
    )
    serve.add_argument(
        "--port",
        action=_Given,
        type=_whole_number,
        default=_number_from(_ENV + "PORT", int, 8081, malformed),
        help=f"port, 0 for any (default: %(default)s) [{_ENV}PORT]",
    )
    serve.add_argument(
        "--uds",
        action=_Given,
        default=env(_ENV + "UDS"),
        help=f"listen on this Unix socket, not --host/--port [{_ENV}UDS]",
    )
    serve.add_argument(
        "--path",
        dest="search_path",
        default=".",
        help="folder to import the plugin from (default: the current folder, as uvicorn's)"
        " [no variable]",
    )
    serve.add_argument(
        "--config",
        action=_Given,
        dest="config_json",
        default=env(_ENV + "CONFIG", "{}"),
        help=f"JSON object for init() [{_ENV}CONFIG]",
    )
    serve.add_argument(
        "--log-level",
        type=str.lower,
        choices=_LOG_LEVELS,
        default="warning",
        help="how much the server logs: uvicorn's log level, with --websocket the"
        " WebSocket server's (default: %(default)s) [no variable]",
    )
    serve.add_argument(
        "--token-file",
        default=env(TOKEN_FILE_ENV),
        metavar="PATH",
        help=f"file holding the bearer token calls must carry [{TOKEN_FILE_ENV}; or"
        f" {TOKEN_ENV}, the token]",
    )
    serve.add_argument(
        "--http",
        action=_Given,
        choices=["auto", "h11", "httptools"],
        default=env(_ENV + "HTTP", "auto"),
        help="HTTP implementation; auto is httptools when installed (not with --websocket)"
        f" [{_ENV}HTTP]",
    )
    tls = serve.add_argument_group("TLS (HTTPS, and client certificates: mTLS)")
    tls.add_argument(
        "--tls-cert",
        action=_Given,
        default=env(_ENV + "TLS_CERT"),
        metavar="PEM",
        help=f"certificate (chain) to serve HTTPS with [{_ENV}TLS_CERT]",
    )
    tls.add_argument(
        "--tls-key",
        action=_Given,
        default=env(_ENV + "TLS_KEY"),
        metavar="PEM",
        help=f"private key of --tls-cert [{_ENV}TLS_KEY]",
    )
    tls.add_argument(
        "--client-ca",
        action=_Given,
        default=env(_ENV + "CLIENT_CA"),
        metavar="PEM",
        help="require a client certificate signed by this CA: a dispatcher without one"
        f" cannot connect [{_ENV}CLIENT_CA]",
    )
    serve.add_argument(
        "--websocket",
        action=_GivenSwitch,
        default=_websocket_from(malformed),
        help="serve over WebSocket instead of HTTP: the dispatcher dials ws://HOST:PORT/"
        f" (provider: websocket; needs the websocket extra) [{_WEBSOCKET_ENV}: 1 or true;"
        " 0, false or empty: HTTP]",
    )
    serve.add_argument(
        "--id",
        dest="plugin_id",
        default=env(_ENV + "ID", ""),
        help="the plugin's id (the manifest's), which /describe and the calls' spans say"
        " (--websocket: its hello) [LINCHKIT_PLUGIN_ID, which the docker provider sets]",
    )
    serve.add_argument(
        "--version",
        dest="plugin_version",
        default=env(_ENV + "VERSION", ""),
        help="the plugin's version, which /describe says (--websocket: its hello)"
        " [LINCHKIT_PLUGIN_VERSION]",
    )
    add_registry_options(serve, kind="url", action=_Given)
    connect = commands.add_parser(
        "connect",
        help="dial a dispatcher's gateway and take calls over that connection (reverse mode)",
        description=(
            "Connect ENTRYPOINT to the gateway at --url (ws[s]://HOST/v1/plugins/connect) as"
            " --id at --version, and serve calls over that connection, reconnecting after"
            " every drop. The manifest declares it with provider: websocket, mode: inbound."
            f" The token comes from --token-file, {TOKEN_FILE_ENV} or {TOKEN_ENV}."
            f" On SIGTERM it says goaway and gives the gateway {STOP_GRACE_ENV} milliseconds"
            f" to finish its calls, then the stop and destroy hooks {STOP_HOOKS_ENV}"
            f" (0-{MAX_STOP_MS}; default 5000 each)."
        ),
    )
    connect.add_argument("entrypoint", metavar="ENTRYPOINT")
    connect.add_argument("--url", required=True, help="the gateway's /v1/plugins/connect URL")
    connect.add_argument("--id", dest="plugin_id", required=True, help="the plugin's id")
    connect.add_argument("--version", dest="plugin_version", required=True)
    connect.add_argument("--token-file", default=env(TOKEN_FILE_ENV), metavar="PATH")
    connect.add_argument(
        "--ca-file",
        metavar="PATH",
        help="wss://: PEM roots that verify the gateway (default: the system's)"
        f" [{GATEWAY_CA_FILE_ENV}]",
    )
    connect.add_argument(
        "--cert-file",
        metavar="PATH",
        help="wss://: the client certificate (chain) to log in with, for a gateway that"
        " requires one (gateway.tls.client_cert) or whose auth.mtls names it as the"
        f" target's principal [{CLIENT_CERT_FILE_ENV}]",
    )
    connect.add_argument(
        "--key-file",
        metavar="PATH",
        help=f"the unencrypted private key of --cert-file [{CLIENT_KEY_FILE_ENV}]",
    )
    connect.add_argument(
        "--config", action=_Given, dest="config_json", default=env(_ENV + "CONFIG", "{}")
    )
    connect.add_argument("--path", dest="search_path", default=".")
    limits = serve.add_argument_group("limits (each guards the server against one client)")
    for option, field, kind, what in _LIMIT_OPTIONS:
        variable = _ENV + field.upper()
        limits.add_argument(
            option,
            action=_Given,
            dest=field,
            type=_whole_number if kind is int else _decimal_number,
            default=_number_from(variable, kind, getattr(_DEFAULTS, field), malformed),
            help=f"{what} [{variable}] (default: %(default)s)",
        )
    serve.set_defaults(given=frozenset(), malformed=malformed)
    connect.set_defaults(given=frozenset())
    return parser, serve


def main(argv: Sequence[str] | None = None) -> None:
    parser, serve_parser = _parsers()
    options = parser.parse_args(argv)
    if options.command == "serve" and (unused := _unused_flag(options)) is not None:
        serve_parser.error(unused)  # a usage error, as a flag of another command is
    if options.command == "serve" and (malformed := _malformed_variable(options)) is not None:
        _fail(malformed)
    try:  # read once, at start: a malformed value ends the command before anything runs
        options.stop_caps = StopCaps.from_environment()
    except ValueError as error:
        _fail(str(error), command=options.command)
    if options.command == "connect":
        raise SystemExit(connect(options))
    serve(options)


def _plugin_of(
    options: argparse.Namespace,
) -> tuple[PluginHost, dict[str, Any], BearerToken | None]:
    try:
        token = BearerToken.configured(options.token_file)
    except TokenError as error:
        _fail(str(error), command=options.command)
    config = _config_of(options)
    try:
        plugin_host = PluginHost.load(
            options.entrypoint, os.path.abspath(options.search_path), owns_process=True
        )
    except (ProviderError, ValueError) as error:
        _fail(str(error), command=options.command)
    return plugin_host, config, token


def _config_of(options: argparse.Namespace) -> dict[str, Any]:
    """The JSON object for ``init()``, named as it was given when it is none: ``--config``
    when typed, else ``LINCHKIT_PLUGIN_CONFIG``, as every SDK's example plugin names its
    ``--config``. Its text is never repeated: a config may hold a secret (before
    2026-12-06 a malformed one was orjson's message alone, naming neither)."""
    named = "--config" if "config_json" in options.given else _ENV + "CONFIG"
    try:
        config = orjson.loads(options.config_json)
    except orjson.JSONDecodeError:
        _fail(f"{named} is not valid JSON", command=options.command)
    if not isinstance(config, dict):
        _fail(f"{named} must be a JSON object", command=options.command)
    return config


def _websocket_cli(command: str) -> Any:
    try:
        from linchkit_plugin import _ws_cli
    except ImportError:  # pragma: no cover - depends on the installed extras
        _fail("WebSocket needs aiohttp: pip install 'linchkit-plugin[websocket]'", command=command)
    return _ws_cli


def connect(options: argparse.Namespace) -> int:
    refusal = websocket_refusal(options, dialling=True)
    if refusal is not None:
        _fail(refusal, command="connect")
    ws_cli = _websocket_cli("connect")
    context = ws_cli.gateway_tls(options)  # --url and its TLS files, before the import
    plugin_host, config, token = _plugin_of(options)
    log_to_stderr(info_from="linchkit_plugin.websocket")
    with exporting(
        lambda: plugin_host.hooks_left,
        plugin_id=options.plugin_id,
        version=options.plugin_version,
    ):
        return int(ws_cli.connect(options, plugin_host, config, token, context))


#: What ``serve --websocket``'s ``--log-level`` sets, as over HTTP it sets uvicorn's loggers:
#: the WebSocket server's (the host's frames it could not use, what the host says) and
#: aiohttp's, which serves it.
_WEBSOCKET_SERVER_LOGGERS = ("linchkit_plugin.websocket", "aiohttp")


def _serve_websocket(options: argparse.Namespace) -> None:
    plugin_host, config, token = _plugin_of(options)
    identity = (options.plugin_id, options.plugin_version)
    ws_cli = _websocket_cli("serve")
    log_to_stderr()  # after the plugin's import: a plugin that set up its logging keeps it
    for name in _WEBSOCKET_SERVER_LOGGERS:
        logging.getLogger(name).setLevel(_LOG_LEVELS[options.log_level])
    # Named as its hello names it (the class's id, else its name) when given no id.
    with exporting(
        lambda: plugin_host.hooks_left,
        plugin_id=plugin_host.identity(options.plugin_id)[0],
        version=options.plugin_version,
    ):
        ws_cli.serve_websocket(options, plugin_host, config, token, identity)


def serve(options: argparse.Namespace) -> None:
    if options.websocket:  # what the command line gave was refused (_unused_flag)
        refusal = (
            websocket_refusal(options)
            or _http_only_variable_refusal(options)
            or _http_limit_variable_refusal(options)
        )
        if refusal is not None:
            _fail(refusal)
        _server_limits(options, _WEBSOCKET_LIMITS)  # the ones it takes, checked as over HTTP
    _check_listening(options)
    if options.websocket:
        _serve_websocket(options)
        return
    try:
        from linchkit_plugin._uvicorn import HTTP_IMPLEMENTATIONS, run, server_config
    except ImportError:  # pragma: no cover - depends on the installed extras
        _fail("serving needs uvicorn: pip install 'linchkit-plugin[http]'")
    limits = _server_limits(options, [field for _, field, _, _ in _LIMIT_OPTIONS])
    plugin_host, config, token = _plugin_of(options)
    # The plugin's own lines as over WebSocket, ``LEVEL name: message`` (uvicorn's loggers
    # print on their own); after its import: a plugin that set up its logging keeps it.
    log_to_stderr()
    registering = _registry_settings(options)
    if options.http != "auto" and options.http not in HTTP_IMPLEMENTATIONS:
        _fail(f"--http {options.http} is not installed: pip install {options.http}")
    app = PluginApp(
        plugin_host,
        config=config,
        token=token,
        limits=limits,
        plugin_id=options.plugin_id,
        version=options.plugin_version,
        stop_caps=options.stop_caps,
    )
    _check_tls_files(options)
    try:
        uvicorn_config = server_config(
            app,
            limits,
            host=options.host,
            port=options.port,
            uds=options.uds,
            http=None if options.http == "auto" else options.http,
            loop=_fastest_loop(),
            log_level=options.log_level,
            tls_cert=options.tls_cert,
            tls_key=options.tls_key,
            client_ca=options.client_ca,
            stop_grace=options.stop_caps.grace,
        )
    except ValueError as error:
        _fail(str(error))

    def announce(address: str) -> None:
        methods = ", ".join(sorted(plugin_host.methods)) or "no methods"
        print(
            f"dispatcher-plugin: serving {options.entrypoint} ({methods}),"
            f" listening on {address} (Ctrl+C stops it)",
            file=sys.stderr,
            flush=True,
        )
        if token is None:  # said once the real address is known (--port 0)
            print(
                f"Warning: no bearer token configured (--token-file, {TOKEN_FILE_ENV} or"
                f" {TOKEN_ENV}): anybody who can reach {address} can call this plugin.",
                file=sys.stderr,
                flush=True,
            )

    registration: list[Registration] = []

    def register(sockets: Sequence[socket.socket]) -> None:
        if registering is None:
            return
        host, port = ("", 0) if options.uds else sockets[0].getsockname()[:2]
        registration.append(registering.registration(host, port))
        registration[0].start()

    async def deregister() -> None:
        for each in registration:  # before draining: no dispatcher sends another call
            await asyncio.to_thread(each.stop)
        if registering is not None and registration:  # ... once each has seen it leave
            await asyncio.sleep(registering.leave_delay)

    # OTEL_* variables: spans of traced calls go to their collector. Those still buffered
    # go last (the hooks' own among them), for what remains of the hooks' cap: a collector
    # that never answers keeps the stop within grace + hooks + the margin, not the
    # exporter's 10 s past the operator's caps. Given no id, the service is named as a
    # WebSocket hello names the plugin (the class's id, else its name): each call's span
    # names the id its envelope carries, but the service is named once, at start.
    with exporting(
        lambda: plugin_host.hooks_left,
        plugin_id=plugin_host.identity(app.plugin_id)[0],
        version=app.version,
    ):
        try:
            run(uvicorn_config, on_listening=announce, on_sockets=register, on_stopping=deregister)
        except StartFailed as failed:  # nothing listened, nothing registered
            _fail(str(failed))


def _unused_flag(options: argparse.Namespace) -> str | None:
    """Why ``serve`` must not start with a flag on its command line (``options.given``)
    that the mode it serves in would not use, rather than drop it unsaid: with a Unix
    socket, ``--host`` and ``--port``; with ``--websocket``, ``--http`` (uvicorn's HTTP
    implementation; the WebSocket server is aiohttp's), the TLS files and ``--uds`` (it
    serves plain ws:// on --host/--port), the limits it does not apply and the registry's
    flags (it registers nowhere). A usage error, as a flag of another command is: the
    flags named, never their values, and what made it a WebSocket server as it was given
    (``--websocket``, or ``LINCHKIT_PLUGIN_WEBSOCKET``). An empty flag says "none" over its
    variable, and is taken.

    Their variables are not the command line's: ``LINCHKIT_PLUGIN_HTTP``, ``_HOST`` and
    ``_PORT`` may be set for every run of an image and are not read where they do not
    apply; ``serve --websocket`` refuses the others in one line, naming the variable, as
    it refuses ``LINCHKIT_REGISTER_ETCD`` (``serve``)."""
    given = options.given
    if not options.websocket:
        flags = [flag for flag, field in (("--host", "host"), ("--port", "port")) if field in given]
        if not (options.uds and flags):
            return None
        if "uds" in given:
            unix_socket, instead = "--uds", "leave out --uds"
        else:
            unix_socket, instead = _ENV + "UDS", f"unset {_ENV}UDS"
        return (
            f"{_arguments(flags)}: not used with a Unix socket ({unix_socket}): the server"
            f" listens on it, not on --host/--port; leave {_them(flags)} out, or {instead}"
        )
    unused = f"not used over WebSocket ({_websocket_named(options)})"
    if "http" in given:
        return (
            f"argument --http: {unused}: it picks uvicorn's HTTP implementation, and the"
            " WebSocket server is aiohttp's; leave it out, or serve over HTTP"
        )
    if flags := [
        flag for flag, _, field in _HTTP_ONLY if field in given and getattr(options, field)
    ]:
        return (
            f"{_arguments(flags)}: {unused}, whose server {_PLAIN_WS}; leave {_them(flags)}"
            " out, or serve over HTTP for HTTPS, client certificates or a Unix socket"
        )
    if flags := [
        option
        for option, field, _, _ in _LIMIT_OPTIONS
        if field in given and field not in _WEBSOCKET_LIMITS
    ]:
        return (
            f"{_arguments(flags)}: {unused}, which applies {_LIMITS_IT_APPLIES};"
            f" leave {_them(flags)} out, or serve over HTTP"
        )
    if flags := flags_given(options, given):
        return (
            f"{_arguments(flags)}: {unused}: a WebSocket server is not registered, as a"
            " dispatcher dials a websocket target at its one url and finds none in a"
            f" registry; leave {_them(flags)} out, or serve over HTTP or gRPC to be registered"
        )
    return None


def _websocket_named(options: argparse.Namespace) -> str:
    """What made ``serve`` a WebSocket server, as the operator gave it: the flag when typed,
    else its variable (a refusal that named ``--websocket`` sent them looking for a flag
    nobody typed)."""
    return "--websocket" if "websocket" in options.given else _WEBSOCKET_ENV


def _over_http(options: argparse.Namespace) -> str:
    """How to serve over HTTP instead, undoing what ``_websocket_named`` names."""
    if "websocket" in options.given:
        return "serve over HTTP (without --websocket)"
    return f"serve over HTTP (unset {_WEBSOCKET_ENV})"


def _server_limits(options: argparse.Namespace, fields: Sequence[str]) -> ServerLimits:
    """The limits ``fields`` of ``options``, each checked as ``ServerLimits`` checks it, a
    refusal naming it as it was given: ``--max-connections`` when typed, else
    ``LINCHKIT_PLUGIN_MAX_CONNECTIONS`` (until 2026-12-06 the field, ``max_connections``,
    which the operator typed nowhere)."""
    for field in fields:
        try:  # one at a time, the others at their defaults: a refusal is this one's
            ServerLimits(**{field: getattr(options, field)})
        except ValueError as error:
            named = _LIMIT_FLAGS[field] if field in options.given else _ENV + field.upper()
            _fail(f"{named} {str(error).removeprefix(field + ' ')}")
    return ServerLimits(**{field: getattr(options, field) for field in fields})


def _malformed_variable(options: argparse.Namespace) -> str | None:
    """Why ``serve`` must not start with a number variable that is none (``_number_from``):
    unless its flag was typed, which wins over it and leaves it unread."""
    given_variables = {_ENV + field.upper() for field in options.given}
    for variable, refusal in options.malformed.items():
        if variable not in given_variables:
            return str(refusal)
    return None


def _arguments(flags: Sequence[str]) -> str:
    """``argument --a`` or ``arguments --a, --b``, as argparse names what it refuses."""
    return f"argument{'s' if len(flags) > 1 else ''} {', '.join(flags)}"


def _them(named: Sequence[str]) -> str:
    return "them" if len(named) > 1 else "it"


#: ``serve`` settings only its HTTP server takes: (option, variable, attribute).
_HTTP_ONLY = (
    ("--tls-cert", _ENV + "TLS_CERT", "tls_cert"),
    ("--tls-key", _ENV + "TLS_KEY", "tls_key"),
    ("--client-ca", _ENV + "CLIENT_CA", "client_ca"),
    ("--uds", _ENV + "UDS", "uds"),
)
#: What ``serve --websocket`` does instead of what ``_HTTP_ONLY`` asks, as every SDK's
#: WebSocket server does.
_PLAIN_WS = (
    "listens on --host/--port and serves plain ws:// only (put a TLS terminator in front"
    " of it for wss://)"
)


def _check_tls_files(options: argparse.Namespace) -> None:
    """Refuse a TLS file of the HTTP server that is not a regular file or is too large to
    be one, in one line naming the flag or variable it came by. OpenSSL reads them by
    their paths, whole: a FIFO blocked the start for ever, /dev/zero grew it without end."""
    for flag, variable, field in _HTTP_ONLY[:3]:
        path = getattr(options, field)
        if not path:
            continue
        try:
            check_setting_file(path, limit=PEM_FILE_BYTES)
        except OSError as error:
            named = flag if field in options.given else variable
            why = (error.strerror or type(error).__name__).lower()
            # Never a value that is no path: PEM text pasted into the variable, a key.
            shown = path if path.isprintable() and "-----BEGIN" not in path else "its file"
            _fail(f"{named}: cannot read {shown}: {why}")
    if options.tls_cert and options.tls_key:
        _check_tls_contents(options)


def _check_tls_contents(options: argparse.Namespace) -> None:
    """Load the TLS files as uvicorn will, and refuse them in one line naming them when
    OpenSSL cannot use them (a file that is no PEM, a key that is not the certificate's):
    uvicorn's own failure was ``ssl.SSLError``'s traceback. A key needing a password is
    refused too, rather than asked for on a terminal nobody watches."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert, key = (
        "--tls-cert" if "tls_cert" in options.given else _ENV + "TLS_CERT",
        "--tls-key" if "tls_key" in options.given else _ENV + "TLS_KEY",
    )
    try:
        context.load_cert_chain(options.tls_cert, options.tls_key, password=lambda: b"")
    except (ssl.SSLError, OSError) as error:
        _fail(f"{cert}, {key}: cannot use them as a PEM certificate and its key: {_ssl_why(error)}")
    if options.client_ca:
        ca = "--client-ca" if "client_ca" in options.given else _ENV + "CLIENT_CA"
        try:
            context.load_verify_locations(options.client_ca)
        except (ssl.SSLError, OSError) as error:
            _fail(f"{ca}: cannot use it as PEM CA certificates: {_ssl_why(error)}")


def _ssl_why(error: Exception) -> str:
    """OpenSSL's reason (``no certificate or crl found``; ``not PEM`` for its ``PEM lib``,
    which says no more), without its library and source line."""
    reason = getattr(error, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    text = str(getattr(error, "strerror", None) or type(error).__name__)
    text = re.sub(r"^\[[^]]*\] *| *\(_ssl\.c:\d+\)$", "", text)
    return "not PEM, or the key is not the certificate's" if text == "PEM lib" else text


def _http_only_variable_refusal(options: argparse.Namespace) -> str | None:
    """Why ``serve --websocket`` must not start with TLS files or a Unix socket from its
    environment (from its command line: ``_unused_flag``): starting anyway would serve
    without the TLS the operator asked for."""
    variables = [
        variable
        for _, variable, field in _HTTP_ONLY
        if field not in options.given and getattr(options, field)
    ]
    if not variables:
        return None
    return (
        f"{', '.join(variables)}: not used over WebSocket ({_websocket_named(options)}),"
        f" whose server {_PLAIN_WS}; unset {_them(variables)}, or {_over_http(options)} for"
        " HTTPS, client certificates or a Unix socket"
    )


#: The limits ``serve --websocket`` applies: --max-connections, the sessions served at once
#: (past them an upgrade is refused 503), and --header-timeout, the time a connection has
#: for its upgrade's head. The others guard what a WebSocket server does not do (bodies,
#: batches, keep-alive, compressed answers) or does otherwise (its heads' size is aiohttp's
#: per-line limit), and are refused: from the command line by ``_unused_flag``, from the
#: environment by ``_http_limit_variable_refusal``.
_WEBSOCKET_LIMITS = ("max_connections", "header_timeout")
_LIMITS_IT_APPLIES = "only --max-connections and --header-timeout of the limits"


def _http_limit_variable_refusal(options: argparse.Namespace) -> str | None:
    """Why ``serve --websocket`` must not start with a limit from its environment that it
    would not apply: the operator would believe it in force. A variable that says the
    default asks nothing of it, and is taken."""
    variables = [
        _ENV + field.upper()
        for _, field, _, _ in _LIMIT_OPTIONS
        if field not in _WEBSOCKET_LIMITS
        and field not in options.given
        and getattr(options, field) != getattr(_DEFAULTS, field)
    ]
    if not variables:
        return None
    return (
        f"{', '.join(variables)}: not used over WebSocket ({_websocket_named(options)}),"
        f" which applies {_LIMITS_IT_APPLIES}; unset {_them(variables)}, or"
        f" {_over_http(options)}"
    )


def _check_listening(options: argparse.Namespace) -> None:
    """Where to listen, checked before anything starts: the socket layer would take port
    99999 as 34463 (modulo 65536) and an empty host as every interface."""
    if options.uds:
        _try_unix_socket(options.uds)
        return
    # Named as given: the flag when typed, else the variable (the docker provider sets them).
    port = "--port" if "port" in options.given else _ENV + "PORT"
    host = "--host" if "host" in options.given else _ENV + "HOST"
    if not 0 <= options.port <= 65535:
        _fail(f"{port} must be in 0-65535 (0: any free port), not {options.port}")
    if not options.host.strip():
        _fail(f"{host} is empty: name the interface (127.0.0.1; 0.0.0.0 or :: for every one)")
    try:
        found = socket.getaddrinfo(options.host, options.port, type=socket.SOCK_STREAM)
        if options.port:
            _try_binding(found[0])
    except (OSError, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or error
        _fail(f"cannot listen on {options.host}:{options.port}: {reason}")


def _try_binding(address: tuple[Any, ...]) -> None:
    """Bind ``address`` (a ``getaddrinfo`` entry) and let it go: a port taken fails here,
    in one line and exit 1 as every SDK's ``serve`` does, rather than in uvicorn's log with
    its exit 3. Bound as asyncio binds (``SO_REUSEADDR``): a port in TIME_WAIT is free."""
    family, kind, protocol, _, where = address
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(where)


def _try_unix_socket(path: str) -> None:
    """Make a Unix socket beside ``path`` and take it away again: a folder that is
    missing, not writable or full fails here, in one line and exit 1, rather than as the
    event loop's traceback. A path already there is left to the server (a socket of an
    earlier run).

    Beside it, under a name of its own, never at ``path``: a host may be watching that
    name for the plugin's socket (the Docker provider pins the first socket it finds
    there), and a probe it found there, then removed, read as the plugin tampering with
    its socket: the container refused every call and was replaced."""
    if os.path.lexists(path):
        try:
            mode = os.stat(path).st_mode
        except OSError:  # a dangling link: binding fails as it says
            mode = None
        if mode is not None and not stat.S_ISSOCK(mode):
            # The event loop replaces a socket there, and fails on anything else with a
            # traceback ("Address already in use"): a file is no earlier run's socket.
            _fail(
                f"cannot listen on the Unix socket {path}: something that is no socket is"
                " there; remove it, or listen on another path"
            )
        return
    folder, name = os.path.split(path)
    # No longer than the served name, so a path the server can bind the probe can too.
    probe_path = os.path.join(folder, f".{os.getpid()}"[: max(len(name), 1)])
    if probe_path == path or os.path.lexists(probe_path):
        probe_path = os.path.join(folder, f".{os.getpid()}-probe")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.bind(probe_path)
        os.unlink(probe_path)
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise OSError("AF_UNIX path too long")
    except OSError as error:
        _fail(f"cannot listen on the Unix socket {path}: {error.strerror or error}")


#: The longest path a Unix socket takes (``sun_path``, 108 bytes on Linux).
_UNIX_PATH_MAX = 108


def _registry_settings(options: argparse.Namespace) -> RegistrySettings | None:
    """How to register in etcd, if at all; every registry setting checked before serving,
    so a mistake fails at once rather than after the server started."""
    try:
        return registry_settings(options, kind="url", host=None if options.uds else options.host)
    except ValueError as error:
        _fail(str(error))


def _fail(message: str, *, command: str = "serve") -> NoReturn:
    """End ``command`` (``serve``, ``connect``) with status 1 and one line that it begins,
    ``serve: LINCHKIT_PLUGIN_TLS_CERT: …``, as every SDK's executable says why it cannot
    run (until 2026-12-06 ``Error: …``)."""
    print(f"{command}: {message}", file=sys.stderr)
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
