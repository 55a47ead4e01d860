"""Targets that list instances (``instances:``): the manifest side of a fleet, shared.

HTTP, gRPC and Knative targets name one place to call (``url``, ``address``, ``ingress``)
or, with ``instances:``, several interchangeable ones: fixed items of the provider's own
model (``{url: …}``, ``{address: …}``), weighted, and discovery sources
(``{dns: …}``, ``{registry: …}``, ``providers.discovery``). ``InstanceListing`` holds
what they do alike, so the three agree on it:

* the manifest is refused when it names no place at all, or one place twice;
* ``describe()`` lists every place, ``destinations()`` every fixed one and every
  registry's etcd (the egress policy checks them when the manifest loads);
* each instance becomes a single-address target of the same model with the fleet's
  own fields left out, so it equals (shares its pool, channel and breaker with) a plain
  target of that address;
* the fleet's own settings (``balance``, ``health_check``, ``outlier``) are refused on
  a target that is no fleet (one place, no discovery source), which would not use them.
  Only when written (``model_fields_set``): an instance's target, made here without
  them, has its defaults and loads.

A subclass declares its fields as it likes (``instances``, ``balance``,
``health_check``, ``outlier`` and its address field are expected) and says, in class
variables, which field names one instance and which key a fixed item holds it in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Self

from pydantic import model_validator

from providers.discovery import DnsInstance, Endpoint, RegistryInstance
from providers.target import (
    Balance,
    Destination,
    Discovery,
    FleetSettings,
    HealthCheck,
    OutlierDetection,
    TargetConfig,
    masked_url,
)

__all__ = ["InstanceListing"]

#: The settings of a fleet as a whole (``fleet_settings()``): a target that names one
#: place is no fleet and would not use them.
_FLEET_FIELDS = ("balance", "health_check", "outlier")


class InstanceListing(TargetConfig):
    """Base of a target that names one address, or several instances (a fleet)."""

    #: The field that names the one place a single target calls (``url``, ``address``).
    address_field: ClassVar[str]
    #: The key of a fixed ``instances:`` item that holds its place (``url``, ``address``).
    instance_key: ClassVar[str]
    #: How a refusal says what is missing: ``a url``, ``an address``.
    address_noun: ClassVar[str]

    if TYPE_CHECKING:  # declared by each subclass, with its own item model
        instances: Sequence[Any]
        balance: Balance
        health_check: HealthCheck | None
        outlier: OutlierDetection

    @model_validator(mode="after")
    def _some_place_and_none_twice(self) -> Self:
        places = self.fixed_places()
        if not places and not self.instance_sources():
            raise ValueError(
                f"the {self.provider} target needs {self.address_noun} or a list of instances"
            )
        seen: set[str] = set()
        for place, _ in places:
            if place in seen:
                raise ValueError(f"instance {masked_url(place)} is listed twice")
            seen.add(place)
        return self

    @model_validator(mode="after")
    def _fleet_settings_need_a_fleet(self) -> Self:
        written = [name for name in _FLEET_FIELDS if name in self.model_fields_set]
        # An ``instances`` list of one is no fleet (``is_fleet``: it is called as a plain
        # target) but keeps them: a fleet scaled down to one and up again is one edit of
        # its list, not two.
        if not written or self.instances or self.is_fleet():
            return self
        names = ", ".join(written)
        verb, them = ("is", "it") if len(written) == 1 else ("are", "them")
        raise ValueError(
            f"{names} {verb} for a target with several instances (instances, or a discovery"
            f" source); this one has one address and would not use {them}. Remove {them},"
            " or list the instances"
        )

    # -- what subclasses use -------------------------------------------------------------

    def fixed_places(self) -> list[tuple[str, int]]:
        """Every fixed place with its weight: the address field's (weight 1), then the
        ``instances:`` items', in manifest order."""
        head = getattr(self, self.address_field)
        places = [] if head is None else [(str(head), 1)]
        for item in self.instances:
            if not isinstance(item, DnsInstance | RegistryInstance):
                places.append((str(getattr(item, self.instance_key)), item.weight))
        return places

    def is_single(self) -> bool:
        """True when the target names one place and nothing else: no fleet to describe."""
        return getattr(self, self.address_field) is not None and not self.instances

    def listing(self, show: Callable[[str], str] = masked_url) -> str:
        """``[place, place, dns SRV …]``, for a fleet's ``describe()``."""
        listed = [show(place) for place, _ in self.fixed_places()]
        listed += [source.describe() for source in self.instance_sources()]
        return f"[{', '.join(listed)}]"

    def listed_destinations(
        self, destination_of: Callable[[str, str], Destination]
    ) -> tuple[Destination, ...]:
        """``destinations()``: each fixed place (``destination_of(field, place)``) and the
        etcd of each registry, named by the manifest key that holds it."""
        head = getattr(self, self.address_field)
        listed = [] if head is None else [destination_of(self.address_field, str(head))]
        for index, item in enumerate(self.instances):
            if isinstance(item, RegistryInstance):
                where = f"instances[{index}].registry.etcd"
                listed.append(Destination.of_url(where, str(item.registry.etcd)))
            elif not isinstance(item, DnsInstance):
                where = f"instances[{index}].{self.instance_key}"
                listed.append(destination_of(where, str(getattr(item, self.instance_key))))
        return tuple(listed)

    def place_of(self, endpoint: Endpoint) -> str:
        """How the address field spells a discovered instance; URL-addressed by default."""
        return endpoint.url()

    # -- TargetConfig's fleet methods -----------------------------------------------------

    def is_fleet(self) -> bool:
        # TargetConfig's answer, without building every instance's target to count them.
        return len(self.fixed_places()) > 1 or bool(self.instance_sources())

    def instance_targets(self) -> tuple[Self, ...]:
        return tuple(target for target, _ in self.weighted_instances())

    def weighted_instances(self) -> list[tuple[Self, int]]:
        if self.is_single():
            return [(self, 1)]
        return [(self.at_place(place), weight) for place, weight in self.fixed_places()]

    def instance_sources(self) -> list[Discovery]:
        return [
            item.dns if isinstance(item, DnsInstance) else item.registry
            for item in self.instances
            if isinstance(item, DnsInstance | RegistryInstance)
        ]

    def instance_at(self, endpoint: Endpoint) -> Self:
        return self.at_place(self.place_of(endpoint))

    def has_instance(self, target: TargetConfig) -> bool:
        # A discovered instance is this target's fields at the place it was found: one of
        # the same model, at one place, equal to this target made at that place.
        if super().has_instance(target):
            return True
        if not (self.instance_sources() and isinstance(target, InstanceListing)):
            return False
        if type(target) is not type(self) or not target.is_single():
            return False
        place = str(getattr(target, self.address_field))
        return self.at_place(place).key == target.key

    def fleet_settings(self) -> FleetSettings:
        return FleetSettings(
            balance=self.balance, health_check=self.health_check, outlier=self.outlier
        )

    def at_place(self, place: str) -> Self:
        """The single target of one instance: this one's fields, at ``place``."""
        # Validated again, not model_copy'd: a copy would carry the cached ``key`` along.
        # The fleet's own settings are left out, so an instance equals (shares its pool
        # and breaker with) a plain target of the same place.
        # Left out, they are not written, so the instance, no fleet, does not refuse them.
        fleet_fields = {self.address_field, "instances", *_FLEET_FIELDS}
        fields = {
            name: getattr(self, name)
            for name in type(self).model_fields
            if name not in fleet_fields
        }
        return type(self).model_validate({**fields, self.address_field: place})
