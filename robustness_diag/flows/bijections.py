r"""Element-wise bijections as stateless math objects.

Conventions (shared by every bijection and flow layer in this package):

* **forward** is the density direction (HR image ``x`` -> latent ``z``), **inverse** is sampling (``z`` -> ``x``).
* The objects here act element-wise, so their Jacobian is diagonal. ``forward(x) -> (y, ladj)`` and
  ``inverse(y) -> (x, ladj)`` return ``ladj`` **element-wise** with the shape of the input:
  ``ladj = log|dy/dx|`` for forward and ``log|dx/dy|`` for inverse, so ``ladj_inverse(y) == -ladj_forward(x)``.
  Flow layers reduce it: over channels for per-position maps ``[B, H, W]``, over all non-batch dims for ``[B]``.
* Parameters are tensors broadcastable to the input. Zero network output must give the identity (or the documented
  initial map); nothing here asserts, syncs with the host, or mutates its inputs.

The two couplings of the robustness paper (Hong, Park & Chun, ICCV 2023, arXiv:2212.04319) are built from these:

* :class:`Affine` - SRFlow's ``(x + shift) * scale``; its inverse slope ``1/scale`` reaches ``1/eps = 1e4``.
* :class:`RQSpline2Bin` - the modified 2-bin rational-quadratic spline on a box with identity tails, followed by an
  additive shift; its inverse deviates from ``u - shift`` by at most the box width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: Default box of the paper's spline (robustNF config keys ``left/righ/bottom/top``).
DEFAULT_BOUNDS = (-0.5, 0.5, -0.5, 0.5)
MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3


def sigmoid_scale(raw: Tensor, eps: float) -> Tensor:
    """Computes SRFlow's affine scale ``sigmoid(raw + 2) + eps`` (in (eps, 1 + eps)); ``raw = 0`` gives 0.881."""
    return torch.sigmoid(raw + 2.0) + eps


@dataclass(frozen=True)
class Affine:
    r"""Element-wise affine map ``y = (x + shift) * scale``.

    Arguments:
        shift: additive term, broadcastable to the input.
        scale: positive multiplier, broadcastable to the input.

    The inverse ``x = y / scale - shift`` has slope ``1/scale``: the exploding-inverse quantity of the paper.
    """

    shift: Tensor
    scale: Tensor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Maps ``x`` to ``y``; returns ``(y, log|dy/dx|)`` element-wise."""
        y = (x + self.shift) * self.scale
        return y, torch.log(self.scale).expand_as(y)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Maps ``y`` to ``x``; returns ``(x, log|dx/dy|)`` element-wise (``-log scale``)."""
        x = y / self.scale - self.shift
        return x, (-torch.log(self.scale)).expand_as(x)


@dataclass(frozen=True)
class _Knots:
    """The three knots of a 2-bin spline, each a tensor broadcast to the input shape.

    ``x0 < x1 < x2`` are input knots, ``y0 < y1 < y2`` output knots; ``d`` is the interior knot derivative (the
    boundary derivatives are fixed at 1 so the spline joins the identity tails with C1 continuity).
    """

    x0: float
    x1: Tensor
    x2: float
    y0: float
    y1: Tensor
    y2: float
    d: Tensor


