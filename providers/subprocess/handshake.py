"""The host's side of the subprocess handshake (``linchkit_plugin.handshake`` holds what
both sides must agree on; ``docs/protocol.md`` the contract).

``environment`` is what a launch passes to the child; ``read_line`` waits for the one line
it prints on stdout; ``parse`` checks it and returns the gRPC address to connect to and,
with AutoMTLS, the plugin's one-time server certificate (the only root the host trusts).
Every way a plugin fails to start as the protocol says is a ``HandshakeError``.

The address is the plugin's word, and the host dials it: a plugin sandboxed without a
network could otherwise name any host and port, or any Unix socket of the host, and have
the dispatcher carry its calls there. So the address must be what the protocol says it
is (docs/protocol.md, "Handshake"): the target's own ``network``, a Unix socket directly
in the folder the host made for this launch, or a TCP port on a loopback address. That
socket is pinned (``pin_socket``): the host dials the very socket it checked, at every
reconnect, whatever the plugin puts at its name later.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from linchkit_plugin._automtls import Certificate, der_from_handshake
from linchkit_plugin.errors import ProviderError
from linchkit_plugin.handshake import (
    CLIENT_CERT_ENV,
    CORE_VERSION,
    LINE_FORMAT,
    MAGIC_COOKIE_KEY,
    MAGIC_COOKIE_VALUE,
    NETWORK_ENV,
    PROTOCOL,
    PROTOCOL_VERSIONS_ENV,
    SOCKET_DIR_ENV,
    HandshakeLine,
)
from providers._socket_pin import PinnedSocket, SocketTampered
from providers.subprocess.child import MAX_LINE_BYTES
from providers.subprocess.target import MINIMAL_ENV

if TYPE_CHECKING:
    from providers.subprocess.target import SubprocessTarget

__all__ = [
    "HandshakeError",
    "environment",
    "inherited",
    "parse",
    "pin_socket",
    "read_line",
]


class HandshakeError(ProviderError):
    """The plugin did not start as the protocol says (no line, a malformed line, a refusal)."""


def inherited(target: SubprocessTarget) -> dict[str, str]:
    """What the child gets of the dispatcher's own environment.

    By default only ``MINIMAL_ENV`` and ``LC_*`` (the dispatcher's secrets, tokens and
    cloud credentials stay with it); ``inherit_env: true`` passes all of it, a list of
    names passes those too.
    """
    if target.inherit_env is True:
        return dict(os.environ)
    names = set(MINIMAL_ENV) | set(target.inherit_env or ())
    return {
        name: value for name, value in os.environ.items() if name in names or name.startswith("LC_")
    }


def environment(
    target: SubprocessTarget, socket_folder: str, client_certificate: Certificate | None
) -> dict[str, str]:
    """The child's environment: what it inherits of ours, the target's ``env``, then the
    handshake's."""
    environment = {
        **inherited(target),
        **target.env,
        MAGIC_COOKIE_KEY: MAGIC_COOKIE_VALUE,
        PROTOCOL_VERSIONS_ENV: ",".join(map(str, target.protocol_versions)),
        NETWORK_ENV: target.network,
        SOCKET_DIR_ENV: socket_folder,
    }
    if client_certificate is not None:
        environment[CLIENT_CERT_ENV] = client_certificate.certificate_pem.decode()
    else:
        environment.pop(CLIENT_CERT_ENV, None)
    return environment


async def read_line(
    process: asyncio.subprocess.Process,
    who: str,
    timeout: float,
    stderr: Sequence[str],
    exit_code: Callable[[], Awaitable[int]],
) -> str:
    """The handshake line, within ``timeout``; ``stderr`` (its tail) explains a failure,
    ``exit_code`` (``Child.reaped``) an exit before it."""
    assert process.stdout is not None
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            raw = await process.stdout.readuntil(b"\n")
    except asyncio.IncompleteReadError as ended:
        raw = ended.partial  # stdout closed: a last line without its line break, or none
    except asyncio.LimitOverrunError:
        # Refused: killed now and its stdout read to the end, or the pipe, paused with a
        # full buffer, would never see its end and never be closed.
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                while await process.stdout.read(MAX_LINE_BYTES):
                    pass
        raise HandshakeError(
            f"{who}: its stdout holds no line break in its first"
            f" {MAX_LINE_BYTES // 1024} KiB; expected one handshake line ({LINE_FORMAT})"
            f"{tail(stderr)}"
        ) from None
    except TimeoutError:
        raise HandshakeError(
            f"{who}: no handshake line within {timeout:.1f} s (the target's"
            f" handshake_timeout_ms: {round(timeout * 1000)}); raise it for a plugin that"
            f" starts slowly{tail(stderr)}"
        ) from None
    if not raw:
        # Its stdout ended: it exits, or it closed stdout and runs on, which the same
        # deadline bounds (before, the launch waited for as long as it ran).
        try:
            async with asyncio.timeout_at(deadline):
                code = await exit_code()  # its stderr read to the end
        except TimeoutError:
            raise HandshakeError(
                f"{who}: closed its stdout without a handshake line and was still running"
                f" {timeout:.1f} s after its start (the target's handshake_timeout_ms:"
                f" {round(timeout * 1000)}){tail(stderr)}"
            ) from None
        raise HandshakeError(f"{who}: exited with code {code} before its handshake{tail(stderr)}")
    return raw.decode("utf-8", "replace").strip()


