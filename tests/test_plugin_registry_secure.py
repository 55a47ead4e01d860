"""Plugins register themselves in an etcd run as a careful operator runs it: TLS with a
client certificate, etcd's users on, simple tokens that expire after ``TOKEN_TTL`` (2 s)
unused (``tests.services.SecureEtcd``). Real plugin processes of the Python SDK (the
HTTP server, and its gRPC service) and of the Go, Rust, TypeScript and Java SDKs (their
example plugins).

The plugin proves itself with ``registrar``'s certificate and password; what is asserted
is where its key is, what its stderr says and what it never says (the password), and how
often etcd had to refuse it (etcd's own count, ``SecureEtcd.handled``).

The cases that wait real time (a window of refused tries, a retry pace, a token expiring)
wait side by side (``tests/side_by_side.py``), each with an etcd, a plugin and a port in
front of etcd of its own: etcd counts every refusal it makes, and mending a user is
etcd-wide.
"""

from __future__ import annotations

import base64
import contextlib
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from linchkit_plugin._etcd_gateway import Gateway
from linchkit_plugin.registry import (
    REFUSED_RETRY_CAP,
    EtcdAccess,
    EtcdRefused,
    EtcdUnavailable,
    refused_retry_wait,
)
from tests.services import (
    CLEAN_ENVIRONMENT,
    REGISTRAR_PREFIX,
    TOKEN_TTL,
    Etcd,
    SecureEtcd,
    free_port,
    plugin_processes,
    readwrite_permission,
    running_secure_etcd,
    wait_for,
)
from tests.side_by_side import SideBySide
from tests.test_plugin_registry import PLUGIN, PYTHON_GRPC_EXAMPLE, example, health, only_key

PREFIX = f"{REGISTRAR_PREFIX}/echo"
WRONG_PASSWORD = "wrong-pw-5e2a"
GO = pytest.param("go", marks=pytest.mark.toolchain)
TYPESCRIPT = pytest.param("typescript", marks=pytest.mark.toolchain)
JAVA = pytest.param("java", marks=pytest.mark.toolchain)
RUST = pytest.param("rust", marks=pytest.mark.toolchain)
LANGUAGES = ["http", "python-grpc", GO, RUST, TYPESCRIPT, JAVA]
#: One entry per registration code: the Python HTTP server, the Go plugin and the
#: TypeScript plugin; the Python gRPC service shares the HTTP server's registration code
#: and is started in the first test only.
DISTINCT_CODE = ["http", GO, RUST, TYPESCRIPT, JAVA]

#: Each entry point with its registry settings given as flags (the password still a
#: variable: no flag takes it), or as variables (the HTTP server's variables are
#: test_plugin_registry.py's).
ENTRY_POINTS = [
    pytest.param("http", "flags", id="http-flags"),
    pytest.param("python-grpc", "flags", id="python-grpc-flags"),
    pytest.param("python-grpc", "variables", id="python-grpc-variables"),
    pytest.param("go", "flags", id="go-flags", marks=pytest.mark.toolchain),
    pytest.param("go", "variables", id="go-variables", marks=pytest.mark.toolchain),
    pytest.param("typescript", "flags", id="typescript-flags", marks=pytest.mark.toolchain),
    pytest.param("typescript", "variables", id="typescript-variables", marks=pytest.mark.toolchain),
    pytest.param("java", "flags", id="java-flags", marks=pytest.mark.toolchain),
    pytest.param("java", "variables", id="java-variables", marks=pytest.mark.toolchain),
    pytest.param("rust", "flags", id="rust-flags", marks=pytest.mark.toolchain),
    pytest.param("rust", "variables", id="rust-variables", marks=pytest.mark.toolchain),
]

#: The settings as every SDK's flags, and as its variables.
FLAGS = {
    "ca_file": "--register-etcd-ca-file",
    "cert_file": "--register-etcd-cert-file",
    "key_file": "--register-etcd-key-file",
    "user": "--register-etcd-user",
}
VARIABLES = {
    "etcd": "LINCHKIT_REGISTER_ETCD",
    "ca_file": "LINCHKIT_REGISTER_ETCD_CA_FILE",
    "cert_file": "LINCHKIT_REGISTER_ETCD_CERT_FILE",
    "key_file": "LINCHKIT_REGISTER_ETCD_KEY_FILE",
    "user": "LINCHKIT_REGISTER_ETCD_USER",
    "password": "LINCHKIT_REGISTER_ETCD_PASSWORD",
}
HOSTS = {
    "http": "127.0.0.2",
    "python-grpc": "127.0.0.2",
    "go": "127.0.0.3",
    "typescript": "127.0.0.3",
    "java": "127.0.0.3",
    "rust": "127.0.0.3",
}


