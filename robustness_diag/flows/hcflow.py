r"""HCFlow (JingyunLiang/HCFlow, SR 4X/8X): an HR -> (LR, high-frequency latents) flow; keys ``flow.*``.

Architecture (keys, shapes: ``tests/fixtures/manifests/*HCFlow.tsv.gz``), levels ``l = 0..L-1`` (0 finest, at HR/2):

* main flow ``flow.layers``: per level a squeeze (no keys), ``K_l`` **unconditional** steps (``actnorm``,
  ``permute.weight`` [C, C] 1x1 conv, ``affine.f.conv1/conv2/conv3``) and a parameter-free channel split that keeps
  ``C/2`` channels (the last level keeps 3 channels: the LR image); squeeze and split occupy indices without keys;
* ``flow.level{l}_condFlow``: a conditional flow for the split-off part ``a_l`` (``C_l - keep_l`` channels):
  conditional feature ``cf_l = cat(f1, f2)`` (128 ch) with ``first = conv_first(u_l)``, ``f1 = RRDB_trunk0(first)``,
  ``f2 = trunk_conv1(RRDB_trunk1(f1)) + first``; prior ``(mean, logs) = cross(f(cf_l))``; ``additional_flow_steps``
  (same step type, coupling conditioned on ``cf_l``).
  ``u_{L-1} = LR`` (the coarsest level) and ``u_l = cat(z_l, nearest x2 cf_{l+1}, nearest x4 cf_{l+2}, ...)``.

Coupling (``AffineCouplings.AffineCoupling``): ``z1`` = first ``C//2`` channels, ``(shift, s) = cross(f(z1 [, cf]))``,
``logscale = 0.318 * atan(2 s)``, density direction ``z2 <- (z2 + shift) * exp(logscale)``, sampling
``z2 <- z2 * exp(-logscale) - shift``. Since ``|atan| < pi/2``, ``|logscale| < 0.318 * pi / 2 = 0.4995``: every
coupling's inverse slope lies in ``(exp(-0.4995), exp(0.4995)) = (0.607, 1.648)`` -- bounded, unlike SRFlow's affine
(``1/eps = 1e4``). The 1x1 convs and ActNorms are the same maps as in SRFlow and are not bounded by construction.

Sampling starts from the LR image ``z = lr``; at each split (coarsest first) ``a_l = mean + exp(logs) * eps_l``,
``eps_l ~ N(0, heat^2)``, then the additional steps are reversed and ``z = cat(z, a_l)``; then the level's main steps
are reversed and unsqueezed. The reference clamps the result to [0, 1]; :meth:`HCFlow.decode` returns it unclamped.

Likelihood (the reference ``normal_flow_diracLR``): ``objective = log|det| (main flow and conditional flows) +
sum_l log N(a_l; mean_l, exp(logs_l)) + log N(Q(lr_hat); lr, exp(-6))`` where ``lr_hat`` is the 3-channel output of
the main flow, ``Q`` rounds to 1/255 after clamping to [0, 1] (a Dirac-delta approximation of ``lr_hat = lr``). The
reference adds dequantisation noise ``U(0,1)/quant`` to HR and ``-ln(quant) * H * W``; :meth:`HCFlow.log_prob` does
so only when the noise is passed, so by default it is the objective of the continuous HR image (nats, shape [B]).

This module holds the network, its couplings and steps and :class:`HCFlowPlan`; like the SRFlow family's, HCFlow's
config (:class:`~.config.HCFlowConfig`), checkpoint inference (:func:`~.recognition.infer_hcflow_config`) and YAML
reading (:func:`~.yaml_config.read_hcflow_yaml`) live in :mod:`.config`, :mod:`.recognition` and :mod:`.yaml_config`.
It is longer than the project's usual 400 lines because HCFlow's couplings, conditional flows, network and sampling
plan only make sense together (the SRFlow family shares its layers with other modules; HCFlow shares none).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Flow, LayerCallback, SamplingPlan, TracerFactory
from .bijections import gaussian_log_density
from .config import HCFlowConfig
from .couplings import Tracer
from .layers import ActNorm2d, Conv2dZeros, FlowLayer, GlowConv2d, InvConv1x1, LevelCondition, cross_split, \
    squeeze2d, unsqueeze2d
from .rrdb import RRDB

#: ``logscale = ATAN_GAIN * atan(2 s)``: the reference constant.
ATAN_GAIN = 0.318
#: Largest ``|logscale|`` of an HCFlow coupling: ``0.318 * pi / 2``.
MAX_LOG_SCALE = ATAN_GAIN * math.pi / 2
#: ``logs`` of the Gaussian that approximates the Dirac delta on the LR image.
DIRAC_LOGS = -6.0


class AtanAffineCoupling(FlowLayer):
    """HCFlow's ``AffineCoupling`` on ``C`` channels (keys ``f.conv1.*``, ``f.conv2.*``, ``f.conv3.*``).

    ``f`` = Conv3x3+ActNorm, ReLU, Conv1x1+ActNorm, ReLU, Conv2dZeros; input ``z1`` (first ``C//2`` channels), or
    ``cat(z1, cond.features)`` when ``cond_channels > 0``. Scale ``exp(0.318 * atan(2 s))`` in (0.607, 1.648).
    """

    def __init__(self, channels: int, cond_channels: int = 0, hidden: int = 64):
        super().__init__()
        self.channels, self.c_nn = channels, channels // 2
        self.c_co = channels - self.c_nn
        self.cond_channels = cond_channels
        self.f = nn.Module()
        self.f.conv1 = GlowConv2d(self.c_nn + cond_channels, hidden, 3)
        self.f.conv2 = GlowConv2d(hidden, hidden, 1)
        self.f.conv3 = Conv2dZeros(hidden, 2 * self.c_co)

    def _params(self, z1: Tensor, cond: Optional[LevelCondition]) -> tuple[Tensor, Tensor]:
        x = z1 if self.cond_channels == 0 else torch.cat([z1, cond.features], dim=1)
        h = self.f.conv3(F.relu(self.f.conv2(F.relu(self.f.conv1(x)))))
        shift, s = cross_split(h)
        return shift, ATAN_GAIN * torch.atan(2 * s)

    def forward_map(self, x, cond=None):
        z1, z2 = x[:, :self.c_nn], x[:, self.c_nn:]
        shift, logscale = self._params(z1, cond)
        return torch.cat([z1, (z2 + shift) * torch.exp(logscale)], dim=1), logscale.sum(dim=1)

    def inverse_map(self, y, cond=None, tracer: Optional[Tracer] = None):
        z1, z2 = y[:, :self.c_nn], y[:, self.c_nn:]
        shift, logscale = self._params(z1, cond)
        if tracer is not None:
            tracer("self", -logscale)
        return torch.cat([z1, z2 * torch.exp(-logscale) - shift], dim=1), (-logscale).sum(dim=1)

    @staticmethod
    def inverse_slope_bound() -> dict:
        return {"kind": "multiplicative", "max_inverse_slope": math.exp(MAX_LOG_SCALE),
                "min_inverse_slope": math.exp(-MAX_LOG_SCALE),
                "note": f"HCFlow atan affine: |log scale| < 0.318*pi/2 = {MAX_LOG_SCALE:.4f}, so the inverse slope "
                        f"of every coupling lies in ({math.exp(-MAX_LOG_SCALE):.4f}, {math.exp(MAX_LOG_SCALE):.4f})"}


class HCFlowStep(FlowLayer):
    """ActNorm -> 1x1 conv (``permute.weight``) -> atan affine coupling; sampling runs the reverse."""

    coupling_attr = "affine"

    def __init__(self, channels: int, cond_channels: int = 0, hidden: int = 64):
        super().__init__()
        self.actnorm = ActNorm2d(channels)
        self.permute = InvConv1x1(channels)
        self.affine = AtanAffineCoupling(channels, cond_channels, hidden)

    @property
    def coupling(self) -> AtanAffineCoupling:
        return self.affine

    @property
    def invconv(self) -> InvConv1x1:
        """Alias of ``permute`` so SRFlow-family audits (condition numbers) apply unchanged."""
        return self.permute

    def forward_map(self, x, cond=None):
        z, a = self.actnorm.forward_map(x)
        z, b = self.permute.forward_map(z)
        z, c = self.affine.forward_map(z, cond)
        return z, a + b + c

    def inverse_map(self, y, cond=None, tracer: Optional[Tracer] = None):
        z, c = self.affine.inverse_map(y, cond, tracer)
        z, b = self.permute.inverse_map(z)
        z, a = self.actnorm.inverse_map(z)
        return z, a + b + c


class _Squeeze(nn.Module):
    """Placeholder occupying a squeeze index (no keys)."""


class _Split(nn.Module):
    """Placeholder occupying a split index (no keys): keeps the first ``keep`` channels."""

    def __init__(self, keep: int, level: int):
        super().__init__()
        self.keep, self.level = keep, level


class LevelConditionalFlow(nn.Module):
    """``flow.level{l}_condFlow``: conditional feature extractor, prior head ``f`` and conditional steps.

    Arguments:
        channels: ``C_l`` (after the squeeze); keep: channels kept by the split (``u`` input has ``keep`` + 128 per
        coarser level); n_levels_condition: coarser levels whose features enter ``u``; n_steps: conditional steps.
    """

    def __init__(self, channels: int, keep: int, n_levels_condition: int, n_steps: int, rrdb_nb: list,
                 nf: int = 64, gc: int = 32, hidden: int = 64):
        super().__init__()
        self.consume = channels - keep
        self.conv_first = nn.Conv2d(keep + 2 * nf * n_levels_condition, nf, 3, 1, 1)
        self.RRDB_trunk0 = nn.Sequential(*[RRDB(nf, gc) for _ in range(rrdb_nb[0])])
        self.RRDB_trunk1 = nn.Sequential(*[RRDB(nf, gc) for _ in range(rrdb_nb[1])])
        self.trunk_conv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.additional_flow_steps = nn.ModuleList(HCFlowStep(self.consume, 2 * nf, hidden) for _ in range(n_steps))
        self.f = Conv2dZeros(2 * nf, 2 * self.consume)

    def feature(self, u: Tensor) -> Tensor:
        """``cf = cat(f1, f2)``, ``[B, 2 nf, H_l, W_l]`` (128 channels)."""
        first = self.conv_first(u)
        f1 = self.RRDB_trunk0(first)
        return torch.cat([f1, self.trunk_conv1(self.RRDB_trunk1(f1)) + first], dim=1)

    def prior(self, cf: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, logs)`` of the split-off part, each ``[B, consume, H_l, W_l]``."""
        return cross_split(self.f(cf))

    def encode(self, a: Tensor, cf: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Density direction: returns ``(eps, ladj [B], logp [B])`` with ``eps`` the standardised latent."""
        cond = LevelCondition(cf)
        ladj = a.new_zeros(a.shape[0])
        for step in self.additional_flow_steps:
            a, m = step.forward_map(a, cond)
            ladj = ladj + m.sum(dim=(1, 2))
        mean, logs = self.prior(cf)
        return (a - mean) / torch.exp(logs), ladj, gaussian_log_density(a, mean, logs).sum(dim=(1, 2, 3))

    def decode(self, eps: Tensor, cf: Tensor, tracer_factory=None, name: str = "") -> tuple[Tensor, Tensor]:
        """Sampling direction from the standardised latent: returns ``(a, log|da/deps| [B])``."""
        mean, logs = self.prior(cf)
        a = mean + torch.exp(logs) * eps
        ladj = logs.sum(dim=(1, 2, 3))
        cond = LevelCondition(cf)
        for k in reversed(range(len(self.additional_flow_steps))):
            tracer = tracer_factory(f"{name}.additional_flow_steps.{k}") if tracer_factory is not None else None
            a, m = self.additional_flow_steps[k].inverse_map(a, cond, tracer)
            ladj = ladj + m.sum(dim=(1, 2))
        return a, ladj


class HCFlowNet(nn.Module):
    """The ``flow`` submodule: ``layers`` (placeholders for squeezes/splits, steps) and ``level{l}_condFlow``."""

    def __init__(self, cfg: HCFlowConfig):
        super().__init__()
        self.layers = nn.ModuleList()
        self.level_of: list[int] = []
        for level, (c, keep) in enumerate(cfg.level_channels()):
            self._add(_Squeeze(), level)
            for _ in range(cfg.K[level]):
                self._add(HCFlowStep(c, 0, cfg.hidden), level)
            self._add(_Split(keep, level), level)
        for level, (c, keep) in enumerate(cfg.level_channels()):
            self.add_module(f"level{level}_condFlow", LevelConditionalFlow(
                c, keep, cfg.L - 1 - level, cfg.n_cond_steps[level], cfg.rrdb_nb, cfg.nf, cfg.gc, cfg.hidden))

    def _add(self, layer: nn.Module, level: int) -> None:
        self.layers.append(layer)
        self.level_of.append(level)

    def cond_flow(self, level: int) -> LevelConditionalFlow:
        return getattr(self, f"level{level}_condFlow")


class HCFlow(Flow):
    """HCFlow SR: a flow HR <-> (LR, high-frequency latents). Images are NCHW RGB in [0, 1].

    Implements the flow contract (:class:`~.base.Flow`). Shapes: ``lr`` ``[B, 3,
    h, w]``, HR ``[B, 3, s h, s w]`` (s = 4 or 8). Latents are the standardised split-off parts, finest level first:
    ``[eps_0 [B, C_0 - keep_0, sh/2, sw/2], ..., eps_{L-1} [B, 4 keep_{L-2} - 3, h, w]]`` (4X: 6 and 21 channels).
    ``std`` arguments are accepted and ignored. Not defined: a residual output (``upsample`` is only the bicubic
    helper). ``rd.detect.trace_sampling`` traces it (trace level = level + 1; conditional flows as split stages).
    """

    def __init__(self, config: HCFlowConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.flow = HCFlowNet(config)
        self.info: dict = {}

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _check_lr(self, lr: Tensor) -> None:
        if lr.dim() != 4 or lr.shape[1] != self.config.in_nc:
            raise ValueError(f"LR must be [B, {self.config.in_nc}, h, w], got {tuple(lr.shape)}")

    def _u(self, level: int, z: Tensor, feats: dict[int, Tensor]) -> Tensor:
        """Input of ``level{level}_condFlow``: ``z`` plus nearest-upsampled features of every coarser level."""
        parts = [z] + [F.interpolate(feats[j], scale_factor=2 ** (j - level), mode="nearest")
                       for j in range(level + 1, self.config.L)]
        return torch.cat(parts, dim=1)

    # -- density direction -------------------------------------------------------------------------------------------
    def encode(self, x: Tensor, lr: Tensor, std: Optional[Tensor] = None, noise: Optional[Tensor] = None
               ) -> tuple[list[Tensor], Tensor]:
        """Returns ``(latents, objective)``: standardised latents finest level first and the reference objective in
        nats ``[B]`` (module docstring). ``noise``: optional ``U(0,1)`` draws shaped like ``x``; when given, HR is
        dequantised as the reference does (``x + noise/quant``, objective ``- ln(quant) * H * W``)."""
        self._check_lr(lr)
        s = self.config.scale
        if x.shape[0] != lr.shape[0] or tuple(x.shape[1:]) != (lr.shape[1], lr.shape[2] * s, lr.shape[3] * s):
            raise ValueError(f"HR must be [B, 3, {s}h, {s}w] for LR {tuple(lr.shape)}, got {tuple(x.shape)}")
        objective = x.new_zeros(x.shape[0])
        if noise is not None:
            x = x + noise / self.config.quant
            objective = objective - math.log(self.config.quant) * x.shape[2] * x.shape[3]
        z, split_off, kept = x, {}, {}
        for layer, level in zip(self.flow.layers, self.flow.level_of):
            if isinstance(layer, _Squeeze):
                z = squeeze2d(z)
            elif isinstance(layer, _Split):
                z, split_off[level] = z[:, :layer.keep], z[:, layer.keep:]
                kept[level] = z
            else:
                z, m = layer.forward_map(z, None)
                objective = objective + m.sum(dim=(1, 2))
        feats: dict[int, Tensor] = {}
        latents: dict[int, Tensor] = {}
        for level in reversed(range(self.config.L)):
            cfm = self.flow.cond_flow(level)
            feats[level] = cfm.feature(self._u(level, kept[level], feats))
            latents[level], ladj, logp = cfm.encode(split_off[level], feats[level])
            objective = objective + ladj + logp
        lr_hat = torch.round(torch.clamp(z, 0, 1) * 255.0) / 255.0
        dirac = gaussian_log_density(lr_hat, lr, torch.full_like(lr, DIRAC_LOGS)).sum(dim=(1, 2, 3))
        return [latents[level] for level in range(self.config.L)], objective + dirac

    def log_prob(self, hr: Tensor, lr: Tensor, std: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> Tensor:
        """The reference objective of ``hr`` given ``lr`` in nats, ``[B]`` (see :meth:`encode`; without ``noise`` no
        dequantisation offset). Bits per dim for display: ``-log_prob / (ln 2 * 3 H W)``; the reference prints
        ``/(ln 2 * H W)`` averaged over the batch."""
        return self.encode(hr, lr, std, noise)[1]

    # -- sampling direction ------------------------------------------------------------------------------------------
    def latent_shapes(self, lr: Tensor) -> list[tuple[int, ...]]:
        """Shapes of ``[eps_0, ..., eps_{L-1}]`` for this LR batch."""
        self._check_lr(lr)
        b, h, w = lr.shape[0], lr.shape[2] * self.config.scale, lr.shape[3] * self.config.scale
        shapes = []
        for level, (c, keep) in enumerate(self.config.level_channels()):
            shapes.append((b, c - keep, h // 2 ** (level + 1), w // 2 ** (level + 1)))
        return shapes

    def draw_latents(self, lr: Tensor, heat: float, generator: Optional[torch.Generator] = None) -> list[Tensor]:
        """``N(0, heat^2)`` latents drawn on the generator's device (CPU by default), coarsest level first (the
        reference's order), moved to ``lr``'s device and dtype; ``heat = 0`` gives zeros (the prior means)."""
        shapes = self.latent_shapes(lr)
        gdev = generator.device if generator is not None else torch.device("cpu")
        out: list[Optional[Tensor]] = [None] * len(shapes)
        for i in reversed(range(len(shapes))):
            out[i] = lr.new_zeros(shapes[i]) if heat == 0 else \
                (torch.randn(shapes[i], generator=generator, device=gdev) * heat).to(lr)
        return out

    def decode_with_ladj(self, lr: Tensor, heat: Optional[float] = None, generator: Optional[torch.Generator] = None,
                         latents: Optional[list[Tensor]] = None, std: Optional[Tensor] = None,
                         tracer_factory: Optional[TracerFactory] = None,
                         layer_callback: Optional[LayerCallback] = None, *, return_features: bool = False):
        """Reverse pass from ``z = lr``. Returns ``(x [B, 3, H, W] unclamped, log|dx/d(latents)| [B])`` (plus the
        per-level conditional features ``{level: [B, 128, H_l, W_l]}`` with ``return_features``).

        ``tracer_factory(key)`` gets the main-flow layer index (int) or
        ``"level{l}_condFlow.additional_flow_steps.{k}"``
        and may return a coupling tracer; ``layer_callback(index, layer, z)`` runs after every main-flow layer."""
        heat = self.config.heat if heat is None else heat
        if latents is None:
            latents = self.draw_latents(lr, heat, generator)
        else:
            self._check_lr(lr)
            self.check_latents(lr, latents)
        z = lr
        ladj = lr.new_zeros(lr.shape[0])
        feats: dict[int, Tensor] = {}
        layers = self.flow.layers
        for i in reversed(range(len(layers))):
            layer, level = layers[i], self.flow.level_of[i]
            if isinstance(layer, _Split):
                cfm = self.flow.cond_flow(level)
                feats[level] = cfm.feature(self._u(level, z, feats))
                a, m = cfm.decode(latents[level], feats[level], tracer_factory, f"level{level}_condFlow")
                z = torch.cat([z, a], dim=1)
                ladj = ladj + m
            elif isinstance(layer, _Squeeze):
                z = unsqueeze2d(z)
            else:
                tracer = tracer_factory(i) if tracer_factory is not None else None
                z, m = layer.inverse_map(z, None, tracer)
                ladj = ladj + m.sum(dim=(1, 2))
            if layer_callback is not None:
                layer_callback(i, layer, z)
        return (z, ladj, feats) if return_features else (z, ladj)

    def features(self, lr: Tensor) -> dict[str, Tensor]:
        """Conditional-flow features ``{"level{l}_condFlow": [B, 128, s h / 2**(l+1), s w / 2**(l+1)]}``, finest
        first. The coarsest (``l = L-1``, LR resolution) is a function of the LR image alone; the finer ones are taken
        on the heat-0 sampling path (every latent at its prior mean), so all are deterministic functions of ``lr``."""
        self._check_lr(lr)
        zeros = self.draw_latents(lr, 0.0)
        _, _, feats = self.decode_with_ladj(lr, 0.0, None, zeros, return_features=True)
        return {f"level{level}_condFlow": feats[level] for level in range(self.config.L)}

    # -- what the OOD scorer needs -----------------------------------------------------------------------------------
    def feature_levels(self) -> dict[str, float]:
        """``{"level{l}_condFlow": scale / 2**(l+1)}``, finest first (4X: ``level0_condFlow`` 2,
        ``level1_condFlow`` 1)."""
        c = self.config
        return {f"level{lv}_condFlow": c.scale / 2 ** (lv + 1) for lv in range(c.L)}

    def feature_channels(self) -> int:
        """``cat(f1, f2)``: ``2 nf`` channels (128)."""
        return 2 * int(self.config.nf)

    def receptive_field(self, levels: Sequence[str]) -> int:
        """``2 + 15 (nb0 + nb1)`` LR pixels for the coarsest level; a finer level adds its own trunk and the coarser
        level's main and conditional coupling steps (two 3x3 convs each), converted to LR pixels."""
        c = self.config
        trunk = 2 + 15 * sum(int(b) for b in c.rrdb_nb)
        rf = trunk
        finest = min(int(lv[len("level"):lv.index("_")]) for lv in levels)
        for lv in range(c.L - 2, finest - 1, -1):
            r_prev, r = c.scale / 2 ** (lv + 2), c.scale / 2 ** (lv + 1)
            rf += math.ceil(2 * (c.K[lv + 1] + c.n_cond_steps[lv + 1]) / r_prev) + math.ceil(trunk / r)
        return rf

    def conditioner_features(self, x: Tensor, levels: Sequence[str]) -> dict[str, Tensor]:
        """The LR-resolution level alone needs only its own trunk, not a decode; finer levels take :meth:`features`."""
        top = f"level{self.config.L - 1}_condFlow"
        if list(levels) == [top]:
            return {top: self.flow.cond_flow(self.config.L - 1).feature(x)}
        feats = self.features(x)
        return {k: feats[k] for k in levels}

    # -- introspection -----------------------------------------------------------------------------------------------
    def sampling_plan(self) -> "HCFlowPlan":
        return HCFlowPlan(self)

    def coupling_steps(self) -> list[tuple[int, int, HCFlowStep]]:
        """``(layer_index, level, step)`` for the main-flow steps (``level`` 1-based, 1 = finest, as SRFlow's)."""
        return [(i, self.flow.level_of[i] + 1, l) for i, l in enumerate(self.flow.layers) if isinstance(l, HCFlowStep)]

    def conditional_coupling_steps(self) -> list[tuple[str, int, HCFlowStep]]:
        """``(key prefix, level, step)`` for the steps inside the conditional flows (all on the sampling path)."""
        out = []
        for level in range(self.config.L):
            for k, step in enumerate(self.flow.cond_flow(level).additional_flow_steps):
                out.append((f"flow.level{level}_condFlow.additional_flow_steps.{k}", level + 1, step))
        return out

    def extra_repr(self) -> str:
        c = self.config
        return f"family=hcflow, scale={c.scale}, L={c.L}, K={c.K}, n_cond_steps={c.n_cond_steps}, rrdb_nb={c.rrdb_nb}"


class HCFlowPlan(SamplingPlan):
    """HCFlow: main flow ``flow.flow``; trace level = HCFlow level + 1; starts from the LR image. Each split's
    conditional flow (prior ``a_l = mean + exp(logs) eps_l``, then its coupling steps reversed) is part of the split:
    its couplings are stages of the split's record (``"condFlow step k coupling"``, k 1-based) and its prior's
    ``logs`` are taken after the pass from the features the decode returns (one 1x1 conv per level)."""

    def __init__(self, flow: HCFlow):
        net = flow.flow
        super().__init__(net, net.layers, [lv + 1 for lv in net.level_of])
        self.cond = {}
        for lv in range(flow.config.L):
            for k in range(len(net.cond_flow(lv).additional_flow_steps)):
                self.cond[f"level{lv}_condFlow.additional_flow_steps.{k}"] = (lv + 1, f"condFlow step {k + 1} coupling")

    def top(self, lr, latents):
        return lr

    def kind(self, layer):
        if isinstance(layer, _Squeeze):
            return "squeeze"
        if isinstance(layer, _Split):
            return "split"
        return "coupling"

    def stage(self, key, stage):
        if isinstance(key, str):
            level, name = self.cond[key]
            return level, name if stage == "self" else f"{name}/{stage}"
        return self.level_of[key], stage

    def decode(self, flow, lr, heat, latents, std, tracer_factory, layer_callback, add_split_logs):
        x, ladj, feats = flow.decode_with_ladj(lr, heat, None, latents, std, tracer_factory=tracer_factory,
                                               layer_callback=layer_callback, return_features=True)
        for lv in sorted(feats, reverse=True):                         # sampling order: coarsest first
            add_split_logs(lv + 1, self.net.cond_flow(lv).prior(feats[lv])[1].sum(dim=1))
        return x, ladj

    def constant_steps(self):
        out = [(lv, layer) for layer, lv in zip(self.layers, self.level_of) if isinstance(layer, HCFlowStep)]
        for lv in sorted(set(self.level_of), reverse=True):
            out += [(lv, step) for step in self.net.cond_flow(lv - 1).additional_flow_steps]
        return out
