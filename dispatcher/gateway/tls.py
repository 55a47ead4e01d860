"""A listener's TLS: the context its files make, and that context kept current as they change.

``ServerTls`` is what a port serves TLS with (a certificate and key, a CA for client
certificates and whether one is asked for), as ``gateway.tls`` and ``telemetry.metrics.
tls`` both write it (``dispatcher.config.gateway.GatewayTls``); the gateway's port takes it
from ``GatewaySettings.server_tls`` (the command line may override the manifest), the
admin listener from its own section.

``CertificateReload`` builds a new context from the certificate, key and client CA when
any of their files change (checked every ``cert_check_interval`` seconds, or at once on
``check(force=True)``, which ``dispatcher serve`` calls on SIGHUP), and every handshake
from then on uses it: the new certificate is presented, and client certificates are
verified against the new CA (a CA rotated away is no longer trusted). Connections already
open keep theirs. Files that fail to load (a key written before its certificate, a broken
file) keep the old context serving and are tried again at the next change.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dispatcher.config.gateway import GatewayTls
from providers.tls import files_stamp

__all__ = ["CertificateReload", "ClientCertificates", "ServerTls", "tls_context"]

log = logging.getLogger("dispatcher.gateway")

#: Whether the TLS layer asks for a client certificate: ``optional`` verifies one when
#: sent, ``required`` refuses the handshake without one.
ClientCertificates = Literal["none", "optional", "required"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerTls:
    """The files a port serves TLS with; ``client_ca`` is set when ``client_cert`` is not
    ``none`` (the manifest's model and ``GatewaySettings`` check it)."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    client_cert: ClientCertificates = "none"
    #: What the port is, in log lines: ``gateway``, ``admin``.
    port: str = "gateway"

    @classmethod
    def from_config(cls, config: GatewayTls, *, port: str) -> ServerTls:
        return cls(
            cert=config.cert,
            key=config.key,
            client_ca=config.client_ca,
            client_cert=config.client_certificates,
            port=port,
        )

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.cert, self.key, self.client_ca) if p is not None)


def tls_context(tls: ServerTls) -> ssl.SSLContext:
    """A server context for ``tls``: TLS 1.2 at least, its certificate, its client CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key)
    if tls.client_cert != "none":
        assert tls.client_ca is not None  # ServerTls's makers check it
        context.load_verify_locations(cafile=tls.client_ca)
        context.verify_mode = (
            ssl.CERT_REQUIRED if tls.client_cert == "required" else ssl.CERT_OPTIONAL
        )
    return context


class CertificateReload:
    """Builds a new TLS context when the certificate, key or client CA files change.

    The listening socket keeps the context it was created with (``listening``); its
    ``sni_callback``, which OpenSSL runs at every handshake (with or without SNI), hands
    the handshake to the newest context. A new context, not ``load_cert_chain`` on the
    live one, because a CA loaded into a context can never be taken out of it again: a
    client CA that was rotated away must stop being trusted.
    """

    def __init__(self, tls: ServerTls) -> None:
        self._tls = tls
        self._loaded = files_stamp(tls.files)
        self._failed: tuple[object, ...] | None = None
        context = tls_context(tls)
        self.listening = context
        self.current = context
        context.sni_callback = self._hand_over
        self.reloads = 0

    def _hand_over(
        self, connection: ssl.SSLObject, name: str | None, context: ssl.SSLContext
    ) -> None:
        current = self.current
        if current is not context:
            connection.context = current  # this handshake: the newest certificate and CA

    def check(self, *, force: bool = False) -> bool:
        """Reload if the files changed (or ``force``); True when a new context was built."""
        stamp = files_stamp(self._tls.files)
        if not force and (stamp == self._loaded or stamp == self._failed):
            return False
        try:
            context = tls_context(self._tls)
        except (OSError, ssl.SSLError) as error:
            if stamp != self._failed:
                log.warning(
                    "TLS files of the %s port not reloaded, the previous certificate and"
                    " client CA still serve: %s",
                    self._tls.port,
                    error,
                )
            self._failed = stamp
            return False
        self.current = context
        self._loaded = stamp
        self._failed = None
        self.reloads += 1
        log.info(
            "TLS certificate and client CA of the %s port reloaded from %s",
            self._tls.port,
            ", ".join(map(str, self._tls.files)),
        )
        return True

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.check()

    def __repr__(self) -> str:
        return f"<CertificateReload {self._tls.port} {self._tls.cert} reloads={self.reloads}>"
