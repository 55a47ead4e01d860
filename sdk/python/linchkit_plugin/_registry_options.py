"""The registry's command-line options, defined once for every executable of the SDK that
serves a plugin dispatchers call by its address: ``dispatcher-plugin serve`` (HTTP) and
a plugin executable's ``serve --address`` (the gRPC service). docs/registry.md.

Each option has its variable (``LINCHKIT_REGISTER_*``, ``LINCHKIT_ADVERTISE``,
``LINCHKIT_LEAVE_DELAY``), which orchestrators set, and a flag given wins over it.
Messages name a setting as it was given: the flag when it came on the command line, the
variable when it came from the environment, both when it was not given at all.

etcd's password has a variable and no flag: a command line shows in the process list.
``--register-etcd-password`` is there only to be refused by name (argparse's usage
error, status 2), its value never repeated, rather than met as an unknown option.

A WebSocket server registers nowhere: a dispatcher dials a ``websocket`` target at its
one ``url`` (a fleet of them has no ``instances``), so ``websocket_refusal`` says so to
one that was told to register by ``LINCHKIT_REGISTER_ETCD``, rather than letting it
believe it did, and ``flags_given`` names the registry flags its command line gave, for
it to refuse as a usage error (``--register-etcd`` too, since 2026-12-06).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from linchkit_plugin.registry import (
    ADVERTISE_ENV,
    DEFAULT_LEAVE_DELAY,
    DEFAULT_TTL,
    LEAVE_DELAY_ENV,
    REGISTER_ETCD_CA_FILE_ENV,
    REGISTER_ETCD_CERT_FILE_ENV,
    REGISTER_ETCD_ENV,
    REGISTER_ETCD_KEY_FILE_ENV,
    REGISTER_ETCD_PASSWORD_ENV,
    REGISTER_ETCD_USER_ENV,
    REGISTER_PREFIX_ENV,
    REGISTER_TTL_ENV,
    EtcdAccess,
    Registration,
    advertised_value,
    check_prefix,
)

__all__ = [
    "RegistrySettings",
    "add_registry_options",
    "flags_given",
    "registry_settings",
    "websocket_refusal",
]

#: What a server registers: ``{"url": …}`` (HTTP) or ``{"address": …}`` (gRPC).
Kind = Literal["url", "address"]

#: The most seconds a server keeps answering after it left the registry.
_MAX_LEAVE_DELAY = 600.0


@dataclass(frozen=True)
class _Option:
    flag: str
    variable: str
    metavar: str
    help: str

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


_ETCD = _Option(
    "--register-etcd", REGISTER_ETCD_ENV, "URL", "register in the etcd at URL while serving"
)
_PREFIX = _Option(
    "--register-prefix",
    REGISTER_PREFIX_ENV,
    "PREFIX",
    "under this key prefix, e.g. /linchkit/plugins/echo",
)
_ADVERTISE = _Option(
    "--advertise",
    ADVERTISE_ENV,
    "ADDRESS",
    "where dispatchers reach this server (default: where it listens; required when it"
    " listens on 0.0.0.0 or ::)",
)
_TTL = _Option(
    "--register-ttl",
    REGISTER_TTL_ENV,
    "SECONDS",
    "a killed server leaves the registry this long after its last renewal, at least 2"
    f" (default: {DEFAULT_TTL})",
)
_LEAVE_DELAY = _Option(
    "--leave-delay",
    LEAVE_DELAY_ENV,
    "SECONDS",
    "on SIGTERM, keep answering this long after leaving the registry, while dispatchers"
    f" learn it left, 0-600 (default: {DEFAULT_LEAVE_DELAY:g})",
)
_CA_FILE = _Option(
    "--register-etcd-ca-file",
    REGISTER_ETCD_CA_FILE_ENV,
    "PEM",
    "https://: PEM roots that verify etcd (default: the system's)",
)
_CERT_FILE = _Option(
    "--register-etcd-cert-file",
    REGISTER_ETCD_CERT_FILE_ENV,
    "PEM",
    "https://: the client certificate to present to etcd",
)
_KEY_FILE = _Option(
    "--register-etcd-key-file",
    REGISTER_ETCD_KEY_FILE_ENV,
    "PEM",
    "the unencrypted key of --register-etcd-cert-file",
)
_USER = _Option(
    "--register-etcd-user",
    REGISTER_ETCD_USER_ENV,
    "NAME",
    f"register as this etcd user, whose password is read from {REGISTER_ETCD_PASSWORD_ENV}"
    " only (over http:// only to a loopback etcd)",
)
_OPTIONS = (_ETCD, _PREFIX, _ADVERTISE, _TTL, _LEAVE_DELAY, _CA_FILE, _CERT_FILE, _KEY_FILE, _USER)
#: ``EtcdAccess``'s fields that options set (the password is the variable's alone).
_ACCESS = {"ca_file": _CA_FILE, "cert_file": _CERT_FILE, "key_file": _KEY_FILE, "user": _USER}
_ADVERTISED = {
    "url": ("URL_OR_ADDRESS", "a URL, or host:port for http://host:port"),
    "address": ("HOST:PORT", "host:port"),
}


class _PasswordRefused(argparse.Action):
    """``--register-etcd-password``: refused by name; whatever followed it is not repeated."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        raise argparse.ArgumentError(
            self,
            f"no flag takes etcd's password, a command line shows in the process list:"
            f" set {REGISTER_ETCD_PASSWORD_ENV} instead",
        )


