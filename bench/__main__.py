"""``python -m bench [NAME ...]``: run benchmarks, print a table, merge bench/results.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench._core import (
    RESULTS_PATH,
    BenchmarksFailed,
    Options,
    discover,
    env_int,
    merge_results,
    render_table,
    run_benchmarks,
)
from bench.readme import README_PATH, declared_goals, render_goals, updated_readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run the dispatcher's benchmarks and merge their figures into bench/results.json.",
    )
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument(
        "--calls",
        "-n",
        type=int,
        default=env_int("BENCH_CALLS"),
        help="calls per measurement (env BENCH_CALLS; default: each benchmark's own)",
    )
    parser.add_argument(
        "--rounds",
        "-r",
        type=int,
        default=env_int("BENCH_ROUNDS"),
        help="interleaved rounds, figures are their medians (env BENCH_ROUNDS)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: few calls, one round")
    parser.add_argument(
        "--results", type=Path, default=RESULTS_PATH, help="JSON file to merge figures into"
    )
    parser.add_argument("--no-write", action="store_true", help="print, do not touch --results")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    arguments = parser.parse_args(argv)
    if arguments.list:
        for name, module in discover().items():
            summary = (module.__doc__ or "").strip().splitlines()[:1]
            print(f"{name:<12} {summary[0] if summary else ''}")
        return 0
    options = Options(calls=arguments.calls, rounds=arguments.rounds, quick=arguments.quick)
    failed: list[str] = []
    try:
        figures, goals = run_benchmarks(arguments.names, options)
    except BenchmarksFailed as error:
        figures, goals, failed = error.figures, error.goals, error.failed
    print()
    print(render_table(figures, goals))
    if not arguments.no_write:
        merged = merge_results(figures, arguments.results)
        print(f"\nmerged {len(figures)} figures into {arguments.results}")
        if arguments.results == RESULTS_PATH:  # the README's table reads the project's file
            _rewrite_goals_table(merged)
    missed = [
        name for name, goal in goals.items() if name in figures and not goal.met(figures[name])
    ]
    if missed:
        print(f"goals not met: {', '.join(missed)}", file=sys.stderr)
    if failed:
        print(f"benchmarks that failed (see above): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _rewrite_goals_table(results: dict[str, float]) -> None:
    readme = README_PATH.read_text(encoding="utf-8")
    updated = updated_readme(readme, render_goals(results, declared_goals()))
    if updated != readme:
        README_PATH.write_text(updated, encoding="utf-8")
        print(f"rewrote the goals table of {README_PATH}")


if __name__ == "__main__":
    sys.exit(main())
