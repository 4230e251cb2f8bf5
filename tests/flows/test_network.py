"""The whole network on tiny configurations: exact densities against the autograd Jacobian, round trips, API."""
from __future__ import annotations

import pytest
import torch

import robustness_diag as rd
from robustness_diag.flows.config import FlowConfig
from robustness_diag.flows.synthetic import randomize_flow

TINY = dict(nf=4, nb=2, gc=4, blocks=[0, 1], cond_channels=12, hidden=6, K=1, n_additional=1, f_in=192, f_out=96)
VARIANTS = {
    "srflow": dict(),
    "ncsr": dict(family="ncsr", std_channels=3, S=[0, 1, 1]),
    "rq_frozen": dict(family="robustnf", coupling="rqspline", coupling_attr="rqspline", std_channels=3,
                      S=[0, 1, 1], frozen_invconv=True, residual=True),
    "reparam": dict(family="robustnf", coupling="affine_reparam", coupling_attr="affinereparam", std_channels=3,
                    S=[1, 1, 1]),
}


def tiny_flow(variant: str, seed: int = 0) -> rd.SRFlowFamily:
    flow = rd.build_flow(FlowConfig(**TINY, **VARIANTS[variant]))
    return randomize_flow(flow, seed=seed, lr_size=4, batch=8).double()


