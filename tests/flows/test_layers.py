"""Property tests of the flow layers: ActNorm2d, InvConv1x1, FrozenInvConv1x1, Squeeze, the two conditional couplings
(omnibus), plus squeeze2d's channel order, Split2d and the 1x1 convolutions' specifics.

Layer contract under test: ``forward_map(x, cond) -> (y, ladj_map[B, H_out, W_out])`` (density direction),
``inverse_map(y, cond) -> (x, ladj_map)`` (sampling), and ``forward``/``inverse`` returning ``ladj[B]``, the map's sum.
"""
from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

from robustness_diag.flows.couplings import CondAffineCoupling, CondRQSplineCoupling
from robustness_diag.flows.layers import (
    ActNorm2d,
    Conv2dZeros,
    FrozenInvConv1x1,
    InvConv1x1,
    LevelCondition,
    Split2d,
    Squeeze,
    squeeze2d,
    unsqueeze2d,
)

B = 2
COND_CHANNELS = 3
HIDDEN = 8


def _tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-4


def _randomize_heads(module: torch.nn.Module, scale: float = 0.1) -> None:
    """Gives every zero-initialised Conv2dZeros head small random values so that the couplings are not the identity."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, Conv2dZeros):
                for p in (m.weight, m.bias, m.logs):
                    p.copy_(scale * torch.randn_like(p))


def _randomize_actnorms(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, ActNorm2d):
                m.bias.copy_(0.3 * torch.randn_like(m.bias))
                m.logs.copy_(0.3 * torch.randn_like(m.logs))


# -- factories: name -> () -> (layer, input shape, condition spec or None); built on CPU in float32 ------------------
def _actnorm():
    layer = ActNorm2d(4)
    _randomize_actnorms(layer)
    return layer, (B, 4, 3, 3), None


def _invconv():
    weight = torch.randn(4, 4) + 2.0 * torch.eye(4)  # generic, not orthogonal: slogdet != 0
    return InvConv1x1(4, weight), (B, 4, 3, 3), None


def _frozen():
    weight = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]  # orthogonal to float64 precision
    return FrozenInvConv1x1(4, weight), (B, 4, 3, 3), None


def _squeeze():
    return Squeeze(), (B, 2, 4, 4), None


def _coupling(cls, channels=4, std=False, **kw):
    def make():
        layer = cls(channels, cond_channels=COND_CHANNELS, hidden=HIDDEN, std_channels=3 if std else 0,
                    use_std=std, **kw)
        _randomize_heads(layer)
        _randomize_actnorms(layer)
        return layer, (B, channels, 2, 2), dict(std=std)
    return make


LAYERS = {
    "actnorm": _actnorm,
    "invconv": _invconv,
    "frozen_invconv": _frozen,
    "squeeze": _squeeze,
    "affine_coupling": _coupling(CondAffineCoupling),
    "affine_coupling_reparam": _coupling(CondAffineCoupling, reparam=True),
    "affine_coupling_std": _coupling(CondAffineCoupling, std=True),
    "affine_coupling_odd_channels": _coupling(CondAffineCoupling, channels=3),
    "rq_coupling": _coupling(CondRQSplineCoupling),
    "rq_coupling_std": _coupling(CondRQSplineCoupling, std=True),
}
TRAINABLE = [name for name in LAYERS if name not in ("frozen_invconv", "squeeze")]


def _make(name, dtype, device, seed=0):
    """Builds layer ``name`` (parameters from ``seed``), an input and its condition, on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    layer, shape, cond_spec = LAYERS[name]()
    layer = layer.to(device=device, dtype=dtype)
    torch.manual_seed(1000 + seed)
    x = 0.5 * torch.randn(shape, dtype=dtype, device=device)
    cond = None
    if cond_spec is not None:
        h, w = shape[2], shape[3]
        features = torch.randn(shape[0], COND_CHANNELS, h, w, dtype=dtype, device=device)
        std = torch.rand(1, 3, h, w, dtype=dtype, device=device) if cond_spec["std"] else None
        cond = LevelCondition(features=features, std=std)
    return layer, x, cond


def _slice_cond(cond, b):
    if cond is None:
        return None
    return LevelCondition(features=cond.features[b:b + 1], std=cond.std)


