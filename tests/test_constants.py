"""Each numerical constant has one definition (marginfused/constants.py); the copies the C++
language forces (csrc/common.h) are read here and must equal it; and no margin formula exists
outside the PyTorch margin code."""

import re
from pathlib import Path

import numpy as np

from marginfused import constants

ROOT = Path(__file__).resolve().parents[1]


def cpp_float(name: str) -> float:
    header = (ROOT / "csrc" / "common.h").read_text()
    match = re.search(rf"constexpr float {name} = ([0-9.eE+-]+)f;", header)
    assert match, f"{name} is not defined in csrc/common.h"
    return float(match.group(1))


def test_the_cpp_norm_eps_is_the_python_one():
    # a C++ float literal: the float32 nearest each must be the same
    assert np.float32(cpp_float("kNormEps")) == np.float32(constants.NORM_EPS)


def test_no_cpp_copy_of_the_derivative_clamp_drifts():
    """The kernels take each row's slope from the PyTorch pre-pass, so C++ needs no copy of
    DERIVATIVE_EPS; a copy someone adds must still be the Python value."""
    sources = "\n".join(p.read_text() for p in sorted((ROOT / "csrc").glob("*")) if p.suffix in (".h", ".cpp", ".cu"))
    for value in re.findall(r"kDerivativeEps\s*=\s*([0-9.eE+-]+)f?", sources):
        assert np.float32(float(value)) == np.float32(constants.DERIVATIVE_EPS), f"kDerivativeEps = {value}"


def test_derivative_eps_is_exact_in_float32():
    assert float(np.float32(constants.DERIVATIVE_EPS)) == constants.DERIVATIVE_EPS


def test_no_other_definition_of_the_constants():
    """A literal 1e-12 or 2⁻²³ as a value anywhere else in the package is a second definition."""
    sources = [*ROOT.glob("marginfused/**/*.py"), *ROOT.glob("kernels/*.py"), *ROOT.glob("csrc/*.c*")]
    pattern = re.compile(r"(=|\()\s*(1e-12|2\.0\*\*-23|2\*\*-23)\b")
    offenders = [f"{p.relative_to(ROOT)}: {line.strip()}" for p in sources if p.name != "constants.py"
                 for line in p.read_text().splitlines() if pattern.search(line) and not line.lstrip().startswith(("#", "//"))]
    assert not offenders, offenders


def test_no_margin_formula_outside_the_margin_code():
    """The kernels and the C++/CUDA sources evaluate no trigonometry: margins are PyTorch code."""
    sources = [*ROOT.glob("kernels/*.py"), *ROOT.glob("csrc/*.c*"), *ROOT.glob("csrc/*.h")]
    pattern = re.compile(r"\b(acos|acosf|cosf|sinf|tl\.cos|tl\.sin|margin_value|margin_slope)\b")
    offenders = [f"{p.relative_to(ROOT)}: {line.strip()}" for p in sources
                 for line in p.read_text().splitlines() if pattern.search(line)]
    assert not offenders, offenders
