"""The benchmark package runs and reports the figures it promises (no timing asserted)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from bench import Goal, Options, discover, merge_results, render_table, run_benchmarks


def test_every_benchmark_module_is_discovered() -> None:
    modules = discover()
    assert "http" in modules
    for module in modules.values():
        assert callable(module.run)


@pytest.mark.slow
def test_a_tiny_http_run_produces_every_figure() -> None:
    figures, goals = run_benchmarks(
        ["http"], Options(calls=40, rounds=1, quick=True), report=lambda _: None
    )
    for concurrency in (1, 64):
        for variant in ("aiohttp", "httpx", "pyreqwest", "dispatcher", "floor"):
            for unit in ("calls_per_s", "p50_us", "p99_us", "cpu_us_per_call"):
                assert figures[f"http_c{concurrency}_{variant}_{unit}"] > 0
        assert figures[f"http_c{concurrency}_ratio_to_fastest_raw"] > 0
        assert figures[f"http_c{concurrency}_ratio_to_aiohttp"] > 0
        assert f"http_c{concurrency}_p50_added_us" in figures
    assert "http_c1_p50_added_control_us" in figures
    assert figures["http_sdk_c64_dispatcher_calls_per_s"] > 0
    assert figures["http_sdk_c64_ratio_to_aiohttp"] > 0
    assert set(goals) == {
        "http_c64_ratio_to_fastest_raw",
        "http_c64_ratio_to_aiohttp",
        "http_c1_p50_added_us",
    }
    assert "http_c64_ratio_to_fastest_raw" in render_table(figures, goals)


def test_results_are_merged_not_overwritten(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"lambda_c1_p50_us": 900.0, "http_rounds": 1}))
    merge_results({"http_rounds": 3.0, "http_c1_p50_added_us": 12.5}, results)
    assert json.loads(results.read_text()) == {
        "http_c1_p50_added_us": 12.5,
        "http_rounds": 3.0,
        "lambda_c1_p50_us": 900.0,
    }


def test_goals_compare_both_ways() -> None:
    assert Goal(">=", 0.8).met(0.8)
    assert not Goal(">=", 0.8).met(0.79)
    assert Goal("<=", 20).met(19.5)
    assert not Goal("<=", 20).met(20.1)


def test_a_failing_benchmark_does_not_cost_the_others_their_figures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import types

    import bench._core

    async def broken(options: Options) -> dict[str, float]:
        raise RuntimeError("no engine here")

    async def fine(options: Options) -> dict[str, float]:
        return {"fine_calls_per_s": 1.0}

    modules = {
        "broken": types.SimpleNamespace(run=broken),
        "fine": types.SimpleNamespace(run=fine, GOALS={"fine_calls_per_s": Goal(">=", 1)}),
    }
    monkeypatch.setattr(bench._core, "discover", lambda: modules)
    reports: list[str] = []
    with pytest.raises(bench._core.BenchmarksFailed) as caught:
        run_benchmarks([], Options(), report=reports.append)
    assert caught.value.failed == ["broken"]
    figures = caught.value.figures
    assert figures.pop("fine_run_at_unix") > 0  # when it ran, for the README's goals table
    assert figures.pop("fine_python_loop_ns_at_start") > 0  # and how fast Python ran then
    assert figures == {"fine_calls_per_s": 1.0}
    assert "no engine here" in "".join(reports)


async def test_the_fleet_micro_benchmarks_produce_their_figures() -> None:
    from bench import bench_fleet

    picks = bench_fleet._pick_costs(rounds=1, picks=200)
    assert set(picks) == {"fleet_pick_least_request_us", "fleet_pick_round_robin_us"}
    assert all(value > 0 for value in picks.values())
    assert await bench_fleet._step_added(rounds=1, calls=200) > -50  # a figure, not a goal


def test_a_tiny_client_comparison_produces_every_figure() -> None:
    figures, goals = run_benchmarks(
        ["http_clients"], Options(calls=40, rounds=1, quick=True), report=lambda _: None
    )
    for concurrency in (1, 64):
        for client in ("aiohttp", "pyreqwest", "dispatcher_reqwest", "dispatcher_aiohttp"):
            prefix = f"http_clients_c{concurrency}_{client}"
            assert figures[f"{prefix}_calls_per_s"] > 0
            assert figures[f"{prefix}_cpu_us_per_call"] > 0
        assert figures[f"http_clients_c{concurrency}_dispatcher_reqwest_ratio_to_aiohttp"] > 0
    assert set(goals) <= set(figures)


async def test_the_grpc_sdk_variants_produce_every_figure() -> None:
    """``bench grpc``'s other SDKs beside Go's, here with answers ready at once and this
    process's CPU standing for each server's: the figures, not their values."""
    from bench import bench_grpc

    async def answer() -> None:
        return None

    def side(sdk: str) -> Any:
        return bench_grpc._Side(sdk, os.getpid(), answer, answer)

    figures = await bench_grpc._compare_sdks(
        side("go"), [side("rust"), side("java")], calls=20, quick=True
    )
    expected = {"grpc_go_raw_c64_server_cpu_us", "grpc_go_raw_c1_p50_10kb_us"}
    for sdk in ("rust", "java"):
        expected |= {
            f"grpc_{sdk}_raw_{figure}"
            for figure in (
                "c1_calls_per_s",
                "c64_calls_per_s",
                "c64_ratio_to_go",
                "c64_server_cpu_us",
                "c1_p50_us",
                "c1_p50_over_go_us",
                "c1_p50_10kb_us",
                "c1_p50_10kb_over_go_us",
            )
        }
    assert set(figures) == expected
    assert figures["grpc_rust_raw_c64_calls_per_s"] > 0
