r"""Cost of the Ray engine on this machine: ``score`` on Ray workers against the local engine, on the same folder.

Measures, one run after the other (never two at once), with a Ray instance started once beforehand (as a cluster
is, ``ray start --head``; its start-up is reported apart):

* ``overhead``: one Ray worker (``--ray-workers 1``) against the local engine, both with ``--threads`` torch threads,
  on ``--images`` LR images of ``--lr-size`` px (default 16 x 128 px, the issue's setting): the ratio of the
  end-to-end wall time of ``score.run`` (setup, flow loads, every image, the outputs) and of the loop alone (run.json
  ``timing.seconds``: from the first image to the last row, the workers already started). Target: <= 1.2.
* ``overhead`` with a kept worker (``--ray-keep-workers``): the same ratio when the Ray worker process was started
  by an earlier run on the cluster (one untimed run starts it) and is reused: no process start and torch import,
  only the run's own flow load.
* ``throughput``: two workers against one, each of ``--threads`` threads (2 cores here: the two workers fill the
  machine): the ratio of images per second (end to end and loop).
* ``memory``: the peak resident memory of one worker (run.json ``engine.workers[].peak_rss_bytes``) after
  scoring 8, 16, 32 and 64 images: flat when images are streamed, not accumulated; the 64-image run is also timed
  against the local engine (``overhead_by_images``: the fixed start-up amortised).
* ``numbers``: the largest difference of the score columns between the local run and Ray workers with the same
  thread count (0: identical) and with a different one (the local run on 2 threads).

Each configuration runs ``--repeats`` times, interleaved (local, 1 worker, 2 workers, then again); medians are
reported with every time. The machine is shared with other jobs: wall times carry their noise.

``python benchmarks/ray_bench.py [--images 16] [--lr-size 128] [--threads 1] [--repeats 3] [--out FILE]``
(default output: ``benchmarks/results/ray.json``)
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TARGET = 1.2
#: idle seconds a kept worker waits for the next run in the kept-worker measurement
KEEP_S = 600.0
CKPT = "bundled:sr4x_affine"
COLUMNS = ("mean", "p95", "p99", "max", "frac_above")


def make_images(folder: Path, n: int, size: int, seed: int) -> None:
    """``n`` RGB crops of ``size`` px of the scikit-image photos (used as LR images), PNG."""
    from PIL import Image

    from robustness_diag.data.photos import TRAIN_PHOTOS, VALIDATION_PHOTOS, load_photo, random_crops
    folder.mkdir(parents=True, exist_ok=True)
    photos = [load_photo(p) for p in (*TRAIN_PHOTOS, *VALIDATION_PHOTOS)]
    crops = random_crops([p for p in photos if min(p.shape[-2:]) >= size], n, size,
                         torch.Generator().manual_seed(seed), augment=False)
    for i, x in enumerate(crops):
        arr = (x.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:03d}.png")


def score_once(stats: Path, images: Path, out: Path, engine) -> dict:
    """One ``score.run`` into a fresh ``out``: end-to-end wall seconds, loop seconds, the run.json engine record."""
    from robustness_diag.analyses import score
    from robustness_diag.analyses.inputs import InputOptions
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = score.run(score.ScoreConfig(CKPT, str(stats), str(out), InputOptions(images=[str(images)], from_hr=False),
                                      progress=False, engine=engine))
    wall = time.perf_counter() - t0
    if res.exit_code != 0:
        raise SystemExit(f"score failed: {res.error or res.summary()}")
    info = json.loads((out / "run.json").read_text())
    return {"wall_s": wall, "loop_s": info["timing"]["seconds"], "load_avg_1min": os.getloadavg()[0],
            "engine": info.get("engine")}


def rows(path: Path) -> dict:
    with open(path, newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def max_diff(a: Path, b: Path) -> dict:
    """Largest absolute and relative difference of the score columns of two scores.csv."""
    ra, rb = rows(a), rows(b)
    assert ra.keys() == rb.keys()
    abs_d = rel_d = 0.0
    for k in ra:
        for c in COLUMNS:
            x, y = float(ra[k][c]), float(rb[k][c])
            abs_d = max(abs_d, abs(x - y))
            rel_d = max(rel_d, abs(x - y) / max(abs(x), 1e-300))
    return {"max_abs": abs_d, "max_rel": rel_d, "identical_rows": all(
        {c: v for c, v in ra[k].items() if c != "seconds"} == {c: v for c, v in rb[k].items() if c != "seconds"}
        for k in ra)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--lr-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "ray.json"))
    a = p.parse_args()

    import ray

    from robustness_diag.analyses import fit
    from robustness_diag.analyses.engines import EngineOptions
    from robustness_diag.analyses.inputs import InputOptions
    from robustness_diag.analyses.ray_engine import LOCAL_SYSTEM_CONFIG

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="ray_bench_"))
    try:
        images = work / "images"
        make_images(images, a.images, a.lr_size, seed=0)
        make_images(work / "fit", 8, 64, seed=1)
        stats = work / "stats.safetensors"
        r = fit.run(fit.FitConfig(CKPT, str(stats), InputOptions(images=[str(work / "fit")]), progress=False))
        assert r.exit_code == 0, r.summary()

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG)
        ray_start = time.perf_counter() - t0
        local = EngineOptions()
        one = EngineOptions("ray", workers=1, threads=a.threads)
        two = EngineOptions("ray", workers=2, threads=a.threads)
        times: dict = {"local": [], "ray_1_worker": [], "ray_2_workers": []}
        for _ in range(a.repeats):
            for name, eng in (("local", local), ("ray_1_worker", one), ("ray_2_workers", two)):
                times[name].append(score_once(stats, images, work / name, eng))
                print(name, {k: round(v, 2) for k, v in times[name][-1].items() if k != "engine"}, flush=True)

        # kept workers (--ray-keep-workers): one untimed run starts the named worker, then each timed run reuses it
        kept = EngineOptions("ray", workers=1, threads=a.threads, keep_s=KEEP_S)
        kept_start = score_once(stats, images, work / "ray_kept_first", kept)
        times["local_vs_kept"], times["ray_1_kept_worker"] = [], []
        for _ in range(a.repeats):
            for name, eng in (("local_vs_kept", local), ("ray_1_kept_worker", kept)):
                times[name].append(score_once(stats, images, work / name, eng))
                print(name, {k: round(v, 2) for k, v in times[name][-1].items() if k != "engine"}, flush=True)
        reused = all(w.get("reused") for t in times["ray_1_kept_worker"] for w in t["engine"]["workers"])
        from robustness_diag.analyses.ray_engine import NAMESPACE
        with contextlib.suppress(ValueError):        # stop the kept worker: it holds a CPU
            ray.kill(ray.get_actor(f"worker-cpu-{a.threads}t-0", namespace=NAMESPACE))

        def med(name, key):
            return statistics.median(t[key] for t in times[name])

        overhead = {k: med("ray_1_worker", k) / med("local", k) for k in ("wall_s", "loop_s")}
        throughput = {k: med("ray_1_worker", k) / med("ray_2_workers", k) for k in ("wall_s", "loop_s")}
        overhead_kept = {k: med("ray_1_kept_worker", k) / med("local_vs_kept", k) for k in ("wall_s", "loop_s")}

        memory, by_images = {}, {}
        for n in (8, 32, 64):
            folder = work / f"mem{n}"
            make_images(folder, n, a.lr_size, seed=100 + n)
            rec = score_once(stats, folder, work / f"mem_out{n}", one)
            memory[str(n)] = max(w["peak_rss_bytes"] for w in rec["engine"]["workers"])
            print("memory", n, memory[str(n)], flush=True)
            if n == 64:                    # the fixed start-up amortised: the same ratio on 4x the images
                base = score_once(stats, folder, work / "local64", local)
                by_images["64"] = {"local": {k: base[k] for k in ("wall_s", "loop_s")},
                                   "ray_1_worker": {k: rec[k] for k in ("wall_s", "loop_s")},
                                   "overhead_ratio": {k: rec[k] / base[k] for k in ("wall_s", "loop_s")}}
                print("64 images", by_images["64"], flush=True)
        memory[str(a.images)] = max(w["peak_rss_bytes"] for t in times["ray_1_worker"] for w in t["engine"]["workers"])
        memory = dict(sorted(memory.items(), key=lambda kv: int(kv[0])))
        mem_values = list(memory.values())

        numbers = {"same_threads": max_diff(work / "local" / "scores.csv", work / "ray_1_worker" / "scores.csv")}
        torch.set_num_threads(2)
        score_once(stats, images, work / "local_2_threads", local)
        torch.set_num_threads(a.threads)
        numbers["local_2_threads_vs_ray_1_thread"] = max_diff(work / "local_2_threads" / "scores.csv",
                                                              work / "ray_1_worker" / "scores.csv")
        ray.shutdown()

        per_image = {name: {"wall_s": med(name, "wall_s") / a.images, "loop_s": med(name, "loop_s") / a.images}
                     for name in times}
        result = {
            "benchmark": "score on Ray workers vs the local engine (analyses/ray_engine.py)",
            "target_overhead_ratio": TARGET,
            "overhead_ratio_1_worker_vs_local": overhead,
            "overhead_ratio_1_kept_worker_vs_local": overhead_kept,
            "kept_worker": {"keep_s": KEEP_S, "reused_in_every_timed_run": reused,
                            "first_run_wall_s": kept_start["wall_s"],
                            "note": "--ray-keep-workers: the worker process of an earlier run on the same cluster "
                                    "is reused (no process start, no torch import); each run still loads its flow. "
                                    "One untimed run started it; the timed runs alternate with local runs."},
            "throughput_ratio_2_workers_vs_1": throughput,
            "peak_rss_bytes_per_worker_by_images": memory,
            "peak_rss_spread": (max(mem_values) - min(mem_values)) / min(mem_values),
            "numbers": numbers,
            "per_image_s": per_image,
            "startup_s": {name: statistics.median(t["wall_s"] - t["loop_s"] for t in times[name]) for name in times},
            "overhead_by_images": by_images,
            "ray_instance_start_s": ray_start,
            "images": a.images, "lr_size": a.lr_size, "threads_per_worker": a.threads, "repeats": a.repeats,
            "checkpoint": CKPT, "device": "cpu (no GPU on this machine; GPU workers not measured)",
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
            "ray": ray.__version__,
            "note": "wall_s: score.run end to end (setup, flow loads, workers started, every image, outputs); loop_s: "
                    "run.json timing.seconds (first image to last row). A Ray instance was running before the "
                    "runs (its start-up is ray_instance_start_s). Sequential runs, interleaved repeats, medians, "
                    "on a 2-core machine shared with other jobs (load_avg_1min after each run: above 2, the two "
                    "workers did not have two cores to themselves).",
            "times": {k: [{kk: vv for kk, vv in t.items() if kk != "engine"} for t in v] for k, v in times.items()},
        }
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: result[k] for k in ("overhead_ratio_1_worker_vs_local",
                                                 "overhead_ratio_1_kept_worker_vs_local",
                                                 "throughput_ratio_2_workers_vs_1", "startup_s",
                                                 "overhead_by_images", "peak_rss_bytes_per_worker_by_images",
                                                 "numbers")}, indent=1))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
