"""Where providers may connect: the manifest's ``egress`` policy, checked twice.

A manifest names destinations: an HTTP target's ``url``, a Knative ``ingress``, a gRPC
``address``, a Lambda ``endpoint_url``. Each target model lists its own through
``TargetConfig.destinations()``, so neither the loader nor this module knows a provider.
The policy is checked

* **when the manifest loads** (``EgressPolicy.refusal``): address literals, cloud metadata
  names, names the allowlist can never admit, hosts that are neither an address written
  canonically nor a host name (``0xa9fea9fe``, ``127.1``: addresses to a resolver, which
  a check as names would miss), Unix sockets outside ``unix_socket_dirs``
  (after symlinks are resolved), schemes other than http and https;
* **when a provider connects, after name resolution** (``EgressPolicy.admitted``): every
  address a name resolves to is checked and the forbidden ones are never dialled; when
  none is left the call fails with ``EgressRefused`` (a ``ProviderError``, not
  retryable) before a byte is sent. aiohttp does this through the resolver of
  ``providers._aiohttp.open_session``; gRPC resolves and checks before it creates a
  channel (``check_connect``; grpc resolves again on its own afterwards, which stays
  unchecked: see ``providers.grpc``).

The guards, and how to relax each:

``allow_link_local: false`` (the default) refuses 169.254.0.0/16 and fe80::/10, where
cloud metadata services hand out credentials, the metadata addresses outside them
(fd00:ec2::254, 100.100.100.200), the same carried in IPv6 addresses that reach them
(IPv4-mapped, IPv4-compatible, NAT64's 64:ff9b::/96 and 64:ff9b:1::/48, 6to4's
2002::/16: ``_address`` says which forms and why), and the metadata names
(``METADATA_NAMES``). ``true`` allows them all.

``allow`` (default unset: any other destination) makes an allowlist: when set, nothing
else. Entries are networks or addresses (``10.0.0.0/8``, ``127.0.0.1``), host names
(``api.example.com``) or suffixes (``*.internal``: any name under ``internal``). A name
admitted by name connects to whatever it resolves to (never link-local, unless allowed);
any other name is admitted when it resolves into a listed network, and only to the
addresses that do.

``unix_socket_dirs`` (default: the system temp folder and ``/run/plugins``) lists where
``unix:`` sockets may be, so a manifest cannot point a driver at /var/run/docker.sock or
another daemon's socket. Relative folders are taken from the manifest's folder.

The defaults allow what one user does on one machine: loopback addresses, private
networks, sockets under the temp folder.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
import tempfile
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field

from linchkit_plugin.errors import ProviderError, TargetUnavailable
from providers.target import Destination, ManifestPath, StrictModel

__all__ = [
    "DEFAULT_UNIX_SOCKET_DIRS",
    "LINK_LOCAL_NETWORKS",
    "METADATA_ADDRESSES",
    "METADATA_NAMES",
    "Destination",
    "EgressPolicy",
    "EgressRefused",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LINK_LOCAL_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
)
#: Metadata services outside the link-local networks (AWS IPv6, Alibaba Cloud).
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")}
)
#: Names of metadata services (GCP, AWS), refused before they are even resolved.
METADATA_NAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
#: Where ``unix:`` sockets may be by default: the temp folder (where tests and
#: ``dispatcher-plugin serve`` put theirs) and /run/plugins (a folder for deployed ones).
DEFAULT_UNIX_SOCKET_DIRS = (Path(tempfile.gettempdir()), Path("/run/plugins"))

_RELAX_LINK_LOCAL = "set egress.allow_link_local: true in the manifest to allow it"


class EgressRefused(ProviderError):
    """A destination the manifest's egress policy forbids; nothing was sent to it."""


def _normal_name(name: str) -> str:
    return name.strip("[]").rstrip(".").lower()


#: IPv6 prefixes that NAT64 translators turn into the IPv4 address in the last 32 bits:
#: the well-known prefix and the local-use one (RFC 6052, 8215; used as a /96).
NAT64_NETWORKS: tuple[ipaddress.IPv6Network, ...] = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("64:ff9b:1::/48"),
)


