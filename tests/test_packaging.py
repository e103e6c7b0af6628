"""The installed package: one importable `marginfused`, with the Triton kernels inside it
(`marginfused.kernels`) and the C++/CUDA sources shipped as `marginfused/csrc/`, where the JIT build
finds them; importable from any directory."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
        cwd=out,
    )
    (built,) = out.glob("marginfused-*.whl")
    return built


def test_wheel_holds_one_package_with_kernels_and_every_source_inside(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"marginfused"}
    assert "marginfused/kernels/__init__.py" in names
    sources = [p.name for p in (REPO / "csrc").iterdir() if p.suffix in SOURCE_SUFFIXES]
    assert {"cpu.cpp", "cuda.cu", "common.h", "bindings.h"} <= set(sources)
    missing = [name for name in sources if f"marginfused/csrc/{name}" not in names]
    assert not missing, f"sources missing from the wheel: {missing}"


def test_installed_wheel_imports_from_another_directory_and_finds_its_sources(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
    )
    script = (
        "import marginfused as mf, marginfused.backends.extension as e; print(mf.__file__); "
        "print(mf.available_backends()['torch']); print(' '.join(p.name for p in e.source_files()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    location, torch_reason, found = result.stdout.strip().splitlines()
    assert Path(location).is_relative_to(target)
    assert torch_reason == "None"
    assert sorted(found.split()) == sorted(p.name for p in (REPO / "csrc").iterdir() if p.suffix in SOURCE_SUFFIXES)
