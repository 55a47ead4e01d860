"""etcd's own authentication: a token per user, asked for when first needed and again
once etcd says it is no longer good.

etcd answers ``/v3/auth/authenticate`` (user and password) with a token that every other
request carries in its ``Authorization`` header. A token stops being good without notice:
etcd's simple tokens expire after ``--auth-token-ttl`` seconds unused (300 by default), and
a restarted etcd knows none of the tokens it gave before; JWT tokens expire too. etcd then
answers HTTP 401 (``"code": 16``, "invalid auth token"), or cancels a watch it was asked to
create with that reason. ``EtcdLogin`` keeps the current token and forgets it when told it
failed; the reader asks again once and repeats its request (``etcd_client``).

One login per reader, and one ``authenticate`` in flight at a time: readers that find no
token together wait for the same answer rather than each asking etcd. The password is sent
only to ``/v3/auth/authenticate``, never logged or put in a message; the token is never
logged either (it is as good as the password until it expires).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from providers.discovery import EtcdAuth

__all__ = ["EtcdLogin", "LoginFailure", "Post", "cancelled_for_token", "token_refused"]

#: ``post(path, body)``: one request to etcd as the reader makes it (its session, its TLS,
#: no token), bounded by the caller; the answer's status and JSON object.
Post = Callable[[str, bytes], Awaitable[tuple[int, dict[str, Any]]]]

#: What etcd says of a token it does not take (gRPC's ``Unauthenticated``).
_INVALID_TOKEN = "invalid auth token"
_UNAUTHENTICATED = 16


class LoginFailure(Exception):
    """etcd did not give a token; the message says why, in one line, without the password."""


class EtcdLogin:
    """The token of one etcd user, for one reader."""

    __slots__ = ("_asking", "_auth", "_token")

    def __init__(self, auth: EtcdAuth) -> None:
        self._auth = auth
        self._token: str | None = None
        self._asking = asyncio.Lock()

    @property
    def username(self) -> str:
        return self._auth.username

    async def token(self, post: Post) -> str:
        """The current token, asked for first if there is none."""
        if self._token is not None:
            return self._token
        async with self._asking:
            if self._token is None:  # another reader may have asked meanwhile
                self._token = await self._authenticate(post)
            return self._token

    def failed(self, token: str) -> None:
        """etcd refused ``token``: the next ``token()`` asks for a new one (unless one
        already replaced it)."""
        if self._token == token:
            self._token = None

    async def _authenticate(self, post: Post) -> str:
        body = orjson.dumps(
            {"name": self._auth.username, "password": self._auth.password.get_secret_value()}
        )
        status, answer = await post("/v3/auth/authenticate", body)
        token = answer.get("token")
        if status == 200 and isinstance(token, str) and token:
            return token
        if status == 200:
            raise LoginFailure("etcd's answer to the authentication holds no token")
        # etcd's messages name no password ("authentication failed, invalid user ID or
        # password", "authentication is not enabled"); the user is the manifest's own.
        message = _message(answer) or f"HTTP {status}"
        raise LoginFailure(f"etcd refused to authenticate user {self._auth.username!r}: {message}")


def token_refused(status: int, answer: dict[str, Any]) -> bool:
    """Whether etcd's answer says the request's token is no longer good."""
    return status == 401 or (
        answer.get("code") == _UNAUTHENTICATED and _INVALID_TOKEN in _message(answer)
    )


def cancelled_for_token(result: dict[str, Any]) -> bool:
    """Whether a watch etcd cancelled (``result`` of its first line) was cancelled for the
    token it was created with."""
    return bool(result.get("canceled")) and _INVALID_TOKEN in str(result.get("cancel_reason", ""))


def _message(answer: dict[str, Any]) -> str:
    message = answer.get("message") or answer.get("error") or ""
    return " ".join(str(message).split())[:200]