def command(language: str, address: str) -> list[str]:
    """``language``'s plugin serving on ``address`` (host:port)."""
    host, port = address.rsplit(":", 1)
    if language == "http":
        return [*PLUGIN, "--host", host, "--port", port]
    if language == "python-grpc":
        return [sys.executable, str(PYTHON_GRPC_EXAMPLE), "serve", "--address", address]
    return [example(language), "serve", "--address", address]


def arguments(
    language: str, settings: Mapping[str, str], via: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """``settings`` (keys of ``VARIABLES``, and ``prefix``, ``ttl``) ``via`` flags, which win
    over the environment, or variables: by default flags for the HTTP server, variables
    for the others. The password is a variable for every one: no flag takes it."""
    if (via or ("flags" if language == "http" else "variables")) == "variables":
        environment = {
            VARIABLES[name]: value for name, value in settings.items() if name in VARIABLES
        }
        environment["LINCHKIT_REGISTER_PREFIX"] = settings.get("prefix", PREFIX)
        environment["LINCHKIT_REGISTER_TTL"] = settings.get("ttl", "10")
        return [], environment
    flags = [
        "--register-etcd",
        settings["etcd"],
        "--register-prefix",
        settings.get("prefix", PREFIX),
        "--register-ttl",
        settings.get("ttl", "10"),
    ]
    for name, flag in FLAGS.items():
        if name in settings:
            flags += [flag, settings[name]]
    environment = {}
    if "password" in settings:
        environment[VARIABLES["password"]] = settings["password"]
    return flags, environment


def start(
    plugins: Any,
    language: str,
    etcd: SecureEtcd,
    *,
    pair: tuple[Path, Path] | None = None,
    user: str = "registrar",
    password: str | None = None,
    ttl: int = 10,
    decoys: Mapping[str, str] | None = None,
    url: str | None = None,
    via: str | None = None,
) -> tuple[Any, str]:
    """``language``'s plugin registering in ``etcd`` as ``user``, its settings ``via``
    flags or variables (``arguments``); the plugin and where it serves. ``decoys``:
    variables its flags must win over; ``url``: where the plugin reaches etcd, if not at
    its own address."""
    cert, key = pair or etcd.client_pair
    settings = {
        "etcd": url or etcd.url,
        "ca_file": str(etcd.ca_file),
        "cert_file": str(cert),
        "key_file": str(key),
        "user": user,
        "password": password if password is not None else etcd.registrar_password,
        "ttl": str(ttl),
    }
    flags, environment = arguments(language, settings, via)
    address = f"{HOSTS[language]}:{free_port(HOSTS[language])}"
    plugin = plugins([*command(language, address), *flags], **{**(decoys or {}), **environment})
    return plugin, address


def serving(language: str, address: str) -> bool:
    """Whether the plugin at ``address`` answers its health check."""
    if language == "http":
        return health(f"http://{address}")
    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def registered_value(language: str, address: str) -> dict[str, str]:
    return {"url": f"http://{address}"} if language == "http" else {"address": address}


def never_registers(etcd: SecureEtcd, seconds: float) -> None:
    """No key appears under ``PREFIX`` for ``seconds`` (several of the plugin's retries)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert etcd.keys(PREFIX) == {}
        time.sleep(0.2)


def stays(etcd: SecureEtcd, key: str, seconds: float) -> None:
    """``key`` is in the registry all along ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert etcd.get(key) is not None, f"{key} left the registry"
        time.sleep(0.2)


def lease_of(etcd: SecureEtcd, key: str) -> int:
    answer = etcd.call("/v3/kv/range", {"key": etcd_key(key)})
    return int(answer["kvs"][0]["lease"])


def etcd_key(key: str) -> str:
    return base64.b64encode(key.encode()).decode()


@pytest.mark.parametrize(("language", "via"), ENTRY_POINTS)
def test_a_plugin_registers_in_a_secure_etcd_and_leaves_on_sigterm(
    secure_etcd: SecureEtcd, plugins: Any, language: str, via: str
) -> None:
    # Flags win over variables: these would be refused.
    stranger_cert, stranger_key = secure_etcd.stranger_pair
    decoys = {
        VARIABLES["user"]: "reader",
        VARIABLES["cert_file"]: str(stranger_cert),
        VARIABLES["key_file"]: str(stranger_key),
        "LINCHKIT_REGISTER_PREFIX": "/somewhere/else",
    }
    plugin, address = start(
        plugins, language, secure_etcd, decoys=decoys if via == "flags" else None, via=via
    )
    plugin.wait_said("registered ")
    key, value = only_key(secure_etcd, PREFIX)
    assert value == registered_value(language, address)
    assert serving(language, address)

    plugin.signal(signal.SIGTERM)
    assert secure_etcd.keys(PREFIX) == {}, "the key is deleted before the process ends"
    assert f"deregistered {key}" in plugin.stderr
    assert secure_etcd.registrar_password not in plugin.stderr


@pytest.mark.parametrize("language", DISTINCT_CODE)
def test_an_expired_token_is_replaced_and_the_registration_kept(
    side_by_side: SideBySide, request: pytest.FixtureRequest, language: str
) -> None:
    """The plugin's token expires while it serves (``TOKEN_TTL``, 2 s unused); the next
    request that needs one authenticates again. etcd 3.4 renews a lease without looking
    at the token, so the renewals (every second, TTL 3) keep the key whatever the token;
    what needs a token is putting the key again and leaving, both done here after the
    token expired. The SDKs wait for their tokens to expire side by side."""
    side_by_side.run(request, token_expires)


def token_expires(language: str) -> None:
    with running_secure_etcd() as secure_etcd, plugin_processes() as plugins:
        plugin, _ = start(plugins, language, secure_etcd, ttl=3)
        plugin.wait_said("registered ")
        # Issued after the plugin's own: once this one has expired, so has the plugin's.
        probe = secure_etcd.authenticate("registrar", secure_etcd.registrar_password)
        key, value = only_key(secure_etcd, PREFIX)
        stays(secure_etcd, key, TOKEN_TTL + 1.5)
        assert not secure_etcd.takes_token(probe, key), "the plugin's token has expired by now"

        # The lease revoked under the plugin: it grants another and puts the key again.
        secure_etcd.call("/v3/lease/revoke", {"ID": str(lease_of(secure_etcd, key))})
        plugin.wait_said("registering again")
        assert only_key(secure_etcd, PREFIX) == (key, value)
        probe = secure_etcd.authenticate("registrar", secure_etcd.registrar_password)
        stays(secure_etcd, key, TOKEN_TTL + 1.5)
        assert not secure_etcd.takes_token(probe, key)

        plugin.signal(signal.SIGTERM)
        assert secure_etcd.keys(PREFIX) == {}, "deleted with a new token, not left to the lease"
        said = plugin.stderr
        assert f"deregistered {key}" in said and "cannot deregister" not in said
        assert not refusals_in(said), "an expired token is routine, not worth a warning"


@pytest.mark.parametrize(
    ("user", "password", "refusal"),
    [
        ("registrar", WRONG_PASSWORD, "authentication failed"),
        ("reader", SecureEtcd.reader_password, "permission denied"),
    ],
    ids=["wrong-password", "no-permission"],
)
@pytest.mark.parametrize("language", DISTINCT_CODE)
def test_refused_credentials_are_said_once_and_retried_while_serving(
    side_by_side: SideBySide,
    request: pytest.FixtureRequest,
    language: str,
    user: str,
    password: str,
    refusal: str,
) -> None:
    """Each SDK turned away for each refusal, side by side, each in an etcd of its own
    (mending one is etcd-wide)."""
    side_by_side.run(request, refused_then_mended)


def refusals_in(stderr: str) -> list[str]:
    """The lines of a plugin's ``stderr`` saying etcd turned it away. Not those saying etcd
    did not answer within the SDK's 1 s bound: worth their line, and said by Java's SDK on a
    machine running three test workers on two cores, where etcd then refused its next try."""
    return [
        line
        for line in stderr.splitlines()
        if "cannot register" in line and "does not answer" not in line
    ]


def refused_then_mended(language: str, user: str, password: str, refusal: str) -> None:
    with running_secure_etcd() as secure_etcd, plugin_processes() as plugins:
        plugin, address = start(plugins, language, secure_etcd, user=user, password=password)
        (said,) = refusals_in(plugin.wait_said(refusal))
        assert f"'{user}'" in said
        assert serving(language, address)
        never_registers(secure_etcd, 2.5)  # a few retries
        assert len(refusals_in(plugin.stderr)) == 1, "said once, not per retry"

        # The operator mends etcd's side: the plugin registers at its next retry.
        mend(secure_etcd, user, password)
        plugin.wait_said("etcd answers again")
        only_key(secure_etcd, PREFIX)
        plugin.signal(signal.SIGTERM)
        assert secure_etcd.keys(PREFIX) == {}
        assert password not in plugin.stderr and "Traceback" not in plugin.stderr


def mend(etcd: SecureEtcd, user: str, password: str) -> None:
    """What the operator does for ``user`` that etcd turned away: its password becomes
    ``password`` (``registrar``), or its role may write the registry (``reader``)."""
    if user == "registrar":
        etcd.call("/v3/auth/user/changepw", {"name": user, "password": password})
    else:
        etcd.call(
            "/v3/auth/role/grant",
            {"name": "reader", "perm": readwrite_permission(REGISTRAR_PREFIX)},
        )


#: Seconds over which etcd counts a plugin's refused tries, and the most it may count:
#: backing off from about a second and doubling, a plugin tries at 0 s and then no sooner
#: than 1, 3, 7 and 15 s; retrying every second, it would try about 12 times.
REFUSAL_WINDOW = 12.0
MOST_REFUSALS = 5
#: Slack on a busy machine: a request's round trip, the plugin's stderr read.
MARGIN = 5.0


# Each SDK once and each refusal once (the SDKs back off alike for either refusal): every
# pair would be twice the plugins and etcds waiting their 12 s side by side, on 2 cores.
@pytest.mark.parametrize(
    ("language", "user", "password", "refusal"),
    [
        ("http", "registrar", WRONG_PASSWORD, ("Authenticate", "InvalidArgument")),
        pytest.param(
            "go",
            "reader",
            SecureEtcd.reader_password,
            ("Put", "PermissionDenied"),
            marks=pytest.mark.toolchain,
        ),
        pytest.param(
            "typescript",
            "registrar",
            WRONG_PASSWORD,
            ("Authenticate", "InvalidArgument"),
            marks=pytest.mark.toolchain,
        ),
        pytest.param(
            "java",
            "registrar",
            WRONG_PASSWORD,
            ("Authenticate", "InvalidArgument"),
            marks=pytest.mark.toolchain,
        ),
        pytest.param(
            "rust",
            "registrar",
            WRONG_PASSWORD,
            ("Authenticate", "InvalidArgument"),
            marks=pytest.mark.toolchain,
        ),
    ],
    ids=[
        "http-wrong-password",
        "go-no-permission",
        "typescript-wrong-password",
        "java-wrong-password",
        "rust-wrong-password",
    ],
)
def test_a_plugin_turned_away_backs_off_and_registers_soon_once_etcd_is_mended(
    side_by_side: SideBySide,
    request: pytest.FixtureRequest,
    language: str,
    user: str,
    password: str,
    refusal: tuple[str, str],
) -> None:
    """etcd checks a password with bcrypt, tens of milliseconds of a core each: a fleet
    deployed with a wrong password or role must thin out its tries, not keep etcd busy
    refusing it. etcd itself counts the tries it refused (a refused authentication; a
    refused put, which once the waits outlast a token, 2 s here, follows a new one).
    Once mended, the plugin registers within the wait it had reached. The SDKs wait
    their windows side by side, each plugin in an etcd of its own: etcd's count is of
    every client it refused."""
    side_by_side.run(request, turned_away_then_mended)


def turned_away_then_mended(
    language: str, user: str, password: str, refusal: tuple[str, str]
) -> None:
    with running_secure_etcd() as secure_etcd, plugin_processes() as plugins:
        plugin, address = start(plugins, language, secure_etcd, user=user, password=password)
        wait_for(lambda: secure_etcd.handled(*refusal), what=f"etcd refusing a {refusal[0]}")
        time.sleep(REFUSAL_WINDOW)
        refusals = secure_etcd.handled(*refusal)
        assert 3 <= refusals <= MOST_REFUSALS, (
            f"etcd refused {refusals} tries in {REFUSAL_WINDOW:g} s:\n{plugin.stderr}"
        )

        # After k refusals in a row a plugin waits at most 2^k s (a second doubled k times),
        # and never longer than the cap, 30 s in every SDK. k is counted once etcd is mended,
        # in case a try came between the count above and the mending.
        mended = time.monotonic()
        mend(secure_etcd, user, password)
        waiting_at_most = min(REFUSED_RETRY_CAP, 2.0 ** secure_etcd.handled(*refusal))
        plugin.wait_said("etcd answers again")
        took = time.monotonic() - mended
        assert took <= waiting_at_most + MARGIN, f"registered {took:.1f} s after etcd was mended"
        assert only_key(secure_etcd, PREFIX)[1] == registered_value(language, address)
        said = plugin.stderr
        assert len(refusals_in(said)) == 1, "said once, however long the waits"
        assert "registering again" not in said, "a lease no key was put on expires unsaid"
        plugin.signal(signal.SIGTERM)
        assert secure_etcd.keys(PREFIX) == {}
        assert password not in plugin.stderr and "Traceback" not in plugin.stderr


def test_the_waits_after_refusals_double_to_the_cap_and_are_spread() -> None:
    """From the pace of an etcd that does not answer (about a second), doubled at each
    refusal in a row up to the cap, never below that pace; the random part spreads each
    over its upper half, so a fleet turned away at once does not try again in step."""

    def longest() -> float:
        return 0.0

    def shortest() -> float:
        return 0.999999

    ceilings = [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert [refused_retry_wait(n, 1.0, draw=longest) for n in range(1, 7)] == ceilings
    for refusals, ceiling in enumerate(ceilings, start=1):
        assert refused_retry_wait(refusals, 1.0, draw=shortest) == pytest.approx(
            ceiling / 2, abs=1e-4
        )
    assert refused_retry_wait(1, 2 / 3, draw=longest) == pytest.approx(4 / 3), "TTL 2 s"
    for refusals in (31, 32, 64, 10**6):
        assert refused_retry_wait(refusals, 1.0, draw=longest) == REFUSED_RETRY_CAP
    assert refused_retry_wait(5, 1.0, draw=lambda: 0.5) == 22.5
    draws = {refused_retry_wait(5, 1.0) for _ in range(20)}
    assert len(draws) > 1 and all(15.0 < wait <= 30.0 for wait in draws)


@contextlib.contextmanager
def silent_etcd() -> Iterator[tuple[str, list[float]]]:
    """Where an etcd would be, on 127.0.0.4: a port that takes each connection and closes
    it at once, and when it took each one (a plugin's tries, one connection each)."""
    taken: list[float] = []
    server = socket.create_server(("127.0.0.4", 0))
    server.settimeout(0.2)
    stopping = threading.Event()

    def take() -> None:
        while not stopping.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            taken.append(time.monotonic())
            connection.close()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.4:{server.getsockname()[1]}", taken
    finally:
        stopping.set()
        thread.join()
        server.close()


@pytest.mark.parametrize("language", DISTINCT_CODE)
def test_an_etcd_that_does_not_answer_is_still_tried_about_every_second(
    side_by_side: SideBySide, request: pytest.FixtureRequest, language: str
) -> None:
    """Only a refusal backs off: a try spends nothing of an etcd that does not answer,
    and a plugin should register within a second of etcd coming back. The SDKs are
    counted side by side, each at a silent port of its own."""
    side_by_side.run(request, tried_while_silent)


def tried_while_silent(language: str) -> None:
    with silent_etcd() as (url, taken), plugin_processes() as plugins:
        flags, environment = arguments(language, {"etcd": url})
        address = f"{HOSTS[language]}:{free_port(HOSTS[language])}"
        plugin = plugins([*command(language, address), *flags], **environment)
        said = plugin.wait_said("cannot register")
        assert "does not answer" in said or "not JSON" in said, said
        wait_for(lambda: taken, what="the plugin's first try")
        time.sleep(6)
        tries = len(taken)
        assert 5 <= tries <= 9, f"{tries} tries in about 6 s"
        assert plugin.stderr.count("cannot register") == 1


class HandshakeCutter:
    """A port in front of an etcd, as a flaky load balancer would be: it first takes each
    connection, reads the client's first TLS message and closes the connection mid-handshake
    (``reset``: with a TCP reset, else with a FIN), and once ``mend()`` is called forwards
    every new connection to etcd's port. ``cut``: when it cut each handshake."""

    def __init__(self, etcd_port: int, *, reset: bool) -> None:
        self._etcd_port = etcd_port
        self._reset = reset
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        # The etcd's certificate names 127.0.0.1: a plugin verifies it through this port.
        self.url = f"https://127.0.0.1:{self._server.getsockname()[1]}"
        self.cut: list[float] = []
        self._forwarding = threading.Event()
        self._stopping = threading.Event()
        self._open: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def mend(self) -> None:
        self._forwarding.set()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._server.accept()
            except TimeoutError:
                continue
            if self._forwarding.is_set():
                self._forward(connection)
                continue
            connection.settimeout(5)
            with contextlib.suppress(OSError):
                connection.recv(65536)  # the ClientHello
            if self._reset:
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()
            self.cut.append(time.monotonic())

    def _forward(self, connection: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self._etcd_port), timeout=10)
        upstream.settimeout(None)
        self._open += [connection, upstream]
        for source, sink in ((connection, upstream), (upstream, connection)):
            thread = threading.Thread(target=_pipe, args=(source, sink), daemon=True)
            self._threads.append(thread)
            thread.start()

    def close(self) -> None:
        self._stopping.set()
        for each in self._open:
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=10)
        for each in [self._server, *self._open]:
            each.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
