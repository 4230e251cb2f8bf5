"""The Ray engine against a real Ray instance: the same rows, files and statistics as the local engine, a worker
killed mid-run, resume, bad images, and the one-line errors (Ray missing, cluster unreachable).

One local Ray instance (2 CPUs) serves the whole module; the reference local runs use one torch thread, as the two
Ray workers do, so every number must be identical (the README's "Scaling out" section). The head-node test
(``ray start --head`` reached by address) is in ``test_ray_cluster.py``.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from robustness_diag.cli.main import main
from robustness_diag.data import degradations as deg
from robustness_diag.data.photos import TRAIN_PHOTOS, VALIDATION_PHOTOS, downscale, load_photo, random_crops
from tests.cli.helpers import save_png

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'robustness-diag[ray]')")

pytestmark = pytest.mark.ray
CKPT = "bundled:sr4x_affine"
RAY = ["--engine", "ray", "--ray-workers", "2", "--ray-threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def ray_instance():
    """A real local Ray instance with 2 CPUs for the module, stopped at its end (and one torch thread here, the
    workers' count, so local and Ray numbers are comparable bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from robustness_diag.analyses.ray_engine import LOCAL_SYSTEM_CONFIG
    token = Path.home() / ".ray" / "auth_token"      # Ray may write one for a local instance: leave home as found
    had_token = token.exists()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             object_store_memory=200 * 1024 * 1024, _system_config=LOCAL_SYSTEM_CONFIG)
    yield
    ray.shutdown()
    torch.set_num_threads(threads)
    if not had_token:
        token.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_instance):
    """Folders of LR images (clean and noisy photo crops, one broken file) and statistics fitted locally."""
    root = tmp_path_factory.mktemp("ray")
    fit_dir, lr_dir = root / "fit", root / "lr"
    fit_dir.mkdir()
    lr_dir.mkdir()
    hr = random_crops([load_photo(n) for n in TRAIN_PHOTOS], 6, 96, torch.Generator().manual_seed(1), augment=False)
    for i, x in enumerate(downscale(hr, 4)):
        save_png(x, fit_dir / f"t{i}.png")
    hr = random_crops([load_photo(n) for n in VALIDATION_PHOTOS], 5, 96, torch.Generator().manual_seed(0),
                      augment=False)
    lr = downscale(hr, 4)
    for i, x in enumerate(lr):
        save_png(x, lr_dir / f"clean{i}.png")
    for i, x in enumerate(deg.add_noise(lr, 2, torch.Generator().manual_seed(0))):
        save_png(x, lr_dir / f"noise{i}.png")
    (lr_dir / "broken.png").write_text("not an image")
    stats = root / "stats.safetensors"
    assert main(["fit", CKPT, "--images", str(fit_dir), "--out", str(stats), "--no-progress"]) == 0
    return {"root": root, "fit": fit_dir, "lr": lr_dir, "stats": stats}


def _rows(path) -> list:
    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


def _files(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "run.json" and p.suffix != ".csv"}


def _sample(data, out, *extra):
    return main(["sample", CKPT, "--images", str(data["lr"]), "--out", str(out), "--samples", "3", "--seed", "7",
                 *extra])


@pytest.fixture(scope="module")
def local_sample(data):
    out = data["root"] / "sample_local"
    assert _sample(data, out, "--save-maps", "--no-progress") == 1        # broken.png fails
    return out


def test_score_rows_and_maps_are_those_of_the_local_run(data):
    local, remote = data["root"] / "score_local", data["root"] / "score_ray"
    args = ["score", CKPT, "--stats", str(data["stats"]), "--images", str(data["lr"]), "--save-maps"]
    assert main([*args, "--out", str(local), "--no-progress"]) == 1
    assert main([*args, "--out", str(remote), *RAY]) == 1
    rows = _rows(remote / "scores.csv")
    assert rows == _rows(local / "scores.csv")                            # same rows, same order, same numbers
    bad = [r for r in rows if r["path"] == "broken.png"]
    assert bad and bad[0]["status"] == "error" and "not a recognised image file" in bad[0]["error"]
    assert _files(remote) == _files(local)                                # maps (.npy) and overlays, byte for byte
    info = json.loads((remote / "run.json").read_text())
    assert info["engine"]["kind"] == "ray" and len(info["engine"]["workers"]) == 2
    assert all(w["threads"] == 1 for w in info["engine"]["workers"])
    assert info["config"]["engine"]["kind"] == "ray"
    assert "engine" not in json.loads((local / "run.json").read_text())   # the local record is unchanged
    assert "engine" not in json.loads((local / "run.json").read_text())["config"]
    assert info["counts"] == json.loads((local / "run.json").read_text())["counts"]


