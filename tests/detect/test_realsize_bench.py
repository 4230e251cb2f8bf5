"""benchmarks/realsize_bench.py on a tiny flow: every variant runs, ratios and memory rows are well formed."""
from __future__ import annotations

import pytest
import torch

import robustness_diag as rd
from tests.detect.helpers import load_benchmark, tiny_flow

@pytest.fixture(scope="module")
def bench():
    yield load_benchmark("realsize_bench")
    rd.allocator.system_defaults()                  # run() applies --cpu-memory to this process


def test_plans_cover_the_issue_sizes(bench):
    sizes = {(arch, size) for arch, size, *_ in bench.FULL_PLAN}
    assert {("4x", (64, 64)), ("4x", (240, 136)), ("4x", (480, 270)), ("8x", (64, 64))} <= sizes
    plans = bench.FULL_PLAN + bench.QUICK_PLAN + bench.GPU_PLAN + bench.QUIET_PLAN + bench.QUIET480_PLAN
    for _, _, repeats, timed, mem, n in plans:
        assert set(mem) <= set(bench.VARIANTS) and n >= 1 and (not timed or "plain" in timed)
        assert (not mem or "plain" in mem) and (repeats > 0 or set(timed) <= set(mem))


def test_run_on_a_tiny_flow(bench, tmp_path, monkeypatch):
    """The whole pipeline (variants, interleaved timing, child-process peak memory, ratios, timing from the
    children, several samples per image) on a tiny 4X flow."""
    ckpt = rd.save_flow(tiny_flow("affine"), tmp_path / "tiny.safetensors")
    monkeypatch.setattr(bench, "build_checkpoint", lambda arch, work, seed=0: ckpt)
    lines = []
    plan = [("4x", (8, 8), 2, bench.VARIANTS + bench.GUARD, ("plain", "trace"), 1),
            ("4x", (8, 8), 0, ("plain", "safe"), ("plain", "safe"), 1),
            ("4x", (8, 8), 0, (), ("plain", "trace_compact"), 3)]
    res = bench.run(plan, work=tmp_path, do_profile=("4x", (8, 8)), log=lambda *a, **k: lines.append(a))
    row, children, samples = res["rows"]
    assert row["hr_wh"] == [32, 32] and row["clean_artifact_fraction"] >= 0.0
    assert set(row["cpu"]["min_s"]) == set(bench.VARIANTS + bench.GUARD) and len(row["times"]["faults"]["plain"]) == 2
    assert row["safe_by_parts"] == 1.0 + row["ratio"]["guard"] and "safe_by_parts" in row["target_met"]
    assert set(row["ratio"]) >= {"trace", "trace_compact", "safe", "conditioner", "score_to_conditioner"}
    assert all(v > 0 for v in row["ratio"].values())
    mem = row["memory"]
    assert set(mem) == {"plain", "trace"} and all(m["peak_mb"] > m["increment_mb"] >= 0 for m in mem.values())
    assert row["memory_ratio"]["trace"] > 0 and "memory_trace" in row["target_met"]
    assert children["timing_source"].startswith("memory children") and set(children["ratio"]) == {"safe"}
    assert samples["n_samples"] == 3 and "ratio" not in samples and set(samples["memory"]) == {"plain",
                                                                                               "trace_compact"}
    assert set(res["profile"]["trace"]["groups_s"]) >= {"convolution", "other"}
    assert res["checkpoints"]["4x"]["parameters"] == sum(p.numel() for p in tiny_flow().state_dict().values())


def test_photo_crops_have_the_asked_size(bench):
    lr = bench.photo_lr((480, 270))
    assert lr.shape == (1, 3, 270, 480) and 0 <= float(lr.min()) and float(lr.max()) <= 1
    assert torch.equal(bench.photo_lr((64, 64)), bench.photo_lr((64, 64)))


def test_plain_time_pools_both_names_and_resummarise_is_idempotent(bench):
    """The ratios' denominator is the fastest plain call under either name; the control ratio keeps the noise
    visible; a stored result re-summarised from its times gives the same figures."""
    times = {"cpu": {"plain": [10.0, 12.0], "plain_control": [9.0, 11.0], "trace": [9.5, 9.9], "guard": [0.01, 0.02],
                     "safe": [9.4, 9.3]}}
    out = bench.summarise(times)["cpu"]
    assert out["ratio"]["trace"] == 9.5 / 9.0 and out["ratio_plain_only"]["trace"] == 9.5 / 10.0
    assert out["control_ratio"] == 0.9 and "plain_control" not in out["ratio"] and out["plain_calls_pooled"] == 4
    row = {"n_samples": 1, "times": times, "clean_artifact_fraction": 0.0}
    row.update(bench.summarise(times))
    bench.judge(row, "cpu", "cpu")
    assert row["target_met"] == {"trace": False, "safe": False, "safe_by_parts": True}
    res = {"headline_clock": "cpu", "machine": {"device": "cpu"}, "rows": [dict(row)]}
    again = bench.resummarise(res)
    assert again["rows"][0]["ratio"] == row["ratio"] and again["target_met"] is False


def test_memory_modes_on_a_tiny_flow(bench, tmp_path, monkeypatch):
    """--plan modes: every (size, variant, mode) in its own process with two calls; the mode is applied there."""
    ckpt = rd.save_flow(tiny_flow("affine"), tmp_path / "tiny.safetensors")
    monkeypatch.setattr(bench, "build_checkpoint", lambda arch, work, seed=0: ckpt)
    plan = {"arch": "4x", "sizes": [(8, 8)], "variants": ("plain", "trace"), "calls": 2}
    res = bench.memory_modes(plan, work=tmp_path, log=lambda *a, **k: None)
    (row,) = res["rows"]
    for mode in ("system", "reuse"):
        for variant in ("plain", "trace"):
            r = row["runs"][mode][variant]
            assert len(r["calls"]) == 2 and r["applied"] == mode and r["peak_mb"] > 0
    last = row["runs"]["reuse"]["trace"]["calls"][-1]["cpu"] / row["runs"]["reuse"]["plain"]["calls"][-1]["cpu"]
    assert row["trace_ratio"]["reuse"] == last and set(row["speedup"]) == set(row["memory_ratio"]) == {"plain", "trace"}