@pytest.mark.parametrize("language", DISTINCT_CODE)
def test_an_etcd_that_cuts_tls_handshakes_is_tried_about_every_second(
    side_by_side: SideBySide, request: pytest.FixtureRequest, language: str, reset: bool
) -> None:
    """A handshake the peer cuts is an etcd that does not answer, not one that turned the
    plugin away: tried about every second, so the plugin registers within about a second
    of etcd answering again, not after a wait backed off up to 30 s. The cases are counted
    side by side, each plugin with a cutter and an etcd of its own."""
    side_by_side.run(request, tried_through_cut_handshakes)


def tried_through_cut_handshakes(language: str, reset: bool) -> None:
    with (
        running_secure_etcd() as secure_etcd,
        plugin_processes() as plugins,
        contextlib.closing(HandshakeCutter(secure_etcd.client_port, reset=reset)) as cutter,
    ):
        plugin, address = start(plugins, language, secure_etcd, url=cutter.url)
        said = plugin.wait_said("cannot register")
        assert "does not answer" in said, said
        wait_for(lambda: cutter.cut, what="the plugin's first try")
        time.sleep(6)
        tries = len(cutter.cut)
        # Backing off as from a refusal, it would try 3 times at most (0, 1-2, 3-6 s).
        assert 5 <= tries <= 9, f"{tries} tries in about 6 s:\n{plugin.stderr}"

        cutter.mend()
        mended = time.monotonic()
        plugin.wait_said("etcd answers again")
        took = time.monotonic() - mended
        assert took <= 1 + MARGIN, f"registered {took:.1f} s after etcd answered again"
        assert only_key(secure_etcd, PREFIX)[1] == registered_value(language, address)
        assert plugin.stderr.count("cannot register") == 1, "said once, not per cut"
        plugin.signal(signal.SIGTERM)
        assert secure_etcd.keys(PREFIX) == {}


