r"""Flow layers of the SRFlow family as ``nn.Module``\ s whose parameter names match the reference state_dicts.

Every invertible layer implements

* ``forward_map(x, cond) -> (y, ladj_map)``  (density direction, HR -> latent) and
* ``inverse_map(y, cond) -> (x, ladj_map)``  (sampling direction),

where ``ladj_map`` has shape ``[B, H, W]`` at the layer's **output** resolution: the log-determinant summed over
channels only (the per-position variant that feeds exploding-inverse maps). ``forward``/``inverse`` return the
contract form ``(y, ladj)`` with ``ladj`` summed over all non-batch dims, shape ``[B]``.
``cond`` is a :class:`LevelCondition` (conditioner features of the layer's level plus the optional std map) or None.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bijections import gaussian_log_density


@dataclass
class LevelCondition:
    """Conditioning seen by every layer of one flow level.

    Attributes:
        features: conditioner features ``ft`` at the level's resolution, ``[B, C_cond, H, W]`` (320 ch for SRFlow).
        std: NCSR noise-level map resized to ``[B, std_channels, H, W]``, or None (the std branch is then skipped).
        scratch: a dict shared by the conditions of one pass (:meth:`with_features` keeps its buffer there), or None.
    """

    features: Tensor | None = None
    std: Tensor | None = None
    scratch: dict | None = field(default=None, repr=False, compare=False)

    def with_features(self, z1: Tensor) -> Tensor:
        """``torch.cat([z1, features], dim=1)``. With a ``scratch`` dict (shared by the conditions of one pass) and
        without autograd, the result is a buffer reused by every coupling of the level: the features are copied in
        once per level, ``z1`` at each call, and the previous level's buffer is freed first (bitwise the same
        tensor; at real image sizes a fresh 320-channel concatenation per coupling was a new memory mapping to fault
        in each time). The returned tensor is valid until the next call.
        """
        f = self.features
        if self.scratch is None or f is None or torch.is_grad_enabled():
            return torch.cat([z1, f], dim=1)
        c, buf = z1.shape[1], self.scratch.get("joined")
        if (buf is None or self.scratch.get("features") is not f or buf.dtype != z1.dtype
                or buf.device != z1.device or buf.shape != (z1.shape[0], c + f.shape[1], *z1.shape[2:])):
            self.scratch.clear()                                   # the previous level's buffer goes first
            buf = torch.empty((z1.shape[0], c + f.shape[1], *z1.shape[2:]), dtype=z1.dtype, device=z1.device)
            buf[:, c:] = f
            self.scratch.update(joined=buf, features=f)
        buf[:, :c] = z1
        return buf


def _zeros_map(x: Tensor) -> Tensor:
    return x.new_zeros(x.shape[0], x.shape[2], x.shape[3])


class FlowLayer(nn.Module):
    """Base class: subclasses implement ``forward_map`` and ``inverse_map`` (see module docstring)."""

    def forward_map(self, x: Tensor, cond: LevelCondition | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse_map(self, y: Tensor, cond: LevelCondition | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor, cond: LevelCondition | None = None) -> tuple[Tensor, Tensor]:
        """Density direction; returns ``(y, ladj[B])``."""
        y, m = self.forward_map(x, cond)
        return y, m.sum(dim=(1, 2))

    def inverse(self, y: Tensor, cond: LevelCondition | None = None) -> tuple[Tensor, Tensor]:
        """Sampling direction; returns ``(x, ladj[B])`` with ladj = log|dx/dy|."""
        x, m = self.inverse_map(y, cond)
        return x, m.sum(dim=(1, 2))


class ActNorm2d(FlowLayer):
    """Per-channel affine ``y = (x + bias) * exp(logs)``; params ``bias``, ``logs`` of shape ``[1, C, 1, 1]``.

    Data-dependent initialisation (zero mean, unit std of the first batch, as Glow) runs only on request, through
    :meth:`initialize` or :func:`data_dependent_init`; loading and eval never change the parameters.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.init_pending = False  # set by data_dependent_init(); never part of the state_dict

    @torch.no_grad()
    def initialize(self, x: Tensor, scale: float = 1.0) -> None:
        """Sets bias/logs so that the output of ``x`` has zero mean and std ``scale`` per channel (Glow init)."""
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        self.bias.copy_(-mean)
        self.logs.copy_(torch.log(scale / (var.sqrt() + 1e-6)))

    def _ladj_map(self, x: Tensor, sign: float) -> Tensor:
        return (sign * self.logs.sum()).expand(x.shape[0], x.shape[2], x.shape[3])

    def apply_encode(self, x: Tensor) -> Tensor:
        """``(x + bias) * exp(logs)``, initialising from ``x`` first when a data-dependent init is pending."""
        if self.init_pending:
            self.initialize(x)
            self.init_pending = False
        return (x + self.bias) * torch.exp(self.logs)

    def forward_map(self, x, cond=None):
        return self.apply_encode(x), self._ladj_map(x, 1.0)

    def inverse_map(self, y, cond=None):
        return y * torch.exp(-self.logs) - self.bias, self._ladj_map(y, -1.0)


