"""Non-finite numbers never pass as results: a fit on NaN features is refused (level, counts, likely cause), a
statistics file holding NaN/Inf is refused at load (file and tensor named), and an image whose score aggregates are
NaN/Inf is a failed row with its reason, not an ok row."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import robustness_diag as rd
from robustness_diag.analyses.folder_run import read_table
from robustness_diag.cli.main import main
from robustness_diag.ood import (FeatureExtractor, FeatureOptions, GaussianAccumulator, MahalanobisScorer,
                                 NonFiniteStatisticsError, StatsFileError, accumulate, fit_flow, make_accumulators,
                                 nonfinite_score_reason)
from tests.ood.helpers import one_thread, smooth_rgb, tiny_flow, write_png  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _img(seed: int, h: int = 16, w: int = 20) -> torch.Tensor:
    return torch.from_numpy(smooth_rgb(h, w, seed=seed)).permute(2, 0, 1)[None].float()


@pytest.fixture
def flows(tmp_path, one_thread):
    """``(good checkpoint, NaN-weight checkpoint, image folder)``: the tiny flow and the same with one NaN in the
    conditioner's first convolution."""
    good = rd.save_flow(tiny_flow(), tmp_path / "good.safetensors")
    bad_flow = tiny_flow()
    with torch.no_grad():
        bad_flow.RRDB.conv_first.weight[0, 0, 0, 0] = float("nan")
    bad = rd.save_flow(bad_flow, tmp_path / "nan.safetensors")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        write_png(imgs / f"i{i}.png", smooth_rgb(16, 20, seed=i))
    return good, bad, imgs


# -- fit --------------------------------------------------------------------------------------------------------------

def test_fit_flow_refuses_features_of_nan_weights(flows):
    _, bad, _ = flows
    flow = rd.load_flow(bad)
    with pytest.raises(NonFiniteStatisticsError) as ei:
        fit_flow(flow, [_img(0), _img(1)])
    msg = str(ei.value)
    # image 0 is held out for the threshold: image 1 is the first one fitted
    assert "statistics refused: image 1" in msg and "level fea_up1: 3840 of 3840 feature values NaN/Inf" in msg
    assert "(320 of 320 positions)" in msg and "RRDB.conv_first.weight" in msg and "weight tensor" in msg


def test_fit_command_refuses_nan_weights_and_writes_nothing(flows, tmp_path, capsys):
    _, bad, imgs = flows
    out = tmp_path / "s.safetensors"
    code = main(["fit", str(bad), "--images", str(imgs), "--out", str(out), "--no-progress"])
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert code == 1 and not out.exists(), text
    assert text.count("non-finite conditioner features") >= 2 and "RRDB.conv_first.weight" in text
    assert "Traceback" not in text


def test_a_nonfinite_image_is_refused_without_touching_the_statistics(flows):
    good, _, _ = flows
    ex = FeatureExtractor(rd.load_flow(good), FeatureOptions(levels=["fea_up1", "fea_up0"], tile=8, margin=4))
    accs = make_accumulators(ex)
    accumulate(ex, accs, _img(0))
    before = {lv: [a.n] + [t.clone() for t in (a.mean, a.m2, a.t3, a.q4)] for lv, a in accs.items()}
    lr = _img(1)
    lr[0, :, 12, 15] = float("inf")                 # one pixel in the last tile: earlier tiles were fine
    with pytest.raises(NonFiniteStatisticsError, match="input image itself holds NaN/Inf") as ei:
        accumulate(ex, accs, lr)
    assert "level fea_up1:" in str(ei.value) and "level fea_up0:" in str(ei.value)
    for lv, a in accs.items():
        assert a.n == before[lv][0]
        assert all(torch.equal(x, y) for x, y in zip((a.mean, a.m2, a.t3, a.q4), before[lv][1:]))
    assert accumulate(ex, accs, _img(2)) == 16 * 20                # the next good image goes on
    assert MahalanobisScorer.from_accumulators(accs).levels["fea_up1"].n.item() == 2 * 16 * 20


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_moments_are_refused_not_replaced_by_an_identity(value):
    acc = GaussianAccumulator(3)
    x = torch.randn(50, 3, dtype=torch.float64)
    x[7, 1] = value
    acc.update(x)
    with pytest.raises(NonFiniteStatisticsError, match=r"level fea_up1: statistics refused: .*mean: \d+ of 3 values "
                                                       r"NaN/Inf.*likely cause: non-finite conditioner features"):
        MahalanobisScorer.from_accumulators({"fea_up1": acc})


