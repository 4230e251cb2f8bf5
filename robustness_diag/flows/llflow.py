r"""LLFlow (wyf0912/LLFlow, low-light enhancement): the ConEncoder1 conditioner and the scale-1 flow.

The flow part is the SRFlow-family ``FlowUpsamplerNet`` (same keys, same affine couplings) with ``scale = 1``,
``L = 3`` levels, two steps without coupling after each squeeze and **no splits**; only the conditioner and the prior
differ (keys and shapes: ``tests/fixtures/manifests/LLFlow_*.tsv.gz``).

Conditioner ``RRDB`` = ``ConEncoder1`` (keys ``RRDB.*``), input ``x6`` = the 6-channel preprocessed dark image
(:func:`robustness_diag.data.lowlight.lowlight_condition`: log image + histogram-equalised image), all maps full
resolution ``H x W`` unless stated:

* ``color_map_in = exp(x6[:, :3]) / (sum_c exp(x6[:, :3]) + 1e-4)`` (3 ch), ``noise_map = max(|d_H|, |d_W|)`` of it
  with central differences ``(x[i+1] - x[i-1]) / 2`` and zero fill (3 ch);
* ``fea = conv_second(lrelu(conv_first(cat(x6, color_map_in, noise_map))))`` (12 input channels), ``head =
  maxpool2(fea)`` (H/2); RRDB trunk on ``head`` (``block_i`` kept); ``fea_down2 = head + trunk_conv(trunk_out)``
  (H/2);
* ``fea_down4 = lrelu(downconv1(bilinear 1/2 (fea_down2)))`` (H/4, **post-activation**: the reference's in-place
  LeakyReLU); ``fea_down8 = downconv2(bilinear 1/2 (fea_down4))`` (H/8, not activated);
* ``color_map = sigmoid(fine_tune_color_map(nearest x2 (fea_down2)))`` (3 ch, H): the prior mean.

Level features (``levelToName`` for scale 1): level 1 (H/2) ``fea_up2 = fea_down2``, level 2 (H/4) ``fea_up1 =
fea_down4``, level 3 (H/8) ``fea_up0 = fea_down8``, each with the nearest-resized stacked blocks appended
(``nf * (1 + len(blocks))`` channels). ``downconv3``, ``HRconv``, ``conv_last``, ``awb_para`` and
``flowUpsamplerNet.f`` exist for strict loading but are never run.

Prior: ``z = squeeze8(color_map)`` + noise, where ``squeeze8`` is a **single** factor-8 space-to-depth (channel
``c*64 + 8*dy + dx``, 192 channels at H/8), not three factor-2 squeezes. The reference's reverse pass ignores the
passed latent and decodes ``z = squeeze8(color_map)`` exactly (deterministic output = :meth:`LLFlow.decode` at heat 0).
Its encode path scores ``log N(z; squeeze8(color_map), I)`` (with probability ``train_gt_ratio`` it uses the GT
chroma instead, even in eval; this class always uses the LR colour map). Heat > 0 sampling is **not** in the
reference API; here it draws ``z = squeeze8(color_map) + heat * N(0, I)``, the prior the encode path implies.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.lowlight import darken, lowlight_condition
from .base import LayerCallback, TracerFactory
from .bijections import gaussian_log_density
from .config import FlowConfig
from .layers import LevelCondition, Split2d, squeeze2d
from .network import FlowStep, FlowUpsamplerNet, SRFlowFamily
from .rrdb import RRDB

#: Level -> feature key for LLFlow (reference ``levelToName`` for scale 1); level l runs at H / 2**l.
LLFLOW_LEVEL_TO_NAME = {1: "fea_up2", 2: "fea_up1", 3: "fea_up0"}
LLFLOW_LEVEL_KEYS = tuple(LLFLOW_LEVEL_TO_NAME.values())
#: Channels of the reference ConEncoder1 input with the shipped flags (3 log + 3 histeq + 3 colour map + 3 noise map).
LLFLOW_ENCODER_IN_NC = 12
#: Factor of the single space-to-depth that maps the colour map onto the top latent.
PRIOR_SQUEEZE = 8


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.2)


def _central_difference(x: Tensor, dim: int) -> Tensor:
    """``(x[i+1] - x[i-1]) / 2`` along ``dim`` with zero fill outside (the reference's ``ConEncoder1.gradient``)."""
    n = x.shape[dim]
    nxt = torch.cat([x.narrow(dim, 1, n - 1), torch.zeros_like(x.narrow(dim, 0, 1))], dim=dim)
    prv = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.narrow(dim, 0, n - 1)], dim=dim)
    return 0.5 * (nxt - prv)


