"""One capabilities block, three sandboxes: wasm (Extism), subprocess (bubblewrap) and
Docker answer the same questions the same way, for what all three can express.

Asked of each, through its own test plugin (tests/plugins/wasm_hostile, sandbox_hostile,
capability_probe): read a granted read-only file, read a host file not granted, write to
the read-only grant, write to the read-write grant, read a granted and a withheld
variable. Network: denied by default everywhere; wasm cannot even try (WASI preview 1 has
no sockets), the other two are asked to connect to a loopback listener.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dispatcher import Dispatcher, PluginError
from providers.docker import DockerProvider
from tests.conftest import manifest
from tests.sandbox_support import build_static, open_folder, remove
from tests.wasm_support import build_hostile, sha256_of

pytestmark = pytest.mark.toolchain

IMAGE = "linchkit-test/capability-probe:1"


@dataclass
class Host:
    """The host side: what is granted, what is not, and a listener that must hear nothing."""

    readable: Path
    writable: Path
    secret: Path

    def capabilities(self) -> dict[str, Any]:
        return {
            "files": [
                {"path": str(self.readable), "mode": "ro"},
                {"path": str(self.writable), "mode": "rw"},
            ],
            "env": ["CAPABILITY_GRANTED"],
        }


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    monkeypatch.setenv("CAPABILITY_GRANTED", "granted value")
    monkeypatch.setenv("CAPABILITY_WITHHELD", "withheld value")
    root = open_folder("capabilities-", 0o755)
    readable, writable = root / "ro", root / "rw"
    readable.mkdir(mode=0o755)
    writable.mkdir()
    writable.chmod(0o777)  # the sandboxes' user writes there
    (readable / "data").write_text("granted file")
    (readable / "data").chmod(0o644)
    secret = root / "secret"
    secret.write_text("host secret")
    secret.chmod(0o644)
    yield Host(readable, writable, secret)
    remove(root)


@pytest.fixture(scope="module")
def builds() -> Iterator[Path]:
    folder = open_folder("capability-plugins-")
    build_hostile(folder)
    build_static("sandbox_hostile", folder, "hostile")
    context = folder / "probe-context"
    context.mkdir(mode=0o755)
    build_static("capability_probe", context, "probe")
    shutil.copy(Path(__file__).parent / "plugins" / "capability_probe" / "Dockerfile", context)
    yield folder
    remove(folder)


Ask = Callable[[str, str], Awaitable[Any]]  # (question, argument) -> answer


def _plugin(provider: str, builds: Path, capabilities: dict[str, Any]) -> dict[str, Any]:
    if provider == "wasm":
        module = builds / "hostile.wasm"
        target: dict[str, Any] = {
            "provider": "wasm",
            "module": str(module),
            "sha256": sha256_of(module),
        }
        methods = ("read_file", "write_file", "env")
    elif provider == "subprocess":
        target = {"provider": "subprocess", "command": [str(builds / "hostile")], "sandbox": True}
        methods = ("read", "write", "env", "connect")
    else:
        target = {
            "provider": "docker",
            "image": IMAGE,
            "build": {"context": str(builds / "probe-context"), "dockerfile": "Dockerfile"},
        }
        methods = ("read", "write", "env", "connect")
    return {
        "id": "probe",
        "version": "1.0.0",
        "capabilities": capabilities,
        "target": target,
        "methods": {name: {} for name in methods},
    }


@pytest.fixture(params=["wasm", "subprocess", pytest.param("docker", marks=pytest.mark.docker)])
async def ask(request: pytest.FixtureRequest, builds: Path, host: Host) -> AsyncIterator[Ask]:
    provider = request.param
    if provider == "subprocess" and shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    plugins = manifest(_plugin(provider, builds, host.capabilities()))
    if provider == "docker":
        spec = plugins.plugins[0]
        async with DockerProvider() as docker:
            deployer = docker.deployer()
            assert deployer is not None
            await deployer.apply(spec, spec.target)
    async with Dispatcher(plugins) as dispatcher:

        async def question(what: str, argument: str) -> Any:
            if provider == "wasm":
                method = {"read": "read_file", "write": "write_file"}.get(what, what)
                return await dispatcher.call("probe", method, argument, timeout=30)
            key = {"env": "name", "connect": "address"}.get(what, "path")
            return await dispatcher.call("probe", what, {key: argument}, timeout=30)

        question.provider = provider  # type: ignore[attr-defined]
        yield question


async def denied(ask: Ask, what: str, argument: str, error_type: str) -> None:
    with pytest.raises(PluginError) as caught:
        await ask(what, argument)
    assert caught.value.remote_type == error_type, caught.value


async def test_files_are_visible_exactly_as_granted(ask: Ask, host: Host) -> None:
    assert await ask("read", str(host.readable / "data")) == "granted file"
    await denied(ask, "read", str(host.secret), "FileError")
    await denied(ask, "read", "/etc/passwd", "FileError")
    await denied(ask, "write", str(host.readable / "new"), "FileError")
    assert await ask("write", str(host.writable / "new")) is True
    assert (host.writable / "new").read_text() == "written by the plugin"
    assert not (host.readable / "new").exists()


async def test_only_granted_variables_are_visible(ask: Ask) -> None:
    assert await ask("env", "CAPABILITY_GRANTED") == "granted value"
    assert await ask("env", "CAPABILITY_WITHHELD") is None


async def test_no_network_unless_granted(ask: Ask) -> None:
    if ask.provider == "wasm":  # type: ignore[attr-defined]
        pytest.skip("a WASI preview 1 module has no socket to try with: denied by construction")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.3)
    try:
        await denied(ask, "connect", f"127.0.0.1:{listener.getsockname()[1]}", "NetworkError")
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()
