"""The ``dispatcher`` command group and what its commands share: the session (which
manifest, how much to log), the ``-m`` and ``-o`` options, loading the manifest, running a
dispatcher for one command, printing tables.

``-v``/``--verbose`` and ``--log-level`` go before the command or after it (``dispatcher
serve -v`` as ``dispatcher -v serve``), on every command and group: the group's classes
(``_Group``, ``_Command``) give each its own copy of ``logging_options``, so no command
declares them. ``-v`` counts wherever it is given (``-v serve -v`` is ``-vv``); a
``--log-level`` overrides them, the last one given winning. ``-m`` goes after the commands
that read a manifest (``manifest_option``).

Exit codes: 0 success; 1 a call failed or a target is unhealthy; 2 bad usage or an
invalid manifest. Errors are printed as one line (or one JSON object for ``call``),
never as a traceback.
"""

from __future__ import annotations

import asyncio
import difflib
import importlib
import logging
import math
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click
import orjson

from dispatcher._dispatcher import Dispatcher
from dispatcher.audit import AuditLogError
from dispatcher.cli._output import Output, OutputError, output_lost
from dispatcher.config import Manifest, ManifestError, load_manifest
from dispatcher.identity import Credentials
from dispatcher.telemetry import CallContextFilter, formatter_for
from dispatcher.telemetry.logs import OneLineFormatter
from linchkit_plugin.argument_parser import refused_arguments
from linchkit_plugin.errors import DispatchError
from providers._log_lines import printable

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILED = 1
EXIT_USAGE = 2
#: What a shell reports for a command ended by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130


MANIFEST_HELP = "Manifest file (YAML or TOML)."


@dataclass(slots=True)
class _Session:
    """What the group's options decide for every command."""

    manifest: str = "plugins.yaml"
    #: ``-v`` given so far, before and after the command's name; ``--log-level``'s last.
    verbose: int = 0
    log_level: str | None = None
    #: The handlers ``main`` put on the root logger (none when the host had its own).
    log_handlers: list[logging.Handler] = field(default_factory=list)

    @property
    def level(self) -> str:
        if self.log_level:
            return self.log_level.upper()
        return ("WARNING", "INFO", "DEBUG")[min(self.verbose, 2)]


def _more_verbose(context: click.Context, _: click.Parameter, value: int) -> None:
    if value:
        current = context.ensure_object(_Session)
        current.verbose += value
        _relevel(current)


def _set_log_level(context: click.Context, _: click.Parameter, value: str | None) -> None:
    if value is not None:
        current = context.ensure_object(_Session)
        current.log_level = value
        _relevel(current)


def _relevel(current: _Session) -> None:
    """An option after the command's name, parsed once ``main`` set logging up: the level
    it set, changed. Left alone where ``main`` set nothing up (the host had handlers)."""
    if current.log_handlers:
        logging.getLogger().setLevel(current.level)
        _cap_sdk_loggers(current.level)


#: Libraries whose DEBUG lines carry secrets: botocore logs every request whole, the
#: session token (``X-Amz-Security-Token``), the access key id in ``Authorization`` and
#: the body, where CreateFunction carries the function's environment (its passwords).
_SDK_LOGGERS = ("botocore", "aiobotocore", "urllib3", "s3transfer", "aiohttp")


def _cap_sdk_loggers(level: str) -> None:
    """``-vv`` is for the dispatcher's own debug lines: the AWS SDK's go no lower than
    INFO, and no lower than the root's level (a level of their own below it would let
    their INFO lines through at WARNING)."""
    capped = max(logging.INFO, logging.getLevelName(level))
    for name in _SDK_LOGGERS:
        logging.getLogger(name).setLevel(capped)


def logging_options() -> list[click.Option]:
    """``-v`` and ``--log-level``, new objects for each command that takes them. They
    write the session (``_Session``), which ``main`` logs by."""
    return [
        click.Option(
            ["-v", "--verbose"],
            count=True,
            expose_value=False,
            callback=_more_verbose,
            help="Log more: -v for info, -vv for debug (before or after the command).",
        ),
        click.Option(
            ["--log-level"],
            type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
            default=None,
            expose_value=False,
            callback=_set_log_level,
            help="Log level (overrides -v). Logs, plugin output included, go to stderr.",
        ),
    ]


#: ``Context.meta`` key (shared by every context of a run): the arguments ``dispatcher``
#: was given, so that a refusal says where an argument stands without quoting it.
_COMMAND_LINE = "dispatcher.command_line"


