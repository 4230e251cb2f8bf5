r"""Overhead of exploding-inverse detection: sampling-with-detection time / plain sampling time, bundled flows.

Measures, on held-out in-distribution LR crops (the model cards' validation photo), in one process:

* ``plain``: ``flow.sample(lr, heat, generator)``;
* ``trace``: ``rd.detect.trace_sampling(flow, lr, heat, 1, generator)`` (default: per-layer maps kept);
* ``trace_compact``: the same with ``keep_layer_maps=False, return_image=False`` (what ``analyses.phenomenon`` uses);
* ``safe``: ``rd.detect.safe_sample`` on the same clean inputs (the guard's cost when nothing is wrong).

Timings are interleaved (every repeat runs every variant, in a rotating order), each the wall time of one call;
the reported ratio is median(variant) / median(plain), with the median of the per-repeat ratios beside it.
On CPU the headline uses process CPU time on one thread (``--threads 1``), which other jobs on a shared machine
disturb far less than wall time; wall-time ratios are recorded too. Target: trace / plain <= 1.05.

``python benchmarks/detect_bench.py [--repeats 9] [--batch 4] [--lr-size 16] [--threads 1] [--out FILE]``
(default output: ``benchmarks/results/detect.json``)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import robustness_diag as rd
from robustness_diag.data.photos import VALIDATION_PHOTOS, downscale, load_photo, random_crops

TARGET = 1.05
FLOWS = ("sr4x_affine", "sr4x_rqspline")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variants(flow, lr: torch.Tensor, heat: float, seed: int) -> dict:
    """Name -> zero-argument callable running one sampling variant (each builds its own seeded generator)."""
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731  (CPU generator: same latents on any device)

    def plain():
        with torch.no_grad():
            return flow.sample(lr, heat, gen())

    return {
        "plain": plain,
        "trace": lambda: rd.detect.trace_sampling(flow, lr, heat, 1, gen()),
        "trace_compact": lambda: rd.detect.trace_sampling(flow, lr, heat, 1, gen(), keep_layer_maps=False,
                                                          return_image=False),
        "safe": lambda: rd.detect.safe_sample(flow, lr, heat, 1, gen()),
    }


def time_interleaved(fns: dict, repeats: int, warmup: int, device: torch.device) -> tuple[dict, dict]:
    """Wall and process-CPU times (s) of every callable, ``repeats`` rounds in rotating order after ``warmup``
    untimed rounds. Returns ``(wall, cpu)``, each name -> list of seconds."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            fns[n]()
            _sync(device)
            wall[n].append(time.perf_counter() - t)
            cpu[n].append(time.process_time() - c)
    return wall, cpu


def summarise(times: dict) -> dict:
    """Median times and ratios to ``plain`` (ratio of medians, and median of per-repeat ratios)."""
    base = statistics.median(times["plain"])
    out = {"median_s": {n: statistics.median(v) for n, v in times.items()}, "ratio": {}, "ratio_per_repeat_median": {}}
    for n, v in times.items():
        if n == "plain":
            continue
        out["ratio"][n] = statistics.median(v) / base
        out["ratio_per_repeat_median"][n] = statistics.median(a / b for a, b in zip(v, times["plain"]))
    return out


def measurement_lr(batch: int, lr_size: int, seed: int = 0) -> torch.Tensor:
    """``batch`` held-out LR crops (B, 3, lr_size, lr_size) of the validation photo, in-distribution."""
    hr = random_crops([load_photo(n) for n in VALIDATION_PHOTOS], batch, lr_size * 4,
                      torch.Generator().manual_seed(seed), augment=False)
    return downscale(hr, 4)


def run(repeats: int = 9, warmup: int = 2, batch: int = 4, lr_size: int = 16, heat: float = 0.9,
        device: str = "cpu", flows=FLOWS, threads: int = 0) -> dict:
    """Runs the benchmark; ``threads > 0`` sets ``torch.set_num_threads`` first. The headline ratio is the CPU-time
    ratio on CPU (the process's own work, robust to other processes on a shared machine) and the wall-time ratio
    on CUDA; both are recorded."""
    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    clock = "cpu" if dev.type == "cpu" else "wall"
    lr = measurement_lr(batch, lr_size).to(dev)
    result = {"benchmark": "detect overhead: time(variant) / time(plain flow.sample)", "target_trace_ratio": TARGET,
              "headline_clock": clock, "device": str(dev), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "batch": batch, "lr_size": lr_size, "hr_size": lr_size * 4, "heat": heat, "repeats": repeats,
              "warmup": warmup, "inputs": "held-out clean crops of the validation photo (no artifacts: the guard's "
              "repair path does not run)", "note": "interleaved rotating-order timings on a machine shared with "
              "other jobs; medians", "flows": {}}
    for name in flows:
        flow = rd.load_flow(f"bundled:{name}").to(dev)
        wall, cpu = time_interleaved(variants(flow, lr, heat, seed=1), repeats, warmup, dev)
        s = {"wall": summarise(wall), "cpu": summarise(cpu), "times_wall_s": wall, "times_cpu_s": cpu}
        s["ratio"] = s[clock]["ratio"]
        s["target_met"] = s["ratio"]["trace"] <= TARGET
        result["flows"][name] = s
        print(f"{name}: plain {s[clock]['median_s']['plain']:.3f} s ({clock})  trace x{s['ratio']['trace']:.3f} "
              f"(per-repeat x{s[clock]['ratio_per_repeat_median']['trace']:.3f}; wall x"
              f"{s['wall']['ratio']['trace']:.3f})  compact x{s['ratio']['trace_compact']:.3f}  "
              f"safe x{s['ratio']['safe']:.3f}", flush=True)
    result["target_met"] = all(f["target_met"] for f in result["flows"].values())
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "detect.json"))
    a = p.parse_args(argv)
    res = run(a.repeats, a.warmup, a.batch, a.lr_size, device=a.device, threads=a.threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out)
    print(f"wrote {out}; target trace/plain <= {TARGET}: {'met' if res['target_met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
