"""Streaming float64 moments, shrinkage from moments (against scikit-learn), and the whitening factor."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import OAS, EmpiricalCovariance, LedoitWolf

from robustness_diag.ood import GaussianAccumulator, MahalanobisScorer, shrunk_covariance, whitening_factor
from robustness_diag.ood.errors import NotFittedError
from tests.ood.helpers import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=2000, d=16, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ a + offset


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _moments(x):
    c = x - x.mean(0)
    q = (c * c).sum(1)
    return c.T @ c, q @ c, (q * q).sum()


def test_streaming_over_uneven_batches_and_shards_equals_one_shot():
    x = _data()
    ref_mean = x.mean(0)
    ref_m2, ref_t3, ref_q4 = _moments(x)
    # shards of uneven sizes, each streamed in uneven batches, merged in a different order
    bounds = [0, 1, 7, 300, 301, 1200, 2000]
    shards = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc = GaussianAccumulator(x.shape[1], chunk=13)
        for part in x[a:b].split(97):
            acc.update(part)
        shards.append(acc)
    total = GaussianAccumulator(x.shape[1])
    for acc in shards[::-1]:
        total.merge(acc)
    assert total.n == x.shape[0]
    assert _rel(total.mean, ref_mean) < 1e-10
    assert _rel(total.m2, ref_m2) < 1e-10
    assert _rel(total.t3, ref_t3) < 1e-10
    assert abs(float(total.q4 / ref_q4) - 1) < 1e-10
    assert _rel(total.covariance(), torch.cov(x.T, correction=0)) < 1e-10


def test_update_accepts_float32_and_keeps_float64_accumulators():
    x = _data(n=500, d=5).float()
    acc = GaussianAccumulator(5).update(x)
    assert acc.mean.dtype == torch.float64 and acc.m2.dtype == torch.float64
    assert _rel(acc.covariance(), torch.cov(x.double().T, correction=0)) < 1e-12


def test_large_offset_does_not_lose_precision():
    """The naive sum(x x^T) - n mu mu^T fails with a large mean; Chan merges do not."""
    x = _data(n=3000, d=4, offset=1e6)
    acc = GaussianAccumulator(4)
    for part in x.split(10):
        acc.update(part)
    assert _rel(acc.covariance(), torch.cov((x - 1e6).T, correction=0)) < 1e-8


@pytest.mark.parametrize("method,cls", [("oas", OAS), ("ledoit_wolf", LedoitWolf)])
@pytest.mark.parametrize("n", [40, 3000])   # n < d regime and n >> d
def test_shrinkage_matches_scikit_learn(method, cls, n):
    x = _data(n=n, d=60 if n == 40 else 16, seed=n)
    acc = GaussianAccumulator(x.shape[1])
    for part in x.split(17):
        acc.update(part)
    cov, coef = shrunk_covariance(acc, method)
    sk = cls().fit(x.numpy())
    assert abs(coef - sk.shrinkage_) < 1e-10 * max(1.0, sk.shrinkage_)
    assert _rel(cov, torch.from_numpy(sk.covariance_)) < 1e-10


def test_ridge_is_relative_to_the_trace_and_none_is_empirical():
    x = _data(n=400, d=6)
    acc = GaussianAccumulator(6).update(x)
    s = acc.covariance()
    cov, coef = shrunk_covariance(acc, "ridge", ridge=0.1)
    assert coef == 0.1
    assert torch.allclose(cov, s + 0.1 * torch.trace(s) / 6 * torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    cov_c, _ = shrunk_covariance(GaussianAccumulator(6).update(x * 7.0), "ridge", ridge=0.1)
    assert torch.allclose(cov_c, 49.0 * cov, rtol=1e-12)          # scales with the data: no absolute epsilon
    none, _ = shrunk_covariance(acc, "none")
    assert torch.equal(none, s)
    with pytest.raises(ValueError, match="unknown shrinkage"):
        shrunk_covariance(acc, "bogus")


def test_distance_equals_scikit_learn_empirical_mahalanobis():
    x = _data(n=1500, d=10)
    acc = GaussianAccumulator(10).update(x)
    sc = MahalanobisScorer.from_accumulators({"fea_up1": acc}, shrinkage="none")
    sc.compute_dtype = torch.float64
    ref = EmpiricalCovariance().fit(x.numpy()).mahalanobis(x.numpy())   # squared distances
    d = sc.distance(x)
    assert np.abs(d.numpy() ** 2 - ref).max() / ref.max() < 1e-10


@pytest.mark.parametrize("kind", ["constant_channel", "duplicate_channel", "fewer_samples_than_dims", "all_equal"])
@pytest.mark.parametrize("method", ["none", "oas", "ledoit_wolf", "ridge"])
def test_singular_covariance_is_handled_and_reported(kind, method):
    x = _data(n=200, d=8)
    if kind == "constant_channel":
        x[:, 3] = 2.5
    elif kind == "duplicate_channel":
        x[:, 5] = x[:, 1]
    elif kind == "fewer_samples_than_dims":
        x = x[:5]
    else:
        x = torch.ones(50, 8, dtype=torch.float64)
    acc = GaussianAccumulator(8).update(x)
    sc = MahalanobisScorer.from_accumulators({"fea_up1": acc}, shrinkage=method, max_condition=1e8)
    rep = sc.fit_report["fea_up1"]
    assert rep["condition_number"] <= 1e8 * 1.02
    if method == "none" or kind == "all_equal":
        assert rep["eigen_floor_applied"] and rep["notes"]
    if kind in ("constant_channel", "all_equal"):
        assert rep["zero_variance_channels"] >= 1
    probe = torch.cat([x[:3], x[:3] + 1.0]).float()
    d = sc.distance(probe)
    assert torch.isfinite(d).all() and (d >= 0).all()


def test_whitening_factor_is_cholesky_inverse_without_general_inverse():
    x = _data(n=800, d=12)
    cov = torch.cov(x.T, correction=0)
    used, chol, w, rep = whitening_factor(cov)
    assert not rep.eigen_floor_applied and torch.equal(used, 0.5 * (cov + cov.T))
    assert torch.allclose(chol @ chol.T, used, rtol=1e-12, atol=1e-12 * float(used.abs().max()))
    eye = torch.eye(12, dtype=torch.float64)
    assert torch.allclose(w @ chol, eye, atol=1e-10)
    assert torch.equal(torch.triu(w, 1), torch.zeros_like(w))       # lower triangular


def test_distances_invariant_to_feature_scale():
    x = _data(n=1000, d=8)
    probe = _data(n=50, d=8, seed=5)
    out = []
    for c in (1.0, 1e-3, 1e4):
        acc = GaussianAccumulator(8).update(x * c)
        sc = MahalanobisScorer.from_accumulators({"fea_up1": acc}, shrinkage="oas")
        sc.compute_dtype = torch.float64
        out.append(sc.distance(probe * c))
    assert torch.allclose(out[0], out[1], rtol=1e-9) and torch.allclose(out[0], out[2], rtol=1e-9)


def test_not_enough_data_raises_named_error():
    acc = GaussianAccumulator(3)
    with pytest.raises(NotFittedError):
        acc.covariance()
    acc.update(torch.ones(1, 3))
    with pytest.raises(NotFittedError, match="at least 2"):
        MahalanobisScorer.from_accumulators({"fea_up1": acc})


def test_accumulator_state_round_trip_and_dimension_checks():
    x = _data(n=100, d=4)
    acc = GaussianAccumulator(4).update(x)
    back = GaussianAccumulator.from_state(acc.state())
    assert back.n == acc.n and torch.equal(back.m2, acc.m2) and torch.equal(back.q4, acc.q4)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        acc.update(torch.ones(3, 5))
    with pytest.raises(ValueError, match="dimension"):
        acc.merge(GaussianAccumulator(5))
