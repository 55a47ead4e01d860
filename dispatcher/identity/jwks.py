"""An issuer's public keys (a JWKS), from a file or an http(s) URL, by ``kid``.

Keys are read when the dispatcher starts and again when a token names a ``kid`` not
known yet (the issuer rotated a key in) — at most once every ``refetch_min_interval_s``,
whatever the tokens say, so made-up kids cannot turn the dispatcher into a flood of
requests to the issuer. Concurrent misses share one fetch. A fetch is bounded by
``fetch_timeout_s`` and by size; when it fails the keys already known stay in use and the
token with the unknown kid is refused, never left hanging.

Only public signing keys are kept: a key with private members (``d``, …), a symmetric
(``oct``) key, a key meant for encryption (``use: enc``) or without a ``kid`` is skipped,
with a warning that names its ``kid``, never its material.

``generation`` counts the changes of the key set — a kid added or gone, or a kid whose
key is now another (an issuer withdrawing a leaked key may publish its successor under
the same kid) — so the verified tokens kept by ``tokens`` are dropped with the keys that
verified them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from dispatcher.config.files import read_capped
from providers.egress import EgressPolicy, EgressRefused
from providers.target import masked_url

__all__ = ["MAX_JWKS_BYTES", "KeySet"]

log = logging.getLogger("dispatcher.identity")

#: A JWKS larger than this is not a key set we want to parse.
MAX_JWKS_BYTES = 1 << 20
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class KeySet:
    """The public keys of one issuer, by ``kid``."""

    def __init__(
        self,
        location: str,
        *,
        is_url: bool,
        timeout: float,
        refetch_min_interval: float,
        clock: Callable[[], float] = time.monotonic,
        egress: EgressPolicy | None = None,
    ) -> None:
        self.location = location
        #: Checked again after name resolution, as providers do: the URL passed it at load
        #: (``dispatcher.config.loader``), the addresses its name resolves to must too.
        self.egress = egress
        self.is_url = is_url
        self.timeout = timeout
        self.refetch_min_interval = refetch_min_interval
        self.clock = clock
        self.keys: dict[str, PyJWK] = {}
        #: Each key's JWK as read (canonical JSON), by kid: what tells a key replaced
        #: under its kid from the same key read again.
        self._entries: dict[str, bytes] = {}
        self.fetches = 0
        self.failures = 0
        #: Bumped whenever the set of keys changes: the token cache is dropped then.
        self.generation = 0
        self._last_fetch: float | None = None
        self._fetching: asyncio.Task[None] | None = None

    async def key(self, kid: str) -> PyJWK | None:
        """The key ``kid``, fetching the set again (rate-limited) when it is not known."""
        found = self.keys.get(kid)
        if found is not None:
            return found
        await self.refresh(force=False)
        return self.keys.get(kid)

    async def refresh(self, *, force: bool = True) -> None:
        """Read the key set again; unless ``force``, only if the last read is old enough."""
        if self._fetching is None:
            last = self._last_fetch
            if not force and last is not None and self.clock() - last < self.refetch_min_interval:
                return
            self._last_fetch = self.clock()
            self._fetching = asyncio.ensure_future(self._fetch())
        fetching = self._fetching
        try:
            # Shielded: one caller giving up (its request cancelled) must not cancel the
            # fetch the others wait for.
            await asyncio.shield(fetching)
        finally:
            if fetching.done() and self._fetching is fetching:
                self._fetching = None

    async def aclose(self) -> None:
        fetching, self._fetching = self._fetching, None
        if fetching is not None and not fetching.done():
            fetching.cancel()
            await asyncio.gather(fetching, return_exceptions=True)

    async def _fetch(self) -> None:
        self.fetches += 1
        try:
            raw = await (self._download() if self.is_url else self._read_file())
            document = orjson.loads(raw)
        except (
            OSError,
            TimeoutError,
            orjson.JSONDecodeError,
            _Refused,
        ) as error:
            self.failures += 1
            log.warning(
                "JWKS %s could not be read (%s); keeping %d known keys",
                self._name,
                _why(error),
                len(self.keys),
            )
            return
        found = self._public_keys(document)
        if found is None:
            return
        keys, entries = found
        if entries != self._entries:
            self.generation += 1
        self.keys, self._entries = keys, entries

    async def _download(self) -> bytes:
        # Imported here: only a key set at a URL needs an HTTP client, and importing the
        # dispatcher must not load one (tests/test_imports.py).
        import aiohttp

        from providers._egress_resolver import EgressResolver

        timeout = aiohttp.ClientTimeout(total=self.timeout)
        connector = (
            None
            if self.egress is None
            else aiohttp.TCPConnector(resolver=EgressResolver(self.egress))
        )
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
                session.get(self.location, allow_redirects=False) as response,
            ):
                if response.status != 200:
                    raise _Refused(f"HTTP {response.status}")
                body = await response.content.read(MAX_JWKS_BYTES + 1)
        except aiohttp.ClientError as error:
            raise _Refused(type(error).__name__) from None
        except EgressRefused as error:
            raise _Refused(str(error)) from None
        if len(body) > MAX_JWKS_BYTES:
            raise _Refused(f"larger than {MAX_JWKS_BYTES} bytes")
        return body

    async def _read_file(self) -> bytes:
        # A file only: a FIFO there held a thread waiting for a writer for ever (and the
        # process's exit, which waits for that thread, with it).
        body = await asyncio.to_thread(read_capped, self.location, MAX_JWKS_BYTES, pipe_wait=None)
        if len(body) > MAX_JWKS_BYTES:
            raise _Refused(f"larger than {MAX_JWKS_BYTES} bytes")
        return body

    def _public_keys(self, document: Any) -> tuple[dict[str, PyJWK], dict[str, bytes]] | None:
        """The usable keys of ``document`` and their JWKs, by kid; None (the known keys
        kept) when it is no key set."""
        listed = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(listed, list):
            log.warning(
                "JWKS %s has no 'keys' list; keeping %d known keys", self._name, len(self.keys)
            )
            self.failures += 1
            return None
        keys: dict[str, PyJWK] = {}
        entries: dict[str, bytes] = {}
        for entry in listed:
            if not isinstance(entry, dict):
                continue
            kid = entry.get("kid")
            if not isinstance(kid, str) or not kid or len(kid) > 256:
                log.warning("JWKS %s: a key without a usable kid was skipped", self._name)
                continue
            if _PRIVATE_MEMBERS & entry.keys() or entry.get("use", "sig") != "sig":
                log.warning("JWKS %s: key %r is not a public signing key; skipped", self._name, kid)
                continue
            try:
                keys[kid] = PyJWK(entry)
            except (PyJWTError, ValueError, TypeError) as error:
                log.warning(
                    "JWKS %s: key %r is not usable (%s); skipped",
                    self._name,
                    kid,
                    type(error).__name__,
                )
                continue
            entries[kid] = orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)
        return keys, entries

    @property
    def _name(self) -> str:
        return masked_url(self.location) if self.is_url else self.location

    def __repr__(self) -> str:
        return f"<KeySet {self._name} keys={sorted(self.keys)} fetches={self.fetches} failures={self.failures}>"


class _Refused(Exception):
    """The key set's source answered, but not with a key set we accept."""


def _why(error: BaseException) -> str:
    if isinstance(error, _Refused | OSError):
        return (
            str(error) if isinstance(error, _Refused) else (error.strerror or type(error).__name__)
        )
    if isinstance(error, TimeoutError):
        return "timed out"
    return type(error).__name__
