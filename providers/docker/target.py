"""What a ``provider: docker`` target says: the image, how to reach it, its sandbox and pool.

The manifest's models only, free of any engine client, so reading a manifest never needs
aiodocker. Every default is the safe choice; each relaxation is spelled out in the target.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from providers.model import Argv, EnvVars, ImageReference
from providers.target import ManifestPath, StrictModel, TargetConfig

__all__ = [
    "BASE_IMAGE",
    "DockerBuild",
    "DockerLimits",
    "DockerSandbox",
    "DockerTarget",
    "ImageReference",
]

#: The image a Python plugin is built on (``infra/docker/build-base-image.sh`` makes it).
BASE_IMAGE = "linchkit/python-base:latest"


class DockerLimits(StrictModel):
    """Resources of one container; enforced by the engine's cgroups."""

    memory_mb: int = Field(default=256, ge=16, description="Memory; swap is not allowed.")
    cpus: float = Field(default=1.0, gt=0, description="CPU share, in cores.")
    pids: int = Field(default=64, ge=8, description="Processes and threads, together.")
    tmp_mb: int = Field(default=64, ge=1, description="Size of the tmpfs at /tmp.")


class DockerSandbox(StrictModel):
    """How the container is locked down. Every default is the safe choice."""

    read_only_root: bool = True
    drop_all_capabilities: bool = True
    no_new_privileges: bool = True
    user: str = Field(default="65534:65534", pattern=r"^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?$")
    network: Literal["none", "host"] = Field(
        default="none", description="'host' lets the plugin reach the network (and be reached)."
    )


class DockerBuild(StrictModel):
    """How ``dispatcher deploy`` builds ``image``: a Python plugin class on the base image,
    or any Dockerfile (``FROM scratch`` plus a static binary for Go and Rust plugins)."""

    context: ManifestPath = Field(
        description="Folder sent to the engine, relative to the manifest."
    )
    entrypoint: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", examples=["echo_plugin:Echo"]
    )
    dockerfile: str | None = Field(default=None, description="Path inside the context.")
    base_image: ImageReference = BASE_IMAGE

    @model_validator(mode="after")
    def _one_recipe(self) -> DockerBuild:
        if (self.entrypoint is None) == (self.dockerfile is None):
            raise ValueError("set exactly one of 'entrypoint' (a Python plugin) or 'dockerfile'")
        return self


#: The default time between a container's SIGTERM and its SIGKILL: what every SDK may
#: take once told to stop (docs/protocol.md, "Stopping while called"), 5 s for its calls
#: in flight, then 5 s for its stop and destroy hooks, and 2 s to exit, as a subprocess
#: plugin's ``stop_grace_ms``. It was 5 s: a plugin still draining was killed before its
#: hooks ran.
STOP_TIMEOUT_S = 12


class DockerTarget(TargetConfig):
    """``provider: docker``: a plugin image run as local, sandboxed containers."""

    provider: Literal["docker"]
    image: ImageReference = Field(examples=["linchkit/echo-plugin:1.0.0"])
    protocol: Literal["http"] = Field(
        default="http", description="The envelope over HTTP; gRPC will be another channel."
    )
    transport: Literal["unix", "tcp"] = Field(
        default="unix",
        description="unix: a socket in a mounted folder (works without network); "
        "tcp: 127.0.0.1 on the host network (needs sandbox.network: host).",
    )
    port: int | None = Field(
        default=None, ge=1, le=65535, description="tcp only; default: a free port per container."
    )
    command: Argv | None = Field(default=None, description="Overrides the image's CMD.")
    env: EnvVars = Field(default_factory=dict)
    #: The environment carries a plugin's secrets (API keys, tokens) as often as not.
    secret_fields = frozenset({"env"})
    limits: DockerLimits = Field(default_factory=DockerLimits)
    sandbox: DockerSandbox = Field(default_factory=DockerSandbox)
    min_instances: int = Field(default=0, ge=0)
    max_instances: int = Field(default=4, ge=1)
    concurrency: int = Field(default=32, ge=1, description="Calls in flight per container.")
    idle_timeout_s: float = Field(default=300.0, gt=0)
    ready_timeout_s: float = Field(default=30.0, gt=0)
    stop_timeout_s: int = Field(
        default=STOP_TIMEOUT_S,
        ge=0,
        description="SIGTERM to SIGKILL: at least the plugin's drain and hooks (10 s by default).",
    )
    health_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="How often each ready container's /health is probed; 0: never.",
    )
    unhealthy_after: int = Field(
        default=3, ge=1, description="Failed probes in a row before a container is replaced."
    )
    build: DockerBuild | None = None

    @model_validator(mode="after")
    def _consistent(self) -> DockerTarget:
        if self.min_instances > self.max_instances:
            raise ValueError("min_instances cannot exceed max_instances")
        if self.transport == "tcp" and self.sandbox.network != "host":
            raise ValueError(
                "transport tcp needs sandbox.network: host (only the host and none networks "
                "exist here); keep transport unix to run without network"
            )
        if self.transport == "unix" and self.port is not None:
            raise ValueError("port is for transport tcp")
        if self.port is not None and self.max_instances > 1:
            raise ValueError("a fixed port allows max_instances: 1 only; leave port unset")
        return self

    def describe(self) -> str:
        return f"docker {self.image}"
