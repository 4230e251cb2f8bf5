r"""Sampling with exploding-inverse detection over image folders: ``run(SampleConfig) -> SampleResult``.

Per image, ``samples`` samples at ``heat`` through :func:`robustness_diag.detect.trace_sampling` (the sampling pass
is not changed by the tracing). Outputs in ``out_dir``:

* ``samples.csv``: one row per image (appended and flushed as produced, with ``status``/``error``; the resume key):
  samples, artifact-sample count, mean artifact fraction, NaN pixels, largest inverse slope, first exploding layer,
  explosion-map max;
* ``sample_rows.csv``: one row per image and sample: artifact pixel count and fraction, NaN/Inf counts, largest
  inverse slope, first exploding layer (index and name), explosion-map max;
* with ``save_maps``: ``maps/<name>.npz`` (``artifact_mask`` bool [S, H, W], ``nan_mask``, ``explosion`` float32
  [S, H, W] in nats, ``attribution`` int16 [S, H, W] (-1 none), ``events_lr`` [h, w]: in how many samples any HR pixel
  of an LR cell was an artifact, ``source``: the image key, which ``correlate`` checks) and PNG overlays of the
  artifact frequency and of the explosion map (``<name>.artifacts.png``, ``<name>.explosion.png``);
* with ``save_samples``: ``samples/<name>.sNN.png`` (clamped to [0, 1] for viewing; the image key in the PNG's
  ``source`` text chunk);
* ``<name>`` is :func:`.inputs.flat_name` of the image key: the whole key (extension and folders included),
  percent-escaped, plus a digest (``sub/a.png`` -> ``sub%2Fa.png~<8 hex>``), so no two inputs share an output file;
* ``run.json``: config, versions, the checkpoint's weights digest (``correlate`` pairs runs by it), timing, failures.

Sampling seeds are per image (``seed`` and the file key), so results do not depend on the order or on resuming.
The output folder is locked while a run writes into it (:func:`.folder_run.folder_lock`): a second run into it is
refused (exit code 2). Resuming refuses a ``sample_rows.csv`` with two different rows for one image and sample, and
keeps one of identical ones (:func:`.folder_run.final_rows`).
Odd LR sizes are padded (replicate) to what the flow's squeezes need and the outputs cropped back.
"""
from __future__ import annotations

import csv
import io
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from robustness_diag.devices import DEFAULT_DEVICE
from robustness_diag.exit_codes import EXIT_OK, EXIT_USAGE
from robustness_diag.io import atomic_write, atomic_write_text

from .engines import EngineOptions, execute
from .folder_run import FolderRunConfig, FolderRunError, FolderRunResult, PreparedRun, final_rows, read_table
from .inputs import InputOptions, config_record, decoder, flat_name, list_inputs, setup_errors, to_lr

DETAIL_COLUMNS = ["path", "sample", "artifact_pixels", "artifact_fraction", "nan_pixels", "inf_pixels",
                  "max_inverse_slope", "max_log_inverse_slope", "first_exploding_layer", "first_exploding_layer_name",
                  "explosion_map_max"]


@dataclass
class SampleConfig:
    """``robustness-diag sample``: see the module docstring. ``max_lr_pixels`` refuses larger LR images (sampling
    is not tiled: a tile seam would change the sample); ``overlay_writer`` and ``engine`` as in
    :class:`.score.ScoreConfig`."""

    checkpoint: str
    out_dir: str
    inputs: InputOptions = field(default_factory=InputOptions)
    samples: int = 4
    heat: Optional[float] = None
    seed: int = 0
    upper: float = 1.5
    lower: float = -0.5
    save_maps: bool = False
    save_samples: bool = False
    max_lr_pixels: int = 512 * 512
    device: str = DEFAULT_DEVICE
    resume: bool = False
    retry_failed: bool = False
    overwrite: bool = False
    progress: bool = True
    overlay_writer: Optional[Callable] = None
    engine: EngineOptions = field(default_factory=EngineOptions)


@dataclass
class SampleResult:
    """What the sampling did: ``exit_code`` (0 all sampled, 1 some files failed, 2 setup error with ``error``), the
    per-image loop's :class:`.folder_run.FolderRunResult` (its ``csv_path`` is ``samples.csv``) and the output
    folder (``sample_rows.csv`` and ``maps/`` beside it)."""

    exit_code: int = EXIT_OK
    error: Optional[str] = None
    run: Optional[FolderRunResult] = None
    out_dir: Optional[Path] = None

    def summary(self) -> str:
        return f"error: {self.error}" if self.error else self.run.summary("sampled")


def image_seed(seed: int, key: str) -> int:
    """The sampling seed of one image: stable across runs, orders and resumes."""
    return (seed * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2 ** 63 - 1)