def _first_position(context: click.Context, arguments: Sequence[str]) -> int:
    """Where ``arguments[0]`` stands on the command line, counted as the shell counts
    ``$1``, ``$2``…: ``arguments`` are what is left of it once the group and the command
    names before them are read (from the command's own first argument when unknown)."""
    line: list[str] = context.meta.get(_COMMAND_LINE, [])
    before = len(line) - len(arguments)
    return before + 1 if before >= 0 and line[before:] == list(arguments) else 1


class _RefusingWithoutText(click.Command):
    """Refuses an argument it does not expect without quoting it: click's ``Got unexpected
    extra argument (…)`` and ``No such command '…'`` repeated it, and a token pasted in
    the wrong place went to stderr and the logs with them. An unknown option given with
    two dashes is named without its value by click itself (``No such option '--name'``);
    one given with a single dash by its place (``No such option (argument #4, its text is
    not shown)``), as every SDK's executable names it: what follows one dash may be
    anything pasted after it, and click named the first letter it did not take (``-abc123``
    was ``No such option '-a'``, the option nobody typed)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if ctx.parent is None:  # the whole command line, for the positions of the others
            ctx.meta.setdefault(_COMMAND_LINE, list(args))
        given = list(args)
        allowed = ctx.allow_extra_args
        ctx.allow_extra_args = True  # what is left is refused here, not by click
        try:
            rest = super().parse_args(ctx, args)
        except click.NoSuchOption as unknown:
            if unknown.option_name.startswith("--"):
                raise
            position = _first_position(ctx, given) + self._refused_at(ctx, given)
            ctx.fail(f"No such option (argument #{position}, its text is not shown).")
        finally:
            ctx.allow_extra_args = allowed
        if rest and not allowed and not ctx.resilient_parsing:
            ctx.fail(f"Got {refused_arguments(given, rest, _first_position(ctx, given))}.")
        return rest

    def _refused_at(self, ctx: click.Context, given: Sequence[str]) -> int:
        """Where in ``given`` click's parser meets the unknown option it refused: the
        shortest head of ``given`` it refuses the same way ends with it. The parser reads
        from the left, so a head reads as the whole line did up to its end; an option's
        value is never taken for one (a head ending at the option lacks the value, a
        different refusal). Only the parser runs, none of the options' callbacks."""
        for end in range(1, len(given) + 1):
            try:
                self.make_parser(ctx).parse_args(args=list(given[:end]))
            except click.NoSuchOption:
                return end - 1
            except click.UsageError:
                continue
        return len(given) - 1  # not reached: the whole line is refused so


