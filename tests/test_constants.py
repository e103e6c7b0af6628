"""Each numerical constant has one definition (marginfused/constants.py, the margin enums); the
copies the C++ language forces (csrc/margin_math.h) are read here and must equal it."""

import re
from pathlib import Path

import pytest

from marginfused import constants
from marginfused.margins import ArcFaceFallback, MarginKind

ROOT = Path(__file__).resolve().parents[1]
HEADER = (ROOT / "csrc" / "margin_math.h").read_text()


def cpp_float(name: str) -> float:
    match = re.search(rf"constexpr float {name} = ([0-9.eE+-]+)f;", HEADER)
    assert match, f"{name} is not defined in csrc/margin_math.h"
    return float(match.group(1))


def cpp_enum(name: str) -> dict[str, int]:
    match = re.search(rf"enum {name} : int32_t \{{([^}}]*)\}};", HEADER)
    assert match, f"enum {name} is not defined in csrc/margin_math.h"
    return {key.strip(): int(value) for key, value in (item.split("=") for item in match.group(1).split(","))}


@pytest.mark.parametrize("cpp_name, value", [("kDerivativeEps", constants.DERIVATIVE_EPS),
                                             ("kNormEps", constants.NORM_EPS)])
def test_cpp_copies_equal_the_python_constants(cpp_name, value):
    import numpy as np

    # the C++ constants are float literals: the float32 nearest each must be the Python value's
    assert np.float32(cpp_float(cpp_name)) == np.float32(value), f"{cpp_name} differs from marginfused.constants"


def test_derivative_eps_is_exact_in_float32():
    import numpy as np

    assert float(np.float32(constants.DERIVATIVE_EPS)) == constants.DERIVATIVE_EPS


def test_cpp_margin_enums_equal_the_python_ones():
    kinds = {f"k{kind.name.title().replace('face', 'Face')}": kind.value for kind in MarginKind}
    assert cpp_enum("MarginKind") == kinds
    fallbacks = {f"kFallback{fallback.name.title()}": fallback.value for fallback in ArcFaceFallback}
    assert cpp_enum("ArcFaceFallback") == fallbacks


def test_no_other_definition_of_the_constants():
    """A literal 1e-12 or 2⁻²³ as a value anywhere else in the package is a second definition."""
    sources = [*ROOT.glob("marginfused/*.py"), *ROOT.glob("kernels/*.py"), *ROOT.glob("csrc/*.c*")]
    pattern = re.compile(r"(=|\()\s*(1e-12|2\.0\*\*-23|2\*\*-23|1e-6f)\b")
    offenders = [f"{p.relative_to(ROOT)}: {line.strip()}" for p in sources if p.name != "constants.py"
                 for line in p.read_text().splitlines() if pattern.search(line) and not line.lstrip().startswith(("#", "//"))]
    assert not offenders, offenders
