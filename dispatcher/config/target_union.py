"""The manifest model a document is validated against: ``Manifest`` specialised to the
union of the target models of the providers its targets name (cached per set of names).

A provider's module is imported only when a document names it, so a manifest of one
provider builds one target model, not every one (~0.2 s of a CLI's start). A target that
names no registered provider gets every loadable provider's union, so its problem lists
them all; one naming a registered provider that cannot be loaded is its own problem
(``unloadable``), said before validation, never a traceback of the broken package.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Annotated, Any, Union

from pydantic import Field

from dispatcher.config.errors import ManifestProblem, render_path
from dispatcher.config.manifest import Manifest
from providers import ProviderNotLoadable, is_provider, loadable_provider_names, provider_class

__all__ = ["manifest_model", "model_for", "unloadable"]


@cache
def manifest_model(providers: frozenset[str] | None = None) -> type[Manifest[Any]]:
    """``Manifest`` specialised to the union of the target models of ``providers`` (every
    registered provider's by default)."""
    names = sorted(providers) if providers is not None else loadable_provider_names()
    models = tuple(provider_class(name).target_model for name in names)
    target_union = Annotated[Union[models], Field(discriminator="provider")]  # type: ignore[valid-type]  # noqa: UP007
    return Manifest[target_union]


def model_for(data: Any) -> type[Manifest[Any]]:
    """The manifest model for a document: the union of the providers its targets name,
    when each names a known one; otherwise every provider's, so that a target without a
    provider, or with one nobody registered, gets the same problem whatever else is there.
    (A provider that is registered but cannot be loaded was reported before: ``unloadable``.)"""
    named: set[str] = set()
    for _, target in _targets(data):
        provider = target.get("provider") if isinstance(target, dict) else None
        if not (isinstance(provider, str) and is_provider(provider)):
            return manifest_model()
        named.add(provider)
    # Without a target (plugins from a registry only), any union validates the document
    # alike: the local provider's model is the cheapest to build.
    return manifest_model(frozenset(named or {"local"}))


def unloadable(data: Any) -> list[ManifestProblem]:
    """A problem for each target naming a provider that is registered but whose class
    cannot be loaded (its package is broken): said as such, not as a traceback."""
    problems = []
    for location, target in _targets(data):
        provider = target.get("provider") if isinstance(target, dict) else None
        if isinstance(provider, str) and is_provider(provider):
            try:
                provider_class(provider)
            except ProviderNotLoadable as error:
                fix = "reinstall the package that provides it, or name another provider"
                problems.append(
                    ManifestProblem(render_path((*location, "provider")), f"{error}: {fix}")
                )
    return problems


def _targets(data: Any) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """Each ``target`` a document's plugins write (a plugin's, then its methods'), where."""
    plugins = data.get("plugins") if isinstance(data, dict) else None
    for index, plugin in enumerate(plugins if isinstance(plugins, list) else ()):
        if not isinstance(plugin, dict):
            continue
        owners: list[tuple[tuple[str | int, ...], Any]] = [(("plugins", index), plugin)]
        methods = plugin.get("methods")
        if isinstance(methods, dict):
            owners += [(("plugins", index, "methods", name), m) for name, m in methods.items()]
        for location, owner in owners:
            target = owner.get("target") if isinstance(owner, dict) else None
            if target is not None:
                yield (*location, "target"), target
