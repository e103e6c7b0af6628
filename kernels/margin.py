"""The margins f(c) and f′(c) as `@triton.jit` helpers, evaluated in float64.

The kernels apply a margin to one value per row and class tile (the target cosine c_iy,
picked out of the tile), never to a whole tile, so the trigonometry costs BLOCK_B operations
per tile next to BLOCK_B·BLOCK_C·D multiply-adds; float64 makes it as exact as the float64
reference at no measurable cost. The formulas (θ = arccos c; `marginfused.margins` has the
same table and is the truth):

    COSFACE     f = c − m1                           f′ = 1
    ARCFACE     f = cos(θ + m1)                      f′ = sin(θ + m1) / sin θ
                fallback LINEAR: f = c − m1·sin m1, f′ = 1 where c ≤ cos(π − m1)
                fallback EASY:   f = c,             f′ = 1 where c ≤ 0
    SPHEREFACE  f = (−1)^k cos(m1 θ) − 2k,  k = ⌊m1 θ/π⌋    f′ = (−1)^k m1 sin(m1 θ) / sin θ
    EXPFACE     f = cos(π (θ/π)^m1)                  f′ = m1 (θ/π)^(m1−1) sin(π (θ/π)^m1) / sin θ
    COMBINED    f = cos(m1 θ + m2) − m3              f′ = m1 sin(m1 θ + m2) / sin θ

f takes θ from c clamped to [−1, 1]; f′ from c clamped to [−1 + ε, 1 − ε] (ε = marginfused.constants.DERIVATIVE_EPS = 2⁻²³),
so sin θ > 0. `kind` and `fallback` are `tl.constexpr` (one compiled variant each, dead branches
removed); m1, m2, m3 are runtime floats.

Triton has no arccos; `acos` below is asin on [0, ½] (a minimax polynomial, ~1e-7 relative)
polished by one Newton step in float64 (error squared: ~1e-14), with the usual range reduction
acos|c| = 2·asin(√((1−|c|)/2)) for |c| > ½ and acos(−c) = π − acos(c).
"""

import triton
import triton.language as tl

from .. import constants

# π and π/2 appear as literals (3.141592653589793, 1.5707963267948966) in the jit bodies:
# a module-level constexpr on the left of an operator breaks Triton's interpreter.

DERIVATIVE_EPS = tl.constexpr(constants.DERIVATIVE_EPS)

# KIND and FALLBACK are the integer values of marginfused.margins.MarginKind
# (COSFACE 0, ARCFACE 1, SPHEREFACE 2, EXPFACE 3, COMBINED 4) and ArcFaceFallback
# (NONE 0, LINEAR 1, EASY 2).


@triton.jit
def acos(c):
    """arccos of a float64 tensor with values in [−1, 1], to ~1e-14."""
    a = tl.abs(c)
    big = a > 0.5
    r = tl.where(big, tl.sqrt(tl.maximum(0.5 * (1.0 - a), 0.0)), a)  # r in [0, ½]
    z = r * r
    poly = (((4.2163199048e-2 * z + 2.4181311049e-2) * z + 4.5470025998e-2) * z + 7.4953002686e-2) * z
    s = r + r * z * (poly + 1.6666752422e-1)  # asin(r) to ~1e-7
    s = s - (tl.sin(s) - r) / tl.cos(s)  # Newton on sin(s) = r; cos(s) ≥ cos(π/6)
    theta = tl.where(big, 2.0 * s, 1.5707963267948966 - s)  # acos|c|
    return tl.where(c < 0.0, 3.141592653589793 - theta, theta)


@triton.jit
def margin_value(c, m1, m2, m3, KIND: tl.constexpr, FALLBACK: tl.constexpr):
    """f(c) for a float32 tensor of cosines; returns float32 (computed in float64)."""
    c = tl.minimum(tl.maximum(c.to(tl.float64), -1.0), 1.0)
    m1, m2, m3 = tl.cast(m1, tl.float64), tl.cast(m2, tl.float64), tl.cast(m3, tl.float64)
    if KIND == 0:  # COSFACE
        f = c - m1
    else:
        theta = acos(c)
        if KIND == 1:  # ARCFACE
            f = tl.cos(theta + m1)
            if FALLBACK == 1:  # LINEAR
                f = tl.where(c <= tl.cos(3.141592653589793 - m1), c - m1 * tl.sin(m1), f)
            elif FALLBACK == 2:  # EASY
                f = tl.where(c <= 0.0, c, f)
        elif KIND == 2:  # SPHEREFACE
            k = tl.floor(m1 * theta / 3.141592653589793)
            sign = 1.0 - 2.0 * (k - 2.0 * tl.floor(0.5 * k))
            f = sign * tl.cos(m1 * theta) - 2.0 * k
        elif KIND == 3:  # EXPFACE
            ratio = tl.maximum(theta / 3.141592653589793, 1e-300)
            f = tl.cos(3.141592653589793 * tl.exp(m1 * tl.log(ratio)))
        else:  # COMBINED
            f = tl.cos(m1 * theta + m2) - m3
    return f.to(tl.float32)


@triton.jit
def margin_slope(c, m1, m2, m3, KIND: tl.constexpr, FALLBACK: tl.constexpr):
    """f′(c) for a float32 tensor of cosines; returns float32 (computed in float64)."""
    c = c.to(tl.float64)
    m1, m2 = tl.cast(m1, tl.float64), tl.cast(m2, tl.float64)
    if KIND == 0:  # COSFACE
        d = tl.full(c.shape, 1.0, tl.float64)
    else:
        ci = tl.minimum(tl.maximum(c, -1.0 + DERIVATIVE_EPS), 1.0 - DERIVATIVE_EPS)
        theta = acos(ci)
        sin_theta = tl.sin(theta)
        if KIND == 1:  # ARCFACE
            d = tl.sin(theta + m1) / sin_theta
            if FALLBACK == 1:  # LINEAR
                d = tl.where(c <= tl.cos(3.141592653589793 - m1), 1.0, d)
            elif FALLBACK == 2:  # EASY
                d = tl.where(c <= 0.0, 1.0, d)
        elif KIND == 2:  # SPHEREFACE
            k = tl.floor(m1 * theta / 3.141592653589793)
            sign = 1.0 - 2.0 * (k - 2.0 * tl.floor(0.5 * k))
            d = sign * m1 * tl.sin(m1 * theta) / sin_theta
        elif KIND == 3:  # EXPFACE
            log_ratio = tl.log(theta / 3.141592653589793)
            d = m1 * tl.exp((m1 - 1.0) * log_ratio) * tl.sin(3.141592653589793 * tl.exp(m1 * log_ratio)) / sin_theta
        else:  # COMBINED
            d = m1 * tl.sin(m1 * theta + m2) / sin_theta
    return d.to(tl.float32)
