"""What a manifest's Redis URL may hold, checked when it loads.

redis-py reads connection options from the URL's query and hands every one to its
connection class: an unknown key (``?foo=bar``) was a ``TypeError`` at the first
connection, a value it cannot parse (``?socket_timeout=abc``) a ``ValueError``, both deep
in a call long after the manifest loaded. And a query argument wins over what the
dispatcher passes itself, so ``?socket_timeout=30`` quietly undid ``op_timeout_ms``.
The query may hold only the few arguments below, with values redis-py parses; anything
else is refused naming the argument, never quoting the URL (it holds Redis's password).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import NamedTuple
from urllib.parse import parse_qsl, urlsplit

from providers._headers import checked_url

__all__ = ["checked_redis_url"]

#: The words redis-py's ``to_bool`` reads as false; it reads any other text as true, so
#: ``?socket_keepalive=flase`` turned keepalive on. Only these and their opposites count.
_FALSE = frozenset({"0", "f", "false", "n", "no"})
_TRUE = frozenset({"1", "t", "true", "y", "yes"})
#: What Redis takes as a client name (CLIENT SETNAME refuses spaces and newlines).
_CLIENT_NAME = re.compile(r"[!-~]{1,128}")
#: A query argument's name as a problem may show it: anything else is not named.
_SHOWN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")


def _is_database(value: str) -> bool:
    return value.isascii() and value.isdigit()


def _is_boolean(value: str) -> bool:
    return value.lower() in _FALSE | _TRUE


def _is_client_name(value: str) -> bool:
    return _CLIENT_NAME.fullmatch(value) is not None


def _is_path(value: str) -> bool:
    return "\x00" not in value


class _Argument(NamedTuple):
    """A query argument taken here: the check of its value, and what the check wants."""

    takes: Callable[[str], bool]
    wants: str


_PATH = _Argument(_is_path, "a file's path")
#: The arguments a Redis URL's query may hold, each with the check of its value: the
#: database and a client name (it shows in CLIENT LIST) on every scheme, TCP keepalive on
#: a TCP connection (redis-py's Unix socket connection takes no such argument), and on
#: ``rediss://`` the files of a private CA and of a client certificate.
_ANY_SCHEME: Mapping[str, _Argument] = {
    "db": _Argument(_is_database, "a database number (0, 1, ...)"),
    "client_name": _Argument(_is_client_name, "at most 128 printable ASCII characters, no spaces"),
}
_TCP_ONLY: Mapping[str, _Argument] = {
    "socket_keepalive": _Argument(_is_boolean, "yes or no (true or false, 1 or 0)"),
}
_TLS_ONLY: Mapping[str, _Argument] = {
    "ssl_ca_certs": _PATH,
    "ssl_ca_path": _PATH,
    "ssl_certfile": _PATH,
    "ssl_keyfile": _PATH,
}


def _own_field(field: str) -> str:
    return f"the state section's {field!r} sets it, and the URL's would win over it"


_WEAKER_TLS = "it would weaken how the server's certificate is checked; rediss:// checks it fully"
_SECRET = (
    "a secret in the query would show wherever the URL does: the user and password go"
    " before the host (redis://user:password@host, unix://:password@/path), where they are"
    " masked"
)
#: redis-py understands these, and the dispatcher refuses them, for the reason given.
_REFUSED: Mapping[str, str] = {
    "socket_timeout": _own_field("op_timeout_ms"),
    "socket_connect_timeout": _own_field("op_timeout_ms"),
    "timeout": _own_field("op_timeout_ms"),  # the wait for a pooled connection
    "max_connections": _own_field("pool_size"),
    # The dispatcher retries a failed operation once and bounds both tries itself.
    "retry_on_timeout": "the dispatcher decides how a Redis operation is retried",
    "health_check_interval": "the dispatcher decides when a pooled connection is checked",
    # The job store reads stream replies in RESP2's shape: RESP3's are maps.
    "protocol": "the dispatcher speaks RESP2 to Redis",
    "legacy_responses": "the dispatcher reads redis-py's usual replies",
    "ssl_cert_reqs": _WEAKER_TLS,
    "ssl_check_hostname": _WEAKER_TLS,
    "ssl_include_verify_flags": _WEAKER_TLS,
    "ssl_exclude_verify_flags": _WEAKER_TLS,
    "ssl_min_version": _WEAKER_TLS,
    "ssl_ciphers": _WEAKER_TLS,
    "password": _SECRET,
    "username": _SECRET,
    "ssl_password": _SECRET,
}


def checked_redis_url(url: str) -> str:
    """``url`` if redis-py will connect with it as the dispatcher means: a ``redis://``,
    ``rediss://`` or ``unix://`` URL as ``checked_url`` takes it, whose query holds only
    arguments taken here, each once, with a value redis-py parses. Else ``ValueError``
    naming the argument, never quoting the URL."""
    checked_url(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError("a Redis URL is redis://, rediss:// or unix://")
    seen: set[str] = set()
    # As redis-py reads it (parse_qs), but keeping blank values: ``?db=`` from an unset
    # variable was dropped without a word.
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in seen:
            raise ValueError(f"the Redis URL's query gives {_named(name)} twice")
        seen.add(name)
        _check_argument(scheme, name, value)
    return url


def _check_argument(scheme: str, name: str, value: str) -> None:
    if name in _REFUSED:
        raise ValueError(f"a Redis URL's query takes no {name!r}: {_REFUSED[name]}")
    argument = _ANY_SCHEME.get(name) or _TCP_ONLY.get(name) or _TLS_ONLY.get(name)
    if argument is None:
        taken = ", ".join(sorted(_taken_by(scheme)))
        raise ValueError(
            f"the Redis URL's query holds {_named(name)}, which the dispatcher does not"
            f" pass to Redis; a {scheme}:// URL's query takes {taken}"
        )
    if name not in _taken_by(scheme):
        schemes = "rediss://" if name in _TLS_ONLY else "redis:// and rediss://"
        raise ValueError(f"{name!r} in a Redis URL's query is for {schemes} URLs only")
    if not value:
        raise ValueError(f"{name!r} in the Redis URL's query has no value")
    if not (argument.takes(value) and _redis_py_parses(name, value)):
        raise ValueError(f"{name!r} in the Redis URL's query must be {argument.wants}")


def _taken_by(scheme: str) -> set[str]:
    taken = set(_ANY_SCHEME)
    if scheme != "unix":
        taken |= set(_TCP_ONLY)
    if scheme == "rediss":
        taken |= set(_TLS_ONLY)
    return taken


def _redis_py_parses(name: str, value: str) -> bool:
    """Whether redis-py's own parser of argument ``name`` (when it has one) takes
    ``value``. Without redis-py installed, the state backend says so when it starts."""
    try:
        from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS
    except ImportError:
        return True
    parse = URL_QUERY_ARGUMENT_PARSERS.get(name)
    if parse is None:
        return True  # passed on as the text it is
    try:
        parse(value)
    except (TypeError, ValueError):
        return False
    return True


def _named(name: str) -> str:
    """A query argument's name as a problem shows it: quoted when it looks like one."""
    return repr(name) if _SHOWN_NAME.fullmatch(name) else "an argument"
