r"""Fit and score pipelines over image folders: ``run(FitConfig) -> FitResult``, ``run(ScoreConfig) -> ScoreResult``.

* **fit**: streams the conditioner features of every in-distribution image into float64 accumulators (one Gaussian
  per level over all positions), applies the chosen shrinkage, factors once and writes a ``.safetensors`` statistics
  file whose metadata records the checkpoint digest, levels, channels, pixel count, shrinkage and input mode.
* **score**: per image, per-position Mahalanobis distance maps at the feature grid, image aggregates (mean, p95, p99,
  max, fraction above the threshold) as one CSV row appended as produced (:mod:`.folder_run`), and optionally the
  maps as ``.npy`` plus colour-mapped overlays at HR size; ``run.json`` records config, versions and timing.

Inputs are LR images as they are, or HR images downscaled by the flow's scale (``from_hr``; bicubic with
anti-aliasing, :func:`robustness_diag.data.photos.downscale`). Setup problems (missing checkpoint, unreadable
statistics, statistics of another checkpoint, missing inputs, an existing table without ``resume``) give
``exit_code`` 2 and ``error``; failed files give 1; otherwise 0. Nothing here imports plotting code: overlays are
written by the ``overlay_writer`` the caller passes (the CLI passes :func:`robustness_diag.reports.overlays.save_overlay`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from .folder_run import EXIT_FAILED, EXIT_OK, EXIT_USAGE, FolderRunConfig, FolderRunError, FolderRunResult, run_folder

DEFAULT_MIN_SIZE = 8


@dataclass
class InputOptions:
    """Which files, and how they become LR images.

    Attributes:
        images: folders, image files or file lists (see :func:`robustness_diag.data.images.list_images`).
        include, exclude: glob filters on the file keys/names. recursive: search sub-folders.
        from_hr: inputs are HR images, downscaled by the flow's scale (None in scoring: as the statistics were fitted).
        max_pixels: refuse files with more pixels. min_size: refuse LR images smaller than this on a side.
        exif_orientation: apply EXIF rotation.
    """

    images: Sequence[str] = ()
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    recursive: bool = True
    from_hr: Optional[bool] = False
    max_pixels: Optional[int] = 50_000_000
    min_size: int = DEFAULT_MIN_SIZE
    exif_orientation: bool = False


@dataclass
class FitConfig:
    """``robustness-diag fit``: see the module docstring. ``levels``/``channels``/``tile``/``margin``/``batch`` as
    :class:`robustness_diag.ood.FeatureOptions`; ``shrinkage`` one of oas, ledoit_wolf, ridge, none; ``ridge`` is
    relative to ``tr(S)/D``."""

    checkpoint: str
    out: str
    inputs: InputOptions = field(default_factory=InputOptions)
    levels: Optional[Sequence[str]] = None
    channels: Optional[str] = None
    shrinkage: str = "oas"
    ridge: float = 1e-3
    max_condition: float = 1e10
    tile: int = 256
    margin: Optional[int] = None
    batch: int = 2
    device: str = "auto"
    progress: bool = True


@dataclass
class FitResult:
    exit_code: int = EXIT_OK
    error: Optional[str] = None            # setup error (exit code 2) or "nothing could be fitted"
    stats_path: Optional[Path] = None
    scorer: object = None
    run: Optional[FolderRunResult] = None
    seconds: float = 0.0

    def summary(self) -> str:
        if self.error and self.run is None:
            return f"error: {self.error}"
        lines = [self.run.summary("used for the fit")] if self.run else []
        if self.error:
            lines.append(f"error: {self.error}")
        if self.scorer is not None:
            for lv, r in self.scorer.fit_report.items():
                lines.append(f"{lv}: {r['pixel_count']:,} positions x {r['dim']} channels; {r['shrinkage']} "
                             f"shrinkage {r['shrinkage_coefficient']:.3g}; condition number {r['condition_number']:.3g}"
                             + ("; " + "; ".join(r["notes"]) if r["notes"] else ""))
            lines.append(f"statistics: {self.stats_path}")
        return "\n".join(lines)


@dataclass
class ScoreConfig:
    """``robustness-diag score``: see the module docstring.

    Attributes:
        checkpoint, stats, out_dir: the flow, the statistics file, the output folder.
        save_maps: write ``maps/<key>.<level>.npy`` (feature grid) and ``maps/<key>.<level>.png`` overlays (HR size).
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
    device: str = "auto"
    resume: bool = False
    retry_failed: bool = False
    overwrite: bool = False
    progress: bool = True
    overlay_writer: Optional[Callable] = None


