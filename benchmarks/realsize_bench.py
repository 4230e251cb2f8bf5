r"""Detection at real size: the official SRFlow-DF2K architectures on LR photos of hundreds of pixels.

A checkpoint of the official 4X architecture (23 RRDB blocks, K=16, L=3, 39.5 M parameters; and the 8X one,
L=4, 50.8 M) is built with the official key layout and shapes by the project's checkpoint builder
(``tests/synth.py``: the manifests of the original files), written as a ``.pth`` and loaded with ``rd.load_flow``
like a downloaded file. Its weights are then set by :func:`robustness_diag.flows.synthetic.randomize_flow`
(seeded; ActNorms initialised on smooth images), so that clean photos give no artifact pixel at heat 0.9 and
``safe_sample`` is timed on the path it takes on clean inputs (the builder's near-identity weights alone put most
pixels out of range). Inputs are centred LR crops of a held-out photo (``china``, 640 x 427), W x H.

Measured per size, in one process, interleaved in rotating order, the minimum over repeats (the run least disturbed
by other processes on a shared machine; medians recorded too):

* ``plain``: ``flow.sample(lr, heat, generator)``;
* ``trace``: ``rd.detect.trace_sampling(flow, lr, heat, 1, generator)`` (per-layer maps kept);
* ``trace_compact``: the same with ``keep_layer_maps=False, return_image=False``;
* ``safe``: ``rd.detect.safe_sample`` on the clean input;
* ``guard``: the check ``safe_sample`` adds to a plain pass on a clean input (``rd.detect.safe.guard`` on the plain
  sample's image, computed once beforehand). ``1 + guard / plain`` is the guard's cost by parts
  (``safe_by_parts``): on clean inputs ``safe_sample`` is exactly a plain pass plus this check, and the by-parts
  figure is not subject to the few-percent run-to-run noise of two separate sampling passes (``plain_control``);
* ``conditioner``: ``flow.features(lr)`` (the RRDB forward alone, all levels, as sampling runs it);
* ``score``: one image's OOD score (``FeatureExtractor.distance_maps`` + ``aggregate``, the default level);
* ``fit``: one image's contribution to an OOD fit (``rd.ood.accumulate`` into fresh accumulators);
* ``plain_control``: plain sampling again under another name; its ratio to ``plain`` shows the noise of the
  measurement itself on this machine.

Ratios are to ``plain`` (``score``/``fit`` also to ``conditioner``); where ``plain_control`` is timed, plain
sampling's time is the minimum over the calls of both names (the same computation, twice the calls), and the
ratios to ``plain`` alone are kept beside (``ratio_plain_only``). On the CPU the headline clock is the
process CPU time (user + system) on ``--threads`` threads (other jobs on a shared machine disturb it far less than
wall time); wall and user time and the minor page faults of every call are recorded beside it. At real sizes about
a fifth of the CPU time is system time: page faults of fresh allocations (every tensor above glibc's 32 MiB mmap
threshold is a new mapping), whose count varies from call to call by up to a third, for every variant alike; hence
the minimum over interleaved repeats, with the ratio of medians beside it. Peak memory: each (size, variant) runs
once more in a fresh child process that warms up on a tiny input, resets its peak (``/proc/self/clear_refs``), runs
the call and reads ``VmHWM`` (``peak_mb``: the whole process, weights and libraries included; ``increment_mb``:
above the resident set before the call). On CUDA (``benchmarks/gpu_check.py`` calls :func:`run` with
``device="cuda"``) times are CUDA-synchronised wall times, memory is ``torch.cuda.max_memory_allocated`` in the same
process, and images per second are added.

Targets: trace / plain <= 1.05, trace_compact and safe <= 1.03, traced peak memory <= 1.2 x plain.

``python benchmarks/realsize_bench.py`` (quick: 4X at 64x64 and 120x68, a few minutes; writes
``benchmarks/results/realsize_quick.json``); ``--full`` runs the table of ``FULL_PLAN`` (4X at 64x64, 120x68,
240x136 and 480x270, 8X at 64x64, peak memory of 4 samples per image; about 25 minutes on 2 CPU cores; at 480x270
one call each of plain and traced sampling, in the fresh processes of their memory measurement) and writes
``benchmarks/results/realsize.json``; ``--profile`` adds a torch-profiler
breakdown of plain vs traced sampling (4X 240x136 with ``--full``, 480x270 with ``--quiet-plan``).

``--cpu-memory reuse`` (the default, as the commands) or ``system`` sets :mod:`robustness_diag.allocator`'s mode in
the timed process and its children (results before that option existed ran under the C library's default, which is
``system``). ``--plan modes`` measures what the mode does: plain and traced sampling at 240x136 and 480x270 under
each mode, one fresh process of two calls per cell (``benchmarks/results/realsize_modes.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                     # tests/synth.py (the checkpoint builder) lives in the checkout
    sys.path.insert(0, str(ROOT))

import robustness_diag as rd  # noqa: E402
from robustness_diag.detect.safe import guard  # noqa: E402
from robustness_diag.io import atomic_write_json  # noqa: E402

TARGETS = {"trace": 1.05, "trace_compact": 1.03, "safe": 1.03, "memory_trace": 1.2}
ARCHS = {"4x": "SRFlow_DF2K_4X", "8x": "SRFlow_DF2K_8X"}
#: parameter counts of the original files (tests/test_synth.py, from their manifests)
OFFICIAL_PARAMS = {"SRFlow_DF2K_4X": 39_541_811, "SRFlow_DF2K_8X": 50_821_891}
PHOTO = "china"
SAMPLING = ("plain", "trace", "trace_compact", "safe")
#: plain sampling once more under another name: its ratio to ``plain`` is the measurement's own noise
CONTROL = ("plain_control",)
#: the safe-sampling guard alone, timed on a plain sample's image
GUARD = ("guard",)
OOD = ("conditioner", "score", "fit")
VARIANTS = SAMPLING + OOD
#: Rows ``(arch, (W, H) LR, timing repeats, variants timed, variants whose peak memory is measured, samples per
#: image)``. ``repeats == 0``: no in-process timing; the times come from the memory children (one call each, in a
#: fresh process), used for the largest size, where one call takes minutes on 2 CPU cores.
FULL_PLAN = [
    ("4x", (64, 64), 5, SAMPLING + CONTROL + GUARD + OOD, VARIANTS, 1),
    ("4x", (120, 68), 3, SAMPLING + CONTROL + GUARD, (), 1),
    ("4x", (240, 136), 3, SAMPLING + CONTROL + GUARD + OOD, SAMPLING, 1),
    ("4x", (480, 270), 0, ("plain", "trace"), ("plain", "trace"), 1),
    ("8x", (64, 64), 2, SAMPLING + CONTROL + GUARD, ("plain", "trace"), 1),
    ("4x", (64, 64), 0, (), ("plain", "trace", "trace_compact"), 4),
]
#: CUDA (benchmarks/gpu_check.py): every size of the CPU table, the 8X architecture up to 240x136, 4 samples per
#: image at 240x136; 5 repeats
GPU_PLAN = [(arch, size, 5, SAMPLING + CONTROL + GUARD + (OOD if n == 1 else ()), VARIANTS if n == 1 else SAMPLING, n)
            for arch, size, n in (("4x", (64, 64), 1), ("4x", (120, 68), 1), ("4x", (240, 136), 1),
                                  ("4x", (480, 270), 1), ("8x", (64, 64), 1), ("8x", (120, 68), 1),
                                  ("8x", (240, 136), 1), ("4x", (240, 136), 4))]
#: CPU rows up to this many LR pixels get one untimed warm-up round (larger ones: the minimum over repeats; CUDA rows
#: always get one)
WARMUP_MAX_PIXELS = 120 * 68
#: The acceptance sizes again, timed only (memory comes from the full table), with more rounds: for a run on an
#: otherwise idle machine (``--quiet-plan``), where the full table shared the cores with other jobs
QUIET_PLAN = [
    ("4x", (240, 136), 5, SAMPLING + CONTROL + GUARD, (), 1),
    ("4x", (480, 270), 2, ("plain", "trace", "plain_control"), (), 1),
]
#: The largest size alone, 4 more rounds on an idle machine (``--plan quiet480``): one call takes about 2 minutes
#: and plain sampling's own calls vary by up to 15% there, so 2 rounds do not settle the ratio
QUIET480_PLAN = [("4x", (480, 270), 4, ("plain", "trace", "plain_control"), (), 1)]
QUICK_PLAN = [
    ("4x", (64, 64), 3, SAMPLING + CONTROL + GUARD + OOD, ("plain", "trace", "trace_compact", "safe"), 1),
    ("4x", (120, 68), 2, SAMPLING + CONTROL + GUARD, ("plain", "trace"), 1),
]


# -- checkpoints and inputs -------------------------------------------------------------------------------------------
def build_checkpoint(arch: str, work: Path, seed: int = 0) -> Path:
    """The synthetic official-architecture checkpoint of ``arch`` ("4x"/"8x") as ``.safetensors`` in ``work`` (built
    once, reused afterwards). Layout from ``tests/synth.py``, loaded from ``.pth`` with ``rd.load_flow``, weights by
    ``randomize_flow(seed)``."""
    from robustness_diag.flows.synthetic import randomize_flow
    from tests.synth import build_state_dict, read_manifest, write_variant

    name = ARCHS[arch]
    out = work / f"{name}_random{seed}.safetensors"
    if out.exists():
        return out
    work.mkdir(parents=True, exist_ok=True)
    pth = write_variant(build_state_dict(read_manifest(name), seed=seed), work / f"{name}.pth", "raw")
    flow = rd.load_flow(pth)
    n = sum(p.numel() for p in flow.state_dict().values())
    if n != OFFICIAL_PARAMS[name]:
        raise RuntimeError(f"{name}: {n} parameters, the original file has {OFFICIAL_PARAMS[name]}")
    randomize_flow(flow, seed=seed)
    rd.save_flow(flow, out, provenance={"architecture": name, "weights": f"randomize_flow(seed={seed})",
                                        "layout": "tests/synth.py manifest of the original file"})
    pth.unlink()
    return out


def photo_lr(size: tuple[int, int]) -> torch.Tensor:
    """The centred ``W x H`` LR crop (1, 3, H, W) of the benchmark photo."""
    from robustness_diag.data.photos import load_photo
    p = load_photo(PHOTO)
    w, h = size
    y, x = (p.shape[1] - h) // 2, (p.shape[2] - w) // 2
    return p[None, :, y:y + h, x:x + w].contiguous()


def fit_scorer(flow, work: Path, tag: str) -> Path:
    """OOD statistics of ``flow`` from 4 crops (64 px) of another photo, saved to ``work``; reused when present."""
    path = work / f"stats_{tag}.safetensors"
    if not path.exists():
        from robustness_diag.data.photos import load_photo
        p = load_photo("chelsea")
        crops = [p[None, :, y:y + 64, x:x + 64] for y in (20, 150) for x in (40, 300)]
        rd.ood.fit_flow(flow, crops, calibration_fraction=0.0).save(path)
    return path


def variants(flow, lr: torch.Tensor, heat: float, seed: int, scorer=None, n_samples: int = 1) -> dict:
    """Name -> zero-argument callable for every variant (each with its own seeded CPU generator); ``n_samples`` per
    image (plain sampling: the LR repeated, one batch)."""
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731  (CPU generator: same latents on any device)
    n = n_samples
    lr_rep = lr.repeat(n, 1, 1, 1) if n > 1 else lr

    def plain():
        with torch.no_grad():
            return flow.sample(lr_rep, heat, gen())

    def conditioner():
        with torch.no_grad():
            return flow.features(lr)

    fns = {"plain": plain,
           "trace": lambda: rd.detect.trace_sampling(flow, lr, heat, n, gen()),
           "trace_compact": lambda: rd.detect.trace_sampling(flow, lr, heat, n, gen(), keep_layer_maps=False,
                                                             return_image=False),
           "safe": lambda: rd.detect.safe_sample(flow, lr, heat, n, gen()),
           "plain_control": plain,
           "conditioner": conditioner}
    if scorer is not None:
        ex = rd.ood.extractor_for(flow, scorer)
        level = ex.levels[0]

        def score():
            maps = ex.distance_maps(lr, scorer)
            return rd.ood.aggregate(maps[level], scorer.threshold(level))

        def fit():
            accs = rd.ood.make_accumulators(ex)
            rd.ood.accumulate(ex, accs, lr)
            return accs

        fns.update(score=score, fit=fit)
    return fns


# -- timing -----------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _usage() -> tuple:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime, u.ru_stime, u.ru_minflt


def timed_call(fn, device: torch.device) -> dict:
    """One call: wall, process CPU (user + system), user seconds and minor page faults."""
    _sync(device)
    u0, t = _usage(), time.perf_counter()
    fn()
    _sync(device)
    wall, u1 = time.perf_counter() - t, _usage()
    return {"wall": wall, "cpu": (u1[0] - u0[0]) + (u1[1] - u0[1]), "user": u1[0] - u0[0], "faults": u1[2] - u0[2]}


def time_interleaved(fns: dict, repeats: int, device: torch.device, warmup: int = 0) -> dict:
    """:func:`timed_call` of every callable, ``repeats`` rounds in rotating order after ``warmup`` untimed rounds.
    Returns ``{clock: {name: [values]}}`` for the clocks wall, cpu, user and the minor page faults."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out = {c: {n: [] for n in names} for c in ("wall", "cpu", "user", "faults")}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            for c, v in timed_call(fns[n], device).items():
                out[c][n].append(v)
    return out


