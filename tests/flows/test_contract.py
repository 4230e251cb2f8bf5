"""The flow contract (:mod:`robustness_diag.flows.base`) holds for every family, and a new family needs nothing else.

Every family -- a tiny SRFlow-family flow (affine with residual output, and RQ-spline), a reduced LLFlow and a reduced
HCFlow (the builders of tests/detect/helpers.py and tests/synth.py), and :class:`MiniFlow`, a family defined only
here -- passes the same checks. :class:`MiniFlow` then goes through ``rd.ood`` and ``rd.detect`` unchanged: adding a
family is one new module implementing the contract.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustness_diag as rd
from robustness_diag.flows.bijections import gaussian_log_density
from robustness_diag.flows.hcflow import MAX_LOG_SCALE
from robustness_diag.flows.layers import squeeze2d, unsqueeze2d
from tests.detect.helpers import tiny_flow
from tests.synth import small_hcflow_checkpoint, small_llflow_checkpoint

KINDS = {"squeeze", "split", "coupling", "step"}


# -- a minimal new family: one squeeze and one conditional affine coupling (scale 2, L = 1) -------------------------
class MiniCoupling(nn.Module):
    """``z2 <- (z2 + shift) * scale`` with ``scale = sigmoid(raw + 2) + eps`` (SRFlow's affine), ``(shift, raw)``
    from a 3x3 conv of ``cat(z1, features)``."""

    eps = 1e-4

    def __init__(self, channels: int, cond_channels: int):
        super().__init__()
        self.half = channels // 2
        self.net = nn.Conv2d(self.half + cond_channels, 2 * (channels - self.half), 3, padding=1)

    def _params(self, z1, feats):
        shift, raw = self.net(torch.cat([z1, feats], dim=1)).chunk(2, dim=1)
        return shift, torch.sigmoid(raw + 2.0) + self.eps

    def forward_map(self, x, feats):
        z1, z2 = x[:, :self.half], x[:, self.half:]
        shift, s = self._params(z1, feats)
        return torch.cat([z1, (z2 + shift) * s], dim=1), torch.log(s).sum(dim=1)

    def inverse_map(self, y, feats, tracer=None):
        z1, z2 = y[:, :self.half], y[:, self.half:]
        shift, s = self._params(z1, feats)
        ladj = -torch.log(s)
        if tracer is not None:
            tracer("self", ladj)
        return torch.cat([z1, z2 / s - shift], dim=1), ladj.sum(dim=1)

    def inverse_slope_bound(self) -> dict:
        return {"kind": "multiplicative", "max_inverse_slope": 1.0 / self.eps, "note": "1/eps"}


class MiniStep(nn.Module):
    def __init__(self, channels: int, cond_channels: int):
        super().__init__()
        self.coupling = MiniCoupling(channels, cond_channels)


class MiniSqueeze(nn.Module):
    """Occupies the squeeze's layer index."""


@dataclass
class MiniConfig:
    family: str = "mini"
    coupling: str = "affine"
    scale: int = 2
    L: int = 1
    heat: float = 0.8
    cond_channels: int = 4


class MiniFlow(rd.Flow):
    """2X SR: HR ``[B, 3, 2h, 2w]`` -> squeeze -> coupling -> one latent ``[B, 12, h, w]``; conditioner: a 3x3 conv of
    the LR image (level ``same``, ratio 1) and its 2x2 average (level ``pooled``, ratio 0.5). Only the abstract members
    of :class:`rd.Flow` are implemented."""

    def __init__(self, config: MiniConfig | None = None):
        super().__init__()
        self.config = config or MiniConfig()
        self.info = {"family": "mini"}
        self.cond = nn.Conv2d(3, self.config.cond_channels, 3, padding=1)
        self.layers = nn.ModuleList([MiniSqueeze(), MiniStep(12, self.config.cond_channels)])

    def log_prob(self, hr, lr, std=None):
        z, ladj = self.layers[1].coupling.forward_map(squeeze2d(hr), self.cond(lr))
        return ladj.sum(dim=(1, 2)) + gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z)).sum((1, 2, 3))

    def features(self, lr):
        full = self.cond(lr)
        return {"same": full, "pooled": F.avg_pool2d(full, 2, ceil_mode=True)}

    def latent_shapes(self, lr):
        return [(lr.shape[0], 12, lr.shape[2], lr.shape[3])]

    def draw_latents(self, lr, heat, generator=None):
        dev = generator.device if generator is not None else torch.device("cpu")
        return [(torch.randn(s, generator=generator, device=dev) * heat).to(lr) for s in self.latent_shapes(lr)]

    def decode_with_ladj(self, lr, heat=None, generator=None, latents=None, std=None, tracer_factory=None,
                         layer_callback=None):
        heat = self.default_heat if heat is None else heat
        if latents is None:
            latents = self.draw_latents(lr, heat, generator)
        else:
            self.check_latents(lr, latents)
        feats, z = self.cond(lr), latents[0]
        ladj = z.new_zeros(z.shape[0])
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            if isinstance(layer, MiniSqueeze):
                z = unsqueeze2d(z)
            else:
                tracer = tracer_factory(i) if tracer_factory is not None else None
                z, m = layer.coupling.inverse_map(z, feats, tracer)
                ladj = ladj + m.sum(dim=(1, 2))
            if layer_callback is not None:
                layer_callback(i, layer, z)
        return z, ladj

    def feature_levels(self):
        return {"same": 1.0, "pooled": 0.5}

    def feature_channels(self):
        return self.config.cond_channels

    def receptive_field(self, levels):
        return 2 if "pooled" in levels else 1

    def sampling_plan(self):
        return MiniPlan(self)

    def coupling_steps(self):
        return [(1, 1, self.layers[1])]


