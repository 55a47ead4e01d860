"""LinchKit plugin dispatcher: call plugin methods wherever they run.

from dispatcher import Dispatcher

async with Dispatcher.from_file("plugins.yaml") as d:
    result = await d.call("echo", "say", {"text": "hi"})
"""

from __future__ import annotations

from dispatcher._dispatcher import Call, Dispatcher, TargetHealth
from dispatcher._jobs import (
    JobExpired,
    JobNotFinished,
    JobNotFound,
    JobsUnavailable,
    ResultTooLarge,
)
from dispatcher._rollout import RolloutEvent
from dispatcher.config import (
    Manifest,
    ManifestError,
    ManifestProblem,
    MethodSpec,
    PluginSpec,
    Policies,
    load_manifest,
    parse_manifest,
)
from dispatcher.identity import Credentials, Principal
from linchkit_plugin.errors import (
    CircuitOpen,
    DeadlineExceeded,
    DispatchError,
    Forbidden,
    InvalidParams,
    MethodNotFound,
    Overloaded,
    PluginError,
    PluginNotFound,
    ProviderError,
    RateLimited,
    ShuttingDown,
    TargetUnavailable,
    Unauthorized,
)
from providers.invocation import Invocation, Outcome

__all__ = [
    "Call",
    "CircuitOpen",
    "Credentials",
    "DeadlineExceeded",
    "DispatchError",
    "Dispatcher",
    "Forbidden",
    "InvalidParams",
    "Invocation",
    "JobExpired",
    "JobNotFinished",
    "JobNotFound",
    "JobsUnavailable",
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
    "Principal",
    "ProviderError",
    "RateLimited",
    "ResultTooLarge",
    "RolloutEvent",
    "ShuttingDown",
    "TargetHealth",
    "TargetUnavailable",
    "Unauthorized",
    "load_manifest",
    "parse_manifest",
]
