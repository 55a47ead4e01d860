"""The example plugin as a Knative service, offline: `python examples/knative_demo.py`.

No Kubernetes runs here, so the cluster is the local stand-in of Knative's ingress and
activator (``dispatcher.testing.knative``, an emulation: routing by Host, 503 while a
revision activates, scale to zero after idle). Each revision is the example plugin in the
real Knative Functions Python runtime (func-python), answering CloudEvents.

Shows: a cold start resent by the provider (the activator's 503s never reached the plugin)
and counted, warm calls, the canary tag's own revision, both CloudEvents modes, a plugin
error, scale to zero, and the plan `dispatcher deploy --dry-run` prints (the Service it
would write and apply).

`python examples/knative_demo.py --write-infra` writes that Service where `dispatcher
deploy` would, `infra/knative/plugins/echo.yaml` (committed; ``tests/test_knative_infra.py``
renders it again and fails when it differs).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from dispatcher import Dispatcher, DispatchError, parse_manifest
from dispatcher.testing.knative import KnativeStandIn, Revision
from providers.knative import KnativeProvider

ROOT = Path(__file__).resolve().parent.parent
#: Where ``dispatcher deploy`` run from the repository's root writes knative Services.
INFRA_DIR = ROOT / "infra" / "knative"

#: How ``dispatcher deploy`` builds echo-knative's Service.
ECHO_DEPLOY: dict[str, Any] = {
    "image": "registry.example.com/plugins/echo:1.1.0",
    "args": ["echo_plugin:EchoPlugin"],
    "container_concurrency": 10,
    "max_scale": 5,
    "timeout_seconds": 30,
    "limits": {"cpu": "500m", "memory": "256Mi"},
    "canary": {"stable_version": "1.0.0", "percent": 10},
}


def revision(name: str, greeting: str) -> Revision:
    config = orjson.dumps({"greeting": greeting}).decode()
    command = [sys.executable, "-m", "linchkit_plugin.knative", "echo_plugin:EchoPlugin"]
    return Revision(
        name, [*command, "--path", str(ROOT / "examples" / "python"), "--config", config]
    )


def plugin(plugin_id: str, ingress: str, **target: Any) -> dict[str, Any]:
    return {
        "id": plugin_id,
        "version": "1.1.0",
        "config": {"greeting": "hello from Knative"},
        "target": {
            "provider": "knative",
            "ingress": ingress,
            "service": "echo",
            "namespace": "plugins",
            **target,
        },
        "defaults": {"timeout_ms": 20_000},
        "methods": {"say": {"idempotent": True}, "withdraw": {}},
    }


def demo_manifest(ingress: str) -> dict[str, Any]:
    """The demo's manifest: echo-knative (deployable), its structured twin, its canary."""
    return {
        "version": 1,
        "plugins": [
            plugin("echo-knative", ingress, deploy=ECHO_DEPLOY),
            plugin("echo-structured", ingress, mode="structured"),
            plugin("echo-canary", ingress, tag="canary"),
        ],
    }


async def write_infra(infra_dir: Path = INFRA_DIR) -> Path:
    """Write echo-knative's Service as ``dispatcher deploy`` would (no cluster: file only)."""
    echo = parse_manifest(demo_manifest("http://127.0.0.1:8080"), base_dir=ROOT).plugins[0]
    deployer = KnativeProvider(infra_dir=infra_dir).deployer()
    await deployer.apply(echo, echo.target)
    return deployer.path(echo.target)


async def attempt(dispatcher: Dispatcher, plugin_id: str, method: str, params: Any) -> None:
    started = time.perf_counter()
    try:
        result = await dispatcher.call(plugin_id, method, params, caller="demo")
    except DispatchError as error:
        result = f"{type(error).__name__}: {error}"
    elapsed = (time.perf_counter() - started) * 1000
    print(
        f"  {plugin_id + '.' + method + '(' + orjson.dumps(params).decode() + ')':<52} → {result}  [{elapsed:.0f} ms]"
    )


async def main() -> None:
    stable = revision("echo-1-0-0", "hello from revision echo-1-0-0")
    canary = revision("echo-1-1-0", "hello from the canary echo-1-1-0")
    async with KnativeStandIn(idle_seconds=3.0) as cluster:
        cluster.add_service("echo", stable, namespace="plugins", tags={"canary": canary})
        manifest = parse_manifest(demo_manifest(cluster.url), base_dir=ROOT)
        async with Dispatcher(manifest) as dispatcher:
            provider = dispatcher.providers["knative"]
            assert isinstance(provider, KnativeProvider)
            print(f"\nKnative stand-in at {cluster.url}; every revision starts at zero.")
            print("\necho.plugins.example.com (binary CloudEvents):")
            await attempt(dispatcher, "echo-knative", "say", {"text": "cold"})
            await attempt(dispatcher, "echo-knative", "say", {"text": "warm"})
            await attempt(dispatcher, "echo-knative", "withdraw", {"amount": 500})
            print("\nthe same service, structured CloudEvents:")
            await attempt(dispatcher, "echo-structured", "say", {"text": "structured"})
            print("\ncanary-echo.plugins.example.com (the canary tag's revision):")
            await attempt(dispatcher, "echo-canary", "say", {"text": "canary"})
            print(f"\n  {provider!r}")
            print("\nidle for 3 s: the stand-in scales both revisions to zero ...")
            await cluster.wait_scaled_to_zero(stable)
            await cluster.wait_scaled_to_zero(canary)
            await attempt(dispatcher, "echo-knative", "say", {"text": "cold again"})
            print(f"  {provider!r}")
            print("\n`dispatcher deploy --dry-run` for echo-knative:\n")
            echo = dispatcher.manifest.plugins[0]
            print((await provider.deployer().plan(echo, echo.target)).render())


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-infra"]:
        print(f"wrote {asyncio.run(write_infra())}")
    else:
        asyncio.run(main())