def add_registry_options(
    parser: argparse.ArgumentParser, *, kind: Kind, action: type[argparse.Action] | str = "store"
) -> None:
    """The registry's flags on ``parser``, in a group of their own; ``kind``: what the
    server registers, which is what ``--advertise`` takes; ``action``: how each stores its
    value (one that notes the flags given: ``flags_given``)."""
    group = parser.add_argument_group(
        "registry (a dispatcher fleet finds this server in etcd; docs/registry.md)"
    )
    metavar, advertised = _ADVERTISED[kind]
    for option in _OPTIONS:
        text = option.help
        if option is _ADVERTISE:
            text = text.replace("this server", f"this server, as {advertised}", 1)
        group.add_argument(
            option.flag,
            action=action,
            dest=option.dest,
            default=None,
            metavar=metavar if option is _ADVERTISE else option.metavar,
            help=f"{text} [{option.variable}]",
        )
    group.add_argument(
        "--register-etcd-password", nargs="?", action=_PasswordRefused, help=argparse.SUPPRESS
    )


@dataclass(frozen=True)
class RegistrySettings:
    """How a server registers, every setting checked (``registry_settings``)."""

    etcd: str
    prefix: str
    advertise: str | None
    ttl: int
    leave_delay: float
    access: EtcdAccess
    kind: Kind

    def registration(self, host: str, port: int) -> Registration:
        """This server's registration once it listens on ``host:port`` (``""``, 0: a Unix
        socket); not started."""
        value = advertised_value(self.advertise, host=host, port=port, kind=self.kind)
        return Registration(self.etcd, self.prefix, value, ttl=self.ttl, access=self.access)


class _Given:
    """Each option's value and name: its flag's when given (an empty one too: a flag says
    "none" over a variable), else its variable's; an empty variable counts as unset."""

    def __init__(self, options: argparse.Namespace | None, environment: Mapping[str, str]):
        self._options = options
        self._environment = environment

    def value(self, option: _Option) -> str | None:
        given = getattr(self._options, option.dest, None)
        if given is not None:
            return given or None
        return self._environment.get(option.variable) or None

    def name(self, option: _Option) -> str:
        if getattr(self._options, option.dest, None) is not None:
            return option.flag
        if self._environment.get(option.variable):
            return option.variable
        return f"{option.flag} (or {option.variable})"


