"""What every benchmark shares: discovery, options, CPU pinning, the table, results.json."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import operator
import os
import pkgutil
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

RESULTS_PATH = Path(__file__).resolve().parent / "results.json"
#: The checkout's root (``examples/``, ``sdk/`` and the built plugins are under it).
ROOT = Path(__file__).resolve().parent.parent
_PREFIX = "bench_"
_SUFFIX = "_bench"

Figures = dict[str, float]


@dataclass(frozen=True, slots=True)
class Options:
    """What the command line says; each benchmark reads what applies to it.

    ``calls`` and ``rounds`` of ``None`` mean the benchmark's own defaults (``BENCH_CALLS``
    and ``BENCH_ROUNDS`` in the environment set them too). ``quick`` asks for a smoke run:
    the shape of every figure, none of the precision.
    """

    calls: int | None = None
    rounds: int | None = None
    quick: bool = False


@dataclass(frozen=True, slots=True)
class Goal:
    """A target a figure should meet, e.g. ``Goal(">=", 0.8)``."""

    compare: Literal[">=", "<="]
    value: float

    def met(self, figure: float) -> bool:
        compare = operator.ge if self.compare == ">=" else operator.le
        return bool(compare(figure, self.value))

    def __str__(self) -> str:
        return f"{self.compare} {self.value:g}"


def discover() -> dict[str, ModuleType]:
    """Every ``bench/bench_<name>.py`` (or ``bench/<name>_bench.py``), imported, by ``<name>``."""
    package = Path(__file__).resolve().parent
    modules: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules([str(package)]), key=lambda info: info.name):
        if info.name.startswith(_PREFIX):
            name = info.name.removeprefix(_PREFIX)
        elif info.name.endswith(_SUFFIX):
            name = info.name.removesuffix(_SUFFIX)
        else:
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if not callable(getattr(module, "run", None)):
            raise TypeError(f"bench/{info.name}.py has no 'async def run(options)'")
        modules[name] = module
    return modules


def run_benchmarks(
    names: list[str] | None, options: Options, *, report: Callable[[str], None] = print
) -> tuple[Figures, dict[str, Goal]]:
    """Run the named benchmarks (all when ``names`` is empty), each on its own uvloop loop."""
    available = discover()
    chosen = names or list(available)
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise SystemExit(
            f"unknown benchmark {', '.join(unknown)}; there are: {', '.join(available)}"
        )
    figures: Figures = {}
    goals: dict[str, Goal] = {}
    failed: list[str] = []
    for name in chosen:
        module = available[name]
        report(f"running bench {name} ...")
        speed = interpreter_ns_per_loop()
        run: Callable[[Options], Coroutine[Any, Any, Mapping[str, float]]] = module.run
        try:
            with asyncio.Runner(loop_factory=_client_loop_factory()) as runner:
                produced = runner.run(run(options))
        except Exception:
            # One benchmark that cannot run here (no Docker engine, no Go plugin built)
            # must not cost the others their figures.
            report(f"bench {name} failed:\n{traceback.format_exc()}")
            failed.append(name)
            continue
        figures.update({key: float(value) for key, value in produced.items()})
        figures[f"{name}_run_at_unix"] = time.time()  # the README's goals table says when
        figures[f"{name}{INTERPRETER_AT_START}"] = speed
        goals.update(getattr(module, "GOALS", {}))
    if failed:
        raise BenchmarksFailed(failed, figures, goals)
    return figures, goals


#: The suffix of each benchmark's ``interpreter_ns_per_loop`` when it began.
INTERPRETER_AT_START = "_python_loop_ns_at_start"

#: Iterations of one timing of ``interpreter_ns_per_loop``: ~5 ms at 50 ns each.
_LOOP_ITERATIONS = 100_000


def interpreter_ns_per_loop() -> float:
    """How fast this machine runs Python bytecode now: ns per iteration of a bare loop
    adding integers, the best of five timings (~30-60 ms in all).

    Recorded beside each benchmark's figures because the machine's speed moves them, and
    not evenly: the dispatcher's own work per call is Python, the fastest raw client's
    (pyreqwest) mostly Rust. On the same two-core machine on different days one loop
    iteration took 50-60 ns and 105-125 ns, and on the slower days the dispatcher's
    ratios to raw pyreqwest read lower for the same code. The load average says whether
    other work shared the cores; this says how fast the cores ran Python at all.
    """
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter_ns()
        total = 0
        for number in range(_LOOP_ITERATIONS):
            total += number
        best = min(best, time.perf_counter_ns() - began)
    return best / _LOOP_ITERATIONS


class BenchmarksFailed(Exception):
    """Some benchmarks raised; ``figures`` and ``goals`` are those of the others."""

    def __init__(self, failed: list[str], figures: Figures, goals: dict[str, Goal]) -> None:
        super().__init__(f"benchmarks failed: {', '.join(failed)}")
        self.failed = failed
        self.figures = figures
        self.goals = goals


def _client_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in the dev extras
        return None
    return uvloop.new_event_loop


def merge_results(figures: Mapping[str, float], path: Path = RESULTS_PATH) -> Figures:
    """Update ``path`` with ``figures``, keeping every other figure already there."""
    merged: Figures = {}
    if path.exists():
        merged.update(json.loads(path.read_text()))
    merged.update(figures)
    ordered = dict(sorted(merged.items()))
    path.write_text(json.dumps(ordered, indent=1) + "\n")
    return ordered


def render_table(figures: Mapping[str, float], goals: Mapping[str, Goal]) -> str:
    """One line per figure: name, value, goal, and whether it is met."""
    rows = [("figure", "value", "goal", "")]
    for name, value in figures.items():
        goal = goals.get(name)
        verdict = "" if goal is None else ("met" if goal.met(value) else "NOT MET")
        rows.append((name, _format(value), "" if goal is None else str(goal), verdict))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}".rstrip()
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _format(value: float) -> str:
    if value == int(value) and abs(value) >= 100:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


@contextlib.contextmanager
def pinned_to_cpu(cpu: int) -> Iterator[bool]:
    """Run this thread on ``cpu`` alone for the block, then restore its affinity.

    Yields False (and pins nothing) where the CPU is not available to this process, so a
    one-core machine still runs the benchmarks, with noisier numbers.
    """
    if not hasattr(os, "sched_setaffinity"):  # pragma: no cover - not Linux
        yield False
        return
    before = os.sched_getaffinity(0)
    if cpu not in before or len(before) < 2:
        yield False
        return
    os.sched_setaffinity(0, {cpu})
    try:
        yield True
    finally:
        os.sched_setaffinity(0, before)


def available_cpus() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))  # pragma: no cover


def env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        sys.exit(f"{name} must be an integer, not {value!r}")


def example_plugin(methods: Mapping[str, Any]) -> dict[str, Any]:
    """The Python example plugin in-process (``provider: local``), as a manifest's entry:
    what benchmarks that measure the dispatcher and nothing of a network call."""
    return {
        "id": "echo",
        "version": "1.0.0",
        "target": {
            "provider": "local",
            "entrypoint": "echo_plugin:EchoPlugin",
            "path": str(ROOT / "examples" / "python"),
        },
        "methods": dict(methods),
    }


@contextlib.contextmanager
def collector_time() -> Iterator[list[tuple[int, float]]]:
    """``(generation, CPU seconds)`` of every collection while inside (``gc.callbacks``)."""
    collections: list[tuple[int, float]] = []
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.process_time()
        else:
            collections.append((info["generation"], time.process_time() - started[0]))

    gc.callbacks.append(callback)
    try:
        yield collections
    finally:
        gc.callbacks.remove(callback)
