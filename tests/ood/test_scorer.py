"""MahalanobisScorer: scores against a direct float64 reference, maps, file format, mismatch and merge."""
from __future__ import annotations

import json

import pytest
import torch

from robustness_diag.ood import (GaussianAccumulator, LevelStats, MahalanobisScorer, StatsFileError,
                                 StatsMismatchError, chi_quantile)
from tests.ood.helpers import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(d=10, n=3000, seed=0, shrinkage="oas", channels=None, total=None):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ a + 1.5
    acc = GaussianAccumulator(d).update(x)
    sc = MahalanobisScorer.from_accumulators({"fea_up1": acc}, shrinkage=shrinkage, channels=channels,
                                             n_channels_total={"fea_up1": total or d},
                                             meta={"checkpoint_digest": "ab" * 32})
    return sc, x


def _reference(sc, x):
    """Direct float64 reference: sqrt((x - mu)^T Sigma^{-1} (x - mu)) by a linear solve with the stored Sigma."""
    st = sc.levels["fea_up1"]
    dx = x.double() - st.mean
    return torch.sqrt((dx * torch.linalg.solve(st.cov, dx.T).T).sum(1))


def test_float64_scores_equal_direct_reference():
    sc, x = _fit()
    sc.compute_dtype = torch.float64
    probe = torch.cat([x[:200], x[:50] * 3.0 - 2.0])
    ref = _reference(sc, probe)
    d = sc.distance(probe)
    assert d.dtype == torch.float64
    assert float(((d - ref).abs() / ref).max()) < 1e-10


def test_float32_scores_close_to_reference_and_never_negative():
    sc, x = _fit()
    probe = x[:500].float()
    d = sc.distance(probe)
    assert d.dtype == torch.float32 and (d >= 0).all()
    ref = _reference(sc, probe)
    assert float(((d.double() - ref).abs() / ref).max()) < 1e-4


def test_map_equals_rowwise_distance_and_has_feature_grid_shape():
    sc, x = _fit()
    feats = x[:2 * 6 * 7].reshape(2, 6, 7, 10).permute(0, 3, 1, 2).float()   # [B, C, H, W]
    maps = sc({"fea_up1": feats, "not_fitted": feats})
    assert list(maps) == ["fea_up1"] and maps["fea_up1"].shape == (2, 6, 7)
    rows = sc.distance(x[:84].float()).reshape(2, 6, 7)
    assert torch.allclose(maps["fea_up1"], rows, rtol=1e-5)


def test_channel_subset_selects_the_fitted_channels():
    d_all, chans = 10, [1, 4, 5, 9]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(800, d_all, generator=g, dtype=torch.float64)
    acc = GaussianAccumulator(len(chans)).update(x[:, chans])
    sc = MahalanobisScorer.from_accumulators({"fea_up1": acc}, channels=chans, n_channels_total={"fea_up1": d_all})
    sc.compute_dtype = torch.float64
    feats = x[:12].reshape(1, 3, 4, d_all).permute(0, 3, 1, 2)
    m = sc({"fea_up1": feats})["fea_up1"]
    assert torch.allclose(m.reshape(-1), sc.distance(x[:12, chans]), rtol=1e-12)
    with pytest.raises(StatsMismatchError, match="channels"):
        sc({"fea_up1": feats[:, :9]})


def test_save_load_round_trip_keeps_statistics_and_metadata(tmp_path):
    sc, x = _fit(shrinkage="ledoit_wolf")
    p = sc.save(tmp_path / "s.safetensors")
    back = MahalanobisScorer.load(p)
    for name in ("mean", "cov", "chol", "whiten", "m2", "t3", "q4", "n", "channels"):
        assert torch.equal(getattr(back.levels["fea_up1"], name), getattr(sc.levels["fea_up1"], name)), name
    m = back.meta
    assert m["checkpoint_digest"] == "ab" * 32 and m["shrinkage"] == "ledoit_wolf"
    assert m["pixel_count"] == {"fea_up1": 3000} and m["levels"] == ["fea_up1"]
    assert m["format_version"] == 2 and m["package_version"]
    assert back.threshold() == pytest.approx(chi_quantile(0.99, 10))      # no calibration: the chi quantile
    info = back.threshold_info()
    assert info["calibrated"] is False and info["source"].startswith("chi quantile 0.99 with 10 degrees of freedom")
    assert torch.equal(back.distance(x[:20].float()), sc.distance(x[:20].float()))
    # header readable without torch: flat keys for humans
    from safetensors import safe_open
    with safe_open(str(p), framework="pt") as fh:
        hdr = fh.metadata()
    assert hdr["format"] == "robustness-diag.ood-stats" and json.loads(hdr["levels"]) == ["fea_up1"]
    assert json.loads(hdr["pixel_count"]) == {"fea_up1": 3000} and hdr["shrinkage"] == "ledoit_wolf"


