"""``GET /metrics``: the dispatcher's registry as Prometheus reads it, behind a bearer
token when ``telemetry.metrics.token_env`` or ``token_file`` names one.

A scraper holds none of the credentials the gateway's callers present (``auth``), so
``/metrics`` has a token of its own, either

- the value of the variable ``token_env`` names, read once when the route is made (as a
  gateway starts): ``ScrapeToken``; or
- the content of the file ``token_file`` names, a trailing newline stripped, read as the
  route is made and again whenever the file changes: ``ScrapeTokenFile``.

Unset, empty, or holding what no ``Authorization`` header could carry (a space, a control
or non-ASCII character), it is a ``TelemetryEnvironmentError`` naming the variable, or a
``TokenFileError`` naming the file (missing, not a regular file, more than
``MOST_TOKEN_BYTES``: none of a larger file is read), never the value. With a token, a
scrape is answered only when it sends ``Authorization: Bearer <token>`` (the scheme in
any case, RFC 9110 §11.1), as Prometheus does with ``authorization: {credentials_file:
…}``; anything else gets 401 ``unauthorized`` in the gateway's envelope with
``WWW-Authenticate: Bearer``, and is not logged (a scraper misconfigured shows as a target
down in Prometheus, which says 401).

A token file is rotated as Prometheus re-reads ``credentials_file`` and the kubelet swaps
a mounted Secret (a symlink renamed over another, followed here): a scrape looks at the
file's ``stat`` (device, inode, size, modification and change times) when the last look
is ``TOKEN_FILE_CHECK_SECONDS`` old, and a scrape whose token is not admitted looks at
once (a scraper that switched first is not refused while this process lags behind the
file). When the file changed, it is read again: a new token is admitted from then on and
the previous one for ``TOKEN_FILE_GRACE_SECONDS`` more, so that replicas and scrapers
switching at different moments lose no scrape. A file that cannot be read, is empty or
holds no token keeps the last good token admitting scrapes, with one WARNING naming the
file until it is good again.

The comparison takes the same time whatever is presented: both sides are hashed
(SHA-256) and the digests compared with ``hmac.compare_digest`` (against the current and
the previous token, both always), so neither the token's characters nor its length shows
in how long a refusal takes. Only digests are kept.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from dispatcher.config.telemetry import MetricsSettings, TelemetryEnvironmentError, TokenFileError
from dispatcher.gateway.errors import error_answer
from dispatcher.telemetry.metrics import metrics_handler
from linchkit_plugin.errors import Unauthorized

__all__ = [
    "MOST_TOKEN_BYTES",
    "TOKEN_FILE_CHECK_SECONDS",
    "TOKEN_FILE_GRACE_SECONDS",
    "ScrapeCredential",
    "ScrapeToken",
    "ScrapeTokenFile",
    "metrics_route",
    "scrape_token",
]

log = logging.getLogger("dispatcher.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: What a bearer token may hold to be sent in a header as it is: visible ASCII.
_SENDABLE = re.compile(r"[\x21-\x7e]+")
_SENDABLE_BYTES = re.compile(rb"[\x21-\x7e]+")
_UNSENDABLE = (
    "a space, a control or a non-ASCII character, which no scraper sends as it is"
    " in a header: use letters, digits and punctuation only (base64 or hex, say)"
)
_BEARER = "bearer "
#: The most of a token file read: a token is tens of bytes; a file past this is not one,
#: and nothing more of it is read (a file pointed at the wrong place, a log, a device).
MOST_TOKEN_BYTES = 4096
#: How old the last look at a token file may be before a scrape looks again (a ``stat``).
TOKEN_FILE_CHECK_SECONDS = 1.0
#: How long the previous token of a rotated file is still admitted. Prometheus reads its
#: ``credentials_file`` at every scrape, so a scraper sends a new token one scrape
#: interval after its own copy changes (its default interval: 1 minute); the kubelet
#: updates a Secret's files in each pod at its own moment, up to its sync period (1
#: minute by default) apart. Two minutes covers both, and still ends a token rotated away
#: soon (to end it at once, restart: a process starts with the file's token only).
TOKEN_FILE_GRACE_SECONDS = 120.0
#: The previous token's digest while there is none: what no presented token hashes to.
_NO_DIGEST = bytes(32)


def _presented_digest(authorization: str | None) -> tuple[bytes, bool]:
    """The digest of the token in ``Bearer <token>``, and whether there was one."""
    if authorization is None or authorization[:7].lower() != _BEARER:
        presented = b""
    else:
        presented = authorization[7:].encode("utf-8", "surrogateescape")
    return hashlib.sha256(presented).digest(), bool(presented)


class ScrapeToken:
    """The token ``/metrics`` requires; ``admits`` an ``Authorization`` header's value."""

    __slots__ = ("_digest", "variable")

    def __init__(self, variable: str, token: str) -> None:
        #: The variable it was read from, to name in messages.
        self.variable = variable
        self._digest = hashlib.sha256(token.encode()).digest()

    @classmethod
    def from_environment(
        cls, variable: str, environ: Mapping[str, str] | None = None
    ) -> ScrapeToken:
        """The token in ``variable``; ``TelemetryEnvironmentError`` naming it when it is
        unset, empty, or not sendable as a header's value."""
        env = os.environ if environ is None else environ
        token = env.get(variable)
        if not token:
            raise TelemetryEnvironmentError(
                variable,
                "telemetry.metrics.token_env names this variable for the token /metrics"
                " requires, but it is unset or empty: set it to the token your scrapers"
                " send (Authorization: Bearer …), or drop token_env",
            )
        if not _SENDABLE.fullmatch(token):
            raise TelemetryEnvironmentError(
                variable, f"the token /metrics requires holds {_UNSENDABLE}"
            )
        return cls(variable, token)

    def admits(self, authorization: str | None) -> bool:
        """Whether ``authorization`` is ``Bearer <the token>``, in time independent of
        what either holds."""
        digest, presented = _presented_digest(authorization)
        # Compared even when no token was presented: every refusal costs the same.
        return hmac.compare_digest(digest, self._digest) and presented

    def __repr__(self) -> str:
        return f"<ScrapeToken from ${self.variable}>"


