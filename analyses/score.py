r"""The score pipeline over image folders: ``run(ScoreConfig) -> ScoreResult``.

Per image: per-position Mahalanobis distance maps at the feature grid (distance, not squared), image aggregates
(mean, p95, p99, max, fraction above the threshold) as one CSV row of ``scores.csv`` appended as produced
(:mod:`.folder_run`), and optionally the maps as ``maps/<name>.<level>.npy`` (float32 ``[h, w]`` at the feature grid)
plus colour-mapped overlays at HR size (``maps/<name>.<level>.png``); ``run.json`` records config, versions and
timing. ``<name>`` is :func:`.inputs.flat_name` of the image key: the whole key (extension and folders included),
percent-escaped, plus a digest of it (``sub/a.png`` -> ``sub%2Fa.png~<8 hex>``), so no two inputs share a map file
and :func:`.inputs.name_key` gives the key back. The output folder is locked while the run writes into it
(:func:`.folder_run.folder_lock`): a second run into it is refused (exit code 2).

Inputs are LR images as they are, or HR images downscaled by the flow's scale (``from_hr``; None: as the statistics
were fitted; :func:`.inputs.to_lr`). Setup problems (missing checkpoint, unreadable statistics, statistics of another
checkpoint, missing inputs, an existing table without ``resume``) give ``exit_code`` 2 and ``error``; failed files
give 1; otherwise 0. Nothing here imports plotting code: overlays are written by the ``overlay_writer`` the caller
passes (the CLI passes :func:`robustness_diag.reports.overlays.save_overlay`). Fitting is :mod:`.fit`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from robustness_diag.devices import DEFAULT_DEVICE
from robustness_diag.exit_codes import EXIT_OK, EXIT_USAGE

from .folder_run import FolderRunConfig, FolderRunError, FolderRunResult, run_folder
from .inputs import InputOptions, config_record, decoder, flat_name, list_inputs, setup_errors, to_lr


@dataclass
class ScoreConfig:
    """``robustness-diag score``: see the module docstring.

    Attributes:
        checkpoint, stats, out_dir: the flow, the statistics file, the output folder.
        save_maps: write ``maps/<name>.<level>.npy`` (feature grid) and ``maps/<name>.<level>.png`` overlays (HR
            size); ``<name>`` is :func:`.inputs.flat_name` of the image key.
        threshold: per-position threshold for ``frac_above`` (None: the statistics' default per level).
        levels: score a subset of the fitted levels (None: all; the first is the primary one, unprefixed columns).
        map_range: colour scale of overlays (None: median in-distribution distance to twice the threshold).
        overlay_max_side: downsize overlay PNGs beyond this side length.
        compute_dtype: "float32" (default) or "float64".
        resume, retry_failed, overwrite, progress: see :class:`FolderRunConfig`.
        overlay_writer: ``(path, image [3,H,W], map [H,W], vmin=, vmax=, max_side=)`` writing a PNG (the CLI passes
            :func:`robustness_diag.reports.overlays.save_overlay`); None = no PNGs.
    """

    checkpoint: str
    stats: str
    out_dir: str
    inputs: InputOptions = field(default_factory=lambda: InputOptions(from_hr=None))
    save_maps: bool = False
    threshold: Optional[float] = None
    levels: Optional[Sequence[str]] = None
    map_range: Optional[tuple] = None
    overlay_max_side: int = 2048
    compute_dtype: str = "float32"
    tile: int = 256
    margin: Optional[int] = None
    batch: int = 2
    device: str = DEFAULT_DEVICE
    resume: bool = False
    retry_failed: bool = False
    overwrite: bool = False
    progress: bool = True
    overlay_writer: Optional[Callable] = None


@dataclass
class ScoreResult:
    """What the scoring did: ``exit_code`` (0 all scored, 1 some files failed, 2 setup error with ``error``), the
    per-image loop's :class:`.folder_run.FolderRunResult` (its ``csv_path`` is ``scores.csv``) and the output folder."""

    exit_code: int = EXIT_OK
    error: Optional[str] = None
    run: Optional[FolderRunResult] = None
    out_dir: Optional[Path] = None

    def summary(self) -> str:
        if self.error:
            return f"error: {self.error}"
        return self.run.summary("scored")


def run(config: ScoreConfig) -> ScoreResult:
    """Scores every image (see the module docstring); never raises for setup errors or bad files."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import robustness_diag as rd
    from robustness_diag.devices import resolve_device
    from robustness_diag.io import atomic_write
    from robustness_diag.ood import AGGREGATES, FeatureOptions, MahalanobisScorer, aggregate, chi_quantile, \
        extractor_for, upsample_map
    from robustness_diag.ood import NonFiniteStatisticsError, nonfinite_score_reason

    cfg = config
    timing = {"load_seconds": 0.0, "score_seconds": 0.0, "maps_seconds": 0.0}
    t0 = time.time()
    try:
        if not Path(cfg.stats).is_file():
            raise FileNotFoundError(f"{cfg.stats}: no such statistics file")
        device = resolve_device(cfg.device)
        scorer = MahalanobisScorer.load(cfg.stats)
        flow = rd.load_flow(cfg.checkpoint, device=device).eval()
        digest = rd.weights_digest(flow)
        scorer.check_digest(digest, f"checkpoint {cfg.checkpoint}")
        if cfg.compute_dtype not in ("float32", "float64"):
            raise ValueError(f"compute dtype must be float32 or float64, got {cfg.compute_dtype!r}")
        scorer.compute_dtype = getattr(torch, cfg.compute_dtype)
        scorer = scorer.to(device)
        levels = list(cfg.levels) if cfg.levels else scorer.level_names
        bad = [lv for lv in levels if lv not in scorer.levels]
        if bad:
            raise ValueError(f"{cfg.stats} holds no statistics for level(s) {', '.join(bad)} "
                             f"(fitted: {', '.join(scorer.level_names)})")
        ex = extractor_for(flow, scorer, FeatureOptions(levels=levels, tile=cfg.tile, margin=cfg.margin,
                                                        batch=cfg.batch))
        for lv in levels:
            if scorer.levels[lv].n_channels_total != ex.n_channels:
                from robustness_diag.ood.errors import StatsMismatchError
                raise StatsMismatchError(f"{cfg.stats}: level {lv} was fitted on {scorer.levels[lv].n_channels_total} "
                                         f"feature channels; this flow's conditioner has {ex.n_channels}")
        inp = cfg.inputs
        fitted_hr = scorer.meta.get("input") == "hr"
        from_hr = fitted_hr if inp.from_hr is None else bool(inp.from_hr)
        items = list_inputs(inp)
        out_dir = Path(cfg.out_dir)
    except setup_errors() as e:
        return ScoreResult(exit_code=EXIT_USAGE, error=str(e))
    timing["load_seconds"] = round(time.time() - t0, 3)

    primary = levels[0]
    thresholds = {lv: float(cfg.threshold) if cfg.threshold is not None else scorer.threshold(lv) for lv in levels}
    vmin, vmax = cfg.map_range if cfg.map_range else (chi_quantile(0.5, scorer.levels[primary].dim),
                                                      2.0 * thresholds[primary])
    scale = int(flow.config.scale)
    maps_dir = out_dir / "maps"
    columns = ["level", "width", "height", "lr_width", "lr_height", "threshold"] + list(AGGREGATES)
    for lv in levels[1:]:
        columns += [f"{lv}_{a}" for a in AGGREGATES]
    columns += ["nonfinite"]
    notes_run = []
    if fitted_hr != from_hr:
        notes_run.append(f"statistics were fitted on {'HR' if fitted_hr else 'LR'} inputs but this run treats inputs "
                         f"as {'HR' if from_hr else 'LR'}")

    def work(item, decoded):
        lr, hr_size = to_lr(decoded, from_hr, scale, inp.min_size)
        t = time.perf_counter()
        maps = ex.distance_maps(lr, scorer)
        maps = {k: v.cpu() for k, v in maps.items()}        # one transfer per image
        timing["score_seconds"] += time.perf_counter() - t
        row = {"level": primary, "width": decoded.width, "height": decoded.height, "lr_width": int(lr.shape[-1]),
               "lr_height": int(lr.shape[-2]), "threshold": thresholds[primary]}
        nonfinite = 0
        for i, lv in enumerate(levels):
            agg = aggregate(maps[lv], thresholds[lv])
            reason = nonfinite_score_reason(lv, agg, maps[lv], lr, flow)
            if reason:                          # a NaN/Inf image score is this file's failure, not an ok row
                raise NonFiniteStatisticsError(reason)
            nonfinite += int((~torch.isfinite(maps[lv])).sum())
            row.update(agg if i == 0 else {f"{lv}_{a}": v for a, v in agg.items()})
        row["nonfinite"] = nonfinite
        if cfg.save_maps:
            t = time.perf_counter()
            name = flat_name(item.key)
            maps_dir.mkdir(parents=True, exist_ok=True)
            for lv in levels:
                arr = maps[lv].numpy().astype(np.float32)
                atomic_write(maps_dir / f"{name}.{lv}.npy", lambda tmp, a=arr: _save_npy(tmp, a))
            if cfg.overlay_writer is not None:
                if from_hr:
                    base = decoded.image
                else:
                    base = F.interpolate(lr.float(), scale_factor=scale, mode="bicubic",
                                         align_corners=False)[0].clamp(0, 1)
                hr_map = upsample_map(maps[primary], hr_size)
                cfg.overlay_writer(maps_dir / f"{name}.{primary}.png", base, hr_map, vmin=vmin, vmax=vmax,
                                   max_side=cfg.overlay_max_side)
            timing["maps_seconds"] += time.perf_counter() - t
        return row

    def extra():
        return {"checkpoint": {"path": str(cfg.checkpoint), "weights_digest": digest, "scale": scale,
                               "family": flow.family, "coupling": flow.config.coupling},
                "statistics": {"path": str(cfg.stats), "levels": scorer.level_names,
                               "pixel_count": scorer.meta.get("pixel_count"),
                               "shrinkage": scorer.meta.get("shrinkage"), "input": scorer.meta.get("input"),
                               "n_images": scorer.meta.get("n_images")},
                "scoring": {"levels": levels, "thresholds": thresholds, "from_hr": from_hr, "device": str(device),
                            "compute_dtype": cfg.compute_dtype, "features": ex.describe(),
                            "overlay_scale": [vmin, vmax] if cfg.save_maps else None, "notes": notes_run},
                "phase_timing": {k: round(v, 3) for k, v in timing.items()}}

    try:
        loop = run_folder(items, work, columns,
                          FolderRunConfig(out_dir=str(out_dir), csv_name="scores.csv", resume=cfg.resume,
                                          retry_failed=cfg.retry_failed, overwrite=cfg.overwrite,
                                          progress=cfg.progress, command="score", config=config_record(cfg),
                                          decode=decoder(inp)),
                          extra_info=extra)
    except FolderRunError as e:
        return ScoreResult(exit_code=EXIT_USAGE, error=str(e))
    return ScoreResult(exit_code=loop.exit_code, run=loop, out_dir=out_dir)


def _save_npy(path: Path, array) -> None:
    """``np.save`` to exactly ``path`` (given a name, ``np.save`` would append ``.npy`` to a temporary name)."""
    import numpy as np
    with open(path, "wb") as fh:
        np.save(fh, array)


__all__ = ["ScoreConfig", "ScoreResult", "run"]
