"""Property tests of the element-wise bijections (:class:`Affine`, :class:`RQSpline2Bin`).

Conventions under test: ``forward`` is the density direction, ``inverse`` is sampling; both return the element-wise
``ladj`` with the input's shape, and ``ladj_inverse(forward(x)) == -ladj_forward(x)``.
The omnibus tests follow zuko's ``tests/test_transforms.py``; the spline stress tests probe the numerically hard
points (exact knots, box edges, edges +- 1e-7, far tails, logits x1/x3/x30, float32 and float64).
"""
from __future__ import annotations

import math

import pytest
import torch

from robustness_diag.flows.bijections import (
    DEFAULT_BOUNDS,
    MIN_BIN_HEIGHT,
    MIN_BIN_WIDTH,
    MIN_DERIVATIVE,
    Affine,
    RQSpline2Bin,
    affine_inverse_slope_bound,
    sigmoid_scale,
)

SHAPE = (3, 2, 4, 4)


def _tol(dtype: torch.dtype) -> float:
    """Round-trip tolerance of the omnibus tests (moderate parameters): 1e-10 in float64, 1e-4 in float32."""
    return 1e-10 if dtype == torch.float64 else 1e-4


# -- factories: name -> (dtype, device, shape) -> (bijection, [parameter tensors], input spread) ----------------------
def _affine(dtype, device, shape):
    shift = torch.randn(shape, dtype=dtype, device=device)
    log_scale = 0.5 * torch.randn(shape, dtype=dtype, device=device)
    shift.requires_grad_(True)
    log_scale.requires_grad_(True)
    return Affine(shift, torch.exp(log_scale)), [shift, log_scale], 1.0


def _affine_sigmoid(dtype, device, shape, reparam=False):
    shift = torch.randn(shape, dtype=dtype, device=device).requires_grad_(True)
    raw = torch.randn(shape, dtype=dtype, device=device).requires_grad_(True)
    scale = sigmoid_scale(raw, 1e-4)
    return Affine(shift, 1.0 / scale if reparam else scale), [shift, raw], 1.0


def _spline(dtype, device, shape, shift=True, bounds=DEFAULT_BOUNDS):
    w, h, d = (torch.randn(shape, dtype=dtype, device=device).requires_grad_(True) for _ in range(3))
    params = [w, h, d]
    s = None
    if shift:
        s = (0.3 * torch.randn(shape, dtype=dtype, device=device)).requires_grad_(True)
        params.append(s)
    width = max(bounds[1] - bounds[0], bounds[3] - bounds[2])
    return RQSpline2Bin(w, h, d, s, bounds=bounds), params, 0.8 * width  # inputs cover the box and the tails


ELEMENTWISE = {
    "affine": _affine,
    "affine_sigmoid_scale": _affine_sigmoid,
    "affine_reparam": lambda dt, dev, sh: _affine_sigmoid(dt, dev, sh, reparam=True),
    "rqspline": _spline,
    "rqspline_no_shift": lambda dt, dev, sh: _spline(dt, dev, sh, shift=False),
    "rqspline_wide_offset_box": lambda dt, dev, sh: _spline(dt, dev, sh, bounds=(-2.0, 1.0, -2.0, 1.0)),
}


def _make(name, dtype, device, shape=SHAPE):
    bij, params, spread = ELEMENTWISE[name](dtype, device, shape)
    x = spread * torch.randn(shape, dtype=dtype, device=device)
    return bij, params, x