def ratios(best: dict) -> dict:
    """Variant / plain for the sampling variants; score and fit also / conditioner; conditioner / plain."""
    out = {n: best[n] / best["plain"] for n in best if n != "plain" and "plain" in best}
    for n in ("score", "fit"):
        if n in best and "conditioner" in best:
            out[f"{n}_to_conditioner"] = best[n] / best["conditioner"]
    return out


# -- peak memory ------------------------------------------------------------------------------------------------------
def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def _child(spec: dict) -> dict:
    """Runs one variant ``spec["calls"]`` times (default 1) in this (fresh) process under ``spec["cpu_memory"]``
    (:mod:`robustness_diag.allocator`; default "system") and measures its peak resident memory over the calls and the
    time of each (``seconds``: the last call's, ``calls``: every call's)."""
    torch.set_num_threads(spec["threads"])
    rd.allocator.use(spec.get("cpu_memory", "system"))
    flow = rd.load_flow(spec["ckpt"]).eval()
    scorer = rd.ood.MahalanobisScorer.load(spec["stats"]) if spec.get("stats") else None
    n = spec.get("n_samples", 1)
    tiny = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    variants(flow, tiny, spec["heat"], spec["seed"], scorer, n)[spec["variant"]]()    # libraries and caches warm
    fn = variants(flow, photo_lr(tuple(spec["lr"])), spec["heat"], spec["seed"], scorer, n)[spec["variant"]]
    try:
        Path("/proc/self/clear_refs").write_text("5")                              # VmHWM := VmRSS
        reset = True
    except OSError:
        reset = False
    before = _status_mb("VmRSS")
    calls = [timed_call(fn, torch.device("cpu")) for _ in range(int(spec.get("calls", 1)))]
    peak = _status_mb("VmHWM")
    return {"peak_mb": peak, "rss_before_mb": before, "increment_mb": peak - before, "hwm_reset": reset,
            "seconds": calls[-1], "calls": calls, "cpu_memory": rd.allocator.current_mode()}