def test_score_state_across_images_is_merged_in_input_order(data):
    """Tiles with a margin below the receptive field: the stitching error record that score keeps across images
    (worst image, counts) is the local one, merged from the workers' per-image records."""
    local, remote = data["root"] / "tiled_local", data["root"] / "tiled_ray"
    args = ["score", CKPT, "--stats", str(data["stats"]), "--images", str(data["lr"]), "--tile", "8", "--margin", "2"]
    assert main([*args, "--out", str(local), "--no-progress"]) == 1
    assert main([*args, "--out", str(remote), *RAY]) == 1
    assert _rows(remote / "scores.csv") == _rows(local / "scores.csv")
    got = json.loads((remote / "run.json").read_text())["scoring"]["stitching"]
    want = json.loads((local / "run.json").read_text())["scoring"]["stitching"]
    assert want["tiled_images"] == 10 and got == want


def test_sample_rows_and_maps_are_those_of_the_local_run(data, local_sample):
    remote = data["root"] / "sample_ray"
    assert _sample(data, remote, "--save-maps", *RAY) == 1
    for table in ("samples.csv", "sample_rows.csv"):
        assert _rows(remote / table) == _rows(local_sample / table), table
    assert (remote / "sample_rows.csv").read_bytes() == (local_sample / "sample_rows.csv").read_bytes()
    assert _files(remote) == _files(local_sample)                         # .npz masks and maps, PNG overlays
    nan_rows = [r for r in _rows(remote / "sample_rows.csv") if int(r["nan_pixels"]) > 0]
    assert nan_rows, "the noisy inputs should make the affine flow explode (NaN samples compared too)"


def test_fit_statistics_are_those_of_the_local_fit(data, tmp_path):
    from safetensors import safe_open
    remote = tmp_path / "ray.safetensors"
    assert main(["fit", CKPT, "--images", str(data["fit"]), "--out", str(remote), *RAY]) == 0

    def read(path):
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata().get("meta", "{}"))
    a, meta_a = read(data["stats"])
    b, meta_b = read(remote)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)   # bitwise: merged in input order
    for volatile in ("created", "fit_seconds"):
        meta_a.pop(volatile, None)
        meta_b.pop(volatile, None)
    assert meta_a == meta_b


def test_a_worker_killed_mid_run_loses_no_row(data, local_sample):
    """SIGKILL one of the two workers once the first row is written: its images are sent again to a new worker and
    the tables hold every image exactly once with the numbers of the uninterrupted (local) run."""
    out = data["root"] / "sample_killed"
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            try:
                info = json.loads((out / "run.json").read_text())
                started = len(_rows(out / "samples.csv")) >= 1
            except (OSError, ValueError):
                info, started = {}, False
            workers = (info.get("engine") or {}).get("workers") or []
            if started and workers:
                os.kill(workers[0]["pid"], signal.SIGKILL)
                killed.append(workers[0]["pid"])
            time.sleep(0.01)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    assert _sample(data, out, "--save-maps", *RAY) == 1
    t.join()
    assert killed, "the worker was not killed"
    info = json.loads((out / "run.json").read_text())
    assert info["engine"]["replaced_workers"] >= 1 and info["engine"]["lost_tasks"] >= 1
    assert info["engine"]["failed_tasks"] == 0
    for table in ("samples.csv", "sample_rows.csv"):
        rows = _rows(out / table)
        keys = [(r["path"], r.get("sample")) for r in rows]
        assert len(keys) == len(set(keys)), f"{table}: an image twice"
        assert rows == _rows(local_sample / table), table
    assert _files(out) == _files(local_sample)


def test_resume_on_ray_continues_a_partial_table(data, local_sample):
    out = data["root"] / "sample_resumed"
    assert _sample(data, out, "--include", "clean*", "--no-progress") == 0           # a first, local part
    assert _sample(data, out, "--resume", "--save-maps", *RAY) == 1                  # the rest on Ray
    info = json.loads((out / "run.json").read_text())
    assert info["counts"]["skipped_resumed"] == 5
    for table in ("samples.csv", "sample_rows.csv"):
        got = sorted(_rows(out / table), key=lambda r: (r["path"], r.get("sample", "")))
        want = sorted(_rows(local_sample / table), key=lambda r: (r["path"], r.get("sample", "")))
        assert got == want, table