class _Command(_RefusingWithoutText):
    """A ``dispatcher`` command: takes ``logging_options`` after its name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(logging_options())


class _Group(_RefusingWithoutText, click.Group):
    """The ``dispatcher`` group, and the groups under it (``dlq``, ``rollout``): each takes
    ``logging_options``, and so does every command and group made from it."""

    command_class = _Command
    group_class: type[click.Group] | type[type] = type  # a group's groups are of its class

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(logging_options())

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        unknown = not name.startswith("-") and self.get_command(ctx, name) is None
        if unknown and not ctx.resilient_parsing:  # named without its text (the class's)
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=3)
            suggestion = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            position = _first_position(ctx, args)
            ctx.fail(f"No such command (argument #{position}, its text is not shown).{suggestion}")
        return super().resolve_command(ctx, args)


class _Commands(_Group):
    """The ``dispatcher`` group itself: a command's module is imported when the command is
    looked up (``COMMAND_MODULES``), not when the program starts. Importing them all up
    front cost every command the imports of the others (the gateway's web app and
    aiohttp's server for ``serve``, the benchmark's machinery, the local Lambda's emulator,
    the jobs' stores): about half of a command's start-up, measured on ``list``."""

    group_class = _Group  # ``dlq``, ``rollout``, ``audit``: groups of their own commands

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """click's, with output that cannot be written said in one line, exit 1.

        A result written to a full disk (``> result.json``) or to a closed standard output
        (``>&-``) was a traceback, or nothing at all and exit 0: the result lost, silently.
        (A reader that went away, ``| head``, is click's: it exits quietly.)"""
        sys.stdout = Output.around(sys.stdout)
        try:
            return super().main(*args, **kwargs)
        except OutputError as error:
            output_lost(error, EXIT_FAILED)

    def invoke(self, context: click.Context) -> Any:
        """The command; Ctrl-C that it does not take itself ends it as a shell expects:
        exit 130 (click's own said "Aborted!" and exit 1, a failure's code)."""
        try:
            return super().invoke(context)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None

    def list_commands(self, context: click.Context) -> list[str]:
        return sorted({*COMMAND_MODULES, *self.commands})

    def get_command(self, context: click.Context, name: str) -> click.Command | None:
        module = COMMAND_MODULES.get(name)
        if name not in self.commands and module is not None:
            importlib.import_module(f"dispatcher.cli.{module}")  # registers it on ``main``
        return super().get_command(context, name)


#: Each command's module (``dispatcher.cli.<module>``), where it registers itself on
#: ``main``; ``tests/test_cli.py`` checks the table against the modules.
COMMAND_MODULES = {
    "audit": "audit",
    "bench": "bench",
    "call": "calls",
    "deploy": "deploy",
    "dlq": "jobs",
    "health": "calls",
    "inspect": "inspect",
    "job": "jobs",
    "jobs": "jobs",
    "list": "manifest",
    "local-lambda": "local_lambda",
    "logs": "logs",
    "new": "new",
    "remove": "remove",
    "rollout": "rollout",
    "schema": "schema",
    "serve": "serve",
    "submit": "jobs",
    "top": "top",
    "validate": "manifest",
}


def _manifest_path(context: click.Context, parameter: click.Parameter, value: str) -> str:
    # An empty path reads as the current folder: "cannot read: is a directory".
    if not value:
        raise click.BadParameter("empty: name the manifest file", context, parameter)
    return value


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-m",
    "--manifest",
    default="plugins.yaml",
    show_default=True,
    envvar="DISPATCHER_MANIFEST",
    show_envvar=True,
    callback=_manifest_path,
    help=MANIFEST_HELP,
)
@click.version_option(package_name="linchkit-dispatcher", prog_name="dispatcher")
@click.pass_context
def main(context: click.Context, manifest: str) -> None:
    """Call LinchKit plugins wherever they run.

    Shell completion: eval "$(_DISPATCHER_COMPLETE=bash_source dispatcher)" (zsh_source,
    fish_source for the other shells).
    """
    current = context.ensure_object(_Session)  # made by -v or --log-level, if given
    current.manifest = manifest
    root = logging.getLogger()
    before = list(root.handlers)
    logging.basicConfig(level=current.level, stream=sys.stderr)
    current.log_handlers = [each for each in root.handlers if each not in before]
    if current.log_handlers:
        _cap_sdk_loggers(current.level)
    for handler in current.log_handlers:
        handler.setFormatter(OneLineFormatter("%(levelname)s %(name)s: %(message)s"))


def session(context: click.Context) -> _Session:
    session = context.find_object(_Session)
    assert session is not None, "set by main() before any command runs"
    return session


def _override_manifest(
    context: click.Context, parameter: click.Parameter, value: str | None
) -> None:
    if value is not None:
        session(context).manifest = _manifest_path(context, parameter, value)


#: ``-m`` after the command name as well as before it (``dispatcher call x.y -m other.yaml``).
manifest_option = click.option(
    "-m",
    "--manifest",
    default=None,
    expose_value=False,
    callback=_override_manifest,
    help="Manifest file, if not given before the command.",
)

#: ``--output json`` for the commands that print tables.
output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Print a table, or JSON for scripts.",
)


def credential_options(command: F) -> F:
    """``--api-key`` and ``--token`` (or their environment variables), for the commands
    that call as the gateway's callers do (``credentials_from`` passes them on)."""
    command = click.option(
        "--token",
        envvar="DISPATCHER_TOKEN",
        default=None,
        callback=credential,
        help="Authenticate with this bearer JWT (the manifest's auth.jwt); prefer the env var.",
    )(command)
    return click.option(
        "--api-key",
        envvar="DISPATCHER_API_KEY",
        default=None,
        callback=credential,
        help="Authenticate with this API key (the manifest's auth.api_keys); prefer the env var.",
    )(command)


def credential(context: click.Context, parameter: click.Parameter, value: str | None) -> str | None:
    """A secret given on the command line or in the environment, as a header can carry it.

    A trailing line break (``export DISPATCHER_TOKEN=$(cat token)`` keeps none, a file
    pasted whole does) is dropped; any other control character is refused without the
    secret's text: it was a traceback from the HTTP client (``Forbidden control
    character detected in headers``)."""
    if value is None:
        return None
    value = value.rstrip("\r\n")
    if not value or any(ord(character) < 0x20 or ord(character) == 0x7F for character in value):
        source = context.get_parameter_source(parameter.name or "")
        where = (
            f" (from {parameter.envvar})"
            if source is click.core.ParameterSource.ENVIRONMENT
            else ""
        )
        raise click.BadParameter(
            f"empty, or holds a control character{where}; its text is not shown", context
        )
    return value