def test_overflowing_covariance_is_refused():
    acc = GaussianAccumulator(2)
    acc.update(torch.tensor([[1e200, 0.0], [-1e200, 1.0], [0.0, 2.0]], dtype=torch.float64))
    with pytest.raises(NonFiniteStatisticsError, match="level a: statistics refused"):
        MahalanobisScorer.from_accumulators({"a": acc})


# -- statistics files -------------------------------------------------------------------------------------------------

def _stats_file(path) -> MahalanobisScorer:
    acc = GaussianAccumulator(4)
    acc.update(torch.randn(200, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    sc = MahalanobisScorer.from_accumulators({"fea_up1": acc})
    sc.save(path)
    return sc


def _rewrite(path, tensor: str, value: float, index=(0,)) -> None:
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    t = tensors[tensor].clone()
    t.view(-1)[list(index)] = value
    tensors[tensor] = t
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("tensor,value,index", [
    ("fea_up1.whiten", float("nan"), (0,)), ("fea_up1.mean", float("inf"), (2,)),
    ("fea_up1.chol", -float("inf"), (0, 5)), ("fea_up1.cov", float("nan"), (3,)), ("fea_up1.m2", float("nan"), (1,)),
    ("fea_up1.q4", float("inf"), (0,)),
])
def test_statistics_file_with_nonfinite_tensor_is_refused(tmp_path, tensor, value, index):
    path = tmp_path / "stats.safetensors"
    _stats_file(path)
    MahalanobisScorer.load(path)                                      # finite: fine
    _rewrite(path, tensor, value, index)
    with pytest.raises(StatsFileError) as ei:
        MahalanobisScorer.load(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}: level fea_up1: non-finite statistics refused")
    assert f"tensor '{tensor}' holds {len(index)} NaN/Inf value(s)" in msg and "robustness-diag fit" in msg


def test_statistics_file_with_nonfinite_threshold_is_refused(tmp_path):
    path = tmp_path / "stats.safetensors"
    sc = _stats_file(path)
    sc.meta["thresholds"] = {"fea_up1": float("nan")}
    sc.save(path)
    with pytest.raises(StatsFileError, match="non-finite default threshold"):
        MahalanobisScorer.load(path)


def test_score_command_refuses_nonfinite_statistics_naming_file_and_tensor(flows, tmp_path, capsys):
    good, _, imgs = flows
    stats = tmp_path / "stats.safetensors"
    fit_flow(rd.load_flow(good), [_img(0), _img(1)]).save(stats)
    _rewrite(stats, "fea_up1.whiten", float("nan"))
    code = main(["score", str(good), "--stats", str(stats), "--images", str(imgs), "--out", str(tmp_path / "o"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and str(stats) in err and "'fea_up1.whiten' holds 1 NaN/Inf value(s)" in err, err


# -- scores -----------------------------------------------------------------------------------------------------------

def test_score_of_a_nonfinite_map_is_a_failed_row(flows, tmp_path, capsys):
    good, bad, imgs = flows
    stats = tmp_path / "stats.safetensors"
    sc = fit_flow(rd.load_flow(good), [_img(0), _img(1)])
    sc.meta["checkpoint_digest"] = rd.weights_digest(rd.load_flow(bad))   # statistics "of" the NaN checkpoint
    sc.save(stats)
    out = tmp_path / "o"
    code = main(["score", str(bad), "--stats", str(stats), "--images", str(imgs), "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert code == 1, text
    _, rows = read_table(out / "scores.csv")
    assert [r["status"] for r in rows] == ["error", "error"]
    for r in rows:
        assert r["error"].startswith("NonFiniteStatisticsError: non-finite OOD score at level fea_up1: mean, p95, "
                                     "p99, max NaN/Inf")
        assert "from a finite input image" in r["error"] and "RRDB.conv_first.weight" in r["error"]
    assert "0 of 2 images scored" in text


def test_nonfinite_score_reason():
    part = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    agg = rd.ood.aggregate(part, 2.5)
    assert nonfinite_score_reason("fea_up1", agg, part) is None          # a NaN position among finite ones: a result
    allnan = torch.full((2, 2), float("nan"))
    reason = nonfinite_score_reason("fea_up1", rd.ood.aggregate(allnan, 2.5), allnan)
    assert reason.startswith("non-finite OOD score at level fea_up1: mean, p95, p99, max NaN/Inf (4 of 4 positions")
    lr = torch.zeros(1, 3, 2, 2)
    lr[0, 0, 0, 0] = math.inf
    assert "the input image holds NaN/Inf" in nonfinite_score_reason("x", {"mean": math.nan}, allnan, lr)
