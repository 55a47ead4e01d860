"""``provider: websocket``: the manifest's model of a WebSocket plugin, in either direction.

    target: {provider: websocket, url: "ws://10.0.0.5:8090/"}                # dial mode
    target: {provider: websocket, mode: inbound, token: "${ECHO_PLUGIN_TOKEN}"}  # reverse

An inbound target is a fleet whose instances are the plugins connected to the gateway
right now (``WebSocketProvider.instance_source``); ``instance_at`` names one connection
(``connection``), which is all a concrete inbound target adds, and which a manifest
never sets.

The fleet is that of one plugin version: loading the manifest sets ``plugin`` (its
``id@version``, ``of_plugin``), so two versions in a rollout, or two plugins, that write
equal inbound targets have two targets, two keys, two fleets. A connection is admitted
as one plugin version and registered under that version's targets only: the balancer,
health checks, host events and stats of a version see its own connections and no
other's. Keyed by the target and not by (plugin, target) beside it, because everything
else keyed by a target (breakers, retry budgets, bulkheads, target-scoped limits, the
fleet's health checks) is then that version's too, with no second key to keep in step.

Each mode refuses, as the manifest loads, what only the other would use: the dial's own
settings (``url``, its TLS files, ``event_buffer``, ``connect_timeout_ms``, the redial
backoff) on an inbound target, and those of plugins dialling in (``principal``, the
fleet's ``balance``, ``health_check``, ``outlier``) on a dialled url. Only what is
written is refused (``model_fields_set``): the defaults are the model's either way, so
the copies this module makes pass on what was written and no more.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from linchkit_plugin.ws_protocol import DEFAULT_MAX_MESSAGE_BYTES
from providers._event_rate import DEFAULT_MAX_EVENTS_PER_SECOND
from providers._headers import checked_token, checked_url_port
from providers.discovery import Endpoint
from providers.target import (
    Balance,
    Destination,
    FleetSettings,
    HealthCheck,
    ManifestPath,
    OutlierDetection,
    TargetConfig,
    masked_url,
)

__all__ = ["WebSocketTarget"]

#: Fields that describe the fleet rather than one of its connections.
_FLEET_FIELDS = frozenset({"balance", "health_check", "outlier"})

#: Settings of the dispatcher's own dial, by name, each with why an inbound target, whose
#: plugins dial the gateway, would not use it (``url`` and the TLS files are refused
#: with reasons of their own).
_DIAL_ONLY = {
    "event_buffer": "host events wait in it while a dialled connection is down, and an"
    " inbound target's go to the plugins connected at the time",
    "connect_timeout_ms": "it bounds a call's wait for the dispatcher's own dial, and an"
    " inbound target's calls go to the plugins connected at the time",
    "reconnect_backoff_ms": "it paces the dispatcher's redials, and a plugin dialling in"
    " redials by its SDK's own backoff",
    "reconnect_backoff_max_ms": "it paces the dispatcher's redials, and a plugin dialling in"
    " redials by its SDK's own backoff",
}

#: Settings of plugins dialling in, by name, each with why a dialled url would not use it.
_INBOUND_ONLY = {
    "principal": "it names who may dial the gateway as this plugin, through the manifest's"
    " auth, and a dialled plugin is reached at its url, sent token",
    "balance": "a dialled url is one connection, not a fleet of connected plugins",
    "health_check": "a dialled url is one connection, not a fleet of connected plugins",
    "outlier": "a dialled url is one connection, not a fleet of connected plugins",
}


class WebSocketTarget(TargetConfig):
    """A plugin over one WebSocket: dialled at ``url``, or dialling in (``mode: inbound``)."""

    provider: Literal["websocket"]
    mode: Literal["dial", "inbound"] = Field(
        default="dial",
        description="dial: the dispatcher connects to url. inbound: plugins connect to the"
        " gateway's /v1/plugins/connect and each connection is an instance.",
    )
    url: str | None = Field(
        default=None,
        pattern=r"^wss?://[^\s/?#\x00-\x1f\x7f]+(/[^\s#\x00-\x1f\x7f]*)?$",
        description="dial mode: ws://host:port/path or wss://…",
        examples=["ws://127.0.0.1:8090/", "wss://plugins.internal/echo"],
    )
    token: SecretStr | None = Field(
        default=None,
        description="dial: sent as 'Authorization: Bearer'. inbound: the bearer token a"
        " connecting plugin must present.",
    )
    principal: str | None = Field(
        default=None,
        min_length=1,
        description="inbound: the connecting plugin must authenticate through the manifest's"
        " `auth` (API key, JWT, client certificate) as this principal id.",
    )
    ca_file: ManifestPath | None = Field(default=None, description="wss: PEM roots.")
    cert_file: ManifestPath | None = Field(default=None, description="wss: client certificate.")
    key_file: ManifestPath | None = Field(default=None, description="wss: client key.")
    heartbeat_ms: int = Field(
        default=10_000,
        ge=100,
        le=600_000,
        description="Ping this often; a peer silent for 1.5x this is gone (half-open TCP),"
        " and so is one that takes nothing written to it for 1.5x this, or sends no whole"
        " frame for 1.5x this and then none in answer to a health probe for 1.5x this"
        " again. inbound: the gateway pings the plugin by this too, not by its own"
        " heartbeat (that is for event subscribers); a plugin whose methods name several"
        " inbound targets has one connection, held to the shortest of theirs.",
    )
    max_message_bytes: int = Field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        ge=1024,
        le=1 << 30,
        description="The largest message of a call, and of its answer (a call over it:"
        " invalid_params). Told to the plugin, which refuses its own larger answer as that"
        " call's provider_error (too_large) and keeps the connection; a plugin that sends"
        " one all the same has the connection closed (1009). inbound, with several"
        " targets: the connection reads up to the largest of theirs, and an answer over"
        " its own call's target's fails that call (provider_error).",
    )
    max_in_flight: int = Field(
        default=4096,
        ge=1,
        le=1_000_000,
        description="Calls of this target at once on one connection (then overloaded).",
    )
    max_events_per_second: int = Field(
        default=DEFAULT_MAX_EVENTS_PER_SECOND,
        ge=1,
        description="Plugin events beyond this rate are dropped, counted. inbound: one rate"
        " for the plugin's connection: its inbound targets must set the same.",
    )
    event_buffer: int = Field(
        default=1000,
        ge=0,
        le=1_000_000,
        description="dial only: host events kept while disconnected, delivered on reconnect.",
    )
    connect_timeout_ms: int = Field(
        default=5_000,
        ge=10,
        description="dial only: how long a call waits for a connection to come up.",
    )
    reconnect_backoff_ms: int = Field(
        default=100, ge=1, description="dial only: the first wait before dialling again."
    )
    reconnect_backoff_max_ms: int = Field(
        default=5_000, ge=1, description="dial only: the longest wait before dialling again."
    )
    compress: bool = Field(
        default=False,
        description="permessage-deflate: every message is then compressed; pays for large"
        " JSON over slow links, costs CPU on fast ones. dial: offered (the SDKs' servers"
        " accept it); inbound: accepted when the plugin offers it (every SDK's connect"
        " does), and one for the plugin's connection: its inbound targets must set the"
        " same.",
    )
    connection: str | None = Field(
        default=None, description="Set by the dispatcher: one inbound connection."
    )
    plugin: str | None = Field(
        default=None,
        description="Set by the dispatcher: inbound: the plugin version (id@version) whose"
        " connections are this target's instances.",
    )
    balance: Balance = Field(
        default="least_request", description="inbound only: how calls spread over connections."
    )
    health_check: HealthCheck | None = Field(
        default=None, description="inbound only: active checks of each connection."
    )
    outlier: OutlierDetection = Field(
        default_factory=OutlierDetection,
        description="inbound only: a connection failing calls in a row is ejected a while.",
    )

    secret_fields = frozenset({"token"})

    _token_fits_a_header = field_validator("token")(checked_token)

    @field_validator("url")
    @classmethod
    def _port_in_range(cls, url: str | None) -> str | None:
        # Past 65535, aiohttp refused the URL only when the dialler tried it: the target
        # loaded and every call said it was not connected.
        return url if url is None else checked_url_port(url)

    @model_validator(mode="after")
    def _mode_fits(self) -> WebSocketTarget:
        if self.mode == "dial":
            if self.url is None:
                raise ValueError("a websocket target in dial mode needs url (ws:// or wss://)")
            _refuse_unused(self, _INBOUND_ONLY, "mode: inbound", "a dialled url (dial mode)")
            for name in ("connection", "plugin"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is set by the dispatcher, for mode: inbound only")
        else:
            if self.url is not None:
                raise ValueError("mode: inbound takes no url: plugins connect to the gateway")
            if self.token is None and self.principal is None:
                raise ValueError(
                    "mode: inbound needs token or principal: who may connect as this plugin"
                )
            _refuse_unused(self, _DIAL_ONLY, "a dialled url (dial mode)", "mode: inbound")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if not self.dials_tls and (self.ca_file or self.cert_file) is not None:
            # Ignored, they would leave a ws:// connection in clear text while the manifest
            # reads as mutual TLS; an inbound plugin's TLS is the gateway's (--client-ca).
            raise ValueError(
                "ca_file, cert_file and key_file are for a wss:// url in dial mode;"
                " inbound plugins present their certificate to the gateway"
            )
        if self.reconnect_backoff_ms > self.reconnect_backoff_max_ms:
            raise ValueError("reconnect_backoff_ms must not exceed reconnect_backoff_max_ms")
        return self

    @property
    def dials_tls(self) -> bool:
        """Whether this target dials a ``wss://`` URL (TLS, where ``ca_file`` and the
        client pair apply)."""
        return self.mode == "dial" and urlsplit(self.url or "").scheme.lower() == "wss"

    def describe(self) -> str:
        if self.mode == "dial":
            return f"websocket {masked_url(self.url or '')}"
        if self.connection:
            return f"websocket inbound {self.connection}"
        # The fleet's name (stats, metrics, logs): one per plugin version.
        return f"websocket inbound of {self.plugin}" if self.plugin else "websocket inbound"

    def destinations(self) -> tuple[Destination, ...]:
        if self.url is None:
            return ()
        # A WebSocket is an HTTP upgrade: the egress policy's http/https rules apply.
        destination = Destination.of_url("url", self.url)
        scheme = "https" if destination.scheme == "wss" else "http"
        port = destination.port or (443 if scheme == "https" else 80)
        return (Destination("url", host=destination.host, port=port, scheme=scheme),)

    def accepts_connections(self) -> bool:
        return self.mode == "inbound" and self.connection is None

    def admits(self, bearer: str | None, principal: str | None) -> bool:
        """Whether a plugin presenting ``bearer`` (and authenticated as ``principal``)
        may connect as an instance of this target. Constant time on the token."""
        if self.token is not None:
            expected = self.token.get_secret_value().encode()
            # Header bytes that are not UTF-8 arrive as lone surrogates: compared as bytes
            # all the same (surrogatepass never raises), so they are a wrong token, not a 500.
            presented = None if bearer is None else bearer.encode("utf-8", "surrogatepass")
            if presented is None or not hmac.compare_digest(expected, presented):
                return False
        return self.principal is None or principal == self.principal

    def inbound_message_limit(self) -> int | None:
        return self.max_message_bytes if self.accepts_connections() else None

    def inbound_heartbeat(self) -> float | None:
        return self.heartbeat_ms / 1000 if self.accepts_connections() else None

    def inbound_compression(self) -> bool | None:
        return self.compress if self.accepts_connections() else None

    def connection_settings(self) -> Mapping[str, object]:
        # The plugin's events are the connection's, not any method's: one rate for them.
        # permessage-deflate is negotiated once, at the upgrade, for every message of the
        # connection: compressing one target's calls and not another's cannot be done,
        # and neither choice is right for the target that asked the other.
        if not self.accepts_connections():
            return {}
        settings: dict[str, object] = {
            "max_events_per_second": self.max_events_per_second,
            "compress": self.compress,
        }
        # The upgrade presents one token and is one principal, which every target must
        # admit (``dispatcher._inbound.admit``): two tokens, or two principals, and no
        # connection of the plugin was ever admitted (401 to each, for any method). One
        # a target leaves unset is the others' to say.
        if self.token is not None:
            settings["token"] = self.token
        if self.principal is not None:
            settings["principal"] = self.principal
        return settings

    def one_plugin_endpoint(self) -> str | None:
        # The plugin's hello names its one id, which the dialled connection checks.
        if self.accepts_connections() or self.url is None:
            return None
        return _endpoint_of(self.url)

    def is_fleet(self) -> bool:
        return self.accepts_connections()

    def of_plugin(self, plugin_key: str) -> WebSocketTarget:
        if self.mode != "inbound" or self.plugin == plugin_key:
            return self  # a dialled URL is one place, whoever calls it
        # Validated again, not model_copy'd: a copy would carry the cached ``key`` along.
        # The fields written, not every field: what is set stays set (``_mode_fits``).
        fields = {name: getattr(self, name) for name in self.model_fields_set}
        return type(self).model_validate({**fields, "plugin": plugin_key})

    def instance_targets(self) -> tuple[WebSocketTarget, ...]:
        # An inbound fleet has no fixed instance: only the connections that come.
        return () if self.accepts_connections() else (self,)

    def instance_at(self, endpoint: Endpoint) -> WebSocketTarget:
        if not self.accepts_connections():
            raise TypeError("only an inbound websocket target has connections as instances")
        fields = {
            name: getattr(self, name) for name in self.model_fields_set if name not in _FLEET_FIELDS
        }
        return type(self).model_validate({**fields, "connection": endpoint.key})

    def fleet_settings(self) -> FleetSettings:
        return FleetSettings(
            balance=self.balance, health_check=self.health_check, outlier=self.outlier
        )


def _refuse_unused(
    target: WebSocketTarget, unused: Mapping[str, str], used_by: str, mode: str
) -> None:
    """Refuse the fields of ``unused`` that ``target`` writes (its defaults are fine): each
    is for ``used_by``, and a target of ``mode`` would silently not use it."""
    written = [name for name in unused if name in target.model_fields_set]
    if not written:
        return
    reasons = list(dict.fromkeys(unused[name] for name in written))
    why = (
        reasons[0]
        if len(reasons) == 1
        else "; ".join(f"{name}: {unused[name]}" for name in written)
    )
    names = ", ".join(written)
    if len(written) == 1:
        raise ValueError(f"{names} is for {used_by}; {mode} would not use it ({why}). Remove it")
    raise ValueError(f"{names} are for {used_by}; {mode} would not use them ({why}). Remove them")


def _endpoint_of(url: str) -> str:
    """The place ``url`` dials, one spelling for every way of writing it: the scheme and
    host in lower case, the port the scheme implies written out, an empty path as ``/``,
    and no credentials (they say who dials, not where). ``WS://Host/`` and
    ``ws://host:80`` reach one process, which serves one plugin id."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal, bracketed again as a URL writes it
    port = parts.port or (443 if scheme == "wss" else 80)
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{host}:{port}{parts.path or '/'}{query}"
