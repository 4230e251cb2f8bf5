r"""The SRFlow-family network (SRFlow, NCSR/FS-NCSR, robustNF): RRDB conditioner + FlowUpsamplerNet layer list.

State-dict keys match the reference exactly (``RRDB.*``, ``flowUpsamplerNet.layers.{i}.*``,
``flowUpsamplerNet.f.0.*``), so third-party weights load with ``load_state_dict(strict=True)``.

Layer plan, for level = 1..L (level l runs at HR / 2**l):
squeeze (an index without keys) -> ``n_additional`` steps without coupling -> ``K`` coupling steps ->
Split2d if the level is in ``splits`` (4X: after level 1; 8X: after levels 1 and 2).

Latents are listed in encode order ``[eps_split_1, eps_split_2, ..., z_top]``; heat is the std of every latent.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Flow, LayerCallback, SamplingPlan, TracerFactory
from .bijections import gaussian_log_density
from .config import COUPLING_ATTR, FlowConfig
from .couplings import CondAffineCoupling, CondRQSplineCoupling, Tracer
from .layers import ActNorm2d, FlowLayer, FrozenInvConv1x1, InvConv1x1, LevelCondition, Split2d, Squeeze
from .rrdb import LEVEL_TO_NAME, RRDBNet


class FlowStep(FlowLayer):
    """ActNorm -> invertible 1x1 conv -> optional coupling (density direction); sampling runs the reverse.

    The coupling, when present, is registered under ``coupling_attr`` ("affine", "affinereparam" or "rqspline").
    """

    def __init__(self, channels: int, frozen_invconv: bool = False, coupling: Optional[FlowLayer] = None,
                 coupling_attr: str = "affine"):
        super().__init__()
        self.actnorm = ActNorm2d(channels)
        self.invconv = FrozenInvConv1x1(channels) if frozen_invconv else InvConv1x1(channels)
        self.coupling_attr = coupling_attr if coupling is not None else None
        if coupling is not None:
            self.add_module(coupling_attr, coupling)

    @property
    def coupling(self) -> Optional[FlowLayer]:
        return getattr(self, self.coupling_attr) if self.coupling_attr else None

    def forward_map(self, x, cond=None):
        z, a = self.actnorm.forward_map(x)
        z, b = self.invconv.forward_map(z)
        if self.coupling is None:
            return z, a + b
        z, c = self.coupling.forward_map(z, cond)
        return z, a + b + c

    def inverse_map(self, y, cond=None, tracer: Optional[Tracer] = None):
        z, c = (y, 0.0) if self.coupling is None else self.coupling.inverse_map(y, cond, tracer)
        z, b = self.invconv.inverse_map(z)
        z, a = self.actnorm.inverse_map(z)
        return z, a + b + c


class FlowUpsamplerNet(nn.Module):
    """The invertible part: ``layers`` (squeezes, steps, splits, indexed as in the reference) and the unused ``f``."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.layers = nn.ModuleList()
        self.level_of: list[int] = []          # level of every layer index
        self.uses_std: list[bool] = []
        c = cfg.in_nc
        for level in range(1, cfg.L + 1):
            self._add(Squeeze(), level)
            c *= 4
            for _ in range(cfg.n_additional[level - 1]):
                self._add(FlowStep(c, cfg.frozen_invconv), level)
            k = cfg.K[level - 1]
            for step in range(k):
                use_std = cfg.std_channels > 0 and cfg.S[level - 1] >= k - step
                self._add(FlowStep(c, cfg.frozen_invconv, _make_coupling(cfg, c, use_std), cfg.coupling_attr), level)
            if level in cfg.splits:
                split = Split2d(c)
                self._add(split, level)
                c = split.keep
        self.out_channels = c
        if cfg.f_out > 0:
            self.f = nn.Sequential(nn.Conv2d(cfg.f_in, cfg.f_out, 3, 1, 1))

    def _add(self, layer: nn.Module, level: int) -> None:
        self.layers.append(layer)
        self.level_of.append(level)