def test_kept_workers_serve_the_next_run_and_end_when_idle(data):
    """--ray-keep-workers: a second run finds the first run's worker process (same pid, marked reused) and writes
    the same rows; the first run's own worker was new; once idle past the time, the worker process ends."""
    from robustness_diag.analyses.ray_engine import NAMESPACE
    args = ["score", CKPT, "--stats", str(data["stats"]), "--images", str(data["lr"]), "--engine", "ray",
            "--ray-workers", "1", "--ray-threads", "1", "--ray-keep-workers", "2", "--no-progress"]
    runs = []
    for tag in ("keep_a", "keep_b"):
        assert main([*args, "--out", str(data["root"] / tag)]) == 1          # 1: the broken file's row
        runs.append(json.loads((data["root"] / tag / "run.json").read_text())["engine"])
    (a,), (b,) = runs[0]["workers"], runs[1]["workers"]
    assert a["pid"] == b["pid"] and not a["reused"] and b["reused"] and runs[1]["keep_s"] == 2.0
    assert _rows(data["root"] / "keep_a" / "scores.csv") == _rows(data["root"] / "keep_b" / "scores.csv")
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            ray.get_actor("worker-cpu-1t-0", namespace=NAMESPACE)
        except ValueError:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the kept worker did not end after its idle time")