class ConEncoder1(nn.Module):
    """LLFlow's conditioner (keys ``conv_first``, ``conv_second``, ``RRDB_trunk``, ``trunk_conv``, ``downconv1-3``,
    ``HRconv``, ``conv_last``, ``awb_para``, ``fine_tune_color_map.0``, in the reference's registration order).

    Arguments:
        in_nc: input channels of ``conv_first`` (12 with the shipped flags); nf, nb, gc: widths and trunk depth;
        blocks: stacked trunk-block indices (not inferable from weights).
    """

    def __init__(self, in_nc: int = LLFLOW_ENCODER_IN_NC, nf: int = 64, nb: int = 24, gc: int = 32,
                 blocks: tuple[int, ...] = (1, 3, 5, 7), out_nc: int = 3):
        super().__init__()
        self.blocks = tuple(int(b) for b in blocks)
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1)
        self.conv_second = nn.Conv2d(nf, nf, 3, 1, 1)
        self.RRDB_trunk = nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)])
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.downconv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.downconv2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.downconv3 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)
        self.awb_para = nn.Linear(nf, 3)
        self.fine_tune_color_map = nn.Sequential(nn.Conv2d(nf, 3, 1, 1), nn.Sigmoid())

    @staticmethod
    def input_maps(x6: Tensor) -> tuple[Tensor, Tensor]:
        """``(color_map_in, noise_map)``, each ``[B, 3, H, W]``, computed from the log channels of ``x6``."""
        raw = x6[:, 0:3].exp()
        color = raw / (raw.sum(dim=1, keepdim=True) + 1e-4)
        noise = torch.maximum(_central_difference(color, 2).abs(), _central_difference(color, 3).abs())
        return color, noise

    def raw_features(self, x6: Tensor) -> dict[str, Tensor]:
        """Unstacked features: ``fea_up4`` (head, H/2), ``fea_up2`` (H/2), ``fea_up1``/``last_lr_fea`` (H/4),
        ``fea_up0`` (H/8), ``block_i`` (H/2), each ``nf`` channels, and ``color_map`` ``[B, 3, H, W]`` in (0, 1)."""
        color, noise = self.input_maps(x6)
        fea = self.conv_second(_lrelu(self.conv_first(torch.cat([x6, color, noise], dim=1))))
        head = F.max_pool2d(fea, 2)
        out: dict[str, Tensor] = {}
        fea = head
        for idx, block in enumerate(self.RRDB_trunk):
            fea = block(fea)
            if idx in self.blocks:
                out[f"block_{idx}"] = fea
        down2 = head + self.trunk_conv(fea)
        down4 = _lrelu(self.downconv1(F.interpolate(down2, scale_factor=0.5, mode="bilinear", align_corners=False,
                                                    recompute_scale_factor=True)))
        down8 = self.downconv2(F.interpolate(down4, scale_factor=0.5, mode="bilinear", align_corners=False,
                                             recompute_scale_factor=True))
        out.update({"fea_up0": down8, "fea_up1": down4, "last_lr_fea": down4, "fea_up2": down2, "fea_up4": head,
                    "color_map": self.fine_tune_color_map(F.interpolate(down2, scale_factor=2))})
        return out

    def conditioning(self, x6: Tensor, keys: tuple = LLFLOW_LEVEL_KEYS) -> dict[str, Tensor]:
        """Stacked level features ``{key: [B, nf * (1 + len(blocks)), H_key, W_key]}`` plus ``color_map``."""
        raw = self.raw_features(x6)
        stack = torch.cat([raw[f"block_{b}"] for b in self.blocks], dim=1) if self.blocks else None
        result = {}
        for k in keys:
            f = raw[k]
            result[k] = f if stack is None else torch.cat([f, F.interpolate(stack, size=f.shape[2:])], dim=1)
        result["color_map"] = raw["color_map"]
        return result


