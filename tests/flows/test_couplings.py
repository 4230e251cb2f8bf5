"""Coupling-specific tests: zero heads give the documented initial map, the exploding-inverse bounds, the parameter
layouts of the network output, the tracer and the reference state_dict names.

The generic layer properties of the couplings (round trips, Jacobian log-determinants, gradients, state_dict round
trip) are in ``test_layers.py``.
"""
from __future__ import annotations

import math

import pytest
import torch

from robustness_diag.flows.couplings import CondAffineCoupling, CondRQSplineCoupling
from robustness_diag.flows.layers import Conv2dZeros, LevelCondition

B, C, H, W = 2, 4, 3, 3
COND_CHANNELS = 3
HIDDEN = 8
S0 = 1 / (1 + math.exp(-2.0)) + 1e-4  # sigmoid(0 + 2) + eps: SRFlow's initial scale


def _coupling(cls, std=False, channels=C, **kw):
    return cls(channels, cond_channels=COND_CHANNELS, hidden=HIDDEN, std_channels=3 if std else 0, use_std=std,
               **kw).double()


def _cond(std=False, dtype=torch.float64):
    return LevelCondition(features=torch.randn(B, COND_CHANNELS, H, W, dtype=dtype),
                          std=torch.rand(1, 3, H, W, dtype=dtype) if std else None)


def _randomize_heads(module, scale=0.1):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, Conv2dZeros):
                for p in (m.weight, m.bias, m.logs):
                    p.copy_(scale * torch.randn_like(p))


def _head(coupling, stage):
    """The Conv2dZeros head (last module) of the network of ``stage`` ('self', 'features' or 'std')."""
    self_name, feat_name, std_name = coupling.net_names
    return getattr(coupling, {"self": self_name, "features": feat_name, "std": std_name}[stage])[-1]


def _trace(coupling, y, cond):
    traced = []
    with torch.no_grad():
        coupling.inverse_map(y, cond, tracer=lambda stage, ladj: traced.append((stage, ladj)))
    return traced


# -- zero heads --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("std", [False, True], ids=["plain", "std"])
def test_rq_coupling_with_zero_heads_is_exact_identity(std):
    """Fresh (zero-head) RQ coupling: y == x and ladj == 0 to 1e-12 in both directions, box and tails alike."""
    coupling = _coupling(CondRQSplineCoupling, std=std)
    cond = _cond(std)
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    x[0, 0, 0, :3] = torch.tensor([-0.5, 0.5, 1e3], dtype=torch.float64)
    with torch.no_grad():
        for out, ladj in (coupling.forward_map(x, cond), coupling.inverse_map(x, cond)):
            torch.testing.assert_close(out, x, atol=1e-12, rtol=0)
            torch.testing.assert_close(ladj, torch.zeros_like(ladj), atol=1e-12, rtol=0)


@pytest.mark.parametrize("std", [False, True], ids=["plain", "std"])
@pytest.mark.parametrize("reparam", [False, True], ids=["affine", "reparam"])
def test_affine_coupling_with_zero_heads_is_the_elementwise_initial_scale(std, reparam):
    """Zero heads: every stage multiplies by s = sigmoid(2) + eps = 0.8809 (reparam: 1/s). The features stage acts on
    all channels, the std and self stages on z2, so z1 is scaled by s and z2 by s^(1 + number of z2 stages)."""
    assert S0 == pytest.approx(0.8808 + 1e-4, abs=1e-4)
    coupling = _coupling(CondAffineCoupling, std=std, reparam=reparam)
    cond = _cond(std)
    s = 1 / S0 if reparam else S0
    z2_stages = 2 if std else 1
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    with torch.no_grad():
        y, ladj = coupling.forward_map(x, cond)
    c_nn = C // 2
    torch.testing.assert_close(y[:, :c_nn], x[:, :c_nn] * s, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y[:, c_nn:], x[:, c_nn:] * s ** (1 + z2_stages), atol=1e-12, rtol=1e-12)
    expected = (C + z2_stages * (C - c_nn)) * math.log(s)
    torch.testing.assert_close(ladj, torch.full_like(ladj, expected), atol=1e-12, rtol=0)