#: What identifies a token file's content without reading it; None: it cannot be stat'ed.
_Stamp = tuple[int, int, int, int, int] | None


def _stamp_of(status: os.stat_result) -> _Stamp:
    # The inode changes on a rename or a symlink swap even within one mtime tick; the
    # change time on a chmod (a file made readable again).
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def _read_token_file(path: Path) -> tuple[bytes, _Stamp]:
    """The digest of the token in ``path`` and the stamp of what was read; ``ValueError``
    saying what is wrong with the file, never what it holds."""
    try:
        # Not blocking: a FIFO put there would wait for a writer for ever.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise ValueError(
            f"cannot be read ({error.strerror or type(error).__name__}): write the token"
            " your scrapers send there, or point token_file at it"
        ) from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise ValueError("is not a regular file: token_file names the file holding the token")
        content = b""
        while len(content) <= MOST_TOKEN_BYTES:
            chunk = os.read(descriptor, MOST_TOKEN_BYTES + 1 - len(content))
            if not chunk:
                break
            content += chunk
    except OSError as error:
        raise ValueError(f"cannot be read ({error.strerror or type(error).__name__})") from None
    finally:
        os.close(descriptor)
    if len(content) > MOST_TOKEN_BYTES:
        raise ValueError(
            f"holds more than {MOST_TOKEN_BYTES} bytes: not a token (is token_file the right file?)"
        )
    token = content.rstrip(b"\r\n")
    if not token:
        raise ValueError("is empty: write the token your scrapers send into it")
    if not _SENDABLE_BYTES.fullmatch(token):
        raise ValueError(f"holds a token with {_UNSENDABLE}")
    return hashlib.sha256(token).digest(), _stamp_of(status)


