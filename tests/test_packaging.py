"""The built wheel ships the C++/CUDA sources inside the package (marginfused/csrc/), where the
JIT build finds them, and installs no top-level `kernels` or `csrc` package."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")


def test_wheel_contains_the_sources_under_marginfused_csrc(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = list(tmp_path.glob("marginfused-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        wheel.extractall(tmp_path / "site")

    sources = [p.name for p in (ROOT / "csrc").iterdir() if p.suffix in SOURCE_SUFFIXES]
    assert {"cpu.cpp", "cuda.cu", "margin_math.h"} <= set(sources)
    missing = [name for name in sources if f"marginfused/csrc/{name}" not in names]
    assert not missing, f"sources missing from the wheel: {missing}"
    assert "marginfused/kernels/__init__.py" in names
    top_level = {name.split("/")[0] for name in names}
    assert not top_level & {"kernels", "csrc"}, f"top-level packages in the wheel: {sorted(top_level)}"

    # Installed from the wheel, the package locates its sources by itself.
    probe = subprocess.run(
        [sys.executable, "-c",
         "import marginfused, marginfused.extension as e; print(marginfused.__file__); "
         "print(' '.join(p.name for p in e.source_files()))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
    )
    assert probe.returncode == 0, probe.stderr
    location, found = probe.stdout.strip().splitlines()
    assert location.startswith(str(tmp_path / "site"))
    assert sorted(found.split()) == sorted(sources)
