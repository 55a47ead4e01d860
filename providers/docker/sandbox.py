"""The container a plugin runs in: the Engine API's create body, in the API's own words.

Sandbox by default (each relaxation is a key under ``sandbox`` in the manifest):

    read-only root filesystem, tmpfs /tmp (mode 1777)       sandbox.read_only_root
    every capability dropped                                sandbox.drop_all_capabilities
    no-new-privileges                                       sandbox.no_new_privileges
    non-root user 65534:65534                               sandbox.user
    no network at all; the plugin listens on a Unix         sandbox.network: host
      socket in a directory mounted from the host           (with transport: tcp, the
                                                              plugin binds 127.0.0.1)
    memory (no swap), CPU and pids limits                   limits.memory_mb/cpus/pids
    an init process (tini) reaps orphans, forwards SIGTERM

Pure: it builds a dict and touches neither the engine nor the file system.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from providers.docker.target import DockerTarget

__all__ = ["SOCKET_MOUNT", "SOCKET_NAME", "container_config"]

#: Where the host's socket folder is mounted in the container.
SOCKET_MOUNT = "/run/linchkit"
#: The plugin's socket in that folder.
SOCKET_NAME = "plugin.sock"


def container_config(
    target: DockerTarget, env: dict[str, str], socket_dir: Path | None
) -> dict[str, Any]:
    """The create body of one container of ``target``; ``socket_dir`` is mounted if given."""
    sandbox, limits = target.sandbox, target.limits
    memory = limits.memory_mb * 1024 * 1024
    host_config: dict[str, Any] = {
        "Init": True,
        "ReadonlyRootfs": sandbox.read_only_root,
        "Tmpfs": {"/tmp": f"rw,nosuid,nodev,mode=1777,size={limits.tmp_mb}m"},
        "CapDrop": ["ALL"] if sandbox.drop_all_capabilities else [],
        "SecurityOpt": ["no-new-privileges:true"] if sandbox.no_new_privileges else [],
        "Memory": memory,
        "MemorySwap": memory,  # equal to Memory: no swap on top
        "NanoCpus": int(limits.cpus * 1e9),
        "PidsLimit": limits.pids,
        "NetworkMode": sandbox.network,
        # A chatty plugin must not fill the host's disk; the provider reads only the tail.
        "LogConfig": {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "1"}},
    }
    if socket_dir is not None:
        host_config["Binds"] = [f"{socket_dir}:{SOCKET_MOUNT}:rw"]
    config: dict[str, Any] = {
        "Image": target.image,
        "Env": [f"{key}={value}" for key, value in env.items()],
        "User": sandbox.user,
        "HostConfig": host_config,
    }
    if target.command is not None:
        config["Cmd"] = target.command
    return config
