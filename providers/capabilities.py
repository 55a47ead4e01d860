"""What a sandboxed plugin may touch, said once for every kind of sandbox.

A plugin's ``capabilities:`` block (the manifest's ``PluginSpec``, handed to providers
through ``PluginInfo.capabilities``) names its rights in one vocabulary; each sandboxing
provider translates it into its own mechanism:

    capability     wasm (Extism/wasmtime)        subprocess + bubblewrap     docker
    network        HTTP via the host's           keep the network namespace  NetworkMode
                   http_request, egress checked
    files          WASI preopens (ro:/rw)        --ro-bind / --bind          Binds :ro/:rw
    env            Extism config keys            the child's environment     Env
    cpu_s          caps each call's run time     RLIMIT_CPU                  NanoCpus (rate)
    memory_mb      linear memory pages           RLIMIT_AS                   Memory
    pids           none can exist                RLIMIT_NPROC                PidsLimit

Defaults deny: no network, no file, no variable of the host's environment; limits left
unset fall back to each provider's defaults. A grant a provider cannot express is never
dropped quietly: ``Translation.unenforced`` names it, the provider warns at attach time
and ``dispatcher inspect`` prints it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import Field, field_validator

from linchkit_plugin.errors import ProviderError
from providers.model import ManifestPath, StrictModel

__all__ = ["Capabilities", "FileGrant", "LimitExceeded", "Translation", "is_cidr"]

EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


def is_cidr(destination: str) -> bool:
    """True when ``destination`` is an address or a network (``10.0.0.0/8``), not a name."""
    try:
        ipaddress.ip_network(destination, strict=False)
    except ValueError:
        return False
    return True


class FileGrant(StrictModel):
    """A host path the plugin may see, at the same path inside its sandbox."""

    path: ManifestPath
    mode: Literal["ro", "rw"] = "ro"


class Capabilities(StrictModel):
    """``capabilities:`` of a plugin. Everything not granted is denied."""

    network: list[str] = Field(
        default_factory=list,
        description="Hosts or CIDRs the plugin may reach; `none` or [] for no network.",
    )
    files: list[FileGrant] = Field(default_factory=list)
    env: list[EnvName] = Field(
        default_factory=list, description="Names of the host's variables passed to the plugin."
    )
    cpu_s: Annotated[float, Field(gt=0)] | None = None
    memory_mb: Annotated[int, Field(gt=0)] | None = None
    pids: Annotated[int, Field(gt=0)] | None = None

    @field_validator("network", mode="before")
    @classmethod
    def _none_is_no_network(cls, network: object) -> object:
        return [] if network in ("none", None) else network

    @property
    def has_network(self) -> bool:
        return bool(self.network)


@dataclass(frozen=True, slots=True)
class Translation:
    """How one provider enforces a plugin's capabilities: what it did, and what it could not.

    ``enforced`` lines read like ``network: none (no network namespace)``; ``unenforced``
    lines name a right or a limit that this provider, on this machine, cannot hold the
    plugin to. Both are printed by ``dispatcher inspect``.
    """

    provider: str
    enforced: list[str] = field(default_factory=list)
    unenforced: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [*self.enforced, *(f"NOT ENFORCED: {line}" for line in self.unenforced)]


class LimitExceeded(ProviderError):
    """A sandboxed plugin went past one of its limits (``memory_mb``, ``cpu_s``, ``pids``).

    Not retryable: the same call meets the same limit. ``details["limit"]`` names it.
    """

    def __init__(self, message: str, *, limit: str, value: float | None) -> None:
        super().__init__(message, details={"limit": limit, "value": value})
        self.limit = limit
