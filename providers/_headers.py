"""What a manifest may put into an HTTP request's head: header fields, paths, base URLs.

A CR or LF in a header value would split the request (header injection); aiohttp refuses
one only when it writes the request, reqwest with a bare ``ValueError`` that quotes the
value. In a path, yarl drops control characters and a fragment without a word, so
``/a\\r\\nb`` reached the plugin as ``/ab``; in a base URL, pydantic drops tabs and
newlines the same way, and a query or fragment ended up in front of the path the provider
appends (``http://h/?a=b`` was posted to ``/?a=b/invoke``). A URL's port is a number
from 1 to 65535: past it, a websocket or Lambda endpoint loaded and failed only when
dialled, and pydantic refused an http URL quoting it, password and all. The manifest
refuses all of these when it loads, naming the field, never a value (it may be a secret).
"""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import SplitResult, urlsplit

from pydantic import AfterValidator, AnyHttpUrl, BeforeValidator, SecretStr

__all__ = [
    "BaseUrl",
    "HeaderFields",
    "RequestPath",
    "checked_base_url",
    "checked_header_value",
    "checked_token",
    "checked_url",
    "checked_url_port",
    "http_url_parts",
    "is_header_name",
    "is_header_value",
    "refuse_aws_credentials",
]

#: RFC 9110's token, the characters of a header name.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: The characters of a header value taken here: printable ASCII, spaces and tabs.
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")
#: A request path as it will be sent: no whitespace, control character or fragment.
_REQUEST_PATH = re.compile(r"/[^\s#\x00-\x1f\x7f]*")
_CONTROL_OR_SPACE = re.compile(r"[\s\x00-\x1f\x7f]")
#: A port as a URL writes it: ASCII digits, at most five past any leading zeros.
_PORT = re.compile(r"0*[0-9]{1,5}")


def is_header_value(value: str) -> bool:
    """Whether ``value`` may travel as a header's value: printable ASCII, spaces and tabs."""
    return _HEADER_VALUE.fullmatch(value) is not None


def checked_header_value(name: str, value: str) -> str:
    """``value`` if it may travel as the value of header ``name``; else ``ValueError``
    naming the header, never the value."""
    if not is_header_value(value):
        raise ValueError(
            f"the value of header {name!r} must be printable ASCII (no CR, LF or other"
            " control characters)"
        )
    return value


def checked_token(token: SecretStr | None) -> SecretStr | None:
    """A bearer token that fits an ``Authorization`` header (or None)."""
    if token is not None:
        checked_header_value("Authorization", token.get_secret_value())
    return token


def is_header_name(name: str) -> bool:
    """Whether ``name`` is an RFC 9110 token, what a header's name is."""
    return _HEADER_NAME.fullmatch(name) is not None


def _checked_headers(headers: dict[str, str]) -> dict[str, str]:
    for name, value in headers.items():
        if not is_header_name(name):
            raise ValueError(f"header name {name[:40]!r}: letters, digits and !#$%&'*+-.^_`|~ only")
        checked_header_value(name, value)
    return headers


#: ``headers:`` of a target that speaks HTTP, checked when the manifest loads.
HeaderFields = Annotated[dict[str, str], AfterValidator(_checked_headers)]


def _checked_path(path: str) -> str:
    if not _REQUEST_PATH.fullmatch(path):
        raise ValueError(
            "a request path starts with '/' and has no spaces, control characters or '#'"
        )
    return path


#: A path a target's requests go to, checked when the manifest loads.
RequestPath = Annotated[str, AfterValidator(_checked_path)]


def checked_url_port(url: str) -> str:
    """``url`` if its port, when it has one, is a number from 1 to 65535; else
    ``ValueError``, never quoting it. An empty port (``http://h:/``) is the scheme's."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return url  # not a URL at all: the field's own check says so
    host_and_port = netloc.rpartition("@")[2]
    if host_and_port.startswith("["):  # an IPv6 literal: the port follows the bracket
        port = host_and_port.partition("]")[2].removeprefix(":")
    else:
        port = host_and_port.partition(":")[2]
    if port and not (_PORT.fullmatch(port) and 1 <= int(port.lstrip("0") or "0") <= 65535):
        raise ValueError("a URL's port is a number between 1 and 65535")
    return url


def checked_url(url: object) -> object:
    """A URL as written, before anything parses it: no whitespace or control character
    (pydantic, yarl and ``urlsplit`` drop them without a word), a port from 1 to 65535."""
    if isinstance(url, str):
        if _CONTROL_OR_SPACE.search(url):
            raise ValueError("a URL has no spaces, tabs, line breaks or other control characters")
        checked_url_port(url)
    return url


def http_url_parts(url: str, what: str) -> SplitResult:
    """``url``'s parts when it is an http:// or https:// URL with a host; else
    ``ValueError`` naming ``what``, never quoting the URL."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # a bracket without its pair
        host = None
    if not host or parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{what} must be an http:// or https:// URL with a host")
    return parts


def refuse_aws_credentials(parts: SplitResult, what: str) -> None:
    """``ValueError`` if an AWS endpoint's URL holds a user or password: botocore signs
    each request with the credentials of its chain and never uses them, and aiohttp
    refuses them beside the signature, so every call failed while the manifest held a
    secret that was never used."""
    if "@" in parts.netloc:
        raise ValueError(
            f"{what} takes no user or password: AWS credentials come from the"
            " environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or a profile"
            " (AWS_PROFILE), never from the URL"
        )


def checked_base_url(url: object) -> object:
    """A base URL as written, before pydantic parses it: no whitespace or control
    character (dropped without a word), no query or fragment (the provider appends paths
    to it), a port from 1 to 65535."""
    if isinstance(url, str):
        checked_url(url)
        if "?" in url or "#" in url:
            raise ValueError(
                "a base URL has no query or fragment: the provider appends its paths to it"
            )
    return url


#: The base URL of a target that speaks HTTP (the provider appends its paths to it).
BaseUrl = Annotated[AnyHttpUrl, BeforeValidator(checked_base_url)]
