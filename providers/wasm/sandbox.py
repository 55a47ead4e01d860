"""A wasm plugin's capabilities in Extism's words: the manifest it is compiled with, the
config its instances get, and what that enforces.

    network    HTTP(S) through Extism's ``http_request`` only, which the dispatcher
               answers itself (``providers.wasm.http_host``): to the granted names
               (globs as Extism's ``allowed_hosts``) and to addresses written in the URL
               inside granted networks; every address checked by the egress policy and
               dialled pinned; redirects answered, never followed; request bodies at
               most ``max_request_body_bytes`` and answers at most
               ``max_response_bytes``. WASI preview 1 has no sockets, so nothing else
               reaches the network
    files      WASI preopens at the same path, ``ro:`` for read-only grants
    env        the WASI environment stays empty (Extism offers none); each granted
               variable is passed as an Extism config key of its name
    cpu_s      each call's run time is capped at it (a call runs on one thread)
    memory_mb  the linear memory's page limit: growing past it traps the call
    pids       a module cannot start processes

Pure: it builds dicts and reads only the host's environment for granted names.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any

from linchkit_plugin.wire import encode_json
from providers.capabilities import Capabilities, Translation, is_cidr
from providers.wasm.target import DEFAULT_MEMORY_MB

__all__ = [
    "CONFIG_KEY",
    "EXTISM_MAX_RESPONSE_BYTES",
    "WasmSandbox",
    "max_request_body_bytes",
    "max_response_bytes",
    "sandbox_of",
]

#: The Extism config key holding the plugin's whole ``config`` as JSON (sdk/go/wasm).
CONFIG_KEY = "linchkit.config"
_PAGE = 64 * 1024
_MIB = 1024 * 1024
#: libextism's own bound on an HTTP answer's body when the manifest sets none.
EXTISM_MAX_RESPONSE_BYTES = 50 * _MIB


def max_response_bytes(memory_mb: int) -> int:
    """How large an HTTP answer's body may be: a quarter of ``memory_mb``, at most
    libextism's 50 MiB (32 MiB at the default 128 MiB).

    ``memory_mb`` bounds every memory of the instance together: the body is written into
    Extism's memory, and a module that reads it copies it into its own (the Go PDK's
    ``Body()``), next to its heap and whatever it makes of the body. Two copies in half of
    the budget leave the other half to the module; an answer that still does not fit fails
    the call (``memory_mb``) instead of growing past the limit."""
    return min(EXTISM_MAX_RESPONSE_BYTES, memory_mb * _MIB // 4)


def max_request_body_bytes(memory_mb: int) -> int:
    """How large an HTTP request's body may be: as large as an answer's.

    The body lies in the module's memory, which ``memory_mb`` bounds, but the dispatcher
    copies it out to send it, into memory of its own that no limit of the plugin's counts,
    once for each call under way (``pool_size``). The same bound each way keeps what one
    call may have the dispatcher hold, sending or reading, to one figure."""
    return max_response_bytes(memory_mb)


@dataclass(frozen=True, slots=True)
class WasmSandbox:
    """What one plugin's instances are compiled and started with."""

    manifest_options: dict[str, Any]
    config: dict[str, str]
    memory_mb: int
    cpu_s: float | None
    translation: Translation
    #: Where HTTP may go: name patterns (Extism's ``allowed_hosts``) and networks.
    hosts: tuple[str, ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_response_bytes: int = 0
    max_request_body_bytes: int = 0


def sandbox_of(capabilities: Capabilities, plugin_config: dict[str, Any]) -> WasmSandbox:
    memory_mb = capabilities.memory_mb or DEFAULT_MEMORY_MB
    translation = Translation("wasm")
    enforced, unenforced = translation.enforced, translation.unenforced

    hosts = tuple(host for host in capabilities.network if not is_cidr(host))
    networks = tuple(
        ipaddress.ip_network(grant, strict=False)
        for grant in capabilities.network
        if is_cidr(grant)
    )
    response_bytes = max_response_bytes(memory_mb)
    options: dict[str, Any] = {
        "memory": {"max_pages": memory_mb * _MIB // _PAGE},
        # libextism's own HTTP client is shadowed by the dispatcher's (runtime.py): none
        # granted to it, in case a module ever reached it.
        "allowed_hosts": [],
        "allowed_paths": {
            ("ro:" if grant.mode == "ro" else "") + str(grant.path): str(grant.path)
            for grant in capabilities.files
        },
    }
    granted = [*hosts, *(f"{network} (URLs naming an address in it)" for network in networks)]
    enforced.append(
        f"network: HTTP(S) to {', '.join(granted)} only, through Extism's http_request,"
        " which the dispatcher answers: egress policy checked on every resolved address,"
        " which is dialled pinned; redirects answered to the module, never followed;"
        f" request bodies and answers of at most {response_bytes} bytes"
        if granted
        else "network: none (WASI preview 1 has no sockets; Extism HTTP refused)"
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
    return WasmSandbox(
        options,
        config,
        memory_mb,
        capabilities.cpu_s,
        translation,
        hosts,
        networks,
        response_bytes,
        max_request_body_bytes(memory_mb),
    )