def load(context: click.Context) -> Manifest[Any]:
    try:
        manifest = load_manifest(session(context).manifest)
    except ManifestError as error:
        click.echo(str(error), err=True)
        context.exit(EXIT_USAGE)
        raise  # unreachable: exit raises
    _log_as(manifest, session(context).log_handlers)
    return manifest


def _log_as(manifest: Manifest[Any], handlers: Sequence[logging.Handler]) -> None:
    """With ``telemetry.logs``, the handlers ``main`` installed write the manifest's format
    too. The dispatcher's records go to its own handler only (``telemetry.logs``); these
    write the other loggers' (``aiohttp.access``, ``asyncio``), so with ``json`` every
    line on stderr is JSON."""
    logs = manifest.telemetry.logs
    if logs.format is None:
        return
    for handler in handlers:
        handler.setFormatter(formatter_for(logs.format))
        handler.addFilter(CallContextFilter())


class Seconds(click.FloatRange):
    """A range of seconds that refuses NaN, which passes every comparison of a range."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if math.isnan(seconds):
            self.fail("nan is not a number of seconds", param, ctx)
        return seconds


def credentials_from(
    manifest: Manifest[Any], api_key: str | None, token: str | None
) -> Credentials | None:
    """What ``--api-key`` and ``--token`` present, as the gateway would pass them on: to
    the manifest's ``auth``; without one there is nothing to check them and every call is
    allowed, so they are left out (a ``DISPATCHER_API_KEY`` set for another manifest
    refused every call here, as the library refuses credentials it cannot check)."""
    if manifest.auth is None or (api_key is None and token is None):
        return None
    bearer = f"Bearer {token}" if token is not None else None
    return Credentials(authorization=bearer, api_key=api_key)


def only_plugin(manifest: Manifest[Any], plugin_id: str) -> Manifest[Any]:
    """``manifest`` with only the versions of ``plugin_id`` and of the plugins its methods
    fall back to, and theirs (all of them, if none matches, so the dispatcher's own "no
    plugin … known: …" answer still lists what exists): a command about one plugin starts
    no other it cannot need."""
    if not any(plugin.id == plugin_id for plugin in manifest.plugins):
        return manifest
    ids = {plugin_id}
    queue = [plugin_id]
    while queue:
        current = queue.pop()
        for plugin in manifest.plugins:
            if plugin.id != current:
                continue
            for method in plugin.methods:
                fallback = plugin.policies_of(method).fallback
                if fallback is not None and fallback.plugin not in ids:
                    ids.add(fallback.plugin)
                    queue.append(fallback.plugin)
    chosen = [plugin for plugin in manifest.plugins if plugin.id in ids]
    return manifest.model_copy(update={"plugins": chosen})


def run_with_dispatcher(manifest: Manifest[Any], job: Callable[[Dispatcher], Awaitable[T]]) -> T:
    """Start a dispatcher for ``manifest``, run ``job`` on it, close it. An audit log that
    cannot be appended to (cut short, locked by a stuck writer) is one line on stderr
    and exit 2: a call that cannot be recorded is not made."""

    async def session() -> T:
        async with Dispatcher(manifest) as dispatcher:
            return await job(dispatcher)

    try:
        return asyncio.run(session())
    except AuditLogError as error:
        click.echo(f"error: {error}", err=True)
        raise click.exceptions.Exit(EXIT_USAGE) from None


def without_audit(manifest: Manifest[Any]) -> Manifest[Any]:
    """``manifest`` for a command that makes no call (``health``, ``logs``): it needs
    no audit log, so it neither opens the gateway's (which its user may not be allowed
    to write, or which may be damaged) nor waits for its lock."""
    return manifest.model_copy(update={"audit": None})


def run_or_report(
    context: click.Context, manifest: Manifest[Any], job: Callable[[Dispatcher], Awaitable[T]]
) -> T:
    """``run_with_dispatcher``; a ``DispatchError`` is printed on stderr as its wire form
    (``{"error": {...}}``, what scripts parse) and the command exits 1."""
    try:
        return run_with_dispatcher(manifest, job)
    except DispatchError as error:
        click.echo(orjson.dumps({"error": error.to_wire()}).decode(), err=True)
        context.exit(EXIT_FAILED)
        raise  # unreachable: exit raises


def table(rows: Sequence[Sequence[str]]) -> None:
    # Cells come from plugins (an error's type) and stores others write: a control
    # character would drive the operator's terminal (retitle it, clear it, hide a row).
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
