"""The TLS of the gateway's gRPC port, reloaded as its files change
(``CertificateFetcher``).

The server's credentials are dynamic: at each new connection grpc asks for the
certificate configuration, and a new one is built when the certificate, key or client CA
files changed since the last. A client CA is asked for only with ``client_cert:
required``: grpcio's server credentials have no "ask, verify if sent" mode.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc

from dispatcher.gateway.settings import GatewaySettings
from providers.tls import files_stamp

__all__ = ["CertificateFetcher"]

log = logging.getLogger("dispatcher.gateway.grpc")


class CertificateFetcher:
    """grpc's hook at each new connection: a new configuration when the files changed."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self._files = tuple(
            path
            for path in (settings.tls_cert, settings.tls_key, settings.client_ca)
            if path is not None
        )
        self._loaded = files_stamp(self._files)
        self.reloads = 0

    def configuration(self) -> Any:
        settings = self._settings
        assert settings.tls_cert is not None
        assert settings.tls_key is not None
        client_ca = (
            _read(settings.client_ca)
            if settings.client_ca is not None and settings.client_cert == "required"
            else None
        )
        return grpc.ssl_server_certificate_configuration(
            [(_read(settings.tls_key), _read(settings.tls_cert))], root_certificates=client_ca
        )

    def __call__(self) -> Any:
        stamp = files_stamp(self._files)
        if stamp == self._loaded:
            return None  # grpc keeps the configuration it has
        try:
            configuration = self.configuration()
        except (OSError, ValueError) as error:
            log.warning("gRPC TLS files not reloaded, the previous ones still serve: %s", error)
            return None
        self._loaded = stamp
        self.reloads += 1
        return configuration


def _read(path: Path) -> bytes:
    return path.read_bytes()
