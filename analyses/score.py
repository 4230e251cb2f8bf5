r"""The score pipeline over image folders: ``run(ScoreConfig) -> ScoreResult``.

Per image: per-position Mahalanobis distance maps at the feature grid (distance, not squared), image aggregates
(mean, p95, p99, max, fraction above the threshold) over the positions at least ``border_margin`` from the border
(:func:`robustness_diag.ood.aggregate`) as one CSV row of ``scores.csv`` appended as produced (:mod:`.folder_run`),
and optionally the maps as ``maps/<name>.<level>.npy`` (float32 ``[h, w]`` at the feature grid, every position)
plus colour-mapped overlays at HR size (``maps/<name>.<level>.png``); ``run.json`` records config, versions,
timing, each level's threshold and where it comes from (calibrated at fit time, or the chi-quantile fallback of
statistics without a calibration, which is also said in a one-line warning), the border margin, and the stitching:
exact (the default margin, the receptive field, or images processed whole) or, with a smaller ``margin``, the error
of every tiled image's maps measured against an exact computation
(:meth:`robustness_diag.ood.FeatureExtractor.stitching_error`; also printed). ``<name>`` is
:func:`.inputs.flat_name` of the image key: the whole key (extension and folders included), percent-escaped, plus a
digest of it (``sub/a.png`` -> ``sub%2Fa.png~<8 hex>``), so no two inputs share a map file
and :func:`.inputs.name_key` gives the key back. The output folder is locked while the run writes into it
(:func:`.folder_run.folder_lock`): a second run into it is refused (exit code 2).

Inputs are LR images as they are, or HR images downscaled by the flow's scale (``from_hr``; None: as the statistics
were fitted; :func:`.inputs.to_lr`). Setup problems (missing checkpoint, unreadable statistics, statistics of another
checkpoint, missing inputs, an existing table without ``resume``) give ``exit_code`` 2 and ``error``; failed files
give 1; otherwise 0. Nothing here imports plotting code: overlays are written by the ``overlay_writer`` the caller
passes (the CLI passes :func:`robustness_diag.reports.overlays.save_overlay`). Fitting is :mod:`.fit`.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from robustness_diag.devices import DEFAULT_DEVICE
from robustness_diag.exit_codes import EXIT_OK, EXIT_USAGE
from robustness_diag.ood import DEFAULT_BORDER_MARGIN

from .engines import EngineOptions, execute
from .folder_run import FolderRunConfig, FolderRunError, FolderRunResult, PreparedRun
from .inputs import InputOptions, config_record, decoder, flat_name, list_inputs, setup_errors, to_lr


@dataclass
class ScoreConfig:
    """``robustness-diag score``: see the module docstring.

    Attributes:
        checkpoint, stats, out_dir: the flow, the statistics file, the output folder.
        save_maps: write ``maps/<name>.<level>.npy`` (feature grid) and ``maps/<name>.<level>.png`` overlays (HR
            size); ``<name>`` is :func:`.inputs.flat_name` of the image key.
        threshold: per-position threshold for ``frac_above`` (None: the statistics' threshold per level, calibrated
            at fit time; the chi quantile for statistics without a calibration).
        levels: score a subset of the fitted levels (None: all; the first is the primary one, unprefixed columns).
        map_range: colour scale of overlays (None: median in-distribution distance to twice the threshold).
        overlay_max_side: downsize overlay PNGs beyond this side length.
        compute_dtype: "float32" (default) or "float64".
        tile, margin, batch: tiling (:class:`robustness_diag.ood.FeatureOptions`; margin None = the receptive
            field, exact). border_margin: positions left out of the aggregates at the border (0: all).
        resume, retry_failed, overwrite, progress: see :class:`FolderRunConfig`.
        overlay_writer: ``(path, image [3,H,W], map [H,W], vmin=, vmax=, max_side=)`` writing a PNG (the CLI passes
            :func:`robustness_diag.reports.overlays.save_overlay`); None = no PNGs.
        engine: where the per-image work runs (:class:`.engines.EngineOptions`: here, or on Ray workers; the rows
            are the same).
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
    batch: int = 1
    border_margin: int = DEFAULT_BORDER_MARGIN
    device: str = DEFAULT_DEVICE
    resume: bool = False
    retry_failed: bool = False
    overwrite: bool = False
    progress: bool = True
    overlay_writer: Optional[Callable] = None
    engine: EngineOptions = field(default_factory=EngineOptions)


