"""The plugin executable's two ways to serve its ``PluginServer``
(``linchkit_plugin.grpc_server.main``), until SIGTERM or SIGINT:

* service mode (``serve --address``): listen, print the handshake line with the bound
  address, register in etcd while serving when ``--register-etcd`` (or
  ``LINCHKIT_REGISTER_ETCD``) says so (docs/registry.md), and on a stop leave the registry
  and serve ``--leave-delay`` seconds more before draining;
* subprocess mode (the handshake environment, docs/protocol.md): negotiate the protocol
  version, serve mutual TLS when the host sent its certificate (AutoMTLS), listen on a
  Unix socket (or TCP on loopback), print the handshake line, and stop when stdin reaches
  end-of-file or the parent dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from linchkit_plugin._registry_options import registry_settings
from linchkit_plugin.auth import TOKEN_ENV, TOKEN_FILE_ENV
from linchkit_plugin.handshake import (
    CLIENT_CERT_ENV,
    NETWORK_ENV,
    PROTOCOL_VERSIONS_ENV,
    SOCKET_DIR_ENV,
    HandshakeLine,
)
from linchkit_plugin.registry import Registration

__all__ = ["Servable", "run"]


class Servable(Protocol):
    """What the executable serves: ``linchkit_plugin.grpc_server.PluginServer``."""

    async def serve(
        self,
        address: str,
        *,
        credentials: Any = None,
        on_ready: Any = None,
        stop: asyncio.Event,
        on_stopping: Callable[[], Awaitable[None]] | None = None,
    ) -> None: ...


def _set_parent_death_signal() -> None:
    """Linux: get SIGTERM when the parent dies (the host also watches stdin; belt and braces)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Set ``stop`` when stdin reaches end-of-file: the host has gone, however it died."""

    def read_until_eof() -> None:
        # os.read on the descriptor, not sys.stdin.buffer: a daemon thread blocked inside
        # the buffered reader holds its lock, and the interpreter aborts (SIGABRT) when it
        # cannot take that lock at shutdown.
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read_until_eof, name="stdin-eof", daemon=True).start()


def _handshake(protocol_version: int, network: str, address: str, certificate: str) -> None:
    line = HandshakeLine.of(protocol_version, network, address, certificate)
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


async def run(
    server: Servable,
    arguments: argparse.Namespace | None,
    *,
    protocol_version: int,
    token_configured: bool,
) -> int:
    """Serve ``server`` in service mode (``arguments``: ``serve``'s) or subprocess mode
    (``arguments`` None) until told to stop; the executable's exit status.

    ``protocol_version`` is the one the server's ``Describe`` reports, so that the
    handshake says the same; ``token_configured``: whether calls need a bearer token
    (service mode warns when they do not).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    if arguments is not None:  # service mode
        address = arguments.address
        host_part = address.rsplit(":", 1)[0]
        try:
            registering = registry_settings(arguments, kind="address", host=host_part)
        except ValueError as error:
            sys.stderr.write(f"serve: {error}\n")
            return 1
        registrations: list[Registration] = []

        def ready(port: int) -> None:
            if not token_configured:
                sys.stderr.write(
                    f"linchkit plugin: warning: no bearer token configured ({TOKEN_FILE_ENV} or"
                    f" {TOKEN_ENV}): anybody who can reach {host_part}:{port} can call this"
                    " plugin\n"
                )
                sys.stderr.flush()
            _handshake(protocol_version, "tcp", f"{host_part}:{port}", "")
            if registering is not None:
                registrations.append(registering.registration(host_part, port))
                registrations[-1].start()

        async def deregister() -> None:
            for each in registrations:  # before draining: no dispatcher sends another call
                await asyncio.to_thread(each.stop)
            if registering is not None and registrations:  # ... once each has seen it leave
                await asyncio.sleep(registering.leave_delay)

        try:
            await server.serve(address, on_ready=ready, stop=stop, on_stopping=deregister)
        except OSError as error:
            sys.stderr.write(f"serve: {error}\n")
            return 1
        return 0

    # Subprocess mode: the handshake environment.
    offered = os.environ.get(PROTOCOL_VERSIONS_ENV, "")
    if str(protocol_version) not in {part.strip() for part in offered.split(",")}:
        sys.stderr.write(
            f"plugin speaks protocol {protocol_version}; the host offered {offered!r}\n"
        )
        return 1
    _set_parent_death_signal()
    _watch_stdin(loop, stop)
    network = os.environ.get(NETWORK_ENV, "unix") or "unix"
    credentials = None
    certificate_text = ""
    client_pem = os.environ.get(CLIENT_CERT_ENV, "")
    if client_pem:
        import grpc

        from linchkit_plugin._automtls import generate_certificate

        certificate = generate_certificate("plugin")
        credentials = grpc.ssl_server_credentials(
            [(certificate.private_key_pem, certificate.certificate_pem)],
            root_certificates=client_pem.encode(),
            require_client_auth=True,
        )
        certificate_text = certificate.handshake_text
    if network == "unix":
        folder = os.environ.get(SOCKET_DIR_ENV) or "/tmp"
        path = os.path.join(folder, f"plugin-{os.getpid()}.sock")
        await server.serve(
            f"unix:{path}",
            credentials=credentials,
            on_ready=lambda _port: _handshake(protocol_version, "unix", path, certificate_text),
            stop=stop,
        )
        with contextlib.suppress(OSError):
            os.unlink(path)
    elif network == "tcp":
        await server.serve(
            "127.0.0.1:0",
            credentials=credentials,
            on_ready=lambda port: _handshake(
                protocol_version, "tcp", f"127.0.0.1:{port}", certificate_text
            ),
            stop=stop,
        )
    else:
        sys.stderr.write(f"unsupported {NETWORK_ENV} {network!r}; use unix or tcp\n")
        return 1
    return 0