def peak_memory(ckpt: Path, stats: Optional[Path], size, variant: str, threads: int, heat: float,
                seed: int, n_samples: int = 1, cpu_memory: str = "system", calls: int = 1) -> dict:
    """:func:`_child` in a fresh interpreter (CPU)."""
    spec = {"ckpt": str(ckpt), "stats": str(stats) if stats else None, "lr": list(size), "variant": variant,
            "threads": threads, "heat": heat, "seed": seed, "n_samples": n_samples, "cpu_memory": cpu_memory,
            "calls": calls}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {variant} {size} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cuda_peak(fn, device: torch.device) -> float:
    """Peak CUDA memory allocated by one call, MB (above what was allocated before it)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2 ** 20


# -- profile ----------------------------------------------------------------------------------------------------------
def profile(fns: dict, names=("plain", "trace", "trace_compact"), top: int = 12) -> dict:
    """Self CPU time per op (torch profiler, one call each after the timing rounds), grouped; seconds."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    groups = {"convolution": ("conv", "mkldnn"), "cat": ("aten::cat",),
              "reductions (amax/sum/abs)": ("aten::amax", "aten::sum", "aten::abs", "aten::max", "aten::maximum"),
              "copies": ("aten::copy_", "aten::clone", "aten::stack", "aten::contiguous")}
    out = {}
    for n in names:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fns[n]()
        ev = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
        total = sum(t for _, t, _ in ev)
        grouped = {g: sum(t for k, t, _ in ev if any(m in k for m in marks)) for g, marks in groups.items()}
        grouped["other"] = total - sum(grouped.values())
        ev.sort(key=lambda e: -e[1])
        out[n] = {"total_s": total, "groups_s": grouped,
                  "top_ops": [{"op": k, "self_s": t, "calls": c} for k, t, c in ev[:top]]}
    if "plain" in out:
        base = out["plain"]["groups_s"]
        for n in names:
            if n != "plain":
                out[n]["extra_over_plain_s"] = {g: out[n]["groups_s"][g] - base[g] for g in base}
    return out