def _address(host: str) -> IPAddress | None:
    """The address ``host`` writes, as the IPv4 address it reaches when it is an IPv6 one
    carrying it. A policy that refuses 169.254.169.254 refuses 64:ff9b::a9fe:a9fe too,
    which a NAT64 on the host turns into it.

    Judged as the IPv4 address they carry (each may be turned into it on the way, by the
    host's stack, a translator or a tunnel, or by a client or proxy that reads the form):

    * IPv4-mapped, ``::ffff:a.b.c.d``: the IPv4 address itself to a dual-stack socket;
    * IPv4-compatible, ``::a.b.c.d`` (deprecated, RFC 4291 2.5.5.1; ``::a9fe:a9fe`` is
      169.254.169.254): automatic tunnels (Linux's ``sit0`` routes ``::/96``) and some
      parsers send it to the IPv4 address. Not ``::`` and ``::1``, which are the
      unspecified and loopback addresses, not 0.0.0.0 and 0.0.0.1;
    * NAT64, ``64:ff9b::/96`` and the local-use ``64:ff9b:1::/48`` (RFC 6052, 8215; the
      last 32 bits, as a /96 is used): a translator sends it to the IPv4 address;
    * 6to4, ``2002:a.b.c.d::/48`` (RFC 3056): a 6to4 router at that IPv4 address is
      where it goes. Refusing a metadata or private address there costs nothing legitimate
      (6to4 is deprecated, RFC 7526) and a relay on the host's network would reach it.

    Not unwrapped: Teredo (``2001::/32``) carries a client's address obfuscated, reached
    as UDP through a relay on the Internet, and ISATAP's interface identifier names a
    tunnel endpoint inside a site's own IPv6 prefix: neither is a way to an IPv4 service
    of the host's network that the IPv6 address itself is not checked as."""
    try:
        found = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if not isinstance(found, ipaddress.IPv6Address):
        return found
    if any(found in network for network in NAT64_NETWORKS):
        return ipaddress.IPv4Address(int(found) & 0xFFFF_FFFF)
    if int(found) >> 32 == 0 and int(found) > 1:  # IPv4-compatible; not :: nor ::1
        return ipaddress.IPv4Address(int(found))
    return found.ipv4_mapped or found.sixtofour or found


def _checked_entries(entries: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if entries is None:
        return None
    for entry in entries:
        if "/" in entry or _address(entry) is not None:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as error:
                raise ValueError(f"{entry!r} is not a network: {error}") from None
            continue
        name = _normal_name(entry.removeprefix("*."))
        labels = name.split(".")
        if not name or not all(label and label.replace("-", "").isalnum() for label in labels):
            raise ValueError(
                f"{entry!r} is neither a network (10.0.0.0/8), an address, a host name"
                " (api.example.com) nor a suffix (*.internal)"
            )
    return entries


class EgressPolicy(StrictModel):
    """The manifest's ``egress``: where providers may connect (module docstring)."""

    allow_link_local: bool = Field(
        default=False,
        description="Allow link-local addresses and cloud metadata services.",
    )
    allow: Annotated[tuple[str, ...] | None, AfterValidator(_checked_entries)] = Field(
        default=None,
        description="When set, only these networks, addresses, host names and *.suffixes.",
    )
    unix_socket_dirs: tuple[ManifestPath, ...] = Field(
        default=DEFAULT_UNIX_SOCKET_DIRS,
        description="Folders where unix: sockets may be (symlinks resolved).",
    )

    @cached_property
    def _networks(self) -> tuple[IPNetwork, ...]:
        return tuple(
            ipaddress.ip_network(entry, strict=False)
            for entry in self.allow or ()
            if "/" in entry or _address(entry) is not None
        )

    @cached_property
    def _names(self) -> tuple[tuple[str, bool], ...]:
        """``(name, is_suffix)`` of every name entry of ``allow``."""
        return tuple(
            (_normal_name(entry.removeprefix("*.")), entry.startswith("*."))
            for entry in self.allow or ()
            if "/" not in entry and _address(entry) is None
        )

    @cached_property
    def _socket_dirs(self) -> tuple[str, ...]:
        return tuple(os.path.realpath(folder) for folder in self.unix_socket_dirs)

    # -- load time -----------------------------------------------------------------------

    def refusal(self, destination: Destination) -> str | None:
        """Why ``destination`` is refused without resolving anything; None if it may be."""
        if destination.unix_socket is not None:
            return self._socket_refusal(destination.unix_socket)
        if destination.scheme is not None and destination.scheme not in ("http", "https"):
            return f"only http and https URLs are allowed, not {destination.scheme}:"
        if not destination.host:
            return "names no host"
        address = _address(destination.host)
        if address is not None:
            return self.address_refusal(address, admitted_by_name=False)
        return self.name_refusal(destination.host)

    def _socket_refusal(self, path: Path) -> str | None:
        real = os.path.realpath(path)
        for folder in self._socket_dirs:
            if real == folder or real.startswith(folder.rstrip("/") + "/"):
                return None
        shown = f"{path} (which is {real})" if real != str(path) else str(path)
        return (
            f"the unix socket {shown} is outside egress.unix_socket_dirs"
            f" ({', '.join(self._socket_dirs)}); list its folder there to allow it"
        )

    def name_refusal(self, name: str) -> str | None:
        """Why the name itself is refused, before it is resolved; None if it may be."""
        problem = _name_problem(name)
        if problem is not None:
            # Else the IDNA codec refuses it when it is resolved, a bare UnicodeError out of
            # a call or a start (a websocket dialer's task ended on it without a word), or a
            # client reads it as an address nobody checked (the last problem below).
            return f"{name[:80]!r} is no host name: {problem}"
        normal = _normal_name(name)
        if normal in METADATA_NAMES and not self.allow_link_local:
            return f"{name} is a cloud metadata service; {_RELAX_LINK_LOCAL}"
        if self.allow is None or self.admitted_by_name(normal) or self._networks:
            return None  # with networks listed, the addresses it resolves to decide
        return f"{name} is not in egress.allow ({', '.join(self.allow)})"

    def admitted_by_name(self, name: str) -> bool:
        normal = _normal_name(name)
        return any(
            normal.endswith("." + entry) if is_suffix else normal == entry
            for entry, is_suffix in self._names
        )

    def address_refusal(self, address: IPAddress, *, admitted_by_name: bool) -> str | None:
        """Why connecting to ``address`` is refused; None if it may be."""
        if not self.allow_link_local and (
            address in METADATA_ADDRESSES
            or any(address in network for network in LINK_LOCAL_NETWORKS)
        ):
            return f"{address} is link-local or a cloud metadata address; {_RELAX_LINK_LOCAL}"
        if self.allow is None or admitted_by_name:
            return None
        if any(address in network for network in self._networks):
            return None
        return f"{address} is not in egress.allow ({', '.join(self.allow)})"

    # -- connect time --------------------------------------------------------------------

    def admitted(self, name: str, addresses: Iterable[str]) -> list[str]:
        """Those of the addresses ``name`` resolved to that may be dialled, in order.

        Raises ``EgressRefused`` when the name or every address is refused.
        """
        # An address literal (a client that dials what it was given) is no name to judge:
        # the address itself is checked below.
        refusal = None if _address(name) is not None else self.name_refusal(name)
        if refusal is not None:
            raise EgressRefused(f"egress policy refuses {name}: {refusal}")
        by_name = self.allow is not None and self.admitted_by_name(name)
        admitted: list[str] = []
        reasons: list[str] = []
        for host in addresses:
            address = _address(host)
            reason = (
                f"{host} is not an address"
                if address is None
                else self.address_refusal(address, admitted_by_name=by_name)
            )
            if reason is None:
                admitted.append(host)
            elif reason not in reasons:
                reasons.append(reason)
        if not admitted:
            raise EgressRefused(
                f"egress policy refuses {name}: it resolves only to forbidden addresses"
                f" ({'; '.join(reasons) or 'none'})"
            )
        return admitted

    def check(self, destination: Destination) -> None:
        """``refusal`` as an exception: ``EgressRefused`` if ``destination`` is refused."""
        refusal = self.refusal(destination)
        if refusal is not None:
            raise EgressRefused(f"egress policy refuses {destination}: {refusal}")

    async def check_connect(self, destination: Destination) -> None:
        """Resolve ``destination`` now and check every address, for clients whose own
        resolver cannot be hooked (gRPC). Raises ``EgressRefused``, or
        ``TargetUnavailable`` when the name does not resolve."""
        self.check(destination)
        host = destination.host
        if destination.unix_socket is not None or host is None or _address(host) is not None:
            return
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, destination.port, type=socket.SOCK_STREAM
            )
        except OSError as error:
            raise TargetUnavailable(
                f"cannot resolve {host} to check it against the egress policy: {error}"
            ) from None
        self.admitted(host, _unique(str(info[4][0]) for info in infos))


