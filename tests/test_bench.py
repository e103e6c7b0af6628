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
              "--classes", "50", "300", "--repeats", "1", "--results", str(results))
    assert "skipping cut-cross-entropy: a GPU-only peer" in out
    rows = list(csv.DictReader(results.open()))
    assert [(r["provider"], r["classes"], r["status"]) for r in rows] == [("torch", "50", "ok"), ("torch", "300", "ok")]
    for row in rows:
        assert float(row["fwd_bwd_ms"]) > 0 and float(row["working_mb"]) >= 0 and row["device"] and row["torch"]
        assert float(row["tflops"]) > 0
    report = run("bench.report", "--results", str(results))
    assert len(list(tmp_path.glob("*.png"))) == 1
    (table,) = tmp_path.glob("*.md")
    assert table.read_text().count("| torch | fp32 | 8 | 16 |") == 2
    assert "wrote" in report
