"""Local services the tests start for themselves: a real etcd (the registry), a real Redis.

``make services-prereqs`` (``infra/services/install.sh``) installs Debian's etcd-server;
each etcd here runs on free loopback ports with its own data folder and is killed when
its fixture ends, so nothing outlives the test session.

* ``etcd`` (session): one etcd shared by every test; tests keep to their own key prefix
  (``etcd_prefix``).
* ``own_etcd`` (function): an etcd a test may ``stop()`` and ``start()`` again on the
  same ports and data folder, for "the registry is down" cases.
* ``secure_etcd`` (function): an etcd on ``https://`` that asks for a client certificate
  and has etcd's authentication on (``SecureEtcd``: its CA, the client pairs it trusts,
  users ``root``, ``reader``, allowed to read ``READER_PREFIX`` only, and ``registrar``,
  allowed to read and write ``REGISTRAR_PREFIX`` only, as a plugin that registers is); its
  simple tokens expire after ``TOKEN_TTL`` seconds, so a client that keeps one too long
  finds out within a test. ``running_secure_etcd()``: the same for a scenario that runs
  beside others (``tests.side_by_side``), each with an etcd of its own.
* ``redis_server`` (session) and ``own_redis`` (function): redis-server on a free loopback
  port with no persistence (nothing written to disk); ``own_redis`` may be ``stop()``ped
  (killed), ``pause()``d (SIGSTOP: a Redis that accepts connections and never answers)
  and ``start()``ed again on the same port. ``redis_prefix``: a key prefix per test.
* ``plugins`` (function): starts plugin processes (``Plugin``) and kills whichever are
  still running when the test ends; ``plugin_processes()``, the same for a scenario.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

#: The registry variables of the outer environment must not leak into these runs.
CLEAN_ENVIRONMENT = {
    key: value
    for key, value in os.environ.items()
    if not key.startswith(("LINCHKIT_REGISTER_", "LINCHKIT_ADVERTISE"))
}

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
#: A slow 2-core machine under a full test run may take a while to start etcd.
START_TIMEOUT = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_free_on(*hosts: str) -> int:
    """A port nothing listens on at any of ``hosts`` (loopback addresses): the instances
    of a fleet found by DNS share one port, each on its own address."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every loopback host")


