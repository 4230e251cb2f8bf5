r"""The Mahalanobis scorer: fitted per-level Gaussians as buffers, distance kernels, and the ``.safetensors`` format.

OOD score convention (ARCHITECTURE.md): the per-position score is the Mahalanobis distance (**not squared**) of the
conditioner feature vector at that position from the in-distribution Gaussian; higher = more out of distribution.

Kernel: ``d(x) = |W (x - mu)|_2`` with the precomputed whitening matrix ``W = L^{-1}`` (``L`` the float64 Cholesky
factor of the shrunk covariance; lower triangular); rows are processed in cache-sized chunks as one subtraction and a
few matrix products over the non-zero row blocks of ``W`` (10/16 of the dense multiply-adds) with squared-row-sums.
``W`` and ``mu`` are kept in float64 and cast once per (device, dtype) to the compute dtype (float32 by default;
float64 for reference-exact scores).

File format (``.safetensors``): per level ``<level>.mean`` ``[D]``, ``.cov``/``.chol``/``.whiten`` ``[D, D]``,
``.channels`` ``[D]`` (indices into the level's feature channels), and the raw moments ``.n``, ``.m2``, ``.t3``,
``.q4`` (so shards can be merged and refitted with another shrinkage later); metadata: ``format``,
``format_version``, ``package_version``, ``checkpoint_digest``, ``levels``, ``channels``, ``pixel_count``,
``shrinkage`` and the full JSON ``meta``. The format lives with the scorer (a little over the project's usual 400
lines) because the file is exactly the scorer's buffers: one place decides both.

Format versions: 2 adds ``meta["threshold_calibration"]`` (the per-level threshold calibrated on in-distribution
images held out of the fit, with its quantile, image and position counts, border margin and method, or the reason
there is none; :class:`robustness_diag.ood.features.ThresholdCalibrator`). Version 1 files (no calibration) still
load; their threshold is the chi quantile, which :meth:`MahalanobisScorer.threshold_info` says.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .errors import NonFiniteStatisticsError, NotFittedError, StatsFileError, StatsMismatchError
from .gaussian import GaussianAccumulator, normalise_method, shrunk_covariance, whitening_factor

FORMAT = "robustness-diag.ood-stats"
FORMAT_VERSION = 2
#: Quantile of the per-position threshold: calibrated at fit time as the empirical quantile of held-out
#: in-distribution distances; without a calibration (version 1 files, ``calibration_fraction=0``) the quantile of the
#: chi distribution with D degrees of freedom (the distance of a D-dimensional standard Gaussian, which real features
#: are not: on the bundled flows about 10% of clean positions exceed its 0.99 quantile). Overridable when scoring.
DEFAULT_THRESHOLD_QUANTILE = 0.99
_TENSORS = ("mean", "cov", "chol", "whiten", "channels", "n", "m2", "t3", "q4")
#: the tensors that must be finite (a NaN/Inf in any of them makes every distance NaN or meaningless)
_FLOAT_TENSORS = ("mean", "cov", "chol", "whiten", "m2", "t3", "q4")
#: what non-finite statistics usually come from (said when a fit or a file is refused)
NONFINITE_CAUSE = ("likely cause: non-finite conditioner features, e.g. from NaN/Inf weights in the checkpoint, a "
                   "non-finite input, or values beyond the float64 range")


def _nonfinite_counts(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """``{name: (non-finite values, values)}`` of the tensors holding NaN/Inf."""
    out = {}
    for k, v in tensors.items():
        n = int((~torch.isfinite(v)).sum()) if v.is_floating_point() else 0
        if n:
            out[k] = (n, v.numel())
    return out


def chi_quantile(q: float, dof: int) -> float:
    """``q``-quantile of the chi distribution with ``dof`` degrees of freedom (sqrt of the chi-square quantile)."""
    from scipy.stats import chi2
    return float(math.sqrt(chi2.ppf(q, dof)))


def triangular_blocks(whiten: torch.Tensor, n_blocks: Optional[int] = None) -> list[tuple[int, int, torch.Tensor]]:
    """Row blocks ``(start, end, W[start:end, :end])`` of a lower-triangular ``whiten`` ``[D, D]``.

    ``W`` is lower triangular, so row block ``[s, e)`` only touches the first ``e`` input channels: with 4 blocks the
    kernel does 10/16 of a dense product's multiply-adds. Default: one block per 80 channels, at most 4.
    """
    d = whiten.shape[0]
    nb = n_blocks if n_blocks is not None else max(1, min(4, d // 80))
    edges = [round(d * i / nb) for i in range(nb + 1)]
    return [(a, b, whiten[a:b, :b].contiguous()) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _rows_kernel(x, mean, blocks, chunk):
    n = x.shape[0]
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    wts = [(b, w.T) for _, b, w in blocks]
    for i in range(0, n, chunk):
        dx = torch.sub(x[i:i + chunk], mean)                 # [c, D]
        acc = None
        for b, wt in wts:
            z = dx[:, :b] @ wt                               # [c, rows of the block]
            acc = (z * z).sum(1) if acc is None else acc.add_((z * z).sum(1))
        torch.sqrt(acc, out=out[i:i + chunk])
    return out


def _cf_kernel(f, mean, blocks, chunk):
    b_, d, p = f.shape
    out = torch.empty(b_, p, dtype=f.dtype, device=f.device)
    mu = mean[:, None]
    for i in range(b_):
        for j in range(0, p, chunk):
            dx = torch.sub(f[i, :, j:j + chunk], mu)         # [D, c]
            acc = None
            for _, b, w in blocks:
                z = w @ dx[:b]                               # [rows of the block, c]
                acc = (z * z).sum(0) if acc is None else acc.add_((z * z).sum(0))
            torch.sqrt(acc, out=out[i, j:j + chunk])
    return out


def mahalanobis_distance(x: torch.Tensor, mean: torch.Tensor, whiten: torch.Tensor, chunk: int = 2048,
                         blocks: Optional[list] = None) -> torch.Tensor:
    """Distances ``|W (x_i - mean)|`` of the rows of ``x`` ``[N, D]``; returns ``[N]`` in ``x``'s dtype.

    ``mean`` ``[D]`` and ``whiten`` ``[D, D]`` (lower triangular, e.g. ``L^{-1}``) must have ``x``'s dtype and
    device. Rows go in chunks of ``chunk`` so that the temporaries stay in cache, and the zero upper triangle of
    ``W`` is skipped block-wise (:func:`triangular_blocks`, pass them precomputed to save the slicing); no ``N x N``
    product and no Python loop over positions.
    """
    return _rows_kernel(x, mean, blocks if blocks is not None else triangular_blocks(whiten), chunk)


def mahalanobis_distance_cf(f: torch.Tensor, mean: torch.Tensor, whiten: torch.Tensor, chunk: int = 2048,
                            blocks: Optional[list] = None) -> torch.Tensor:
    """Channel-first variant: ``f`` ``[B, D, P]`` (P positions) -> ``[B, P]`` distances, without a transpose copy."""
    return _cf_kernel(f, mean, blocks if blocks is not None else triangular_blocks(whiten), chunk)


class LevelStats(nn.Module):
    """Fitted Gaussian of one feature level; all statistics are float64 buffers.

    Buffers: ``mean`` ``[D]``, ``cov`` ``[D, D]`` (the covariance used, after shrinkage/floor), ``chol`` ``[D, D]``
    (lower Cholesky factor), ``whiten`` ``[D, D]`` (``chol^{-1}``), ``channels`` ``[D]`` int64 (selected channel
    indices of the level's ``C`` feature channels), and the moments ``n`` ``[1]``, ``m2`` ``[D, D]``, ``t3`` ``[D]``,
    ``q4`` ``[1]``.
    """

    def __init__(self, dim: int, n_channels_total: Optional[int] = None):
        super().__init__()
        f64 = torch.float64
        self.register_buffer("mean", torch.zeros(dim, dtype=f64))
        self.register_buffer("cov", torch.eye(dim, dtype=f64))
        self.register_buffer("chol", torch.eye(dim, dtype=f64))
        self.register_buffer("whiten", torch.eye(dim, dtype=f64))
        self.register_buffer("channels", torch.arange(dim, dtype=torch.int64))
        self.register_buffer("n", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("m2", torch.zeros(dim, dim, dtype=f64))
        self.register_buffer("t3", torch.zeros(dim, dtype=f64))
        self.register_buffer("q4", torch.zeros(1, dtype=f64))
        self.n_channels_total = int(n_channels_total if n_channels_total is not None else dim)
        self._cache: dict = {}

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def all_channels(self) -> bool:
        return self.dim == self.n_channels_total and bool(
            torch.equal(self.channels.cpu(), torch.arange(self.dim, dtype=torch.int64)))

    def _params(self, dtype: torch.dtype, device: torch.device):
        key = (dtype, device, self.mean.data_ptr(), self.whiten.data_ptr())
        if key not in self._cache:
            self._cache.clear()
            w = self.whiten.to(device=device, dtype=dtype)
            self._cache[key] = (self.mean.to(device=device, dtype=dtype), w, triangular_blocks(w))
        return self._cache[key]

    def select(self, feat: torch.Tensor) -> torch.Tensor:
        """Selected channels of ``feat`` ``[B, C, ...]`` (``C`` = all channels of the level) -> ``[B, D, ...]``."""
        if feat.shape[1] != self.n_channels_total:
            raise StatsMismatchError(f"features have {feat.shape[1]} channels; the statistics were fitted on a level "
                                     f"with {self.n_channels_total}")
        if self.all_channels:
            return feat
        return feat.index_select(1, self.channels.to(feat.device))

    def distance(self, x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Distances of already-selected vectors ``x`` ``[N, D]`` -> ``[N]`` (computed in ``dtype``, default x's)."""
        dtype = dtype or x.dtype
        mean, w, blocks = self._params(dtype, x.device)
        return mahalanobis_distance(x.to(dtype), mean, w, blocks=blocks)

    def distance_map(self, feat: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Per-position distances of level features ``feat`` ``[B, C, H, W]`` (all C channels) -> ``[B, H, W]``."""
        f = self.select(feat)
        b, d, h, w = f.shape
        dtype = dtype or f.dtype
        mean, wh, blocks = self._params(dtype, f.device)
        return mahalanobis_distance_cf(f.reshape(b, d, h * w).to(dtype), mean, wh, blocks=blocks).reshape(b, h, w)

    def accumulator(self) -> GaussianAccumulator:
        """The raw moments as a :class:`GaussianAccumulator` (to merge with other shards)."""
        return GaussianAccumulator.from_state({"n": self.n, "mean": self.mean, "m2": self.m2, "t3": self.t3,
                                               "q4": self.q4})


class MahalanobisScorer(nn.Module):
    """Per-level Gaussian statistics of conditioner features and the per-position Mahalanobis distance.

    Build with :meth:`from_accumulators` (after streaming features into :class:`GaussianAccumulator`s, see
    :func:`robustness_diag.ood.fit_flow`) or :meth:`load`. Statistics are float64 buffers of :class:`LevelStats`
    submodules (``scorer.levels[name]``), so ``.to(device)`` and ``state_dict`` work; do not call ``.float()`` on it
    (that would round the stored statistics): choose the compute dtype with ``compute_dtype``.

    Arguments:
        levels: level name -> :class:`LevelStats`.
        meta: JSON-serialisable provenance (checkpoint digest, pixel counts, shrinkage, thresholds, ...).
        compute_dtype: dtype of the distance computation (float32 default; float64 for reference-exact results).

    Example:
        >>> acc = GaussianAccumulator(4); _ = acc.update(torch.randn(500, 4))
        >>> scorer = MahalanobisScorer.from_accumulators({"fea_up1": acc}, shrinkage="oas")
        >>> scorer({"fea_up1": torch.randn(2, 4, 8, 8)})["fea_up1"].shape
        torch.Size([2, 8, 8])
    """

    def __init__(self, levels: Mapping[str, LevelStats], meta: Optional[dict] = None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        clash = [k for k in levels if hasattr(nn.Module, k) or not str(k).isidentifier()]
        if clash:
            raise ValueError(f"feature level name(s) {clash} cannot key the scorer's statistics: a level name must be "
                             "an identifier that is not an nn.Module attribute (e.g. 'fea_up1', not 'half')")
        self.levels = nn.ModuleDict(dict(levels))
        self.meta: dict = dict(meta or {})
        self.compute_dtype = compute_dtype

    # -- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_accumulators(cls, accs: Mapping[str, GaussianAccumulator], *, shrinkage: str = "oas",
                          ridge: float = 1e-3, max_condition: float = 1e10, channels: Optional[Sequence[int]] = None,
                          n_channels_total: Optional[Mapping[str, int]] = None, meta: Optional[dict] = None,
                          threshold_quantile: float = DEFAULT_THRESHOLD_QUANTILE) -> "MahalanobisScorer":
        """Shrinks, factors and stores the statistics of each level's accumulator.

        Arguments:
            accs: level name -> accumulator of that level's (selected-channel) feature vectors.
            shrinkage: ``"oas"``, ``"ledoit_wolf"``, ``"ridge"`` (with ``ridge`` relative to ``tr(S)/D``) or
                ``"none"``; singular covariances are then floored at ``lambda_max / max_condition`` and reported.
            channels: the selected channel indices (same for every level; None = all).
            n_channels_total: level -> number of feature channels before selection (default: the accumulator's D).
            meta: extra provenance merged into :attr:`meta`.
        """
        method = normalise_method(shrinkage)
        levels, report, thresholds, pixels = {}, {}, {}, {}
        for name, acc in accs.items():
            if acc.n < 2:
                raise NotFittedError(f"level {name}: need at least 2 feature vectors, got {acc.n}")
            bad = _nonfinite_counts({k: getattr(acc, k) for k in ("mean", "m2", "t3", "q4")})
            if bad:
                raise NonFiniteStatisticsError(
                    f"level {name}: statistics refused: the moments of {acc.n} feature vectors are not finite ("
                    + ", ".join(f"{k}: {a} of {b} values NaN/Inf" for k, (a, b) in bad.items())
                    + f"); {NONFINITE_CAUSE}")
            total = (n_channels_total or {}).get(name, acc.dim)
            st = LevelStats(acc.dim, total)
            cov, coef = shrunk_covariance(acc, method, ridge)
            bad = _nonfinite_counts({"covariance": cov})
            if not bad:
                cov_used, chol, w, wr = whitening_factor(cov, max_condition)
                bad = _nonfinite_counts({"covariance": cov_used, "Cholesky factor": chol, "whitening factor": w})
            if bad:
                raise NonFiniteStatisticsError(
                    f"level {name}: statistics refused: the " + ", ".join(
                        f"{k} holds {a} of {b} values NaN/Inf" for k, (a, b) in bad.items())
                    + " although the moments are finite (feature values beyond the float64 range?)")
            s = acc.covariance()
            diag = torch.diagonal(s)
            tiny = diag <= 1e-12 * max(float(diag.mean()), 1e-300)
            with torch.no_grad():
                st.mean.copy_(acc.mean.cpu())
                st.cov.copy_(cov_used.cpu())
                st.chol.copy_(chol.cpu())
                st.whiten.copy_(w.cpu())
                if channels is not None:
                    st.channels.copy_(torch.as_tensor(list(channels), dtype=torch.int64))
                st.n.fill_(acc.n)
                st.m2.copy_(acc.m2.cpu())
                st.t3.copy_(acc.t3.cpu())
                st.q4.copy_(acc.q4.reshape(1).cpu())
            levels[name] = st
            wc = w.cpu()
            report[name] = {
                "shrinkage": method, "shrinkage_coefficient": float(coef),
                "ridge": float(ridge) if method == "ridge" else None,
                "pixel_count": int(acc.n), "dim": acc.dim,
                "zero_variance_channels": int(tiny.sum()),
                # in-sample mean squared distance tr(W S W^T): D without shrinkage, a little less with it
                "train_mean_sq_distance": float(((wc @ s.cpu()) * wc).sum()),
                "condition_number": wr.condition_number,
                "condition_number_before_floor": wr.condition_number_before_floor,
                "min_eigenvalue": wr.min_eigenvalue, "max_eigenvalue": wr.max_eigenvalue,
                "eigen_floor_applied": wr.eigen_floor_applied, "n_eigenvalues_floored": wr.n_eigenvalues_floored,
                "max_condition": float(max_condition), "degenerate": wr.degenerate, "notes": list(wr.notes),
            }
            if wr.eigen_floor_applied or report[name]["zero_variance_channels"]:
                report[name]["notes"].append(
                    f"near-singular covariance handled: {report[name]['zero_variance_channels']} zero-variance "
                    f"channel(s), condition number {wr.condition_number_before_floor:.3g} before the floor")
            thresholds[name] = chi_quantile(threshold_quantile, acc.dim)
            pixels[name] = int(acc.n)
        from robustness_diag import __version__
        m = {"format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__,
             "levels": list(accs), "channels": list(map(int, channels)) if channels is not None else None,
             "n_channels_total": {k: v.n_channels_total for k, v in levels.items()},
             "pixel_count": pixels, "shrinkage": method, "ridge": float(ridge) if method == "ridge" else None,
             "max_condition": float(max_condition), "fit_report": report, "thresholds": thresholds,
             "threshold_source": f"chi quantile {threshold_quantile} with D degrees of freedom"}
        m.update(meta or {})
        return cls(levels, m)

    # -- properties ------------------------------------------------------------------------------------------------
    @property
    def level_names(self) -> list[str]:
        return list(self.levels.keys())

    @property
    def primary_level(self) -> str:
        return self.level_names[0]

    @property
    def checkpoint_digest(self) -> Optional[str]:
        return self.meta.get("checkpoint_digest")

    @property
    def fit_report(self) -> dict:
        return self.meta.get("fit_report", {})

    def threshold(self, level: Optional[str] = None) -> float:
        """Default per-position threshold of ``level``: the calibrated one when the statistics hold it, else the chi
        quantile (:data:`DEFAULT_THRESHOLD_QUANTILE`; :meth:`threshold_info` says which)."""
        return self.threshold_info(level)["value"]

    def threshold_info(self, level: Optional[str] = None) -> dict:
        """``{"value", "calibrated", "source", "border_margin"}`` of :meth:`threshold`: ``source`` says how it was
        obtained (the calibration's method, or why it is the chi quantile); ``border_margin`` is the margin the
        calibration left out (None when not calibrated)."""
        level = level or self.primary_level
        cal = self.meta.get("threshold_calibration") or {}
        lv = (cal.get("levels") or {}).get(level)
        if lv is not None:
            return {"value": float(lv["threshold"]), "calibrated": True, "border_margin": lv.get("border_margin"),
                    "source": f"calibrated: {lv.get('method')} ({lv.get('n_positions')} positions)"}
        if cal:
            why = cal.get("reason") or "not calibrated"
        else:
            why = (f"statistics format version {self.meta.get('format_version', '?')} holds no calibration"
                   if self.meta.get("merged_from") is None else "merged statistics hold no calibration")
        dim = self.levels[level].dim
        t = self.meta.get("thresholds", {}).get(level)
        return {"value": float(t) if t is not None else chi_quantile(DEFAULT_THRESHOLD_QUANTILE, dim),
                "calibrated": False, "border_margin": None,
                "source": f"chi quantile {DEFAULT_THRESHOLD_QUANTILE} with {dim} degrees of freedom ({why}; refit "
                          f"with 'robustness-diag fit' to calibrate it)"}

    # -- scoring ---------------------------------------------------------------------------------------------------
    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Distance maps: ``{level: [B, C, H, W]}`` (all channels of the level) -> ``{level: [B, H, W]}`` for every
        fitted level present in ``features``."""
        return {k: self.levels[k].distance_map(v, self.compute_dtype) for k, v in features.items() if k in self.levels}

    def distance(self, x: torch.Tensor, level: Optional[str] = None) -> torch.Tensor:
        """Distances of vectors ``x`` ``[N, D]`` (already channel-selected) -> ``[N]`` in the compute dtype."""
        return self.levels[level or self.primary_level].distance(x, self.compute_dtype)

    def check_digest(self, digest: str, what: str = "the flow") -> None:
        """Raises :class:`StatsMismatchError` if the statistics were fitted on another checkpoint than ``digest``."""
        mine = self.checkpoint_digest
        if mine is not None and digest is not None and mine != digest:
            src = self.meta.get("source", "these statistics")
            raise StatsMismatchError(
                f"{src} were fitted on checkpoint {mine[:12]}... ({self.meta.get('checkpoint', '?')}), not on "
                f"{what} (weights digest {digest[:12]}...); fit statistics for this checkpoint with "
                f"'robustness-diag fit'")

    # -- I/O -------------------------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Writes the statistics and metadata to ``path`` (``.safetensors``) atomically."""
        from safetensors.torch import save_file

        from ..io import atomic_write, json_text
        path = Path(path)
        tensors = {}
        for name, st in self.levels.items():
            for t in _TENSORS:
                tensors[f"{name}.{t}"] = getattr(st, t).detach().cpu().contiguous()
        m = self.meta
        header = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                  "package_version": str(m.get("package_version", "")),
                  "checkpoint_digest": str(m.get("checkpoint_digest", "")),
                  "levels": json_text(self.level_names, indent=None),
                  "channels": json_text(m.get("channels"), indent=None),
                  "pixel_count": json_text(m.get("pixel_count", {}), indent=None),
                  "shrinkage": str(m.get("shrinkage", "")), "meta": json_text(m, indent=None)}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))

    @classmethod
    def load(cls, path, map_location="cpu") -> "MahalanobisScorer":
        """Reads a statistics file written by :meth:`save`.

        Raises:
            StatsFileError: naming the file and the reason (missing, not safetensors, not a statistics file,
                newer format, missing tensors).
        """
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise StatsFileError(path, "no such statistics file")
        if path.stat().st_size == 0:
            raise StatsFileError(path, "empty file (0 bytes)")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                header = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise StatsFileError(path, f"not a readable .safetensors file ({type(e).__name__}: {e})") from None
        if header.get("format") != FORMAT:
            raise StatsFileError(path, f"not a robustness-diag statistics file (metadata format is "
                                       f"{header.get('format')!r}, expected {FORMAT!r})")
        try:
            version = int(header.get("format_version", "0"))
        except ValueError:
            version = -1
        if version < 1 or version > FORMAT_VERSION:          # 1 (no calibration) and 2 are read
            raise StatsFileError(path, f"statistics format version {header.get('format_version')!r} is not supported "
                                       f"by this robustness-diag (reads versions 1 to {FORMAT_VERSION})")
        try:
            meta = json.loads(header["meta"])
            names = json.loads(header["levels"])
        except (KeyError, ValueError) as e:
            raise StatsFileError(path, f"corrupt metadata ({e})") from None
        levels = {}
        for name in names:
            missing = [t for t in _TENSORS if f"{name}.{t}" not in tensors]
            if missing:
                raise StatsFileError(path, f"level {name}: missing tensors {', '.join(missing)}")
            total = meta.get("n_channels_total", {}).get(name)
            st = LevelStats(tensors[f"{name}.mean"].shape[0], total)
            try:
                st.load_state_dict({t: tensors[f"{name}.{t}"] for t in _TENSORS})
            except RuntimeError as e:
                raise StatsFileError(path, f"level {name}: inconsistent tensor shapes ({e})") from None
            bad = _nonfinite_counts({t: getattr(st, t) for t in _FLOAT_TENSORS})
            if bad:
                raise StatsFileError(path, f"level {name}: non-finite statistics refused: " + "; ".join(
                    f"tensor '{name}.{t}' holds {a} NaN/Inf value(s) of {b}" for t, (a, b) in bad.items())
                    + f" ({NONFINITE_CAUSE}; refit them with 'robustness-diag fit')")
            levels[name] = st
        bad_thr = {k: v for k, v in (meta.get("thresholds") or {}).items()
                   if not isinstance(v, (int, float)) or not math.isfinite(v)}
        if bad_thr:
            raise StatsFileError(path, f"non-finite default threshold(s) in the metadata: {bad_thr}")
        meta["source"] = str(path)
        return cls(levels, meta).to(map_location)

    @classmethod
    def merge(cls, scorers: Sequence["MahalanobisScorer"], *, shrinkage: Optional[str] = None,
              ridge: Optional[float] = None, max_condition: Optional[float] = None) -> "MahalanobisScorer":
        """Combines statistics fitted on disjoint shards (same checkpoint, levels and channels) into one fit,
        exactly as if all images had been streamed together, then re-applies the shrinkage."""
        if not scorers:
            raise ValueError("nothing to merge")
        first = scorers[0]
        for s in scorers[1:]:
            if s.level_names != first.level_names or s.meta.get("channels") != first.meta.get("channels"):
                raise StatsMismatchError("cannot merge statistics of different levels or channels")
            if s.checkpoint_digest != first.checkpoint_digest:
                raise StatsMismatchError("cannot merge statistics fitted on different checkpoints")
        accs = {}
        for name in first.level_names:
            acc = first.levels[name].accumulator()
            for s in scorers[1:]:
                acc.merge(s.levels[name].accumulator())
            accs[name] = acc
        m = dict(first.meta)
        for k in ("fit_report", "pixel_count", "thresholds", "source", "threshold_calibration"):
            m.pop(k, None)
        m["n_images"] = sum(int(s.meta.get("n_images", 0) or 0) for s in scorers)
        m["merged_from"] = len(scorers)
        ch = first.meta.get("channels")
        return cls.from_accumulators(
            accs, shrinkage=shrinkage or first.meta.get("shrinkage", "oas"),
            ridge=ridge if ridge is not None else (first.meta.get("ridge") or 1e-3),
            max_condition=max_condition or first.meta.get("max_condition", 1e10), channels=ch,
            n_channels_total={k: first.levels[k].n_channels_total for k in first.level_names}, meta=m)
