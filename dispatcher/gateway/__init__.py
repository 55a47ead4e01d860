"""The gateway: plugin calls and events over HTTP and WebSocket for hosts in any language
(``dispatcher serve``; ``docs/gateway.md``).

It sits between the entry points and the core: it only calls ``Dispatcher.call`` and
``Dispatcher.publish`` and listens to its events, so a call through the gateway meets the
same routes, schema checks, policies and errors as one made in-process.
"""

from __future__ import annotations

from dispatcher.gateway.app import Gateway, create_app
from dispatcher.gateway.errors import STATUS_BY_TYPE, error_answer, status_of
from dispatcher.gateway.events import TOO_SLOW, EventHub
from dispatcher.gateway.openapi import openapi_document
from dispatcher.gateway.server import GatewayServer, server_ssl_context
from dispatcher.gateway.settings import GatewaySettings
from dispatcher.gateway.tls import CertificateReload, ClientCertificates, ServerTls

__all__ = [
    "STATUS_BY_TYPE",
    "TOO_SLOW",
    "CertificateReload",
    "ClientCertificates",
    "EventHub",
    "Gateway",
    "GatewayServer",
    "GatewaySettings",
    "ServerTls",
    "create_app",
    "error_answer",
    "openapi_document",
    "server_ssl_context",
    "status_of",
]
