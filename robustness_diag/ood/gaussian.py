r"""Streaming Gaussian statistics in float64, shrinkage from accumulated moments, and the Cholesky whitening factor.

:class:`GaussianAccumulator` keeps, for ``D``-dimensional vectors ``x_k`` with running mean ``m``:

* ``n`` (count), ``mean`` ``[D]``,
* ``m2 = sum_k (x_k - m)(x_k - m)^T`` ``[D, D]`` (the scatter; covariance = m2 / n),
* ``t3 = sum_k |x_k - m|^2 (x_k - m)`` ``[D]`` and ``q4 = sum_k |x_k - m|^4`` (scalar): the two extra moments that
  make Ledoit-Wolf's shrinkage computable without the data.

Batches and shards combine by Chan et al.'s parallel update (each part is shifted to the common mean in closed form),
so any split of the data gives the one-shot float64 estimate up to rounding. Everything is float64 whatever the input.

Shrinkage (all towards ``mu I`` with ``mu = tr(S) / D``, ``S = m2 / n`` the biased empirical covariance, exactly as
scikit-learn's ``OAS`` and ``LedoitWolf`` with ``assume_centered=False``):

* ``"oas"``: Chen et al. 2010, sklearn's formula; ``"ledoit_wolf"``: Ledoit & Wolf 2004, sklearn's formula;
* ``"ridge"``: ``S + lambda * tr(S) / D * I`` (relative to the scale, never an absolute epsilon);
* ``"none"``: ``S``.

The whitening factor is ``W = L^{-1}`` with ``L L^T = Sigma`` (Cholesky, float64), obtained by a triangular solve; a
squared Mahalanobis distance is then ``|W (x - mu)|^2``, which is never negative. When the covariance is singular or
its condition number exceeds ``max_condition`` even after shrinkage, the eigenvalues are floored at
``lambda_max / max_condition`` and the report says so; nothing raises.

References:
    Chan, Golub & LeVeque, "Updating formulae and a pairwise algorithm for computing sample variances", 1979.
    Ledoit & Wolf, "A well-conditioned estimator for large-dimensional covariance matrices", 2004.
    Chen, Wiesel, Eldar & Hero, "Shrinkage algorithms for MMSE covariance estimation", 2010 (arXiv:0907.4698).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import NotFittedError

SHRINKAGE_METHODS = ("oas", "ledoit_wolf", "ridge", "none")
F64 = torch.float64


class GaussianAccumulator:
    """Streaming float64 moments of ``D``-dimensional vectors (see the module docstring).

    Arguments:
        dim: ``D``.
        device: where the accumulators live (the device the features are on avoids transfers).
        chunk: rows converted to float64 at a time in :meth:`update` (bounds the temporary memory).

    Example:
        >>> acc = GaussianAccumulator(3)
        >>> for part in torch.randn(1000, 3, dtype=torch.float64).split(64):
        ...     _ = acc.update(part)
        >>> acc.n, acc.covariance().shape
        (1000, torch.Size([3, 3]))
    """

    def __init__(self, dim: int, device=None, chunk: int = 16384):
        self.dim = int(dim)
        self.chunk = int(chunk)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.n = 0
        self.mean = torch.zeros(self.dim, dtype=F64, device=dev)
        self.m2 = torch.zeros(self.dim, self.dim, dtype=F64, device=dev)
        self.t3 = torch.zeros(self.dim, dtype=F64, device=dev)
        self.q4 = torch.zeros((), dtype=F64, device=dev)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> "GaussianAccumulator":
        """Adds the rows of ``x`` ``[N, D]`` (any float dtype, any device: moved to the accumulator's)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected [N, {self.dim}] vectors, got {tuple(x.shape)}")
        for part in x.split(self.chunk):
            a = part.to(device=self.device, dtype=F64)
            nb = a.shape[0]
            if nb == 0:
                continue
            mb = a.mean(0)
            a = a - mb
            q = (a * a).sum(1)                      # |x_k - m_b|^2
            self.merge_moments(nb, mb, a.T @ a, q @ a, (q * q).sum())
        return self

    def merge(self, other: "GaussianAccumulator") -> "GaussianAccumulator":
        """Adds another accumulator's data (shards computed anywhere); ``other`` is left unchanged."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge accumulators of dimension {self.dim} and {other.dim}")
        if other.n:
            self._merge(other.n, other.mean.to(self.device), other.m2.to(self.device), other.t3.to(self.device),
                        other.q4.to(self.device))
        return self

    def merge_moments(self, n: int, mean, m2, t3, q4) -> None:
        """Adds a part given by its moments: ``n`` vectors, their mean ``mean`` ``[D]`` and, about it, the scatter
        ``m2`` ``[D, D]``, ``t3`` ``[D]`` and ``q4`` (scalar), as in the module docstring; float64 tensors on the
        accumulator's device. The one Chan update behind :meth:`update` (per chunk) and :meth:`merge`, so parts
        computed elsewhere and merged in the same order give bitwise the same moments."""
        self._merge(n, mean, m2, t3, q4)

    @staticmethod
    def _shift(n, m2, t3, q4, v):
        """Moments about a point shifted by ``v`` (= old centre - new centre) for a part centred on its own mean."""
        c = v @ v
        q2 = torch.diagonal(m2).sum()
        m2v = m2 @ v
        m2s = m2 + n * torch.outer(v, v)
        t3s = t3 + q2 * v + 2 * m2v + n * c * v
        q4s = q4 + 4 * (v @ m2v) + n * c * c + 4 * (v @ t3) + 2 * c * q2
        return m2s, t3s, q4s

    def _merge(self, nb: int, mb, m2b, t3b, q4b) -> None:
        na = self.n
        if na == 0:
            self.n, self.mean, self.m2, self.t3, self.q4 = int(nb), mb.clone(), m2b.clone(), t3b.clone(), q4b.clone()
            return
        n = na + nb
        delta = mb - self.mean
        mean = self.mean + delta * (nb / n)
        ma, ta, qa = self._shift(na, self.m2, self.t3, self.q4, self.mean - mean)
        mb2, tb, qb = self._shift(nb, m2b, t3b, q4b, mb - mean)
        self.n, self.mean = n, mean
        self.m2 = ma + mb2
        self.t3, self.q4 = ta + tb, qa + qb

    def snapshot(self) -> tuple:
        """The current moments, to :meth:`restore` after a refused input. The update never modifies the moment
        tensors in place (each merge makes new ones), so this holds references, not copies."""
        return (self.n, self.mean, self.m2, self.t3, self.q4)

    def restore(self, snap: tuple) -> None:
        """Back to the moments of a :meth:`snapshot` (drops everything added since)."""
        self.n, self.mean, self.m2, self.t3, self.q4 = snap

    def nonfinite_moments(self) -> dict[str, int]:
        """``{moment: number of NaN/Inf values}`` of the non-finite moments (``mean``, ``m2``, ``t3``, ``q4``); empty
        when all are finite."""
        counts = {k: int((~torch.isfinite(getattr(self, k))).sum()) for k in ("mean", "m2", "t3", "q4")}
        return {k: v for k, v in counts.items() if v}

    def covariance(self) -> torch.Tensor:
        """Biased empirical covariance ``S = m2 / n`` ``[D, D]`` float64 (scikit-learn's ``empirical_covariance``)."""
        if self.n < 1:
            raise NotFittedError("no vectors accumulated yet")
        s = self.m2 / self.n
        return 0.5 * (s + s.T)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that :meth:`from_state` restores exactly (for saving shards)."""
        return {"n": torch.tensor([self.n], dtype=torch.int64), "mean": self.mean, "m2": self.m2, "t3": self.t3,
                "q4": self.q4.reshape(1)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device=None) -> "GaussianAccumulator":
        mean = state["mean"]
        acc = cls(mean.shape[0], device=device or mean.device)
        acc.n = int(state["n"].reshape(-1)[0])
        acc.mean = mean.to(acc.device, F64).clone()
        acc.m2 = state["m2"].to(acc.device, F64).clone()
        acc.t3 = state["t3"].to(acc.device, F64).clone()
        acc.q4 = state["q4"].to(acc.device, F64).reshape(())
        return acc


# ---------------------------------------------------------------------------------------------------------------------
# shrinkage from moments
# ---------------------------------------------------------------------------------------------------------------------

def oas_shrinkage(s: torch.Tensor, n: int) -> float:
    """OAS coefficient from the biased covariance ``s`` ``[D, D]`` of ``n`` samples (scikit-learn's formula)."""
    d = s.shape[0]
    if d == 1:
        return 0.0
    alpha = (s * s).mean()
    mu = torch.diagonal(s).sum() / d
    num = alpha + mu * mu
    den = (n + 1) * (alpha - mu * mu / d)
    return 1.0 if float(den) == 0.0 else min(float(num / den), 1.0)


def ledoit_wolf_shrinkage(s: torch.Tensor, n: int, q4: torch.Tensor) -> float:
    """Ledoit-Wolf coefficient from the biased covariance ``s`` ``[D, D]``, ``n`` and ``q4 = sum |x - mean|^4``.

    Same quantities as scikit-learn's ``ledoit_wolf_shrinkage``: ``beta_ = sum_k |x_k|^4`` (``q4``) and
    ``delta_ = |S|_F^2``.
    """
    d = s.shape[0]
    if d == 1:
        return 0.0
    tr = torch.diagonal(s).sum()
    mu = tr / d
    delta_ = (s * s).sum()
    beta = (float(q4) / n - float(delta_)) / (d * n)
    delta = (float(delta_) - 2.0 * float(mu) * float(tr) + d * float(mu) ** 2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else beta / delta


def shrunk_covariance(acc: GaussianAccumulator, method: str = "oas", ridge: float = 1e-3) -> tuple[torch.Tensor, float]:
    """Returns ``(Sigma [D, D] float64, coefficient)`` for ``method`` in :data:`SHRINKAGE_METHODS`.

    ``ridge`` is the relative ridge ``lambda`` of the ``"ridge"`` method (ignored otherwise).
    """
    method = normalise_method(method)
    if acc.n < 2:
        raise NotFittedError(f"need at least 2 feature vectors to estimate a covariance, got {acc.n}")
    s = acc.covariance()
    d = s.shape[0]
    mu = torch.diagonal(s).sum() / d
    eye = torch.eye(d, dtype=F64, device=s.device)
    if method == "none":
        return s, 0.0
    if method == "ridge":
        return s + float(ridge) * mu * eye, float(ridge)
    coef = oas_shrinkage(s, acc.n) if method == "oas" else ledoit_wolf_shrinkage(s, acc.n, acc.q4)
    return (1.0 - coef) * s + coef * mu * eye, coef


def normalise_method(method: str) -> str:
    m = str(method).lower().replace("-", "_")
    m = {"lw": "ledoit_wolf", "ledoitwolf": "ledoit_wolf"}.get(m, m)
    if m not in SHRINKAGE_METHODS:
        raise ValueError(f"unknown shrinkage {method!r}; choose one of {', '.join(SHRINKAGE_METHODS)}")
    return m


# ---------------------------------------------------------------------------------------------------------------------
# whitening
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class WhiteningReport:
    """What the whitening step found and did (all plain numbers, JSON-ready)."""

    condition_number: float            # of the covariance actually used (after shrinkage and any floor)
    condition_number_before_floor: float
    min_eigenvalue: float
    max_eigenvalue: float
    eigen_floor_applied: bool
    n_eigenvalues_floored: int
    degenerate: bool = False            # all vectors identical: identity covariance used
    notes: list = field(default_factory=list)


def whitening_factor(cov: torch.Tensor, max_condition: float = 1e10) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor, WhiteningReport]:
    """Cholesky factor and whitening matrix of ``cov`` ``[D, D]`` (float64), with a reported eigenvalue floor.

    Returns:
        ``(cov_used, L, W, report)``: ``L`` lower-triangular with ``L L^T = cov_used``, ``W = L^{-1}`` (triangular
        solve, never a general inverse), so ``|W (x - mu)|`` is the Mahalanobis distance. ``cov_used`` equals ``cov``
        unless it was singular or its condition number exceeded ``max_condition``: then eigenvalues below
        ``lambda_max / max_condition`` are raised to it (``report.eigen_floor_applied``).
    """
    cov = 0.5 * (cov + cov.T).to(F64)
    d = cov.shape[0]
    eye = torch.eye(d, dtype=F64, device=cov.device)
    evals, evecs = torch.linalg.eigh(cov)
    lo, hi = float(evals[0]), float(evals[-1])
    notes = []
    degenerate = not hi > 0.0
    cond_before = float("inf") if lo <= 0 else hi / lo
    if degenerate:
        notes.append("covariance is zero (all training vectors identical): identity covariance used")
        cov_used = eye.clone()
        floored, n_floor = True, d
    else:
        floor = hi / float(max_condition)
        n_floor = int((evals < floor).sum())
        floored = n_floor > 0
        cov_used = cov
        if floored:
            ev = evals.clamp(min=floor)
            cov_used = (evecs * ev) @ evecs.T
            cov_used = 0.5 * (cov_used + cov_used.T)
            notes.append(f"{n_floor} eigenvalue(s) below lambda_max/{max_condition:g} raised to it "
                         f"(condition number was {cond_before:.3g})")
    chol, info = torch.linalg.cholesky_ex(cov_used)
    if int(info) != 0:  # rounding made a floored matrix indefinite: floor again in the eigenbasis, slightly higher
        ev, vec = torch.linalg.eigh(cov_used)
        floor = max(float(ev[-1]), 1e-300) / float(max_condition) * 1.01
        cov_used = (vec * ev.clamp(min=floor)) @ vec.T
        cov_used = 0.5 * (cov_used + cov_used.T)
        chol = torch.linalg.cholesky(cov_used)
        floored = True
        n_floor = max(n_floor, int((ev < floor).sum()))
        notes.append("Cholesky failed once; eigenvalue floor re-applied")
    w = torch.linalg.solve_triangular(chol, eye, upper=False)
    ev_used = torch.linalg.eigvalsh(cov_used)
    report = WhiteningReport(condition_number=float(ev_used[-1] / ev_used[0]),
                             condition_number_before_floor=cond_before, min_eigenvalue=lo, max_eigenvalue=hi,
                             eigen_floor_applied=bool(floored), n_eigenvalues_floored=int(n_floor),
                             degenerate=degenerate, notes=notes)
    return cov_used, chol, w, report
