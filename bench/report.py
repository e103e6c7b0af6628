"""`python -m bench.report`: plots and a Markdown table from the results file (.bench/results.csv
unless --results names another).

For the latest run on each device, and each (dtype, B, D) in it: one PNG with forward+backward
time and working memory against the class count C, log-log, a line per provider, written to
<out>/<device>_<dtype>_B<B>_D<D>.png; and the run's table as Markdown in <out>/<device>.md, for
the README. <out> is .bench/report unless --out names another folder (bench/results/ for results
to be committed).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import results  # noqa: E402
from .providers import KINDS, label  # noqa: E402

REPORT = results.REPO / ".bench" / "report"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def latest_runs(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of the most recent run of each device."""
    by_device: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_device[row["device"]][row["run"]].append(row)
    return {device: runs[max(runs)] for device, runs in by_device.items()}


def plot(rows: list[dict], title: str, path: Path) -> None:
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for provider in dict.fromkeys(row["provider"] for row in rows):
        done = sorted((int(r["classes"]), r) for r in rows if r["provider"] == provider and r["status"] == "ok")
        if not done:
            continue
        classes = [c for c, _ in done]
        time_axis.plot(classes, [float(r["fwd_bwd_ms"]) for _, r in done], marker="o", label=label(provider))
        memory_axis.plot(classes, [max(float(r["working_mb"]), 1e-2) for _, r in done], marker="o", label=provider)
    for axis, quantity in ((time_axis, "forward+backward (ms)"), (memory_axis, "working memory beyond inputs+grads (MB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("classes C")
        axis.set_ylabel(quantity)
        axis.grid(True, which="both", alpha=0.3)
    time_axis.legend()
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(rows: list[dict]) -> str:
    first = rows[0]
    rates = ", ".join(f"{dtype} {float(rate):.3f}" for dtype, rate in
                      dict((r["dtype"], r["matmul_tflops"]) for r in rows).items())
    lines = [
        f"{first['device']}, torch {first['torch']}, triton {first['triton']}, commit {first['commit']}, "
        f"{first['run']}; matmul rate (TFLOP/s, measured in the run) {rates}; margin {first['margin']}",
        "",
        "| provider | computes | dtype | B | D | C | fwd ms | bwd ms | fwd+bwd ms | TFLOP/s | % matmul | working MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['provider']} | {KINDS[r['provider']]} | {r['dtype']} | {r['batch']} | {r['dim']} | "
                         f"{r['classes']} | {r['status']} | | | | | |")
            continue
        lines.append(
            f"| {r['provider']} | {KINDS[r['provider']]} | {r['dtype']} | {r['batch']} | {r['dim']} | {r['classes']} | "
            f"{float(r['fwd_ms']):.2f} | {float(r['bwd_ms']):.2f} | {float(r['fwd_bwd_ms']):.2f} | "
            f"{float(r['tflops']):.3f} | {float(r['pct_matmul']):.1f} | {float(r['working_mb']):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=results.RESULTS)
    parser.add_argument("--out", type=Path, default=REPORT, help="folder for the plots and the table")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for device, rows in latest_runs(results.read(args.results)).items():
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for row in rows:
            groups[(row["dtype"], row["batch"], row["dim"])].append(row)
        for (dtype, batch, dim), group in groups.items():
            path = out / f"{slug(device)}_{dtype}_B{batch}_D{dim}.png"
            plot(group, f"{device} — {dtype}, B={batch}, D={dim}, {group[0]['margin']} (run {group[0]['run']})", path)
            print(f"wrote {path}")
        table = out / f"{slug(device)}.md"
        table.write_text(markdown(rows))
        print(f"wrote {table}")


if __name__ == "__main__":
    main()