@dataclass
class ScoreResult:
    """What the scoring did: ``exit_code`` (0 all scored, 1 some files failed, 2 setup error with ``error``), the
    per-image loop's :class:`.folder_run.FolderRunResult` (its ``csv_path`` is ``scores.csv``) and the output folder."""

    exit_code: int = EXIT_OK
    error: Optional[str] = None
    run: Optional[FolderRunResult] = None
    out_dir: Optional[Path] = None
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        if self.error:
            return f"error: {self.error}"
        return "\n".join([self.run.summary("scored")] + list(self.notes))


def run(config: ScoreConfig) -> ScoreResult:
    """Scores every image (see the module docstring) on ``config.engine``; never raises for setup errors or bad
    files."""
    try:
        prepared, loop = execute(config, prepare)
    except FolderRunError as e:                    # the table, the lock, or the engine (Ray missing, no cluster)
        return ScoreResult(exit_code=EXIT_USAGE, error=str(e))
    return prepared if loop is None else prepared.finish(loop)


def prepare(config: ScoreConfig, listing: bool = True):
    """The setup of :func:`run` (flow and statistics loaded and checked) and its per-image work, as a
    :class:`.folder_run.PreparedRun` whose ``finish(loop)`` gives the :class:`ScoreResult`; a :class:`ScoreResult`
    (exit code 2) for a setup error. ``listing`` False: the inputs are not listed (an engine's worker)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import robustness_diag as rd
    from robustness_diag.devices import resolve_device
    from robustness_diag.io import atomic_write
    from robustness_diag.ood import AGGREGATES, FeatureOptions, MahalanobisScorer, aggregate, chi_quantile, \
        extractor_for, upsample_map
    from robustness_diag.ood import NonFiniteStatisticsError, nonfinite_score_reason
    from robustness_diag.ood.features import STITCH_CHECK_HALF
    from robustness_diag.text import printable

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
        if int(cfg.border_margin) < 0:
            raise ValueError(f"border margin must be >= 0, got {cfg.border_margin}")
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
        items = list_inputs(inp) if listing else []
        out_dir = Path(cfg.out_dir)
    except setup_errors() as e:
        return ScoreResult(exit_code=EXIT_USAGE, error=str(e))
    timing["load_seconds"] = round(time.time() - t0, 3)

    primary = levels[0]
    sources = {}
    for lv in levels:
        info = scorer.threshold_info(lv)
        sources[lv] = ({"value": float(cfg.threshold), "calibrated": None, "source": "given (--threshold)"}
                       if cfg.threshold is not None else info)
    thresholds = {lv: sources[lv]["value"] for lv in levels}
    border = int(cfg.border_margin)
    warnings = []
    fallback = [lv for lv in levels if sources[lv]["calibrated"] is False]
    if fallback:
        warnings.append(f"warning: {cfg.stats}: no calibrated threshold for {', '.join(fallback)}; frac_above uses "
                        f"the {sources[fallback[0]]['source']}")
    cal_margins = {sources[lv].get("border_margin") for lv in levels if sources[lv]["calibrated"]}
    if cal_margins and cal_margins != {border}:
        warnings.append(f"warning: the threshold was calibrated with border margin {', '.join(map(str, cal_margins))}"
                        f" but this run leaves out {border}: frac_above is not at its calibrated rate")
    if not ex.exact:
        warnings.append(f"warning: tile margin {ex.margin} < the flow's receptive field {ex.rf} LR px: tiled images "
                        f"are not scored exactly; the error of each is measured and recorded (run.json 'stitching')")
    for w in warnings:
        print(printable(w), file=sys.stderr)
    stitch = {"tiled_images": 0, "checked_whole": 0, "max_abs": {}, "max_rel": {}, "worst_image": {}}
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
        if not ex.exact:
            err = ex.stitching_error(lr, scorer, maps)
            if err is not None:
                stitch["tiled_images"] += 1
                stitch["checked_whole"] += int(err["whole_image"])
                for lv, e in err["levels"].items():
                    if e["max_abs"] >= stitch["max_abs"].get(lv, -1.0):
                        stitch["max_abs"][lv], stitch["worst_image"][lv] = e["max_abs"], item.key
                    stitch["max_rel"][lv] = max(stitch["max_rel"].get(lv, 0.0), e["max_rel"])
        for i, lv in enumerate(levels):
            agg = aggregate(maps[lv], thresholds[lv], border)
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
                "scoring": {"levels": levels, "thresholds": thresholds, "threshold_sources": sources,
                            "border_margin": border, "from_hr": from_hr, "device": str(device),
                            "compute_dtype": cfg.compute_dtype, "features": ex.describe(),
                            "stitching": stitching_record(),
                            "overlay_scale": [vmin, vmax] if cfg.save_maps else None,
                            "notes": notes_run + [w[len("warning: "):] for w in warnings]},
                "phase_timing": {k: round(v, 3) for k, v in timing.items()}}

    def stitching_record():
        if ex.exact:
            return {"exact": True, "margin": ex.margin, "receptive_field": ex.rf,
                    "method": "margin >= receptive field: tiled maps equal whole-image maps up to float rounding"}
        return {"exact": False, "margin": ex.margin, "receptive_field": ex.rf, **stitch,
                "method": f"per tiled image, max |stitched - exact| of the distance map; the exact map is computed "
                          f"untiled on the whole image when its area is at most (2 x {STITCH_CHECK_HALF} + 2 x "
                          f"receptive field)^2 LR px ('checked_whole' images: their largest error), else on the "
                          f"positions within {STITCH_CHECK_HALF} LR px of the first interior tile corner grown by the "
                          f"receptive field (a spot check: a lower bound of that image's largest error); images "
                          f"processed whole are exact and not counted"}

    def merge_stitch(into: dict, part: dict) -> None:
        """Adds one image's ``stitch`` record (computed by an engine's worker) to ``into``, as ``work`` would."""
        into["tiled_images"] += part["tiled_images"]
        into["checked_whole"] += part.get("checked_whole", 0)
        for lv, e in part["max_abs"].items():
            if e >= into["max_abs"].get(lv, -1.0):
                into["max_abs"][lv], into["worst_image"][lv] = e, part["worst_image"][lv]
        for lv, e in part["max_rel"].items():
            into["max_rel"][lv] = max(into["max_rel"].get(lv, 0.0), e)

    def finish(loop) -> ScoreResult:
        notes = [f"threshold {lv}: {thresholds[lv]:.4g} ({sources[lv]['source']})" for lv in levels]
        notes.append(f"aggregates leave out {border} position(s) at the border" if border else
                     "aggregates use every position (border margin 0)")
        if not ex.exact:
            st = stitching_record()
            notes.append(f"stitching NOT exact (margin {ex.margin} < receptive field {ex.rf} LR px): "
                         + (f"measured max |error| of the distance map on {st['tiled_images']} tiled image(s) "
                        f"({st['checked_whole']} checked whole, the others at a tile corner): "
                            + ", ".join(f"{lv} {v:.3g} (relative {st['max_rel'][lv]:.3g}, "
                                        f"{printable(st['worst_image'][lv])})" for lv, v in st["max_abs"].items())
                            if st["tiled_images"] else "no image needed tiles, all exact"))
        return ScoreResult(exit_code=loop.exit_code, run=loop, out_dir=out_dir, notes=notes)

    folder = FolderRunConfig(out_dir=str(out_dir), csv_name="scores.csv", resume=cfg.resume,
                             retry_failed=cfg.retry_failed, overwrite=cfg.overwrite, progress=cfg.progress,
                             command="score", config=config_record(cfg), decode=decoder(inp))
    return PreparedRun(items, work, columns, folder, extra=extra, timing=timing, state=stitch,
                       merge_state=merge_stitch, finish=finish)


def _save_npy(path: Path, array) -> None:
    """``np.save`` to exactly ``path`` (given a name, ``np.save`` would append ``.npy`` to a temporary name)."""
    import numpy as np
    with open(path, "wb") as fh:
        np.save(fh, array)


__all__ = ["ScoreConfig", "ScoreResult", "run", "prepare"]