class RQSpline2Bin:
    r"""The robustness paper's modified rational-quadratic spline with 2 bins, identity tails and a shift.

    ``y = RQS(x) + shift`` where ``RQS`` maps the box ``[left, right] -> [bottom, top]`` monotonically and is the
    identity outside it (``x <= left`` or ``x >= right``). Parameters, element-wise (robustNF
    ``FlowRQsplineCouplingsAblation.rational_quadratic_spline`` with ``NUM_BINS = 1``):

    * ``w``: width logit; the first bin has width fraction ``sigmoid(w) * (1 - 2e-3) + 1e-3`` of the box;
    * ``h``: height logit, likewise for the output;
    * ``d``: interior-derivative logit; derivative ``exp(d) * (1 - 1e-3) + 1e-3``;
    * ``shift``: additive term applied after the spline in the forward direction.

    Zero parameters give the identity. In the inverse, ``|x - (y - shift)| <= right - left`` for every input, which is
    why this coupling cannot explode (Remark 2 of the paper); the local slope inside the box is not bounded.

    The inverse clamps the quadratic's discriminant at 0 and ``theta`` to ``[0, 1]`` instead of asserting, so it never
    returns NaN for finite input; bins are left-closed (``x >= knot`` selects the upper bin).
    """

    def __init__(self, w: Tensor, h: Tensor, d: Tensor, shift: Tensor | None = None,
                 bounds: tuple[float, float, float, float] = DEFAULT_BOUNDS):
        self.w, self.h, self.d = w, h, d
        self.shift = shift
        self.left, self.right, self.bottom, self.top = (float(b) for b in bounds)
        if not (self.left < self.right and self.bottom < self.top):
            raise ValueError(f"spline bounds must satisfy left < right and bottom < top, got {bounds}")
        if (self.left, self.right) != (self.bottom, self.top):
            # With identity tails the box must map onto itself, otherwise the map is not a bijection.
            raise ValueError(f"spline box must be square (left == bottom, right == top) for identity tails, "
                             f"got {bounds}")

    # -- knots ---------------------------------------------------------------------------------------------------
    def _knots(self) -> _Knots:
        width = self.right - self.left
        height = self.top - self.bottom
        wf = torch.sigmoid(self.w) * (1 - 2 * MIN_BIN_WIDTH) + MIN_BIN_WIDTH
        hf = torch.sigmoid(self.h) * (1 - 2 * MIN_BIN_HEIGHT) + MIN_BIN_HEIGHT
        # The reference's exp overflows to inf (then NaN) past log(max float); cap the logit just below it, which
        # changes nothing wherever the reference is finite.
        d_logit = torch.clamp(self.d, max=math.log(torch.finfo(self.d.dtype).max) - 1.0)
        d = torch.exp(d_logit) * (1 - MIN_DERIVATIVE) + MIN_DERIVATIVE
        return _Knots(self.left, width * wf + self.left, self.right,
                      self.bottom, height * hf + self.bottom, self.top, d)

    @staticmethod
    def _bin(upper: Tensor, k: _Knots):
        """Per-element bin geometry: (x_k, w_b, y_k, h_b, d_k, d_k1) selected by ``upper`` (bool)."""
        xk = torch.where(upper, k.x1, k.x0)
        wb = torch.where(upper, k.x2 - k.x1, k.x1 - k.x0)
        yk = torch.where(upper, k.y1, k.y0)
        hb = torch.where(upper, k.y2 - k.y1, k.y1 - k.y0)
        one = torch.ones_like(k.d)
        dk = torch.where(upper, k.d, one)
        dk1 = torch.where(upper, one, k.d)
        return xk, wb, yk, hb, dk, dk1

    @staticmethod
    def _log_slope(theta: Tensor, s: Tensor, dk: Tensor, dk1: Tensor) -> Tensor:
        """log dy/dx inside a bin at relative position ``theta`` (bin slope ``s``, knot derivatives ``dk, dk1``)."""
        t1t = theta * (1 - theta)
        den = s + (dk + dk1 - 2 * s) * t1t
        inner = dk1 * theta.pow(2) + 2 * s * t1t + dk * (1 - theta).pow(2)
        # log(s^2 * inner) split so that s^2 * d cannot overflow for huge knot derivatives.
        return 2 * torch.log(s) + torch.log(inner) - 2 * torch.log(den)

    # -- spline without shift ------------------------------------------------------------------------------------
    def spline_forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Applies ``RQS`` (no shift); returns ``(y, log|dy/dx|)`` element-wise."""
        k = self._knots()
        inside = (x > self.left) & (x < self.right)
        xs = torch.where(inside, x, torch.zeros_like(x) + 0.5 * (self.left + self.right))  # finite dead branch
        upper = xs >= k.x1
        xk, wb, yk, hb, dk, dk1 = self._bin(upper, k)
        s = hb / wb
        theta = (xs - xk) / wb
        t1t = theta * (1 - theta)
        y = yk + hb * (s * theta.pow(2) + dk * t1t) / (s + (dk + dk1 - 2 * s) * t1t)
        y = torch.clamp(y, self.bottom, self.top)
        ladj = self._log_slope(theta, s, dk, dk1)
        return torch.where(inside, y, x), torch.where(inside, ladj, torch.zeros_like(ladj))

    def spline_inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Applies ``RQS^-1`` (no shift); returns ``(x, log|dx/dy|)`` element-wise."""
        k = self._knots()
        inside = (y > self.bottom) & (y < self.top)
        ys = torch.where(inside, y, torch.zeros_like(y) + 0.5 * (self.bottom + self.top))
        upper = ys >= k.y1
        xk, wb, yk, hb, dk, dk1 = self._bin(upper, k)
        s = hb / wb
        dy = ys - yk
        curv = dk + dk1 - 2 * s
        a = dy * curv + hb * (s - dk)
        b = hb * dk - dy * curv
        c = -s * dy
        # Normalise the quadratic so b^2 - 4ac cannot overflow for huge knot derivatives (same root).
        m = torch.maximum(torch.maximum(a.abs(), b.abs()), c.abs()).clamp(min=torch.finfo(a.dtype).tiny)
        a, b, c = a / m, b / m, c / m
        sq = torch.sqrt(torch.clamp(b.pow(2) - 4 * a * c, min=0.0))
        tiny = torch.finfo(a.dtype).tiny
        # One root, two cancellation-free forms: 2c / (-b - sq) for b >= 0 (the reference's form), and
        # (-b + sq) / (2a) for b < 0, where -b - sq would cancel. At c == 0 (y on a knot) theta = 0, not 0/0.
        den_pos = torch.where(-b - sq < 0, -b - sq, torch.full_like(b, -tiny))
        den_neg = torch.where(a.abs() > tiny, 2 * a, torch.full_like(a, tiny))
        theta = torch.where(b >= 0, (2 * c) / den_pos, (-b + sq) / den_neg)
        theta = torch.clamp(torch.nan_to_num(theta, nan=0.0), 0.0, 1.0)
        x = torch.clamp(theta * wb + xk, self.left, self.right)
        ladj = -self._log_slope(theta, s, dk, dk1)
        return torch.where(inside, x, y), torch.where(inside, ladj, torch.zeros_like(ladj))

    # -- with shift ----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Maps ``x`` to ``y = RQS(x) + shift``; returns ``(y, log|dy/dx|)`` element-wise."""
        y, ladj = self.spline_forward(x)
        return (y if self.shift is None else y + self.shift), ladj

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Maps ``y`` to ``x = RQS^-1(y - shift)``; returns ``(x, log|dx/dy|)`` element-wise."""
        return self.spline_inverse(y if self.shift is None else y - self.shift)

    def inverse_deviation_bound(self) -> float:
        """Bound on ``|inverse(y) - (y - shift)|`` over all ``y``: the box width (in units of the data)."""
        return max(self.right - self.left, self.top - self.bottom)


def affine_inverse_slope_bound(eps: float, reparam: bool = False) -> float:
    """Largest element-wise inverse slope of one affine sub-transform: ``1/eps`` (reparam: ``1 + eps``)."""
    return (1.0 + eps) if reparam else 1.0 / eps


LOG_2PI = math.log(2 * math.pi)


def gaussian_log_density(x: Tensor, mean: Tensor | None = None, logs: Tensor | None = None) -> Tensor:
    """Element-wise log N(x; mean, exp(logs)^2) (Glow's ``GaussianDiag.likelihood``); None means 0."""
    if mean is None:
        return -0.5 * (x.pow(2) + LOG_2PI)
    return -0.5 * (2 * logs + (x - mean).pow(2) * torch.exp(-2 * logs) + LOG_2PI)