def registry_settings(
    options: argparse.Namespace,
    *,
    kind: Kind,
    host: str | None,
    environment: Mapping[str, str] | None = None,
) -> RegistrySettings | None:
    """The registry settings of ``options`` (``add_registry_options``'s) over the
    environment's; None when no etcd is named. ``host``: where the server will listen,
    None for a Unix socket. Everything is checked now, before serving: ValueError names
    the setting that is wrong, and never quotes the password."""
    source = os.environ if environment is None else environment
    given = _Given(options, source)
    etcd = given.value(_ETCD)
    if etcd is None:
        return None
    prefix = given.value(_PREFIX)
    if prefix is None:
        raise ValueError(f"{given.name(_ETCD)} needs {given.name(_PREFIX)}")
    try:
        check_prefix(prefix)
    except ValueError as error:
        raise ValueError(f"{given.name(_PREFIX)}: {error}") from None
    ttl_text = given.value(_TTL) or str(DEFAULT_TTL)
    try:
        ttl = int(ttl_text)
    except ValueError:
        raise ValueError(
            f"{given.name(_TTL)} must be a whole number of seconds, not {ttl_text!r}"
        ) from None
    if ttl < 2:
        raise ValueError(f"{given.name(_TTL)} must be at least 2 seconds, not {ttl}")
    delay_text = given.value(_LEAVE_DELAY) or str(DEFAULT_LEAVE_DELAY)
    try:
        leave_delay = float(delay_text)
    except ValueError:
        leave_delay = math.nan
    if not 0 <= leave_delay <= _MAX_LEAVE_DELAY:  # NaN fails too
        raise ValueError(
            f"{given.name(_LEAVE_DELAY)} is a number of seconds in [0, 600], not {delay_text!r}"
        )
    access = EtcdAccess(
        ca_file=given.value(_CA_FILE),
        cert_file=given.value(_CERT_FILE),
        key_file=given.value(_KEY_FILE),
        user=given.value(_USER),
        password=source.get(REGISTER_ETCD_PASSWORD_ENV) or None,
        names={
            **{field: given.name(option) for field, option in _ACCESS.items()},
            "password": REGISTER_ETCD_PASSWORD_ENV,
            "etcd": given.name(_ETCD),
        },
    )
    settings = RegistrySettings(
        etcd, prefix, given.value(_ADVERTISE), ttl, leave_delay, access, kind
    )
    # The URL, the prefix, the address and how etcd is reached, any port standing in for
    # the one the server will get; starts nothing.
    if host is None:
        settings.registration("", 0)
    else:
        settings.registration(host, 1)
    return settings


def flags_given(options: argparse.Namespace, given: Collection[str]) -> list[str]:
    """The registry flags the command line gave a value (``given``: the ``dest`` of each
    option it gave): what a server registered nowhere (a WebSocket one) refuses as a
    usage error rather than drop, ``--register-etcd`` among them (``LINCHKIT_REGISTER_ETCD``
    is ``websocket_refusal``'s). An empty flag says "none", over a variable, and is not
    among them."""
    return [
        option.flag
        for option in _OPTIONS
        if option.dest in given and getattr(options, option.dest, None)
    ]


def websocket_refusal(
    options: argparse.Namespace | None,
    environment: Mapping[str, str] | None = None,
    *,
    dialling: bool = False,
) -> str | None:
    """Why a WebSocket server (or, ``dialling``, a plugin that dials the gateway:
    ``connect``) told to register (``--register-etcd`` in ``options``, if it has the
    flag, or ``LINCHKIT_REGISTER_ETCD``) must not start; None when it was not told to.
    Refused, not ignored: an operator who set it expects the plugin to be found there."""
    given = _Given(options, os.environ if environment is None else environment)
    if given.value(_ETCD) is None:
        return None
    if dialling:
        return (
            f"{given.name(_ETCD)}: a plugin that dials the gateway (connect) is not"
            " registered in etcd, as no dispatcher dials it: the gateway knows it by its"
            " connection. Serve over HTTP or gRPC to be found there, or leave it unset"
        )
    return (
        f"{given.name(_ETCD)}: a WebSocket server is not registered in etcd, as a"
        " dispatcher dials a websocket target at its one url and finds none in a registry:"
        " serve over HTTP or gRPC to be found there, or leave it unset"
    )