@dataclass
class ScoreResult:
    exit_code: int = EXIT_OK
    error: Optional[str] = None
    run: Optional[FolderRunResult] = None
    out_dir: Optional[Path] = None

    def summary(self) -> str:
        if self.error:
            return f"error: {self.error}"
        return self.run.summary("scored")


def _setup_errors() -> tuple:
    from robustness_diag.data.images import ImageListError
    from robustness_diag.flows.errors import CheckpointError
    from robustness_diag.ood.errors import OODError
    return (CheckpointError, OODError, ImageListError, FolderRunError, ValueError, FileNotFoundError)


def _device(name: str):
    import torch
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def _config_record(cfg) -> dict:
    d = asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else dict(cfg)
    d.pop("overlay_writer", None)
    return d


def _to_lr(decoded, from_hr: bool, scale: int, min_size: int):
    """``(lr [1, 3, h, w], hr_size (H, W) for overlays)`` of a decoded image; raises ValueError if too small."""
    from robustness_diag.data.photos import downscale
    img = decoded.image
    H, W = int(img.shape[1]), int(img.shape[2])
    if from_hr:
        if H // scale < min_size or W // scale < min_size:
            raise ValueError(f"image too small: {W}x{H} HR pixels give {W // scale}x{H // scale} LR pixels at "
                             f"{scale}X; need at least {min_size} on each side (--min-size)")
        lr = downscale(img[None], scale)
        return lr, (H, W)
    if H < min_size or W < min_size:
        raise ValueError(f"image too small: {W}x{H} pixels; need at least {min_size} LR pixels on each side "
                         f"(--min-size)")
    return img[None], (H * scale, W * scale)


# ---------------------------------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------------------------------