class LLFlow(SRFlowFamily):
    """LLFlow: a conditional flow p(normal-light image | dark image) at scale 1. Images are NCHW RGB in [0, 1].

    Implements the flow contract (:class:`~.base.Flow`) through :class:`SRFlowFamily`, whose layer plan and sampling
    plan it shares. Differences:

    * ``lr`` is either the dark image ``[B, 3, H, W]`` in [0, 1] (preprocessed internally with
      :func:`~robustness_diag.data.lowlight.lowlight_condition`) or that function's ``[B, 6, H, W]`` output. ``H`` and
      ``W`` must be multiples of 8. HR (the normal-light image) has the same size.
    * Latents are ``[z]`` with ``z`` ``[B, 192, H/8, W/8]`` the *raw* top latent (not standardised): heat ``h`` draws
      ``z = squeeze8(color_map) + h * N(0, I)``; the default heat is 0, the reference's deterministic output.
    * ``std`` arguments are accepted and ignored (no std branch); there is no residual output.
    """

    def __init__(self, config: FlowConfig):
        nn.Module.__init__(self)
        config.validate()
        if config.family != "llflow":
            raise ValueError(f"LLFlow needs a config of family 'llflow', got {config.family!r}")
        self.config = config
        self.RRDB = ConEncoder1(config.encoder_in_nc or LLFLOW_ENCODER_IN_NC, config.nf, config.nb, config.gc,
                                tuple(config.blocks))
        self.flowUpsamplerNet = FlowUpsamplerNet(config)
        self.level_names = dict(LLFLOW_LEVEL_TO_NAME)
        self.info: dict = {}

    # -- conditioning ------------------------------------------------------------------------------------------------
    def condition_input(self, lr: Tensor) -> Tensor:
        """The 6-channel conditioner input: ``lr`` itself if it has 6 channels, else ``lowlight_condition(lr)``."""
        self._check_lr(lr)
        return lr if lr.shape[1] == 6 else lowlight_condition(lr)

    def _conditioning(self, lr: Tensor) -> dict[str, Tensor]:
        return self.RRDB.conditioning(self.condition_input(lr), tuple(self.level_names.values()))

    def features(self, lr: Tensor) -> dict[str, Tensor]:
        """Conditioner features per flow level, after stacking: ``fea_up2`` ``[B, C, H/2, W/2]``, ``fea_up1``
        ``[B, C, H/4, W/4]``, ``fea_up0`` ``[B, C, H/8, W/8]`` with ``C = cond_channels`` (320; smallNet 64)."""
        feats = self._conditioning(lr)
        return {k: feats[k] for k in self.level_names.values()}

    def conditioner_features(self, x: Tensor, levels: Sequence[str]) -> dict[str, Tensor]:
        """Only the levels asked for, from the 6-channel preprocessed input (or the dark image)."""
        feats = self.RRDB.conditioning(self.condition_input(x), tuple(levels))
        return {k: feats[k] for k in levels}

    def receptive_field(self, levels: Sequence[str]) -> int:
        """Colour-map gradient, two full-resolution convs and the 2x2 max-pool (4), the trunk at half resolution
        (``2 (15 nb + 1)``), then 6 for ``fea_up1`` (bilinear 1/2 + conv at 1/4) and 12 more for ``fea_up0``."""
        ratios = self.feature_levels()
        deepest = min(ratios[lv] for lv in levels)
        return 4 + 2 * (15 * int(self.config.nb) + 1) + (6 if deepest <= 0.25 else 0) + (12 if deepest <= 0.125 else 0)

    def input_domain(self, photos: Tensor) -> Tensor:
        """The documented synthetic darkening (:func:`robustness_diag.data.lowlight.darken`) of clean photos."""
        return darken(photos)

    def color_map(self, lr: Tensor) -> Tensor:
        """The predicted colour map ``[B, 3, H, W]`` in (0, 1), whose factor-8 squeeze is the prior mean."""
        return self._conditioning(lr)["color_map"]

    def _conds_and_mean(self, lr: Tensor) -> tuple[dict[int, LevelCondition], Tensor]:
        feats = self._conditioning(lr)
        scratch: dict = {}                        # one concatenation buffer for the pass (LevelCondition)
        conds = {level: LevelCondition(feats[name], None, scratch) for level, name in self.level_names.items()}
        return conds, squeeze2d(feats["color_map"], PRIOR_SQUEEZE)

    def _check_lr(self, lr: Tensor) -> None:
        if lr.dim() != 4 or lr.shape[1] not in (3, 6):
            raise ValueError(f"LLFlow input must be a dark RGB image [B, 3, H, W] or its 6-channel preprocessed form "
                             f"[B, 6, H, W], got {tuple(lr.shape)}")
        m = 2 ** self.config.L
        if lr.shape[2] % m or lr.shape[3] % m:
            raise ValueError(f"image size {lr.shape[2]}x{lr.shape[3]} is not divisible by {m}: LLFlow squeezes "
                             f"{self.config.L} times (pad the image first)")

    # -- density direction -------------------------------------------------------------------------------------------
    def encode(self, x: Tensor, lr: Tensor, std: Optional[Tensor] = None) -> tuple[list[Tensor], Tensor]:
        """Maps the normal-light image ``x`` ``[B, 3, H, W]`` to ``([z], log_prob)``: ``z`` ``[B, 192, H/8, W/8]`` and
        the exact log-density in nats ``[B]`` under ``N(squeeze8(color_map(lr)), I)`` (no dequantisation offset)."""
        conds, mean = self._conds_and_mean(lr)
        if x.shape[0] != mean.shape[0] or tuple(x.shape[2:]) != tuple(lr.shape[2:]) or x.shape[1] != 3:
            raise ValueError(f"HR must be [B, 3, H, W] matching the input {tuple(lr.shape)}, got {tuple(x.shape)}")
        z = x
        ladj = x.new_zeros(x.shape[0])
        for layer, level in zip(self.flowUpsamplerNet.layers, self.flowUpsamplerNet.level_of):
            z, m = layer.forward_map(z, conds[level])
            ladj = ladj + m.sum(dim=(1, 2))
        return [z], ladj + gaussian_log_density(z, mean, torch.zeros_like(mean)).sum(dim=(1, 2, 3))

    # -- sampling direction ------------------------------------------------------------------------------------------
    def latent_shapes(self, lr: Tensor) -> list[tuple[int, ...]]:
        """``[(B, 3 * 4**L, H / 2**L, W / 2**L)]`` (192 channels at H/8 for the reference L = 3)."""
        self._check_lr(lr)
        m = 2 ** self.config.L
        return [(lr.shape[0], self.config.in_nc * m * m, lr.shape[2] // m, lr.shape[3] // m)]

    def _prior_draw(self, mean: Tensor, heat: float, generator: Optional[torch.Generator]) -> Tensor:
        if heat == 0:
            return mean
        gdev = generator.device if generator is not None else torch.device("cpu")
        return mean + (torch.randn(tuple(mean.shape), generator=generator, device=gdev) * heat).to(mean)

    def draw_latents(self, lr: Tensor, heat: float, generator: Optional[torch.Generator] = None) -> list[Tensor]:
        """``[squeeze8(color_map) + heat * N(0, I)]``; noise drawn on the generator's device (CPU by default)."""
        self._check_latent_prior()
        _, mean = self._conds_and_mean(lr)
        return [self._prior_draw(mean, heat, generator)]

    def _check_latent_prior(self) -> None:
        if self.config.L != 3:
            raise ValueError(f"LLFlow's colour-map prior needs L = 3 (192 channels at H/8), this flow has L = "
                             f"{self.config.L}")

    def decode_with_ladj(self, lr: Tensor, heat: Optional[float] = None, generator: Optional[torch.Generator] = None,
                         latents: Optional[list[Tensor]] = None, std: Optional[Tensor] = None,
                         tracer_factory: Optional[TracerFactory] = None,
                         layer_callback: Optional[LayerCallback] = None) -> tuple[Tensor, Tensor]:
        """Reverse pass; returns ``(x [B, 3, H, W], log|dx/dz| [B])``. ``latents=[z]`` is used as is; otherwise
        ``z = squeeze8(color_map) + heat * N(0, I)`` (heat default ``config.heat`` = 0: the reference output).
        ``tracer_factory``/``layer_callback`` as in :meth:`SRFlowFamily.decode_with_ladj`."""
        heat = self.config.heat if heat is None else heat
        conds, mean = self._conds_and_mean(lr)
        if latents is None:
            self._check_latent_prior()
            z = self._prior_draw(mean, heat, generator)
        else:
            self.check_latents(lr, latents)
            z = latents[-1]
        ladj = z.new_zeros(z.shape[0])
        layers = self.flowUpsamplerNet.layers
        for i in reversed(range(len(layers))):
            layer, level = layers[i], self.flowUpsamplerNet.level_of[i]
            if isinstance(layer, FlowStep):
                tracer = tracer_factory(i) if tracer_factory is not None else None
                z, m = layer.inverse_map(z, conds[level], tracer)
            elif isinstance(layer, Split2d):  # pragma: no cover - LLFlow has no splits (validated)
                raise ValueError("LLFlow has no Split2d layers")
            else:
                z, m = layer.inverse_map(z, conds[level])
            ladj = ladj + m.sum(dim=(1, 2))
            if layer_callback is not None:
                layer_callback(i, layer, z)
        return z, ladj

    def upsample(self, lr: Tensor) -> Tensor:
        """Scale 1: the RGB input itself (only defined for the 3-channel form; LLFlow has no residual output)."""
        if lr.shape[1] != 3:
            raise ValueError("upsample is only defined for the dark RGB image, not the 6-channel condition")
        return lr

    def extra_repr(self) -> str:
        c = self.config
        return f"family=llflow, scale=1, L={c.L}, K={c.K}, nf={c.nf}, nb={c.nb}, blocks={c.blocks}"
