"""TLS towards an HTTP target: which CA verifies it, which client certificate we present.

``ClientTls`` is the manifest's ``tls:`` of an ``http`` or ``knative`` target; its fields
are named as the gRPC target's (``ca_file``, ``cert_file``, ``key_file``,
``server_name``), and its paths are taken from the manifest's folder (``ManifestPath``).

``ClientTlsContext`` turns it into an ``ssl.SSLContext`` and keeps it current: at most
every ``check_interval`` seconds, on the call path, it compares the files' stamps
(mtime, size, inode: a rotation by rename changes the inode within one mtime tick) and,
when they changed, builds a new context. aiohttp keys its connection pool by the context
object, so connections opened from then on present the rotated certificate, while the
ones already open finish their calls and idle out. A set of files that does not load (a
key written before its certificate) keeps the previous context and is tried again at the
next change; a first load that fails raises ``ProviderError`` naming the file.

What is never printed: the key's contents. Paths are not secrets and show in ``repr``.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import Field, model_validator

from linchkit_plugin.errors import ProviderError
from providers.model import ManifestPath, StrictModel

__all__ = ["ClientTls", "ClientTlsContext", "files_stamp"]

log = logging.getLogger("dispatcher.providers.tls")


class ClientTls(StrictModel):
    """``tls:`` of a target: verify the server with ``ca_file``, present ``cert_file``."""

    ca_file: ManifestPath | None = Field(
        default=None,
        description="PEM roots to verify the server with, instead of the system's.",
    )
    cert_file: ManifestPath | None = Field(
        default=None, description="Client certificate (chain) to present (mTLS), PEM."
    )
    key_file: ManifestPath | None = Field(
        default=None, description="Private key of cert_file, PEM."
    )
    server_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="Name to send (SNI) and verify in the server certificate; default: the URL's host.",
    )

    @model_validator(mode="after")
    def _client_certificate_needs_its_key(self) -> ClientTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mTLS needs both)")
        return self

    def files(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.ca_file, self.cert_file, self.key_file) if p is not None)


def files_stamp(paths: Iterable[str | os.PathLike[str]]) -> tuple[object, ...]:
    """What changes when any of ``paths`` is rewritten, replaced or removed: compared to
    decide whether TLS files must be read again. A rotation by rename changes the inode
    even within one mtime tick."""
    stamps: list[object] = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(stamps)


def _build(tls: ClientTls) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=None if tls.ca_file is None else str(tls.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


class ClientTlsContext:
    """The current ``SSLContext`` of one ``ClientTls``, rebuilt when its files change.

    ``clock`` is injectable so tests step past ``check_interval`` without sleeping.
    """

    __slots__ = (
        "_clock",
        "_context",
        "_failed",
        "_files",
        "_loaded",
        "_next_check",
        "interval",
        "reloads",
        "tls",
    )

    def __init__(
        self,
        tls: ClientTls,
        *,
        check_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tls = tls
        self.interval = check_interval
        self.reloads = 0
        self._clock = clock
        self._files = tls.files()
        self._loaded = files_stamp(self._files)
        self._failed: tuple[object, ...] | None = None
        try:
            self._context = _build(tls)
        except (OSError, ssl.SSLError) as error:
            raise ProviderError(
                f"cannot load the target's TLS files ({_names(tls)}): {error}"
            ) from None
        self._next_check = clock() + check_interval

    @property
    def server_name(self) -> str | None:
        return self.tls.server_name

    def current(self) -> ssl.SSLContext:
        """The context for a request now; the files are looked at every ``interval`` s."""
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self.interval
            self.check()
        return self._context

    def check(self) -> bool:
        """Build a new context if the files changed; True when one was built."""
        stamp = files_stamp(self._files)
        if stamp == self._loaded or stamp == self._failed:
            return False
        try:
            context = _build(self.tls)
        except (OSError, ssl.SSLError) as error:
            if stamp != self._failed:
                log.warning(
                    "client TLS files (%s) not reloaded, the previous ones stay in use: %s",
                    _names(self.tls),
                    error,
                )
            self._failed = stamp
            return False
        self._context = context
        self._loaded = stamp
        self._failed = None
        self.reloads += 1
        log.info("client TLS files reloaded: %s", _names(self.tls))
        return True

    def __repr__(self) -> str:
        return f"<ClientTlsContext {_names(self.tls)} reloads={self.reloads}>"


def _names(tls: ClientTls) -> str:
    return ", ".join(str(path) for path in tls.files()) or "system roots"
