"""Register a running plugin in an etcd registry, where a dispatcher's fleet finds it.

The contract is the dispatcher's (``providers.discovery``): one key
``<prefix>/<instance id>`` per instance, on a lease this process keeps alive, whose value
is JSON ``{"url": "http://host:port"}`` (an HTTP server) or ``{"address": "host:port"}``
(a gRPC one). A process that dies stops renewing its lease and etcd deletes the key when
the lease ends (``ttl`` seconds); one that stops gracefully deletes its key and revokes
its lease first, so no dispatcher sends it another call.

The SDK depends on orjson only, so etcd is reached through its v3 JSON gateway with
http.client (``_etcd_gateway``: TLS, a client certificate, one of etcd's users and its token),
on one thread of its own (``Registration``): no asyncio loop is needed, and the plugin's
loop never waits for etcd. An etcd that does not answer, or turns the plugin away (its
certificate, its user's password or permission), is not fatal: the plugin serves, says
so once on stderr, and keeps trying; it registers once etcd answers and admits it, and
registers again if etcd lost its lease (an etcd restarted without its data). An etcd
that does not answer (a connection refused, reset, timed out or closed, mid-TLS-handshake
too) is tried again about every second; one that turns the plugin away, after waits that
double up to ``REFUSED_RETRY_CAP`` (``refused_retry_wait``).
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import secrets
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import orjson

from linchkit_plugin._etcd_gateway import (
    REGISTER_ETCD_CA_FILE_ENV,
    REGISTER_ETCD_CERT_FILE_ENV,
    REGISTER_ETCD_KEY_FILE_ENV,
    REGISTER_ETCD_PASSWORD_ENV,
    REGISTER_ETCD_USER_ENV,
    EtcdAccess,
    EtcdRefused,
    EtcdUnavailable,
    Gateway,
    why,
)

__all__ = [
    "ADVERTISE_ENV",
    "DEFAULT_LEAVE_DELAY",
    "LEAVE_DELAY_ENV",
    "REFUSED_RETRY_CAP",
    "REGISTER_ETCD_CA_FILE_ENV",
    "REGISTER_ETCD_CERT_FILE_ENV",
    "REGISTER_ETCD_ENV",
    "REGISTER_ETCD_KEY_FILE_ENV",
    "REGISTER_ETCD_PASSWORD_ENV",
    "REGISTER_ETCD_USER_ENV",
    "REGISTER_PREFIX_ENV",
    "REGISTER_TTL_ENV",
    "EtcdAccess",
    "EtcdRefused",
    "EtcdUnavailable",
    "Registration",
    "advertised_value",
    "check_prefix",
    "instance_id",
    "refused_retry_wait",
]

REGISTER_ETCD_ENV = "LINCHKIT_REGISTER_ETCD"
REGISTER_PREFIX_ENV = "LINCHKIT_REGISTER_PREFIX"
REGISTER_TTL_ENV = "LINCHKIT_REGISTER_TTL"
LEAVE_DELAY_ENV = "LINCHKIT_LEAVE_DELAY"
ADVERTISE_ENV = "LINCHKIT_ADVERTISE"
DEFAULT_TTL = 10
#: Seconds a server keeps answering once it has left the registry: the delete reaches
#: every dispatcher by etcd's watch within milliseconds on a LAN, not at once, and a call
#: one of them picked meanwhile must find the server still serving, not closing its
#: idle connections (met by a reset, a call that may not be retried would fail).
DEFAULT_LEAVE_DELAY = 1.0

#: Seconds each request of leaving (delete, revoke) may take: a stop must not wait long.
_LEAVE_TIMEOUT = 2.0

#: The longest wait, in seconds, between two tries while etcd turns the plugin away.
#: etcd checks a password with bcrypt, tens of milliseconds of a core each time, and a
#: wrong one stays wrong until an operator mends it: a hundred plugins deployed with it
#: and retrying every second would keep several of etcd's cores busy refusing them; at
#: this cap (waits drawn between 15 and 30 s) they cost it about four checks a second.
#: Longer would save little more and keep a mended fleet out of the registry longer: at
#: 30 s every plugin is back within half a minute of the fix.
REFUSED_RETRY_CAP = 30.0

#: Addresses that mean "every interface": a dispatcher cannot call them.
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def instance_id() -> str:
    """Unique and readable: ``<hostname>-<pid>-<6 hex>``, the random part for restarts
    that reuse a pid (containers are often pid 1)."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())
    return f"{host or 'plugin'}-{os.getpid()}-{secrets.token_hex(3)}"


