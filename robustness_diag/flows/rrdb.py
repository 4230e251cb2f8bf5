r"""The RRDB conditioner (ESRGAN ``RRDBNet``) as the SRFlow family uses it; keys match ``RRDB.*`` of the checkpoints.

Feature maps (``nf`` channels each; LeakyReLU slope 0.2):

* ``block_i``: output of trunk block ``i`` (LR resolution), for the stacked indices;
* ``last_lr_fea`` = ``fea_up1`` = ``trunk_out + trunk_conv(trunk_out)`` (LR, **not** activated);
* ``fea_up2`` = lrelu(upconv1(nearest x2(last_lr_fea))), ``fea_up4`` = lrelu(upconv2(nearest x2(fea_up2))),
  ``fea_up8`` = lrelu(upconv3(...)) for scale >= 8: **post-activation**, because the reference's LeakyReLU is
  in place and so activates the tensor it stores;
* ``fea_up0`` = bilinear x1/2 of ``last_lr_fea`` (align_corners False, floor size).

:meth:`RRDBNet.conditioning` then appends the nearest-resized concatenation of the stacked blocks to every level
feature (``nf * (1 + len(blocks))`` = 320 channels for the reference settings). ``HRconv`` and ``conv_last`` are the
RRDB's own SR head, kept for strict loading but never run by the flow.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.2)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs with dense connections; output ``conv5(...) * 0.2 + x``. Shapes ``[B, nf, H, W]``."""

    def __init__(self, nf: int = 64, gc: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        x1 = _lrelu(self.conv1(x))
        x2 = _lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = _lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = _lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three :class:`ResidualDenseBlock`, output ``out * 0.2 + x``."""

    def __init__(self, nf: int = 64, gc: int = 32):
        super().__init__()
        self.RDB1 = ResidualDenseBlock(nf, gc)
        self.RDB2 = ResidualDenseBlock(nf, gc)
        self.RDB3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: Tensor) -> Tensor:
        return self.RDB3(self.RDB2(self.RDB1(x))) * 0.2 + x


#: Level -> feature key (``FlowUpsamplerNet.levelToName``); level l runs at HR / 2**l.
LEVEL_TO_NAME = {
    2: {1: "fea_up1", 2: "fea_up0"},
    4: {1: "fea_up2", 2: "fea_up1", 3: "fea_up0"},
    8: {1: "fea_up4", 2: "fea_up2", 3: "fea_up1", 4: "fea_up0"},
    16: {1: "fea_up8", 2: "fea_up4", 3: "fea_up2", 4: "fea_up1"},
}


class RRDBNet(nn.Module):
    """The conditioner g(y): LR image ``[B, in_nc, h, w]`` in [0, 1] -> per-level features.

    Arguments:
        in_nc: input channels (3).
        nf: base feature channels (64); gc: growth channels (32); nb: number of trunk blocks.
        scale: SR factor (4, 8 or 16); decides which ``upconv`` layers exist.
        blocks: indices of the trunk blocks whose outputs are stacked onto every level feature.
    """

    def __init__(self, in_nc: int = 3, nf: int = 64, nb: int = 23, gc: int = 32, scale: int = 4,
                 blocks: tuple[int, ...] = (1, 8, 15, 22), out_nc: int = 3):
        super().__init__()
        self.scale = scale
        self.blocks = tuple(int(b) for b in blocks)
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1)
        self.RRDB_trunk = nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)])
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.upconv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.upconv2 = nn.Conv2d(nf, nf, 3, 1, 1)
        if scale >= 8:
            self.upconv3 = nn.Conv2d(nf, nf, 3, 1, 1)
        if scale >= 16:
            self.upconv4 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)

    def raw_features(self, lr: Tensor, keys: tuple[str, ...] | None = None) -> dict[str, Tensor]:
        """Runs the trunk; returns ``block_i`` for the stacked indices and the level features named in ``keys``
        (default: every level feature the scale uses), each ``[B, nf, H_key, W_key]``."""
        keys = tuple(LEVEL_TO_NAME[self.scale].values()) if keys is None else keys
        out: dict[str, Tensor] = {}
        fea = self.conv_first(lr)
        for idx, block in enumerate(self.RRDB_trunk):
            fea = block(fea)
            if idx in self.blocks:
                out[f"block_{idx}"] = fea
        last = fea + self.trunk_conv(fea)
        out["last_lr_fea"] = out["fea_up1"] = last
        ups = [k for k in ("fea_up2", "fea_up4", "fea_up8", "fea_up16") if hasattr(self, UPCONV_NAMES[k])]
        need = max((ups.index(k) for k in keys if k in ups), default=-1)
        fea = last
        for k in ups[:need + 1]:
            fea = _lrelu(getattr(self, UPCONV_NAMES[k])(F.interpolate(fea, scale_factor=2, mode="nearest")))
            out[k] = fea
        if "fea_up0" in keys:
            out["fea_up0"] = F.interpolate(last, scale_factor=0.5, mode="bilinear", align_corners=False,
                                           recompute_scale_factor=True)
        return out

    def conditioning(self, lr: Tensor, keys: tuple[str, ...] | None = None) -> dict[str, Tensor]:
        """Returns the stacked per-level features ``{key: [B, nf * (1 + len(blocks)), H_key, W_key]}``.

        Channel layout: ``0..nf-1`` the level feature, then ``nf`` channels per stacked block in ``blocks`` order,
        nearest-resized to the level's size (top-left pixel of each cell when downsizing).
        """
        keys = tuple(LEVEL_TO_NAME[self.scale].values()) if keys is None else keys
        raw = self.raw_features(lr, keys)
        stack = torch.cat([raw[f"block_{b}"] for b in self.blocks], dim=1) if self.blocks else None
        result = {}
        for k in keys:
            f = raw[k]
            result[k] = f if stack is None else torch.cat([f, F.interpolate(stack, size=f.shape[2:])], dim=1)
        return result


UPCONV_NAMES = {"fea_up2": "upconv1", "fea_up4": "upconv2", "fea_up8": "upconv3", "fea_up16": "upconv4"}
