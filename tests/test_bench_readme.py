"""The README's goals table is what ``bench/results.json`` says (``bench/readme.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import Goal
from bench._core import interpreter_ns_per_loop
from bench.readme import (
    BEGIN,
    END,
    README_PATH,
    declared_goals,
    main,
    render_goals,
    updated_readme,
)


def test_the_readme_s_goals_table_matches_results_json() -> None:
    # A benchmark run that moved a figure rewrites the table (python -m bench); a hand edit
    # of results.json, or of the table, is caught here.
    assert main(["--check"]) == 0, "run `python -m bench.readme` and commit the README"


def test_every_declared_goal_has_a_row() -> None:
    readme = README_PATH.read_text(encoding="utf-8")
    table = readme[readme.index(BEGIN) : readme.index(END)]
    for declared in declared_goals().values():
        for figure in declared:
            assert f"`{figure}`" in table


def test_a_row_says_met_missed_or_not_measured_with_the_load_and_the_time() -> None:
    results = {
        "x_ratio": 0.91,
        "x_added_us": 30.0,
        "x_load_average_1min_at_start": 0.4,
        "x_sub_load_average_1min_at_start": 3.0,
        "x_run_at_unix": 1_796_190_000.0,
    }
    goals = {
        "x": {
            "x_ratio": Goal(">=", 0.9),
            "x_added_us": Goal("<=", 25.0),
            "x_sub_gone_us": Goal("<=", 1.0),
        }
    }
    rows = render_goals(results, goals).splitlines()
    assert "| x | `x_ratio` | 0.91 | >= 0.9 | ✔ | 0.4 | — | 2026-12-02 " in rows[4]
    assert "| x | `x_added_us` | 30 | <= 25 | ✘ | 0.4 | — |" in rows[5]
    # The longest prefix's load: the sub-benchmark's, not the benchmark's.
    assert "| x | `x_sub_gone_us` | — | <= 1 | not measured | 3.0 | " in rows[6]
    # A run since the interpreter's speed is recorded shows it.
    results["x_python_loop_ns_at_start"] = 112.4
    rows = render_goals(results, goals).splitlines()
    assert "| x | `x_ratio` | 0.91 | >= 0.9 | ✔ | 0.4 | 112 ns | 2026-12-02 " in rows[4]


def test_a_run_records_how_fast_the_machine_ran_python_when_it_began() -> None:
    speed = interpreter_ns_per_loop()
    # A bare loop iteration: tens of nanoseconds on any machine that runs the suite, and
    # never zero (the loop is not optimised away).
    assert 1.0 < speed < 10_000.0


def test_a_readme_without_the_markers_is_refused_not_appended_to() -> None:
    with pytest.raises(ValueError, match="no goals table"):
        updated_readme("# a README\n", "table")
    with pytest.raises(ValueError, match="no goals table"):
        updated_readme(f"{END}\n{BEGIN}\n", "table")


def test_check_fails_on_a_stale_table_and_a_rewrite_mends_it(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"http_c64_ratio_to_aiohttp": 2.5}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{BEGIN}\nold\n{END}\n\nrest\n", encoding="utf-8")
    paths = ["--results", str(results), "--readme", str(readme)]
    assert main(["--check", *paths]) == 1
    assert main(paths) == 0
    assert main(["--check", *paths]) == 0
    text = readme.read_text(encoding="utf-8")
    assert "| http | `http_c64_ratio_to_aiohttp` | 2.5 | >= 2 | ✔ |" in text
    assert text.startswith("# title\n\n") and text.endswith("\n\nrest\n")
