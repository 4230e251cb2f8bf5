"""trace_sampling: exact slopes and attribution, untouched samples, maps that add up, masks by the criterion."""
from __future__ import annotations

import math

import pytest
import torch

import robustness_diag as rd
from robustness_diag.detect import artifact_masks, draw_sample_latents, layer_names, trace_sampling
from tests.detect.helpers import COUPLINGS, lr_batch, force_tiny_scale, spy_stage, tiny_flow


def _assert_bitwise(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("variant,dtype", [("affine", torch.float32), ("affine", torch.float64),
                                           ("rqspline", torch.float32), ("rqspline", torch.float64),
                                           ("affine_reparam", torch.float32), ("ncsr", torch.float32)])
def test_tracing_never_changes_the_sample(variant, dtype):
    flow = tiny_flow(variant, dtype)
    lr = lr_batch(2, dtype=dtype)
    r = trace_sampling(flow, lr, 0.9, 1, torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = flow.sample(lr, 0.9, torch.Generator().manual_seed(3))
    _assert_bitwise(r.image, plain)
    # several samples per image: rows s*B + b, each equal to the untraced decode of the same latents
    r2 = trace_sampling(flow, lr, 0.9, 3, torch.Generator().manual_seed(4))
    lat = draw_sample_latents(flow, lr, 0.9, 3, torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain2 = flow.sample(lr.repeat(3, 1, 1, 1), latents=lat)
    _assert_bitwise(r2.image, plain2)
    assert r2.image_index.tolist() == [0, 1] * 3 and r2.sample_index.tolist() == [0, 0, 1, 1, 2, 2]
    # the first sample of a 3-sample run is the 1-sample run with the same generator
    r1 = trace_sampling(flow, lr, 0.9, 1, torch.Generator().manual_seed(4))
    _assert_bitwise(r2.image[:2], r1.image)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_known_tiny_scale_is_named_at_its_layer_and_position(dtype):
    flow = tiny_flow("affine", dtype)
    layer, row, col, scale = COUPLINGS[2], 2, 5, 1e-4          # level 2: an 8x8 map for 32x32 HR; block of 4x4
    force_tiny_scale(flow, layer, row, col, scale)
    r = trace_sampling(flow, lr_batch(2, dtype=dtype), 0.9, 2, torch.Generator().manual_seed(0))
    rec = next(x for x in r.layers if x.index == layer)
    want = -torch.log(torch.tensor(scale, dtype=dtype))
    # exact: the recorded inverse log-slope is -log(scale), in every channel, hence the channel max and sum
    assert torch.equal(rec.stages["features"].log_slope_max_map[:, row, col], want.expand(4))
    torch.testing.assert_close(rec.stages["features"].log_slope_sum_map[:, row, col],
                               (want * flow.flowUpsamplerNet.layers[layer].coupling.channels).expand(4))
    # the attribution names the layer on the HR block of that position and nothing exploded earlier anywhere
    block = r.attribution[:, 4 * row:4 * row + 4, 4 * col:4 * col + 4]
    assert (block == layer).all()
    assert r.first_layer.tolist() == [layer] * 4
    assert r.first_layer_name(0) == "level 2 step 1 coupling/features"
    assert (r.slope_map[:, 4 * row:4 * row + 4, 4 * col:4 * col + 4] >= want - 1e-6).all()
    assert torch.equal(r.max_log_slope, torch.maximum(want, r.max_log_slope))
    # without the forced scale nothing explodes
    clean = trace_sampling(tiny_flow("affine", dtype), lr_batch(2, dtype=dtype), 0.9, 2,
                           torch.Generator().manual_seed(0))
    assert (clean.attribution == -1).all() and clean.first_layer.tolist() == [-1] * 4
    assert (clean.max_log_slope < 1.0).all()


@pytest.mark.parametrize("variant,level,stage", [("affine", 1, "self"), ("rqspline", 2, "self"),
                                                 ("rqspline", 3, "features"), ("ncsr", 2, "std")])
def test_stage_maps_are_the_log_inverse_derivatives(variant, level, stage):
    """Per-stage maps equal log|d x_c / d y_c| from autograd, max and summed over channels (float64)."""
    flow = tiny_flow(variant, torch.float64)
    layer = COUPLINGS[level]
    coupling = flow.flowUpsamplerNet.layers[layer].coupling
    log = spy_stage(flow, layer, coupling.channels if stage == "features" else coupling.c_co)
    r = trace_sampling(flow, lr_batch(2, dtype=torch.float64), 0.9, 1, torch.Generator().manual_seed(1))
    order = ["self", "std", "features"] if "std" in r.layers[0].stages or variant == "ncsr" else ["self", "features"]
    bij, y = log[order.index(stage)] if stage != "features" else log[0]
    y = y.clone().requires_grad_(True)
    x, _ = bij.inverse(y)
    (deriv,) = torch.autograd.grad(x.sum(), y)                 # element-wise map: the gradient is the diagonal
    logd = deriv.abs().log()
    st = next(x for x in r.layers if x.index == layer).stages[stage]
    torch.testing.assert_close(st.log_slope_max_map, logd.amax(dim=1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(st.log_slope_sum_map, logd.sum(dim=1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", ["affine", "rqspline", "ncsr"])
def test_level_maps_add_up_to_the_decode_ladj_and_carry_to_hr_blocks(variant):
    flow = tiny_flow(variant, torch.float64)
    lr = lr_batch(2, dtype=torch.float64)
    r = trace_sampling(flow, lr, 0.9, 2, torch.Generator().manual_seed(2))
    total = sum(m.sum(dim=(1, 2)) for m in r.level_maps.values())
    torch.testing.assert_close(total, r.ladj, rtol=1e-10, atol=1e-8)
    with torch.no_grad():
        _, ladj = flow.decode_with_ladj(lr.repeat(2, 1, 1, 1),
                                        latents=draw_sample_latents(flow, lr, 0.9, 2, torch.Generator().manual_seed(2)))
    torch.testing.assert_close(r.ladj, ladj, rtol=0, atol=0)
    assert sorted(r.level_maps) == [1, 2, 3]
    hr = torch.zeros_like(r.explosion_map)
    for level, m in r.level_maps.items():
        f = 2 ** level
        n, h, w = m.shape
        assert (h * f, w * f) == tuple(hr.shape[-2:])
        hr = hr + m[:, :, None, :, None].expand(n, h, f, w, f).reshape(n, h * f, w * f)
    torch.testing.assert_close(r.explosion_map, hr, rtol=1e-12, atol=1e-9)


def test_artifact_masks_follow_the_reference_criterion():
    img = torch.zeros(1, 3, 2, 4)
    img[0, 0, 0, 0] = 1.5           # on the threshold: not an artifact
    img[0, 1, 0, 1] = 1.5001
    img[0, 2, 0, 2] = -0.5          # on the threshold: not an artifact
    img[0, 0, 0, 3] = -0.5001
    img[0, 1, 1, 0] = math.nan
    img[0, 2, 1, 1] = math.inf
    img[0, 0, 1, 2] = -math.inf
    art, nan, inf = artifact_masks(img)
    assert art[0].tolist() == [[False, True, False, True], [True, True, True, False]]
    assert nan[0].tolist() == [[False] * 4, [True, False, False, False]]
    assert inf[0].tolist() == [[False] * 4, [False, True, True, False]]
    art2, _, _ = artifact_masks(img, upper=1.0, lower=-0.4)
    assert art2[0, 0].tolist() == [True, True, True, True]


def test_trace_masks_and_rows_agree_with_the_image():
    flow = tiny_flow("affine")
    lr = lr_batch(2)
    r = trace_sampling(flow, lr, 0.9, 2, torch.Generator().manual_seed(0), upper=0.8, lower=0.1)
    art, nan, inf = artifact_masks(r.image, 0.8, 0.1)
    assert torch.equal(r.artifact_mask, art) and torch.equal(r.nan_mask, nan) and torch.equal(r.inf_mask, inf)
    assert 0 < int(art.sum()) < art.numel()                  # the thresholds are really used
    rows = r.rows()
    assert len(rows) == 4 and [(x["image"], x["sample"]) for x in rows] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    for n, row in enumerate(rows):
        assert row["pixels"] == 32 * 32 and row["artifact_pixels"] == int(art[n].sum())
        assert row["artifact_fraction"] == pytest.approx(int(art[n].sum()) / 1024)
        assert row["max_inverse_slope"] == pytest.approx(math.exp(row["max_log_inverse_slope"]))
        assert row["explosion_map_max"] == pytest.approx(float(r.explosion_map[n].max()))
        assert row["first_exploding_layer"] == -1 and row["first_exploding_layer_name"] == ""
    assert set(rows[0]) >= {"nan_pixels", "inf_pixels"}


def test_layer_records_cover_every_layer_in_sampling_order_with_names():
    flow = tiny_flow("ncsr")
    r = trace_sampling(flow, lr_batch(1), 0.9, 1, torch.Generator().manual_seed(0))
    assert [x.index for x in r.layers] == list(range(12, -1, -1))
    names = layer_names(flow)
    assert names[0] == "level 1 squeeze" and names[1] == "level 1 pre-step 1" and names[3] == "level 1 step 1 coupling"
    assert names[4] == "level 1 split" and names[12] == "level 3 step 1 coupling"
    rec = {x.index: x for x in r.layers}
    assert set(rec[8].stages) == {"self", "std", "features"} and rec[4].kind == "split" and not rec[4].stages
    # shapes: maps at each layer's output resolution (32x32 HR; level l at 32/2**l; a squeeze outputs level - 1)
    assert rec[12].act_max_map.shape == (1, 4, 4) and rec[9].act_max_map.shape == (1, 8, 8)
    assert rec[8].stages["self"].log_slope_max_map.shape == (1, 8, 8) and rec[0].act_max_map.shape == (1, 32, 32)
    # the growth record is the activation ratio it claims to be
    prev = rec[9].act_max_map
    g = rec[8].act_max_map / prev.clamp(min=1.0)
    torch.testing.assert_close(rec[8].growth_map, g)
    torch.testing.assert_close(rec[8].growth, g.flatten(1).amax(1))


def test_compact_records_give_the_same_summaries():
    flow = tiny_flow("rqspline")
    full = trace_sampling(flow, lr_batch(2), 0.9, 1, torch.Generator().manual_seed(5))
    small = trace_sampling(flow, lr_batch(2), 0.9, 1, torch.Generator().manual_seed(5), keep_layer_maps=False,
                           return_image=False)
    assert small.image is None and all(x.act_max_map is None for x in small.layers)
    assert all(s.log_slope_max_map is None for x in small.layers for s in x.stages.values())
    assert torch.equal(full.max_log_slope, small.max_log_slope) and torch.equal(full.attribution, small.attribution)
    # the two modes sum the same terms in a different order
    torch.testing.assert_close(full.explosion_map, small.explosion_map, rtol=1e-6, atol=1e-5)
    assert torch.equal(full.slope_map, small.slope_map)
    for a, b in zip(full.layers, small.layers):
        assert (a.index, a.name, a.kind, a.level) == (b.index, b.name, b.kind, b.level)
        assert torch.equal(a.act_max, b.act_max) and torch.equal(a.growth, b.growth)
        assert all(torch.equal(a.stages[k].log_slope_max, b.stages[k].log_slope_max) for k in a.stages)
    rf, rs = full.rows(), small.rows()
    for x, y in zip(rf, rs):
        assert x.pop("explosion_map_max") == pytest.approx(y.pop("explosion_map_max"), rel=1e-6)
    assert rf == rs


@pytest.mark.parametrize("keep", [True, False])
def test_nan_growth_counts_as_exploding(keep):
    """A layer whose output turns NaN is named first there, in both record modes."""
    flow = tiny_flow("affine")
    layer, row, col = COUPLINGS[3], 1, 2                 # level 3: 4x4 map for 32x32 HR
    force_tiny_scale(flow, layer, row, col, float("nan"))
    r = trace_sampling(flow, lr_batch(1), 0.9, 1, torch.Generator().manual_seed(0), keep_layer_maps=keep)
    assert r.nan_mask.any()
    assert (r.attribution[:, 8 * row:8 * row + 8, 8 * col:8 * col + 8] == layer).all()
    assert r.first_layer.tolist() == [layer]
    rec = next(x for x in r.layers if x.index == layer)
    assert rec.growth.tolist() == [float("inf")] and rec.act_max.tolist() == [float("inf")]


def test_nothing_syncs_with_the_host_inside_the_sampling_loop(monkeypatch):
    """The hooks run with every tensor->host conversion disabled; decoding with them gives the same image."""
    flow = tiny_flow("affine")
    lr = lr_batch(2)
    lat = draw_sample_latents(flow, lr, 0.9, 1, torch.Generator().manual_seed(0))
    real_decode = flow.decode_with_ladj

    def guarded_decode(*args, **kwargs):
        def refuse(*_a, **_k):
            raise AssertionError("host sync inside the sampling loop")
        with monkeypatch.context() as m:
            for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
                m.setattr(torch.Tensor, name, refuse)
            return real_decode(*args, **kwargs)

    # the flow core itself must run under the guard, else this test could not tell anything
    with torch.no_grad():
        plain = guarded_decode(lr, latents=lat)[0]
    monkeypatch.setattr(flow, "decode_with_ladj", guarded_decode)
    r = trace_sampling(flow, lr, latents=lat)
    with torch.no_grad():
        _assert_bitwise(r.image, plain + flow.upsample(lr))


def test_float64_and_cpu_results_are_consistent_with_float32():
    f32 = tiny_flow("rqspline", torch.float32)
    f64 = tiny_flow("rqspline", torch.float64)
    r32 = trace_sampling(f32, lr_batch(2), 0.9, 1, torch.Generator().manual_seed(0))
    r64 = trace_sampling(f64, lr_batch(2).double(), 0.9, 1, torch.Generator().manual_seed(0))
    assert r64.explosion_map.dtype == torch.float64
    torch.testing.assert_close(r32.explosion_map.double(), r64.explosion_map, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(r32.max_log_slope.double(), r64.max_log_slope, rtol=1e-4, atol=1e-4)
    assert torch.equal(r32.artifact_mask, r64.artifact_mask)


def test_invalid_arguments_are_refused():
    flow = tiny_flow("affine")
    with pytest.raises(ValueError, match="n_samples"):
        trace_sampling(flow, lr_batch(1), n_samples=0)
    with pytest.raises(ValueError, match="latents"):
        trace_sampling(flow, lr_batch(2), latents=draw_sample_latents(flow, lr_batch(1), 0.9, 1, None))


def test_public_names():
    assert rd.detect.trace_sampling is trace_sampling and callable(rd.detect.safe_sample)


def test_constant_terms_follow_parameter_changes():
    """The cached ActNorm / 1x1-conv terms are recomputed after an in-place change or a dtype change."""
    flow = tiny_flow("affine")
    lr = lr_batch(1)
    trace_sampling(flow, lr, 0.9, 1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        flow.flowUpsamplerNet.layers[COUPLINGS[2]].actnorm.logs.add_(0.5)
        w = flow.flowUpsamplerNet.layers[COUPLINGS[1]].invconv.weight
        w.mul_(1.5)
    for dtype in (torch.float32, torch.float64):
        x = lr.to(dtype)
        r = trace_sampling(flow.to(dtype), x, 0.9, 1, torch.Generator().manual_seed(0))
        total = sum(m.sum(dim=(1, 2)) for m in r.level_maps.values())
        torch.testing.assert_close(total, r.ladj, rtol=1e-5, atol=1e-3)
        assert r.level_maps[1].dtype == x.dtype


def test_map_store_slots_are_distinct_and_chunked():
    """Slots never overlap; a full chunk is followed by a new one; chunks of large maps exceed glibc's mmap
    threshold, small ones are as large as asked."""
    from robustness_diag.detect.recorder import CHUNK_BYTES, MapStore
    like = torch.zeros(1)
    store = MapStore(pooled=True)
    slots = [store.take((2, 512, 512), like, hint=3) for _ in range(20)]    # 2 MiB slots: 17 per 33 MiB chunk
    assert len({s.data_ptr() for s in slots}) == 20
    assert all(s.shape == (2, 512, 512) and s.is_contiguous() for s in slots)
    assert slots[0].untyped_storage().nbytes() >= CHUNK_BYTES > 32 << 20
    assert slots[-1].untyped_storage().data_ptr() != slots[0].untyped_storage().data_ptr()
    small = [store.take((2, 8, 8), like, torch.int32, hint=5) for _ in range(6)]
    assert small[0].dtype == torch.int32 and small[0].untyped_storage().nbytes() == 5 * 2 * 8 * 8 * 4
    assert len({s.data_ptr() for s in small}) == 6
    own = MapStore(pooled=False).take((2, 4), like)
    assert own.untyped_storage().nbytes() == 2 * 4 * 4


def test_kept_maps_share_a_few_chunks():
    """The per-layer and per-stage maps the pass keeps are slots of a few chunks (one per resolution, here), not
    blocks of their own between the pass's temporaries."""
    r = trace_sampling(tiny_flow("affine"), lr_batch(2), 0.9, 2, torch.Generator().manual_seed(0))
    maps = [rec.act_max_map for rec in r.layers] + [m for rec in r.layers for st in rec.stages.values()
                                                    for m in (st.log_slope_max_map, st.log_slope_sum_map)]
    chunks = {m.untyped_storage().data_ptr() for m in maps}
    assert len(maps) == 25 and len(chunks) <= 2 * len({m.shape for m in maps})