def test_the_gateway_tells_what_etcd_refused_from_a_handshake_cut_off(
    secure_etcd: SecureEtcd,
) -> None:
    """How soon a plugin tries again rests on this. With TLS 1.3 etcd judges a client's
    certificate once the client's side of the handshake is over, and its alert often
    reaches the client as the request being written fails with an EOF, as a cut
    handshake's does: each of these tries must still be read as etcd's refusal."""
    ca = str(secure_etcd.ca_file)
    key = {"key": etcd_key(f"{PREFIX}/x")}

    def gateway(url: str, pair: tuple[Path, Path] | None, ca_file: str | None = ca) -> Gateway:
        cert, private_key = (str(pair[0]), str(pair[1])) if pair else (None, None)
        access = EtcdAccess(
            ca_file=ca_file,
            cert_file=cert,
            key_file=private_key,
            user="registrar",
            password=secure_etcd.registrar_password,
        )
        return Gateway(url, timeout=10, access=access)

    for pair in (secure_etcd.stranger_pair, None):
        refused = gateway(secure_etcd.url, pair)
        for _ in range(20):
            with pytest.raises(EtcdRefused, match=r"TLS handshake .* failed .*ALERT"):
                refused.post("/v3/kv/range", key)
    with pytest.raises(EtcdRefused, match="cannot verify etcd's certificate"):
        gateway(secure_etcd.url, secure_etcd.client_pair, ca_file=None).post("/v3/kv/range", key)
    for reset in (False, True):
        cutter = HandshakeCutter(secure_etcd.client_port, reset=reset)
        try:
            cut = gateway(cutter.url, secure_etcd.client_pair)
            for _ in range(3):
                with pytest.raises(EtcdUnavailable, match="does not answer") as outage:
                    cut.post("/v3/kv/range", key)
                assert not isinstance(outage.value, EtcdRefused), outage.value
            cutter.mend()
            assert "header" in cut.post("/v3/kv/range", key), "etcd answers through it"
        finally:
            cutter.close()