def test_std_branch_runs_only_when_enabled_and_given_a_std_map():
    """Stages in sampling order: self, std, features; std is skipped for use_std=False or a missing std map."""
    on = _coupling(CondAffineCoupling, std=True)
    off = CondAffineCoupling(C, cond_channels=COND_CHANNELS, hidden=HIDDEN, std_channels=3, use_std=False).double()
    y = torch.randn(B, C, H, W, dtype=torch.float64)
    assert [s for s, _ in _trace(on, y, _cond(std=True))] == ["self", "std", "features"]
    assert [s for s, _ in _trace(on, y, _cond(std=False))] == ["self", "features"]
    assert [s for s, _ in _trace(off, y, _cond(std=True))] == ["self", "features"]
    assert any(k.startswith("fAffine_std.") for k in off.state_dict())  # the weights exist either way


@pytest.mark.parametrize("cls", [CondAffineCoupling, CondRQSplineCoupling])
def test_tracer_ladj_are_elementwise_and_sum_to_the_inverse_ladj_map(cls):
    """Each traced ladj is [B, C_stage, H, W]; their channel sums add up to inverse_map's ladj map."""
    coupling = _coupling(cls, std=True)
    _randomize_heads(coupling)
    cond = _cond(std=True)
    y = torch.randn(B, C, H, W, dtype=torch.float64)
    with torch.no_grad():
        _, ladj = coupling.inverse_map(y, cond)
        traced = _trace(coupling, y, cond)
    shapes = {stage: tuple(t.shape) for stage, t in traced}
    assert shapes == {"self": (B, C - C // 2, H, W), "std": (B, C - C // 2, H, W), "features": (B, C, H, W)}
    torch.testing.assert_close(sum(t.sum(dim=1) for _, t in traced), ladj, atol=1e-12, rtol=0)


# -- network output layouts --------------------------------------------------------------------------------------------
def test_rq_coupling_reads_parameters_channel_major():
    """The RQ network output is [B, C, 4, H, W]: per channel (width, height, derivative, shift). With zero logits and
    only the shift slots set, the features stage is y = x + shift exactly on every channel."""
    coupling = _coupling(CondRQSplineCoupling)
    shifts = torch.arange(1.0, C + 1, dtype=torch.float64)
    with torch.no_grad():
        _head(coupling, "features").bias[3::4] = shifts
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    with torch.no_grad():
        y, ladj = coupling.forward_map(x, _cond())
    # z2 then goes through the zero-head self stage (identity)
    torch.testing.assert_close(y, x + shifts.view(1, C, 1, 1), atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, torch.zeros_like(ladj), atol=1e-12, rtol=0)


def test_affine_coupling_reads_shift_and_scale_cross():
    """The affine network output is 'cross': even channels are shifts, odd channels raw scales."""
    coupling = _coupling(CondAffineCoupling)
    shifts = torch.arange(1.0, C + 1, dtype=torch.float64)
    raw = torch.linspace(-1.0, 1.0, C, dtype=torch.float64)
    with torch.no_grad():
        _head(coupling, "features").bias[0::2] = shifts
        _head(coupling, "features").bias[1::2] = raw
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    with torch.no_grad():
        traced = _trace(coupling, x, _cond())
    features_ladj = dict(traced)["features"]
    scale = torch.sigmoid(raw + 2.0) + 1e-4
    torch.testing.assert_close(features_ladj, (-torch.log(scale)).view(1, C, 1, 1).expand(B, C, H, W),
                               atol=1e-12, rtol=0)
    with torch.no_grad():
        y, _ = coupling.forward_map(x, _cond())
    expected = (x + shifts.view(1, C, 1, 1)) * scale.view(1, C, 1, 1)
    torch.testing.assert_close(y[:, :C // 2], expected[:, :C // 2], atol=1e-12, rtol=0)  # z1: features stage only


# -- exploding inverse -------------------------------------------------------------------------------------------------
def test_inverse_slope_bounds_are_reported():
    """Affine: 1/eps (1e4 for eps 1e-4); reparam: 1 + eps; RQ: additive deviation of the box width (1)."""
    assert CondAffineCoupling(C, COND_CHANNELS, HIDDEN).inverse_slope_bound()["max_inverse_slope"] == pytest.approx(1e4)
    assert CondAffineCoupling(C, COND_CHANNELS, HIDDEN, eps=1e-3).inverse_slope_bound()["max_inverse_slope"] == \
        pytest.approx(1e3)
    reparam = CondAffineCoupling(C, COND_CHANNELS, HIDDEN, reparam=True).inverse_slope_bound()
    assert reparam["max_inverse_slope"] == pytest.approx(1 + 1e-4)
    rq = CondRQSplineCoupling(C, COND_CHANNELS, HIDDEN).inverse_slope_bound()
    assert rq["kind"] == "additive" and rq["max_inverse_deviation"] == pytest.approx(1.0)


def test_affine_coupling_inverse_slope_reaches_one_over_eps():
    """raw = -50 in the self stage: the traced inverse log-slope there is log(1/eps) = log 1e4 (within 1e-3), and no
    stage exceeds the reported bound."""
    coupling = _coupling(CondAffineCoupling)
    with torch.no_grad():
        _head(coupling, "self").bias[1::2] = -50.0
    bound = coupling.inverse_slope_bound()["max_inverse_slope"]
    traced = dict(_trace(coupling, torch.randn(B, C, H, W, dtype=torch.float64), _cond()))
    torch.testing.assert_close(traced["self"], torch.full_like(traced["self"], math.log(1e4)), atol=1e-3, rtol=0)
    assert all(float(t.max()) <= math.log(bound) + 1e-12 for t in traced.values())


@pytest.mark.parametrize("std", [False, True], ids=["plain", "std"])
def test_reparam_coupling_inverse_slope_never_exceeds_one_plus_eps(std):
    """Heads with large random values (raw up to about +-50): every traced inverse log-slope <= log(1 + eps), and the
    bound is approached."""
    coupling = _coupling(CondAffineCoupling, std=std, reparam=True)
    _randomize_heads(coupling, scale=1.0)
    with torch.no_grad():
        for stage in ("self", "features") + (("std",) if std else ()):
            head = _head(coupling, stage)
            head.bias[1::2] = 50.0 * torch.randn_like(head.bias[1::2])
    bound = coupling.inverse_slope_bound()["max_inverse_slope"]
    y = 3.0 * torch.randn(B, C, H, W, dtype=torch.float64)
    traced = _trace(coupling, y, _cond(std))
    top = max(float(t.max()) for _, t in traced)
    assert top <= math.log(bound) + 1e-12
    assert top == pytest.approx(math.log(bound), abs=1e-6)


# -- reference names ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, names", [(CondAffineCoupling, ("fAffine", "fFeatures", "fAffine_std")),
                                        (CondRQSplineCoupling, ("fRQspline", "fFeatures", "fRQspline_std"))])
def test_subnetworks_use_reference_names_and_order(cls, names):
    """Sub-networks are registered as (self, features, std) under the reference names, with SRFlow's key layout."""
    coupling = cls(C, cond_channels=COND_CHANNELS, hidden=HIDDEN, std_channels=3)
    assert tuple(n for n, _ in coupling.named_children()) == names
    keys = set(coupling.state_dict())
    for net in names:
        for key in ("0.weight", "0.actnorm.bias", "0.actnorm.logs", "2.weight", "2.actnorm.bias", "2.actnorm.logs",
                    "4.weight", "4.bias", "4.logs"):
            assert f"{net}.{key}" in keys
    assert not any(k.startswith(names[2]) for k in cls(C, cond_channels=COND_CHANNELS, hidden=HIDDEN).state_dict())
