"""The margins f(c): docs/design.md §1's reference values, their derivatives, names and parameter checks."""

import math

import pytest
import torch

import marginfused as mf
from marginfused.margins import MARGIN_NAMES
from marginfused.settings import resolve_margin

from helpers import assert_close, make_inputs, run

COSINES = [0.999, 0.9, 0.7, 0.5, 0.2, 0.0, -0.3, -0.7, -0.9, -0.99]

REFERENCE_VALUES = {
    mf.ExpFace(m=0.7): [0.987203, 0.691382, 0.361396, 0.114532, -0.184942, -0.355156, -0.579898, -0.836106, -0.948294, -0.995028],
    mf.ArcFace(m=0.5): [0.85527, 0.580848, 0.271929, 0.023597, -0.294223, -0.479426, -0.720618, -0.956686, -0.998801, -0.936438],
    mf.SphereFace(m=1.7): [0.997111, 0.720172, 0.216881, -0.207912, -0.686925, -0.891007, -1.001092, -1.337719, -1.862015, -2.378061],
}

ALL_MARGINS = [
    mf.CosFace(),
    mf.ArcFace(),
    mf.ArcFace(fallback="linear"),
    mf.ArcFace(fallback="easy"),
    mf.SphereFace(),
    mf.SphereFace(m=4.0),
    mf.ExpFace(),
    mf.CombinedMargin(),
]


@pytest.mark.parametrize("margin", list(REFERENCE_VALUES), ids=repr)
def test_values_match_the_design_table(margin):
    cos = torch.tensor(COSINES, dtype=torch.float64)
    expected = torch.tensor(REFERENCE_VALUES[margin], dtype=torch.float64)
    torch.testing.assert_close(margin(cos), expected, atol=1e-6, rtol=0)


def test_cosface_and_combined_are_their_formulas():
    cos = torch.tensor(COSINES, dtype=torch.float64)
    theta = torch.acos(cos)
    torch.testing.assert_close(mf.CosFace(m=0.4)(cos), cos - 0.4)
    torch.testing.assert_close(mf.CombinedMargin(1.2, 0.3, 0.2)(cos), torch.cos(1.2 * theta + 0.3) - 0.2)


def test_arcface_fallbacks_replace_the_non_monotonic_part():
    m = 0.5
    cos = torch.tensor([0.5, 0.1, -0.1, -0.8, -0.9, -0.99], dtype=torch.float64)
    arc = torch.cos(torch.acos(cos) + m)
    threshold = math.cos(math.pi - m)
    linear = torch.where(cos > threshold, arc, cos - m * math.sin(m))
    easy = torch.where(cos > 0, arc, cos)
    torch.testing.assert_close(mf.ArcFace(m, fallback="linear")(cos), linear)
    torch.testing.assert_close(mf.ArcFace(m, fallback="easy")(cos), easy)
    assert (linear != arc).any() and (easy != arc).any()


def test_sphereface_is_monotonic_decreasing_in_theta():
    cos = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    for margin in (mf.SphereFace(1.7), mf.SphereFace(4.0)):
        assert (margin(cos).diff() > 0).all()