def test_ray_options_without_the_ray_engine_are_refused(data, capsys):
    assert main(["sample", CKPT, "--images", str(data["lr"]), "--out", str(data["root"] / "x"),
                 "--ray-workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ray-workers need(s) --engine ray" in err[0]


def test_without_ray_the_ray_engine_says_how_to_install_it(data, monkeypatch, capsys):
    from robustness_diag.analyses import engines
    monkeypatch.setattr(engines, "ray_installed", lambda: False)
    for cmd in (["score", CKPT, "--stats", str(data["stats"])], ["sample", CKPT], ["fit", CKPT]):
        out = data["root"] / "noray" / cmd[0]
        target = [str(out) + ".safetensors"] if cmd[0] == "fit" else [str(out)]
        assert main([*cmd, "--images", str(data["lr"]), "--out", *target, "--engine", "ray"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pip install 'robustness-diag[ray]'" in err[0], err


def test_an_unreachable_cluster_is_one_line_and_exit_code_2(data, tmp_path):
    import socket
    import subprocess
    import sys
    with socket.socket() as s:                  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "robustness_diag.cli.main", "score", CKPT, "--stats",
                           str(data["stats"]), "--images", str(data["lr"]), "--out", str(tmp_path / "s"), "--engine",
                           "ray", "--ray-address", f"127.0.0.1:{port}"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in lines[0], proc.stderr
    assert not (tmp_path / "s" / "scores.csv").exists()
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"            # the audit, with the address from the environment
    proc = subprocess.run([sys.executable, "-m", "robustness_diag.cli.main", "audit", "--out", str(tmp_path / "a"),
                           "--engine", "ray", "--no-progress"], capture_output=True, text=True, env=env, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "robustness-diag audit: cannot reach the Ray cluster" in \
        lines[0], proc.stderr
    assert not (tmp_path / "a" / "audit.json").exists()


def test_engine_record_and_planning(ray_instance):
    from robustness_diag.analyses.engines import EngineError, EngineOptions
    from robustness_diag.analyses.ray_engine import plan_workers, probe
    plan = plan_workers(EngineOptions("ray", threads=1), "auto", n_tasks=10)
    assert plan["workers"] == 2 and plan["device"] == "cpu" and plan["resources"] == {"num_cpus": 1}
    assert plan_workers(EngineOptions("ray", threads=2), "cpu")["workers"] == 1
    assert plan_workers(EngineOptions("ray", threads=1), "cpu", n_tasks=1)["workers"] == 1
    with pytest.raises(EngineError, match="room for 2"):
        plan_workers(EngineOptions("ray", workers=3, threads=1), "cpu")
    with pytest.raises(EngineError, match="no GPU"):
        plan_workers(EngineOptions("ray", threads=1), "cuda")
    with pytest.raises(EngineError, match="3 CPUs"):
        plan_workers(EngineOptions("ray", threads=3), "cpu")
    assert probe("auto") is None and probe("not an address") is None


def test_an_image_that_keeps_killing_its_worker_fails_alone(ray_instance):
    """A task whose worker dies every time is given up after MAX_ATTEMPTS (a Lost result: the image's failed row);
    the others complete, on replaced workers."""
    from robustness_diag.analyses.engines import EngineOptions
    from robustness_diag.analyses.ray_engine import MAX_ATTEMPTS, Lost, WorkerPool

    def build(*, files, device, workdir):
        return "context"

    def task(ctx, x):
        if x == "poison":
            os._exit(1)                                   # the worker process dies mid-task
        return {"value": (ctx, x)}

    pool = WorkerPool(build, (), {}, EngineOptions("ray", workers=2, threads=1), "cpu")
    try:
        out = dict(pool.run_ordered([(k, (k,)) for k in ("a", "poison", "b", "c")], task))
    finally:
        pool.close()
    assert isinstance(out["poison"], Lost) and out["poison"].attempts == MAX_ATTEMPTS
    assert [out[k]["value"] for k in "abc"] == [("context", k) for k in "abc"]
    assert pool.failed_tasks == 1 and pool.replaced >= MAX_ATTEMPTS


def test_a_worker_that_cannot_start_stops_the_run_with_its_reason(ray_instance):
    from robustness_diag.analyses.engines import EngineError, EngineOptions
    from robustness_diag.analyses.ray_engine import WorkerPool

    def broken(*, files, device, workdir):
        raise RuntimeError("robustness-diag is not installed on this node")

    pool = WorkerPool(broken, (), {}, EngineOptions("ray", workers=1, threads=1), "cpu")
    try:
        with pytest.raises(EngineError, match="could not start: RuntimeError: robustness-diag is not installed"):
            list(pool.run_ordered([("a", (1,))], lambda ctx, x: x))
    finally:
        pool.close()


def test_moment_log_replays_to_the_same_accumulator():
    """The fit's exactness in miniature: parts recorded by MomentLog and replayed in order give bitwise the moments
    of the direct updates."""
    from robustness_diag.analyses.ray_engine import MomentLog
    from robustness_diag.ood.gaussian import GaussianAccumulator
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 5, generator=g) * 3 + 1 for n in (7, 40, 1, 300)]
    direct, replay = GaussianAccumulator(5, chunk=32), GaussianAccumulator(5, chunk=32)
    for x in xs:
        direct.update(x)
        log = MomentLog(5)
        log.chunk = 32
        log.update(x)
        for part in log.take():
            replay.merge_moments(*part)
    for k in ("mean", "m2", "t3", "q4"):
        assert torch.equal(getattr(direct, k), getattr(replay, k)), k
    assert direct.n == replay.n == sum(len(x) for x in xs)
    snap = log.snapshot()
    log.update(xs[0])
    log.restore(snap)
    assert log.take() == [] and log.n == len(xs[-1])


def test_audit_stress_conditions_on_ray_give_the_same_results_and_verdicts(tmp_path, ray_instance):
    """The audit's stress conditions as parallel Ray tasks (two workers): every condition's row and arrays, the
    statistics and the verdicts are those of the local audit."""
    import numpy as np

    from robustness_diag.analyses import audit as A
    from robustness_diag.analyses.engines import EngineOptions
    from robustness_diag.io import json_text
    tiny = dict(images=2, lr_size=12, samples=2, levels=(3,), fit_images=4, attack_images=1, attack_steps=2,
                bootstrap=20)
    runs = {tag: A.run(A.AuditConfig(out=str(tmp_path / tag), progress=False, overrides=tiny, device="cpu",
                                     engine=eng))
            for tag, eng in (("local", EngineOptions()), ("ray", EngineOptions("ray", workers=2, threads=1)))}
    loc, rem = runs["local"], runs["ray"]
    assert not loc.failures and not rem.failures
    assert [m["verdict"] for m in rem.summaries] == [m["verdict"] for m in loc.summaries]
    assert json_text(rem.summaries) == json_text(loc.summaries)
    assert json_text(rem.metrics) == json_text(loc.metrics)
    for ml, mr in zip(loc.models, rem.models):
        assert [c.summary["condition"] for c in mr.conditions] == [c.summary["condition"] for c in ml.conditions]
        for cl, cr in zip(ml.conditions, mr.conditions):
            assert json_text(cr.summary) == json_text(cl.summary)
            assert sorted(cr.arrays) == sorted(cl.arrays)
            for k in cl.arrays:
                assert np.array_equal(np.asarray(cr.arrays[k]), np.asarray(cl.arrays[k]), equal_nan=True), k
    # the Ray run's cache is the local one's: a local resume reuses every condition it stored
    again = A.run(A.AuditConfig(out=str(tmp_path / "ray"), progress=False, overrides=tiny, device="cpu"))
    assert json_text(again.summaries) == json_text(loc.summaries)
