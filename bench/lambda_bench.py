"""Lambda invoke latency and throughput: through the dispatcher vs. aiobotocore alone.

Runs offline on the local Lambda (``dispatcher.testing.local_lambda``): moto's server for
the control plane, the example plugin deployed by ``dispatcher deploy``'s code, and its
handler run by the real Lambda runtime (awslambdaric under aws-lambda-rie) in Docker.
So the figures are this machine's loopback + container, not AWS's network; what they
compare fairly is the client side: the same function, the same envelope, the same local
endpoint, with and without the dispatcher on top of aiobotocore.

    python bench/lambda_bench.py            # alone: prints the flat JSON results
    python -m bench lambda                  # through the harness (make bench runs all)
    (needs Docker and the runtime image: `make lambda-runtime`)

Keys (milliseconds unless named ``_per_s`` or ``_bytes``):
    lambda_zip_bytes                                 the example plugin's deploy zip
    lambda_cold_start_ms                             = lambda_cold_ms_dispatcher: what a
                                                     caller waits for a new environment
    lambda_cold_ms_{dispatcher,aiobotocore}          median first invoke on a new environment
    lambda_warm_p50_ms_{dispatcher,aiobotocore}      warm invoke latency, sequential
    lambda_warm_p99_ms_{dispatcher,aiobotocore}
    lambda_unbatched_calls_per_s                     64 calls, one invoke each, 4 at a time
    lambda_batched_calls_per_s                       64 calls, one batch-envelope invoke
    lambda_unbatched_cold_starts                     cold starts during the unbatched run (0)

``lambda_zip_bytes_before`` and ``lambda_cold_start_ms_before`` in ``results.json`` are the
same two figures for commit 7da37ab, whose zip vendored the whole host (``dispatcher``,
``providers`` and their dependency tree): measured once, with this file's method and
``--rounds 7``, from a worktree of that commit; this benchmark does not write them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "python"
ROLE = "arn:aws:iam::123456789012:role/linchkit-plugin"
FUNCTION = "bench-echo"


def _manifest() -> dict[str, Any]:
    return {
        "version": 1,
        "plugins": [
            {
                "id": "echo-lambda",
                "version": "1.0.0",
                "config": {"greeting": "bench"},
                "target": {
                    "provider": "lambda",
                    "function_name": FUNCTION,
                    "deploy": {
                        "role": ROLE,
                        "entrypoint": "echo_plugin:EchoPlugin",
                        "path": str(EXAMPLES),
                    },
                },
                "methods": {"say": {}},
            }
        ],
    }


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run(options: Any = None) -> dict[str, float]:
    """Measure and return the flat results (see the module docstring).

    ``options`` is ``bench.Options`` when run by ``python -m bench``: ``calls`` sets the
    warm samples per path (default 200), ``rounds`` the cold ones (default 3), ``quick``
    makes it 20 and 1.
    """
    quick = bool(getattr(options, "quick", False))
    warm_samples = getattr(options, "calls", None) or (20 if quick else 200)
    cold_samples = getattr(options, "rounds", None) or (1 if quick else 3)
    sys.path.insert(0, str(ROOT))
    from moto.server import ThreadedMotoServer

    from dispatcher import Dispatcher, Invocation
    from dispatcher.testing.lambda_kit import FAKE_CREDENTIALS, deploy_manifest
    from dispatcher.testing.local_lambda import LocalLambda
    from providers.aws_lambda import LambdaProvider, LambdaTarget
    from providers.aws_lambda.package import build_package
    from providers.invocation import new_request_id

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    for name, value in FAKE_CREDENTIALS.items():
        os.environ.setdefault(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    results: dict[str, float] = {}
    try:
        async with LocalLambda(f"http://{host}:{port}", max_environments=8) as local:
            manifest = await deploy_manifest(_manifest(), local.url, base_dir=ROOT)
            plugin = manifest.plugins[0]
            target = plugin.target
            assert isinstance(target, LambdaTarget)
            results["lambda_zip_bytes"] = float(len(build_package(plugin, target).zip_bytes))
            async with Dispatcher(manifest) as dispatcher, LambdaProvider() as provider:
                client = await provider.client(target)

                async def through_dispatcher() -> None:
                    await dispatcher.call("echo-lambda", "say", {"text": "x"})

                async def aiobotocore_alone() -> None:
                    payload = {
                        "v": 1,
                        "plugin": "echo-lambda",
                        "method": "say",
                        "params": {"text": "x"},
                        "context": {"request_id": new_request_id(), "deadline_ms": 30000},
                    }
                    answer = await client.invoke(
                        FunctionName=FUNCTION, Payload=json.dumps(payload).encode()
                    )
                    body = json.loads(await answer["Payload"].read())
                    assert body["ok"], body

                paths = {"dispatcher": through_dispatcher, "aiobotocore": aiobotocore_alone}

                # Cold: a configuration change makes Lambda (and the local Lambda) start a
                # new execution environment; time only the first invoke after it.
                cold: dict[str, list[float]] = {name: [] for name in paths}
                for sample in range(cold_samples):
                    for name, call in paths.items():
                        await client.update_function_configuration(
                            FunctionName=FUNCTION,
                            Environment={"Variables": {"BENCH_SAMPLE": f"{name}-{sample}"}},
                        )
                        started = time.perf_counter()
                        await call()
                        cold[name].append((time.perf_counter() - started) * 1000)
                for name, values in cold.items():
                    results[f"lambda_cold_ms_{name}"] = round(statistics.median(values), 1)
                results["lambda_cold_start_ms"] = results["lambda_cold_ms_dispatcher"]

                # Warm: the same environment, sequential calls, interleaved paths.
                warm: dict[str, list[float]] = {name: [] for name in paths}
                for call in paths.values():
                    for _ in range(10):
                        await call()
                for _ in range(warm_samples):
                    for name, call in paths.items():
                        started = time.perf_counter()
                        await call()
                        warm[name].append((time.perf_counter() - started) * 1000)
                for name, values in warm.items():
                    results[f"lambda_warm_p50_ms_{name}"] = round(_percentile(values, 0.5), 2)
                    results[f"lambda_warm_p99_ms_{name}"] = round(_percentile(values, 0.99), 2)

                # Batched vs unbatched: 64 logical calls.
                calls = 64
                gate = asyncio.Semaphore(4)

                async def one() -> None:
                    async with gate:
                        await through_dispatcher()

                await asyncio.gather(*(one() for _ in range(8)))  # warm 4 environments
                cold_starts = local.cold_starts
                started = time.perf_counter()
                await asyncio.gather(*(one() for _ in range(calls)))
                results["lambda_unbatched_calls_per_s"] = round(
                    calls / (time.perf_counter() - started), 1
                )
                # Should be 0: the measured calls found warm environments.
                results["lambda_unbatched_cold_starts"] = float(local.cold_starts - cold_starts)
                invocations = [
                    Invocation(
                        plugin="echo-lambda",
                        version="1.0.0",
                        method="say",
                        params={"text": str(index)},
                        deadline=asyncio.get_running_loop().time() + 30,
                        request_id=new_request_id(),
                    )
                    for index in range(calls)
                ]
                await provider.invoke_batch(target, invocations)  # warm
                started = time.perf_counter()
                outcomes = await provider.invoke_batch(target, invocations)
                results["lambda_batched_calls_per_s"] = round(
                    calls / (time.perf_counter() - started), 1
                )
                assert all(outcome.ok for outcome in outcomes)
    finally:
        server.stop()
    return results


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run()), indent=2))
