"""safe_sample: only artifact pixels change, every one is accounted for, and a clean run costs one decode."""
from __future__ import annotations

import pytest
import torch

from robustness_diag.detect import artifact_masks, draw_sample_latents, safe_sample
from tests.detect.helpers import COUPLINGS, force_tiny_scale, lr_batch, tiny_flow


def _count_decodes(monkeypatch, flow) -> list:
    sizes, real = [], flow.decode_with_ladj

    def counting(lr, *a, **k):
        sizes.append(lr.shape[0])
        return real(lr, *a, **k)

    monkeypatch.setattr(flow, "decode_with_ladj", counting)
    return sizes


def test_clean_samples_pass_through_with_a_single_decode(monkeypatch):
    flow = tiny_flow("rqspline")
    lr = lr_batch(2)
    with torch.no_grad():
        plain = flow.sample(lr, 0.9, torch.Generator().manual_seed(0))
    sizes = _count_decodes(monkeypatch, flow)
    r = safe_sample(flow, lr, 0.9, 1, torch.Generator().manual_seed(0))
    assert sizes == [2]
    assert torch.equal(r.image, plain) and not r.artifact_mask.any() and (r.source == 0).all()
    assert r.summary() == {"artifact_fraction": 0.0, "repaired_fraction": 0.0, "fallback_fraction": 0.0,
                           "remaining_fraction": 0.0, "heats": [0.45, 0.225, 0.0]}


@pytest.mark.parametrize("fallback", ["bicubic", "none"])
def test_exploded_pixels_are_replaced_and_accounted_for(monkeypatch, fallback):
    flow = tiny_flow("affine")
    force_tiny_scale(flow, COUPLINGS[2], 2, 5, 1e-4)
    lr = lr_batch(3)
    lat = draw_sample_latents(flow, lr, 0.9, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = flow.sample(lr.repeat(2, 1, 1, 1), latents=lat)
    bad = artifact_masks(plain)[0]
    assert bad.any() and not bad.all()
    sizes = _count_decodes(monkeypatch, flow)
    r = safe_sample(flow, lr, 0.9, 2, latents=lat, fallback=fallback)
    affected = int(bad.flatten(1).any(1).sum())
    assert sizes[0] == 6 and all(s == affected for s in sizes[1:]) and 2 <= len(sizes) <= 4
    assert torch.equal(r.artifact_mask, bad)
    keep = ~bad[:, None].expand_as(plain)
    assert torch.equal(r.image[keep], plain[keep])                       # clean pixels untouched, bitwise
    assert torch.equal(r.source != 0, bad)                               # every bad pixel has a source
    assert torch.equal(r.remaining_mask, artifact_masks(r.image)[0])
    torch.testing.assert_close(r.repaired_fraction + r.fallback_fraction
                               + (r.source == -1).flatten(1).float().mean(1), r.artifact_fraction)
    if fallback == "bicubic":
        assert not r.remaining_mask.any()
        up = flow.upsample(lr.repeat(2, 1, 1, 1))
        fb = (r.source == len(r.heats) + 1)[:, None].expand_as(up)
        assert torch.equal(r.image[fb], up[fb])
    else:
        assert torch.equal(r.source == -1, r.remaining_mask)


def test_lower_heat_repairs_heat_driven_artifacts():
    """Tight thresholds make large-latent pixels 'artifacts'; cooling the latents repairs them with the flow."""
    flow = tiny_flow("rqspline")
    lr = lr_batch(2)
    r = safe_sample(flow, lr, 3.0, 1, torch.Generator().manual_seed(0), upper=0.9, lower=0.1, heats=(1.0, 0.0))
    assert r.artifact_fraction.min() > 0
    assert r.repaired_fraction.sum() > 0 and r.heats == (1.0, 0.0)
    by_flow = (r.source >= 1) & (r.source <= 2)
    assert not (r.remaining_mask & by_flow).any()         # (the bicubic fallback may miss such tight thresholds)
    # with the whole image cooled (a margin wider than any latent map) a repair at heat 0 is the heat-0 sample
    r0 = safe_sample(flow, lr, 3.0, 1, torch.Generator().manual_seed(0), upper=0.9, lower=0.1, heats=(0.0,),
                     margin=64, fallback="none")
    with torch.no_grad():
        cold = flow.sample(lr, heat=0.0)
    m = (r0.source == 1)[:, None].expand_as(cold)
    assert m.any()
    torch.testing.assert_close(r0.image[m], cold[m], rtol=0, atol=1e-6)


def test_bad_fallback_is_refused():
    with pytest.raises(ValueError, match="fallback"):
        safe_sample(tiny_flow("affine"), lr_batch(1), fallback="zeros")


def test_guard_is_the_mask_and_one_flag():
    """The clean-input check of safe_sample: the reference mask, an all-original source map and one boolean."""
    from robustness_diag.detect.safe import ORIGINAL, guard
    image = torch.full((2, 3, 4, 5), 0.5)
    bad, source, any_bad = guard(image)
    assert not any_bad and bad.shape == (2, 4, 5) and not bad.any()
    assert source.dtype == torch.int8 and bool((source == ORIGINAL).all())
    image[1, 2, 3, 4] = 1.6
    image[0, 0, 0, 0] = float("nan")
    bad, _, any_bad = guard(image)
    assert any_bad and bad.sum() == 2 and bad[1, 3, 4] and bad[0, 0, 0]


def test_safe_sample_builds_no_autograd_graph():
    """Sampling needs no gradients: with parameters that require them, the samples still carry no graph (a graph
    would keep every activation of the pass alive: several times the memory of plain sampling)."""
    flow = tiny_flow("affine")
    assert any(p.requires_grad for p in flow.parameters())
    r = safe_sample(flow, lr_batch(1), 0.9, 1, torch.Generator().manual_seed(0))
    assert not r.image.requires_grad and r.image.grad_fn is None