def _make_coupling(cfg: FlowConfig, channels: int, use_std: bool) -> FlowLayer:
    common = dict(cond_channels=cfg.cond_channels, hidden=cfg.hidden, std_channels=cfg.std_channels,
                  use_std=use_std, kernel_hidden=cfg.kernel_hidden)
    if cfg.coupling == "rqspline":
        return CondRQSplineCoupling(channels, bounds=tuple(cfg.bounds), **common)
    return CondAffineCoupling(channels, eps=cfg.eps, reparam=cfg.coupling == "affine_reparam", **common)


class SRFlowFamily(Flow):
    """A conditional flow p(HR | LR) of the SRFlow family. Images are NCHW RGB in [0, 1].

    Arguments:
        config: a validated :class:`FlowConfig`.

    Shapes: ``lr`` is ``[B, 3, h, w]``; HR is ``[B, 3, s*h, s*w]`` with ``s = config.scale``; ``s*h`` and ``s*w``
    must be
    divisible by ``2**L`` (4X and 8X: ``h``, ``w`` even).
    """

    def __init__(self, config: FlowConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.RRDB = RRDBNet(config.in_nc, config.nf, config.nb, config.gc, config.scale, tuple(config.blocks))
        self.flowUpsamplerNet = FlowUpsamplerNet(config)
        self.level_names = LEVEL_TO_NAME[config.scale]
        self.info: dict = {}

    # -- conditioning ------------------------------------------------------------------------------------------------
    def features(self, lr: Tensor) -> dict[str, Tensor]:
        """Conditioner features per flow level, after stacking: ``{name: [B, cond_channels, H_l, W_l]}`` where
        ``name`` is the reference key (4X: ``fea_up2`` at 2x LR, ``fea_up1`` at LR, ``fea_up0`` at LR/2)."""
        self._check_lr(lr)
        return self.RRDB.conditioning(lr, tuple(self.level_names[l] for l in range(1, self.config.L + 1)))

    def feature_levels(self) -> dict[str, float]:
        """``{level_names[l]: scale / 2**l}`` for ``l = 1..L`` (4X: ``fea_up2`` 2, ``fea_up1`` 1, ``fea_up0`` 0.5)."""
        return {self.level_names[lv]: self.config.scale / 2 ** lv for lv in range(1, self.config.L + 1)}

    def feature_channels(self) -> int:
        """``cond_channels``: the level feature plus the stacked trunk blocks (320 for SRFlow)."""
        return int(self.config.cond_channels)

    def receptive_field(self, levels: Sequence[str]) -> int:
        """RRDB: ``conv_first`` + ``nb`` blocks of 3 dense blocks of 5 3x3 convs + ``trunk_conv`` = ``2 + 15 nb`` LR
        pixels; each upsampling conv adds at most one LR pixel; the half-resolution level's 2x2 averaging adds one."""
        ratios = self.feature_levels()
        extra = 0
        for lv in levels:
            r = ratios[lv]
            extra = max(extra, 1 if r < 1 else int(round(math.log2(r))))
        return 2 + 15 * int(self.config.nb) + extra

    def conditioner_features(self, x: Tensor, levels: Sequence[str]) -> dict[str, Tensor]:
        """Only the RRDB outputs ``levels`` need (no size check: pad first)."""
        feats = self.RRDB.conditioning(x, tuple(levels))
        return {k: feats[k] for k in levels}

    def _level_conditions(self, lr: Tensor, std: Optional[Tensor]) -> dict[int, LevelCondition]:
        feats = self.features(lr)
        conds, scratch = {}, {}                   # one concatenation buffer for the pass (LevelCondition)
        for level in range(1, self.config.L + 1):
            ft = feats[self.level_names[level]]
            conds[level] = LevelCondition(ft, self._std_map(std, ft), scratch)
        return conds

    def _std_map(self, std: Optional[Tensor], ft: Tensor) -> Optional[Tensor]:
        """NCSR's std map at a level: bicubic resize of a 3-channel map, broadcast of a 1-channel one, batch broadcast.

        ``std=None`` on an NCSR-family flow means the reference test-time condition: an all-zero map.
        """
        n = self.config.std_channels
        if n == 0:
            return None
        b, _, h, w = ft.shape
        if std is None:
            return ft.new_zeros(b, n, h, w)
        std = std.to(ft)
        if n == 3 and std.shape[1] == 3:
            std = F.interpolate(std, size=(h, w), mode="bicubic")
        return std.expand(b, n, h, w)

    def _check_lr(self, lr: Tensor) -> None:
        if lr.dim() != 4 or lr.shape[1] != self.config.in_nc:
            raise ValueError(f"LR must be [B, {self.config.in_nc}, h, w], got {tuple(lr.shape)}")
        m = 2 ** self.config.L
        h, w = lr.shape[2] * self.config.scale, lr.shape[3] * self.config.scale
        if h % m or w % m:
            need = m // math.gcd(m, self.config.scale)
            raise ValueError(f"LR size {lr.shape[2]}x{lr.shape[3]} is not divisible by {need}: "
                             f"this {self.config.scale}X "
                             f"flow with L={self.config.L} levels needs HR divisible by {m} (pad the LR first)")

    # -- density direction -------------------------------------------------------------------------------------------
    def encode(self, x: Tensor, lr: Tensor, std: Optional[Tensor] = None) -> tuple[list[Tensor], Tensor]:
        """Maps the flow's target ``x`` ([B, 3, H, W]; the residual for residual flows) to latents.

        Returns ``(latents, log_prob)``: latents in encode order ``[eps_split_1, ..., z_top]`` and the exact
        log-density of ``x`` in nats, shape [B] (= the reference objective with ``add_gt_noise`` off).
        """
        conds = self._level_conditions(lr, std)
        z = x
        ladj = x.new_zeros(x.shape[0])
        latents = []
        for layer, level in zip(self.flowUpsamplerNet.layers, self.flowUpsamplerNet.level_of):
            if isinstance(layer, Split2d):
                z, eps, m = layer.encode(z)
                latents.append(eps)
            else:
                z, m = layer.forward_map(z, conds[level])
            ladj = ladj + m.sum(dim=(1, 2))
        latents.append(z)
        return latents, ladj + gaussian_log_density(z).sum(dim=(1, 2, 3))

    def log_prob(self, hr: Tensor, lr: Tensor, std: Optional[Tensor] = None) -> Tensor:
        """Exact log p(HR | LR) in nats, shape [B], for a continuous HR image in [0, 1] (no dequantisation offset).

        For residual flows the density of HR equals that of ``HR - bicubic_up(LR)`` (a translation). Bits per dim for
        display: ``-log_prob / (ln 2 * 3*H*W)``; the references print ``/(ln 2 * H*W)``.
        """
        x = hr - self.upsample(lr) if self.config.residual else hr
        return self.encode(x, lr, std)[1]

    # -- sampling direction ------------------------------------------------------------------------------------------
    def latent_shapes(self, lr: Tensor) -> list[tuple[int, ...]]:
        """Shapes of ``[eps_split_1, ..., z_top]`` for this LR batch."""
        self._check_lr(lr)
        b = lr.shape[0]
        h, w = lr.shape[2] * self.config.scale, lr.shape[3] * self.config.scale
        c, shapes = self.config.in_nc, []
        for layer in self.flowUpsamplerNet.layers:
            if isinstance(layer, Squeeze):
                c, h, w = c * 4, h // 2, w // 2
            elif isinstance(layer, Split2d):
                shapes.append((b, layer.consume, h, w))
                c = layer.keep
        shapes.append((b, c, h, w))
        return shapes

    def draw_latents(self, lr: Tensor, heat: float, generator: Optional[torch.Generator] = None) -> list[Tensor]:
        """Draws ``N(0, heat^2)`` latents on the generator's device (CPU by default), then moves them to ``lr``'s
        device and dtype, so a seed gives the same latents on CPU and CUDA. Drawn top latent first, then the
        deepest split upwards (the reference's order); ``heat = 0`` gives zeros."""
        shapes = self.latent_shapes(lr)
        gdev = generator.device if generator is not None else torch.device("cpu")
        out: list[Optional[Tensor]] = [None] * len(shapes)
        for i in reversed(range(len(shapes))):
            if heat == 0:
                out[i] = lr.new_zeros(shapes[i])
            else:
                out[i] = (torch.randn(shapes[i], generator=generator, device=gdev) * heat).to(lr)
        return out

    def decode_with_ladj(self, lr: Tensor, heat: Optional[float] = None, generator: Optional[torch.Generator] = None,
                         latents: Optional[list[Tensor]] = None, std: Optional[Tensor] = None,
                         tracer_factory: Optional[TracerFactory] = None,
                         layer_callback: Optional[LayerCallback] = None) -> tuple[Tensor, Tensor]:
        """:meth:`decode` that also returns ``log|det dx/d(latents)|`` of the sampling map, [B] (coupling, 1x1 conv and
        ActNorm inverses plus the split priors' ``exp(logs)`` scaling of their latents).

        ``tracer_factory(layer_index)`` may return a coupling tracer (see :mod:`.couplings`); ``layer_callback(index,
        layer, z)`` is called after every layer with its output. Both are for instrumentation and change nothing.
        """
        heat = self.config.heat if heat is None else heat
        if latents is None:
            latents = self.draw_latents(lr, heat, generator)
        else:
            self.check_latents(lr, latents)
        latents = list(latents)
        conds = self._level_conditions(lr, std)
        z = latents.pop()
        ladj = z.new_zeros(z.shape[0])
        layers = self.flowUpsamplerNet.layers
        for i in reversed(range(len(layers))):
            layer, level = layers[i], self.flowUpsamplerNet.level_of[i]
            if isinstance(layer, Split2d):
                z, m = layer.decode(z, latents.pop())
                ladj = ladj + m.sum(dim=(1, 2))
            elif isinstance(layer, FlowStep):
                tracer = tracer_factory(i) if tracer_factory is not None else None
                z, m = layer.inverse_map(z, conds[level], tracer)
                ladj = ladj + m.sum(dim=(1, 2))
            else:
                z, m = layer.inverse_map(z, conds[level])
            if layer_callback is not None:
                layer_callback(i, layer, z)
        return z, ladj

    # -- introspection -----------------------------------------------------------------------------------------------
    def coupling_steps(self) -> list[tuple[int, int, FlowStep]]:
        """``(layer_index, level, step)`` for every step that has a coupling."""
        fu = self.flowUpsamplerNet
        return [(i, fu.level_of[i], l) for i, l in enumerate(fu.layers)
                if isinstance(l, FlowStep) and l.coupling is not None]

    def sampling_plan(self) -> "SRFlowPlan":
        return SRFlowPlan(self)

    def extra_repr(self) -> str:
        c = self.config
        return f"family={c.family}, coupling={c.coupling}, scale={c.scale}, L={c.L}, K={c.K}"


class SRFlowPlan(SamplingPlan):
    """SRFlow family (and LLFlow): ``flowUpsamplerNet.layers``; trace level = the flow's level; the pass starts from
    the top latent; a Split2d's prior scales the sampled half by ``exp(logs)``."""

    def __init__(self, flow: SRFlowFamily):
        fu = flow.flowUpsamplerNet
        super().__init__(fu, fu.layers, fu.level_of)

    def top(self, lr, latents):
        return latents[-1]

    def kind(self, layer):
        if isinstance(layer, Squeeze):
            return "squeeze"
        if isinstance(layer, Split2d):
            return "split"
        return "coupling" if isinstance(layer, FlowStep) and layer.coupling is not None else "step"

    def split_logs(self, layer, z):
        if not isinstance(layer, Split2d):
            return None
        # the prior's log-scale of the sampled half (same conv on the same input as the decode just ran)
        return layer.prior(z[:, :layer.keep])[1].sum(dim=1)

    def constant_steps(self):
        return [(lv, layer) for layer, lv in zip(self.layers, self.level_of) if isinstance(layer, FlowStep)]


def build_flow(config: FlowConfig) -> SRFlowFamily:
    """Builds an untrained network (couplings start near the identity: Conv2dZeros heads are zero)."""
    if config.coupling_attr != COUPLING_ATTR.get(config.coupling, config.coupling_attr) and not (
            config.coupling == "affine_reparam" and config.coupling_attr == "affine"):
        raise ValueError(f"coupling_attr {config.coupling_attr!r} does not fit coupling {config.coupling!r}")
    return SRFlowFamily(config)