@pytest.mark.parametrize("margin", ALL_MARGINS, ids=repr)
def test_derivative_is_the_autograd_derivative_inside_the_interval(margin):
    # away from ±1 and from the fallback switch points, where f is smooth
    cos = torch.tensor([0.95, 0.6, 0.3, 0.05, -0.2, -0.5, -0.75, -0.95], dtype=torch.float64, requires_grad=True)
    (autograd,) = torch.autograd.grad(margin(cos).sum(), cos)
    torch.testing.assert_close(margin.derivative(cos.detach()), autograd, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("margin", ALL_MARGINS, ids=repr)
def test_derivative_is_finite_at_the_ends(margin):
    cos = torch.tensor([1.0, -1.0, 1.0 - 1e-12, -1.0 + 1e-12], dtype=torch.float64)
    assert torch.isfinite(margin.derivative(cos)).all()
    assert torch.isfinite(margin(cos)).all()


def test_expface_exact_derivative_is_large_near_zero_angle():
    # docs/design.md §1: ≈ 88 at θ = 1e-3 for m = 0.7
    cos = torch.tensor([math.cos(1e-3)], dtype=torch.float64)
    assert 80 < mf.ExpFace(0.7).derivative(cos).item() < 95


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("margin", ALL_MARGINS, ids=repr)
def test_any_float_dtype_in_same_dtype_out_and_differentiable(margin, dtype):
    cos = torch.tensor([0.9, 0.1, -0.6], dtype=dtype, requires_grad=True)
    value = margin(cos)
    assert value.dtype == dtype
    value.sum().backward()
    assert cos.grad is not None and torch.isfinite(cos.grad).all()
    exact = margin(cos.detach().double())
    torch.testing.assert_close(value.double(), exact, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cosface", mf.CosFace(0.35)),
        ("additive", mf.CosFace(0.35)),
        ("arcface", mf.ArcFace(0.5)),
        ("angular", mf.ArcFace(0.5)),
        ("sphereface", mf.SphereFace(1.7)),
        ("multiplicative", mf.SphereFace(1.7)),
        ("expface", mf.ExpFace(0.7)),
        ("exponential", mf.ExpFace(0.7)),
        ("combined", mf.CombinedMargin(1.0, 0.3, 0.2)),
        ("ArcFace", mf.ArcFace(0.5)),
    ],
)
def test_names_and_aliases_give_literature_defaults(name, expected):
    assert resolve_margin(name) == expected


def test_every_name_is_tested():
    assert set(MARGIN_NAMES) == {
        "cosface", "additive", "arcface", "angular", "sphereface",
        "multiplicative", "expface", "exponential", "combined",
    }


def test_a_margin_object_is_used_as_given():
    margin = mf.ArcFace(0.3, fallback="easy")
    assert resolve_margin(margin) is margin


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: mf.ExpFace(0.0), ValueError, "ExpFace: m"),
        (lambda: mf.ExpFace(-1.0), ValueError, "ExpFace: m"),
        (lambda: mf.ArcFace(4.0), ValueError, "ArcFace: m"),
        (lambda: mf.ArcFace(-0.1), ValueError, "ArcFace: m"),
        (lambda: mf.ArcFace(0.5, fallback="soft"), ValueError, "fallback"),
        (lambda: mf.CosFace(-0.1), ValueError, "CosFace: m"),
        (lambda: mf.CosFace(float("nan")), ValueError, "CosFace: m"),
        (lambda: mf.SphereFace(0.5), ValueError, "SphereFace: m"),
        (lambda: mf.SphereFace(float("inf")), ValueError, "SphereFace: m"),
        (lambda: mf.CombinedMargin(0.0, 0.3, 0.2), ValueError, "m1"),
        (lambda: mf.CombinedMargin(1.0, 4.0, 0.2), ValueError, "m2"),
        (lambda: mf.CombinedMargin(1.0, 0.3, -0.2), ValueError, "m3"),
        (lambda: mf.ArcFace("0.5"), TypeError, "ArcFace: m"),
        (lambda: mf.CosFace(True), TypeError, "CosFace: m"),
        (lambda: resolve_margin("softmax"), ValueError, "unknown name 'softmax'"),
        (lambda: resolve_margin(0.5), TypeError, "margin must be"),
    ],
)
def test_invalid_margins_raise_naming_the_parameter(make, error, words):
    with pytest.raises(error, match=words):
        make()


@pytest.mark.parametrize("margin_class, name", [(mf.CosFace, "m"), (mf.ArcFace, "m"), (mf.SphereFace, "m"),
                                                (mf.ExpFace, "m"), (mf.CombinedMargin, "m2")])
