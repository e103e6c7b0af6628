"""bench/gpu_session.sh and bench/gpu_sweep.sh in their dry runs (on the CPU at tiny shapes, Triton
under its interpreter): every stage writes its result under $OUT, within what a GPU call brings
back, and what could not run here says so instead of "ok". Structure only: no time is asserted
(the scripts' own deadlines bound them)."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

from bench.session import STAGES

REPO = Path(__file__).resolve().parents[1]
MAX_FILES, MAX_FILE_BYTES, MAX_TOTAL_BYTES, MAX_FOLDERS_DOWN = 8, 16 * 2**20, 64 * 2**20, 2
NAME = re.compile(r"[A-Za-z0-9._-]+")
DRY_RUN_STATUS = {
    "environment": "partial", "extension": "partial", "compile-check": "ok", "triton-tests": "partial",
    "cuda-tests": "skipped", "microbench": "partial", "timings": "partial",
}
"""What each stage can honestly say on a machine without a GPU."""


def dry_run(script: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    return subprocess.run(["bash", str(REPO / "bench" / script), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def assert_within_what_comes_back(out: Path) -> None:
    """At most 8 files, 16 MiB each and 64 MiB together, at most 2 folders down, plain names."""
    files = [path for path in out.rglob("*") if path.is_file()]
    assert 0 < len(files) <= MAX_FILES, sorted(p.name for p in files)
    for path in out.rglob("*"):
        parts = path.relative_to(out).parts
        assert len(parts) <= MAX_FOLDERS_DOWN + 1, path
        assert all(NAME.fullmatch(part) for part in parts), path
    assert all(path.stat().st_size <= MAX_FILE_BYTES for path in files)
    assert sum(path.stat().st_size for path in files) <= MAX_TOTAL_BYTES


def last_status(path: Path) -> str:
    return [line for line in path.read_text().splitlines() if line.startswith("STATUS: ")][-1][len("STATUS: "):]


def test_the_gpu_session_dry_run_writes_every_stage_and_says_what_did_not_run(tmp_path):
    out = tmp_path / "out"
    done = dry_run("gpu_session.sh", out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_within_what_comes_back(out)
    assert sorted(path.name for path in out.iterdir()) == ["0-summary.txt"] + [
        f"{number}-{stage}.txt" for number, stage in enumerate(STAGES, 1)]
    summary = (out / "0-summary.txt").read_text().splitlines()
    for number, stage in enumerate(STAGES, 1):
        status = last_status(out / f"{number}-{stage}.txt")
        assert status.split(" — ")[0] == DRY_RUN_STATUS[stage], (stage, status)
        assert any(line.startswith(f"{number} {stage}: {status}") for line in summary), (stage, summary)
    assert "GPU-marked tests (and the 2³¹-element one) were skipped (no GPU)" in last_status(out / "4-triton-tests.txt")
    assert "passed" in last_status(out / "4-triton-tests.txt")
    assert "the selections collect" in last_status(out / "5-cuda-tests.txt")
    assert "cuda unavailable" in last_status(out / "7-timings.txt")
    assert "PREDICTED" in (out / "7-timings.txt").read_text()


def test_the_gpu_sweep_dry_run_keeps_its_rows_and_draws_them(tmp_path):
    out = tmp_path / "out"
    done = dry_run("gpu_sweep.sh", out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_within_what_comes_back(out)
    summary = (out / "0-summary.txt").read_text()
    for step in ("extension", "compile", "sweep", "report"):
        assert f"{step}: exit 0" in summary, summary
    sweep = (out / "3-sweep.txt").read_text()
    assert sweep.count("unavailable: triton:") == 1 and sweep.count("unavailable: cuda:") == 1
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(row["provider"], row["status"]) for row in rows] == [("torch", "ok"), ("torch", "ok")]
    assert len(list(out.glob("*.png"))) == 1 and len(list(out.glob("*.md"))) == 1
