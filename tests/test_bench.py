"""`python -m bench` runs and prints its table (tiny sizes; timings are never asserted)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_prints_a_row_per_backend_and_class_count():
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--batch", "8", "--dim", "16", "--classes", "50", "300", "--repeats", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().startswith("torch")]
    assert [row[1] for row in rows] == ["50", "300"]
    for row in rows:
        assert float(row[2]) > 0 and float(row[3]) >= 0
