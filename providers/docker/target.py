"""What a ``provider: docker`` target says: the image, how to reach it, its sandbox and pool.

The manifest's models only, free of any engine client, so reading a manifest never needs
aiodocker. Every default is the safe choice; each relaxation is spelled out in the target.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from providers.model import Argv, EnvVars
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

# Docker's grammar of an image reference (github.com/distribution/reference, regexp.go):
# [domain[:port]/]path-component(/path-component)*[:tag][@digest]. Character classes are
# spelt out: Go's \w is ASCII, Python's is not.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_REFERENCE = re.compile(rf"(?P<name>{_NAME})(?::{_TAG})?(?:@(?P<digest>.*))?", re.DOTALL)
#: The digests the engine takes: go-digest's algorithms, lowercase hex of their size
#: (the grammar's ``algorithm:hex`` is wider, but the engine refuses the rest).
_KNOWN_DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}")
#: The longest name the engine takes (reference.NameTotalLengthMax), and the longest
#: reference: that name, a tag and a sha512 digest.
_MAX_NAME = 255
_MAX_REFERENCE = _MAX_NAME + 1 + 128 + 1 + len("sha512:") + 128


def _checked_image(image: str) -> str:
    """``image`` if it is a reference as Docker writes it; else ``ValueError``, never
    quoting it. The engine client puts the reference into API paths (``GET
    /images/{image}/json``) and a Python plugin's Dockerfile (``FROM``), so ``a/json?x=1``
    or ``../containers/abc`` reached the engine as another request, and a line break in
    ``base_image`` as another Dockerfile instruction."""
    match = _REFERENCE.fullmatch(image) if len(image) <= _MAX_REFERENCE else None
    if match is None:
        lowercase = len(image) <= _MAX_REFERENCE and _REFERENCE.fullmatch(image.lower())
        raise ValueError(
            "an image reference is [registry[:port]/]name[:tag][@digest], e.g."
            " linchkit/echo:1.0.0: a name of lowercase letters and digits joined by '.',"
            " '_', '__' or '-' in parts separated by '/', a tag of at most 128 letters,"
            " digits, '_', '.' and '-', no spaces"
            + (" (the name has capitals: Docker takes lowercase names only)" if lowercase else "")
        )
    if len(match["name"]) > _MAX_NAME:
        raise ValueError(f"an image name (before its tag) is at most {_MAX_NAME} characters")
    digest = match["digest"]
    if digest is not None and not _KNOWN_DIGEST.fullmatch(digest):
        raise ValueError(
            "an image digest is sha256: and 64 lowercase hex digits (or sha384: 96, sha512: 128)"
        )
    return image


#: An image a manifest names, checked when it loads against Docker's reference grammar.
ImageReference = Annotated[str, AfterValidator(_checked_image)]


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
    limits: DockerLimits = Field(default_factory=DockerLimits)
    sandbox: DockerSandbox = Field(default_factory=DockerSandbox)
    min_instances: int = Field(default=0, ge=0)
    max_instances: int = Field(default=4, ge=1)
    concurrency: int = Field(default=32, ge=1, description="Calls in flight per container.")
    idle_timeout_s: float = Field(default=300.0, gt=0)
    ready_timeout_s: float = Field(default=30.0, gt=0)
    stop_timeout_s: int = Field(default=5, ge=0, description="SIGTERM to SIGKILL.")
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