def _detail_keep_ok(detail: Path, table: Path) -> None:
    """On resume: drop per-sample rows of images whose per-image row is missing or failed (a crash in between) and a
    torn last line; one row per image and sample (identical repeats kept once, differing ones refused:
    :func:`.folder_run.final_rows`, :class:`.folder_run.DuplicateRowsError`)."""
    if not detail.is_file() or not table.is_file():
        return
    _, rows = read_table(table)
    ok = {k for k, r in final_rows(rows, table).items() if r.get("status") == "ok"}
    _, detail_rows = read_table(detail)
    kept = list(final_rows([r for r in detail_rows if r.get("path") in ok], detail, ("path", "sample")).values())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=DETAIL_COLUMNS)
    w.writeheader()
    w.writerows(kept)
    atomic_write_text(detail, buf.getvalue())


def run(config: SampleConfig) -> SampleResult:
    """Samples every image with detection on ``config.engine``; never raises for setup errors or bad files (see
    ``exit_code``)."""
    try:
        prepared, loop = execute(config, prepare)
    except FolderRunError as e:                    # the tables, the lock, or the engine (Ray missing, no cluster)
        return SampleResult(exit_code=EXIT_USAGE, error=str(e))
    return prepared if loop is None else prepared.finish(loop)


def prepare(config: SampleConfig, listing: bool = True):
    """The setup of :func:`run` (flow loaded) and its per-image work, as a :class:`.folder_run.PreparedRun` whose
    ``finish(loop)`` gives the :class:`SampleResult`; a :class:`SampleResult` (exit code 2) for a setup error.
    ``listing`` False: the inputs are not listed (an engine's worker)."""
    import numpy as np
    import torch

    import robustness_diag as rd
    from robustness_diag.data.tiling import pad_to_multiple
    from robustness_diag.detect import trace_sampling
    from robustness_diag.detect.pooling import events_per_cell
    from robustness_diag.devices import resolve_device

    cfg = config

    timing = {"load_seconds": 0.0, "sample_seconds": 0.0, "write_seconds": 0.0}
    t0 = time.time()
    try:
        if cfg.samples < 1:
            raise ValueError(f"samples must be >= 1, got {cfg.samples}")
        device = resolve_device(cfg.device)
        flow = rd.load_flow(cfg.checkpoint, device=device).eval()
        digest = rd.weights_digest(flow)
        inp = cfg.inputs
        items = list_inputs(inp) if listing else []
        out_dir = Path(cfg.out_dir)
    except setup_errors() as e:
        return SampleResult(exit_code=EXIT_USAGE, error=str(e))
    timing["load_seconds"] = round(time.time() - t0, 3)
    scale = int(flow.config.scale)
    heat = float(cfg.heat if cfg.heat is not None else flow.config.heat)
    align = max(1, 2 ** int(flow.config.L) // scale)
    detail_path = out_dir / "sample_rows.csv"
    columns = ["width", "height", "lr_width", "lr_height", "samples", "heat", "samples_with_artifacts",
               "artifact_fraction_mean", "nan_pixels", "max_inverse_slope", "first_exploding_layer",
               "explosion_map_max"]

    def work(item, decoded):
        lr, (H, W) = to_lr(decoded, bool(inp.from_hr), scale, inp.min_size)
        h, w = lr.shape[-2:]
        if h * w > cfg.max_lr_pixels:
            raise ValueError(f"LR image {w}x{h} has more than max_lr_pixels={cfg.max_lr_pixels} pixels (sampling "
                             f"is not tiled); downscale it or raise --max-lr-pixels")
        lr_p, _ = pad_to_multiple(lr.to(device), align)
        t = time.perf_counter()
        g = torch.Generator(device="cpu").manual_seed(image_seed(cfg.seed, item.key))
        tr = trace_sampling(flow, lr_p, heat, cfg.samples, g, upper=cfg.upper, lower=cfg.lower,
                            keep_layer_maps=False, return_image=cfg.save_samples).cpu()
        timing["sample_seconds"] += time.perf_counter() - t
        mask = tr.artifact_mask[:, :h * scale, :w * scale]
        nan = tr.nan_mask[:, :h * scale, :w * scale]
        t = time.perf_counter()
        rows = tr.rows()
        # counts on the cropped image (padding never counts)
        for n, r in enumerate(rows):
            r["artifact_pixels"] = int(mask[n].sum())
            r["artifact_fraction"] = float(mask[n].float().mean())
            r["nan_pixels"] = int(nan[n].sum())
            r["inf_pixels"] = int(tr.inf_mask[n, :h * scale, :w * scale].sum())
        name = flat_name(item.key)
        events = events_per_cell(mask, (h, w))[0]                                              # [h, w]
        if cfg.save_maps:
            maps = out_dir / "maps"
            maps.mkdir(parents=True, exist_ok=True)
            arrays = dict(artifact_mask=mask.numpy(), nan_mask=nan.numpy(),
                          explosion=tr.explosion_map[:, :h * scale, :w * scale].float().numpy(),
                          attribution=tr.attribution[:, :h * scale, :w * scale].to(torch.int16).numpy(),
                          events_lr=events.numpy().astype(np.int16), samples=np.array(cfg.samples),
                          source=np.array(item.key))
            atomic_write(maps / f"{name}.npz", lambda tmp: _savez(tmp, arrays))
            if cfg.overlay_writer is not None:
                base = decoded.image if inp.from_hr else torch.nn.functional.interpolate(
                    lr.float(), scale_factor=scale, mode="bicubic", align_corners=False)[0].clamp(0, 1)
                cfg.overlay_writer(maps / f"{name}.artifacts.png", base, mask.float().mean(0), vmin=0.0, vmax=1.0)
                ex = torch.nan_to_num(tr.explosion_map[:, :h * scale, :w * scale].amax(0), nan=1e4, posinf=1e4)
                cfg.overlay_writer(maps / f"{name}.explosion.png", base, ex, vmin=float(ex.min()),
                                   vmax=float(ex.max()) if float(ex.max()) > float(ex.min()) else float(ex.min()) + 1)
        if cfg.save_samples:
            from PIL import Image
            from PIL.PngImagePlugin import PngInfo
            info = PngInfo()
            info.add_itxt("source", item.key.encode("utf-8", "backslashreplace").decode("utf-8"))   # whose sample
            sdir = out_dir / "samples"
            sdir.mkdir(parents=True, exist_ok=True)
            for s in range(cfg.samples):
                img = torch.nan_to_num(tr.image[s, :, :h * scale, :w * scale], nan=1.0).clamp(0, 1)
                arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                atomic_write(sdir / f"{name}.s{s:02d}.png",
                             lambda tmp, a=arr: Image.fromarray(a).save(tmp, format="PNG", pnginfo=info))
        new = not detail_path.exists() or detail_path.stat().st_size == 0
        with open(detail_path, "a", newline="", encoding="utf-8") as f:
            wr = csv.DictWriter(f, fieldnames=DETAIL_COLUMNS, extrasaction="ignore")
            if new:
                wr.writeheader()
            for r in rows:
                wr.writerow({**r, "path": item.key})
        timing["write_seconds"] += time.perf_counter() - t
        slopes = [r["max_log_inverse_slope"] for r in rows if r["max_log_inverse_slope"] == r["max_log_inverse_slope"]]
        first = [r["first_exploding_layer_name"] for r in rows if r["first_exploding_layer"] >= 0]
        return {"width": decoded.width, "height": decoded.height, "lr_width": int(w), "lr_height": int(h),
                "samples": cfg.samples, "heat": heat,
                "samples_with_artifacts": sum(1 for r in rows if r["artifact_pixels"] > 0),
                "artifact_fraction_mean": float(mask.float().mean()), "nan_pixels": int(nan.sum()),
                "max_inverse_slope": float(np.exp(max(slopes))) if slopes else float("nan"),
                "first_exploding_layer": first[0] if first else "",
                "explosion_map_max": max(r["explosion_map_max"] for r in rows)}

    def extra():
        return {"checkpoint": {"path": str(cfg.checkpoint), "weights_digest": digest, "scale": scale,
                               "family": flow.family, "coupling": flow.config.coupling},
                "sampling": {"samples": cfg.samples, "heat": heat, "seed": cfg.seed, "from_hr": inp.from_hr,
                             "thresholds": [cfg.lower, cfg.upper], "device": str(device)},
                "phase_timing": {k: round(v, 3) for k, v in timing.items()}}

    def before_loop():                 # with the folder locked, from the preparation of sample_rows.csv to the end
        if cfg.resume:
            _detail_keep_ok(detail_path, out_dir / "samples.csv")
        elif cfg.overwrite and detail_path.exists():
            detail_path.unlink()

    def finish(loop) -> SampleResult:
        return SampleResult(exit_code=loop.exit_code, run=loop, out_dir=out_dir)

    folder = FolderRunConfig(out_dir=str(out_dir), csv_name="samples.csv", resume=cfg.resume,
                             retry_failed=cfg.retry_failed, overwrite=cfg.overwrite, progress=cfg.progress,
                             command="sample", config=config_record(cfg), decode=decoder(inp))
    return PreparedRun(items, work, columns, folder, extra=extra, timing=timing, append_tables=(detail_path.name,),
                       before_loop=before_loop, finish=finish)


def _savez(path: Path, arrays: dict) -> None:
    """``np.savez_compressed`` to exactly ``path`` (given a name, NumPy would append ``.npz`` to a temporary name)."""
    import numpy as np
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


__all__ = ["SampleConfig", "SampleResult", "DETAIL_COLUMNS", "image_seed", "run", "prepare"]
