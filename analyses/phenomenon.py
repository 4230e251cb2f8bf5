"""Measures the exploding-inverse phenomenon: artifact rates of flows on held-out in-distribution LR inputs and on
documented OOD degradations of them (noise, blur-kernel mismatch, JPEG, exposure/contrast) and on graphics images.

Per flow and condition: fraction of samples with any artifact pixel (reference criterion: a channel > 1.5 or
< -0.5, or non-finite, before clamping), fraction of artifact pixels, fraction of NaN pixels, and the largest
inverse slope of any coupling sub-transform seen while sampling.

:func:`run` measures every flow x condition in memory and then writes ``out/phenomenon.csv`` (one row per flow x
condition) and ``out/phenomenon.json`` (config + rows), each once and atomically; it returns a
:class:`PhenomenonResult`.

``python -m robustness_diag.analyses.phenomenon FLOW [FLOW ...] --out runs/phenomenon``
"""
from __future__ import annotations

import argparse
import csv
import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from robustness_diag.data import degradations as deg
from robustness_diag.data.photos import VALIDATION_PHOTOS, downscale, load_photo, random_crops
from robustness_diag.detect import trace_sampling
from robustness_diag.flows.loading import load_flow
from robustness_diag.io import atomic_write_json, atomic_write_text

from .clustered import rate


@dataclass
class PhenomenonConfig:
    """``flows``: checkpoint specs; ``images`` held-out LR crops of ``lr_size`` px per condition; ``samples`` per
    image at ``heat``; ``levels``: degradation severities; ``upper``/``lower``: the artifact criterion (pixel
    values, reference range [0, 1]); ``n_resamples``: bootstrap resamples of the flag rate's interval. Each held-out
    crop is its own resampling unit (they are crops of one held-out photo, so the interval describes that photo's
    crops, not photos in general), as is each graphics image."""

    flows: list
    out: str = "runs/phenomenon"
    images: int = 8
    lr_size: int = 16
    samples: int = 4
    heat: float = 0.9
    seed: int = 0
    levels: list = field(default_factory=lambda: [1, 2, 3])
    upper: float = 1.5
    lower: float = -0.5
    n_resamples: int = 1000


def conditions(hr: torch.Tensor, scale: int, cfg: PhenomenonConfig) -> dict:
    """Condition name -> LR batch. ``hr``: held-out in-distribution HR crops."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    lr = downscale(hr, scale)
    out = {"clean": lr}
    for lv in cfg.levels:
        out[f"noise{lv}"] = deg.add_noise(lr, lv, g)
        out[f"blur{lv}"] = deg.blur_mismatch(hr, lv, scale)
        out[f"jpeg{lv}"] = deg.jpeg(lr, lv)
        out[f"exposure{lv}"] = deg.exposure(lr, lv)
    out["graphics"] = deg.graphics_lr(cfg.lr_size, scale, hr.shape[0], g)
    return out


@torch.no_grad()
def measure(flow, lr: torch.Tensor, cfg: PhenomenonConfig, seed: int, source=None) -> dict:
    """Artifact statistics of ``cfg.samples`` samples per LR image ``lr`` (B, 3, h, w), from
    :func:`robustness_diag.detect.trace_sampling`.

    Sample ``s`` uses its own generator seeded ``seed * 1000 + s``. The max inverse slope ignores NaN slopes (they
    come from NaN inputs, already counted as NaN pixels). ``frac_samples_with_artifact`` is the per-sample rate of
    the paper's flag (any artifact pixel); ``paper_flag`` is the same rate as :func:`.clustered.rate` (k of n
    samples, the interval resampling ``source``: ``[B]`` ids of the images' independent sources, default each image
    its own); ``flagged_per_image``: flagged samples per LR image.
    """
    flagged = torch.zeros(lr.shape[0], dtype=torch.long)
    art_px, nan_px, nonfinite_px, n_px = 0, 0, 0, 0
    max_log_slope = torch.tensor(-math.inf)
    for s in range(cfg.samples):
        g = torch.Generator().manual_seed(seed * 1000 + s)
        r = trace_sampling(flow, lr, cfg.heat, 1, g, upper=cfg.upper, lower=cfg.lower, keep_layer_maps=False,
                           return_image=False)
        per_pixel = r.artifact_mask.cpu()
        flagged += per_pixel.flatten(1).any(1).long()
        art_px += int(per_pixel.sum())
        nan_px += int(r.nan_mask.sum())
        nonfinite_px += int((r.nan_mask | r.inf_mask).sum())
        n_px += per_pixel.numel()
        max_log_slope = torch.maximum(max_log_slope, r.max_log_slope.amax().cpu())
    n = cfg.samples * lr.shape[0]
    source = np.arange(lr.shape[0]) if source is None else np.asarray(source)
    flag = rate(flagged.numpy(), np.full(lr.shape[0], cfg.samples), source, cfg.n_resamples, seed=seed,
                unit="sample")
    return {"samples": n, "frac_samples_with_artifact": int(flagged.sum()) / n, "frac_artifact_pixels": art_px / n_px,
            "frac_nan_pixels": nan_px / n_px, "frac_nonfinite_pixels": nonfinite_px / n_px,
            "max_inverse_slope": float(torch.exp(max_log_slope)), "paper_flag": flag,
            "flagged_per_image": flagged.tolist()}


@dataclass
class PhenomenonResult:
    """``rows``: one dict per flow x condition (``flow``, ``coupling``, ``condition`` and :func:`measure`'s
    statistics), in order; ``paths``: ``{"csv", "json"}`` files written."""

    config: PhenomenonConfig
    rows: list = field(default_factory=list)
    paths: dict = field(default_factory=dict)


def _csv_text(rows: list) -> str:
    buf = io.StringIO(newline="")
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def run(cfg: PhenomenonConfig) -> PhenomenonResult:
    """Measures every flow on every condition, then writes ``out/phenomenon.csv`` and ``out/phenomenon.json``."""
    out = Path(cfg.out)
    photos = [load_photo(n) for n in VALIDATION_PHOTOS]
    rows = []
    for spec in cfg.flows:
        flow = load_flow(spec)
        hr = random_crops(photos, cfg.images, cfg.lr_size * flow.scale, torch.Generator().manual_seed(cfg.seed),
                          augment=False)
        for name, lr in conditions(hr, flow.scale, cfg).items():
            rows.append({"flow": str(spec), "coupling": flow.config.coupling, "condition": name,
                         **measure(flow, lr, cfg, cfg.seed)})
    res = PhenomenonResult(cfg, rows)
    res.paths["csv"] = atomic_write_text(out / "phenomenon.csv", _csv_text(rows))
    res.paths["json"] = atomic_write_json(out / "phenomenon.json", {"config": asdict(cfg), "rows": rows})
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("flows", nargs="+", help="checkpoints or bundled:<name>")
    p.add_argument("--out", default="runs/phenomenon")
    p.add_argument("--images", type=int, default=8, help="held-out LR crops per condition")
    p.add_argument("--samples", type=int, default=4, help="samples per image")
    p.add_argument("--lr-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    res = run(PhenomenonConfig(a.flows, a.out, a.images, a.lr_size, a.samples, seed=a.seed))
    for r in res.rows:
        print(f"{r['coupling']:9s} {r['condition']:10s} samples with artifacts {r['frac_samples_with_artifact']:.3f}  "
              f"artifact px {r['frac_artifact_pixels']:.2e}  NaN px {r['frac_nan_pixels']:.2e}  "
              f"max inverse slope {r['max_inverse_slope']:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