def parse(
    line: str,
    who: str,
    offered: Sequence[int],
    *,
    mtls: bool,
    network: str,
    socket_folder: str,
) -> tuple[str, bytes | None]:
    """The gRPC address of the plugin and, with ``mtls``, its server certificate (DER).

    ``network`` is the target's; a ``unix`` address must name an entry directly in
    ``socket_folder``, a ``tcp`` one a loopback address (the module's docstring says why).
    """
    try:
        fields = HandshakeLine.parse(line)
    except ValueError:
        raise HandshakeError(
            f"{who}: malformed handshake line {line!r:.200}; expected {LINE_FORMAT} (the "
            "plugin's stdout carries only this line: write logs and prints to stderr)"
        ) from None
    if fields.core_version != str(CORE_VERSION):
        raise HandshakeError(
            f"{who}: handshake core version {fields.core_version!r}; this host speaks {CORE_VERSION}"
        )
    app = fields.app_version
    if not app.isdigit() or int(app) not in offered:
        raise HandshakeError(
            f"{who}: plugin chose protocol version {app!r}, not one of those offered ({offered})"
        )
    if fields.protocol != PROTOCOL:
        raise HandshakeError(f"{who}: protocol {fields.protocol!r}; only {PROTOCOL} is spoken")
    address = fields.address
    if fields.network != network:
        raise HandshakeError(
            f"{who}: handshake network {fields.network!r:.20}; the target's network is {network}"
        )
    if network == "unix" and _directly_in(address, socket_folder):
        grpc_address = f"unix:{address}"
    elif network == "tcp" and _loopback_port(address):
        grpc_address = address
    else:
        raise HandshakeError(
            f"{who}: bad {network} address {address!r:.200}: expected "
            + (
                f"a socket in {socket_folder} (LINCHKIT_PLUGIN_SOCKET_DIR)"
                if network == "unix"
                else "127.0.0.1:PORT (a loopback address)"
            )
        )
    if not mtls:
        return grpc_address, None
    if not fields.server_cert:
        raise HandshakeError(
            f"{who}: AutoMTLS was asked for but the plugin sent no server "
            "certificate; it would serve in plain text"
        )
    try:
        return grpc_address, der_from_handshake(fields.server_cert)
    except ValueError as error:
        raise HandshakeError(f"{who}: bad server certificate: {error}") from None


def _directly_in(address: str, folder: str) -> bool:
    name = os.path.basename(address)
    return (
        os.path.isabs(address)
        and os.path.dirname(address) == folder.rstrip(os.sep)
        and name not in {"", ".", ".."}
    )


def _loopback_port(address: str) -> bool:
    found = re.fullmatch(r"(\d+\.\d+\.\d+\.\d+|\[[0-9a-fA-F:]+\]):(\d{1,5})", address)
    if found is None or not 0 < int(found.group(2)) < 65536:
        return False
    try:
        return ipaddress.ip_address(found.group(1).strip("[]")).is_loopback
    except ValueError:
        return False


def pin_socket(
    who: str, pid: int, address: str, log: logging.Logger
) -> tuple[str, PinnedSocket | None]:
    """The address to dial for ``address`` and, for a ``unix:`` one, its pin.

    The socket is pinned (``providers._socket_pin``) and dialled as ``/proc/self/fd/N``:
    checked once and dialled by its path, as it was, a plugin could swap it for a symlink
    to any socket the dispatcher's user may reach after the handshake, and the host's next
    reconnect went there (with ``auto_mtls: false``, its calls and their metadata in plain
    text). ``HandshakeError`` if the entry is not a socket the plugin made (a symlink, a
    file, nothing)."""
    if not address.startswith("unix:"):
        return address, None
    path = address.removeprefix("unix:")
    pin = PinnedSocket(path, f"plugin {who} (pid {pid})", log, "kills it")
    try:
        return f"unix:{pin.pin()}", pin
    except SocketTampered:
        pin.close()
        raise HandshakeError(
            f"{who}: {path} is not a socket (a symlink or a file): refused"
        ) from None
    except OSError as error:
        pin.close()
        raise HandshakeError(f"{who}: its socket {path}: {error.strerror}") from None


def tail(lines: Sequence[str]) -> str:
    return ("; its stderr ends with:\n  " + "\n  ".join(lines[-10:])) if lines else ""
