"""The container a plugin runs in: the Engine API's create body, in the API's own words.

Sandbox by default (each relaxation is a key under ``sandbox`` in the manifest):

    read-only root filesystem, tmpfs /tmp (mode 1777)       sandbox.read_only_root
    every capability dropped                                sandbox.drop_all_capabilities
    no-new-privileges                                       sandbox.no_new_privileges
    non-root user 65534:65534                               sandbox.user
    no network at all; the plugin listens on a Unix         sandbox.network: host
      socket in a tmpfs of SOCKET_FOLDER_MB that the        (with transport: tcp, the
      engine mounts and the host reaches (a folder of       plugin binds 127.0.0.1)
      the host's where the engine's volumes are out of
      the host's reach: unbounded, reported)
    memory (no swap), CPU and pids limits                   limits.memory_mb/cpus/pids
    an init process (tini) reaps orphans, forwards SIGTERM
    the image's own VOLUMEs: each a tmpfs of tmp_mb, not a volume on the host's disk

The plugin's ``capabilities`` (``providers.capabilities``) tighten or grant on top:
``memory_mb`` and ``pids`` replace the target's limits, ``files`` become bind mounts at the
same path (``:ro``/``:rw``), ``env`` passes those variables of the dispatcher's
environment, and ``network`` with any host uses the host's network (the only other mode
here), which cannot be limited to those hosts: ``translation`` reports that, and that
``cpu_s`` (CPU seconds) has no Docker form (``cpus`` is a rate).

Pure: it builds a dict and touches neither the engine nor the file system.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from providers.capabilities import Capabilities, Translation
from providers.docker.target import DockerTarget

__all__ = [
    "SOCKET_FOLDER_INODES",
    "SOCKET_FOLDER_MB",
    "SOCKET_MOUNT",
    "SOCKET_NAME",
    "container_config",
    "granted_env",
    "translation",
]

#: Where the socket folder is mounted in the container.
SOCKET_MOUNT = "/run/linchkit"
#: The plugin's socket in that folder.
SOCKET_NAME = "plugin.sock"
#: The size of the socket folder when it is a tmpfs: a socket takes no room, and a plugin
#: must have no place to write past ``tmp_mb`` but /tmp.
SOCKET_FOLDER_MB = 1
#: And as many files: a socket (and what a runtime puts beside it, a lock) is all it holds;
#: without a cap, each of a plugin's empty files would cost kernel memory, not room.
SOCKET_FOLDER_INODES = 64


def granted_env(capabilities: Capabilities) -> dict[str, str]:
    """The dispatcher's variables that ``capabilities.env`` passes to the plugin."""
    return {name: os.environ[name] for name in capabilities.env if name in os.environ}


def translation(
    target: DockerTarget,
    capabilities: Capabilities,
    *,
    socket_in_volume: bool = True,
    port_owner_checked: bool = True,
) -> Translation:
    """What the container of ``target`` enforces of ``capabilities``, and what it cannot;
    ``socket_in_volume``: whether the socket folder is a tmpfs (the host reaches the
    engine's volumes), or a folder on the host's disk; ``port_owner_checked``: whether the
    host can tell who listens on a ``transport: tcp`` port (``port_owner``)."""
    result = Translation("docker")
    if target.transport == "tcp" and not port_owner_checked:
        result.unenforced.append(
            "network: who listens on the container's port is not checked (it needs root):"
            " a local process that binds it first gets the calls and their token"
        )
    if target.transport == "unix" and not socket_in_volume:
        result.unenforced.append(
            "files: the socket folder is a folder on the host's disk, which the plugin may"
            " fill without bound (the engine's volumes, where it would be a tmpfs of"
            f" {SOCKET_FOLDER_MB} MiB, are out of this process's reach: run it as root)"
        )
    sandbox, limits = target.sandbox, target.limits
    network = "host" if capabilities.has_network else sandbox.network
    result.enforced.append(
        "network: none (NetworkMode none; the Unix socket is the way out)"
        if network == "none"
        else "network: the host's (NetworkMode host)"
    )
    if capabilities.has_network:
        result.unenforced.append(
            f"network: limited to {', '.join(capabilities.network)} is not enforced: "
            "the container shares the host's whole network"
        )
    result.enforced.append(
        "files: "
        + (", ".join(f"{grant.path} ({grant.mode})" for grant in capabilities.files) or "none")
        + f"; read-only root: {sandbox.read_only_root}; private /tmp"
    )
    result.enforced.append("env: " + (", ".join(capabilities.env) or "none of the host's"))
    result.enforced.append(f"memory: {capabilities.memory_mb or limits.memory_mb} MiB, no swap")
    result.enforced.append(f"pids: {capabilities.pids or limits.pids}")
    result.enforced.append(f"cpu: {limits.cpus} cores (a rate)")
    if capabilities.cpu_s is not None:
        result.unenforced.append(
            f"cpu_s: {capabilities.cpu_s} CPU seconds has no Docker form (limits.cpus is a rate)"
        )
    if sandbox.user.split(":")[0] in ("0", "root"):
        result.unenforced.append("user: the plugin runs as root in its container")
    return result