def check_prefix(prefix: str) -> str:
    """The prefix as the dispatcher's manifest accepts it (``RegistryDiscovery.prefix``)."""
    if len(prefix) < 2 or not prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"the registry prefix must start with / and not end with one: {prefix!r}")
    if any(c.isspace() for c in prefix):
        raise ValueError(f"the registry prefix must not hold spaces: {prefix!r}")
    return prefix


def advertised_value(advertise: str | None, *, host: str, port: int, kind: str) -> dict[str, str]:
    """The registry value of a server listening on ``host:port``.

    ``kind`` is ``url`` (an HTTP server) or ``address`` (a gRPC one). ``advertise`` (a URL
    or host:port) overrides the listening address, and must be given when that address
    cannot be called from elsewhere (every interface, a Unix socket).
    """
    if advertise:
        text = advertise.strip()
        if "://" in text:
            if kind != "url":
                raise ValueError(f"advertise a gRPC server as host:port, not a URL: {text}")
            parts = urlsplit(text)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"the advertised URL must be http(s)://host[:port]: {text}")
            return {"url": text.rstrip("/")}
        _check_host_port(text)
        return {"url": f"http://{text}"} if kind == "url" else {"address": text}
    if host in _WILDCARDS or not port:
        raise ValueError(
            f"this server listens on {host or 'a Unix socket'}, which no dispatcher can call:"
            f" say where it is reached with --advertise (or {ADVERTISE_ENV}),"
            " e.g. 10.0.0.5:8081"
        )
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    address = f"{shown}:{port}"
    return {"url": f"http://{address}"} if kind == "url" else {"address": address}


def _check_host_port(text: str) -> None:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        raise ValueError(f"--advertise must be a URL or host:port, got {text!r}")
    if host.strip("[]") in _WILDCARDS:
        raise ValueError(f"--advertise must name an address others can call, not {host}")


