"""`python -m bench` and `python -m bench.report` run end to end, keep every row as its point
finishes, and record what became of a point that did not finish (tiny sizes; timings never
asserted, only the structure of what is written)."""

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import providers, report, results, worker
from bench.process import WorkerProcess

REPO = Path(__file__).resolve().parents[1]
TINY = ["--batch", "8", "--dim", "16", "--dtype", "fp32"]


def run(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.exists() else []


def test_bench_appends_a_row_per_provider_and_class_count_and_report_draws_them(tmp_path):
    results_csv = tmp_path / "results.csv"
    out = run("bench", "--providers", "torch", "cut-cross-entropy", *TINY, "--classes", "50", "300",
              "--repeats", "2", "--results", str(results_csv))
    assert out.count("unavailable: cut-cross-entropy: a GPU-only peer") == 1
    written = rows(results_csv)
    assert [(r["provider"], r["classes"], r["status"]) for r in written] == [("torch", "50", "ok"), ("torch", "300", "ok")]
    for row in written:
        assert float(row["fwd_bwd_ms"]) > 0 and float(row["working_mb"]) >= 0 and row["device"] and row["torch"]
        assert float(row["tflops"]) > 0
        # forward and backward are marks within each timed call: their sum per call bounds both medians
        assert float(row["fwd_bwd_ms"]) >= max(float(row["fwd_ms"]), float(row["bwd_ms"]))
    drawn = tmp_path / "report"
    printed = run("bench.report", "--results", str(results_csv), "--out", str(drawn))
    assert len(list(drawn.glob("*.png"))) == 1
    (table,) = drawn.glob("*.md")
    assert table.read_text().count("| torch | margin, normalised | fp32 | 8 | 16 |") == 2
    assert "wrote" in printed


def test_the_peers_run_on_the_cpu_labelled_with_what_they_compute(tmp_path):
    """PyTorch's linear cross-entropy (chunked and not) and pytorch-metric-learning's ArcFace run
    beside the package's backends, each labelled margin or margin-free, normalised or not."""
    results_csv = tmp_path / "results.csv"
    out = run("bench", "--providers", "torch-linear-ce", "torch-linear-ce-ref", "pytorch-metric-learning",
              "--batch", "8", "--dim", "16", "--classes", "50", "--dtype", "fp32", "bf16", "--repeats", "1",
              "--results", str(results_csv))
    assert sorted((r["provider"], r["dtype"], r["status"]) for r in rows(results_csv)) == sorted(
        (p, d, "ok") for p in ("torch-linear-ce", "torch-linear-ce-ref", "pytorch-metric-learning") for d in ("fp32", "bf16")
    )
    assert out.count("margin-free, not normalised") == 4 and out.count("margin, normalised") == 2
    run("bench.report", "--results", str(results_csv), "--out", str(tmp_path))
    table = (tmp_path / next(p.name for p in tmp_path.glob("*.md"))).read_text()
    assert "| pytorch-metric-learning | margin, normalised | bf16 |" in table


def test_a_sweep_stopped_part_way_keeps_its_rows_and_records_the_point_it_was_measuring(tmp_path):
    """The first point's row is in the file as soon as the point is done; SIGTERM (what `timeout`
    sends) while the second runs (a thousand calls at C = 300k) leaves that point as a killed row."""
    results_csv = tmp_path / "results.csv"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "bench", "--providers", "torch", *TINY, "--classes", "50", "300000",
         "--repeats", "1000", "--results", str(results_csv)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 300
    while not rows(results_csv) and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    sweep.send_signal(signal.SIGTERM)
    printed, _ = sweep.communicate(timeout=60)
    assert sweep.returncode == 128 + signal.SIGTERM, printed
    written = rows(results_csv)
    assert [(r["classes"], r["status"]) for r in written][:1] == [("50", "ok")], printed
    assert written[1]["classes"] == "300000" and written[1]["status"].startswith("killed: the sweep was stopped")


def test_a_point_past_its_time_limit_is_a_row_and_larger_classes_are_not_run(tmp_path):
    results_csv = tmp_path / "results.csv"
    run("bench", "--providers", "torch", *TINY, "--classes", "300000", "600000", "--repeats", "1000",
        "--timeout", "3", "--results", str(results_csv))
    statuses = [r["status"] for r in rows(results_csv)]
    assert statuses == ["timeout: killed at its 3 s limit", "not run: timeout: killed at its 3 s limit at a smaller C"]


def test_one_worker_process_answers_point_after_point_and_one_that_died_is_replaced():
    point = dict(provider="torch", batch=4, classes=20, dim=8, dtype="fp32", margin="arcface", device="cpu",
                 repeats=1, what="time")
    measured = WorkerProcess()
    try:
        assert measured.measure(point, timeout=120)["status"] == "ok"
        assert measured.measure({**point, "classes": 30}, timeout=120)["status"] == "ok"
        died = measured.measure({**point, "provider": "no-such-provider"}, timeout=120)
        assert died["status"].startswith("error: ValueError: unknown provider"), died
        assert measured.measure(point, timeout=120)["status"] == "ok"
    finally:
        measured.close()


def test_inputs_are_drawn_on_the_device_in_the_measured_dtype():
    x, w, y = worker.draw_inputs(4, 30, 8, "bf16", "cpu")
    assert x.dtype == w.dtype == torch.bfloat16 and x.requires_grad and w.requires_grad
    assert w.shape == (30, 8) and y.dtype == torch.int64 and int(y.max()) < 30


def test_forward_and_backward_are_marked_within_one_timed_call():
    x, w, y = worker.draw_inputs(4, 30, 8, "fp32", "cpu")
    times = worker.forward_backward_ms(providers.make_loss("torch", "arcface"), x, w, y, repeats=3)
    assert times["fwd_bwd_ms"] >= max(times["fwd_ms"], times["bwd_ms"]) > 0


def test_a_provider_the_installed_torch_lacks_is_unavailable_with_the_reason(monkeypatch):
    monkeypatch.delattr(torch.nn, "LinearCrossEntropyOptions", raising=False)
    reason = providers.unavailable_reason("torch-linear-ce", torch.device("cpu"))
    assert reason == f"torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions"
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
    assert "torch.nn.functional.linear_cross_entropy" in providers.unavailable_reason("torch-linear-ce-ref",
                                                                                        torch.device("cpu"))


def test_results_and_plots_go_outside_the_tracked_files_by_default():
    for path in (results.RESULTS, report.REPORT / "plot.png"):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO)
        assert ignored.returncode == 0, f"{path} is not ignored by git"
