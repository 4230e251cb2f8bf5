r"""Conditional couplings of the SRFlow family: affine (SRFlow, NCSR, robustNF reparam) and the 2-bin RQ spline.

A coupling on ``C`` channels is three element-wise sub-transforms applied in this order in the density direction
(sampling runs them in reverse), each a math object from :mod:`.bijections` whose parameters come from a small
conv network (:func:`~.layers.coupling_subnet`):

1. ``features``: all ``C`` channels, parameters from ``fFeatures(ft)`` - depends on the condition only;
2. ``std`` (NCSR family, flagged steps only, and only when a std map is given): the second half ``z2``, parameters
   from ``f*_std(cat(z1, std_map))``;
3. ``self``: ``z2``, parameters from ``fAffine/fRQspline(cat(z1, ft))``.

``z1`` is the first ``C // 2`` channels, ``z2`` the remaining ``C - C // 2``. Network names match the reference
state_dict keys, registered in the reference order (self, features, std).

Sampling can be instrumented: ``inverse_map(..., tracer=fn)`` calls ``fn(stage_name, ladj)`` after each
sub-transform with its element-wise inverse log-slope ``ladj`` (``log|dx/dy|``, shape ``[B, C_stage, H, W]``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .bijections import DEFAULT_BOUNDS, Affine, RQSpline2Bin, sigmoid_scale
from .layers import FlowLayer, LevelCondition, coupling_subnet, cross_split

Tracer = Callable[[str, Tensor], None]


class ConditionalCoupling(FlowLayer):
    """Shared three-stage structure; subclasses define the parameter count and the bijection.

    Arguments:
        channels: ``C``, channels of the coupled tensor.
        cond_channels: channels of the conditioner features ``ft`` (320 for the reference SRFlow/NCSR).
        hidden: hidden channels of the sub-networks (64 in every reference config).
        std_channels: channels of the NCSR std map (3), or 0 when the family has no std branch.
        use_std: whether this step runs the std branch (NCSR's ``S`` rule); weights exist either way.
        kernel_hidden: kernel of the sub-networks' middle conv (1 in the references).
    """

    #: (self-conditional net, feature net, std net) attribute names, as in the reference state_dict.
    net_names: tuple[str, str, str]
    params_per_channel: int

    def __init__(self, channels: int, cond_channels: int = 320, hidden: int = 64, std_channels: int = 0,
                 use_std: bool = False, kernel_hidden: int = 1):
        super().__init__()
        self.channels = channels
        self.c_nn = channels // 2
        self.c_co = channels - self.c_nn
        self.std_channels = std_channels
        self.use_std = bool(use_std and std_channels > 0)
        n = self.params_per_channel
        self_name, feat_name, std_name = self.net_names
        self.add_module(self_name, coupling_subnet(self.c_nn + cond_channels, n * self.c_co, hidden, kernel_hidden))
        self.add_module(feat_name, coupling_subnet(cond_channels, n * channels, hidden, kernel_hidden))
        if std_channels > 0:
            self.add_module(std_name, coupling_subnet(self.c_nn + std_channels, n * self.c_co, hidden, kernel_hidden))

    # -- to be provided by subclasses -------------------------------------------------------------------------------
    def make_bijection(self, h: Tensor, channels: int):
        """Turns a network output ``[B, n*channels, H, W]`` into an element-wise bijection on ``channels``."""
        raise NotImplementedError

    def inverse_slope_bound(self) -> dict:
        """The theoretical bound on one sub-transform's inverse: a dict for reports."""
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------------------------------------
    def stages(self, cond: LevelCondition) -> list[str]:
        """The sub-transforms this coupling runs for ``cond``, in density order (sampling runs them reversed):
        ``"features"``, ``"std"`` (only with a std map and a std-conditioned step) and ``"self"``."""
        runs_std = self.use_std and cond.std is not None
        return ["features", "std", "self"] if runs_std else ["features", "self"]

    def _bijection_for(self, stage: str, z1: Tensor, cond: LevelCondition):
        self_name, feat_name, std_name = self.net_names
        if stage == "features":
            return self.make_bijection(getattr(self, feat_name)(cond.features), self.channels)
        if stage == "std":
            std = cond.std.expand(z1.shape[0], -1, -1, -1)
            return self.make_bijection(getattr(self, std_name)(torch.cat([z1, std], dim=1)), self.c_co)
        return self.make_bijection(getattr(self, self_name)(cond.with_features(z1)), self.c_co)

    def forward_map(self, x: Tensor, cond: LevelCondition | None = None) -> tuple[Tensor, Tensor]:
        z = x
        ladj = x.new_zeros(x.shape[0], x.shape[2], x.shape[3])
        for stage in self.stages(cond):
            if stage == "features":
                z, l = self._bijection_for(stage, None, cond).forward(z)
            else:
                z1, z2 = z[:, :self.c_nn], z[:, self.c_nn:]
                z2, l = self._bijection_for(stage, z1, cond).forward(z2)
                z = torch.cat([z1, z2], dim=1)
            ladj = ladj + l.sum(dim=1)
        return z, ladj

    def inverse_map(self, y: Tensor, cond: LevelCondition | None = None,
                    tracer: Optional[Tracer] = None) -> tuple[Tensor, Tensor]:
        z = y
        ladj = y.new_zeros(y.shape[0], y.shape[2], y.shape[3])
        for stage in reversed(self.stages(cond)):
            if stage == "features":
                z, l = self._bijection_for(stage, None, cond).inverse(z)
            else:
                z1, z2 = z[:, :self.c_nn], z[:, self.c_nn:]
                z2, l = self._bijection_for(stage, z1, cond).inverse(z2)
                z = torch.cat([z1, z2], dim=1)
            if tracer is not None:
                tracer(stage, l)
            ladj = ladj + l.sum(dim=1)
        return z, ladj


class CondAffineCoupling(ConditionalCoupling):
    """SRFlow's ``CondAffineSeparatedAndCond`` (NCSR/robustNF add the std branch).

    Each stage: ``(shift, raw) = cross(net(...))``, ``scale = sigmoid(raw + 2) + eps``, ``y = (x + shift) * scale``.
    The inverse slope ``1/scale`` is bounded only by ``1/eps`` (1e4 for eps = 1e-4): the exploding inverse.
    With ``reparam=True`` (robustNF ``CondAffineReparamSeparatedAndCond``) ``scale = 1/(sigmoid(raw + 2) + eps)``, which
    bounds the inverse slope by ``1 + eps`` and moves the unbounded slope to the density direction.
    """

    net_names = ("fAffine", "fFeatures", "fAffine_std")
    params_per_channel = 2

    def __init__(self, channels: int, cond_channels: int = 320, hidden: int = 64, std_channels: int = 0,
                 use_std: bool = False, eps: float = 1e-4, reparam: bool = False, kernel_hidden: int = 1):
        super().__init__(channels, cond_channels, hidden, std_channels, use_std, kernel_hidden)
        self.eps = float(eps)
        self.reparam = bool(reparam)

    def make_bijection(self, h: Tensor, channels: int) -> Affine:
        shift, raw = cross_split(h)
        scale = sigmoid_scale(raw, self.eps)
        return Affine(shift, 1.0 / scale if self.reparam else scale)

    def inverse_slope_bound(self) -> dict:
        if self.reparam:
            return {"kind": "multiplicative", "max_inverse_slope": 1.0 + self.eps,
                    "note": "reparametrised affine: inverse slope <= 1 + eps, forward slope up to 1/eps"}
        return {"kind": "multiplicative", "max_inverse_slope": 1.0 / self.eps,
                "note": f"affine: inverse slope up to 1/eps = {1.0 / self.eps:.4g} per sub-transform"}


class CondRQSplineCoupling(ConditionalCoupling):
    """robustNF's ``CondRQsplineSeparatedAndCond``: each stage is ``RQS(x) + shift`` with the 2-bin spline on a box.

    The network output is viewed as ``[B, C_target, 4, H, W]`` (channel-major, not 'cross'): per target channel the
    consecutive outputs are (width logit, height logit, interior-derivative logit, shift).
    """

    net_names = ("fRQspline", "fFeatures", "fRQspline_std")
    params_per_channel = 4

    def __init__(self, channels: int, cond_channels: int = 320, hidden: int = 64, std_channels: int = 0,
                 use_std: bool = False, bounds: tuple[float, float, float, float] = DEFAULT_BOUNDS,
                 kernel_hidden: int = 1):
        super().__init__(channels, cond_channels, hidden, std_channels, use_std, kernel_hidden)
        self.bounds = tuple(float(b) for b in bounds)

    def make_bijection(self, h: Tensor, channels: int) -> RQSpline2Bin:
        p = h.view(h.shape[0], channels, 4, h.shape[2], h.shape[3])
        return RQSpline2Bin(p[:, :, 0], p[:, :, 1], p[:, :, 2], p[:, :, 3], bounds=self.bounds)

    def inverse_slope_bound(self) -> dict:
        left, right, bottom, top = self.bounds
        dev = max(right - left, top - bottom)
        return {"kind": "additive", "max_inverse_deviation": dev,
                "note": f"RQ spline: |inverse(u) - (u - shift)| <= {dev:g}; slope 1 outside [{bottom:g}, {top:g}]"}

