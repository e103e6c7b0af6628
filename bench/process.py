"""Worker processes (`python -m bench.worker`) that measure the points sent to them one by one,
what becomes of a point one does not answer (past its time limit, killed by the kernel's
out-of-memory killer, SIGKILL, or another signal, failed, or stopped with the sweep), and which
process measures which point (`Measurer`).

The worker's answers are read by a thread into a queue, so that waiting for one has a deadline
and a signal to the sweep (SIGTERM, Ctrl-C) interrupts the wait: `Stopped` is raised then.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from .worker import RESULT

REPO = Path(__file__).resolve().parents[1]


class Stopped(Exception):
    """The sweep was asked to stop (SIGTERM or SIGINT) while a point ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> None:
    """Turn SIGTERM and SIGINT into `Stopped` in the main thread."""

    def stop(signum: int, _frame: object) -> None:
        raise Stopped(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def _death(returncode: int, stderr: str) -> str:
    """The status of a point whose worker exited without answering."""
    if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return "OOM"  # SIGKILL: the kernel's out-of-memory killer
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    last = (stderr.strip().splitlines() or ["no output"])[-1]
    return f"error: {last[:200]}"


class WorkerProcess:
    """One `python -m bench.worker` process, started on first use and after it ended."""

    def __init__(self, env: Optional[dict] = None) -> None:
        self._env = dict(os.environ if env is None else env)
        self._process: Optional[subprocess.Popen] = None
        self._answers: queue.Queue = queue.Queue()
        self._stderr = None

    def _start(self) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._answers = queue.Queue()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.worker"], cwd=REPO, env=self._env, text=True, bufsize=1,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
        )
        threading.Thread(target=self._read, args=(self._process.stdout, self._answers), daemon=True).start()

    @staticmethod
    def _read(stdout, answers: queue.Queue) -> None:
        for line in stdout:
            if line.startswith(RESULT):
                answers.put(json.loads(line[len(RESULT):]))
        answers.put(None)  # the worker's stdout closed: it exited

    def _stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def measure(self, config: dict, timeout: float) -> dict:
        """The worker's answer for `config`, or {"status": why there is none}. A worker past its
        time limit is killed; one that died is started afresh for the next point."""
        if self._process is None:
            self._start()
        try:
            self._process.stdin.write(json.dumps(config) + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            pass  # it died: the reader reports its end
        try:
            answer = self._answers.get(timeout=timeout)
        except queue.Empty:
            self.close(kill=True)
            return {"status": f"timeout: killed at its {timeout:g} s limit"}
        if answer is None:
            status = _death(self._process.wait(), self._stderr_text())
            self.close()
            return {"status": status}
        return answer

    def close(self, kill: bool = False) -> None:
        """End the worker: at once with `kill`, else when it has read its input to the end (killed
        if that takes more than a few seconds)."""
        if self._process is None:
            return
        if kill:
            self._process.kill()
        try:
            self._process.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._stderr.close()
        self._process = None


class Measurer:
    """Runs points in worker processes: on a GPU one process for every point (a fresh one after a
    point it did not answer, or answered with an error: its CUDA context may be broken); on the CPU
    a process per point for the times and another for the memory, with large blocks unmapped on
    free (bench/worker.py)."""

    def __init__(self, device: torch.device) -> None:
        self._shared = WorkerProcess() if device.type == "cuda" else None

    def measure(self, config: dict, timeout: float) -> dict:
        if self._shared is not None:
            result = self._shared.measure({**config, "what": "both"}, timeout)
            if result["status"] not in ("ok", "OOM"):
                self._shared.close(kill=True)
            return result
        result = self._once({**config, "what": "time"}, dict(os.environ), timeout)
        if result["status"] != "ok":
            return result
        memory = self._once({**config, "what": "memory"}, dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"), timeout)
        return {**result, **memory} if memory["status"] == "ok" else memory

    def _once(self, config: dict, env: dict, timeout: float) -> dict:
        worker = WorkerProcess(env)
        try:
            return worker.measure(config, timeout)
        finally:
            worker.close(kill=True)

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close(kill=True)