# -- omnibus --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LAYERS)
def test_layer_shapes_and_ladj_map_sums_to_ladj(name, dtype, device):
    """ladj maps are [B, H_out, W_out] in both directions and forward/inverse return their sums, shape [B]."""
    layer, x, cond = _make(name, dtype, device)
    with torch.no_grad():
        y, m_f = layer.forward_map(x, cond)
        y2, l_f = layer.forward(x, cond)
        x_back, m_i = layer.inverse_map(y, cond)
        _, l_i = layer.inverse(y, cond)
    assert y.numel() == x.numel() and y.shape[0] == B and y.dtype == dtype
    assert x_back.shape == x.shape
    assert m_f.shape == (B, y.shape[2], y.shape[3])
    assert m_i.shape == (B, x.shape[2], x.shape[3])
    assert l_f.shape == (B,) and l_i.shape == (B,)
    assert torch.equal(y2, y)
    torch.testing.assert_close(l_f, m_f.sum(dim=(1, 2)), atol=0, rtol=0)
    torch.testing.assert_close(l_i, m_i.sum(dim=(1, 2)), atol=0, rtol=0)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_inverse_of_forward_is_identity(name, dtype, device):
    """inverse_map(forward_map(x)) == x."""
    layer, x, cond = _make(name, dtype, device)
    with torch.no_grad():
        x_rt, _ = layer.inverse_map(layer.forward_map(x, cond)[0], cond)
    torch.testing.assert_close(x_rt, x, atol=_tol(dtype), rtol=0)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_forward_of_inverse_is_identity(name, dtype, device):
    """forward_map(inverse_map(y)) == y for a random y."""
    layer, x, cond = _make(name, dtype, device)
    with torch.no_grad():
        y = torch.randn_like(layer.forward_map(x, cond)[0]) * 0.5
        y_rt, _ = layer.forward_map(layer.inverse_map(y, cond)[0], cond)
    torch.testing.assert_close(y_rt, y, atol=_tol(dtype), rtol=0)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_forward_and_inverse_ladj_maps_cancel(name, dtype, device):
    """ladj_map_forward(x) + ladj_map_inverse(forward(x)) == 0 at every position (summed when the resolutions differ,
    as for the squeeze, whose maps live at each direction's output resolution)."""
    layer, x, cond = _make(name, dtype, device)
    with torch.no_grad():
        y, m_f = layer.forward_map(x, cond)
        _, m_i = layer.inverse_map(y, cond)
    if m_f.shape == m_i.shape:
        torch.testing.assert_close(m_f + m_i, torch.zeros_like(m_f), atol=10 * _tol(dtype), rtol=0)
    total = m_f.sum(dim=(1, 2)) + m_i.sum(dim=(1, 2))
    torch.testing.assert_close(total, torch.zeros_like(total), atol=100 * _tol(dtype), rtol=0)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_layer_ladj_matches_autograd_jacobian_slogdet(name, direction, device):
    """In float64, per batch element: ladj == log|det J| of the flattened map (autograd Jacobian, torch.slogdet)."""
    layer, x, cond = _make(name, torch.float64, device)
    with torch.no_grad():
        inp = x if direction == "forward" else layer.forward_map(x, cond)[0]
    fn = getattr(layer, direction)
    _, ladj = fn(inp, cond)
    for b in range(B):
        cb = _slice_cond(cond, b)
        shape = (1, *inp.shape[1:])
        jac = torch.autograd.functional.jacobian(lambda v: fn(v.view(shape), cb)[0].flatten(), inp[b].flatten())
        sign, logabsdet = torch.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(ladj[b].detach(), logabsdet, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_batch_elements_are_independent(name, dtype, device):
    """Running one batch element alone gives the same output and ladj as inside the batch."""
    layer, x, cond = _make(name, dtype, device)
    with torch.no_grad():
        y, m = layer.forward_map(x, cond)
        y1, m1 = layer.forward_map(x[1:2], _slice_cond(cond, 1))
    torch.testing.assert_close(y1, y[1:2], atol=_tol(dtype), rtol=0)
    torch.testing.assert_close(m1, m[1:2], atol=_tol(dtype), rtol=0)


@pytest.mark.parametrize("name", TRAINABLE)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_layer_gradients_reach_every_parameter(name, direction, dtype, device):
    """loss = y.sum() + ladj.sum() gives every trainable parameter a finite, non-zero gradient."""
    layer, x, cond = _make(name, dtype, device)
    y, ladj = getattr(layer, direction)(x, cond)
    (y.sum() + ladj.sum()).backward()
    params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    assert params
    for n, p in params:
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", ["frozen_invconv", "squeeze"])
def test_frozen_layers_have_no_trainable_parameters(name):
    """The frozen 1x1 conv and the squeeze expose nothing for an optimiser."""
    layer, _, _ = LAYERS[name]()
    assert not [n for n, p in layer.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("name", LAYERS)
def test_layer_state_dict_round_trip(name, dtype, device):
    """A differently initialised layer loaded with another's state_dict gives identical outputs in both directions."""
    a, x, cond = _make(name, dtype, device, seed=0)
    b, _, _ = _make(name, dtype, device, seed=1)
    with torch.no_grad():
        ya, la = a.forward(x, cond)
        if a.state_dict():
            assert not torch.equal(b.forward(x, cond)[0], ya), "the two layers should differ before loading"
        else:
            assert name == "squeeze"
        b.load_state_dict(a.state_dict())
        yb, lb = b.forward(x, cond)
        assert torch.equal(yb, ya) and torch.equal(lb, la)
        assert torch.equal(b.inverse(ya, cond)[0], a.inverse(ya, cond)[0])


# -- ActNorm -----------------------------------------------------------------------------------------------------------
def test_actnorm_default_is_identity_and_ladj_is_sum_of_logs(dtype, device):
    """Fresh ActNorm2d is the identity; with parameters, ladj per position == sum_c logs."""
    layer = ActNorm2d(4).to(device=device, dtype=dtype)
    x = torch.randn(B, 4, 3, 3, dtype=dtype, device=device)
    y, m = layer.forward_map(x)
    assert torch.equal(y, x) and torch.equal(m, torch.zeros_like(m))
    _randomize_actnorms(layer)
    _, m = layer.forward_map(x)
    torch.testing.assert_close(m, layer.logs.sum().detach().expand(B, 3, 3), atol=_tol(dtype), rtol=0)


# -- squeeze -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [2, 3])
def test_squeeze2d_channel_order_and_exact_inverse(factor):
    """squeeze2d puts x[b, c, f*i + dy, f*j + dx] at channel c*f*f + f*dy + dx, position (i, j); unsqueeze2d
    undoes it."""
    b, c, h, w = 2, 3, 2 * factor, 3 * factor
    x = torch.arange(b * c * h * w, dtype=torch.float64).view(b, c, h, w)
    y = squeeze2d(x, factor)
    assert y.shape == (b, c * factor * factor, h // factor, w // factor)
    for ci in range(c):
        for dy in range(factor):
            for dx in range(factor):
                assert torch.equal(y[:, ci * factor * factor + factor * dy + dx], x[:, ci, dy::factor, dx::factor])
    assert torch.equal(unsqueeze2d(y, factor), x)
    z = torch.randn(b, c * factor * factor, 2, 3)
    assert torch.equal(squeeze2d(unsqueeze2d(z, factor), factor), z)


# -- Split2d -----------------------------------------------------------------------------------------------------------
def _split(channels, dtype, device):
    split = Split2d(channels)
    _randomize_heads(split, scale=0.3)
    return split.to(device=device, dtype=dtype)


@pytest.mark.parametrize("channels", [4, 6, 5])
def test_split2d_decode_inverts_encode(channels, dtype, device):
    """decode(encode(z)) == z; keep + consume channels == C."""
    split = _split(channels, dtype, device)
    z = torch.randn(B, channels, 3, 3, dtype=dtype, device=device)
    with torch.no_grad():
        z1, eps, logp = split.encode(z)
        z_back, _ = split.decode(z1, eps)
    assert z1.shape[1] == split.keep and eps.shape[1] == split.consume == channels - split.keep
    assert logp.shape == (B, 3, 3)
    torch.testing.assert_close(z_back, z, atol=_tol(dtype), rtol=0)


def test_split2d_log_density_is_the_gaussian_of_the_consumed_channels(dtype, device):
    """encode's log-density map == sum over consumed channels of Normal(mean, exp(logs)).log_prob(z2)."""
    split = _split(6, dtype, device)
    z = torch.randn(B, 6, 3, 3, dtype=dtype, device=device)
    with torch.no_grad():
        _, _, logp = split.encode(z)
        h = split.conv(z[:, :3])  # independent: (mean, logs) interleaved along channels ('cross')
        expected = Normal(h[:, 0::2], torch.exp(h[:, 1::2])).log_prob(z[:, 3:]).sum(dim=1)
    torch.testing.assert_close(logp, expected, atol=10 * _tol(dtype), rtol=1e-6)


def test_split2d_decode_ladj_matches_autograd(device):
    """decode's per-position ladj == log|det dz2/deps| (float64 autograd)."""
    split = _split(4, torch.float64, device)
    z1 = torch.randn(1, 2, 2, 2, dtype=torch.float64, device=device)
    eps = torch.randn(1, 2, 2, 2, dtype=torch.float64, device=device)
    jac = torch.autograd.functional.jacobian(lambda e: split.decode(z1, e.view(eps.shape))[0][:, 2:].flatten(),
                                             eps.flatten())
    _, ladj = split.decode(z1, eps)
    torch.testing.assert_close(ladj.sum().detach(), torch.slogdet(jac)[1], atol=1e-10, rtol=0)


# -- 1x1 convolutions --------------------------------------------------------------------------------------------------
def _conditioned_weight(channels, cond):
    """A [C, C] float64 matrix with singular values log-spaced from 1 to 1/cond."""
    q1 = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
    s = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), channels, dtype=torch.float64)
    return (q1 * s) @ q2.T


def test_invconv_inverse_uses_a_float64_inverse():
    """The sampling direction convolves with inverse(weight.double()) cast back to the weight's dtype, exactly."""
    layer = InvConv1x1(8, _conditioned_weight(8, 1e3).float())
    y = torch.randn(2, 8, 4, 4)
    w_inv = torch.inverse(layer.weight.detach().double()).float()
    expected = torch.nn.functional.conv2d(y, w_inv.view(8, 8, 1, 1))
    with torch.no_grad():
        x, _ = layer.inverse_map(y)
    assert torch.equal(x, expected)


def test_invconv_float32_round_trip_on_an_ill_conditioned_weight():
    """cond(W) ~ 1e3 in float32: decode(encode(x)) is as good as an exact float64 decode of the float32 latent.

    1e-6 is not attainable here: the float32 latent y = W x already carries a rounding error that W^-1 amplifies by
    up to cond(W), so even exact float64 inversion of that y is ~5e-5 away from x (measured). The assertions:
    the decode is within 4 * cond * eps32 * max|y| of the exact decode, and the round trip within
    8 * cond * eps32 * max|x|.
    """
    cond = 1e3
    layer = InvConv1x1(8, _conditioned_weight(8, cond).float())
    assert layer.condition_number() == pytest.approx(cond, rel=1e-3)
    x = torch.randn(4, 8, 8, 8)
    eps32 = torch.finfo(torch.float32).eps
    with torch.no_grad():
        y, _ = layer.forward_map(x)
        x_back, _ = layer.inverse_map(y)
    exact = torch.nn.functional.conv2d(y.double(), torch.inverse(layer.weight.detach().double()).view(8, 8, 1, 1))
    assert float((x_back.double() - exact).abs().max()) <= 4 * cond * eps32 * float(y.abs().max())
    assert float((x_back - x).abs().max()) <= 8 * cond * eps32 * float(x.abs().max())


def test_invconv_float64_round_trip_on_an_ill_conditioned_weight():
    """The same cond ~ 1e3 weight in float64 round-trips to 1e-10."""
    layer = InvConv1x1(8, _conditioned_weight(8, 1e3)).double()
    x = torch.randn(4, 8, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        x_back, _ = layer.inverse_map(layer.forward_map(x)[0])
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)


def test_frozen_invconv_is_orthogonal_with_matching_transpose_and_zero_ladj(dtype, device):
    """weight_transpose == weight^T after construction, orthogonality_error() small, ladj zero, |det J| == 1."""
    layer = FrozenInvConv1x1(6).to(device=device, dtype=dtype)
    w = layer.weight[:, :, 0, 0]
    assert torch.equal(layer.weight_transpose[:, :, 0, 0], w.t())
    assert layer.weight.shape == layer.weight_transpose.shape == (6, 6, 1, 1)
    ortho, transpose = layer.orthogonality_error()
    assert ortho < 1e-5 and transpose == 0.0
    assert layer.condition_number() == pytest.approx(1.0, abs=1e-5)
    x = torch.randn(B, 6, 3, 3, dtype=dtype, device=device)
    with torch.no_grad():
        y, m_f = layer.forward_map(x)
        _, m_i = layer.inverse_map(y)
    assert torch.equal(m_f, torch.zeros_like(m_f)) and torch.equal(m_i, torch.zeros_like(m_i))
    assert float(torch.slogdet(w.double())[1].abs()) < 1e-5
    torch.testing.assert_close(y.pow(2).sum(dim=1), x.pow(2).sum(dim=1), atol=10 * _tol(dtype), rtol=1e-5)
