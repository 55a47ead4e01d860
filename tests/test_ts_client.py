"""The TypeScript host client (``clients/typescript``) against real ``dispatcher serve``
processes: its own node:test suite, run here so ``make test`` runs it in CI. The suite
starts the gateways itself, with this interpreter (``LINCHKIT_PYTHON``): calls and each
error class, deadlines, API keys, JWTs from a provider, a gateway killed mid-call, input
refused before sending, the connection cap, async jobs on a Redis the suite starts, events
through a relay that is cut, a gap, and a gateway restarted on the same port."""

from __future__ import annotations

import sys

from tests.sdk_toolchains import build_typescript_client, require, run


def test_the_typescript_client_suite_passes_against_a_real_gateway() -> None:
    require("node")
    folder = build_typescript_client()
    suites = sorted(str(path) for path in (folder / "dist" / "lib" / "test").glob("*.test.js"))
    assert suites, "the build left no test suites in dist/lib/test"
    done = run(
        ["node", "--test", "--test-concurrency=1", *suites],
        folder,
        timeout=600,
        LINCHKIT_PYTHON=sys.executable,
    )
    assert done.returncode == 0, (
        f"node --test failed:\n{done.stdout[-20000:]}\n{done.stderr[-5000:]}"
    )
    assert "# fail 0" in done.stdout, done.stdout[-5000:]
