"""What a provider is told about a target and the plugin behind it.

``TargetConfig`` is the base of every provider's target model (the manifest's
``target:``), ``ManifestPath`` a path taken from the manifest's folder, ``StrictModel``
the base of every model a manifest is read into, and ``PluginInfo`` the part of a plugin's
manifest entry a provider may read. Providers see a plugin through ``PluginInfo`` only:
its policies belong to the dispatcher, not to the driver.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Protocol

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, SecretStr, ValidationInfo

__all__ = ["Lifecycle", "ManifestPath", "PluginInfo", "StrictModel", "TargetConfig"]


class StrictModel(BaseModel):
    """A manifest model: unknown keys are errors, and nothing changes once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _relative_to_manifest(path: Path, info: ValidationInfo) -> Path:
    if path.is_absolute():
        return path
    base = (info.context or {}).get("base_dir", Path.cwd())
    return (Path(base) / path).resolve()


#: A path in a manifest: relative paths are taken from the manifest's folder.
ManifestPath = Annotated[Path, AfterValidator(_relative_to_manifest)]


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
        """One line for ``dispatcher list``: where calls go."""
        return self.provider


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
    def methods(self) -> Mapping[str, Any]:
        """The plugin's methods by name; a provider reads only the names."""
        ...
