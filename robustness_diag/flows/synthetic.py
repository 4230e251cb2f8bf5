"""Deterministic "sane" random weights for any SRFlow-family architecture (demos, tests, smoke checks).

Recipe: RRDB convs kaiming-normal x 0.1 (ESRGAN's init), orthogonal 1x1 convs,
one data-dependent ActNorm initialisation pass on smooth synthetic images, then small perturbations of the
zero-initialised Conv2dZeros heads. Sampling from such a flow stays finite; an untrained flow is not a model of
anything, so use this only where the weights do not matter.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .layers import Conv2dZeros, FrozenInvConv1x1, InvConv1x1, data_dependent_init
from .network import SRFlowFamily


def smooth_images(n: int, size: int, generator: torch.Generator, channels: int = 3) -> torch.Tensor:
    """``[n, channels, size, size]`` images in [0, 1]: sums of a few random low-frequency sinusoids."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = torch.zeros(n, channels, size, size)
    for _ in range(4):
        f = torch.rand(n, channels, 2, 1, 1, generator=generator) * 3.0
        ph = torch.rand(n, channels, 1, 1, generator=generator) * 2 * math.pi
        out += torch.sin(2 * math.pi * (f[:, :, 0] * xx + f[:, :, 1] * yy) + ph)
    return (0.5 + 0.12 * out).clamp(0, 1)


@torch.no_grad()
def randomize_flow(flow: SRFlowFamily, seed: int = 0, lr_size: int = 8, batch: int = 2) -> SRFlowFamily:
    """Fills ``flow`` in place with seeded sane weights (see module docstring) and returns it in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in flow.RRDB.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in) * 0.1)
            m.bias.zero_()
    for m in flow.flowUpsamplerNet.modules():
        if isinstance(m, (InvConv1x1, FrozenInvConv1x1)):
            c = m.weight.shape[0]
            q, r = torch.linalg.qr(torch.randn(c, c, generator=g))
            q = q * torch.sign(torch.diagonal(r))
            m.weight.copy_(q.reshape(m.weight.shape))
            if isinstance(m, FrozenInvConv1x1):
                m.weight_transpose.copy_(q.t().reshape(m.weight.shape))
    lr = smooth_images(batch, lr_size, g)
    hr = torch.nn.functional.interpolate(lr, scale_factor=flow.config.scale, mode="bicubic", align_corners=False)
    target = hr - flow.upsample(lr) + 0.02 * torch.randn(hr.shape, generator=g) if flow.config.residual else hr
    flow.train()
    with data_dependent_init(flow):
        flow.encode(target, lr)
    for m in flow.flowUpsamplerNet.modules():
        if isinstance(m, Conv2dZeros):
            m.weight.add_(torch.randn(m.weight.shape, generator=g) * 0.002)
            m.bias.add_(torch.randn(m.bias.shape, generator=g) * 0.05)
            m.logs.add_(torch.randn(m.logs.shape, generator=g) * 0.01)
    return flow.eval()
