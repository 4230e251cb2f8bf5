r"""GPU check of exploding-inverse detection: CPU/CUDA agreement on a fixed seed, host syncs, overhead.

One short run (about a minute on one GPU) that, for both bundled flows:

1. traces sampling (``rd.detect.trace_sampling``) on CPU and on CUDA with the same CPU generator (hence the same
   latents) on held-out clean crops, noise-degraded crops (the affine flow explodes there) and graphics images,
   in float64 and in float32, and compares artifact/NaN masks, attribution maps, explosion maps and max slopes;
   asserts agreement in float64 (masks and attribution identical on >= 99.9 % of pixels, explosion maps within
   1e-6 relative on pixels that are not artifacts) and reports the float32 figures;
2. counts the host-synchronising CUDA calls (``torch.cuda.set_sync_debug_mode``) of a traced decode against a plain
   one with the same device-resident latents: the hooks must add none;
3. times plain sampling against sampling with detection and against ``safe_sample`` (interleaved, medians, CUDA
   synchronised) and reports the ratios (target trace / plain <= 1.05);
4. runs the real-size benchmark (``benchmarks/realsize_bench.py``: the official SRFlow-DF2K 4X and 8X architectures,
   LR photos from 64x64 to 480x270) on CUDA: the same ratios (plain, traced full and compact, safe, score, fit,
   conditioner), images per second and peak CUDA memory per variant (``--realsize none`` skips it; a few minutes on
   one GPU). Its rows are also written to ``realsize_gpu.json`` beside the summary.

Without CUDA it prints a message and exits 0. Exit 1 when an assertion fails. Writes the summary as JSON to
``--out`` (default ``$OUT/gpu_check.json`` when ``$OUT`` is set) and prints it.

``python benchmarks/gpu_check.py [--repeats 20] [--realsize full|quick|none] [--out FILE]``
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import robustness_diag as rd
from robustness_diag.data import degradations as deg
from robustness_diag.data.photos import VALIDATION_PHOTOS, downscale, load_photo, random_crops
from robustness_diag.detect import draw_sample_latents, trace_sampling

FLOWS = ("sr4x_affine", "sr4x_rqspline")
TARGET = 1.05


def check_inputs(n: int = 4, lr_size: int = 16, seed: int = 0) -> torch.Tensor:
    """(3n, 3, lr_size, lr_size) CPU LR batch: n clean held-out crops, the same with noise level 2, n graphics."""
    g = torch.Generator().manual_seed(seed)
    hr = random_crops([load_photo(p) for p in VALIDATION_PHOTOS], n, lr_size * 4, g, augment=False)
    lr = downscale(hr, 4)
    return torch.cat([lr, deg.add_noise(lr, 2, g), deg.graphics_lr(lr_size, 4, n, g)])


def _frac(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else 0.0


def compare(flow, lr: torch.Tensor, device_a, device_b, dtype=torch.float64, seed: int = 0, n_samples: int = 2,
            heat: float = 0.9) -> dict:
    """Traces the same samples on two devices and returns agreement statistics (fractions of pixels, errors).

    Arguments:
        flow: an SRFlow-family flow (copied to each device and ``dtype``; the original is not moved).
        lr: LR batch (B, 3, h, w) on any device.
        device_a, device_b: the two devices (e.g. "cpu", "cuda").
    """
    res = []
    for dev in (device_a, device_b):
        f = copy.deepcopy(flow).to(device=dev, dtype=dtype)
        r = trace_sampling(f, lr.to(device=dev, dtype=dtype), heat, n_samples, torch.Generator().manual_seed(seed),
                           keep_layer_maps=False)
        res.append(r.cpu())
    a, b = res
    calm = ~a.artifact_mask & ~b.artifact_mask
    ea, eb = a.explosion_map[calm], b.explosion_map[calm]
    both = torch.isfinite(ea) & torch.isfinite(eb)
    rel = ((ea - eb).abs() / (1 + ea.abs()))[both]
    sa, sb = a.max_log_slope, b.max_log_slope
    fin = torch.isfinite(sa) & torch.isfinite(sb)
    return {
        "dtype": str(dtype).replace("torch.", ""), "samples": int(a.artifact_mask.shape[0]),
        "artifact_fraction": [_frac(a.artifact_mask), _frac(b.artifact_mask)],
        "artifact_mask_disagreement": _frac(a.artifact_mask != b.artifact_mask),
        "nan_mask_disagreement": _frac(a.nan_mask != b.nan_mask),
        "attribution_disagreement": _frac(a.attribution != b.attribution),
        "first_layer_equal": bool(torch.equal(a.first_layer, b.first_layer)),
        "explosion_map_max_rel_err_calm": float(rel.max()) if rel.numel() else 0.0,
        "explosion_map_finite_disagreement_calm": _frac(torch.isfinite(ea) != torch.isfinite(eb)),
        "max_log_slope_max_abs_err": float((sa - sb)[fin].abs().max()) if bool(fin.any()) else 0.0,
        "max_log_slope_finite_equal": bool(torch.equal(torch.isfinite(sa), torch.isfinite(sb))),
    }


def agreement_failures(stats: dict, strict: bool) -> list[str]:
    """What a comparison violates: float64 (``strict``) needs 99.9 % agreement and 1e-6 map error; float32 99 %."""
    lim, err = (1e-3, 1e-6) if strict else (1e-2, None)
    out = []
    for k in ("artifact_mask_disagreement", "nan_mask_disagreement", "attribution_disagreement"):
        if stats[k] > lim:
            out.append(f"{k} {stats[k]:.2e} > {lim:g}")
    if err is not None:
        if stats["explosion_map_max_rel_err_calm"] > err:
            out.append(f"explosion map rel. error {stats['explosion_map_max_rel_err_calm']:.2e} > {err:g}")
        if stats["max_log_slope_max_abs_err"] > 1e-6:
            out.append(f"max log-slope error {stats['max_log_slope_max_abs_err']:.2e} > 1e-6")
    return out


def count_syncs(flow, lr: torch.Tensor, heat: float = 0.9) -> dict:
    """Host-synchronising CUDA calls of one plain and one traced decode with the same device latents.

    The traced decode runs once untimed first: its end-of-pass ``slogdet`` of the 1x1 convs is cached per flow."""
    lat = draw_sample_latents(flow, lr, heat, 1, torch.Generator().manual_seed(0))
    trace_sampling(flow, lr, latents=lat)      # warm-up: fills the per-flow cache of ActNorm / 1x1-conv log-dets
    torch.cuda.synchronize()
    counts = {}
    for name in ("plain", "traced"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                if name == "plain":
                    with torch.no_grad():
                        flow.decode_with_ladj(lr, latents=lat)
                else:
                    trace_sampling(flow, lr, latents=lat)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[name] = sum("synchroniz" in str(w.message) for w in caught)
    return counts


def time_overhead(flow, lr: torch.Tensor, repeats: int, heat: float = 0.9) -> dict:
    """Median wall times (CUDA synchronised, interleaved in rotating order) and ratios to plain sampling."""
    def gen():
        return torch.Generator().manual_seed(1)

    def plain():
        with torch.no_grad():
            flow.sample(lr, heat, gen())

    fns = {"plain": plain,
           "trace": lambda: trace_sampling(flow, lr, heat, 1, gen()),
           "trace_compact": lambda: trace_sampling(flow, lr, heat, 1, gen(), keep_layer_maps=False,
                                                   return_image=False),
           "safe": lambda: rd.detect.safe_sample(flow, lr, heat, 1, gen())}
    for f in fns.values():
        f()
        f()
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            torch.cuda.synchronize()
            t = time.perf_counter()
            fns[k]()
            torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": med, "ratio": {k: med[k] / med["plain"] for k in med if k != "plain"}}


def realsize(plan: str = "full") -> dict:
    """The real-size benchmark (``benchmarks/realsize_bench.py``) on CUDA: ``plan`` "full" (every size of the CPU
    table plus the 8X architecture up to 240x136, 5 repeats) or "quick"."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("realsize_bench", Path(__file__).with_name("realsize_bench.py"))
    rb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rb)
    rows = rb.GPU_PLAN if plan == "full" else rb.QUICK_PLAN
    return rb.run(rows, device="cuda", threads=0)


