"""LinchKit plugin dispatcher: call plugin methods wherever they run.

from dispatcher import Dispatcher

async with Dispatcher.from_file("plugins.yaml") as d:
    result = await d.call("echo", "say", {"text": "hi"})
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dispatcher._dispatcher import Call, Dispatcher, TargetHealth
    from dispatcher.config import (
        Manifest,
        MethodSpec,
        PluginSpec,
        Policies,
        load_manifest,
        parse_manifest,
    )
    from dispatcher.errors import (
        CircuitOpen,
        DeadlineExceeded,
        DispatchError,
        Forbidden,
        InvalidParams,
        ManifestError,
        ManifestProblem,
        MethodNotFound,
        Overloaded,
        PluginError,
        PluginNotFound,
        ProviderError,
        RateLimited,
        TargetUnavailable,
        Unauthorized,
    )
    from dispatcher.invocation import Invocation, Outcome

# Names resolve on first use (PEP 562): importing `dispatcher.errors` from a provider module
# must not load the Dispatcher, which loads the manifest, which loads the providers.
_HOME = {
    **dict.fromkeys(("Call", "Dispatcher", "TargetHealth"), "dispatcher._dispatcher"),
    **dict.fromkeys(
        ("Manifest", "MethodSpec", "PluginSpec", "Policies", "load_manifest", "parse_manifest"),
        "dispatcher.config",
    ),
    **dict.fromkeys(("Invocation", "Outcome"), "dispatcher.invocation"),
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name) or ("dispatcher.errors" if name in __all__ else None)
    if home is None:
        raise AttributeError(f"module 'dispatcher' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value


__all__ = [
    "Call",
    "CircuitOpen",
    "DeadlineExceeded",
    "DispatchError",
    "Dispatcher",
    "Forbidden",
    "InvalidParams",
    "Invocation",
    "Manifest",
    "ManifestError",
    "ManifestProblem",
    "MethodNotFound",
    "MethodSpec",
    "Outcome",
    "Overloaded",
    "PluginError",
    "PluginNotFound",
    "PluginSpec",
    "Policies",
    "ProviderError",
    "RateLimited",
    "TargetHealth",
    "TargetUnavailable",
    "Unauthorized",
    "load_manifest",
    "parse_manifest",
]
