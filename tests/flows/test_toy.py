"""The 2-D toy shows the mechanism: OOD conditions explode the affine inverse, the spline's stays bounded."""
from __future__ import annotations

import math

import pytest
import torch

from robustness_diag.flows.toy import ToyConfig, ToyFlow, toy_data, train_toy

OOD = (-100.0, -30.0, -10.0, 10.0, 30.0, 100.0)


@pytest.fixture(scope="module")
def trained(trained_toys):
    return trained_toys


def _trace(flow, yv, n=1000):
    return flow.sample(torch.full((n, 1), yv), generator=torch.Generator().manual_seed(1))[1]


def test_training_learns_the_data(trained):
    g = torch.Generator().manual_seed(5)
    x, y = toy_data(2000, g)
    for flow in trained.values():
        assert flow.log_prob(x, y).mean() > 0.0  # a standard normal fit of this data scores about -1.5


def test_affine_inverse_explodes_for_ood_conditions(trained):
    flow = trained["affine"]
    ind = max(float(_trace(flow, yv)["coupling_max_log_slope"].max()) for yv in (-0.9, 0.0, 0.9))
    ood = max(float(_trace(flow, yv)["coupling_max_log_slope"].max()) for yv in OOD)
    assert ood > ind + math.log(100), (ind, ood)          # inverse slope larger by > 2 orders of magnitude
    assert ood <= math.log(1 / flow.cfg.eps) + 1e-3        # but never past the 1/eps bound
    var_ind = float(_trace(flow, 0.0)["variance"].max())
    var_ood = max(float(_trace(flow, yv)["variance"].max()) for yv in OOD)
    assert var_ood > 1e3 * var_ind, (var_ind, var_ood)


def test_spline_inverse_stays_bounded_for_ood_conditions(trained):
    flow = trained["rqspline"]
    var_ind = float(_trace(flow, 0.0)["variance"].max())
    for yv in OOD:
        tr = _trace(flow, yv)
        assert float(tr["coupling_max_deviation"].max()) <= 1.0 + 1e-6   # box width of [-0.5, 0.5]
        assert float(tr["variance"].max()) < 10 * var_ind
        assert torch.isfinite(tr["variance"]).all()


def test_log_prob_matches_autograd_jacobian():
    torch.manual_seed(0)
    for coupling in ("affine", "rqspline"):
        flow = ToyFlow(ToyConfig(coupling=coupling, hidden=8, n_hidden=1)).double()
        for p in flow.parameters():
            p.data += 0.3 * torch.randn_like(p)
        x, y = torch.randn(5, 2, dtype=torch.float64) * 0.3, torch.rand(5, 1, dtype=torch.float64)

        def to_z(xi, yi):
            z = xi[None]
            for k in range(flow.cfg.blocks):
                z = (z + flow.an_bias[k]) * torch.exp(flow.an_logs[k])
                z = z @ flow.ic[k].t()
                z, _ = flow.couplings[k](z, yi[None])
            return z[0]

        for i in range(5):
            jac = torch.autograd.functional.jacobian(lambda v: to_z(v, y[i]), x[i])
            z = to_z(x[i], y[i])
            expected = torch.linalg.slogdet(jac)[1] - 0.5 * (z.pow(2).sum() + 2 * math.log(2 * math.pi))
            torch.testing.assert_close(flow.log_prob(x[i:i + 1], y[i:i + 1])[0], expected, rtol=1e-9, atol=1e-9)


def test_training_is_deterministic():
    a, ha = train_toy("affine", steps=20, seed=3)
    b, hb = train_toy("affine", steps=20, seed=3)
    assert ha == hb
