"""Provider drivers, one module each, found through the ``dispatcher.providers`` entry points.

Third parties add a provider by publishing a ``Provider`` subclass under that entry-point
group; the name of the entry point is the manifest's ``provider:`` value. Built-in
providers are listed here too, so a source checkout works before it is installed.
Provider modules import their vendor SDK lazily, so loading a target model is cheap.
"""

from __future__ import annotations

import logging
from functools import cache
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

# First: grpc reads whether to register its fork handlers when it is imported.
import providers._fork_safety  # noqa: F401
from providers.base import Health, Provider
from providers.target import TargetConfig

__all__ = [
    "ENTRY_POINT_GROUP",
    "Health",
    "Provider",
    "ProviderNotLoadable",
    "TargetConfig",
    "is_provider",
    "loadable_provider_names",
    "provider_class",
    "provider_names",
]

log = logging.getLogger("dispatcher.providers")

ENTRY_POINT_GROUP = "dispatcher.providers"

_BUILT_IN = {
    "local": "providers.local:LocalProvider",
    "http": "providers.http:HttpProvider",
    "grpc": "providers.grpc:GrpcProvider",
    "subprocess": "providers.subprocess.provider:SubprocessProvider",
    "docker": "providers.docker:DockerProvider",
    "knative": "providers.knative:KnativeProvider",
    "lambda": "providers.aws_lambda:LambdaProvider",
    "websocket": "providers.websocket:WebSocketProvider",
    "wasm": "providers.wasm:WasmProvider",
}


class ProviderNotLoadable(Exception):
    """A provider is registered (a built-in, or a package's entry point) but its class
    cannot be loaded: its package is broken, half installed, or names something else."""

    def __init__(self, name: str, reference: str, reason: str) -> None:
        super().__init__(f"provider {name!r} ({reference}) cannot be loaded: {reason}")
        self.name = name
        self.reference = reference
        self.reason = reason


def _load(name: str, reference: str) -> type[Provider[Any]]:
    module_name, _, attribute = reference.partition(":")
    try:
        provider = getattr(import_module(module_name), attribute)
    except Exception as error:  # a third party's module: anything its import raises
        raise ProviderNotLoadable(name, reference, f"{type(error).__name__}: {error}") from error
    if not (isinstance(provider, type) and issubclass(provider, Provider)):
        raise ProviderNotLoadable(name, reference, "not a dispatcher Provider subclass")
    serves = getattr(provider, "name", None)
    if serves != name:
        raise ProviderNotLoadable(name, reference, f"its class serves {serves!r}")
    return provider


@cache
def _references() -> dict[str, str]:
    """Every known provider's ``module:Class`` by name: built-ins, then entry points."""
    references = dict(_BUILT_IN)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        references.setdefault(entry_point.name, entry_point.value)
    return references


def is_provider(name: str) -> bool:
    """Whether a provider is registered as ``name`` (a built-in's without reading the
    installed packages' entry points: ~20 ms of a start)."""
    return name in _BUILT_IN or name in _references()


def provider_names() -> list[str]:
    """Every known provider's name, sorted, without importing any of them."""
    return sorted(_references())


def provider_class(name: str) -> type[Provider[Any]]:
    """The provider named ``name``, its module imported now (``KeyError`` if unknown,
    ``ProviderNotLoadable`` if its class cannot be loaded).

    One at a time: a manifest that uses two providers imports two of the nine built-in
    modules; all nine, their target models built, were ~0.2 s of a CLI's start.
    """
    loaded = _loaded(name)
    if isinstance(loaded, ProviderNotLoadable):
        # A new one each time: raising the kept one again would grow its traceback.
        raise ProviderNotLoadable(name, loaded.reference, loaded.reason) from loaded.__cause__
    return loaded


@cache
def _loaded(name: str) -> type[Provider[Any]] | ProviderNotLoadable:
    """The class, or why it cannot be loaded: a failed import is tried once, not once for
    each of a thousand targets naming it."""
    try:
        return _load(name, _BUILT_IN.get(name) or _references()[name])
    except ProviderNotLoadable as error:
        return error


@cache
def loadable_provider_names() -> list[str]:
    """``provider_names`` without those whose class cannot be loaded, each said once in a
    warning: one broken package must not stop manifests that do not use it from loading."""
    loadable = []
    for name in provider_names():
        try:
            provider_class(name)
        except ProviderNotLoadable as error:
            log.warning("%s; manifests naming it are refused", error)
        else:
            loadable.append(name)
    return loadable
