"""The plugin executable's command line (``linchkit_plugin.grpc_server.main``): which mode
it runs in, read before the plugin is built.

* ``serve [--address HOST:PORT] [--register-etcd URL …]``: service mode, with the bearer
  token callers must present (``LINCHKIT_PLUGIN_TOKEN_FILE`` or ``LINCHKIT_PLUGIN_TOKEN``,
  docs/security.md) and the registry's flags, shared with ``dispatcher-plugin serve``
  (``_registry_options``, docs/registry.md);
* no arguments, with the magic cookie in the environment: subprocess mode, started by a
  host; no token is read, AutoMTLS admits only the host that launched the plugin;
* anything else: a hint on stderr, for whoever ran it by hand.

Either mode reads how long its stop waits (``LINCHKIT_PLUGIN_STOP_GRACE_MS`` and
``_STOP_HOOKS_MS``, ``linchkit_plugin.stopping``); a malformed value ends it at start.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NamedTuple

from linchkit_plugin._registry_options import add_registry_options
from linchkit_plugin.argument_parser import RedactingArgumentParser
from linchkit_plugin.auth import TOKEN_ENV, TOKEN_FILE_ENV, BearerToken, TokenError
from linchkit_plugin.handshake import MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE
from linchkit_plugin.listen import address_mistake, host_and_port
from linchkit_plugin.registry import REGISTER_ETCD_PASSWORD_ENV
from linchkit_plugin.stopping import MAX_STOP_MS, STOP_GRACE_ENV, STOP_HOOKS_ENV, StopCaps

__all__ = ["Launch", "read_command_line"]

_HINT = (
    "This is a LinchKit plugin: it is started by the dispatcher, not by hand.\n"
    "To run it as a gRPC service instead: {program} serve --address 127.0.0.1:50051\n"
)

_SERVE_ENVIRONMENT = f"""\
environment (docs/registry.md, docs/security.md):
  {TOKEN_FILE_ENV}, {TOKEN_ENV}
      the bearer token every call must carry (without it anyone may call)
  {REGISTER_ETCD_PASSWORD_ENV}
      the password of --register-etcd-user: no flag takes it, a command line shows in ps
  [LINCHKIT_...] after a flag above
      the variable that flag reads when it is not given
  {STOP_GRACE_ENV}, {STOP_HOOKS_ENV}
      on SIGTERM, the milliseconds the calls in flight get to finish, then the stop and
      destroy hooks together, 0-{MAX_STOP_MS} (default 5000 each; 0 does not wait)
"""


class Launch(NamedTuple):
    """How the executable runs: service mode (``arguments``, ``serve``'s, and the token
    callers must present, if one is configured) or subprocess mode (``arguments`` None),
    and how long its stop waits (``stop_caps``)."""

    arguments: argparse.Namespace | None
    token: BearerToken | None
    stop_caps: StopCaps = StopCaps()


def read_command_line(argv: Sequence[str]) -> Launch | None:
    """How ``argv`` (without the program's name) runs the executable; None once the reason
    it cannot run is on stderr (exit status 1). ``--help`` exits, as argparse does."""
    arguments: argparse.Namespace | None = None
    if argv and argv[0] == "serve":
        parser = RedactingArgumentParser(  # refuses without quoting a value
            prog=f"{os.path.basename(sys.argv[0])} serve",
            first_position=2,
            description="Serve the plugin as a gRPC service until SIGTERM or Ctrl+C.",
            epilog=_SERVE_ENVIRONMENT,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument(
            "--address", default="127.0.0.1:0", help="host:port to listen on (%(default)s)"
        )
        add_registry_options(parser, kind="address")
        arguments = parser.parse_args(argv[1:])
        if host_and_port(arguments.address) is None:
            sys.stderr.write(address_mistake(arguments.address) + "\n")
            return None
    elif os.environ.get(MAGIC_COOKIE_KEY) != MAGIC_COOKIE_VALUE:
        sys.stderr.write(_HINT.format(program=os.path.basename(sys.argv[0])))
        return None
    token: BearerToken | None = None
    if arguments is not None:  # service mode only: in subprocess mode AutoMTLS admits the host
        try:
            token = BearerToken.configured(os.environ.get(TOKEN_FILE_ENV) or None)
        except TokenError as error:
            sys.stderr.write(f"serve: {error}\n")
            return None
    try:
        stop_caps = StopCaps.from_environment()
    except ValueError as error:
        sys.stderr.write(f"{'serve: ' if arguments is not None else ''}{error}\n")
        return None
    return Launch(arguments, token, stop_caps)