def fit(cfg: FitConfig) -> FitResult:
    """Fits and saves the statistics (see the module docstring); never raises for setup errors or bad files."""
    import torch
    import robustness_diag as rd
    from robustness_diag.data.images import list_images, read_image
    from robustness_diag.ood import FeatureExtractor, FeatureOptions, MahalanobisScorer
    from robustness_diag.ood.features import accumulate, make_accumulators

    t_start = time.time()
    res = FitResult()
    try:
        device = _device(cfg.device)
        flow = rd.load_flow(cfg.checkpoint, device=device).eval()
        ex = FeatureExtractor(flow, FeatureOptions(levels=cfg.levels, channels=cfg.channels, tile=cfg.tile,
                                                   margin=cfg.margin, batch=cfg.batch))
        from robustness_diag.ood.gaussian import normalise_method
        method = normalise_method(cfg.shrinkage)
        inp = cfg.inputs
        items = list_images(inp.images, include=inp.include, exclude=inp.exclude, recursive=inp.recursive)
        if not items:
            raise ValueError(f"no image files found in {', '.join(map(str, inp.images))}")
    except _setup_errors() as e:
        return FitResult(exit_code=EXIT_USAGE, error=str(e))

    accs = make_accumulators(ex)
    scale = int(flow.config.scale)

    def work(item, decoded):
        lr, _ = _to_lr(decoded, bool(inp.from_hr), scale, inp.min_size)
        with torch.no_grad():
            n = accumulate(ex, accs, lr)
        return {"lr_width": int(lr.shape[-1]), "lr_height": int(lr.shape[-2]), "positions": n}

    def decode(p):
        return read_image(p, max_pixels=inp.max_pixels, exif_orientation=inp.exif_orientation)

    run = run_folder(items, work, ["lr_width", "lr_height", "positions"],
                     FolderRunConfig(out_dir=None, progress=cfg.progress, command="fit", decode=decode))
    res.run = run
    first = ex.levels[0]
    if accs[first].n < 2:
        res.exit_code = EXIT_FAILED
        res.error = "no image could be used; no statistics written"
        res.seconds = time.time() - t_start
        return res
    meta = {"checkpoint": str(cfg.checkpoint), "checkpoint_digest": rd.weights_digest(flow),
            "flow_scale": scale, "flow_family": flow.family, "flow_coupling": flow.config.coupling,
            "input": "hr" if inp.from_hr else "lr", "n_images": run.n_ok, "n_failed": run.n_failed,
            "failed": run.failed[:100], "images": [str(p) for p in inp.images], "features": ex.describe(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
            "fit_seconds": round(time.time() - t_start, 3)}
    scorer = MahalanobisScorer.from_accumulators(
        accs, shrinkage=method, ridge=cfg.ridge, max_condition=cfg.max_condition, channels=ex.channels,
        n_channels_total={lv: ex.n_channels for lv in ex.levels}, meta=meta)
    res.stats_path = scorer.save(cfg.out)
    res.scorer = scorer
    res.exit_code = run.exit_code
    res.seconds = time.time() - t_start
    return res


# ---------------------------------------------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------------------------------------------

def _flat_name(key: str) -> str:
    stem = key.rsplit(".", 1)[0] if "." in key.rsplit("/", 1)[-1] else key
    return stem.replace("\\", "/").strip("/").replace("/", "__").replace(":", "_") or "image"


def score(cfg: ScoreConfig) -> ScoreResult:
    """Scores every image (see the module docstring); never raises for setup errors or bad files."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import robustness_diag as rd
    from robustness_diag.data.images import list_images, read_image
    from robustness_diag.ood import AGGREGATES, FeatureOptions, MahalanobisScorer, aggregate, chi_quantile, \
        extractor_for, upsample_map

    timing = {"load_seconds": 0.0, "score_seconds": 0.0, "maps_seconds": 0.0}
    t0 = time.time()
    try:
        if not Path(cfg.stats).is_file():
            raise FileNotFoundError(f"{cfg.stats}: no such statistics file")
        device = _device(cfg.device)
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
        items = list_images(inp.images, include=inp.include, exclude=inp.exclude, recursive=inp.recursive)
        if not items:
            raise ValueError(f"no image files found in {', '.join(map(str, inp.images))}")
        out_dir = Path(cfg.out_dir)
    except _setup_errors() as e:
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
        lr, hr_size = _to_lr(decoded, from_hr, scale, inp.min_size)
        t = time.perf_counter()
        maps = ex.distance_maps(lr, scorer)
        maps = {k: v.cpu() for k, v in maps.items()}        # one transfer per image
        timing["score_seconds"] += time.perf_counter() - t
        row = {"level": primary, "width": decoded.width, "height": decoded.height, "lr_width": int(lr.shape[-1]),
               "lr_height": int(lr.shape[-2]), "threshold": thresholds[primary]}
        nonfinite = 0
        for i, lv in enumerate(levels):
            agg = aggregate(maps[lv], thresholds[lv])
            nonfinite += int((~torch.isfinite(maps[lv])).sum())
            row.update(agg if i == 0 else {f"{lv}_{a}": v for a, v in agg.items()})
        row["nonfinite"] = nonfinite
        if cfg.save_maps:
            t = time.perf_counter()
            name = _flat_name(item.key)
            maps_dir.mkdir(parents=True, exist_ok=True)
            for lv in levels:
                tmp = maps_dir / f".{name}.{lv}.npy.tmp"
                with open(tmp, "wb") as fh:
                    np.save(fh, maps[lv].numpy().astype(np.float32))
                tmp.replace(maps_dir / f"{name}.{lv}.npy")
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

    def decode(p):
        return read_image(p, max_pixels=inp.max_pixels, exif_orientation=inp.exif_orientation)

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
        run = run_folder(items, work, columns,
                         FolderRunConfig(out_dir=str(out_dir), csv_name="scores.csv", resume=cfg.resume,
                                         retry_failed=cfg.retry_failed, overwrite=cfg.overwrite,
                                         progress=cfg.progress, command="score", config=_config_record(cfg),
                                         decode=decode),
                         extra_info=extra)
    except FolderRunError as e:
        return ScoreResult(exit_code=EXIT_USAGE, error=str(e))
    return ScoreResult(exit_code=run.exit_code, run=run, out_dir=out_dir)


def run(config: Union[FitConfig, ScoreConfig]):
    """Dispatches to :func:`fit` or :func:`score` by the config's type."""
    if isinstance(config, FitConfig):
        return fit(config)
    if isinstance(config, ScoreConfig):
        return score(config)
    raise TypeError(f"expected FitConfig or ScoreConfig, got {type(config).__name__}")
