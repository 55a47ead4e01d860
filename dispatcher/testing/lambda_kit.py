"""Test kit for plugin authors: your plugin deployed to a local Lambda, called through a Dispatcher.

(``dispatcher.testing.lambda_kit``, a pytest plugin you opt into.)

It needs ``linchkit-dispatcher[lambda]`` plus ``moto[server]`` and ``pytest-asyncio``
(all in ``[dev]``) and is not loaded automatically: add
``pytest_plugins = ["dispatcher.testing.lambda_kit"]`` to your ``conftest.py``, or run
``pytest -p dispatcher.testing.lambda_kit``. In your tests::

    async def test_my_plugin_on_lambda(lambda_dispatcher):
        assert await lambda_dispatcher.call("my-plugin", "say", {"text": "hi"}) == ...

No pytest configuration is needed: the async fixtures are pytest-asyncio fixtures, and an
``async def`` test that uses one is marked ``@pytest.mark.asyncio`` for you, so it runs in
pytest-asyncio's strict mode (its default) as in ``asyncio_mode = auto``. Your own async
fixtures, in strict mode, need ``@pytest_asyncio.fixture``; pytest-asyncio warns until
``asyncio_default_fixture_loop_scope`` is set (``function`` suits these fixtures).

``lambda_dispatcher`` reads your manifest (``plugins.yaml`` in the rootdir, or override
the ``lambda_manifest`` fixture), points every ``provider: lambda`` target at a local
Lambda, creates the execution roles its ``deploy`` settings name, deploys each Lambda
plugin with ``dispatcher deploy``'s own code (``LambdaProvider().deployer()``), and
yields a started ``Dispatcher``.

The local Lambda is real: moto's server (``ThreadedMotoServer``) keeps functions,
versions and aliases, and your handler runs in the AWS Lambda runtime (``awslambdaric``
under ``aws-lambda-rie``) in a local Docker container (``dispatcher.testing.local_lambda``).
It needs a Docker engine and the runtime image (``infra/lambda/build-runtime-image.sh``);
without them the fixture fails and says what to run, it never skips.

Fixtures: ``moto_server`` (session; URL), ``local_lambda`` (a started ``LocalLambda``),
``lambda_manifest`` (path), ``lambda_dispatcher``. What your handler prints lands in moto's
CloudWatch Logs, as on AWS: ``await local_lambda.flush_logs()``, then read it with
``dispatcher.providers["lambda"].logs(...)`` (what ``dispatcher logs`` prints). Outside pytest, ``dispatcher
local-lambda`` runs the same local Lambda until stopped.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - depends on what the author installed
    raise ImportError(
        "dispatcher.testing.lambda_kit runs its fixtures with pytest-asyncio: "
        "pip install pytest-asyncio (it comes with linchkit-dispatcher[dev])"
    ) from None

from dispatcher.testing.local_lambda.server import ACCOUNT, FAKE_CREDENTIALS, create_role

if TYPE_CHECKING:
    from dispatcher._dispatcher import Dispatcher
    from dispatcher.config import Manifest
    from dispatcher.testing.local_lambda import LocalLambda
    from providers.deploy import Step

__all__ = [
    "ACCOUNT",
    "ASYNC_FIXTURES",
    "FAKE_CREDENTIALS",
    "create_role",
    "deploy_manifest",
    "lambda_dispatcher",
    "lambda_manifest",
    "local_lambda",
    "moto_server",
    "point_at",
    "reset_moto",
]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's server on a free loopback port, for the session; yields its URL."""
    from moto.server import ThreadedMotoServer

    saved = {name: os.environ.get(name) for name in FAKE_CREDENTIALS}
    os.environ.update(FAKE_CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest_asyncio.fixture(loop_scope="function")
async def local_lambda(moto_server: str) -> AsyncIterator[LocalLambda]:
    """A started local Lambda in front of a freshly reset moto."""
    from dispatcher.testing.local_lambda import LocalLambda

    await reset_moto(moto_server)
    async with LocalLambda(moto_server) as local:
        yield local


@pytest.fixture
def lambda_manifest(request: pytest.FixtureRequest) -> Path:
    """The manifest ``lambda_dispatcher`` deploys; override it to use another file."""
    return Path(request.config.rootpath) / "plugins.yaml"


@pytest_asyncio.fixture(loop_scope="function")
async def lambda_dispatcher(
    local_lambda: LocalLambda, lambda_manifest: Path
) -> AsyncIterator[Dispatcher]:
    """Every Lambda plugin of the manifest deployed locally; a started Dispatcher for all."""
    from dispatcher._dispatcher import Dispatcher

    manifest = await deploy_manifest(lambda_manifest, local_lambda.url)
    async with Dispatcher(manifest) as dispatcher:
        yield dispatcher


#: The kit's async fixtures: a coroutine test that uses one is an asyncio test.
ASYNC_FIXTURES = frozenset({"local_lambda", "lambda_dispatcher"})


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> Generator[None, Any, None]:
    """Mark ``async def`` tests that use a kit fixture ``@pytest.mark.asyncio``.

    In pytest-asyncio's strict mode (its default, in a project with no configuration)
    an unmarked ``async def`` test is not run at all. Marking here, as the item is made,
    lets pytest-asyncio's own wrapper (outside this one: ``trylast``) see the mark, so
    the kit's tests run in strict and auto mode alike. Tests that already carry the mark
    (with their own ``loop_scope``) keep it.
    """
    outcome = yield
    result = outcome.get_result()
    items = result if isinstance(result, list) else [result]
    for item in items:
        if (
            isinstance(item, pytest.Function)
            and inspect.iscoroutinefunction(item.obj)
            and ASYNC_FIXTURES.intersection(item.fixturenames)
            and item.get_closest_marker("asyncio") is None
        ):
            item.add_marker(pytest.mark.asyncio)


async def reset_moto(url: str) -> None:
    """Forget every resource moto holds (``POST /moto-api/reset``)."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.post(f"{url}/moto-api/reset") as answer:
        answer.raise_for_status()


def point_at(data: Any, endpoint_url: str, region: str = "us-east-1") -> Any:
    """A copy of a manifest document with every lambda target sent to ``endpoint_url``."""
    if isinstance(data, dict):
        copied = {key: point_at(value, endpoint_url, region) for key, value in data.items()}
        if copied.get("provider") == "lambda":
            copied["endpoint_url"] = endpoint_url
            copied["region"] = region
        return copied
    if isinstance(data, list):
        return [point_at(item, endpoint_url, region) for item in data]
    return data


async def deploy_manifest(
    source: Path | dict[str, Any],
    endpoint_url: str,
    *,
    base_dir: Path | None = None,
    progress: Callable[[Step], None] | None = None,
) -> Manifest[Any]:
    """Deploy every Lambda plugin of a manifest to the local Lambda at ``endpoint_url``.

    ``source`` is a manifest file or an already parsed document. Returns the manifest,
    its lambda targets pointed at ``endpoint_url``, ready for a ``Dispatcher``.
    """
    from dispatcher.config import parse_manifest
    from providers.aws_lambda import LambdaProvider, LambdaTarget

    if isinstance(source, Path):
        data = _read_yaml(source)
        base_dir = base_dir or source.parent
    else:
        data = source
    manifest = parse_manifest(point_at(data, endpoint_url), base_dir=base_dir)
    roles: set[str] = set()
    provider = LambdaProvider()
    deployer = provider.deployer()
    async with provider:
        for plugin in manifest.plugins:
            for target in plugin.targets():
                if not isinstance(target, LambdaTarget) or target.deploy is None:
                    continue
                role = target.deploy.role.rpartition("/")[2]
                if role not in roles:
                    # The local Lambda passes IAM requests through to moto.
                    await create_role(endpoint_url, role)
                    roles.add(role)
                await deployer.apply(plugin, target, progress)
    return manifest


def _read_yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))
