"""The bearer token a plugin's HTTP server requires, and where it comes from.

The host's HTTP provider sends ``Authorization: Bearer <bearer_token>`` when a target
sets ``bearer_token``; the server compares it with its own copy in constant time
(``hmac.compare_digest``), so a wrong guess teaches nothing about the right one.

The server's copy comes from a file (``--token-file``, ``LINCHKIT_PLUGIN_TOKEN_FILE``: a
mounted secret) or from ``LINCHKIT_PLUGIN_TOKEN``, never from a plain command-line
argument, which any user of the machine can read in ``ps``. The token is never printed:
its ``repr`` hides it and no error message quotes what a client sent.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from linchkit_plugin._setting_files import (
    TOKEN_FILE_BYTES,
    SettingFileRefused,
    read_setting_file,
)

__all__ = ["TOKEN_ENV", "TOKEN_FILE_ENV", "BearerToken", "TokenError"]

TOKEN_ENV = "LINCHKIT_PLUGIN_TOKEN"
TOKEN_FILE_ENV = "LINCHKIT_PLUGIN_TOKEN_FILE"


class TokenError(ValueError):
    """The configured token cannot be used (unreadable or empty file, both sources set)."""


class BearerToken:
    """A secret a request must present as ``Authorization: Bearer <token>``."""

    __slots__ = ("_expected",)

    def __init__(self, token: str) -> None:
        token = token.strip()
        if not token:
            raise TokenError("the bearer token is empty")
        if any(ord(character) < 0x21 or ord(character) > 0x7E for character in token):
            raise TokenError("the bearer token must be printable ASCII without spaces")
        self._expected = b"bearer " + token.encode("ascii")

    def secret(self) -> str:
        """The token itself, for a plugin that presents it (dialling the gateway)."""
        return self._expected[len(b"bearer ") :].decode("ascii")

    @classmethod
    def configured(
        cls, token_file: str | Path | None, environ: Mapping[str, str] | None = None
    ) -> BearerToken | None:
        """The token from ``token_file``, else from ``LINCHKIT_PLUGIN_TOKEN``; None if neither."""
        environ = os.environ if environ is None else environ
        from_environment = environ.get(TOKEN_ENV)
        if token_file:
            if from_environment:
                raise TokenError(f"set either a token file or {TOKEN_ENV}, not both")
            try:
                text = read_setting_file(token_file, limit=TOKEN_FILE_BYTES).decode("ascii")
            except (OSError, UnicodeDecodeError) as error:
                # Why in a few words: not a regular file (a FIFO would block the start for
                # ever), or larger than a token (/dev/zero would be read without end).
                why = error.strerror if isinstance(error, SettingFileRefused) else None
                raise TokenError(
                    f"cannot read the token file {str(token_file)!r}: {why or type(error).__name__}"
                ) from None
            try:
                return cls(text)
            except TokenError as error:
                raise TokenError(f"the token file {str(token_file)!r}: {error}") from None
        if from_environment:
            return cls(from_environment)
        return None

    def admits(self, authorization: bytes | None) -> bool:
        """Whether an ``Authorization`` header value carries this token (constant time)."""
        if authorization is None:
            return False
        scheme, _, credentials = authorization.strip().partition(b" ")
        presented = scheme.lower() + b" " + credentials.strip()
        return hmac.compare_digest(presented, self._expected)

    def admits_headers(self, authorization: Sequence[bytes]) -> bool:
        """Whether a request's ``Authorization`` headers, every one it sent, are exactly one
        that carries this token. Two are refused whatever they say, as the gRPC service
        refuses two ``authorization`` metadata values: one hop may read the first, another
        the last, and a request is not let in on the one a server happened to read."""
        return len(authorization) == 1 and self.admits(authorization[0])

    def __repr__(self) -> str:
        return "<BearerToken (hidden)>"