# -- the run ----------------------------------------------------------------------------------------------------------
def machine(device: torch.device, threads: int) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": threads}
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        info["cpu"] = cpu.group(1).strip() if cpu else platform.processor()
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def summarise(times: dict) -> dict:
    """Per clock: minimum and median per variant and their ratios (:func:`ratios`).

    With ``plain_control`` timed, the ratios' denominator is plain sampling's minimum (median) over the calls of
    both names, which are the same computation; ``control_ratio`` is plain_control / plain from their separate
    minima (the measurement's noise) and ``ratio_plain_only`` the ratios to ``plain`` alone."""
    out = {}
    for c, per in times.items():
        if c == "faults" or not per:
            continue
        best = {n: min(v) for n, v in per.items() if v}
        med = {n: statistics.median(v) for n, v in per.items() if v}
        rec = {"min_s": best, "median_s": med, "ratio": ratios(best), "ratio_of_medians": ratios(med)}
        if per.get("plain_control") and per.get("plain"):
            both = per["plain"] + per["plain_control"]
            pooled = {n: v for n, v in best.items() if n != "plain_control"}
            pooled_med = {n: v for n, v in med.items() if n != "plain_control"}
            pooled["plain"], pooled_med["plain"] = min(both), statistics.median(both)
            rec.update(ratio_plain_only=rec["ratio"], ratio=ratios(pooled), ratio_of_medians=ratios(pooled_med),
                       control_ratio=best["plain_control"] / best["plain"],
                       plain_calls_pooled=len(both))
        out[c] = rec
    if times.get("faults"):
        out["minor_faults_median"] = {n: statistics.median(v) for n, v in times["faults"].items() if v}
    return out


