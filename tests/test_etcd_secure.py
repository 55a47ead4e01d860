"""etcd run as a careful operator runs it (tests/services.py ``SecureEtcd``): TLS on the
client port, a client certificate required, etcd's users on, tokens that expire after two
seconds unused. The registry of plugin entries and the fleet's etcd source read it with
``tls`` and ``auth``; a token etcd stops taking is replaced without a failed read, and
every refusal (password, certificate, permission, settings) says what is wrong without
quoting a password or a token."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest

from dispatcher import Dispatcher, ManifestError, parse_manifest
from dispatcher.fleet.sources.etcd import EtcdSource
from dispatcher.fleet.sources.etcd_client import EtcdPrefix, PrefixRead
from providers.discovery import Endpoint, EtcdAuth, RegistryDiscovery
from providers.tls import ClientTls, ClientTlsContext
from tests.conftest import LOCAL_TARGET, ROOT, echo_plugin
from tests.services import READER_PREFIX, TOKEN_TTL, SecureEtcd, until
from tests.test_etcd_source import put, watching
from tests.test_registry_entries import entry, greeting, keys, plugin_server


def access(etcd: SecureEtcd, **changes: Any) -> dict[str, Any]:
    """What the dispatcher is given to reach ``etcd`` as ``reader``, with ``changes``."""
    cert, key = etcd.client_pair
    settings: dict[str, Any] = {
        "etcd": etcd.url,
        "tls": {"ca_file": str(etcd.ca_file), "cert_file": str(cert), "key_file": str(key)},
        "auth": {"username": "reader", "password": etcd.reader_password},
    }
    settings.update(changes)
    return {key: value for key, value in settings.items() if value is not None}


def source(etcd: SecureEtcd, prefix: str, **changes: Any) -> EtcdSource:
    spec = RegistryDiscovery.model_validate(
        {"prefix": prefix, "timeout_ms": 2000, "retry_ms": 100, **access(etcd, **changes)}
    )
    return EtcdSource(spec)


def prefix_reader(etcd: SecureEtcd, prefix: str) -> EtcdPrefix:
    cert, key = etcd.client_pair
    tls = ClientTls(ca_file=etcd.ca_file, cert_file=cert, key_file=key)
    auth = EtcdAuth(username="reader", password=etcd.reader_password)  # type: ignore[arg-type]
    return EtcdPrefix(
        etcd.url, prefix, timeout=2.0, retry=0.1, tls=ClientTlsContext(tls), auth=auth
    )


class Keys:
    """Every key one read found (a ``PrefixRead`` for ``EtcdPrefix.read``)."""

    def __init__(self) -> None:
        self.found: dict[str, bytes] = {}
        self.done = False

    def read(self) -> PrefixRead:
        self.found, self.done = {}, False
        return PrefixRead(self.found.update, self._done)

    def _done(self) -> None:
        self.done = True


@pytest.fixture
def prefix() -> str:
    return f"{READER_PREFIX}/fleet"


async def test_instances_are_read_and_watched_over_tls_as_an_etcd_user(
    secure_etcd: SecureEtcd, prefix: str
) -> None:
    await put(secure_etcd, f"{prefix}/a", {"url": "http://127.0.0.2:8081"})
    watcher = source(secure_etcd, prefix)
    async with watching(watcher) as reports:
        await until(lambda: watcher.reads == 1, "the first read")
        assert reports.last == [Endpoint("127.0.0.2", 8081)]
        # Past the token's life the watch goes on: etcd checked it when the watch began.
        await asyncio.sleep(TOKEN_TTL + 1)
        await put(secure_etcd, f"{prefix}/b", {"address": "127.0.0.3:50051"})
        await until(lambda: len(reports.last) == 2, "the put, watched")
        assert watcher.error is None and watcher.failed_reads == 0


async def test_a_token_etcd_no_longer_takes_is_replaced_without_a_failed_read(
    secure_etcd: SecureEtcd, prefix: str
) -> None:
    await put(secure_etcd, f"{prefix}/a", {"url": "http://127.0.0.2:8081"})
    reader = prefix_reader(secure_etcd, prefix)
    found = Keys()
    try:
        await reader.read(found.read())
        first = reader._login._token if reader._login is not None else None
        assert found.done and list(found.found) == [f"{prefix}/a"] and first is not None

        # Unused for longer than its life, the token is refused (HTTP 401): asked again.
        await asyncio.sleep(TOKEN_TTL + 1.5)
        await reader.read(found.read())
        assert found.done and list(found.found) == [f"{prefix}/a"]
        second = reader._login._token if reader._login is not None else None
        assert second not in (None, first)

        # A watch created with a stale token: etcd cancels it as it creates it; it is
        # created again with a new one and the changes come.
        await asyncio.sleep(TOKEN_TTL + 1.5)
        changes: list[Any] = []
        watch = asyncio.create_task(reader._watch(1, lambda batch: changes.extend(batch)))
        await asyncio.sleep(0.5)
        await put(secure_etcd, f"{prefix}/b", {"url": "http://127.0.0.2:8082"})
        await until(lambda: changes, "a change through the watch made again")
        assert not watch.done()
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        assert reader._login is not None and reader._login._token not in (None, second)

        # etcd restarted knows no token it gave before.
        await asyncio.to_thread(secure_etcd.stop)
        await asyncio.to_thread(secure_etcd.start)
        await reader.read(found.read())
        assert found.done and set(found.found) == {f"{prefix}/a", f"{prefix}/b"}
    finally:
        await reader.aclose()


async def test_a_wrong_password_is_said_without_the_password_and_retried(
    secure_etcd: SecureEtcd, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "dispatcher.fleet.sources.etcd")
    secret = "Wr0ng-Pa55-do-not-echo"
    watcher = source(secure_etcd, prefix, auth={"username": "reader", "password": secret})
    async with watching(watcher) as reports:
        error = await until(lambda: watcher.error, "the error")
        assert "etcd refused to authenticate user 'reader'" in error
        assert "authentication failed" in error
        await until(lambda: watcher.failed_reads >= 3, "reads tried again")
        assert reports.lists == []
    said = caplog.text + repr(watcher) + str(watcher.error) + repr(watcher._spec)
    assert secret not in said


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # No client certificate: the server ends the handshake.
        ({"tls": {"ca_file": "CA"}}, "etcd refused the client certificate"),
        # One from another CA: the same.
        (
            {"tls": {"ca_file": "CA", "cert_file": "STRANGER", "key_file": "STRANGER_KEY"}},
            "etcd refused the client certificate",
        ),
        # etcd's certificate checked against the system's roots: not trusted.
        ({"tls": {"cert_file": "CERT", "key_file": "KEY"}}, "etcd's certificate is not trusted"),
        # No auth, to an etcd with its users on.
        ({"auth": None}, "etcd has authentication on"),
    ],
    ids=["no-client-certificate", "a-stranger-certificate", "an-untrusted-etcd", "no-auth"],
)
async def test_each_refusal_says_what_is_wrong(
    secure_etcd: SecureEtcd, prefix: str, changes: dict[str, Any], expected: str
) -> None:
    files = {
        "CA": str(secure_etcd.ca_file),
        "CERT": str(secure_etcd.client_pair[0]),
        "KEY": str(secure_etcd.client_pair[1]),
        "STRANGER": str(secure_etcd.stranger_pair[0]),
        "STRANGER_KEY": str(secure_etcd.stranger_pair[1]),
    }
    if "tls" in changes:
        changes = {"tls": {name: files[value] for name, value in changes["tls"].items()}}
    await put(secure_etcd, f"{prefix}/a", {"url": "http://127.0.0.2:8081"})
    watcher = source(secure_etcd, prefix, **changes)
    async with watching(watcher) as reports:
        error = await until(lambda: watcher.error, "the error")
        assert expected in error, error
        assert "\n" not in error
        assert reports.lists == []
    assert secure_etcd.reader_password not in error


async def test_a_prefix_the_user_may_not_read_says_so(secure_etcd: SecureEtcd) -> None:
    watcher = source(secure_etcd, "/somewhere-else")
    async with watching(watcher) as reports:
        error = await until(lambda: watcher.error, "the error")
        assert "permission denied (user 'reader' may not read this prefix)" in error
        assert reports.lists == []


async def test_plugin_entries_are_published_in_a_secure_etcd(secure_etcd: SecureEtcd) -> None:
    entries = f"{READER_PREFIX}/entries"
    document = {
        "version": 1,
        "plugins": [echo_plugin("main", LOCAL_TARGET)],
        "registry": {"prefix": entries, "debounce_ms": 50, **access(secure_etcd)},
    }
    with plugin_server("secured") as url:
        async with Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher:
            await asyncio.to_thread(secure_etcd.put, f"{entries}/echo@1.0.0", entry(url))
            await until(lambda: "echo@1.0.0" in keys(dispatcher), "the published entry")
            assert await greeting(dispatcher) == "secured"
            registry = dispatcher.stats()["registry"]
            assert registry["error"] is None
            assert secure_etcd.reader_password not in repr(dispatcher.stats())


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"etcd": "http://10.1.2.3:2379", "auth": {"username": "u", "password": "PW-SECRET"}},
            "password in clear",
        ),
        ({"etcd": "http://127.0.0.1:2379", "tls": {"ca_file": "ca.pem"}}, "https://"),
        ({"etcd": "https://u:PW-SECRET@etcd.internal:2379"}, "do not go in the URL"),
        (
            {"etcd": "https://etcd.internal:2379", "auth": {"username": "u", "password": ""}},
            "password",
        ),
        (
            {"etcd": "https://etcd.internal:2379", "tls": {"cert_file": "c.pem"}},
            "cert_file and key_file go together",
        ),
    ],
)
@pytest.mark.parametrize("where", ["registry", "instances"])
def test_settings_that_would_leak_are_refused_when_the_manifest_loads(
    settings: dict[str, Any], expected: str, where: str
) -> None:
    if where == "registry":
        document: dict[str, Any] = {
            "plugins": [echo_plugin("main", LOCAL_TARGET)],
            "registry": {"prefix": "/linchkit/entries", **settings},
        }
    else:
        target = {
            "provider": "http",
            "instances": [{"registry": {"prefix": "/linchkit/plugins/echo", **settings}}],
        }
        document = {"plugins": [echo_plugin("main", target)]}
    with pytest.raises(ManifestError) as caught:
        parse_manifest(document, base_dir=ROOT)
    assert expected in str(caught.value)
    assert "PW-SECRET" not in str(caught.value)


def test_a_loopback_etcd_may_take_a_password_over_http() -> None:
    for host in ("127.0.0.1", "[::1]", "localhost"):
        spec = RegistryDiscovery.model_validate(
            {
                "etcd": f"http://{host}:2379",
                "prefix": "/p",
                "auth": {"username": "u", "password": "p"},
            }
        )
        assert spec.auth is not None and "p" not in repr(spec.auth.password)
