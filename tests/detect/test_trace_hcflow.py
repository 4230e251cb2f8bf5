"""trace_sampling on HCFlow: untouched samples, maps that add up to the decode's ladj, exact stages, attribution."""
from __future__ import annotations

import copy

import pytest
import torch

import robustness_diag as rd
from robustness_diag.detect import artifact_masks, draw_sample_latents, layer_names, trace_sampling
from robustness_diag.flows.hcflow import MAX_LOG_SCALE
from tests.synth import small_hcflow_checkpoint

#: Layer plan of the reduced 4X HCFlow (K=2, one conditional step, trace level = HCFlow level + 1):
#: 0 squeeze, 1-2 steps, 3 split (trace level 1, HR/2); 4 squeeze, 5-6 steps, 7 split (trace level 2, HR/4 = LR).
SPLITS = {1: 3, 2: 7}
LR_H, LR_W = 4, 6


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return rd.load_flow(small_hcflow_checkpoint(tmp_path_factory.mktemp("hcflow_trace") / "x4.pth")).eval()


@pytest.fixture
def hc(pristine):
    """A fresh copy (safe to patch) of the reduced HCFlow; ``hc(dtype)``."""
    return lambda dtype=torch.float32: copy.deepcopy(pristine).to(dtype)


def _lr(b=2, dtype=torch.float32, seed=0):
    return torch.rand(b, 3, LR_H, LR_W, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _assert_bitwise(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _force_shift(coupling, row, col, value=1e4):
    """Makes an atan coupling subtract ``value`` (a huge shift) in every channel at one position, and returns the
    log of its ``-logscale`` maps (the inverse log-slopes it reports)."""
    original, log = coupling._params, []

    def patched(z1, cond):
        shift, logscale = original(z1, cond)
        log.append(-logscale)
        if value is not None:
            shift = shift.clone()
            shift[:, :, row, col] = value
        return shift, logscale

    coupling._params = patched
    return log


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tracing_never_changes_the_hcflow_sample(hc, dtype):
    flow = hc(dtype)
    lr = _lr(dtype=dtype)
    r = trace_sampling(flow, lr, 0.9, 1, torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = flow.sample(lr, 0.9, torch.Generator().manual_seed(3))
    _assert_bitwise(r.image, plain)
    # two samples per image: rows s*B + b, each the untraced sample of the same latents (HCFlow latents are finest
    # first and the pass starts from the LR image: nothing is taken from latents[-1])
    lat = draw_sample_latents(flow, lr, 0.9, 2, torch.Generator().manual_seed(4))
    assert [tuple(t.shape) for t in lat] == [(4, 6, 8, 12), (4, 21, 4, 6)]
    with torch.no_grad():
        plain2 = flow.sample(lr.repeat(2, 1, 1, 1), latents=lat)
    for keep in (True, False):
        r2 = trace_sampling(flow, lr, 0.9, 2, torch.Generator().manual_seed(4), keep_layer_maps=keep)
        _assert_bitwise(r2.image, plain2)
        assert r2.image_index.tolist() == [0, 1] * 2 and r2.sample_index.tolist() == [0, 0, 1, 1]
    # the first sample of a 2-sample run is the 1-sample run with the same generator
    _assert_bitwise(r2.image[:2], trace_sampling(flow, lr, 0.9, 1, torch.Generator().manual_seed(4)).image)


def test_explicit_latents_and_masks_follow_the_criterion(hc):
    flow = hc()
    lr = _lr()
    lat = draw_sample_latents(flow, lr, 0.7, 2, torch.Generator().manual_seed(5))
    r = trace_sampling(flow, lr.repeat(2, 1, 1, 1), latents=lat, upper=0.9, lower=0.1)
    with torch.no_grad():
        _assert_bitwise(r.image, flow.sample(lr.repeat(2, 1, 1, 1), latents=lat))
    art, nan, inf = artifact_masks(r.image, 0.9, 0.1)
    assert torch.equal(r.artifact_mask, art) and torch.equal(r.nan_mask, nan) and torch.equal(r.inf_mask, inf)
    assert 0 < int(art.sum()) < art.numel()                  # the thresholds are really used
    rows = r.rows()
    assert len(rows) == 4
    for n, row in enumerate(rows):
        assert row["pixels"] == 16 * 24 and row["artifact_pixels"] == int(art[n].sum())
        assert row["explosion_map_max"] == pytest.approx(float(r.explosion_map[n].max()))
        assert row["first_exploding_layer"] == -1 and row["first_exploding_layer_name"] == ""
    with pytest.raises(ValueError, match="latents"):
        trace_sampling(flow, lr, latents=lat)                 # 4 rows of latents for 2 LR images


@pytest.mark.parametrize("keep", [True, False])
def test_level_maps_add_up_to_the_decode_ladj_and_carry_to_hr_blocks(hc, keep):
    """float64: the per-position maps (couplings of main and conditional flows, ActNorms, 1x1 convs of both, split
    priors' logs) summed over positions and levels are the decode's log|det dx/d(latents)|."""
    flow = hc(torch.float64)
    lr = _lr(dtype=torch.float64)
    r = trace_sampling(flow, lr, 0.9, 2, torch.Generator().manual_seed(2), keep_layer_maps=keep)
    with torch.no_grad():
        _, ladj = flow.decode_with_ladj(lr.repeat(2, 1, 1, 1),
                                        latents=draw_sample_latents(flow, lr, 0.9, 2, torch.Generator().manual_seed(2)))
    torch.testing.assert_close(r.ladj, ladj, rtol=0, atol=0)
    total = sum(m.sum(dim=(1, 2)) for m in r.level_maps.values())
    torch.testing.assert_close(total, r.ladj, rtol=1e-10, atol=1e-10)
    assert {k: tuple(m.shape) for k, m in r.level_maps.items()} == {1: (4, 8, 12), 2: (4, 4, 6)}
    hr = torch.zeros_like(r.explosion_map)
    for level, m in r.level_maps.items():
        f = 2 ** level
        n, h, w = m.shape
        hr = hr + m[:, :, None, :, None].expand(n, h, f, w, f).reshape(n, h * f, w * f)
    torch.testing.assert_close(r.explosion_map, hr, rtol=1e-12, atol=1e-10)
    # the atan coupling bound holds for every recorded stage (main and conditional)
    assert r.settings["bound"]["max_inverse_slope"] == pytest.approx(1.6479, abs=1e-4)
    assert bool((r.max_log_slope < MAX_LOG_SCALE).all()) and bool((r.slope_map < MAX_LOG_SCALE).all())


def test_layer_records_names_and_exact_stage_maps(hc):
    flow = hc(torch.float64)
    main_log = _force_shift(flow.flow.layers[5].affine, 0, 0, None)             # spies only
    cond_log = _force_shift(flow.flow.cond_flow(0).additional_flow_steps[0].affine, 0, 0, None)
    r = trace_sampling(flow, _lr(1, torch.float64), 0.9, 1, torch.Generator().manual_seed(0))
    assert [x.index for x in r.layers] == list(range(7, -1, -1))
    names = layer_names(flow)
    assert names == r.names and names[0] == "level 1 squeeze" and names[1] == "level 1 step 1 coupling"
    assert names[3] == "level 1 split" and names[4] == "level 2 squeeze" and names[6] == "level 2 step 2 coupling"
    rec = {x.index: x for x in r.layers}
    assert [rec[i].kind for i in range(8)] == ["squeeze", "coupling", "coupling", "split"] * 2
    assert [rec[i].level for i in range(8)] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert set(rec[SPLITS[1]].stages) == {"condFlow step 1 coupling"} and set(rec[5].stages) == {"self"}
    assert not rec[4].stages
    # maps at each layer's output resolution: level l at HR / 2**l (16 x 24 HR); a squeeze outputs level - 1
    assert rec[7].act_max_map.shape == (1, 4, 6) and rec[4].act_max_map.shape == (1, 8, 12)
    assert rec[0].act_max_map.shape == (1, 16, 24)
    # the recorded stage maps are the coupling's -logscale, max and summed over channels
    for st, (ls,) in ((rec[5].stages["self"], main_log), (rec[3].stages["condFlow step 1 coupling"], cond_log)):
        torch.testing.assert_close(st.log_slope_max_map, ls.amax(dim=1), rtol=0, atol=0)
        torch.testing.assert_close(st.log_slope_sum_map, ls.sum(dim=1), rtol=0, atol=0)
    # the first layer's growth is measured against the LR image the pass starts from
    lr = _lr(1, torch.float64)
    torch.testing.assert_close(rec[7].growth_map, rec[7].act_max_map / lr.abs().amax(1).clamp(min=1.0))


@pytest.mark.parametrize("keep", [True, False])
def test_forced_actnorm_blowup_is_attributed_and_adds_its_log_det(hc, keep):
    """ActNorm logs of level 2 step 1 (index 5) lowered by 6: its inverse multiplies by e^6 everywhere (e^10 already
    overflows float64 later, in the level-1 conditional flow's features)."""
    lr = _lr(dtype=torch.float64)
    clean = trace_sampling(hc(torch.float64), lr, 0.9, 1, torch.Generator().manual_seed(1), keep_layer_maps=keep)
    assert (clean.attribution == -1).all() and clean.first_layer.tolist() == [-1, -1]
    flow = hc(torch.float64)
    with torch.no_grad():
        flow.flow.layers[5].actnorm.logs.sub_(6.0)
    r = trace_sampling(flow, lr, 0.9, 1, torch.Generator().manual_seed(1), keep_layer_maps=keep)
    assert (r.attribution == 5).all() and r.first_layer.tolist() == [5, 5]
    assert r.first_layer_name(0) == "level 2 step 1 coupling/self"
    rec = {x.index: x for x in r.layers}
    assert bool((rec[5].growth > 100).all()) and bool((rec[6].growth <= 100).all())
    assert r.artifact_mask.all()
    # level 2 runs nothing data-dependent after that ActNorm: its map grows by exactly 6 nats x 24 channels
    torch.testing.assert_close(r.level_maps[2] - clean.level_maps[2],
                               torch.full_like(r.level_maps[2], 6.0 * 24), rtol=0, atol=1e-9)
    torch.testing.assert_close(sum(m.sum(dim=(1, 2)) for m in r.level_maps.values()), r.ladj, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("keep", [True, False])
def test_forced_shift_is_attributed_at_its_position(hc, keep):
    """A huge shift at one position of a main coupling, then of a conditional-flow coupling (named through the split
    it belongs to)."""
    flow = hc()
    row, col = 1, 2                                          # level 2: the 4 x 6 LR grid, a 4 x 4 HR block
    _force_shift(flow.flow.layers[5].affine, row, col)
    r = trace_sampling(flow, _lr(), 0.9, 2, torch.Generator().manual_seed(0), keep_layer_maps=keep)
    lat = draw_sample_latents(flow, _lr(), 0.9, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        _assert_bitwise(r.image, flow.sample(_lr().repeat(2, 1, 1, 1), latents=lat))     # the patch, not the hooks
    assert (r.attribution[:, 4 * row:4 * row + 4, 4 * col:4 * col + 4] == 5).all()
    assert r.first_layer.tolist() == [5] * 4 and r.first_layer_name(0) == "level 2 step 1 coupling/self"
    assert r.artifact_mask[:, 4 * row:4 * row + 4, 4 * col:4 * col + 4].all()

    flow = hc()
    row, col = 3, 5                                          # level 1: the 8 x 12 grid, a 2 x 2 HR block
    _force_shift(flow.flow.cond_flow(0).additional_flow_steps[0].affine, row, col)
    r = trace_sampling(flow, _lr(), 0.9, 1, torch.Generator().manual_seed(0), keep_layer_maps=keep)
    assert (r.attribution[:, 2 * row:2 * row + 2, 2 * col:2 * col + 2] == SPLITS[1]).all()
    assert r.first_layer.tolist() == [SPLITS[1]] * 2
    assert r.first_layer_name(0) == "level 1 split/condFlow step 1 coupling"