@pytest.mark.parametrize("language", DISTINCT_CODE)
def test_a_client_certificate_etcd_does_not_trust_is_said_and_the_plugin_serves(
    side_by_side: SideBySide, request: pytest.FixtureRequest, language: str
) -> None:
    """The SDKs turned away side by side, each by an etcd of its own."""
    side_by_side.run(request, untrusted_certificate)


def untrusted_certificate(language: str) -> None:
    with running_secure_etcd() as secure_etcd, plugin_processes() as plugins:
        plugin, address = start(plugins, language, secure_etcd, pair=secure_etcd.stranger_pair)
        said = plugin.wait_said("cannot register")
        assert "TLS handshake" in said and "serving anyway" in said
        assert serving(language, address)
        never_registers(secure_etcd, 2.5)
        assert plugin.stderr.count("cannot register") == 1
        assert secure_etcd.registrar_password not in plugin.stderr


@pytest.mark.parametrize("language", DISTINCT_CODE)
def test_a_user_for_an_etcd_without_authentication_registers_as_etcds_clients_do(
    etcd: Etcd, etcd_prefix: str, plugins: Any, language: str
) -> None:
    """etcd's own clients (etcdctl --user) go on without a token when etcd's
    authentication is off; so do the SDKs, saying so once. A password over http:// to a
    loopback etcd crosses no network, and is taken."""
    settings = {"etcd": etcd.url, "prefix": etcd_prefix, "user": "registrar", "password": SECRET}
    flags, environment = arguments(language, settings)
    address = f"{HOSTS[language]}:{free_port(HOSTS[language])}"
    plugin = plugins([*command(language, address), *flags], **environment)
    plugin.wait_said("registered ")
    assert only_key(etcd, etcd_prefix)[1] == registered_value(language, address)
    time.sleep(1.5)  # renewals, each without a token
    plugin.signal(signal.SIGTERM)
    assert etcd.keys(etcd_prefix) == {}
    said = plugin.stderr
    assert said.count("authentication off") == 1 and "'registrar'" in said, said
    assert SECRET not in said and "cannot register" not in said