class InvConv1x1(FlowLayer):
    """Trainable invertible 1x1 convolution; ``weight`` is ``[C, C]`` (SRFlow ``InvertibleConv1x1``).

    The inverse weight is computed in float64 and cast back, as the reference does, for bit-exact decoding.
    """

    def __init__(self, channels: int, weight: Tensor | None = None):
        super().__init__()
        if weight is None:
            weight = torch.linalg.qr(torch.randn(channels, channels))[0]
        self.weight = nn.Parameter(weight.clone())

    def _ladj_map(self, x: Tensor, sign: float) -> Tensor:
        return (sign * torch.slogdet(self.weight)[1]).expand(x.shape[0], x.shape[2], x.shape[3])

    def forward_map(self, x, cond=None):
        c = self.weight.shape[0]
        return F.conv2d(x, self.weight.view(c, c, 1, 1)), self._ladj_map(x, 1.0)

    def inverse_map(self, y, cond=None):
        c = self.weight.shape[0]
        w_inv = torch.inverse(self.weight.double()).to(self.weight.dtype)
        return F.conv2d(y, w_inv.view(c, c, 1, 1)), self._ladj_map(y, -1.0)

    def condition_number(self) -> float:
        """2-norm condition number of the weight (1 for an orthogonal matrix)."""
        return float(torch.linalg.cond(self.weight.detach().double()))


class FrozenInvConv1x1(FlowLayer):
    """robustNF's frozen orthogonal 1x1 conv (``permutation_train: false``).

    Holds ``weight`` and ``weight_transpose`` (both ``[C, C, 1, 1]``, requires_grad False). Forward convolves with
    ``weight`` and contributes **zero** log-determinant (as the reference does: the matrix is orthogonal); inverse
    convolves with ``weight_transpose``.
    """

    def __init__(self, channels: int, weight: Tensor | None = None):
        super().__init__()
        if weight is None:
            weight = torch.linalg.qr(torch.randn(channels, channels))[0]
        w = weight.reshape(channels, channels, 1, 1).clone()
        self.weight = nn.Parameter(w, requires_grad=False)
        self.weight_transpose = nn.Parameter(w[:, :, 0, 0].t().reshape_as(w).contiguous(), requires_grad=False)

    def forward_map(self, x, cond=None):
        return F.conv2d(x, self.weight), _zeros_map(x)

    def inverse_map(self, y, cond=None):
        return F.conv2d(y, self.weight_transpose), _zeros_map(y)

    def orthogonality_error(self) -> tuple[float, float]:
        """Returns ``(max|W W^T - I|, max|weight_transpose - W^T|)``."""
        w = self.weight.detach()[:, :, 0, 0].double()
        wt = self.weight_transpose.detach()[:, :, 0, 0].double()
        eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        return float((w @ w.t() - eye).abs().max()), float((wt - w.t()).abs().max())

    def condition_number(self) -> float:
        return float(torch.linalg.cond(self.weight.detach()[:, :, 0, 0].double()))


