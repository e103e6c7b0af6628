"""The installed package: one importable `marginfused`, kernels inside it, importable from anywhere."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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


def test_wheel_holds_one_package_with_kernels_and_csrc_inside(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"marginfused"}
    assert "marginfused/kernels/__init__.py" in names
    assert any(name.startswith("marginfused/csrc/") for name in names)


def test_installed_wheel_imports_from_another_directory(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
    )
    script = "import marginfused as mf; print(mf.__file__); print(mf.available_backends()['torch'])"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    location, torch_reason = result.stdout.split()
    assert Path(location).is_relative_to(target)
    assert torch_reason == "None"
