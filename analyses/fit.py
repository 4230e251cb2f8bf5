r"""The fit pipeline over image folders: ``run(FitConfig) -> FitResult``.

Streams the conditioner features of every in-distribution image into float64 accumulators (one Gaussian per level
over all positions; :func:`robustness_diag.ood.accumulate`), then fits and writes a ``.safetensors`` statistics file
through :func:`robustness_diag.ood.features.fit_statistics`, the same step as the library's
:func:`robustness_diag.ood.fit_flow`: the same images give the same tensors and the same metadata keys (checkpoint
digest, levels, channels, pixel count, shrinkage, input mode, ...) whichever way they are fitted.

Threshold calibration: a share of the images (``calibration_fraction``, default 0.2: inputs 0, 5, 10, ... in
listing order, :func:`robustness_diag.ood.held_out`) is held out of the Gaussian. After the fit, a second pass scores
them and stores the empirical 0.99 quantile of their interior per-position distances as the threshold
(:class:`robustness_diag.ood.ThresholdCalibrator`, the same as ``fit_flow``'s); each image is decoded once, in one
pass or the other.

Inputs are LR images as they are, or HR images downscaled by the flow's scale (``from_hr``;
:func:`.inputs.to_lr`). A file that cannot be used is listed with its reason and the others are fitted (exit code
1; no statistics when no image could be used for the Gaussian); setup problems give exit code 2 and ``error``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from robustness_diag.devices import DEFAULT_DEVICE
from robustness_diag.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from robustness_diag.ood import DEFAULT_BORDER_MARGIN, DEFAULT_CALIBRATION_FRACTION
from robustness_diag.text import printable

from .engines import EngineOptions, execute
from .folder_run import FolderRunConfig, FolderRunError, FolderRunResult, PreparedRun, run_folder
from .inputs import InputOptions, decoder, list_inputs, setup_errors, to_lr


@dataclass
class FitConfig:
    """``robustness-diag fit``: see the module docstring.

    Attributes:
        checkpoint: the flow (file or ``bundled:<name>``). out: the statistics file to write (``.safetensors``).
        inputs: :class:`.inputs.InputOptions` (``from_hr`` False: the images are LR).
        levels, channels, tile, margin, batch: as :class:`robustness_diag.ood.FeatureOptions` (tile and margin in LR
            pixels).
        shrinkage: one of oas, ledoit_wolf, ridge, none; ``ridge`` is relative to ``tr(S)/D``; ``max_condition``
            floors eigenvalues at ``lambda_max / max_condition``.
        calibration_fraction: share of the inputs held out of the Gaussian to calibrate the threshold (0: none, the
            threshold is then the chi quantile). border_margin: positions left out at the border when calibrating.
        device: see :func:`robustness_diag.devices.resolve_device`. progress: progress bar on stderr.
        engine: where the Gaussian pass runs (:class:`.engines.EngineOptions`; on Ray the workers send the float64
            moments of every chunk of features, merged here in input order: the same statistics); the calibration
            pass runs here.
    """

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
    batch: int = 1
    calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION
    border_margin: int = DEFAULT_BORDER_MARGIN
    device: str = DEFAULT_DEVICE
    progress: bool = True
    engine: EngineOptions = field(default_factory=EngineOptions)


@dataclass
class FitResult:
    """What the fit did: ``exit_code`` (0/1/2), ``error`` (setup error, or "no image could be used"), the statistics
    path and scorer (None when nothing was written), the per-image loop's :class:`.folder_run.FolderRunResult` and
    the wall time in seconds."""

    exit_code: int = EXIT_OK
    error: Optional[str] = None
    stats_path: Optional[Path] = None
    scorer: object = None
    run: Optional[FolderRunResult] = None
    seconds: float = 0.0

    def summary(self) -> str:
        """Human-readable summary: images used, failed files, per-level fit report, the statistics path."""
        if self.error and self.run is None:
            return f"error: {printable(self.error)}"
        lines = [self.run.summary("used for the fit")] if self.run else []
        if self.error:
            lines.append(f"error: {printable(self.error)}")
        if self.scorer is not None:
            m = self.scorer.meta
            cal = m.get("threshold_calibration") or {}
            lines.append(f"Gaussian: {m.get('n_images')} image(s); threshold calibration: "
                         + (f"{cal.get('n_images')} held-out image(s)" if cal.get("status") == "calibrated"
                            else f"none ({cal.get('reason')})"))
            for lv, r in self.scorer.fit_report.items():
                info = self.scorer.threshold_info(lv)
                lines.append(f"{lv}: {r['pixel_count']:,} positions x {r['dim']} channels; {r['shrinkage']} "
                             f"shrinkage {r['shrinkage_coefficient']:.3g}; condition number {r['condition_number']:.3g}"
                             f"; threshold {info['value']:.4g} ("
                             + ("calibrated" if info["calibrated"] else "chi quantile, not calibrated") + ")"
                             + ("; " + "; ".join(r["notes"]) if r["notes"] else ""))
            if not m.get("features", {}).get("stitch_exact", True):
                f = m["features"]
                lines.append(f"note: tile margin {f['margin']} < receptive field {f['receptive_field']} LR px: the "
                             f"features of tiled images were not exact")
            lines.append(f"statistics: {printable(self.stats_path)}")
        return "\n".join(lines)


def run(config: FitConfig) -> FitResult:
    """Fits and saves the statistics (see the module docstring); never raises for setup errors or bad files."""
    try:
        prepared, loop = execute(config, prepare)
    except FolderRunError as e:                    # the engine: Ray missing, no cluster
        return FitResult(exit_code=EXIT_USAGE, error=str(e))
    return prepared if loop is None else prepared.finish(loop)


def prepare(config: FitConfig, listing: bool = True):
    """The setup of :func:`run` (flow loaded) and the Gaussian pass's per-image work, as a
    :class:`.folder_run.PreparedRun` whose ``accumulators`` the work fills and whose ``finish(loop)`` fits,
    calibrates and saves the statistics (the :class:`FitResult`); a :class:`FitResult` (exit code 2) for a setup
    error. ``listing`` False: the inputs are not listed (an engine's worker)."""
    import torch

    import robustness_diag as rd
    from robustness_diag.data.images import ImageList
    from robustness_diag.devices import resolve_device
    from robustness_diag.ood import FeatureExtractor, FeatureOptions, held_out
    from robustness_diag.ood.features import ALL_HELD_OUT, NO_HOLD_OUT, accumulate, make_accumulators
    from robustness_diag.ood.gaussian import normalise_method

    cfg = config
    t_start = time.time()
    try:
        device = resolve_device(cfg.device)
        held_out(0, cfg.calibration_fraction)               # validates the fraction
        if int(cfg.border_margin) < 0:
            raise ValueError(f"border margin must be >= 0, got {cfg.border_margin}")
        flow = rd.load_flow(cfg.checkpoint, device=device).eval()
        ex = FeatureExtractor(flow, FeatureOptions(levels=cfg.levels, channels=cfg.channels, tile=cfg.tile,
                                                   margin=cfg.margin, batch=cfg.batch))
        method = normalise_method(cfg.shrinkage)
        inp = cfg.inputs
        items = list_inputs(inp) if listing else ImageList([])
    except setup_errors() as e:
        return FitResult(exit_code=EXIT_USAGE, error=str(e))

    hold = [i for i in range(len(items)) if held_out(i, cfg.calibration_fraction)]
    reason = None if hold else NO_HOLD_OUT
    if len(hold) == len(items):                       # nothing would be left for the Gaussian
        hold, reason = [], ALL_HELD_OUT
    fit_items = ImageList([it for i, it in enumerate(items) if i not in set(hold)], scan=items.scan)
    accs = make_accumulators(ex)
    scale = int(flow.config.scale)

    def work(item, decoded):
        lr, _ = to_lr(decoded, bool(inp.from_hr), scale, inp.min_size)
        with torch.no_grad():
            n = accumulate(ex, accs, lr)
        return {"lr_width": int(lr.shape[-1]), "lr_height": int(lr.shape[-2]), "positions": n}

    columns = ["lr_width", "lr_height", "positions"]
    folder = FolderRunConfig(out_dir=None, progress=cfg.progress, command="fit", decode=decoder(inp))
    return PreparedRun(fit_items, work, columns, folder, accumulators=accs,
                       finish=lambda loop: _finish(loop, cfg, t_start, ex, accs, method, items, hold, reason, scale))


def _finish(loop: FolderRunResult, cfg: FitConfig, t_start: float, ex, accs: dict, method: str, items, hold: list,
            reason, scale: int) -> FitResult:
    """After the Gaussian pass: the statistics, the calibration pass on the held-out images, the file."""
    from robustness_diag.ood import OODError, ThresholdCalibrator
    from robustness_diag.ood.features import fit_statistics, mark_uncalibrated

    inp = cfg.inputs
    res = FitResult(run=loop)
    if accs[ex.levels[0]].n < 2:
        res.exit_code = EXIT_FAILED
        res.error = "no image could be used for the Gaussian; no statistics written"
        res.seconds = time.time() - t_start
        return res
    meta = {"checkpoint": str(cfg.checkpoint), "input": "hr" if inp.from_hr else "lr", "n_failed": loop.n_failed,
            "failed": loop.failed[:100], "images": [str(p) for p in inp.images]}
    try:
        scorer = fit_statistics(ex, accs, n_images=loop.n_ok, shrinkage=method, ridge=cfg.ridge,
                                max_condition=cfg.max_condition, started=t_start, meta=meta)
    except OODError as e:                  # e.g. features so large that the float64 moments overflow
        res.exit_code = EXIT_FAILED
        res.error = f"statistics refused, none written: {e}"
        res.seconds = time.time() - t_start
        return res
    if hold:                               # second pass: the held-out images, scored with the fitted Gaussian
        cal = ThresholdCalibrator(ex, scorer, border_margin=cfg.border_margin)
        index = {items[i].key: i for i in hold}

        def calibrate(item, decoded):
            lr, _ = to_lr(decoded, bool(inp.from_hr), scale, inp.min_size)
            n = cal.add(lr, index[item.key])
            return {"lr_width": int(lr.shape[-1]), "lr_height": int(lr.shape[-2]), "positions": n,
                    "notes": "held out of the Gaussian: threshold calibration"}

        cal_loop = run_folder([items[i] for i in hold], calibrate, ["lr_width", "lr_height", "positions"],
                              FolderRunConfig(out_dir=None, progress=cfg.progress, command="calibrate",
                                              decode=decoder(inp)))
        scorer = cal.apply(cfg.calibration_fraction)
        loop = _combined(loop, cal_loop)
        res.run = loop
        scorer.meta.update(n_failed=loop.n_failed, failed=loop.failed[:100],
                           fit_seconds=round(time.time() - t_start, 3))
    else:
        mark_uncalibrated(scorer, reason, fraction=cfg.calibration_fraction, border_margin=cfg.border_margin)
    res.stats_path = scorer.save(cfg.out)
    res.scorer = scorer
    res.exit_code = loop.exit_code
    res.seconds = time.time() - t_start
    return res


def _combined(fit: FolderRunResult, cal: FolderRunResult) -> FolderRunResult:
    """One account of the fit pass and the calibration pass (the listing's scan is the fit pass's)."""
    return FolderRunResult(n_inputs=fit.n_inputs + cal.n_inputs, n_ok=fit.n_ok + cal.n_ok,
                           n_failed=fit.n_failed + cal.n_failed, n_processed=fit.n_processed + cal.n_processed,
                           failed=sorted(fit.failed + cal.failed, key=lambda f: f["path"]),
                           seconds=fit.seconds + cal.seconds, interrupted=fit.interrupted or cal.interrupted,
                           scan=fit.scan)


__all__ = ["FitConfig", "FitResult", "run", "prepare"]