def judge(row: dict, clock: str, device_type: str) -> None:
    """Fills ``row``'s ratio, images per second and ``target_met`` from its summary (:func:`summarise`)."""
    r = row["ratio"] = row[clock]["ratio"]
    if device_type == "cuda":
        row["images_per_s"] = {n: row["n_samples"] / v for n, v in row["wall"]["min_s"].items()}
    row["target_met"] = {k: r[k] <= TARGETS[k] for k in ("trace", "trace_compact", "safe") if k in r}
    if "guard" in r:
        row["safe_by_parts"] = 1.0 + r["guard"]
        row["target_met"]["safe_by_parts"] = row["safe_by_parts"] <= TARGETS["safe"]
    if row.get("clean_artifact_fraction") and "safe" in r:         # the guard repaired pixels: not clean
        row["target_met"].pop("safe")
        row["target_met"].pop("safe_by_parts", None)
        row["safe_note"] = ("the plain sample has artifact pixels on this input, so safe_sample ran its repair "
                            "path: its ratio is the repair's cost, not the clean-input guard's (safe_by_parts is "
                            "the guard's cost on clean inputs)")
    if "memory_ratio" in row and "trace" in row["memory_ratio"]:
        row["target_met"]["memory_trace"] = row["memory_ratio"]["trace"] <= TARGETS["memory_trace"]


def resummarise(result: dict) -> dict:
    """Recomputes every row's summary, ratios and targets from the times it stores (after a change to how they
    are summarised; the measurements are not repeated)."""
    clock = result["headline_clock"]
    device_type = "cuda" if str(result["machine"]["device"]).startswith("cuda") else "cpu"
    for row in result["rows"]:
        if "times" in row:
            row.update(summarise(row["times"]))
            judge(row, clock, device_type)
        elif "memory_ratio" in row and "trace" in row["memory_ratio"]:
            row.setdefault("target_met", {})["memory_trace"] = row["memory_ratio"]["trace"] <= TARGETS["memory_trace"]
    result["target_met"] = all(all(r.get("target_met", {}).values()) for r in result["rows"])
    return result