class MiniPlan(rd.SamplingPlan):
    def __init__(self, flow: MiniFlow):
        super().__init__(flow, flow.layers, [1, 1])

    def top(self, lr, latents):
        return latents[0]

    def kind(self, layer):
        return "squeeze" if isinstance(layer, MiniSqueeze) else "coupling"

    def constant_steps(self):
        return []


def mini_flow(seed: int = 0) -> MiniFlow:
    torch.manual_seed(seed)
    flow = MiniFlow().eval()
    with torch.no_grad():
        flow.layers[1].coupling.net.weight.mul_(0.1)
    return flow


# -- the families under test -----------------------------------------------------------------------------------------
def _lr(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks: one thread avoids OpenMP scheduling costs on shared machines (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def families(tmp_path_factory, one_thread):
    """``{name: (flow, lr, path of its checkpoint or None, expected log inverse-slope bound)}``."""
    tmp = tmp_path_factory.mktemp("contract")
    out = {}
    for variant in ("affine", "rqspline"):
        flow = tiny_flow(variant)
        path = rd.save_flow(flow, tmp / f"sr_{variant}.safetensors")
        bound = math.log(1 / flow.config.eps) if variant == "affine" else None
        out[f"sr_{variant}"] = (flow, _lr((2, 3, 8, 8)), path, bound)
    path = small_llflow_checkpoint(tmp / "llflow.pth")
    flow = rd.load_flow(path)
    out["llflow"] = (flow, _lr((1, 3, 16, 16)) * 0.25, path, math.log(1 / flow.config.eps))
    path = small_hcflow_checkpoint(tmp / "hcflow.pth")
    out["hcflow"] = (rd.load_flow(path), _lr((2, 3, 4, 6)), path, MAX_LOG_SCALE)
    out["mini"] = (mini_flow(), _lr((2, 3, 6, 10)), None, math.log(1 / MiniCoupling.eps))
    return out


NAMES = ["sr_affine", "sr_rqspline", "llflow", "hcflow", "mini"]


@pytest.fixture(params=NAMES)
def family(request, families):
    return families[request.param]


def test_is_a_flow_and_loads_as_one(family, tmp_path):
    flow, _, path, _ = family
    assert isinstance(flow, rd.Flow)
    if path is None:
        return                                   # MiniFlow has no loader: load_flow knows registered families only
    loaded = rd.load_flow(path)
    assert isinstance(loaded, rd.Flow) and type(loaded) is type(flow)
    again = rd.load_flow(rd.save_flow(loaded, tmp_path / "again.safetensors"))
    assert isinstance(again, rd.Flow) and type(again) is type(flow)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), flow.state_dict().values()))


@torch.no_grad()
def test_sample_is_the_finished_decode(family):
    flow, lr, _, _ = family
    lat = flow.draw_latents(lr, 0.7, torch.Generator().manual_seed(1))
    x, ladj = flow.decode_with_ladj(lr, latents=lat)
    assert ladj.shape == (lr.shape[0],) and bool(torch.isfinite(ladj).all())
    assert torch.equal(flow.decode(lr, latents=lat), x)
    assert torch.equal(flow.sample(lr, latents=lat), flow.finish_sample(x, lr))
    assert x.shape == (lr.shape[0], 3, lr.shape[2] * flow.scale, lr.shape[3] * flow.scale)
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    assert torch.equal(flow.sample(lr, 0.7, g1), flow.sample(lr, latents=flow.draw_latents(lr, 0.7, g2)))


@torch.no_grad()
def test_features_levels_and_receptive_field(family):
    flow, lr, _, _ = family
    levels = flow.feature_levels()
    assert levels and flow.default_feature_level() in levels
    assert list(levels.values()) == sorted(levels.values(), reverse=True)        # finest first
    feats = flow.features(lr)
    x = flow.condition_input(lr)
    assert torch.equal(flow.condition_input(x), x)                               # idempotent
    h, w = lr.shape[2:]
    for level, r in levels.items():
        want = (lr.shape[0], flow.feature_channels(), math.ceil(h * r), math.ceil(w * r))
        assert tuple(feats[level].shape) == want, level
        torch.testing.assert_close(flow.conditioner_features(x, [level])[level], feats[level], rtol=0, atol=1e-6)
        assert flow.receptive_field([level]) > 0
    assert flow.receptive_field(list(levels)) > 0
    assert h % flow.input_alignment() == 0 and w % flow.input_alignment() == 0