def refused_retry_wait(
    refusals: int, pace: float, *, draw: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after the ``refusals``-th refusal in a row (1, 2, …): ``pace``, the
    wait after an etcd that does not answer, doubled at each refusal up to
    ``REFUSED_RETRY_CAP``, less a random part of up to half of it, so that a fleet turned
    away at once does not try again in step. Never less than ``pace``. ``draw``: a number
    in [0, 1), the random part (tests pass their own)."""
    ceiling = min(REFUSED_RETRY_CAP, pace * 2.0 ** min(refusals, 32))
    return ceiling * (1.0 - draw() / 2.0)


def _b64(raw: str | bytes) -> str:
    return base64.b64encode(raw.encode() if isinstance(raw, str) else raw).decode()


def _stderr(message: str) -> None:
    print(f"dispatcher-plugin: {message}", file=sys.stderr, flush=True)


class Registration:
    """This instance's key in the registry, kept while the plugin serves.

    ``start()`` returns at once; a thread grants a lease, puts the key and renews the
    lease every ``ttl / 3`` seconds. ``stop()`` deletes the key, revokes the lease and
    returns once that is done (or etcd failed to answer in time). ``access``: how to
    reach an etcd behind TLS and its users (checked here: ValueError names the setting).
    ``pause``: how the thread waits between two tries, given the seconds; true when it
    should stop (by default, until ``stop()`` or the time is up; tests pass their own to
    see the waits asked for without taking them).
    """

    def __init__(
        self,
        etcd: str,
        prefix: str,
        value: dict[str, Any],
        *,
        ttl: int = DEFAULT_TTL,
        instance: str | None = None,
        say: Callable[[str], None] = _stderr,
        access: EtcdAccess | None = None,
        pause: Callable[[float], bool] | None = None,
    ) -> None:
        if ttl < 2:
            raise ValueError(f"the registration TTL must be at least 2 seconds, got {ttl}")
        self.key = f"{check_prefix(prefix)}/{instance or instance_id()}"
        self.value = orjson.dumps(value)
        self.ttl = ttl
        self._gateway = Gateway(etcd, timeout=max(1.0, min(5.0, ttl / 3)), access=access, say=say)
        self._say = say
        self._lease: int | None = None
        self._written = False
        self._stopping = threading.Event()
        self._pause = pause or self._stopping.wait
        #: Set while the key is known to be in the registry (tests and health wait on it).
        self.registered = threading.Event()
        self._thread = threading.Thread(target=self._run, name="etcd-registration", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def begin_stop(self) -> None:
        """Ask the thread to deregister; ``stop`` waits for it."""
        self._stopping.set()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            # The thread finishes a request in flight (bounded by the timeout), then
            # deregisters: two more bounded requests. A new token costs two quick ones
            # more; an etcd that hangs is not waited for past this bound.
            self._thread.join(timeout=4 * self._gateway.timeout + 1)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        # Said once, not per retry; said again when the trouble changes (etcd answers
        # again, and now turns the plugin away), so what the operator sees is current.
        failing: type[EtcdUnavailable] | None = None
        # Refusals since etcd last admitted the plugin: an outage between two of them
        # does not start the waits again from a second, the credentials are as wrong.
        refusals = 0
        pace = min(1.0, self.ttl / 3)
        while not self._stopping.is_set():
            try:
                self._renew()
            except EtcdUnavailable as error:
                self.registered.clear()
                if failing is not type(error):
                    self._say(
                        f"warning: cannot register {self.key} in etcd: {error}; serving"
                        " anyway and trying again"
                    )
                failing = type(error)
                if isinstance(error, EtcdRefused):
                    refusals += 1
                    wait = refused_retry_wait(refusals, pace)
                else:
                    wait = pace
            else:
                if failing is not None:
                    self._say(f"etcd answers again: {self.key} is registered")
                failing, refusals = None, 0
                wait = self.ttl / 3
            if self._pause(wait):
                break
        self._deregister()

    def _renew(self) -> None:
        if self._lease is not None and not self._keep_alive(self._lease):
            # A lease no key was put on (etcd refused the key) ends unrenewed while the
            # plugin waits to try again, as expected: only a registered key is news.
            if self._written:
                self._say(f"etcd lost the lease of {self.key} (restarted?): registering again")
            self._lease, self._written = None, False
        if self._lease is None:
            answer = self._gateway.post("/v3/lease/grant", {"TTL": self.ttl})
            try:
                self._lease = int(answer["ID"])
            except (KeyError, TypeError, ValueError):
                raise EtcdUnavailable(f"etcd granted no lease{why(answer)}") from None
        if not self._written:
            self._put()
            self._written = True
            self.registered.set()
            self._say(f"registered {self.key} in etcd at {self._gateway.base}")

    def _keep_alive(self, lease: int) -> bool:
        """Renew ``lease``; False when etcd no longer knows it (its TTL comes back 0)."""
        answer = self._gateway.post("/v3/lease/keepalive", {"ID": str(lease)})
        result = answer.get("result")
        if not isinstance(result, dict):
            raise EtcdUnavailable(f"etcd did not renew the lease{why(answer)}")
        return int(result.get("TTL") or 0) > 0

    def _put(self) -> None:
        answer = self._gateway.post(
            "/v3/kv/put",
            {"key": _b64(self.key), "value": _b64(self.value), "lease": str(self._lease)},
        )
        if "header" not in answer:  # e.g. the lease ended between grant and put
            self._lease = None
            raise EtcdUnavailable(f"etcd refused the registration{why(answer)}")

    def _deregister(self) -> None:
        self.registered.clear()
        lease, written = self._lease, self._written
        self._lease, self._written = None, False
        if lease is None:
            return
        if not written:  # a lease for a key etcd refused (permission): let it go quietly
            with contextlib.suppress(EtcdUnavailable):
                self._gateway.post("/v3/lease/revoke", {"ID": str(lease)}, timeout=_LEAVE_TIMEOUT)
            return
        # The key first: a dispatcher stops calling this instance from that moment; the
        # lease's revocation would delete it too, but it is the key that matters.
        with contextlib.suppress(EtcdUnavailable):
            self._gateway.post(
                "/v3/kv/deleterange", {"key": _b64(self.key)}, timeout=_LEAVE_TIMEOUT
            )
        try:
            self._gateway.post("/v3/lease/revoke", {"ID": str(lease)}, timeout=_LEAVE_TIMEOUT)
        except EtcdUnavailable as error:
            self._say(
                f"warning: cannot deregister {self.key}: {error}; it leaves the registry"
                f" when its lease ends, within {self.ttl} s"
            )
        else:
            self._say(f"deregistered {self.key}")

    def __repr__(self) -> str:
        state = "registered" if self.registered.is_set() else "not registered"
        return f"<Registration {self.key} ttl={self.ttl} {state}>"