def run(plan=QUICK_PLAN, device: str = "cpu", threads: int = 1, heat: float = 0.9, seed: int = 1,
        work: Optional[Path] = None, memory: bool = True, do_profile: Optional[tuple] = None, log=print,
        cpu_memory: str = "reuse") -> dict:
    """Runs ``plan`` (rows of :data:`FULL_PLAN`'s form); returns the JSON-ready result. ``do_profile``: ``(arch,
    (W, H))`` to profile with the torch profiler, or None. ``cpu_memory``: :func:`robustness_diag.allocator.use`'s
    mode in this process and the memory children ("reuse": what the commands do by default)."""
    if device == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    rd.allocator.use(cpu_memory)
    dev = torch.device(device)
    threads = torch.get_num_threads()
    work = Path(work or Path(tempfile.gettempdir()) / "robustness_diag_realsize")
    clock = "cpu" if dev.type == "cpu" else "wall"
    result = {"benchmark": "detection at real size: time(variant) / time(plain flow.sample), official SRFlow-DF2K "
                           "architectures, synthetic weights",
              "targets": TARGETS, "headline_clock": clock, "machine": machine(dev, threads), "heat": heat,
              "batch": 1, "photo": PHOTO,
              "timing": "interleaved rotating order in one process, ratio of the minima over repeats (medians "
                        f"beside them); one untimed warm-up round on CUDA and for CPU sizes up to "
                        f"{WARMUP_MAX_PIXELS} LR pixels; rows with repeats 0: one call per variant, each in the "
                        "fresh process of its memory measurement",
              "clocks": "cpu = user + system time of the process (system time is mostly page faults of fresh "
                        "allocations), user, wall; faults = minor page faults per call",
              "memory": ("fresh child process per (size, variant): warm-up on a 16x16 input, VmHWM reset through "
                         "/proc/self/clear_refs, one call; peak_mb = process peak (weights and libraries "
                         "included), increment_mb = peak - resident set before the call") if dev.type == "cpu"
              else "torch.cuda.max_memory_allocated during one call, above what was allocated before it",
              "cpu_memory": rd.allocator.current_mode(), "checkpoints": {}, "rows": []}
    started = time.time()
    flows = {}
    for arch, size, repeats, timed, mem_variants, n_samples in plan:
        if arch not in flows:
            t = time.time()
            ckpt = build_checkpoint(arch, work)
            flow = rd.load_flow(ckpt).eval()
            stats = fit_scorer(flow, work, ckpt.stem)
            flows[arch] = (ckpt, flow.to(dev), stats, rd.ood.MahalanobisScorer.load(stats, map_location=dev))
            result["checkpoints"][arch] = {
                "architecture": ARCHS[arch], "parameters": sum(p.numel() for p in flow.state_dict().values()),
                "config": {k: flow.config.to_dict()[k] for k in ("scale", "L", "K", "nb", "nf", "blocks")},
                "weights": "tests/synth.py layout of the original file, loaded from .pth; randomize_flow(seed=0)",
                "build_or_load_s": time.time() - t}
        ckpt, flow, stats, scorer = flows[arch]
        lr = photo_lr(size).to(dev)
        fns = variants(flow, lr, heat, seed, scorer, n_samples)
        row = {"arch": arch, "lr_wh": list(size), "hr_wh": [size[0] * flow.scale, size[1] * flow.scale],
               "n_samples": n_samples, "repeats": repeats}
        if timed:
            with torch.no_grad():
                image = fns["plain"]()
            row["clean_artifact_fraction"] = float(rd.detect.artifact_masks(image)[0].float().mean())
            if "guard" in timed:
                fns["guard"] = lambda image=image: guard(image)
            else:
                del image
        times = None
        if repeats > 0 and timed:
            warmup = 1 if dev.type == "cuda" or size[0] * size[1] <= WARMUP_MAX_PIXELS else 0
            log(f"{arch} {size[0]}x{size[1]} x{n_samples}: timing {', '.join(timed)}, {repeats} rounds "
                f"(+{warmup} warm-up)", flush=True)
            times = time_interleaved({k: fns[k] for k in timed}, repeats, dev, warmup)
            row["warmup_rounds"] = warmup
        if memory and mem_variants:
            mem = {}
            for n in mem_variants:
                if dev.type == "cuda":
                    mem[n] = {"peak_mb": cuda_peak(fns[n], dev)}
                else:
                    mem[n] = peak_memory(ckpt, stats, size, n, threads, heat, seed, n_samples, cpu_memory)
                log(f"  {arch} {size[0]}x{size[1]} x{n_samples} memory {n}: {mem[n]['peak_mb']:.0f} MB", flush=True)
            row["memory"] = mem
            if "plain" in mem:
                row["memory_ratio"] = {n: mem[n]["peak_mb"] / mem["plain"]["peak_mb"] for n in mem if n != "plain"}
                base = mem["plain"].get("increment_mb", 0.0)
                if base > 0:
                    row["memory_increment_ratio"] = {n: mem[n]["increment_mb"] / base for n in mem if n != "plain"}
            if times is None and timed and dev.type == "cpu":      # timing from the children
                times = {c: {n: [mem[n]["seconds"][c]] for n in timed if n in mem}
                         for c in ("wall", "cpu", "user", "faults")}
                row["timing_source"] = "memory children: one call per variant, each in a fresh process"
        if times is not None:
            row["times"] = times
            row.update(summarise(times))
            judge(row, clock, dev.type)
            log(f"  {clock}: plain {row[clock]['min_s']['plain']:.2f} s; " + ", ".join(
                f"{k} x{v:.3f}" for k, v in row["ratio"].items()), flush=True)
        elif "memory_ratio" in row and "trace" in row["memory_ratio"]:
            row.setdefault("target_met", {})["memory_trace"] = row["memory_ratio"]["trace"] <= TARGETS["memory_trace"]
        result["rows"].append(row)
        if do_profile and tuple(do_profile) == (arch, tuple(size)) and n_samples == 1 and "profile" not in result:
            result["profile"] = {"arch": arch, "lr_wh": list(size),
                                 **profile({k: fns[k] for k in ("plain", "trace")}, names=("plain", "trace"))}
    result["elapsed_s"] = time.time() - started
    result["target_met"] = all(all(r.get("target_met", {}).values()) for r in result["rows"])
    return result


