"""What a provider is told about a target and the plugin behind it.

``TargetConfig`` is the base of every provider's target model (the manifest's
``target:``), ``ManifestPath`` a path taken from the manifest's folder, ``StrictModel``
the base of every model a manifest is read into, and ``PluginInfo`` the part of a plugin's
manifest entry a provider may read. Providers see a plugin through ``PluginInfo`` only:
its policies belong to the dispatcher, not to the driver.

Secrets never print: a manifest model's ``repr``/``str`` shows ``***`` for the values of
its ``secret_fields`` (headers, gRPC metadata, deployment environments) and for the
password of any URL; ``describe()`` implementations use ``masked_url``. A target names
where it connects through ``destinations()``, which the egress policy checks
(``providers.egress``).

A target may stand for several interchangeable instances of one plugin (a *fleet*): it
expands into one concrete single-address target per instance through
``instance_targets()`` (default: itself), may name discovery sources whose instances come
and go while the dispatcher runs (``instance_sources()``, ``providers.discovery``), turns
what they find into concrete targets (``instance_at``), and states how the dispatcher
balances and watches them in ``fleet_settings()`` (``FleetSettings``). Providers only ever
receive the concrete targets, so a driver knows nothing of fleets (``dispatcher.fleet``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, Self
from urllib.parse import urlsplit

import orjson
from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    model_validator,
)

from providers.capabilities import Capabilities
from providers.discovery import DnsDiscovery, Endpoint, RegistryDiscovery
from providers.model import MASK, ManifestPath, StrictModel, masked_url

__all__ = [
    "MASK",
    "Balance",
    "Destination",
    "Discovery",
    "FleetSettings",
    "HealthCheck",
    "Lifecycle",
    "ManifestPath",
    "OutlierDetection",
    "PluginInfo",
    "StrictModel",
    "TargetConfig",
    "connection_heartbeat",
    "masked_url",
]


@dataclass(frozen=True, slots=True)
class Destination:
    """One place a target makes a provider connect to, as the manifest names it.

    ``field`` is the target's key that names it (``url``, ``address``…), so a refusal
    points at the line to change. ``host`` is a name or an address literal (no brackets).
    """

    field: str
    host: str | None = None
    port: int | None = None
    scheme: str | None = None
    unix_socket: Path | None = None

    @classmethod
    def of_url(cls, field: str, url: str) -> Destination:
        """The host the URL's client will dial. A URL that does not parse names no host
        (refused by the egress policy), as does a host that is not a valid IDNA name."""
        try:
            parts = urlsplit(url)
            host = _dialled_host(parts.hostname)
        except ValueError:
            return cls(field, scheme=url.partition(":")[0].lower() or None)
        try:
            port = parts.port
        except ValueError:
            port = None
        return cls(field, host=host, port=port, scheme=parts.scheme.lower())

    @classmethod
    def of_host(cls, field: str, host: str, port: int | None = None) -> Destination:
        return cls(field, host=host.strip("[]"), port=port)

    @classmethod
    def of_unix_socket(cls, field: str, path: str | Path) -> Destination:
        return cls(field, unix_socket=Path(path))

    def __str__(self) -> str:
        if self.unix_socket is not None:
            return f"unix:{self.unix_socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else (self.host or "")
        return f"{host}:{self.port}" if self.port is not None else host


def _dialled_host(host: str | None) -> str | None:
    """``host`` as clients connect to it: a non-ASCII name in its IDNA (ASCII) form.

    Why: aiohttp (yarl) and others map ``169。254。169。254`` or fullwidth digits to the
    address ``169.254.169.254`` and dial it without resolving anything, so a check of the
    raw text, which is not an address, would let a link-local address through.
    """
    if not host or host.isascii():
        return host or None
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError(f"{host!r} is not a valid internationalised host name") from None


#: How a fleet spreads calls over its instances.
Balance = Literal["least_request", "round_robin", "weighted"]

#: A source of instances that change while the dispatcher runs.
Discovery = DnsDiscovery | RegistryDiscovery


class HealthCheck(StrictModel):
    """Active health checks of a fleet's instances: the provider's ``health`` probe of each."""

    interval_ms: Annotated[int, Field(ge=10, le=3_600_000)] = 5_000
    timeout_ms: Annotated[int, Field(ge=1, le=60_000)] = 1_000
    unhealthy_after: Annotated[int, Field(ge=1)] = 2
    healthy_after: Annotated[int, Field(ge=1)] = 2

    @model_validator(mode="after")
    def _probe_ends_before_the_next(self) -> HealthCheck:
        if self.timeout_ms > self.interval_ms:
            raise ValueError(
                f"timeout_ms ({self.timeout_ms}) must not exceed interval_ms ({self.interval_ms})"
            )
        return self


class OutlierDetection(StrictModel):
    """Passive checks: an instance failing calls in a row is ejected for a while."""

    consecutive_failures: Annotated[int, Field(ge=1)] = 5
    base_ejection_ms: Annotated[int, Field(gt=0)] = 30_000
    max_ejection_ms: Annotated[int, Field(gt=0)] = 300_000
    max_ejected_percent: Annotated[int, Field(ge=0, le=100)] = 50


class FleetSettings(StrictModel):
    """How the dispatcher balances and watches the instances of one target."""

    balance: Balance = "least_request"
    health_check: HealthCheck | None = None
    outlier: OutlierDetection = Field(default_factory=OutlierDetection)


class TargetConfig(StrictModel):
    """Base of every provider's target model; ``provider`` is the manifest's discriminator.

    Subclasses declare ``provider: Literal["name"]`` and their own fields. Unknown keys
    are errors, and targets are immutable once loaded, so a target is its own key: equal
    targets are one target (one connection pool, one process, one breaker).
    """

    provider: str

    @cached_property
    def key(self) -> str:
        """Who this target is, as a short string: equal targets have equal keys.

        Providers key their pools, routes and processes by it, so two spellings of one
        target share them. A digest, so secrets in the target never show in it.
        """
        canonical = orjson.dumps(_plain(self), option=orjson.OPT_SORT_KEYS, default=str)
        return hashlib.blake2b(canonical, digest_size=12).hexdigest()

    def describe(self) -> str:
        """One line for ``dispatcher list``: where calls go. Never a secret (``masked_url``)."""
        return self.provider

    def destinations(self) -> Sequence[Destination]:
        """Where this target makes its provider connect, for the egress policy.

        A target that names a host, URL or socket lists it here (``providers.egress``);
        the default, for targets that connect nowhere the manifest names, is none.
        """
        return ()

    def instance_targets(self) -> Sequence[TargetConfig]:
        """The concrete targets this one stands for, one per instance; the default: itself.

        Each is a target of the same model naming exactly one address, so the provider
        drives it like any other target (its pool, route and breaker keyed by its ``key``).
        A target with several is a fleet (``dispatcher.fleet``). Static: sources that
        change at run time (DNS, a registry) belong to ``dispatcher.fleet.sources``.
        """
        return (self,)

    def weighted_instances(self) -> Sequence[tuple[TargetConfig, int]]:
        """``instance_targets()``, each with its weight (for ``balance: weighted``)."""
        return [(instance, 1) for instance in self.instance_targets()]

    def instance_sources(self) -> Sequence[Discovery]:
        """The discovery sources of this target's instances (DNS, a registry); default none.

        A target with any is a fleet even with no fixed instance: the dispatcher watches
        the sources and adds and drains instances as they report them.
        """
        return ()

    def instance_at(self, endpoint: Endpoint) -> TargetConfig:
        """The concrete target of an instance a discovery source found at ``endpoint``."""
        raise TypeError(f"{self.provider} targets have no discovered instances")

    def has_instance(self, target: TargetConfig) -> bool:
        """Whether ``target`` is one of this target's concrete targets: one it expands
        into (``instance_targets``), or one its discovery sources may find
        (``instance_at``). The default knows only the first kind."""
        return any(each.key == target.key for each in self.instance_targets())

    def accepts_connections(self) -> bool:
        """Whether plugins connect to the dispatcher as instances of this target (reverse
        mode: ``Provider.admit``/``accept``); the default, for targets the dispatcher
        reaches itself, is no."""
        return False

    def inbound_message_limit(self) -> int | None:
        """The largest message a plugin connected as an instance of this target may send
        (the gateway reads none larger); None, the default, for the gateway's own."""
        return None

    def inbound_heartbeat(self) -> float | None:
        """Seconds between pings of a plugin connected as an instance of this target
        (``connection_heartbeat``); None, the default, for the gateway's own."""
        return None

    def inbound_compression(self) -> bool | None:
        """Whether the gateway agrees to compress the messages of a plugin connected as an
        instance of this target (permessage-deflate, when the plugin's upgrade offers it);
        None, the default, where the target does not say (then it does not)."""
        return None

    def connection_settings(self) -> Mapping[str, object]:
        """The settings of this inbound target that hold for a plugin's whole connection
        rather than per call, and that no rule can combine, by name. One connection serves
        every inbound target of its plugin version, so the manifest refuses a plugin whose
        inbound targets set one of them differently (``dispatcher.config.shared_targets``;
        one a target leaves unset, not listed, is the others' to say; one of
        ``secret_fields`` is never shown). Those with a rule are not listed: the heartbeat
        (``connection_heartbeat``: the shortest) and the largest message read
        (``inbound_message_limit``: the largest, each call then held to its own target's).
        The default: none."""
        return {}

    def one_plugin_endpoint(self) -> str | None:
        """Where this target reaches a process that serves a single plugin id, which it
        names when the dispatcher connects (a dialled WebSocket plugin's ``hello``); None,
        the default, where one endpoint may serve several plugins or none is reached. The
        manifest refuses two plugin ids at one such endpoint (``dispatcher.config.loader``):
        the second's every call would be refused there."""
        return None

    def is_fleet(self) -> bool:
        return bool(self.instance_sources()) or len(self.instance_targets()) > 1

    def host_module(self) -> tuple[str, str] | None:
        """The top-level module this target imports into the dispatcher's own process and
        where its code is (the file or folder the target's own ``path`` finds); None, the
        default, for a target whose plugin runs anywhere else, or one whose folder does
        not hold the module (it imports what ``sys.path`` finds).

        A process holds one module of a name (``sys.modules``): two targets whose folders
        hold two modules of one name would both run whichever was imported first, so the
        manifest refuses them (``dispatcher.config.loader``)."""
        return None

    def of_plugin(self, plugin_key: str) -> Self:
        """This target as the manifest entry ``plugin_key`` (``id@version``) uses it; the
        default, for a target that is the same place whoever calls it: itself.

        A target whose instances are plugins of one version (those that connect to the
        dispatcher as it, ``accepts_connections``) returns a copy that names the version:
        an equal target written for another version or plugin is then another target,
        another key, so another fleet, and its calls never reach this one's instances.
        ``PluginSpec`` asks each target it loads."""
        return self

    def fleet_settings(self) -> FleetSettings:
        """How a fleet of this target's instances is balanced and watched."""
        return FleetSettings()