class Etcd:
    """One etcd process on loopback; ``stop`` and ``start`` keep its ports and data."""

    scheme = "http"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.url = f"{self.scheme}://127.0.0.1:{self.client_port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._log = data_dir.parent / f"{data_dir.name}.log"

    def _server_flags(self) -> list[str]:
        """What a variant of this etcd adds to its command line."""
        return []

    def _open(self, request: urllib.request.Request | str, timeout: float) -> Any:
        return urllib.request.urlopen(request, timeout=timeout)

    def start(self) -> None:
        if not Path(ETCD).exists():
            pytest.fail("etcd is not installed: run `make services-prereqs`")
        client, peer = self.url, f"http://127.0.0.1:{self.peer_port}"
        command = [
            ETCD,
            "--name=default",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            # No metrics endpoint of its own (the client port's /metrics is enough), no
            # periodic snapshot of a large WAL: a quiet test server.
            "--listen-metrics-urls=",
            "--log-level=warn",
            *self._server_flags(),
        ]
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"etcd exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with self._open(f"{self.url}/health", timeout=2) as answer:
                    if json.loads(answer.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"etcd did not answer within {START_TIMEOUT:g} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """End etcd (killed by default: a registry that vanishes, not one that says goodbye)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log_tail(self) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"

    # -- a small client for tests: the same JSON gateway the dispatcher reads ---------------

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers=self._headers(),
        )
        with self._open(request, timeout=10) as answer:
            result: dict[str, Any] = json.loads(answer.read())
            return result

    def _headers(self) -> dict[str, str]:
        return {}

    def put(self, key: str, value: str | bytes, *, lease: int | None = None) -> None:
        raw = value.encode() if isinstance(value, str) else value
        body: dict[str, Any] = {"key": _b64(key.encode()), "value": _b64(raw)}
        if lease is not None:
            body["lease"] = str(lease)
        self.call("/v3/kv/put", body)

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": _b64(key.encode())})

    def get(self, key: str) -> bytes | None:
        kvs = self.call("/v3/kv/range", {"key": _b64(key.encode())}).get("kvs", [])
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def keys(self, prefix: str) -> dict[str, bytes]:
        """Every key under ``prefix + "/"`` with its value."""
        answer = self.call(
            "/v3/kv/range",
            {"key": _b64(f"{prefix}/".encode()), "range_end": _b64(f"{prefix}0".encode())},
        )
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
            for kv in answer.get("kvs", [])
        }

    def grant(self, ttl: int) -> int:
        return int(self.call("/v3/lease/grant", {"TTL": ttl})["ID"])

    def handled(self, method: str, code: str) -> int:
        """How many requests for gRPC ``method`` (``Authenticate``, ``Put``) etcd has
        answered with ``code`` (``InvalidArgument``, ``PermissionDenied``): etcd's own
        count (``grpc_server_handled_total`` at ``/metrics``), which its JSON gateway's
        requests reach too, as they go through its gRPC server."""
        with self._open(f"{self.url}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        wanted = {"grpc_method": method, "grpc_code": code}
        total = 0
        for line in text.splitlines():
            name, _, rest = line.partition("{")
            if name != "grpc_server_handled_total":
                continue
            labels, _, value = rest.partition("} ")
            pairs = dict(pair.split("=", 1) for pair in labels.split(","))
            if all(pairs.get(label) == f'"{want}"' for label, want in wanted.items()):
                total += int(float(value))
        return total


#: The prefix ``SecureEtcd``'s ``reader`` may read (and nothing else).
READER_PREFIX = "/linchkit-secure"
#: The prefix ``SecureEtcd``'s ``registrar`` may read and write (and nothing else): where
#: plugins register themselves.
REGISTRAR_PREFIX = "/linchkit-registry"
#: Seconds a ``SecureEtcd`` token lives unused: short, so keeping one too long shows.
TOKEN_TTL = 2


class SecureEtcd(Etcd):
    """An etcd as a careful operator runs it: TLS on its client port, a client certificate
    required (``--client-cert-auth``), and etcd's users and roles on, with short-lived
    simple tokens. ``root`` may do anything (the test client below is ``root``);
    ``reader`` (password ``reader_password``) may read keys under ``READER_PREFIX``;
    ``registrar`` (password ``registrar_password``) may read and write keys under
    ``REGISTRAR_PREFIX``, and revoke the leases of its own keys.
    ``client_pair`` is a certificate and key the server accepts, ``stranger_pair`` one
    from another CA."""

    scheme = "https"
    reader_password = "reader-pw-7a1c"
    registrar_password = "registrar-pw-3b8d"
    _root_password = "root-pw-19fe"

    def __init__(self, data_dir: Path) -> None:
        import trustme

        super().__init__(data_dir)
        folder = data_dir.parent / "tls"
        folder.mkdir(exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        server = self.ca.issue_cert("127.0.0.1", "localhost", "etcd.test")
        self._server_pair = _written(folder, "server", server)
        self.client_pair = _written(folder, "client", self.ca.issue_cert("linchkit-client"))
        self.stranger_pair = _written(
            folder, "stranger", trustme.CA().issue_cert("linchkit-client")
        )
        self._context = ssl.create_default_context(cafile=str(self.ca_file))
        self._context.load_cert_chain(*self.client_pair)
        self._token: str | None = None

    def _server_flags(self) -> list[str]:
        cert, key = self._server_pair
        return [
            f"--cert-file={cert}",
            f"--key-file={key}",
            f"--trusted-ca-file={self.ca_file}",
            "--client-cert-auth",
            "--auth-token=simple",
            f"--auth-token-ttl={TOKEN_TTL}",
        ]

    def start(self) -> None:
        super().start()
        if self._token is None:  # the first start; a restart keeps the data, users and all
            self._enable_auth()

    def _open(self, request: urllib.request.Request | str, timeout: float) -> Any:
        return urllib.request.urlopen(request, timeout=timeout, context=self._context)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """As root; a token that expired is replaced once."""
        try:
            return super().call(path, body)
        except urllib.error.HTTPError as error:
            if error.code != 401 or self._token is None:
                raise
        self._token = None
        self._token = self.authenticate("root", self._root_password)
        return super().call(path, body)

    def authenticate(self, name: str, password: str) -> str:
        """A new token of ``name``'s, asked for with none: etcd refuses every request that
        carries an expired token (401), this one too, and root's expires after
        ``TOKEN_TTL`` unused (a loaded machine's pause between two steps of a test)."""
        request = urllib.request.Request(
            f"{self.url}/v3/auth/authenticate",
            data=json.dumps({"name": name, "password": password}).encode(),
            method="POST",
        )
        with self._open(request, timeout=10) as answer:
            return str(json.loads(answer.read())["token"])

    def takes_token(self, token: str, key: str) -> bool:
        """Whether etcd still takes ``token`` for reading ``key`` (False: it expired). A
        use keeps a simple token alive for another ``TOKEN_TTL``, so ask once, at the end."""
        request = urllib.request.Request(
            f"{self.url}/v3/kv/range",
            data=json.dumps({"key": _b64(key.encode())}).encode(),
            method="POST",
            headers={"Authorization": token},
        )
        try:
            with self._open(request, timeout=10):
                return True
        except urllib.error.HTTPError as error:
            if error.code == 401:
                return False
            raise

    def _enable_auth(self) -> None:
        # A fresh etcd answers its health check before its cluster version is settled, and
        # until then refuses every auth request as "not capable" (HTTP 412).
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.call("/v3/auth/user/add", {"name": "root", "password": self._root_password})
                break
            except urllib.error.HTTPError as error:
                if error.code != 412 or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.call("/v3/auth/user/add", {"name": "reader", "password": self.reader_password})
        self.call("/v3/auth/role/add", {"name": "root"})
        self.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.call("/v3/auth/role/add", {"name": "reader"})
        self.call(
            "/v3/auth/role/grant",
            {
                "name": "reader",
                "perm": {
                    "permType": "READ",
                    "key": _b64(f"{READER_PREFIX}/".encode()),
                    "range_end": _b64(f"{READER_PREFIX}0".encode()),
                },
            },
        )
        self.call("/v3/auth/user/grant", {"user": "reader", "role": "reader"})
        self.call("/v3/auth/user/add", {"name": "registrar", "password": self.registrar_password})
        self.call("/v3/auth/role/add", {"name": "registrar"})
        self.call(
            "/v3/auth/role/grant",
            {"name": "registrar", "perm": readwrite_permission(REGISTRAR_PREFIX)},
        )
        self.call("/v3/auth/user/grant", {"user": "registrar", "role": "registrar"})
        self.call("/v3/auth/enable", {})
        self._token = self.authenticate("root", self._root_password)


def readwrite_permission(prefix: str) -> dict[str, str]:
    """etcd's permission to read and write every key under ``prefix + "/"``."""
    return {
        "permType": "READWRITE",
        "key": _b64(f"{prefix}/".encode()),
        "range_end": _b64(f"{prefix}0".encode()),
    }


def _written(folder: Path, name: str, cert: Any) -> tuple[Path, Path]:
    """``cert`` (a trustme leaf) as PEM files ``<name>.pem`` and ``<name>.key``."""
    cert_file, key_file = folder / f"{name}.pem", folder / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def wait_for(predicate: Any, *, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; generous for a busy machine."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


#: How long a test waits for a change: a bound on a stuck test, not a performance claim.
PATIENCE = 30.0


async def until(predicate: Callable[[], Any], what: str, timeout: float = PATIENCE) -> Any:
    try:
        async with asyncio.timeout(timeout):
            while True:
                if value := predicate():
                    return value
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"no {what} within {timeout:g} s") from None


def _running_etcd(folder: str) -> Iterator[Etcd]:
    server = Etcd(Path(folder) / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def etcd() -> Iterator[Etcd]:
    """One etcd for the session; tests share it, each under its own ``etcd_prefix``."""
    with tempfile.TemporaryDirectory(prefix="linchkit-etcd-") as folder:
        yield from _running_etcd(folder)


@pytest.fixture
def own_etcd() -> Iterator[Etcd]:
    """An etcd of this test's own, which it may stop and start again."""
    with tempfile.TemporaryDirectory(prefix="linchkit-etcd-") as folder:
        yield from _running_etcd(folder)


@contextlib.contextmanager
def running_secure_etcd() -> Iterator[SecureEtcd]:
    """An etcd behind TLS, client certificates and etcd's users, killed on leaving."""
    with tempfile.TemporaryDirectory(prefix="linchkit-etcd-") as folder:
        server = SecureEtcd(Path(folder) / "data")
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def secure_etcd() -> Iterator[SecureEtcd]:
    """An etcd of this test's own behind TLS, client certificates and etcd's users."""
    with running_secure_etcd() as server:
        yield server


@pytest.fixture
def etcd_prefix() -> str:
    """A registry prefix no other test uses."""
    return f"/linchkit-test/{uuid.uuid4().hex[:12]}"


class Redis:
    """One redis-server on loopback, no persistence; ``stop`` and ``start`` keep its port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self._log = folder / "redis.log"

    def start(self) -> None:
        if not Path(REDIS_SERVER).exists():
            pytest.fail("redis-server is not installed: run `make services-prereqs`")
        command = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.folder),
            "--protected-mode", "yes",
            "--loglevel", "warning",
        ]  # fmt: skip
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"redis-server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if self.ping():
                return
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"redis-server did not answer within {START_TIMEOUT:g} s:\n{self.log_tail()}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *words: str) -> bytes:
        """One command over a raw socket (tests read and change keys with it)."""
        payload = f"*{len(words)}\r\n".encode() + b"".join(
            f"${len(word.encode())}\r\n{word}\r\n".encode() for word in words
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(payload)
            reply = sock.recv(65536)
            # A bulk string ($<length>\r\n…\r\n), CLIENT LIST's, may come in pieces.
            if reply.startswith(b"$") and b"\r\n" in reply:
                length = int(reply[1 : reply.index(b"\r\n")])
                whole = reply.index(b"\r\n") + 2 + max(length, 0) + 2
                while len(reply) < whole:
                    more = sock.recv(65536)
                    if not more:
                        break
                    reply += more
            return reply

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Kill it: a store that vanishes, not one that says goodbye."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused process dies on SIGKILL too
            self.process.kill()
        self.process.wait(timeout=30)
        self.process = None

    def log_tail(self) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"


def _running_redis(folder: str) -> Iterator[Redis]:
    server = Redis(Path(folder))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Redis]:
    """One Redis for the session; tests keep to their own ``redis_prefix``."""
    with tempfile.TemporaryDirectory(prefix="linchkit-redis-") as folder:
        yield from _running_redis(folder)


@pytest.fixture
def own_redis() -> Iterator[Redis]:
    """A Redis of this test's own, which it may kill, pause and start again."""
    with tempfile.TemporaryDirectory(prefix="linchkit-redis-") as folder:
        yield from _running_redis(folder)


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}"


class Plugin:
    """A plugin process whose stderr goes to a file (a pipe nobody reads would fill)."""

    def __init__(self, command: list[str], **environment: str) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="linchkit-plugin-")
        self._stderr_path = Path(self._folder.name) / "stderr"
        with self._stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**CLEAN_ENVIRONMENT, **environment},
                cwd=self._folder.name,
            )

    @property
    def stderr(self) -> str:
        return self._stderr_path.read_text(errors="replace")

    def wait_said(self, text: str) -> str:
        def said() -> bool:
            if self.process.poll() is not None and text not in self.stderr:
                raise AssertionError(
                    f"the plugin exited ({self.process.returncode}):\n{self.stderr}"
                )
            return text in self.stderr

        wait_for(said, what=f"{text!r} on the plugin's stderr")
        return self.stderr

    def signal(self, sig: int) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    def end(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=60)
        self._folder.cleanup()


@contextlib.contextmanager
def plugin_processes() -> Iterator[Callable[..., Plugin]]:
    """Start plugin processes; every one is killed on leaving, whatever happened."""
    started: list[Plugin] = []

    def start(command: list[str], **environment: str) -> Plugin:
        started.append(Plugin(command, **environment))
        return started[-1]

    try:
        yield start
    finally:
        for plugin in started:
            plugin.end()


@pytest.fixture
def plugins() -> Iterator[Any]:
    """Start plugin processes; every one is killed when the test ends, whatever happened."""
    with plugin_processes() as start:
        yield start