SECRET = "SECRET-pw-0d41"


def mistakes(folder: Path) -> list[tuple[dict[str, str], str]]:
    """Settings that are refused before serving, and which setting the refusal names."""
    pem = folder / "ca.pem"
    pem.write_text("not a certificate\n")
    secure = "https://127.0.0.1:1"
    return [
        ({"etcd": "http://127.0.0.1:1", "ca_file": str(pem)}, "ca_file"),
        ({"etcd": "http://127.0.0.1:1", "cert_file": str(pem), "key_file": str(pem)}, "cert_file"),
        ({"etcd": "http://10.1.2.3:2379", "user": "registrar", "password": SECRET}, "password"),
        ({"etcd": "http://etcd.example:2379", "user": "registrar", "password": SECRET}, "password"),
        ({"etcd": secure, "user": "registrar"}, "password"),
        ({"etcd": secure, "password": SECRET}, "user"),
        ({"etcd": secure, "cert_file": str(pem)}, "key_file"),
        ({"etcd": secure, "key_file": str(pem)}, "cert_file"),
        ({"etcd": secure, "ca_file": str(folder / "missing.pem")}, "ca_file"),
        ({"etcd": secure, "ca_file": str(pem)}, "ca_file"),
        ({"etcd": secure, "cert_file": str(pem), "key_file": str(pem)}, "cert_file"),
    ]


