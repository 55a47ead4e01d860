"""Where ``example-plugin serve`` listens, as an operator types it: ``--address
host:port``, checked before anything listens. The same rule in every SDK
(``tests/conformance/test_serve_cli.py``): the socket layer would take port 99999 as
34463 and ``host:`` as any port, so a mistake is refused rather than served elsewhere.
"""

from __future__ import annotations

import re

__all__ = ["address_mistake", "host_and_port"]

#: The host a name, an IPv4 address or a bracketed IPv6 one; the port 0-65535 in digits.
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):([0-9]{1,5})")


def host_and_port(address: str) -> tuple[str, int] | None:
    """``address`` as the host to bind (an IPv6 one without its brackets) and the port,
    or None when it is not ``host:port`` with a port in 0-65535."""
    match = _HOST_PORT.fullmatch(address)
    if match is None or int(match.group(2)) > 65535:
        return None
    return match.group(1).strip("[]"), int(match.group(2))


def address_mistake(address: str) -> str:
    """The one line that refuses ``address``."""
    return (
        "serve: --address must be host:port with a port in 0-65535"
        f" (e.g. 127.0.0.1:50051), not {address!r}"
    )