# -- omnibus --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_shapes_and_dtypes_are_preserved(name, dtype, device):
    """forward/inverse return (value, element-wise ladj) with the input's shape, dtype and device."""
    bij, _, x = _make(name, dtype, device)
    for out in (*bij.forward(x), *bij.inverse(x)):
        assert out.shape == x.shape
        assert out.dtype == dtype
        assert out.device.type == x.device.type


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_inverse_of_forward_is_identity(name, dtype, device):
    """inverse(forward(x)) == x."""
    bij, _, x = _make(name, dtype, device)
    with torch.no_grad():
        x_rt, _ = bij.inverse(bij.forward(x)[0])
    torch.testing.assert_close(x_rt, x, atol=_tol(dtype), rtol=0)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_forward_of_inverse_is_identity(name, dtype, device):
    """forward(inverse(y)) == y."""
    bij, _, y = _make(name, dtype, device)
    with torch.no_grad():
        y_rt, _ = bij.forward(bij.inverse(y)[0])
    torch.testing.assert_close(y_rt, y, atol=_tol(dtype), rtol=0)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_forward_and_inverse_ladj_cancel(name, dtype, device):
    """ladj_forward(x) + ladj_inverse(forward(x)) == 0 element-wise."""
    bij, _, x = _make(name, dtype, device)
    with torch.no_grad():
        y, ladj_f = bij.forward(x)
        _, ladj_i = bij.inverse(y)
    torch.testing.assert_close(ladj_f + ladj_i, torch.zeros_like(x), atol=10 * _tol(dtype), rtol=0)


