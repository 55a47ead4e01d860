"""The form of a wasm module's HTTP request, judged before anything else
(``providers.wasm.http_host``, step 1): Extism's request JSON, the URL it names
(``Target``), its method and its headers.

A URL is ``http`` or ``https``, at most ``MAX_URL_LENGTH`` printable ASCII characters,
without credentials; a method is a token; at most ``MAX_HEADERS`` headers of
``MAX_HEADER_BYTES`` in all, whose names are tokens and whose values are printable ASCII,
no CR, LF or control character (a header split in two is a request smuggled in one); none
of the headers the dispatcher sets itself (``Host``, ``Content-Length``, ``Connection``…)
unless it says what the dispatcher does. What fails is ``NetworkRefused``: nothing is
sent. A URL is shown in a refusal without its query or credentials.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

from linchkit_plugin.errors import ProviderError
from providers._headers import is_header_name, is_header_value

__all__ = [
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_URL_LENGTH",
    "IPAddress",
    "IPNetwork",
    "NetworkRefused",
    "Target",
    "checked_headers",
    "parsed",
]

#: Extism's request JSON, read from the module's memory before anything else is looked at.
MAX_REQUEST_BYTES = 1024 * 1024
MAX_URL_LENGTH = 8 * 1024
MAX_HEADERS = 100
#: Every name and value of the request's headers together.
MAX_HEADER_BYTES = 64 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: What a URL may hold: printable ASCII without space or backslash (which URL parsers read
#: differently from each other, the way a host is smuggled past a check).
_URL = re.compile(r"[!-\[\]-~]+")
#: Headers about the connection and the body's framing, which the dispatcher sets itself.
_OWN_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    }
)


class NetworkRefused(ProviderError):
    """A wasm module's HTTP request the dispatcher refused; nothing was sent."""


@dataclass(frozen=True, slots=True)
class Target:
    """The URL's parts the dispatcher acts on."""

    scheme: str
    host: str
    port: int
    #: ``Host``: the host as the URL writes it, with its port when not the default.
    authority: str
    path: str
    address: IPAddress | None

    @classmethod
    def of(cls, url: str) -> Target:
        shown = _shown(url)
        if len(url) > MAX_URL_LENGTH or not _URL.fullmatch(url):
            raise _refused_url(
                shown,
                f"a URL is at most {MAX_URL_LENGTH} printable ASCII characters, without"
                " spaces or backslashes (percent-encode the rest, and write a host in its"
                " IDNA form)",
            )
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as error:
            raise _refused_url(shown, f"not a URL ({error})") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise _refused_url(shown, f"only http and https URLs are allowed, not {scheme}:")
        host = parts.hostname
        if not host:
            raise _refused_url(shown, "the URL names no host")
        if port == 0:  # no server listens there; a connect would pick a port of its own
            raise _refused_url(shown, "it names port 0")
        address = _address(host)
        written = f"[{host}]" if isinstance(address, ipaddress.IPv6Address) else host
        default = 443 if scheme == "https" else 80
        target = cls(
            scheme,
            host,
            default if port is None else port,
            written if port in (None, default) else f"{written}:{port}",
            (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
            address,
        )
        if "@" in parts.netloc:
            raise target.refused("the URL holds credentials; send them in a header (Authorization)")
        return target

    def refused(self, reason: str) -> NetworkRefused:
        return NetworkRefused(
            f"HTTP request to {self.host} refused: {reason}", details={"host": self.host}
        )

    def failed(self, reason: str) -> ProviderError:
        return ProviderError(
            f"HTTP request to {self.host} failed: {reason}", details={"host": self.host}
        )


def _shown(url: str) -> str:
    """Enough of a URL to say which it was, without its query or credentials (secrets)."""
    base = url.split("?", 1)[0].split("#", 1)[0]
    shown = base
    if "@" in base:
        # A URL shown here was refused before it was parsed: however malformed (one slash,
        # none, another scheme), whatever stands before its last "@" may be userinfo.
        scheme, colon, rest = base.partition(":")
        if not colon:
            scheme, rest = "", base
        slashes = rest[: len(rest) - len(rest.lstrip("/"))]
        shown = f"{scheme}{colon}{slashes}…@{base.rsplit('@', 1)[1]}"
    return shown[:80] + ("…" if len(shown) > 80 or len(base) < len(url) else "")


def _refused_url(shown: str, reason: str) -> NetworkRefused:
    return NetworkRefused(f"HTTP request to {shown!r} refused: {reason}", details={"url": shown})


def parsed(request: bytes) -> tuple[str, str, dict[str, str]]:
    """Extism's request JSON: the URL, the method (GET when unset), the headers."""
    try:
        parsed = orjson.loads(request)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        url, method, headers = parsed.get("url"), parsed.get("method"), parsed.get("headers")
        method = "GET" if method is None else method
        headers = {} if headers is None else headers
        if (
            isinstance(url, str)
            and isinstance(method, str)
            and isinstance(headers, dict)
            and all(isinstance(value, str) for value in headers.values())
        ):
            return url, method.upper(), headers
    raise NetworkRefused(
        "HTTP request refused: it is not Extism's request JSON"
        ' {"url": string, "method": string, "headers": {string: string}}'
    )


def checked_headers(
    target: Target, headers: dict[str, str], body_length: int | None, method: str
) -> list[tuple[str, str]]:
    # A method is a token as a header's name is (RFC 9110).
    if len(method) > 32 or not is_header_name(method):
        raise target.refused(f"the method {method[:40]!r} is not an HTTP method (a token)")
    if len(headers) > MAX_HEADERS:
        raise target.refused(f"{len(headers)} headers, at most {MAX_HEADERS}")
    size = sum(len(name) + len(value) for name, value in headers.items())
    if size > MAX_HEADER_BYTES:
        raise target.refused(f"its headers hold {size} bytes, at most {MAX_HEADER_BYTES}")
    own = {
        "host": target.authority.lower(),
        "content-length": str(body_length or 0),
        "connection": "close",
    }
    checked: list[tuple[str, str]] = []
    for name, value in headers.items():
        if not is_header_name(name):
            raise target.refused(f"the header name {name[:40]!r} is not a token")
        if not is_header_value(value):
            raise target.refused(
                f"the header {name} holds a control character (CR, LF, NUL…) or a character"
                " outside printable ASCII"
            )
        lower = name.lower()
        if lower in _OWN_HEADERS:
            if own.get(lower) == value.strip().lower():
                continue  # says what the dispatcher sends anyway
            raise target.refused(
                f"the dispatcher sets {name} itself (one request per connection, the"
                " URL's host, the body's length)"
            )
        checked.append((name, value))
    return checked


def _address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
