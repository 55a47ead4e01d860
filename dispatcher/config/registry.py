"""``registry:``: plugin entries published in etcd, and what an entry from there may do.

One key per plugin version, ``<prefix>/<id>@<version>``, whose value is one ``plugins:``
item as JSON or YAML text. Entries arriving over the network decide what code the host
calls, so what they may say is narrower than a file's (``trust``):

* only the providers in ``trust.allow_providers`` (``http`` and ``grpc`` unless widened):
  ``local``, ``subprocess``, ``wasm`` and ``docker`` would run code from the host's disk
  or image store, ``lambda`` and ``knative`` would act with the host's cloud credentials;
* only the plugin ids in ``trust.allow_plugins`` when it is set;
* never a file of the host (a key ending in ``_file`` or ``_dir``, ``path``,
  ``unix_socket``) nor the host's environment (``${NAME}``): either would hand what the
  host keeps to whoever writes the registry;
* fixed instances only: no discovery source (``dns``, ``registry``) the host would follow;
* a ``fallback`` only to a plugin in ``trust.allow_plugins`` (none when it is unset): a
  fallback runs with the access the caller had to the entry;
* the key must name the entry's own ``id@version``, and the value fit ``max_entry_bytes``,
  nest at most ``MAX_ENTRY_DEPTH`` levels and use no YAML aliases (what they expand to
  would cost the host far more than the value's size);
* at most ``max_entries`` entries, the first keys in order (the same on every replica):
  whoever writes the prefix would otherwise choose how many plugin versions the host
  attaches and keeps in memory;
* the manifest's ``egress`` applies to every destination an entry names.

An entry off these rules is left out, named in the registry's ``skipped`` with the reason
(never its value), and the others apply.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import orjson
import yaml
from pydantic import Field

from dispatcher.config.includes import parse_yaml
from dispatcher.config.shape import MAX_DEPTH
from linchkit_plugin.wire import nested_deeper_than
from providers.discovery import EtcdWatch
from providers.target import StrictModel

__all__ = ["EntryTrust", "RegistryConfig", "entry_item"]

#: Providers an entry may use unless ``trust.allow_providers`` says otherwise: they call a
#: server somewhere else and run nothing of the host's.
DEFAULT_PROVIDERS = ("http", "grpc")

#: How deep an entry's value may nest (a manifest file's bound); a real entry needs a
#: handful of levels.
MAX_ENTRY_DEPTH = MAX_DEPTH
_TOO_DEEP = f"the value is nested deeper than {MAX_ENTRY_DEPTH} levels"

_HOST_FILE_KEY = re.compile(r"(_file|_dir)$|^(path|unix_socket)$")
_ENV_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\}")


class EntryTrust(StrictModel):
    """What an entry published in the registry may ask of the host."""

    allow_providers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROVIDERS),
        description="Providers an entry's targets may use; local, subprocess, wasm,"
        " docker, lambda and knative only when listed here.",
    )
    allow_plugins: list[str] | None = Field(
        default=None, description="Plugin ids entries may declare; any when unset."
    )
    max_entry_bytes: Annotated[int, Field(ge=256, le=1024 * 1024)] = 64 * 1024
    max_entries: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=1_000,
        description="Entries taken from the registry, the first keys in order; the others"
        " are left out, counted and logged (each entry is a plugin version the host attaches).",
    )


class RegistryConfig(EtcdWatch):
    """``registry:``: where plugin entries are published and how they are followed."""

    debounce_ms: int = Field(
        default=500, ge=0, le=60_000, description="Changes within this window apply together."
    )
    trust: EntryTrust = Field(default_factory=EntryTrust)


def entry_item(key: str, value: bytes, config: RegistryConfig) -> dict[str, Any]:
    """The ``plugins:`` item the value of ``key`` holds, or ``ValueError`` saying why it is
    left out. Messages never quote the value: the registry is written by many hands."""
    trust = config.trust
    if len(value) > trust.max_entry_bytes:
        raise ValueError(f"the value is over {trust.max_entry_bytes} bytes")
    item = _parsed(value)
    if not isinstance(item, dict):
        raise ValueError("the value is not a mapping (one 'plugins:' item)")
    name = key.removeprefix(f"{config.prefix}/")
    declared = f"{item.get('id')}@{item.get('version')}"
    if name != declared:
        raise ValueError("the key does not name the entry's own id@version")
    if trust.allow_plugins is not None and item.get("id") not in trust.allow_plugins:
        raise ValueError(f"plugin {item.get('id')!r} is not in trust.allow_plugins")
    for provider in _providers(item):
        if provider not in trust.allow_providers:
            raise ValueError(
                f"provider {provider!r} is not in trust.allow_providers"
                f" ({', '.join(trust.allow_providers) or 'none'})"
            )
    _refuse_host_reads(item)
    _refuse_discovery(item)
    _refuse_fallbacks(item, trust)
    return item


def _parsed(value: bytes) -> Any:
    try:
        item = orjson.loads(value)
    except orjson.JSONDecodeError:  # YAML, or JSON deeper than orjson's 1,024 levels
        item = _parsed_yaml(value)
    _check_depth(item)
    return item


def _parsed_yaml(value: bytes) -> Any:
    """YAML read after one pass over its events, which recurses into nothing: aliases are
    refused (a few hundred bytes of them expand to millions of nodes for the walks below)
    and so is nesting past ``MAX_ENTRY_DEPTH`` (yaml's composer recurses per level)."""
    try:
        text = value.decode("utf-8")
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ValueError("the value uses YAML aliases (*name): write each value out")
            if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                depth += 1
                if depth > MAX_ENTRY_DEPTH:
                    raise ValueError(_TOO_DEEP)
            elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                depth -= 1
        return parse_yaml(text)
    except (UnicodeDecodeError, yaml.YAMLError):
        raise ValueError("the value is neither JSON nor YAML") from None


def _check_depth(item: Any) -> None:
    if nested_deeper_than(item, MAX_ENTRY_DEPTH):
        raise ValueError(_TOO_DEEP)


def _targets(item: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target an entry writes (one that is not a mapping fails validation later)."""
    targets = [item.get("target")]
    methods = item.get("methods")
    if isinstance(methods, dict):
        targets += [method.get("target") for method in methods.values() if isinstance(method, dict)]
    return [target for target in targets if isinstance(target, dict)]


def _providers(item: dict[str, Any]) -> set[str]:
    return {str(target["provider"]) for target in _targets(item) if "provider" in target}


def _refuse_host_reads(item: dict[str, Any]) -> None:
    for target in _targets(item):
        _refuse_host_files(target)
    _refuse_environment(item)


def _refuse_discovery(item: dict[str, Any]) -> None:
    for target in _targets(item):
        instances = target.get("instances")
        for instance in instances if isinstance(instances, list) else ():
            if isinstance(instance, dict) and ({"dns", "registry"} & set(instance)):
                raise ValueError(
                    "an entry lists fixed instances only: a discovery source (dns, registry)"
                    " would have the host follow a server the entry names"
                )


def _refuse_fallbacks(item: dict[str, Any], trust: EntryTrust) -> None:
    """A fallback calls another plugin with the access the caller had to this one: an
    entry pointing its own target nowhere would hand its callers any plugin of the file.
    So an entry falls back only to plugins entries may declare (``allow_plugins``)."""
    methods = item.get("methods")
    places = [item.get("defaults"), *(methods.values() if isinstance(methods, dict) else ())]
    for place in places:
        fallback = place.get("fallback") if isinstance(place, dict) else None
        if fallback is None:
            continue
        plugin = fallback.get("plugin") if isinstance(fallback, dict) else None
        if trust.allow_plugins is None or plugin not in trust.allow_plugins:
            raise ValueError(
                "an entry's fallback may name only a plugin in trust.allow_plugins"
                " (it is called with the access callers have to this entry)"
            )


def _refuse_host_files(value: Any) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _HOST_FILE_KEY.search(key) and item is not None:
                named = f" ({key!r})" if len(key) <= 64 and key.isprintable() else ""
                raise ValueError(f"a target names a file of the host{named}")
            _refuse_host_files(item)
    elif isinstance(value, list):
        for item in value:
            _refuse_host_files(item)


def _refuse_environment(value: Any) -> None:
    if isinstance(value, str) and _ENV_REFERENCE.search(value):
        raise ValueError("the entry reads the host's environment (${…})")
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_environment(key)
            _refuse_environment(item)
    elif isinstance(value, list):
        for item in value:
            _refuse_environment(item)
