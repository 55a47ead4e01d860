"""``provider: subprocess``: the manifest's model of a plugin executable the dispatcher
launches and owns (``docs/grpc-and-subprocess.md``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from providers._event_rate import DEFAULT_MAX_EVENTS_PER_SECOND
from providers.model import Argv, EnvVars
from providers.subprocess.output_rate import DEFAULT_MAX_LOG_LINES_PER_SECOND
from providers.target import ManifestPath, StrictModel, TargetConfig

__all__ = ["MINIMAL_ENV", "STOP_GRACE_MS", "SubprocessSandbox", "SubprocessTarget"]

#: What a child gets of the dispatcher's environment by default (with every ``LC_*``).
MINIMAL_ENV = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ")
#: The default bound of a plugin's whole stop, before SIGKILL: what every SDK may take
#: once told to stop (docs/protocol.md, "Stopping while called"): 5 s for its calls in
#: flight, then 5 s for its stop and destroy hooks, and 2 s to exit. The host's ``Stop``
#: and ``Destroy`` run those hooks within it too; a plugin that took a signal of its own
#: (the dispatcher's process group stopped at once) may be draining when it is detached.
#: It was 3 s: a stop hook of 4 s was killed half-way, its ``destroy`` never ran.
STOP_GRACE_MS = 12_000

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]


class SubprocessSandbox(StrictModel):
    """``sandbox:`` of a subprocess target: run the plugin locked down
    (``providers.subprocess.sandbox``), with the rights of the plugin's ``capabilities``."""

    runtime: list[ManifestPath] = Field(
        default_factory=list,
        description="Folders or files the plugin's runtime needs (an interpreter, its "
        "libraries), bound read-only beside /usr and the executable's own folder.",
    )
    user: Annotated[str, Field(pattern=r"^[0-9]+:[0-9]+$")] | None = Field(
        default=None,
        description="uid:gid the plugin runs as when the dispatcher runs as root. Default: "
        "a uid of its own, claimed while it runs (providers.subprocess.uids): plugins that "
        "share a uid share the kernel's per-user limits.",
    )
    seccomp: bool = Field(default=True, description="Deny ptrace, mount, bpf, keyctl, modules…")
    open_files: int = Field(default=256, gt=0, description="RLIMIT_NOFILE.")
    tmp_mb: int = Field(
        default=64,
        gt=0,
        description="Size of the plugin's private /tmp (memory: capabilities.memory_mb does "
        "not count it).",
    )
    processes: int = Field(
        default=128, gt=0, description="RLIMIT_NPROC when capabilities set no pids (threads count)."
    )


class SubprocessTarget(TargetConfig):
    """``provider: subprocess``: a plugin executable the dispatcher launches and owns."""

    provider: Literal["subprocess"]
    command: Argv = Field(
        min_length=1, description="The executable (relative to the manifest) and its arguments."
    )
    env: EnvVars = Field(
        default_factory=dict, description="Environment of the child, on top of the minimal one."
    )
    #: The environment carries a plugin's secrets (API keys, tokens) as often as not.
    secret_fields = frozenset({"env"})
    inherit_env: bool | list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = Field(
        default=False,
        description="Pass the dispatcher's own environment to the child: true for all of it, "
        "or a list of variable names. Default: only " + ", ".join(MINIMAL_ENV) + ", LC_*.",
    )
    sha256: Sha256 | dict[str, Sha256] | None = Field(
        default=None,
        description="Refuse to start unless the executable's SHA-256 is this; or a map "
        "of file (relative to the manifest) to SHA-256, every file checked before each launch.",
    )
    network: Literal["unix", "tcp"] = "unix"
    auto_mtls: bool = Field(default=True, description="One-time mutual TLS per launch.")
    protocol_versions: list[int] = Field(default_factory=lambda: [1], min_length=1)
    handshake_timeout_ms: int = Field(default=10_000, gt=0)
    health_interval_ms: int = Field(default=5_000, ge=0, description="0: no health pings.")
    health_failures: int = Field(default=3, gt=0, description="Failed pings before a kill.")
    restart: bool = True
    max_restarts: int = Field(default=5, ge=0)
    restart_window_s: float = Field(default=60.0, gt=0)
    restart_backoff_ms: int = Field(default=100, gt=0)
    restart_backoff_max_ms: int = Field(default=5_000, gt=0)
    stop_grace_ms: int = Field(
        default=STOP_GRACE_MS,
        gt=0,
        description="The bound of a whole stop (Stop, Destroy, SIGTERM) before SIGKILL.",
    )
    events: bool = True
    max_events_per_second: int = Field(
        default=DEFAULT_MAX_EVENTS_PER_SECOND,
        ge=1,
        description="Plugin events beyond this rate are dropped, counted.",
    )
    max_log_lines_per_second: int = Field(
        default=DEFAULT_MAX_LOG_LINES_PER_SECOND,
        ge=1,
        description="Lines of the plugin's stdout and stderr logged a second; the rest are "
        "counted, not logged.",
    )
    batch: bool = True
    sandbox: SubprocessSandbox | None = Field(
        default=None,
        description="Run the plugin under bubblewrap, seccomp and resource limits; true for "
        "the defaults. Its rights are the plugin's capabilities.",
    )

    @field_validator("sandbox", mode="before")
    @classmethod
    def _true_is_the_default_sandbox(cls, sandbox: object) -> object:
        if sandbox is True:
            return {}
        return None if sandbox is False else sandbox

    @field_validator("command")
    @classmethod
    def _executable_relative_to_manifest(
        cls, command: list[str], info: ValidationInfo
    ) -> list[str]:
        executable = command[0]
        if os.sep in executable and not os.path.isabs(executable):
            base = (info.context or {}).get("base_dir", Path.cwd())
            executable = str((Path(base) / executable).resolve())
        return [executable, *command[1:]]

    @field_validator("sha256")
    @classmethod
    def _pinned_files_relative_to_manifest(
        cls, sha256: str | dict[str, str] | None, info: ValidationInfo
    ) -> str | dict[str, str] | None:
        if not isinstance(sha256, dict):
            return sha256
        if not sha256:
            raise ValueError("pin at least one file, or leave sha256 out")
        base = Path((info.context or {}).get("base_dir", Path.cwd()))
        # Not resolved: the check reads each path as the launch will, symlinks followed then.
        return {os.path.join(base, path): digest.lower() for path, digest in sha256.items()}

    def describe(self) -> str:
        return f"subprocess {Path(self.command[0]).name}"