def test_state_dict_round_trip_into_a_fresh_module():
    sc, x = _fit()
    fresh = MahalanobisScorer({"fea_up1": LevelStats(10)})
    fresh.load_state_dict(sc.state_dict())
    assert torch.equal(fresh.distance(x[:5].float()), sc.distance(x[:5].float()))


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"this is not safetensors", "not a readable .safetensors"),
])
def test_bad_statistics_files_name_file_and_reason(tmp_path, content, reason):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(content)
    with pytest.raises(StatsFileError, match=reason) as e:
        MahalanobisScorer.load(p)
    assert str(p) in str(e.value)
    with pytest.raises(StatsFileError, match="no such"):
        MahalanobisScorer.load(tmp_path / "missing.safetensors")


def test_other_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file
    p = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(p), metadata={"format": "something-else"})
    with pytest.raises(StatsFileError, match="not a robustness-diag statistics file"):
        MahalanobisScorer.load(p)


def test_digest_mismatch_is_refused_with_a_clear_message():
    sc, _ = _fit()
    sc.check_digest("ab" * 32)
    with pytest.raises(StatsMismatchError, match="fitted on checkpoint abab"):
        sc.check_digest("cd" * 32, "checkpoint other.pth")


def test_merging_shard_statistics_equals_fitting_all_at_once():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(900, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7) + 4
    shards = [MahalanobisScorer.from_accumulators({"fea_up1": GaussianAccumulator(6).update(p)},
                                                  meta={"checkpoint_digest": "x", "n_images": 1})
              for p in (x[:100], x[100:650], x[650:])]
    merged = MahalanobisScorer.merge(shards)
    whole = MahalanobisScorer.from_accumulators({"fea_up1": GaussianAccumulator(6).update(x)})
    a, b = merged.levels["fea_up1"], whole.levels["fea_up1"]
    assert int(a.n) == 900 and merged.meta["n_images"] == 3
    assert torch.allclose(a.cov, b.cov, rtol=1e-10, atol=0) and torch.allclose(a.mean, b.mean, rtol=1e-12)
    other = MahalanobisScorer.from_accumulators({"fea_up1": GaussianAccumulator(6).update(x)},
                                                meta={"checkpoint_digest": "y"})
    with pytest.raises(StatsMismatchError):
        MahalanobisScorer.merge([shards[0], other])


@pytest.mark.parametrize("n_blocks", [1, 3, 4])
def test_blocked_triangular_kernels_equal_the_dense_product(n_blocks):
    from robustness_diag.ood import mahalanobis_distance, mahalanobis_distance_cf, triangular_blocks
    g = torch.Generator().manual_seed(11)
    d = 200
    w = torch.tril(torch.randn(d, d, generator=g, dtype=torch.float64)) + 5 * torch.eye(d, dtype=torch.float64)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(5000, d, generator=g, dtype=torch.float64)
    dense = torch.linalg.vector_norm((x - mu) @ w.T, dim=1)
    blocks = triangular_blocks(w, n_blocks)
    assert len(blocks) == n_blocks and blocks[-1][1] == d
    got = mahalanobis_distance(x, mu, w, chunk=777, blocks=blocks)
    assert torch.allclose(got, dense, rtol=1e-12)
    cf = mahalanobis_distance_cf(x.reshape(2, 2500, d).transpose(1, 2), mu, w, chunk=300, blocks=blocks)
    assert torch.allclose(cf.reshape(-1), dense, rtol=1e-12)


@pytest.mark.parametrize("name", ["half", "cuda", "train", "fea up1"])
def test_level_names_that_cannot_key_the_statistics_are_refused(name):
    acc = GaussianAccumulator(3)
    acc.update(torch.randn(50, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot key"):
        MahalanobisScorer.from_accumulators({name: acc})