def _inputs(flow, b=2, lr_size=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(b, 3, lr_size, lr_size, generator=g, dtype=torch.float64)
    hr = torch.rand(b, 3, lr_size * 4, lr_size * 4, generator=g, dtype=torch.float64)
    if flow is not None and flow.config.residual:  # residual flows were initialised on small residuals
        hr = flow.upsample(lr) + 0.03 * torch.randn(hr.shape, generator=g, dtype=torch.float64)
    return lr, hr


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_log_prob_is_the_change_of_variables_density(variant):
    """log_prob(x) == sum log N(latents) + log|det d(latents)/dx|, Jacobian by autograd in float64."""
    flow = tiny_flow(variant)
    lr, hr = _inputs(flow, b=1)
    x = hr - flow.upsample(lr) if flow.config.residual else hr

    def to_latents(v):
        lat, _ = flow.encode(v.view_as(x), lr)
        return torch.cat([t.flatten() for t in lat])

    jac = torch.autograd.functional.jacobian(to_latents, x.flatten())
    lat = to_latents(x.flatten())
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(lat).sum() + torch.linalg.slogdet(jac)[1]
    got = flow.log_prob(hr, lr)
    torch.testing.assert_close(got, expected.reshape(1), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_ladj_is_the_sampling_jacobian(variant):
    flow = tiny_flow(variant)
    lr, _ = _inputs(flow, b=1)
    lat = flow.draw_latents(lr, 0.9, torch.Generator().manual_seed(3))
    sizes = [t.numel() for t in lat]

    def to_image(v):
        parts = list(torch.split(v, sizes))
        return flow.decode(lr, latents=[p.view_as(t) for p, t in zip(parts, lat)]).flatten()

    flat = torch.cat([t.flatten() for t in lat])
    jac = torch.autograd.functional.jacobian(to_image, flat)
    _, ladj = flow.decode_with_ladj(lr, latents=lat)
    # rtol 1e-7: the frozen 1x1 conv counts log|det W| as exactly 0 (reference), its W is orthogonal to ~1e-7
    torch.testing.assert_close(ladj, torch.linalg.slogdet(jac)[1].reshape(1), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encode_decode_round_trip(variant):
    flow = tiny_flow(variant)
    lr, hr = _inputs(flow, b=3)
    with torch.no_grad():
        lat, _ = flow.encode(hr, lr)
        back = flow.decode(lr, latents=lat)
        again, _ = flow.encode(flow.decode(lr, heat=0.7, generator=torch.Generator().manual_seed(1)), lr)
        redo = flow.decode(lr, latents=again)
    # A frozen 1x1 conv inverts by its stored transpose, orthogonal only to float32 precision (as the reference).
    atol = 1e-5 if flow.config.frozen_invconv else 1e-10
    torch.testing.assert_close(back, hr, rtol=0, atol=atol)
    torch.testing.assert_close(redo, flow.decode(lr, heat=0.7, generator=torch.Generator().manual_seed(1)),
                               rtol=0, atol=atol)


def test_sample_adds_bicubic_for_residual_flows_only():
    lr, _ = _inputs(None)
    for variant, residual in (("rq_frozen", True), ("srflow", False)):
        flow = tiny_flow(variant)
        with torch.no_grad():
            raw = flow.decode(lr, heat=0.0)
            final = flow.sample(lr, heat=0.0)
        expected = raw + flow.upsample(lr) if residual else raw
        torch.testing.assert_close(final, expected, rtol=0, atol=0)


def test_heat_zero_and_generators():
    flow = tiny_flow("srflow")
    lr, _ = _inputs(flow)
    with torch.no_grad():
        a = flow.decode(lr, heat=0.9, generator=torch.Generator().manual_seed(5))
        b = flow.decode(lr, heat=0.9, generator=torch.Generator().manual_seed(5))
        c = flow.decode(lr, heat=0.9, generator=torch.Generator().manual_seed(6))
        zero = flow.decode(lr, heat=0.0)
        explicit = flow.decode(lr, latents=[torch.zeros(s, dtype=torch.float64) for s in flow.latent_shapes(lr)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(zero, explicit)


def test_latent_shapes_follow_the_reference_plan():
    flow = rd.build_flow(FlowConfig())  # SRFlow 4X: split after level 1 consumes 6 ch at HR/2; top 96 ch at HR/8
    lr = torch.zeros(2, 3, 10, 12)
    assert flow.latent_shapes(lr) == [(2, 6, 20, 24), (2, 96, 5, 6)]
    flow8 = rd.build_flow(FlowConfig(scale=8, L=4, splits=[1, 2], blocks=[1, 3, 5, 7], K=1))
    assert flow8.latent_shapes(lr) == [(2, 6, 40, 48), (2, 12, 20, 24), (2, 192, 5, 6)]


def test_wrong_latents_are_a_clear_error():
    flow = tiny_flow("srflow")
    lr, _ = _inputs(flow)
    with pytest.raises(ValueError, match="expected"):
        flow.decode(lr, latents=[torch.zeros(1, 1, 1, 1)])


def test_features_have_reference_names_and_shapes():
    flow = rd.build_flow(FlowConfig(nb=5, K=1, blocks=[0, 1, 3, 4]))
    feats = flow.features(torch.rand(2, 3, 8, 6))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "fea_up2": (2, 320, 16, 12), "fea_up1": (2, 320, 8, 6), "fea_up0": (2, 320, 4, 3)}
    # channels 64.. are the stacked blocks, nearest-resized: at LR/2 the top-left pixel of each 2x2 cell
    torch.testing.assert_close(feats["fea_up0"][:, 64:], feats["fea_up1"][:, 64:, ::2, ::2])
    torch.testing.assert_close(feats["fea_up2"][:, 64:, ::2, ::2], feats["fea_up1"][:, 64:])


def test_upsampled_level_features_are_post_activation():
    """fea_up2 is stored after the reference's in-place LeakyReLU (pre-activation values: a known 0.13 error)."""
    flow = rd.build_flow(FlowConfig(nb=2, K=1, blocks=[0, 1], cond_channels=192, f_in=192))
    raw = flow.RRDB.raw_features(torch.rand(1, 3, 6, 6), ("fea_up2",))
    with torch.no_grad():
        pre = flow.RRDB.upconv1(torch.nn.functional.interpolate(raw["last_lr_fea"], scale_factor=2, mode="nearest"))
    assert (pre < 0).any()
    torch.testing.assert_close(raw["fea_up2"], torch.nn.functional.leaky_relu(pre, 0.2))