def squeeze2d(x: Tensor, factor: int = 2) -> Tensor:
    """Space-to-depth: ``[B, C, H, W] -> [B, C*f*f, H/f, W/f]``; output channel ``c*f*f + f*dy + dx``."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // factor, factor, w // factor, factor)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, c * factor * factor, h // factor, w // factor)


def unsqueeze2d(x: Tensor, factor: int = 2) -> Tensor:
    """Exact inverse of :func:`squeeze2d`."""
    b, c, h, w = x.shape
    f2 = factor * factor
    x = x.view(b, c // f2, factor, factor, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, c // f2, h * factor, w * factor)


class Squeeze(FlowLayer):
    """Parameter-free squeeze (it occupies a layer index but has no state_dict keys)."""

    def forward_map(self, x, cond=None):
        y = squeeze2d(x)
        return y, _zeros_map(y)

    def inverse_map(self, y, cond=None):
        x = unsqueeze2d(y)
        return x, _zeros_map(x)


class GlowConv2d(nn.Module):
    """Glow's conv: ``k x k`` conv without bias, 'same' padding, then an encode-direction ActNorm (keys ``weight``,
    ``actnorm.bias``, ``actnorm.logs``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size) * 0.05)
        self.actnorm = ActNorm2d(out_channels)
        self.padding = (kernel_size - 1) // 2

    def forward(self, x: Tensor) -> Tensor:
        h = F.conv2d(x, self.weight, padding=self.padding)
        if torch.is_grad_enabled() or self.actnorm.init_pending:
            return self.actnorm.apply_encode(h)
        # without autograd: the same two element-wise ops, in place on the fresh conv output (no second and third
        # activation-sized tensor: at real image sizes each would be a new memory mapping to fault in)
        return h.add_(self.actnorm.bias).mul_(torch.exp(self.actnorm.logs))


class Conv2dZeros(nn.Module):
    """Zero-initialised 3x3 conv with bias, output scaled by ``exp(3 * logs)`` (keys ``weight``, ``bias``,
    ``logs [C_out, 1, 1]``)."""

    LOGSCALE_FACTOR = 3.0

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.logs = nn.Parameter(torch.zeros(out_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=1) * torch.exp(self.logs * self.LOGSCALE_FACTOR)


def coupling_subnet(in_channels: int, out_channels: int, hidden: int = 64, kernel_hidden: int = 1) -> nn.Sequential:
    """SRFlow's coupling network F: ``Conv3x3+ActNorm, ReLU, Conv(k)+ActNorm, ReLU, Conv2dZeros`` (indices 0..4)."""
    return nn.Sequential(
        GlowConv2d(in_channels, hidden, 3), nn.ReLU(inplace=True),        # on GlowConv2d's own output: safe
        GlowConv2d(hidden, hidden, kernel_hidden), nn.ReLU(inplace=True),
        Conv2dZeros(hidden, out_channels),
    )


def cross_split(h: Tensor) -> tuple[Tensor, Tensor]:
    """SRFlow's 'cross' split: (even channels, odd channels)."""
    return h[:, 0::2], h[:, 1::2]


class Split2d(nn.Module):
    """SRFlow's Split2d: keeps the first ``C - round(C/2)`` channels and models the rest with a learned Gaussian
    ``N(mean, exp(logs)^2)``, ``(mean, logs) = cross(Conv2dZeros(z1))``. Keys ``conv.weight/bias/logs``.

    Not a bijection on its own: :meth:`encode` returns ``(z1, eps, logp_map)`` where ``eps`` is the standardised
    consumed part and ``logp_map`` [B, H, W] the Gaussian log-density of the consumed channels (summed over
    channels); :meth:`decode` rebuilds ``z = cat(z1, mean + exp(logs) * eps)`` and returns ``log|dz2/deps|`` per
    position (``sum_c logs``): the prior's own amplification of the sampled latent.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.keep = channels - int(round(channels * 0.5))
        self.consume = channels - self.keep
        self.conv = Conv2dZeros(self.keep, 2 * self.consume)

    def prior(self, z1: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(mean, logs)`` of the consumed channels, each ``[B, consume, H, W]``."""
        return cross_split(self.conv(z1))

    def encode(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z1, z2 = z[:, :self.keep], z[:, self.keep:]
        mean, logs = self.prior(z1)
        eps = (z2 - mean) / torch.exp(logs)
        return z1, eps, gaussian_log_density(z2, mean, logs).sum(dim=1)

    def decode(self, z1: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        mean, logs = self.prior(z1)
        z2 = mean + torch.exp(logs) * eps
        return torch.cat([z1, z2], dim=1), logs.sum(dim=1)


class data_dependent_init:
    """Context manager: every ActNorm2d in ``module`` initialises itself from the first input it sees.

    Example: ``with data_dependent_init(flow): flow.encode(hr, lr)`` (one batch) before training.
    """

    def __init__(self, module: nn.Module):
        self.actnorms = [m for m in module.modules() if isinstance(m, ActNorm2d)]

    def __enter__(self):
        for m in self.actnorms:
            m.init_pending = True
        return self

    def __exit__(self, *exc):
        for m in self.actnorms:
            m.init_pending = False
        return False
