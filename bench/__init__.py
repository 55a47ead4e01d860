"""The dispatcher's benchmarks: ``python -m bench [NAME ...]`` (``make bench`` runs them all).

Each benchmark is a module ``bench/bench_<name>.py`` (or ``bench/<name>_bench.py``) exposing

    async def run(options: bench.Options) -> dict[str, float]   # figure name -> number
    GOALS: dict[str, bench.Goal]                                  # optional

and nothing else needs registering: ``python -m bench`` finds every such module, runs each
on a fresh uvloop event loop, prints one table, and merges the figures into
``bench/results.json`` (a flat object; figures of benchmarks not run this time are kept).
Figure names start with the benchmark's name and carry their unit (``_calls_per_s``,
``_us``, ``_ratio``...).
"""

from bench._core import (
    RESULTS_PATH,
    Goal,
    Options,
    discover,
    merge_results,
    pinned_to_cpu,
    render_table,
    run_benchmarks,
)

__all__ = [
    "RESULTS_PATH",
    "Goal",
    "Options",
    "discover",
    "merge_results",
    "pinned_to_cpu",
    "render_table",
    "run_benchmarks",
]