#: ``--plan modes``: plain and traced sampling under each CPU memory mode, in fresh processes of two calls each
MODES_PLAN = {"arch": "4x", "sizes": [(240, 136), (480, 270)], "variants": ("plain", "trace"), "calls": 2}


def memory_modes(plan=MODES_PLAN, threads: int = 1, heat: float = 0.9, seed: int = 1, work: Optional[Path] = None,
                 log=print) -> dict:
    """What the CPU memory mode (:mod:`robustness_diag.allocator`) does to sampling at real size.

    Per size, variant and mode one fresh process runs ``calls`` calls (a folder's first image and the next ones:
    "reuse" only helps from the second call on, and within a call between layers); their order alternates between
    the modes. Returns per size the CPU time (user + system), system time, minor page faults and peak memory of every
    call, ``speedup`` (system / reuse CPU time of the last call, per variant), ``trace_ratio`` (trace / plain per
    mode, last call) and ``memory_ratio`` (reuse / system peak, per variant)."""
    work = Path(work or Path(tempfile.gettempdir()) / "robustness_diag_realsize")
    ckpt = build_checkpoint(plan["arch"], work)
    started, rows = time.time(), []
    for size in plan["sizes"]:
        runs = {m: {} for m in rd.allocator.MODES}
        for i, variant in enumerate(plan["variants"]):
            for mode in (rd.allocator.MODES if i % 2 == 0 else rd.allocator.MODES[::-1]):
                r = peak_memory(ckpt, None, size, variant, threads, heat, seed, 1, mode, plan["calls"])
                runs[mode][variant] = {"calls": r["calls"], "peak_mb": r["peak_mb"], "increment_mb": r["increment_mb"],
                                       "applied": r["cpu_memory"]}
                log(f"{plan['arch']} {size[0]}x{size[1]} {variant} {mode}: cpu " + ", ".join(
                    f"{c['cpu']:.1f} s (sys {c['cpu'] - c['user']:.1f}, {c['faults']} faults)" for c in r["calls"])
                    + f"; peak {r['peak_mb']:.0f} MB", flush=True)
        last = {m: {v: runs[m][v]["calls"][-1]["cpu"] for v in runs[m]} for m in runs}
        rows.append({"arch": plan["arch"], "lr_wh": list(size), "runs": runs,
                     "speedup": {v: last["system"][v] / last["reuse"][v] for v in plan["variants"]},
                     "trace_ratio": {m: last[m]["trace"] / last[m]["plain"] for m in last},
                     "memory_ratio": {v: runs["reuse"][v]["peak_mb"] / runs["system"][v]["peak_mb"]
                                      for v in plan["variants"]}})
    return {"benchmark": "CPU memory modes (robustness_diag.allocator) at real size: official SRFlow-DF2K 4X "
                         "architecture, synthetic weights",
            "method": f"one fresh process per (size, variant, mode), {plan['calls']} calls each after a 16x16 "
                      "warm-up, modes alternating in order; clock: process CPU time (user + system) of the last "
                      "call; peak memory: VmHWM over the calls (reset after the warm-up)",
            "machine": machine(torch.device("cpu"), threads), "heat": heat, "photo": PHOTO, "rows": rows,
            "elapsed_s": time.time() - started}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the whole table (FULL_PLAN) instead of the quick one")
    p.add_argument("--plan", choices=("quick", "full", "quiet", "quiet480", "modes"), default=None,
                   help="the plan by name (quiet480: 4X at 480x270 alone, 4 rounds, timing only; writes "
                        "realsize_quiet480.json; modes: plain and traced sampling under each --cpu-memory mode, "
                        "writes realsize_modes.json); --full and --quiet-plan are shorthands")
    p.add_argument("--cpu-memory", choices=rd.allocator.MODES, default="reuse",
                   help="the CPU memory mode of the timed process and its children (default reuse: the commands' "
                        "default; system: the C library's behaviour, as the Python API leaves it)")
    p.add_argument("--quiet-plan", action="store_true",
                   help="QUIET_PLAN: 4X at 240x136 (5 rounds) and 480x270 (2 rounds), timing only, for an idle "
                        "machine (writes realsize_quiet.json; about 20 minutes on one core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--profile", action="store_true", help="torch-profiler breakdown at 4X 240x136 (quick: 64x64)")
    p.add_argument("--work", default=None, help="folder for the built checkpoints (default: a temp folder)")
    p.add_argument("--out", default=None)
    p.add_argument("--resummarise", metavar="JSON", default=None,
                   help="recompute the summaries, ratios and targets of an earlier result from its stored times")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(json.loads(a.child))))
        return 0
    if a.resummarise:
        res = resummarise(json.loads(Path(a.resummarise).read_text()))
        atomic_write_json(a.resummarise, res, indent=1)
        print(f"rewrote {a.resummarise}; targets {'met' if res['target_met'] else 'MISSED'}")
        return 0
    name = a.plan or ("quiet" if a.quiet_plan else "full" if a.full else "quick")
    if name == "modes":
        res = memory_modes(threads=a.threads, work=a.work)
        out = Path(a.out or ROOT / "benchmarks" / "results" / "realsize_modes.json")
        atomic_write_json(out, res, indent=1)
        print(f"wrote {out} ({res['elapsed_s'] / 60:.1f} min)")
        return 0
    plan = {"quiet": QUIET_PLAN, "quiet480": QUIET480_PLAN, "full": FULL_PLAN, "quick": QUICK_PLAN}[name]
    prof = ({"quiet": ("4x", (480, 270)), "full": ("4x", (240, 136))}.get(name, ("4x", (64, 64)))
            if a.profile else None)
    res = run(plan, a.device, a.threads, memory=not a.no_memory, do_profile=prof, work=a.work,
              cpu_memory=a.cpu_memory)
    res["plan"] = name
    out = Path(a.out or ROOT / "benchmarks" / "results" / ("realsize.json" if name == "full" else
                                                           f"realsize_{name}.json"))
    atomic_write_json(out, res, indent=1)
    print(f"wrote {out} ({res['elapsed_s'] / 60:.1f} min); targets {'met' if res['target_met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