@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_ladj_matches_autograd_jacobian_diagonal(name, direction, device):
    """In float64: the Jacobian is diagonal and ladj == log|diag J| (autograd, no finite differences)."""
    shape = (2, 3, 2, 2)
    bij, _, x = _make(name, torch.float64, device, shape)
    fn = getattr(bij, direction)
    x = x.detach()
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.view(shape))[0].flatten(), x.flatten())
    diag = torch.diagonal(jac)
    off = jac - torch.diag(diag)
    assert torch.all(diag > 0), "element-wise bijections must be increasing"
    torch.testing.assert_close(off, torch.zeros_like(off), atol=1e-12, rtol=0)
    torch.testing.assert_close(fn(x)[1].detach().flatten(), torch.log(diag), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_gradients_reach_every_parameter(name, direction, dtype, device):
    """loss = y.sum() + ladj.sum() gives a finite, non-zero gradient to every parameter tensor."""
    bij, params, x = _make(name, dtype, device)
    x = 0.3 * x  # mostly inside the spline box, so the spline parameters matter
    y, ladj = getattr(bij, direction)(x)
    (y.sum() + ladj.sum()).backward()
    for p in params:
        assert p.grad is not None
        assert torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_inputs_are_not_mutated(name, dtype, device):
    """Neither direction writes into its input (the nflows bin-search mutation)."""
    bij, params, x = _make(name, dtype, device)
    x = x.detach()
    before = [x.clone()] + [p.detach().clone() for p in params]
    with torch.no_grad():
        bij.forward(x)
        bij.inverse(x)
    for a, b in zip([x] + [p.detach() for p in params], before):
        assert torch.equal(a, b)


# -- zero parameters give the identity ---------------------------------------------------------------------------------
def test_affine_with_unit_scale_and_zero_shift_is_identity(dtype, device):
    """Affine(shift=0, scale=1) maps x to x in both directions with zero ladj."""
    x = torch.randn(SHAPE, dtype=dtype, device=device)
    bij = Affine(torch.zeros((), dtype=dtype, device=device), torch.ones((), dtype=dtype, device=device))
    for y, ladj in (bij.forward(x), bij.inverse(x)):
        assert torch.equal(y, x)
        assert torch.equal(ladj, torch.zeros_like(x))


def test_sigmoid_scale_at_zero_is_sigmoid_two_plus_eps():
    """SRFlow's initial scale: sigmoid(0 + 2) + eps = 0.8808 + eps."""
    value = sigmoid_scale(torch.zeros((), dtype=torch.float64), 1e-4)
    assert abs(float(value) - (1 / (1 + math.exp(-2.0)) + 1e-4)) < 1e-15
    assert abs(float(value) - 1e-4 - 0.8808) < 1e-4


def _identity_grid(dtype, device):
    left, right = DEFAULT_BOUNDS[0], DEFAULT_BOUNDS[1]
    special = [left, right, left - 1e-7, left + 1e-7, right - 1e-7, right + 1e-7, 0.0, -1e3, 1e3, -2.0, 2.0]
    grid = torch.linspace(-1.0, 1.0, 2001, dtype=torch.float64).tolist()
    return torch.tensor(special + grid, dtype=dtype, device=device)


@pytest.mark.parametrize("dt", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_spline_with_zero_parameters_is_exact_identity(dt, device):
    """Zero logits and zero shift: y == x (1e-12 in float64, 2 ulp in float32) over the box, its edges and the tails."""
    x = _identity_grid(dt, device)
    z = torch.zeros_like(x)
    bij = RQSpline2Bin(z, z, z, z)
    atol = 1e-12 if dt == torch.float64 else 2 * torch.finfo(dt).eps
    for y, ladj in (bij.forward(x), bij.inverse(x)):
        torch.testing.assert_close(y, x, atol=atol, rtol=0)
        torch.testing.assert_close(ladj, z, atol=atol, rtol=0)


# -- spline stress (lesson 6) ------------------------------------------------------------------------------------------
N_STRESS = 4096
SCALES = [1, 3, 30]
DTYPES = [torch.float64, torch.float32]


def _knots(w, h, bounds=DEFAULT_BOUNDS):
    """The interior knots (x1, y1), computed independently from the documented formulas."""
    left, right, bottom, top = bounds
    x1 = left + (right - left) * (torch.sigmoid(w) * (1 - 2 * MIN_BIN_WIDTH) + MIN_BIN_WIDTH)
    y1 = bottom + (top - bottom) * (torch.sigmoid(h) * (1 - 2 * MIN_BIN_HEIGHT) + MIN_BIN_HEIGHT)
    return x1, y1


def _stress_params(dt, device, scale, shift=True):
    w, h, d = (scale * torch.randn(N_STRESS, dtype=dt, device=device) for _ in range(3))
    s = torch.randn(N_STRESS, dtype=dt, device=device) if shift else None
    return w, h, d, s


def _stress_points(knot, lo, hi, dt, device):
    """[M, N] inputs per parameter column: the interior knot (and its neighbours), the edges, edges +- 1e-7,
    far tails and uniform points inside the box."""
    full = lambda v: torch.full_like(knot, v)  # noqa: E731
    rows = [knot, torch.nextafter(knot, full(hi)), torch.nextafter(knot, full(lo)),
            full(lo), full(hi), full(lo - 1e-7), full(lo + 1e-7), full(hi - 1e-7), full(hi + 1e-7),
            full(-1e3), full(1e3)]
    inside = lo + (hi - lo) * torch.rand(8, knot.shape[0], dtype=dt, device=device)
    return torch.cat([torch.stack(rows), inside])


def _all_finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("dt", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("scale", SCALES)
def test_spline_stress_outputs_and_ladj_are_finite(dt, scale, device):
    """No NaN/Inf in either direction at the exact knots, the box edges, edges +- 1e-7 and the far tails."""
    w, h, d, _ = _stress_params(dt, device, scale, shift=False)
    bij = RQSpline2Bin(w, h, d)
    x1, y1 = _knots(w, h)
    y, ladj_f = bij.forward(_stress_points(x1, -0.5, 0.5, dt, device))
    x, ladj_i = bij.inverse(_stress_points(y1, -0.5, 0.5, dt, device))
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in
           dict(forward=y, forward_ladj=ladj_f, inverse=x, inverse_ladj=ladj_i).items()}
    assert _all_finite(y, ladj_f, x, ladj_i), f"non-finite counts {bad}; max |d logit| = {float(d.abs().max()):.1f}"


def test_spline_exact_knots_give_exact_values_and_knot_derivatives():
    """At x0, x1, x2 the spline returns y0, y1, y2; ladj there is log 1, log(derivative(d)), log 1."""
    w, h, d, _ = _stress_params(torch.float64, "cpu", 3, shift=False)
    bij = RQSpline2Bin(w, h, d)
    x1, y1 = _knots(w, h)
    deriv = torch.exp(d) * (1 - MIN_DERIVATIVE) + MIN_DERIVATIVE
    y, ladj = bij.forward(torch.stack([torch.full_like(w, -0.5), x1, torch.full_like(w, 0.5)]))
    torch.testing.assert_close(y[1], y1, atol=1e-12, rtol=0)
    torch.testing.assert_close(y[0], torch.full_like(w, -0.5), atol=0, rtol=0)
    torch.testing.assert_close(y[2], torch.full_like(w, 0.5), atol=0, rtol=0)
    torch.testing.assert_close(ladj[1], torch.log(deriv), atol=1e-9, rtol=0)
    assert torch.equal(ladj[0], torch.zeros_like(w)) and torch.equal(ladj[2], torch.zeros_like(w))
    xi, ladj_i = bij.inverse(y1)
    torch.testing.assert_close(xi, x1, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj_i, -torch.log(deriv), atol=1e-9, rtol=0)


#: Documented bound on max |inverse(forward(x)) - x| for x in [-0.6, 0.6] (box and tails) with N(0, scale^2) logits.
#: Measured on 2e5 samples: float64 x1 1.2e-13, x3 4.9e-8, x30 0.999; float32 x1 6.5e-5, x3 0.81, x30 0.999.
#: Beyond x1 the spline's slope reaches e^-20 (x3) and e^-130 (x30), so the forward pass itself rounds away the
#: information and only the box bound (|error| <= right - left = 1) can be guaranteed.
ROUND_TRIP_BOUND = {(torch.float64, 1): 1e-8, (torch.float64, 3): 1e-6, (torch.float64, 30): 1.0,
                    (torch.float32, 1): 1e-3, (torch.float32, 3): 1.0, (torch.float32, 30): 1.0}


@pytest.mark.parametrize("dt", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("scale", SCALES)
def test_spline_round_trip_error_is_within_documented_bound(dt, scale, device):
    """max |inverse(forward(x)) - x| <= ROUND_TRIP_BOUND[dtype, scale] (NaN counts as a failure)."""
    w, h, d, s = _stress_params(dt, device, scale)
    bij = RQSpline2Bin(w, h, d, s)
    special = _stress_points(_knots(w, h)[0], -0.5, 0.5, dt, device)[:9]  # knot, neighbours, edges, edges +- 1e-7
    x = torch.cat([special, 1.2 * torch.rand(16, N_STRESS, dtype=dt, device=device) - 0.6])
    x_rt, _ = bij.inverse(bij.forward(x)[0])
    err = float((x_rt - x).abs().max())
    assert err <= ROUND_TRIP_BOUND[dt, scale], f"round-trip error {err:.3g}"


@pytest.mark.parametrize("dt", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("scale", SCALES)
def test_spline_tails_are_exact_identity_plus_shift(dt, scale, device):
    """For |y - shift| >= 0.5 the inverse is exactly y - shift with ladj 0; outside the box forward is x + shift."""
    w, h, d, s = _stress_params(dt, device, scale)
    bij = RQSpline2Bin(w, h, d, s)
    off = torch.tensor([0.5, 0.5 + 1e-6, 0.7, 3.0, 1e3], dtype=dt, device=device)[:, None]
    u = torch.cat([off, -off]) * torch.ones_like(w)
    x, ladj = bij.inverse(u + s)
    expected = (u + s) - s  # the library's own rounding of y - shift; |.| >= 0.5 selects the tails
    tail = expected.abs() >= 0.5
    assert tail.float().mean() > 0.9
    assert torch.equal(x[tail], expected[tail])
    assert torch.equal(ladj[tail], torch.zeros_like(ladj[tail]))
    y, ladj_f = bij.forward(u)
    assert torch.equal(y, u + s)
    assert torch.equal(ladj_f, torch.zeros_like(ladj_f))


@pytest.mark.parametrize("dt", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("scale", SCALES)
def test_spline_inverse_stays_in_box_and_within_paper_bound(dt, scale, device):
    """Inputs inside the box invert into [left, right]; |inverse(y) - (y - shift)| <= 1 for every y (Remark 2)."""
    w, h, d, _ = _stress_params(dt, device, scale)
    s = 3.0 * torch.randn(N_STRESS, dtype=dt, device=device)
    bij = RQSpline2Bin(w, h, d, s)
    assert bij.inverse_deviation_bound() == 1.0
    u = torch.cat([_stress_points(_knots(w, h)[1], -0.5, 0.5, dt, device),
                   4.0 * torch.rand(16, N_STRESS, dtype=dt, device=device) - 2.0])
    x, _ = bij.inverse(u + s)
    centred = (u + s) - s
    inside = (centred > -0.5) & (centred < 0.5)
    assert inside.any()
    assert torch.all((x[inside] >= -0.5) & (x[inside] <= 0.5))
    dev = (x - centred).abs()
    assert float(dev.max()) <= bij.inverse_deviation_bound()


def test_spline_box_with_mismatched_ranges_is_rejected_or_stays_invertible():
    """Bounds whose input range differs from the output range (left != bottom or right != top) must either be
    rejected at construction or still give an invertible map obeying inverse_deviation_bound().

    With identity tails such a box makes the map discontinuous at the box edges and non-injective (here x = 0.7 is a
    tail point with y = 0.7, and an interior point also maps to 0.7); a monotone curve from (left, bottom) to
    (right, top) can also pass near the corner (left, top), so |x - y| reaches max(top - left, right - bottom) = 1.5,
    not max(right - left, top - bottom) = 1.
    """
    bounds = (-0.5, 0.5, 0.0, 1.0)  # same width and height, output range shifted up by 0.5
    w, h, d = (torch.tensor([v], dtype=torch.float64) for v in (-10.0, 10.0, 0.0))
    try:
        bij = RQSpline2Bin(w, h, d, torch.zeros(1, dtype=torch.float64), bounds=bounds)
    except ValueError:
        return
    _, y1 = _knots(w, h, bounds)
    y = torch.cat([y1, torch.tensor([0.7, 0.9, -0.2], dtype=torch.float64)])
    x, _ = bij.inverse(y)
    deviation = float((x - y).abs().max())
    assert deviation <= bij.inverse_deviation_bound(), (
        f"deviation {deviation:.4f} exceeds inverse_deviation_bound() = {bij.inverse_deviation_bound()}")
    torch.testing.assert_close(bij.forward(x)[0], y, atol=1e-9, rtol=0)


@pytest.mark.parametrize("dt", DTYPES, ids=["float64", "float32"])
def test_spline_inverse_is_nan_free_at_interior_knot_with_tiny_derivative(dt, device):
    """d logit -30 (derivative ~1e-3) and y exactly at the interior y-knot (and one ulp either side): finite, at x1.

    This is where right-closed bins make zuko's discriminant round negative and return NaN.
    """
    n = N_STRESS
    w, h = (3.0 * torch.randn(n, dtype=dt, device=device) for _ in range(2))
    d = torch.full((n,), -30.0, dtype=dt, device=device)
    bij = RQSpline2Bin(w, h, d)
    x1, y1 = _knots(w, h)
    up, down = torch.nextafter(y1, torch.ones_like(y1)), torch.nextafter(y1, -torch.ones_like(y1))
    x, ladj = bij.inverse(torch.stack([y1, up, down]))
    assert _all_finite(x, ladj)
    torch.testing.assert_close(x[0], x1, atol=1e-12 if dt == torch.float64 else 1e-6, rtol=0)
    shifted = RQSpline2Bin(w, h, d, torch.randn(n, dtype=dt, device=device))
    xs, ladj_s = shifted.inverse(y1 + shifted.shift)
    assert _all_finite(xs, ladj_s)


@pytest.mark.parametrize("dt, d_logit", [(torch.float32, 50.0), (torch.float32, 89.0), (torch.float64, 710.0)],
                         ids=["float32-d50", "float32-d89", "float64-d710"])
def test_spline_large_derivative_logit_is_finite_and_inverts_correctly(dt, d_logit):
    """w = h = 0 (knot at the centre), a huge interior-derivative logit: the spline is a steep step at x = 0.

    Forward and inverse must stay finite, and inverse(+-0.3) must land at the step (x ~ 0: the float64 answer is
    within 1e-21 of 0), not at the box edge. exp(d) overflows at d > 88.7 (float32) / 709.8 (float64), and b**2 in
    the quadratic overflows from d ~ 46 (float32).
    """
    z = torch.zeros(1, dtype=dt)
    bij = RQSpline2Bin(z, z, torch.tensor([d_logit], dtype=dt))
    y, ladj_f = bij.forward(torch.tensor([-0.3, 0.0, 0.2], dtype=dt))
    x, ladj_i = bij.inverse(torch.tensor([-0.3, 0.3], dtype=dt))
    assert _all_finite(y, ladj_f, x, ladj_i), (
        f"forward {y.tolist()} {ladj_f.tolist()}, inverse {x.tolist()} {ladj_i.tolist()}")
    assert float(x.abs().max()) < 1e-6, f"inverse(+-0.3) = {x.tolist()}, expected ~0"


@pytest.mark.parametrize("scale", [1, 3])
def test_spline_float32_inverse_agrees_with_float64_where_well_conditioned(scale):
    """The float32 inverse loses no more than rounding allows: |x32 - x64| <= 200 eps32 (1 + |dx/dy|), and its ladj
    agrees with float64 to 0.5.

    A cancellation-prone root (2c / (-b - sqrt(disc)) when b < 0) breaks this even where the inverse is
    well-conditioned.
    """
    n = 20000
    w, h, d, s = (scale * torch.randn(n) for _ in range(4))
    u = 1.2 * torch.rand(n) - 0.6 + s
    x32, l32 = RQSpline2Bin(w, h, d, s).inverse(u)
    x64, l64 = RQSpline2Bin(w.double(), h.double(), d.double(), s.double()).inverse(u.double())
    ratio = (x32.double() - x64).abs() / (torch.finfo(torch.float32).eps * (1 + torch.exp(l64)))
    worst = int(ratio.argmax())
    assert float(ratio.max()) <= 200, (
        f"float32 inverse off by {float(ratio.max()):.3g} x rounding at w={w[worst]:.6g}, h={h[worst]:.6g}, "
        f"d={d[worst]:.6g}, shift={s[worst]:.6g}, y={u[worst]:.9g}: x32={x32[worst]:.9g}, x64={x64[worst]:.9g}")
    assert float((l32.double() - l64).abs().max()) <= 0.5


def test_spline_float32_inverse_minimal_cancellation_case():
    """One well-conditioned point (dx/dy = e^-3.92 = 0.02) where the float32 inverse must match float64."""
    params = dict(w=3.33496, h=-5.20034, d=7.72417)
    y = -0.49903208
    out = {}
    for dt in (torch.float32, torch.float64):
        t = {k: torch.tensor([v], dtype=dt) for k, v in params.items()}
        out[dt] = RQSpline2Bin(t["w"], t["h"], t["d"]).inverse(torch.tensor([y], dtype=dt))
    (x32, l32), (x64, l64) = out[torch.float32], out[torch.float64]
    assert abs(float(x64) - 0.4646613139) < 1e-9 and abs(float(l64) + 3.9175) < 1e-3  # the reference itself
    assert abs(float(x32) - float(x64)) < 1e-6, f"x32 = {float(x32)!r}, x64 = {float(x64)!r}"
    assert abs(float(l32) - float(l64)) < 1e-3, f"ladj32 = {float(l32)!r}, ladj64 = {float(l64)!r}"


# -- affine: the exploding inverse -------------------------------------------------------------------------------------
def test_affine_inverse_slope_approaches_one_over_eps():
    """raw -> -inf: scale -> eps, so the inverse slope 1/scale -> 1/eps = 1e4 (ladj_inverse -> log 1e4)."""
    eps = 1e-4
    raw = torch.full((5,), -50.0, dtype=torch.float64)
    bij = Affine(torch.zeros_like(raw), sigmoid_scale(raw, eps))
    _, ladj_inv = bij.inverse(torch.randn_like(raw))
    torch.testing.assert_close(ladj_inv, torch.full_like(raw, math.log(1e4)), atol=1e-3, rtol=0)
    assert affine_inverse_slope_bound(eps) == pytest.approx(1e4)
    assert torch.all(torch.exp(ladj_inv) <= affine_inverse_slope_bound(eps))


def test_reparam_affine_inverse_slope_never_exceeds_one_plus_eps():
    """scale = 1 / (sigmoid(raw + 2) + eps): the inverse slope stays <= 1 + eps for any raw, approaching it."""
    eps = 1e-4
    raw = torch.linspace(-60.0, 60.0, 4001, dtype=torch.float64)
    bij = Affine(torch.zeros_like(raw), 1.0 / sigmoid_scale(raw, eps))
    _, ladj_inv = bij.inverse(torch.randn_like(raw))
    bound = affine_inverse_slope_bound(eps, reparam=True)
    assert bound == pytest.approx(1 + eps)
    assert float(ladj_inv.max()) <= math.log(bound) + 1e-15
    assert float(ladj_inv.max()) == pytest.approx(math.log(bound), abs=1e-12)
