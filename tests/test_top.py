"""``dispatcher top``: the figures it derives from a real dispatcher's metrics, and the
command against a real ``dispatcher serve`` process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from dispatcher import Dispatcher
from dispatcher.config import parse_manifest
from dispatcher.telemetry.metrics import exposition
from dispatcher.telemetry.snapshot import Sample, method_rows, quantile
from linchkit_plugin.errors import DispatchError
from tests.conftest import ROOT
from tests.gateway_support import echo_entry

METRICS_ON = {"telemetry": {"metrics": {"enabled": True}}}


def watched_entry() -> dict[str, Any]:
    entry = echo_entry(say={"pure": True, "cache": {"ttl_ms": 60_000}}, withdraw={}, sleep={})
    return entry


def test_quantiles_interpolate_inside_the_bucket_as_promql_does() -> None:
    buckets = [(0.001, 10.0), (0.01, 90.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert quantile(0.05, buckets) == pytest.approx(0.0005)
    assert quantile(0.5, buckets) == pytest.approx(0.001 + 0.009 * 40 / 80)
    assert quantile(0.99, buckets) == pytest.approx(0.01 + 0.09 * 9 / 10)
    assert quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert quantile(0.99, [(0.1, 1.0), (float("inf"), 100.0)]) == 0.1  # past the last bound


async def test_rates_errors_and_cache_ratio_are_those_of_the_window() -> None:
    document = {"version": 1, "plugins": [watched_entry()], **METRICS_ON}
    async with Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher:
        registry = dispatcher.telemetry.metrics.registry  # type: ignore[union-attr]
        for _ in range(5):  # before the window: must not count
            await dispatcher.call("echo", "withdraw", {"amount": 1})
        before = Sample.parse(exposition(registry, None)[0].decode(), time=10.0)
        for amount in (1, 2, 3, 500):  # one plugin error in four
            with contextlib.suppress(DispatchError):
                await dispatcher.call("echo", "withdraw", {"amount": amount})
        for _ in range(4):  # one miss, three hits
            await dispatcher.call("echo", "say", {"text": "same"})
        now = Sample.parse(exposition(registry, None)[0].decode(), time=12.0)
    rows = {row.method: row for row in method_rows(before, now)}
    assert rows["withdraw"].calls_per_s == pytest.approx(2.0)
    assert rows["withdraw"].error_ratio == pytest.approx(0.25)
    assert rows["withdraw"].p50_s is not None and rows["withdraw"].p50_s < 1
    assert rows["say"].cache_hit_ratio == pytest.approx(0.75)
    assert rows["say"].error_ratio == 0


async def test_top_once_shows_a_running_gateway_and_fails_cleanly_without_one(
    tmp_path: Path,
) -> None:
    manifest = tmp_path / "plugins.yaml"
    manifest.write_text(yaml.safe_dump({"version": 1, "plugins": [watched_entry()], **METRICS_ON}))
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'sdk' / 'python'}"}
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher.cli", "-m", str(manifest), "serve", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=environment,
    )  # fmt: skip
    try:
        assert serve.stdout is not None
        url = (await asyncio.wait_for(serve.stdout.readline(), 60)).decode().split()[-1]
        top = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dispatcher.cli", "top", "--url", url, "--once",
            "--interval", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
        )  # fmt: skip
        async with aiohttp.ClientSession() as session:
            for _ in range(20):  # while top's window is open
                async with session.post(
                    f"{url}/v1/plugins/echo/methods/say", json={"text": "hi"}
                ) as answer:
                    assert answer.status == 200
                await asyncio.sleep(0.02)
        out, err = await asyncio.wait_for(top.communicate(), 60)
        assert top.returncode == 0, err.decode()
        shown = out.decode()
        assert "echo" in shown and "say" in shown and "CALLS/S" in shown
    finally:
        serve.send_signal(signal.SIGTERM)
        await asyncio.wait_for(serve.wait(), 30)
    gone = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher.cli", "top", "--url", url, "--once",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
    )  # fmt: skip
    out, err = await asyncio.wait_for(gone.communicate(), 60)
    assert gone.returncode == 1
    assert err.decode().startswith("error: cannot read ") and "Traceback" not in err.decode()


async def test_calls_refused_before_their_chain_are_counted_under_bounded_labels() -> None:
    entry = echo_entry()  # say has a params schema
    document = {"version": 1, "plugins": [entry], **METRICS_ON}
    async with Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher:
        for plugin, method, params in (
            ("echo", "say", {"text": 7}),  # invalid params: the route is known
            ("echo", "no_such_method", {}),
            ("made-up-by-a-caller", "x", {}),
        ):
            with contextlib.suppress(DispatchError):
                await dispatcher.call(plugin, method, params)
        registry = dispatcher.telemetry.metrics.registry  # type: ignore[union-attr]
        sample = Sample.parse(exposition(registry, None)[0].decode(), time=1.0)
        errors = dispatcher.telemetry.errors.snapshot()  # type: ignore[union-attr]
    assert {k: v for k, v in sample.calls[("echo", "say")].items() if v} == {"invalid_params": 1.0}
    assert sample.calls[("echo", "?")] == {"method_not_found": 1.0}
    assert sample.calls[("?", "?")] == {"plugin_not_found": 1.0}
    assert {(count["plugin"], count["type"]) for count in errors["counts"]} == {
        ("echo", "invalid_params"),
        ("echo", "method_not_found"),
        ("?", "plugin_not_found"),
    }


async def test_a_fleet_row_shows_its_instances_and_names_are_never_markup() -> None:
    """Fleet names carry their instances in brackets, which rich would read as markup
    (and drop) unless every cell from the manifest or the gateway is escaped."""
    fleet_target = {
        "provider": "http",
        "instances": [{"url": "http://127.0.0.2:1"}, {"url": "http://127.0.0.3:1"}],
    }
    plugin = {
        "id": "echo",
        "version": "1.0.0",
        "target": fleet_target,
        # A method name cannot hold brackets; a breaker's target (an instance) can.
        "methods": {"say": {"breaker": {"fail_max": 1, "reset_timeout_ms": 60_000}}},
    }
    document = {"version": 1, "plugins": [plugin], **METRICS_ON}
    async with Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher:
        with contextlib.suppress(DispatchError):  # nothing listens: the breaker opens
            await dispatcher.call("echo", "say", {"text": "hi"})
        registry = dispatcher.telemetry.metrics.registry  # type: ignore[union-attr]
        sample = Sample.parse(exposition(registry, None)[0].decode(), time=1.0)
    from rich.console import Console

    from dispatcher.cli.top import view

    console = Console(record=True, width=300, color_system=None)
    console.print(view("http://127.0.0.1:8080 [bold]x[/bold]", sample, sample))
    shown = console.export_text()
    fleet = "http fleet [http://127.0.0.2:1, http://127.0.0.3:1] /invoke"
    assert shown.count(fleet) == 2, shown  # one row per instance, the list intact
    assert "http://127.0.0.1:8080 [bold]x[/bold]" in shown
    assert "│ open" in shown or " open" in shown
