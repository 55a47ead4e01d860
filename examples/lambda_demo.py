"""The example plugin as an AWS Lambda function, offline (`make demo-lambda`).

Starts the local Lambda (moto's server and the real Lambda runtime in Docker: the same
`LocalLambdaServer` that `dispatcher local-lambda` runs), deploys the example plugin with `dispatcher deploy`'s code (twice: the second run changes nothing),
then calls it through the dispatcher, errors included.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dispatcher import Dispatcher, DispatchError, Invocation  # noqa: E402
from dispatcher.testing.lambda_kit import deploy_manifest  # noqa: E402
from dispatcher.testing.local_lambda import FAKE_CREDENTIALS, LocalLambdaServer  # noqa: E402
from providers.deploy import Step  # noqa: E402

MANIFEST: dict[str, Any] = {
    "version": 1,
    "plugins": [
        {
            "id": "echo-lambda",
            "version": "1.0.0",
            "config": {"greeting": "hello from Lambda"},
            "target": {
                "provider": "lambda",
                "function_name": "echo-plugin",
                "qualifier": "live",
                "deploy": {
                    "role": "arn:aws:iam::123456789012:role/linchkit-plugin",
                    "entrypoint": "echo_plugin:EchoPlugin",
                    "path": "examples/python",
                },
            },
            "defaults": {"timeout_ms": 30000},
            "methods": {"say": {}, "digest": {}, "sleep": {}, "withdraw": {}},
        }
    ],
}


def show(label: str, value: Any) -> None:
    print(f"  {label:<44} → {value}")


async def attempt(dispatcher: Dispatcher, method: str, params: Any, **options: Any) -> None:
    started = time.perf_counter()
    try:
        result = await dispatcher.call("echo-lambda", method, params, **options)
    except DispatchError as error:
        result = f"{type(error).__name__}: {error}"
    show(
        f"echo-lambda.{method}({params})",
        f"{result}  [{(time.perf_counter() - started) * 1000:.0f} ms]",
    )


def progress(step: Step) -> None:
    print(f"  {step.render()}")


async def main() -> None:
    async with LocalLambdaServer() as server:
        local = server.front
        print(f"local Lambda at {local.url} (moto at {server.control_plane_url})\n\ndeploy:")
        manifest = await deploy_manifest(MANIFEST, local.url, base_dir=ROOT, progress=progress)
        print("deploy again:")
        await deploy_manifest(MANIFEST, local.url, base_dir=ROOT, progress=progress)
        async with Dispatcher(manifest) as dispatcher:
            print("\ncalls (the first one is a cold start):")
            await attempt(dispatcher, "say", {"text": "hi"}, caller="demo")
            await attempt(dispatcher, "say", {"text": "warm"}, caller="demo")
            await attempt(dispatcher, "digest", {"data": "abc", "rounds": 20000})
            await attempt(dispatcher, "withdraw", {"amount": 500})
            await attempt(dispatcher, "sleep", {"seconds": 5}, timeout=0.5)
            await attempt(dispatcher, "nope", {})

            print("\none batch, one Lambda invocation:")
            provider = dispatcher.providers["lambda"]
            target = manifest.plugins[0].target
            batch = [
                Invocation(
                    "echo-lambda",
                    "1.0.0",
                    "say",
                    {"text": str(i)},
                    asyncio.get_running_loop().time() + 10,
                    f"b{i}",
                )
                for i in range(5)
            ]
            before = local.invocations
            outcomes = await provider.invoke_batch(target, batch)
            show("5 calls", [outcome.unwrap()["text"] for outcome in outcomes])
            show("Lambda invocations", local.invocations - before)

            print("\nhealth:")
            for report in await dispatcher.health():
                show(
                    f"{report.plugin}@{report.version} {report.target}",
                    f"{report.health.status} ({report.health.detail})",
                )
        print(f"\n{local!r}")


if __name__ == "__main__":
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    for name, value in FAKE_CREDENTIALS.items():
        os.environ.setdefault(name, value)
    asyncio.run(main())
