"""Provider drivers, one module each, found through the ``dispatcher.providers`` entry points.

Third parties add a provider by publishing a ``Provider`` subclass under that entry-point
group; the name of the entry point is the manifest's ``provider:`` value. Built-in
providers are listed here too, so a source checkout works before it is installed.
Provider modules import their vendor SDK lazily, so loading a target model is cheap.
"""

from __future__ import annotations

from functools import cache
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

# First: grpc reads whether to register its fork handlers when it is imported.
import providers._fork_safety  # noqa: F401
from providers.base import Health, Provider
from providers.target import TargetConfig

__all__ = ["ENTRY_POINT_GROUP", "Health", "Provider", "TargetConfig", "provider_classes"]

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


def _load(reference: str) -> type[Provider[Any]]:
    module_name, _, attribute = reference.partition(":")
    provider = getattr(import_module(module_name), attribute)
    if not (isinstance(provider, type) and issubclass(provider, Provider)):
        raise TypeError(f"{reference} is not a dispatcher Provider subclass")
    return provider


@cache
def provider_classes() -> dict[str, type[Provider[Any]]]:
    """Every known provider by name: built-ins, then installed entry points."""
    references = dict(_BUILT_IN)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        references.setdefault(entry_point.name, entry_point.value)
    classes = {name: _load(reference) for name, reference in references.items()}
    for name, cls in classes.items():
        if cls.name != name:
            raise TypeError(f"provider entry point {name!r} names a class serving {cls.name!r}")
    return classes
