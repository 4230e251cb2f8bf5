r"""The fit pipeline over image folders: ``run(FitConfig) -> FitResult``.

Streams the conditioner features of every in-distribution image into float64 accumulators (one Gaussian per level
over all positions; :func:`robustness_diag.ood.accumulate`), then fits and writes a ``.safetensors`` statistics file
through :func:`robustness_diag.ood.features.fit_statistics`, the same step as the library's
:func:`robustness_diag.ood.fit_flow`: the same images give the same tensors and the same metadata keys (checkpoint
digest, levels, channels, pixel count, shrinkage, input mode, ...) whichever way they are fitted.

Inputs are LR images as they are, or HR images downscaled by the flow's scale (``from_hr``;
:func:`.inputs.to_lr`). A file that cannot be used is listed with its reason and the others are fitted (exit code
1; no statistics when no image could be used); setup problems give exit code 2 and ``error``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from robustness_diag.devices import DEFAULT_DEVICE
from robustness_diag.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from robustness_diag.text import printable

from .folder_run import FolderRunConfig, FolderRunResult, run_folder
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
        device: see :func:`robustness_diag.devices.resolve_device`. progress: progress bar on stderr.
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
    batch: int = 2
    device: str = DEFAULT_DEVICE
    progress: bool = True


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
            for lv, r in self.scorer.fit_report.items():
                lines.append(f"{lv}: {r['pixel_count']:,} positions x {r['dim']} channels; {r['shrinkage']} "
                             f"shrinkage {r['shrinkage_coefficient']:.3g}; condition number {r['condition_number']:.3g}"
                             + ("; " + "; ".join(r["notes"]) if r["notes"] else ""))
            lines.append(f"statistics: {printable(self.stats_path)}")
        return "\n".join(lines)


def run(config: FitConfig) -> FitResult:
    """Fits and saves the statistics (see the module docstring); never raises for setup errors or bad files."""
    import torch

    import robustness_diag as rd
    from robustness_diag.devices import resolve_device
    from robustness_diag.ood import FeatureExtractor, FeatureOptions, OODError
    from robustness_diag.ood.features import accumulate, fit_statistics, make_accumulators
    from robustness_diag.ood.gaussian import normalise_method

    cfg = config
    t_start = time.time()
    try:
        device = resolve_device(cfg.device)
        flow = rd.load_flow(cfg.checkpoint, device=device).eval()
        ex = FeatureExtractor(flow, FeatureOptions(levels=cfg.levels, channels=cfg.channels, tile=cfg.tile,
                                                   margin=cfg.margin, batch=cfg.batch))
        method = normalise_method(cfg.shrinkage)
        inp = cfg.inputs
        items = list_inputs(inp)
    except setup_errors() as e:
        return FitResult(exit_code=EXIT_USAGE, error=str(e))

    accs = make_accumulators(ex)
    scale = int(flow.config.scale)

    def work(item, decoded):
        lr, _ = to_lr(decoded, bool(inp.from_hr), scale, inp.min_size)
        with torch.no_grad():
            n = accumulate(ex, accs, lr)
        return {"lr_width": int(lr.shape[-1]), "lr_height": int(lr.shape[-2]), "positions": n}

    loop = run_folder(items, work, ["lr_width", "lr_height", "positions"],
                      FolderRunConfig(out_dir=None, progress=cfg.progress, command="fit", decode=decoder(inp)))
    res = FitResult(run=loop)
    if accs[ex.levels[0]].n < 2:
        res.exit_code = EXIT_FAILED
        res.error = "no image could be used; no statistics written"
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
    res.stats_path = scorer.save(cfg.out)
    res.scorer = scorer
    res.exit_code = loop.exit_code
    res.seconds = time.time() - t_start
    return res


__all__ = ["FitConfig", "FitResult", "run"]
