"""A real Prometheus scrapes a running dispatcher's /metrics and answers PromQL about it.

Prometheus is Debian's package (``infra/services/install.sh``, ``make services-prereqs``),
started by the test on a free loopback port with a scrape interval of one second; the
dispatcher's registry is served by ``metrics_handler`` on 127.0.0.1, and by a gateway's
admin listener behind a bearer token (``telemetry.metrics.listen``, ``token_env``), which
Prometheus sends from a ``credentials_file`` as operators configure it.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from dispatcher import Dispatcher, parse_manifest
from dispatcher.gateway import GatewayServer, GatewaySettings, scrape
from dispatcher.telemetry import metrics_handler
from linchkit_plugin.errors import CircuitOpen, PluginError, TargetUnavailable
from tests.conftest import ROOT, bound_socket
from tests.services import free_port
from tests.test_gateway_tls import write_pair
from tests.test_telemetry import TRACED_TARGET, closed_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
#: A slow 2-core machine under a full test run: Prometheus may take a while to start and
#: to scrape; the assertions wait for the right answer, never for a fixed time.
PATIENCE = 120.0

pytestmark = pytest.mark.skipif(
    not Path(PROMETHEUS).exists(), reason="needs Prometheus: make services-prereqs"
)


@pytest.fixture
async def served_metrics() -> AsyncIterator[tuple[Dispatcher, int]]:
    """A dispatcher with metrics on, its /metrics on 127.0.0.1; yields it and the port."""
    down = closed_port()
    manifest = parse_manifest(
        {
            "version": 1,
            "telemetry": {"metrics": {"enabled": True}},
            "plugins": [
                {
                    "id": "traced",
                    "version": "1.0.0",
                    "target": TRACED_TARGET,
                    "methods": {"context": {}, "fail": {}},
                },
                {
                    "id": "down",
                    "version": "1.0.0",
                    "target": {"provider": "http", "url": f"http://127.0.0.1:{down}"},
                    "defaults": {"breaker": {"fail_max": 3, "reset_timeout_ms": 600_000}},
                    "methods": {"say": {}},
                },
            ],
        },
        base_dir=ROOT,
    )
    async with Dispatcher(manifest) as dispatcher:
        assert dispatcher.telemetry is not None
        assert dispatcher.telemetry.metrics is not None
        app = web.Application()
        app.router.add_get("/metrics", metrics_handler(dispatcher.telemetry.metrics.registry))
        runner = web.AppRunner(app)
        await runner.setup()
        sock = bound_socket()
        site = web.SockSite(runner, sock)
        await site.start()
        try:
            yield dispatcher, int(sock.getsockname()[1])
        finally:
            await runner.cleanup()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    """Start Prometheus scraping a given port; yields a function doing that, returning its URL."""
    started: list[subprocess.Popen[bytes]] = []

    def start(scraped_port: int | None = None, *, jobs: str | None = None) -> str:
        """Scrape 127.0.0.1:``scraped_port`` as job ``dispatcher``, or ``jobs`` (the
        ``scrape_configs`` list, as YAML)."""
        if jobs is None:
            jobs = (
                "  - job_name: dispatcher\n"
                "    scrape_interval: 1s\n"
                f"    static_configs: [{{targets: ['127.0.0.1:{scraped_port}']}}]\n"
            )
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\nscrape_configs:\n" + jobs
        )
        port = free_port()
        with (tmp_path / "prometheus.log").open("wb") as log:  # the child keeps its own copy
            started.append(
                subprocess.Popen(
                    [
                        PROMETHEUS,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={tmp_path / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--log.level=warn",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            )
        return f"http://127.0.0.1:{port}"

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


async def query_until(base: str, promql: str, expected: float, process_log: Path) -> None:
    """Ask Prometheus ``promql`` until its one result is ``expected``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE
    last: Any = None
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            try:
                async with session.get(
                    f"{base}/api/v1/query",
                    params={"query": promql},
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as response:
                    last = await response.json()
            except (aiohttp.ClientError, TimeoutError) as error:
                last = repr(error)  # not up yet
            else:
                result = last.get("data", {}).get("result", [])
                if len(result) == 1 and float(result[0]["value"][1]) == expected:
                    return
            await asyncio.sleep(0.5)
    log = _tail(process_log)
    pytest.fail(f"{promql} never returned {expected}; last answer: {last}\n{log}")


async def test_prometheus_scrapes_call_counts_and_a_breaker_state(
    served_metrics: tuple[Dispatcher, int], prometheus: Any, tmp_path: Path
) -> None:
    dispatcher, port = served_metrics
    base = prometheus(port)
    for _ in range(5):
        await dispatcher.call("traced", "context")
    for _ in range(2):
        with pytest.raises(PluginError):
            await dispatcher.call("traced", "fail", {"name": "Nope"})
    for _ in range(3):
        with pytest.raises(TargetUnavailable):
            await dispatcher.call("down", "say", {"text": "hi"})
    with pytest.raises(CircuitOpen):
        await dispatcher.call("down", "say", {"text": "hi"})

    log = tmp_path / "prometheus.log"
    await query_until(
        base, 'sum(dispatcher_calls_total{plugin="traced",method="context",outcome="ok"})', 5, log
    )
    await query_until(base, 'sum(dispatcher_calls_total{plugin="traced",outcome!="ok"})', 2, log)
    await query_until(
        base,
        'sum by (outcome) (dispatcher_calls_total{plugin="down",outcome="circuit_open"})',
        1,
        log,
    )
    await query_until(base, 'dispatcher_breaker_state{state="open"}', 1, log)
    await query_until(
        base, 'dispatcher_breaker_transitions_total{from_state="closed",to_state="open"}', 1, log
    )
    # The histogram is usable as Prometheus users use it.
    await query_until(
        base,
        'histogram_quantile(0.5, sum by (le) (dispatcher_call_duration_seconds_bucket{plugin="traced"})) > bool 0',
        1,
        log,
    )


async def test_prometheus_scrapes_the_admin_port_with_the_token_from_a_credentials_file(
    prometheus: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scrape config docs/observability.md shows: ``authorization: {credentials_file}``
    sends ``Authorization: Bearer <the file's content>`` (written with the trailing newline
    of ``echo``, which Prometheus trims). A job without it is refused: ``up`` is 0."""
    token = "pr0metheus-scrape-token-9d2e"
    monkeypatch.setenv("LINCHKIT_SCRAPE_TOKEN", token)
    credentials = tmp_path / "dispatcher-scrape-token"
    credentials.write_text(token + "\n")
    credentials.chmod(0o600)
    document = {
        "version": 1,
        "telemetry": {
            "metrics": {
                "enabled": True,
                "listen": "127.0.0.13:0",
                "token_env": "LINCHKIT_SCRAPE_TOKEN",
            }
        },
        "plugins": [
            {
                "id": "traced",
                "version": "1.0.0",
                "target": TRACED_TARGET,
                "methods": {"context": {}},
            }
        ],
    }
    async with (
        Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher,
        GatewayServer(dispatcher, GatewaySettings(port=0)) as server,
    ):
        assert server.admin is not None
        admin = server.admin.url.removeprefix("http://")
        base = prometheus(
            jobs=(
                "  - job_name: dispatcher\n"
                "    scrape_interval: 1s\n"
                "    authorization:\n"
                f"      credentials_file: {credentials}\n"
                f"    static_configs: [{{targets: ['{admin}']}}]\n"
                "  - job_name: no-token\n"
                "    scrape_interval: 1s\n"
                f"    static_configs: [{{targets: ['{admin}']}}]\n"
                "  - job_name: gateway-port\n"
                "    scrape_interval: 1s\n"
                "    authorization:\n"
                f"      credentials_file: {credentials}\n"
                f"    static_configs: [{{targets: ['{server.url.removeprefix('http://')}']}}]\n"
            )
        )
        for _ in range(3):
            await dispatcher.call("traced", "context")
        log = tmp_path / "prometheus.log"
        await query_until(
            base, 'sum(dispatcher_calls_total{job="dispatcher",plugin="traced"})', 3, log
        )
        await query_until(
            base, 'dispatcher_gateway_connections{job="dispatcher",port="admin"} > bool 0', 1, log
        )
        await query_until(base, 'up{job="dispatcher"}', 1, log)
        await query_until(base, 'up{job="no-token"}', 0, log)  # 401
        await query_until(base, 'up{job="gateway-port"}', 0, log)  # 404: not served there
        await _until_target_error(base, "no-token", "401", log)
        await _until_target_error(base, "gateway-port", "404", log)
    assert token not in _tail(log)


async def _until_target_error(base: str, job: str, status: str, process_log: Path) -> None:
    """Prometheus reports job's target down with ``status`` in its last error."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE
    last: Any = None
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            async with session.get(f"{base}/api/v1/targets") as response:
                last = await response.json()
            for target in last["data"]["activeTargets"]:
                if target["labels"]["job"] == job and status in target["lastError"]:
                    return
            await asyncio.sleep(0.5)
    pytest.fail(f"{job} never failed with {status}; last answer: {last}\n{_tail(process_log)}")


def _tail(path: Path) -> str:
    """The end of Prometheus' log, to explain a failure (read once, as the test ends)."""
    return path.read_text(errors="replace")[-2000:] if path.exists() else ""


async def test_prometheus_scrapes_the_admin_port_over_tls_while_the_token_file_rotates(
    prometheus: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``telemetry.metrics.tls`` and ``token_file`` as docs/observability.md shows them:
    Prometheus scrapes over HTTPS (``tls_config: {ca_file}``) with ``credentials_file``
    the very file the dispatcher reads its token from. The file is rotated (written aside,
    renamed over) while Prometheus scrapes every second: no scrape fails (``up`` never 0),
    and a job still sending the old token is refused once the grace (1 s here) is over."""
    monkeypatch.setattr(scrape, "TOKEN_FILE_GRACE_SECONDS", 1.0)
    ca = trustme.CA()
    cert, key = write_pair(tmp_path, ca.issue_cert("127.0.0.15"))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    credentials, old_credentials = tmp_path / "scrape-credential", tmp_path / "old-credential"
    first, second = "f1rst-file-scrape-token-31b7", "s2cond-file-scrape-token-c04d"
    for path in (credentials, old_credentials):
        path.write_text(first + "\n")
    document = {
        "version": 1,
        "telemetry": {
            "metrics": {
                "enabled": True,
                "listen": "127.0.0.15:0",
                "token_file": str(credentials),
                "tls": {"cert": str(cert), "key": str(key)},
            }
        },
        "plugins": [
            {
                "id": "traced",
                "version": "1.0.0",
                "target": TRACED_TARGET,
                "methods": {"context": {}},
            }
        ],
    }
    async with (
        Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher,
        GatewayServer(dispatcher, GatewaySettings(port=0)) as server,
    ):
        assert server.admin is not None
        admin = server.admin.url.removeprefix("https://")

        def job(name: str, credentials: Path) -> str:
            return (
                f"  - job_name: {name}\n"
                "    scrape_interval: 1s\n"
                "    scheme: https\n"
                f"    tls_config: {{ca_file: {ca_file}}}\n"
                "    authorization:\n"
                f"      credentials_file: {credentials}\n"
                f"    static_configs: [{{targets: ['{admin}']}}]\n"
            )

        base = prometheus(jobs=job("dispatcher", credentials) + job("old-token", old_credentials))
        log = tmp_path / "prometheus.log"
        await dispatcher.call("traced", "context")
        await query_until(
            base, 'sum(dispatcher_calls_total{job="dispatcher",plugin="traced"})', 1, log
        )
        await query_until(base, 'up{job="old-token"}', 1, log)
        spare = credentials.with_name("scrape-credential.new")
        spare.write_text(second + "\n")
        spare.replace(credentials)
        for _ in range(2):
            await dispatcher.call("traced", "context")
        # Scraped with the new token since; the job that kept the old one is refused.
        await query_until(
            base, 'sum(dispatcher_calls_total{job="dispatcher",plugin="traced"})', 3, log
        )
        await _until_target_error(base, "old-token", "401", log)
        await query_until(base, 'min_over_time(up{job="dispatcher"}[10m])', 1, log)
        assert "rotations=1" in repr(server.admin)
    assert first not in _tail(log) and second not in _tail(log)