def _plain(value: Any) -> Any:
    """``value`` with models as dicts and secrets as their values, for ``TargetConfig.key``."""
    if isinstance(value, BaseModel):
        return {"": type(value).__qualname__} | {
            name: _plain(getattr(value, name)) for name in type(value).model_fields
        }
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(item) for item in value]
    return value


class Lifecycle(Protocol):
    """How long a plugin's lifecycle hooks may take."""

    @property
    def init_timeout_ms(self) -> int: ...

    @property
    def stop_timeout_ms(self) -> int: ...


class PluginInfo(Protocol):
    """One plugin at one version, as a provider sees it."""

    @property
    def id(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def key(self) -> str:
        """``id@version``: unique in a manifest."""
        ...

    @property
    def config(self) -> dict[str, Any]:
        """Passed to the plugin's ``init``."""
        ...

    @property
    def lifecycle(self) -> Lifecycle: ...

    @property
    def protocol(self) -> int | None:
        """The plugin protocol version the manifest says it speaks, if it says."""
        ...

    @property
    def methods(self) -> Mapping[str, Any]:
        """The plugin's methods by name; a provider reads only the names."""
        ...

    @property
    def capabilities(self) -> Capabilities:
        """What the plugin may touch where a provider sandboxes it (defaults deny)."""
        ...


def connection_heartbeat(targets: Sequence[TargetConfig]) -> float | None:
    """The heartbeat of one plugin connection serving ``targets`` (reverse mode), in
    seconds: the gateway pings the connection by it, and its provider bounds the
    connection's other liveness checks (a read that stalls, a write that stalls) by it
    too, so one setting decides when the plugin is gone. The shortest any target asks:
    each says a plugin silent for 1.5 of its heartbeats is gone, and the one connection
    serves them all. None if none says."""
    heartbeats = [heartbeat for target in targets if (heartbeat := target.inbound_heartbeat())]
    return min(heartbeats) if heartbeats else None