def container_config(
    target: DockerTarget,
    env: dict[str, str],
    socket_dir: Path | None,
    capabilities: Capabilities | None = None,
    image_volumes: Iterable[str] = (),
    *,
    socket_in_volume: bool = False,
) -> dict[str, Any]:
    """The create body of one container of ``target``; ``socket_dir`` is mounted if given,
    or, with ``socket_in_volume``, an anonymous volume that is a tmpfs of
    ``SOCKET_FOLDER_MB`` (the engine mounts it and removes it with the container; the host
    finds it in the container's ``Mounts``).

    ``image_volumes`` are the paths the image declares as ``VOLUME``s: left alone, the
    engine would make each a volume on the host's disk, writable past the read-only root
    and ``tmp_mb``, and left behind with its contents when the container is removed."""
    capabilities = capabilities or Capabilities()
    sandbox, limits = target.sandbox, target.limits
    memory = (capabilities.memory_mb or limits.memory_mb) * 1024 * 1024
    tmpfs = f"rw,nosuid,nodev,mode=1777,size={limits.tmp_mb}m"
    mounted = {str(grant.path) for grant in capabilities.files}
    if socket_dir is not None or socket_in_volume:
        mounted.add(SOCKET_MOUNT)
    host_config: dict[str, Any] = {
        "Init": True,
        "ReadonlyRootfs": sandbox.read_only_root,
        "Tmpfs": {
            **{path: tmpfs for path in image_volumes if path.rstrip("/") not in mounted},
            "/tmp": tmpfs,
        },
        "CapDrop": ["ALL"] if sandbox.drop_all_capabilities else [],
        "SecurityOpt": ["no-new-privileges:true"] if sandbox.no_new_privileges else [],
        "Memory": memory,
        "MemorySwap": memory,  # equal to Memory: no swap on top
        "NanoCpus": int(limits.cpus * 1e9),
        "PidsLimit": capabilities.pids or limits.pids,
        "NetworkMode": "host" if capabilities.has_network else sandbox.network,
        # A chatty plugin must not fill the host's disk; the provider reads only the tail.
        "LogConfig": {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "1"}},
    }
    binds = [f"{grant.path}:{grant.path}:{grant.mode}" for grant in capabilities.files]
    if socket_dir is not None:
        binds.append(f"{socket_dir}:{SOCKET_MOUNT}:rw")
    if binds:
        host_config["Binds"] = binds
    if socket_in_volume:
        host_config["Mounts"] = [_socket_volume()]
    config: dict[str, Any] = {
        "Image": target.image,
        "Env": [f"{key}={value}" for key, value in {**granted_env(capabilities), **env}.items()],
        "User": sandbox.user,
        "HostConfig": host_config,
    }
    if target.command is not None:
        config["Cmd"] = target.command
    return config


def _socket_volume() -> dict[str, Any]:
    """The socket folder as an anonymous volume the local driver mounts as a tmpfs: mode
    0777, for the container's user creates its socket there."""
    options = (
        f"size={SOCKET_FOLDER_MB}m,nr_inodes={SOCKET_FOLDER_INODES},mode=0777,nosuid,nodev,noexec"
    )
    return {
        "Type": "volume",
        "Target": SOCKET_MOUNT,
        "VolumeOptions": {
            "DriverConfig": {
                "Name": "local",
                "Options": {"type": "tmpfs", "device": "tmpfs", "o": options},
            }
        },
    }