def test_per_row_parameters_act_row_by_row(margin_class, name):
    """A (B,) tensor parameter gives each row the margin of its own value."""
    cos = torch.tensor([0.9, 0.5, -0.2], dtype=torch.float64)
    values = torch.tensor([0.1, 0.3, 0.5], dtype=torch.float64) + (1.0 if margin_class is mf.SphereFace else 0.0)
    per_row = margin_class(**{name: values})
    for i, value in enumerate(values.tolist()):
        single = margin_class(**{name: value})
        torch.testing.assert_close(per_row(cos)[i], single(cos[i:i + 1])[0], rtol=0, atol=1e-15)
        torch.testing.assert_close(per_row.derivative(cos)[i], single.derivative(cos[i:i + 1])[0], rtol=0, atol=1e-15)


def test_per_row_parameters_are_checked_like_floats():
    with pytest.raises(ValueError, match="ArcFace: m must be finite and in"):
        mf.ArcFace(torch.tensor([0.5, 4.0]))
    with pytest.raises(TypeError, match="1-D floating tensor"):
        mf.CosFace(torch.zeros(2, 2))


def test_gradients_reach_per_row_parameters():
    m = torch.tensor([0.2, 0.4], dtype=torch.float64, requires_grad=True)
    cos = torch.tensor([0.6, 0.1], dtype=torch.float64)
    mf.ArcFace(m)(cos).sum().backward()
    torch.testing.assert_close(m.grad, -torch.sin(torch.acos(cos) + m.detach()))


def test_any_callable_is_a_margin():
    def f(c):
        return torch.cos(torch.acos(c) + 0.3) - 0.1

    assert resolve_margin(f) is f


def user_margin(c):
    return torch.cos(torch.acos(c) + 0.3) - 0.1


def test_the_callable_equals_the_built_in_margin_it_writes():
    x, w, y = make_inputs(9, 30, 12, seed=23)
    for mode in ("detached", "exact"):
        built_in = run("torch", x, w, y, margin=mf.CombinedMargin(1.0, 0.3, 0.1), margin_grad=mode)
        callable_ = run("torch", x, w, y, margin=user_margin, margin_grad=mode)
        for field in ("loss", "grad_embeddings", "grad_weight"):
            # two float64 evaluations of the same formula: a few float64 steps of values ≲ 100
            assert_close(field, getattr(callable_, field), getattr(built_in, field), 1e-10)


def test_a_margin_returning_nan_is_refused():
    x, w, y = make_inputs(5, 9, 8, seed=25)
    with pytest.raises(ValueError, match="must be finite"):
        mf.margin_cross_entropy(x, w, y, margin=lambda c: c * float("nan"))


def test_per_row_tensors_of_the_wrong_length_are_refused():
    x, w, y = make_inputs(5, 9, 8, seed=26)
    with pytest.raises(ValueError, match="margin parameter m must hold one value per row"):
        mf.margin_cross_entropy(x, w, y, margin=mf.ArcFace(torch.full((4,), 0.5, dtype=torch.float64)))


def test_elasticface_says_what_it_needs():
    with pytest.raises(ValueError, match="kind must be 'arc' or 'cos'"):
        mf.ElasticFace("sphere")
    with pytest.raises(ValueError, match="std"):
        mf.ElasticFace(std=-0.1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        mf.ElasticFace(generator=0)
    assert mf.ElasticFace("cos").m == 0.35 and mf.ElasticFace().m == 0.5


def test_elasticface_is_a_module_of_the_head():
    head = mf.MarginSoftmaxLoss(8, 20, margin=mf.ElasticFace(generator=torch.Generator().manual_seed(0)))
    assert isinstance(head.margin, mf.ElasticFace) and "margin" in dict(head.named_children())
    x, y = torch.randn(5, 8), torch.randint(0, 20, (5,))
    first, second = head(x, y), head(x, y)
    assert not torch.equal(first, second)  # a new draw per call in training mode
    head.eval()
    assert torch.equal(head(x, y), head(x, y))