class ScrapeTokenFile:
    """The token in a file, read again when the file changes (the module's docstring says
    when and how); ``admits`` an ``Authorization`` header's value. ``clock`` (seconds,
    monotonic) and ``grace`` are injectable for tests."""

    __slots__ = (
        "_checked_at",
        "_clock",
        "_digest",
        "_failing",
        "_grace",
        "_previous",
        "_previous_until",
        "_stamp",
        "checks",
        "path",
        "rotations",
    )

    def __init__(
        self,
        path: Path,
        digest: bytes,
        stamp: _Stamp,
        *,
        grace: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (grace >= 0 and math.isfinite(grace)):
            raise ValueError(f"grace must be a number of seconds, 0 or more, not {grace!r}")
        #: The file, to name in messages.
        self.path = path
        self._digest = digest
        self._previous = _NO_DIGEST
        self._previous_until = -math.inf
        self._stamp = stamp
        #: False while the file holds a token; else the stamp of the file that held none
        #: (None: it could not be stat'ed), warned of once and not read again unchanged.
        self._failing: _Stamp | bool = False
        self._grace = grace
        self._clock = clock
        self._checked_at = clock()
        #: Looks at the file (``stat``) since it was first read; tokens read from it since.
        self.checks = 0
        self.rotations = 0

    @classmethod
    def read(
        cls,
        path: Path,
        *,
        grace: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> ScrapeTokenFile:
        """The token in ``path``, read now; ``TokenFileError`` naming the file when it
        holds none (``grace``: ``TOKEN_FILE_GRACE_SECONDS`` unless given)."""
        try:
            digest, stamp = _read_token_file(path)
        except ValueError as error:
            raise TokenFileError(path, f"telemetry.metrics.token_file: the file {error}") from None
        grace = TOKEN_FILE_GRACE_SECONDS if grace is None else grace
        return cls(path, digest, stamp, grace=grace, clock=clock)

    def admits(self, authorization: str | None) -> bool:
        """Whether ``authorization`` is ``Bearer <the token>`` (or the previous token's,
        within its grace), in time independent of what any of them holds."""
        now = self._clock()
        looked = now - self._checked_at >= TOKEN_FILE_CHECK_SECONDS
        if looked:
            self._check(now)
        digest, presented = _presented_digest(authorization)
        if self._matches(digest, now) and presented:
            return True
        # Perhaps the file changed within the second and the scraper read it first.
        return presented and not looked and self._check(now) and self._matches(digest, now)

    def _matches(self, digest: bytes, now: float) -> bool:
        # Both compared, always: no early answer tells which one matched.
        current = hmac.compare_digest(digest, self._digest)
        previous = hmac.compare_digest(digest, self._previous) and now < self._previous_until
        return current | previous

    def _check(self, now: float) -> bool:
        """Look at the file; read it if it changed. True when a new token was read."""
        self._checked_at = now
        self.checks += 1
        try:
            stamp = _stamp_of(os.stat(self.path))  # follows symlinks: a Secret's swap
        except OSError:
            stamp = None
        if stamp == self._stamp or (self._failing is not False and stamp == self._failing):
            return False
        try:
            digest, read = _read_token_file(self.path)
        except ValueError as error:
            if self._failing is False:
                log.warning(
                    "scrape token file %s %s; the last token read from it still admits"
                    " scrapes until it holds one again",
                    self.path,
                    error,
                )
            self._failing = stamp
            return False
        self._stamp = read
        if self._failing is not False:
            self._failing = False
            log.info("scrape token file %s holds a token again", self.path)
        if hmac.compare_digest(digest, self._digest):
            return False
        self._previous, self._previous_until = self._digest, now + self._grace
        self._digest = digest
        self.rotations += 1
        log.info(
            "scrape token read again from %s: the previous one is still admitted for %g s",
            self.path,
            self._grace,
        )
        return True

    def __repr__(self) -> str:
        failing = " failing" if self._failing is not False else ""
        return f"<ScrapeTokenFile {self.path} rotations={self.rotations}{failing}>"


#: What ``/metrics`` may require: a token from a variable, or from a file.
ScrapeCredential = ScrapeToken | ScrapeTokenFile


def scrape_token(
    settings: MetricsSettings, environ: Mapping[str, str] | None = None
) -> ScrapeCredential | None:
    """The token ``settings.token_env`` or ``token_file`` names (read now), or None:
    ``/metrics`` is open."""
    if settings.token_file is not None:
        return ScrapeTokenFile.read(settings.token_file, grace=TOKEN_FILE_GRACE_SECONDS)
    if settings.token_env is None:
        return None
    return ScrapeToken.from_environment(settings.token_env, environ)


def metrics_route(registry: CollectorRegistry, token: ScrapeCredential | None) -> Handler:
    """The handler of ``GET /metrics``: ``registry``'s exposition, to the holder of
    ``token`` only when there is one."""
    expose = metrics_handler(registry)
    if token is None:
        return expose

    async def guarded(request: web.Request) -> web.StreamResponse:
        presented = request.headers.getall("Authorization", ())
        # One header: two would leave which one counts to whoever reads them next.
        if len(presented) != 1 or not token.admits(presented[0]):
            refusal = Unauthorized("/metrics needs the scrape token: Authorization: Bearer …")
            return error_answer(refusal, close=request.body_exists)
        return await expose(request)

    return guarded