def test_check_latents(family):
    flow, lr, _, _ = family
    lat = flow.draw_latents(lr, 0.5, torch.Generator().manual_seed(0))
    assert [tuple(t.shape) for t in lat] == [tuple(s) for s in flow.latent_shapes(lr)]
    flow.check_latents(lr, lat)
    bad = [t[..., :-1] for t in lat]
    with pytest.raises(ValueError):
        flow.check_latents(lr, bad)
    with pytest.raises(ValueError):
        flow.check_latents(lr, lat[:-1])


@torch.no_grad()
def test_sampling_plan_names_and_layer_callback(family):
    flow, lr, _, _ = family
    plan = flow.sampling_plan()
    assert isinstance(plan, rd.SamplingPlan) and len(plan.level_of) == len(plan.layers)
    assert sorted(plan.layer_names()) == list(range(len(plan.layers)))
    assert {plan.kind(layer) for layer in plan.layers} <= KINDS
    assert {plan.kind(plan.layers[i]) for i, _, _ in flow.coupling_steps()} == {"coupling"}
    seen = []
    lat = flow.draw_latents(lr, 0.5, torch.Generator().manual_seed(0))
    x, _ = flow.decode_with_ladj(lr, latents=lat, layer_callback=lambda i, layer, z: seen.append((i, layer)))
    assert [i for i, _ in seen] == list(reversed(range(len(plan.layers))))     # once per layer, sampling order
    assert all(layer is plan.layers[i] for i, layer in seen)
    assert torch.equal(x, flow.decode(lr, latents=lat))                         # the callback only reads


def test_coupling_bound(family):
    flow, _, _, expected = family
    bound = flow.coupling_bound()
    steps = flow.coupling_steps()
    assert steps and all(s.coupling.inverse_slope_bound() == bound for _, _, s in steps)
    log_bound = flow.log_inverse_slope_bound()
    if expected is None:                                                         # RQ spline: additive bound
        assert log_bound is None and bound["kind"] == "additive"
    else:
        assert log_bound == pytest.approx(expected, rel=1e-12)
        assert math.log(bound["max_inverse_slope"]) == pytest.approx(log_bound, rel=1e-12)


# -- a new family through ood and detect, with no edit there ---------------------------------------------------------
@torch.no_grad()
def test_minimal_family_through_ood_scoring():
    flow = mini_flow()
    train = [_lr((1, 3, 10, 12), seed=s) for s in range(4)]
    scorer = rd.ood.fit_flow(flow, train, rd.ood.FeatureOptions(levels=["same", "pooled"]))
    assert sorted(scorer.level_names) == ["pooled", "same"] and scorer.meta["flow_family"] == "mini"
    lr = _lr((1, 3, 9, 13), seed=10)                                             # odd sizes: padded, cropped back
    maps = rd.ood.score_maps(flow, scorer, lr)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"same": (9, 13), "pooled": (5, 7)}
    assert all(bool(torch.isfinite(v).all()) for v in maps.values())
    tiled = rd.ood.score_maps(flow, scorer, lr, rd.ood.FeatureOptions(tile=4))  # margin = receptive field
    for k in maps:
        torch.testing.assert_close(tiled[k], maps[k], rtol=1e-5, atol=1e-5)
    default = rd.ood.fit_flow(flow, train)
    assert default.level_names == [flow.default_feature_level()] == ["same"]


@torch.no_grad()
def test_minimal_family_through_trace_sampling():
    flow = mini_flow()
    lr = _lr((2, 3, 6, 10), seed=3)
    r = rd.detect.trace_sampling(flow, lr, 0.8, 2, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    lat = rd.detect.draw_sample_latents(flow, lr, 0.8, 2, g)
    assert torch.equal(r.image, flow.sample(lr.repeat(2, 1, 1, 1), latents=lat))
    assert [rec.index for rec in r.layers] == [1, 0] and r.names == flow.sampling_plan().layer_names()
    assert sorted(r.level_maps) == [1] and tuple(r.explosion_map.shape) == (4, 12, 20)
    torch.testing.assert_close(r.level_maps[1].flatten(1).sum(dim=1), r.ladj, rtol=1e-5, atol=1e-4)
    assert bool((r.max_log_slope <= flow.log_inverse_slope_bound() + 1e-6).all())
    # a collapsed scale (sigmoid -> 0) at every position: the inverse slope reaches its bound 1/eps
    with torch.no_grad():
        flow.layers[1].coupling.net.bias[6:] = -1e4
    r = rd.detect.trace_sampling(flow, lr, 0.8, 1, torch.Generator().manual_seed(5))
    torch.testing.assert_close(r.max_log_slope, torch.full_like(r.max_log_slope, flow.log_inverse_slope_bound()))
