"""A URL as a line or an error may show it (``masked_url``), for every part of the SDK
that names one an operator gave: the gateway's (``connect --url``), etcd's
(``--register-etcd``). Free of the extras' imports, so the registry can use it without
aiohttp."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["masked_url"]

#: What stands for a credential in a URL a line shows.
_MASK = "***"


def masked_url(url: str) -> str:
    """``url`` as a line or an error may show it: the password of its userinfo masked (a
    user without a password whole: a token may be the user), the value of every query
    parameter masked too (``?token=…``), and an item without ``=`` whole (``?TOKEN``: it is
    a value itself), no fragment. The dispatcher has its own
    (``providers.model.masked_url``), which the SDK does not import."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a URL that does not parse)"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{_MASK}@{host}" if colon else f"{_MASK}@{host}"
    query = "&".join(
        f"{name}={_MASK}" if equals else _MASK
        for name, equals, _ in (item.partition("=") for item in parts.query.split("&"))
    )
    return urlunsplit(
        parts._replace(netloc=netloc, query=query if parts.query else "", fragment="")
    )
