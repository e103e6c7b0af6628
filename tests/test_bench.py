"""`python -m bench` and `python -m bench.report` run end to end (tiny sizes; timings never asserted)."""

import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def test_bench_appends_a_row_per_provider_and_class_count_and_report_draws_them(tmp_path):
    results = tmp_path / "results.csv"
    out = run("bench", "--providers", "torch", "cut-cross-entropy", "--batch", "8", "--dim", "16",
              "--classes", "50", "300", "--dtype", "fp32", "--repeats", "1", "--results", str(results))
    assert "skipping cut-cross-entropy: a GPU-only peer" in out
    rows = list(csv.DictReader(results.open()))
    assert [(r["provider"], r["classes"], r["status"]) for r in rows] == [("torch", "50", "ok"), ("torch", "300", "ok")]
    for row in rows:
        assert float(row["fwd_bwd_ms"]) > 0 and float(row["working_mb"]) >= 0 and row["device"] and row["torch"]
        assert float(row["tflops"]) > 0
    report = run("bench.report", "--results", str(results))
    assert len(list(tmp_path.glob("*.png"))) == 1
    (table,) = tmp_path.glob("*.md")
    assert table.read_text().count("| torch | margin, normalised | fp32 | 8 | 16 |") == 2
    assert "wrote" in report


def test_the_peers_run_on_the_cpu_labelled_with_what_they_compute(tmp_path):
    """PyTorch's linear cross-entropy (chunked and not) and pytorch-metric-learning's ArcFace run
    beside the package's backends, each labelled margin or margin-free, normalised or not."""
    results = tmp_path / "results.csv"
    out = run("bench", "--providers", "torch-linear-ce", "torch-linear-ce-ref", "pytorch-metric-learning",
              "--batch", "8", "--dim", "16", "--classes", "50", "--dtype", "fp32", "bf16", "--repeats", "1",
              "--results", str(results))
    rows = list(csv.DictReader(results.open()))
    assert sorted((r["provider"], r["dtype"], r["status"]) for r in rows) == sorted(
        (p, d, "ok") for p in ("torch-linear-ce", "torch-linear-ce-ref", "pytorch-metric-learning") for d in ("fp32", "bf16")
    )
    assert out.count("margin-free, not normalised") == 4 and out.count("margin, normalised") == 2
    run("bench.report", "--results", str(results))
    table = (tmp_path / next(p.name for p in tmp_path.glob("*.md"))).read_text()
    assert "| pytorch-metric-learning | margin, normalised | bf16 |" in table