def run(repeats: int = 20, timing_batch: int = 16, timing_lr: int = 32) -> tuple[dict, list[str]]:
    dev = torch.device("cuda")
    summary = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "flows": {},
               "target_trace_ratio": TARGET}
    failures: list[str] = []
    lr = check_inputs()
    big = check_inputs(n=timing_batch, lr_size=timing_lr)[:timing_batch]       # clean crops for timing
    for name in FLOWS:
        flow = rd.load_flow(f"bundled:{name}")
        entry = {}
        for dtype, strict in ((torch.float64, True), (torch.float32, False)):
            st = compare(flow, lr, "cpu", dev, dtype)
            entry[st["dtype"]] = st
            failures += [f"{name} {st['dtype']}: {m}" for m in agreement_failures(st, strict)]
        fc = copy.deepcopy(flow).to(dev)
        entry["host_syncs"] = count_syncs(fc, lr.to(dev))
        if entry["host_syncs"]["traced"] > entry["host_syncs"]["plain"]:
            failures.append(f"{name}: tracing adds host syncs {entry['host_syncs']}")
        entry["timing"] = time_overhead(fc, big.to(dev), repeats)
        entry["timing"].update(batch=timing_batch, lr_size=timing_lr, dtype="float32", repeats=repeats)
        entry["target_met"] = entry["timing"]["ratio"]["trace"] <= TARGET
        summary["flows"][name] = entry
        print(f"{name}: f64 mask disagreement {entry['float64']['artifact_mask_disagreement']:.1e}, f32 "
              f"{entry['float32']['artifact_mask_disagreement']:.1e}; syncs {entry['host_syncs']}; trace/plain "
              f"x{entry['timing']['ratio']['trace']:.3f}, safe/plain x{entry['timing']['ratio']['safe']:.3f}",
              flush=True)
    summary["failures"] = failures
    return summary, failures


def _json_default(v):
    return None if isinstance(v, float) and math.isnan(v) else str(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--realsize", choices=("full", "quick", "none"), default="full",
                   help="the real-size benchmark on CUDA (default full; none skips it)")
    p.add_argument("--out", default=os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT")
                   else None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check.")
        return 0
    summary, failures = run(a.repeats)
    if a.out:                                  # the agreement checks are kept even if the real-size run fails
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(summary, indent=1, default=_json_default))
    if a.realsize != "none":
        try:
            summary["realsize"] = realsize(a.realsize)
            if not summary["realsize"]["target_met"]:
                print("gpu_check: real-size targets missed (see realsize.rows[].target_met)", file=sys.stderr)
        except Exception as e:                 # report, keep the rest of the summary
            failures.append(f"realsize benchmark: {type(e).__name__}: {e}")
        if a.out and "realsize" in summary:
            Path(a.out).with_name("realsize_gpu.json").write_text(
                json.dumps(summary["realsize"], indent=1, default=_json_default))
    text = json.dumps(summary, indent=1, default=_json_default)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    if failures:
        print("gpu_check FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("gpu_check: CPU/GPU agreement OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