#: A label of a host name: letters, digits, ``-`` and ``_`` (which resolvers take in
#: names of services and hosts alike).
_LABEL = re.compile(r"[A-Za-z0-9_-]+")
#: A last label that makes the name an IPv4 address to whoever reads it: decimal digits,
#: or ``0x`` and hexadecimal ones. ``inet_aton`` (so ``getaddrinfo``) and WHATWG URL
#: parsers (reqwest's) take ``2852039166``, ``0251.0376.0251.0376``, ``0xa9fea9fe``,
#: ``127.1`` and ``169.254.169.254.`` for addresses; aiohttp refuses to dial the decimal
#: ones (a failure at the first request, not at load or submit). No top-level domain is
#: a number.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")


def _name_problem(name: str) -> str | None:
    """Why ``name`` is not a host name a resolver takes as a name; None if it is one:
    labels of 1 to 63 letters, digits, ``-`` or ``_`` (a non-ASCII name in its IDNA
    form), 253 characters in all, one trailing dot allowed, the last label not a number."""
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return "a label is empty or longer than 63 characters, or not IDNA"
    written = name[:-1] if name.endswith(".") else name
    labels = written.split(".")
    if not 0 < len(written) <= 253 or not all(0 < len(label) <= 63 for label in labels):
        return "a label is empty or longer than 63 characters"
    if not all(_LABEL.fullmatch(label) for label in labels):
        return "a label holds something other than letters, digits, '-' and '_'"
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        return (
            "it ends in a number, which resolvers and URL parsers read as an IPv4 address"
            " (write an address as four decimal numbers, 169.254.169.254, and a name with"
            " letters in its last label)"
        )
    return None


def _unique(items: Iterable[str]) -> Sequence[str]:
    return list(dict.fromkeys(items))
