"""A wasm plugin's capabilities in Extism's words: the manifest it is compiled with, the
config its instances get, and what that enforces.

    network    Extism's HTTP host function may reach ``allowed_hosts`` (names only),
               and wherever they redirect (reported as not enforced); WASI preview 1
               has no sockets, so nothing else reaches the network
    files      WASI preopens at the same path, ``ro:`` for read-only grants
    env        the WASI environment stays empty (Extism offers none); each granted
               variable is passed as an Extism config key of its name
    cpu_s      each call's run time is capped at it (a call runs on one thread)
    memory_mb  the linear memory's page limit: growing past it traps the call
    pids       a module cannot start processes

Pure: it builds dicts and reads only the host's environment for granted names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from linchkit_plugin.wire import encode_json
from providers.capabilities import Capabilities, Translation, is_cidr
from providers.wasm.target import DEFAULT_MEMORY_MB

__all__ = ["CONFIG_KEY", "WasmSandbox", "sandbox_of"]

#: The Extism config key holding the plugin's whole ``config`` as JSON (sdk/go/wasm).
CONFIG_KEY = "linchkit.config"
_PAGE = 64 * 1024


@dataclass(frozen=True, slots=True)
class WasmSandbox:
    """What one plugin's instances are compiled and started with."""

    manifest_options: dict[str, Any]
    config: dict[str, str]
    memory_mb: int
    cpu_s: float | None
    translation: Translation


def sandbox_of(capabilities: Capabilities, plugin_config: dict[str, Any]) -> WasmSandbox:
    memory_mb = capabilities.memory_mb or DEFAULT_MEMORY_MB
    translation = Translation("wasm")
    enforced, unenforced = translation.enforced, translation.unenforced

    hosts = [host for host in capabilities.network if not is_cidr(host)]
    options: dict[str, Any] = {
        "memory": {"max_pages": memory_mb * 1024 * 1024 // _PAGE},
        "allowed_hosts": hosts,
        "allowed_paths": {
            ("ro:" if grant.mode == "ro" else "") + str(grant.path): str(grant.path)
            for grant in capabilities.files
        },
    }
    enforced.append(
        f"network: {', '.join(hosts)} through Extism HTTP only"
        if hosts
        else "network: none (WASI preview 1 has no sockets; no Extism HTTP host allowed)"
    )
    if hosts:
        # libextism's HTTP client checks the first URL only, and resolves names itself.
        unenforced.append(
            f"network: a redirect from {', '.join(hosts)} is followed to any host, and the "
            "names connect wherever they resolve: the manifest's egress policy (link-local "
            "and metadata addresses included) does not apply to Extism's HTTP"
        )
    unenforced.extend(
        f"network: {cidr} cannot be granted (Extism allows host names only): denied"
        for cidr in capabilities.network
        if is_cidr(cidr)
    )
    enforced.append(
        "files: "
        + (
            ", ".join(f"{grant.path} ({grant.mode})" for grant in capabilities.files)
            if capabilities.files
            else "none (no WASI preopen)"
        )
    )

    config = {
        key: value if isinstance(value, str) else encode_json(value).decode()
        for key, value in plugin_config.items()
    }
    config[CONFIG_KEY] = encode_json(plugin_config).decode()
    for name in capabilities.env:
        if name in os.environ:
            config[name] = os.environ[name]
        else:
            unenforced.append(f"env: {name} is granted but not set in the dispatcher's environment")
    enforced.append(
        "env: "
        + (
            ", ".join(capabilities.env) + " as Extism config keys (WASI environ empty)"
            if capabilities.env
            else "none (WASI environ empty)"
        )
    )
    enforced.append(f"memory: {memory_mb} MiB of linear memory")
    enforced.append(
        f"cpu: {capabilities.cpu_s} s per call, and the call's deadline"
        if capabilities.cpu_s
        else "cpu: the call's deadline (epoch interruption)"
    )
    enforced.append("processes: none possible")
    return WasmSandbox(options, config, memory_mb, capabilities.cpu_s, translation)
