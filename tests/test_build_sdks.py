"""scripts/build-sdks.sh, which `make sdks` runs: builds side by side, at most SDK_BUILD_JOBS
at a time, each one's output whole, every failure named."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build-sdks.sh"


def build(folder: Path, name: str, text: str) -> str:
    script = folder / f"{name}.sh"
    script.write_text(text)
    return str(script)


def run(folder: Path, *builds: str, jobs: str | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ}
    environment.pop("SDK_BUILD_JOBS", None)
    if jobs is not None:
        environment["SDK_BUILD_JOBS"] = jobs
    return subprocess.run(
        ["bash", str(SCRIPT), *builds],
        cwd=folder, env=environment, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_no_more_builds_run_at_once_than_the_slots(tmp_path: Path) -> None:
    # Each build is in a shared folder while it runs and counts those there halfway through.
    counting = (
        "mkdir -p running; touch running/$$; sleep 0.2; ls running | wc -l >> most;"
        " sleep 0.2; rm running/$$; echo done {name}\n"
    )
    builds = [build(tmp_path, f"b{i}", counting.format(name=f"b{i}")) for i in range(5)]
    ran = run(tmp_path, *builds)
    assert ran.returncode == 0, ran.stderr
    assert max(int(n) for n in (tmp_path / "most").read_text().split()) == 2
    for i, script in enumerate(builds):
        assert f"== {script}: exit 0 after" in ran.stdout
        assert f"done b{i}" in ran.stdout


def test_each_build_s_output_is_printed_whole_under_its_heading(tmp_path: Path) -> None:
    slow = build(tmp_path, "slow", "echo slow-1; sleep 0.5; echo slow-2\n")
    fast = build(tmp_path, "fast", "echo fast-1; echo fast-2\n")
    ran = run(tmp_path, slow, fast)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    fast_at = lines.index(next(line for line in lines if line.startswith(f"== {fast}")))
    slow_at = lines.index(next(line for line in lines if line.startswith(f"== {slow}")))
    assert lines[fast_at + 1 : fast_at + 3] == ["fast-1", "fast-2"]
    assert lines[slow_at + 1 : slow_at + 3] == ["slow-1", "slow-2"]


def test_every_build_runs_and_each_failure_is_named(tmp_path: Path) -> None:
    first = build(tmp_path, "first", "echo broken; exit 3\n")
    second = build(tmp_path, "second", "sleep 0.2; echo built > second.out\n")
    third = build(tmp_path, "third", "exit 1\n")
    ran = run(tmp_path, first, second, third)
    assert ran.returncode == 1
    assert (tmp_path / "second.out").read_text() == "built\n", "a failure stops no other build"
    assert f"== {first}: exit 3 after" in ran.stdout and "broken" in ran.stdout
    assert ran.stderr.strip() == f"failed: {first} {third}"


@pytest.mark.parametrize("jobs", ["0", "-1", "two", "2 3", "1e3", "1000", "2\n"])
def test_slots_that_are_no_whole_number_are_refused_before_any_build(
    tmp_path: Path, jobs: str
) -> None:
    marker = build(tmp_path, "marker", "touch ran\n")
    ran = run(tmp_path, marker, jobs=jobs)
    assert ran.returncode == 2
    assert ran.stderr.startswith("SDK_BUILD_JOBS must be a whole number from 1 to 999")
    assert "Traceback" not in ran.stderr and ran.stdout == ""
    assert not (tmp_path / "ran").exists()
