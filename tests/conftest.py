"""Shared fixtures: real servers on 127.0.0.1 port 0, the example plugin, manifests."""

from __future__ import annotations

import asyncio
import gc
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from dispatcher import Manifest, parse_manifest
from linchkit_plugin import PluginApp, PluginHost
from tests.side_by_side import SideBySide

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "python"
sys.path.insert(0, str(EXAMPLES))
sys.path.insert(0, str(ROOT / "tests" / "plugins"))

# The test kit is opt-in for plugin authors too (README, "Testing a plugin"); real local
# services (etcd) come from tests/services.py.
pytest_plugins = ["dispatcher.testing.lambda_kit", "tests.services", "tests.sqs_support"]


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def serve_asgi(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a fresh port in this event loop; yields the base URL."""
    sock = bound_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def echo_url() -> AsyncIterator[str]:
    """The example plugin served as an HTTP function by the SDK."""
    from echo_plugin import EchoPlugin

    app = PluginApp(PluginHost(EchoPlugin()), config={"greeting": "from http"})
    async for url in serve_asgi(app):
        yield url


def manifest(*plugins: dict[str, Any]) -> Manifest[Any]:
    return parse_manifest({"version": 1, "plugins": list(plugins)}, base_dir=ROOT)


def echo_plugin(plugin_id: str, target: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A manifest entry for the example plugin's methods on ``target``."""
    return {
        "id": plugin_id,
        "version": "1.0.0",
        "config": {"greeting": "from local"},
        "target": target,
        "methods": {"say": {}, "digest": {}, "sleep": {}, "withdraw": {}},
        **extra,
    }


LOCAL_TARGET = {"provider": "local", "entrypoint": "echo_plugin:EchoPlugin", "path": str(EXAMPLES)}


def route_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the dispatcher said of methods a manifest routes that a plugin does not serve."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "dispatcher" and "the manifest routes" in record.getMessage()
    ]


# Garbage is collected after every test, so that what a test leaves unclosed (a
# transport, a coroutine never awaited) warns, and fails, in that test and not a later
# one (``filterwarnings = error``). A whole collection looks at every object alive in the
# worker, about 100 ms each late in a run (half a small test file's time): after each
# test the survivors are frozen instead (``gc.freeze``), so the next test's collection
# looks only at what it made, and a whole one runs once per module.
@pytest.fixture(autouse=True, scope="module")
def _collect_all_garbage_after_each_module() -> Iterator[None]:
    yield
    gc.unfreeze()
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    yield
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="module")
def side_by_side() -> Iterator[SideBySide]:
    """Runs the cases of a test side by side, each waiting its real time beside the others
    (``tests/side_by_side.py``)."""
    with SideBySide() as cases:
        yield cases


# -- markers: what a test needs beyond Python ---------------------------------------------
# `pytest -m "not docker and not toolchain"` runs the rest anywhere in seconds; `make test`
# runs everything. Marked here, from what each test uses, so a new test that uses one of
# these fixtures or folders is marked without anyone remembering to.
# moto_server backs the local Lambda, whose functions run in the Lambda runtime image.
_DOCKER_FIXTURES = {
    "docker_images",
    "docker_base_image",  # the README quick start deploys to a container and a local Lambda
    "local_lambda",
    "lambda_dispatcher",
    "moto_server",
}
_DOCKER_TESTS = {"test_the_demo_runs_end_to_end"}  # the demo starts sandboxed containers
_TOOLCHAIN_TESTS = {
    "test_the_demo_runs_end_to_end",  # … and the Go example plugin
    # The Go, TypeScript and Java example plugins continuing a trace
    # (tests/test_telemetry_tracing.py; its Python case needs none).
    "test_one_trace_spans_the_dispatcher_and_an_sdk_plugin",
    "test_an_sdk_plugin_starts_a_new_trace_for_a_malformed_traceparent",
    "test_an_sdk_plugin_without_otel_variables_exports_nothing",
    # The TypeScript host client's node:test suite (tests/test_ts_client.py).
    "test_the_typescript_client_suite_passes_against_a_real_gateway",
}


#: The files that took longest in a whole run (worker seconds, 2026-12-07), longest first.
#: ``make test`` hands whole files to the workers in the order they come here
#: (``--dist loadfile --no-loadscope-reorder``; xdist's own order is by number of tests),
#: so the long ones start early and the short ones fill the end: in collection order the
#: TypeScript client's suite (43 s, one test) ran last while the other worker sat idle.
#: Only the order changes; a file not named here keeps its place after these.
_LONGEST_FILES_FIRST = (
    "test_plugin_registry_secure.py",  # 199 s
    "test_websocket_oversized_messages.py",  # 115 s
    "test_jobs_sqs.py",  # 112 s
    "test_hostile_websocket_host.py",  # 106 s
    "test_jobs_cli.py",  # 74 s
    "test_scaffold.py",  # 74 s
    "test_wasm_hostile_network.py",  # 68 s
    "test_connect_url_never_shows_a_token.py",  # 65 s
    "test_graceful_stop.py",  # 63 s
    "test_state_redis.py",  # 61 s
    "test_subprocess_provider.py",  # 61 s
    "test_gateway_lane.py",  # 60 s
    "test_hostile_etcd_storms.py",  # 55 s
    "test_telemetry_tracing.py",  # 54 s
    "test_python_plugin_server.py",  # 52 s
    "test_sdk_quick_starts.py",  # 51 s
    "test_jobs.py",  # 51 s
    "test_docker.py",  # 49 s
    "test_wasm_hostile_timing.py",  # 48 s
    "test_ts_client.py",  # 43 s
)
_RANK = {name: rank for rank, name in enumerate(_LONGEST_FILES_FIRST)}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A stable sort: each file's tests stay together and in their order.
    items.sort(key=lambda item: _RANK.get(item.path.name, len(_RANK)))
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        name = getattr(item, "originalname", item.name)
        if fixtures & _DOCKER_FIXTURES or name in _DOCKER_TESTS:
            item.add_marker(pytest.mark.docker)
        toolchain_test = name in _TOOLCHAIN_TESTS and _language_of(item) != "python"
        if toolchain_test or _needs_toolchain(item):
            item.add_marker(pytest.mark.toolchain)
        if name in _DOCKER_TESTS:
            item.add_marker(pytest.mark.slow)


def _language_of(item: pytest.Item) -> str | None:
    """The SDK a test parametrized by ``language`` runs, if it is."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("language") if callspec else None


def _needs_toolchain(item: pytest.Item) -> bool:
    """Plugins built by another language's toolchain (``make sdks``): polyglot, conformance."""
    if "polyglot" in item.path.parts:
        return True
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec else {}
    # The example fixture's param is (language, mode); other suites parametrize language.
    language = params.get("language") or params.get("example", ("python",))[0]
    return "conformance" in item.path.parts and language != "python"