MISTAKES = [
    "tls-file-over-http",
    "client-pair-over-http",
    "password-over-http-to-an-address",
    "password-over-http-to-a-name",
    "user-without-password",
    "password-without-user",
    "cert-without-key",
    "key-without-cert",
    "missing-ca-file",
    "ca-file-not-pem",
    "client-pair-not-pem",
]


@pytest.mark.parametrize("mistake", range(len(MISTAKES)), ids=MISTAKES)
@pytest.mark.parametrize(("language", "via"), ENTRY_POINTS)
def test_registry_access_mistakes_exit_before_serving(
    tmp_path: Path, language: str, via: str, mistake: int
) -> None:
    settings, named = mistakes(tmp_path)[mistake]
    flags, environment = arguments(language, settings, via)
    address = f"{HOSTS[language]}:0"
    done = subprocess.run(
        [*command(language, address), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        env={**CLEAN_ENVIRONMENT, **environment},
        check=False,
    )
    assert done.returncode == 1, done.stderr
    # As given: a setting given neither way is named both ways.
    name = FLAGS[named] if via == "flags" and named in FLAGS else VARIABLES[named]
    assert name in done.stderr, done.stderr
    assert SECRET not in done.stderr
    assert "Traceback" not in done.stderr and "panic" not in done.stderr


@pytest.mark.parametrize("joined", [False, True], ids=["separate", "joined"])
@pytest.mark.parametrize("language", LANGUAGES)
def test_a_password_on_the_command_line_is_refused_and_not_repeated(
    language: str, joined: bool
) -> None:
    """A command line shows in the process list: no flag takes etcd's password, and the
    one that looks like it is refused by name, before serving, pointing at the variable."""
    flags, _ = arguments(language, {"etcd": "https://127.0.0.1:1", "user": "registrar"}, "flags")
    password = (
        [f"--register-etcd-password={SECRET}"] if joined else ["--register-etcd-password", SECRET]
    )
    done = subprocess.run(
        [*command(language, f"{HOSTS[language]}:0"), *flags, *password],
        capture_output=True,
        text=True,
        timeout=120,
        env=CLEAN_ENVIRONMENT,
        check=False,
    )
    # argparse's usage error (2) in Python, 1 in Go, as for any other flag refused.
    assert done.returncode in (1, 2), done.stderr
    assert "register-etcd-password" in done.stderr and VARIABLES["password"] in done.stderr
    assert SECRET not in done.stderr + done.stdout
    assert "listening" not in done.stderr and done.stdout == "", "it must not serve"
    assert "Traceback" not in done.stderr and "panic" not in done.stderr


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("localhost", True),
        ("[::1]", True),
        ("[::ffff:127.0.0.1]", True),
        ("10.0.0.5", False),
        ("[fd00::5]", False),
        ("localhost.example", False),
        ("127.0.0.1.nip.io", False),
    ],
)
def test_a_password_goes_over_http_only_to_a_loopback_etcd(host: str, loopback: bool) -> None:
    access = EtcdAccess(user="registrar", password=SECRET)
    if loopback:
        assert access.tls_context(f"http://{host}:2379") is None
    else:
        with pytest.raises(ValueError, match="LINCHKIT_REGISTER_ETCD_PASSWORD") as refused:
            access.tls_context(f"http://{host}:2379")
        assert SECRET not in str(refused.value)
    assert access.tls_context(f"https://{host}:2379") is not None, "over TLS from anywhere"
    assert SECRET not in repr(access)
