"""Output names that cannot collide, maps checked on read, one writer per output folder, duplicated rows refused.

Every input gets its own output files (``flat_name``: the whole key escaped, plus a digest); ``correlate`` checks
that a sample map records the row's image and leaves out (counted, named) an image whose map is another image's or
is truncated; two runs into one folder cannot both write (an OS lock: the second is refused with exit code 2); a
table with two different rows for one image is refused by ``correlate`` and by ``--resume``.
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from robustness_diag.analyses import correlate as C
from robustness_diag.analyses.folder_run import (LOCK_NAME, DuplicateRowsError, FolderLockedError, FolderRunConfig,
                                                 FolderRunError, final_rows, folder_lock, read_table, run_folder)
from robustness_diag.analyses.inputs import MAX_NAME_BYTES, flat_name, name_key
from robustness_diag.data.images import ImageItem
from robustness_diag.ood import DEFAULT_BORDER_MARGIN, interior_mask

CLI = [sys.executable, "-m", "robustness_diag.cli.main"]
FLOW = "bundled:sr4x_affine"

#: pairs the old names (extension dropped, "/" -> "__", ":" -> "_") wrote to one file
COLLIDING = [("a/img.png", "a__img.png"), ("x.png", "x.jpg"), ("x.png", "X.png"), ("a:b.png", "a_b.png"),
             ("100% done.png", "100%25 done.png"), ("with space.png", "with%20space.png"), ("a/b/c.png", "a/b__c.png")]


def _cli(*args, timeout=600):
    p = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in p.stderr, p.stderr
    return p


# -- names ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a,b", COLLIDING)
def test_flat_names_of_formerly_colliding_keys_differ_even_ignoring_case(a, b):
    na, nb = flat_name(a), flat_name(b)
    assert na != nb and na.casefold() != nb.casefold()
    assert name_key(na) == a and name_key(nb) == b                       # reversible
    assert "/" not in na + nb and "\\" not in na + nb and ":" not in na + nb


def test_flat_names_are_safe_file_names_and_long_keys_are_cut_but_stay_distinct():
    for key in [".hidden.png", "..", "dir\\x.png", "a~b.png", "tab\there.png", "caf\u00e9/\u00fc.png", "bad\udcff.png",
                "", "%2F.png", 'q"<>|?*.png']:
        n = flat_name(key)
        assert not n.startswith(".") and not any(c in n for c in '/\\:*?"<>|\t') and name_key(n) == key, key
        n.encode("utf-8")                                                 # no lone surrogates left
    long_a, long_b = "d/" * 200 + "a.png", "d/" * 200 + "b.png"
    na, nb = flat_name(long_a), flat_name(long_b)
    assert na != nb and len(na.encode()) <= MAX_NAME_BYTES + 20 and name_key(na) is None
    assert name_key(flat_name("a.png").replace("a.png", "b.png")) is None  # a digest that does not match


# -- score + sample + correlate on colliding inputs ------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder whose keys collided under the old names; one fit, score and sample run over it (1 sample)."""
    root = tmp_path_factory.mktemp("collide")
    imgs = root / "imgs"
    (imgs / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    keys = ["a/img.png", "a__img.png", "x.png", "x.jpg", "100% done.png", "with space.png"]
    (imgs / "X.png").write_bytes(b"probe")
    if not (imgs / "x.png").exists():                                   # the file system tells case apart
        keys.append("X.png")
    (imgs / "X.png").unlink()
    for i, k in enumerate(keys):
        arr = (rng.random((12 + 2 * (i % 3), 16, 3)) * 255).astype(np.uint8)   # sizes differ: a mix-up shows
        Image.fromarray(arr).save(imgs / k, format="JPEG" if k.endswith(".jpg") else "PNG")
    stats = root / "stats.safetensors"
    assert _cli("fit", FLOW, "--images", imgs, "--out", stats, "--no-progress", "--device", "cpu").returncode == 0
    p = _cli("score", FLOW, "--stats", stats, "--images", imgs, "--out", root / "score", "--save-maps",
             "--no-progress", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    p = _cli("sample", FLOW, "--images", imgs, "--out", root / "sample", "--samples", "1", "--save-maps",
             "--save-samples", "--no-progress", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    return root, sorted(keys)


def test_every_input_gets_its_own_maps_overlays_and_samples(runs):
    root, keys = runs
    smaps, pmaps = root / "score" / "maps", root / "sample" / "maps"
    level = read_table(root / "score" / "scores.csv")[1][0]["level"]
    rows = {r["path"]: r for r in read_table(root / "score" / "scores.csv")[1]}
    assert sorted(rows) == keys
    for k in keys:
        n = flat_name(k)
        m = np.load(smaps / f"{n}.{level}.npy")
        assert m.shape == (int(rows[k]["lr_height"]), int(rows[k]["lr_width"]))
        inner = m[interior_mask(*m.shape, DEFAULT_BORDER_MARGIN)]        # aggregates leave the border out
        assert float(rows[k]["mean"]) == pytest.approx(float(inner.mean()), rel=1e-5)   # this image's map
        assert (smaps / f"{n}.{level}.png").is_file()
        with np.load(pmaps / f"{n}.npz") as z:
            assert str(z["source"]) == k and z["artifact_mask"].shape[1] == 4 * int(rows[k]["lr_height"])
        assert (pmaps / f"{n}.artifacts.png").is_file() and (pmaps / f"{n}.explosion.png").is_file()
        assert Image.open(root / "sample" / "samples" / f"{n}.s00.png").text["source"] == k
    assert len(list(smaps.glob("*.npy"))) == len(keys) and len(list(pmaps.glob("*.npz"))) == len(keys)
    assert not list((root / "score").glob(LOCK_NAME)) and not list((root / "sample").glob(LOCK_NAME))


def _copy_runs(root, tmp_path):
    shutil.copytree(root / "score", tmp_path / "score")
    shutil.copytree(root / "sample", tmp_path / "sample")
    return tmp_path / "score", tmp_path / "sample"


def test_correlate_joins_each_image_with_its_own_maps(runs, tmp_path):
    root, keys = runs
    p = _cli("correlate", root / "score", root / "sample", "--out", tmp_path / "corr", "--bootstrap", "5")
    assert p.returncode == 0, p.stderr
    res = C.results_from_run_dirs([root / "score", root / "sample"])
    assert sorted(res[0].image_names) == keys and res[0].join["joined"] == len(keys) and not res[0].left_out


def test_correlate_refuses_a_map_recorded_for_another_image(runs, tmp_path):
    root, keys = runs
    sdir, pdir = _copy_runs(root, tmp_path)
    a, b = "a/img.png", "a__img.png"
    shutil.copy(pdir / "maps" / f"{flat_name(b)}.npz", pdir / "maps" / f"{flat_name(a)}.npz")
    p = _cli("correlate", sdir, pdir, "--out", tmp_path / "corr", "--bootstrap", "5")
    assert p.returncode == 1, p.stderr
    assert f"left out {a!r}" in p.stderr and f"holds the maps of {b!r}, not of {a!r}" in p.stderr
    assert "1 map of another image" in p.stdout
    res = C.run(C.CorrelateConfig(out=str(tmp_path / "corr2"), run_dirs=[str(sdir), str(pdir)], n_resamples=5))
    (model, counts), = res.joins.items()
    assert res.exit_code == 1 and counts["map_of_another_image"] == 1 and counts["joined"] == len(keys) - 1
    assert [f["path"] for f in res.left_out[model]] == [a]


def test_correlate_counts_a_truncated_map_instead_of_crashing(runs, tmp_path):
    root, keys = runs
    sdir, pdir = _copy_runs(root, tmp_path)
    victim = pdir / "maps" / f"{flat_name('x.jpg')}.npz"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    score_victim = sdir / "maps" / f"{flat_name('x.png')}.{read_table(sdir / 'scores.csv')[1][0]['level']}.npy"
    score_victim.write_bytes(score_victim.read_bytes()[:100])
    p = _cli("correlate", sdir, pdir, "--out", tmp_path / "corr", "--bootstrap", "5")
    assert p.returncode == 1, p.stderr
    assert "left out 'x.jpg'" in p.stderr and "left out 'x.png'" in p.stderr and "unreadable" in p.stderr
    assert "2 map unreadable" in p.stdout
    # an npz that records no source image (written before sources were recorded) is refused too
    with np.load(root / "sample" / "maps" / f"{flat_name('x.jpg')}.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "source"}
    with open(victim, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    good_score = score_victim.with_name(score_victim.name.replace(flat_name("x.png"), flat_name("x.jpg")))
    with pytest.raises(C.MapError, match="records no source"):
        C.read_maps("x.jpg", good_score, victim)


def test_correlate_refuses_a_table_with_a_duplicated_row(runs, tmp_path):
    root, keys = runs
    sdir, pdir = _copy_runs(root, tmp_path)
    table = sdir / "scores.csv"
    header, rows = read_table(table)
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join(lines + [lines[1]]))                        # the same row again: kept once
    assert C.join_runs(sdir, pdir)[1]["joined"] == len(keys)
    twin = dict(rows[0], mean=str(float(rows[0]["mean"]) + 1))
    with open(table, "a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=header).writerow(twin)
    p = _cli("correlate", sdir, pdir, "--out", tmp_path / "corr", "--bootstrap", "5")
    assert p.returncode == 2 and "two different result rows" in p.stderr and rows[0]["path"] in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


# -- duplicated rows --------------------------------------------------------------------------------------------------
def test_final_rows_keeps_retries_and_identical_repeats_and_refuses_the_rest():
    ok = {"path": "a", "status": "ok", "v": "1", "seconds": "0.1"}
    err = {"path": "a", "status": "error", "v": "", "seconds": "0.0"}
    assert final_rows([err, ok], "t.csv") == {"a": ok}                   # a retried failure
    assert final_rows([ok, dict(ok, seconds="0.3")], "t.csv") == {"a": ok}
    with pytest.raises(DuplicateRowsError, match="rows 1 and 2"):
        final_rows([ok, dict(ok, v="2")], "t.csv")
    with pytest.raises(DuplicateRowsError):
        final_rows([ok, err], "t.csv")                                     # ok, then failed: not a retry
    d = {"path": "a", "sample": "0", "x": "1"}
    assert len(final_rows([d, d, dict(d, sample="1")], "rows.csv", ("path", "sample"))) == 2


def test_resume_refuses_a_table_with_differing_rows_and_compacts_identical_ones(tmp_path):
    out = tmp_path / "out"
    items = [ImageItem(tmp_path / n, n) for n in ("a.png", "b.png")]
    cfg = dict(out_dir=str(out), progress=False, decode=lambda p: None)
    run_folder(items, lambda it, d: {"v": 1}, ["v"], FolderRunConfig(**cfg))
    table = out / "scores.csv"
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join(lines + [lines[1]]))
    res = run_folder(items, lambda it, d: {"v": 1}, ["v"], FolderRunConfig(resume=True, **cfg))
    assert res.n_skipped == 2 and [r["path"] for r in read_table(table)[1]] == ["a.png", "b.png"]
    table.write_text(table.read_text() + lines[1].replace(",1,", ",2,"))
    with pytest.raises(FolderRunError, match="two different result rows"):
        run_folder(items, lambda it, d: {"v": 1}, ["v"], FolderRunConfig(resume=True, **cfg))


# -- one writer per folder ------------------------------------------------------------------------------------------
def test_folder_lock_refuses_a_second_holder_names_it_and_is_released(tmp_path):
    code = ("import sys, time\nfrom robustness_diag.analyses.folder_run import folder_lock\n"
            "with folder_lock(sys.argv[1], 'holder'):\n    print('held', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(FolderLockedError, match=rf"in use by 'holder' pid {proc.pid} on "):
            with folder_lock(tmp_path / "out", "me"):
                pass
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "one.png")
        p = _cli("sample", FLOW, "--images", tmp_path / "one.png", "--out", tmp_path / "out", "--resume",
                 "--samples", "1", "--no-progress", "--device", "cpu")
        assert p.returncode == 2 and f"in use by 'holder' pid {proc.pid}" in p.stderr and "out" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "out" / "samples.csv").exists()
    finally:
        proc.send_signal(signal.SIGKILL)                                  # killed: no stale lock is left
        proc.wait()
    assert (tmp_path / "out" / LOCK_NAME).exists()
    with folder_lock(tmp_path / "out", "me"):
        with folder_lock(tmp_path / "out", "me again"):                 # re-entrant in one process
            pass
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_two_concurrent_resumed_sample_runs_do_not_both_write(tmp_path):
    """Fault injection: two ``sample --resume`` runs on one folder started together. The loser is refused (exit 2,
    one line naming the folder and the winner's pid); the tables have no duplicated or torn row."""
    rng = np.random.default_rng(3)
    refused = None
    for attempt, n in enumerate((12, 24, 48)):
        imgs, out = tmp_path / f"imgs{attempt}", tmp_path / f"out{attempt}"
        imgs.mkdir()
        for i in range(n):
            Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(imgs / f"i{i:02d}.png")
        args = CLI + ["sample", FLOW, "--images", str(imgs), "--out", str(out), "--samples", "2", "--resume",
                      "--no-progress", "--device", "cpu"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
        results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
        for rc, _, err in results:
            assert "Traceback" not in err, err
            assert rc in (0, 2), err
        rows = read_table(out / "samples.csv")[1]
        assert sorted(r["path"] for r in rows) == sorted(f"i{i:02d}.png" for i in range(n))   # once each
        assert all(r["status"] == "ok" and r["seconds"] for r in rows)                       # none torn
        assert (out / "samples.csv").read_text().endswith("\n")
        detail = read_table(out / "sample_rows.csv")[1]
        assert len(detail) == 2 * n and len({(d["path"], d["sample"]) for d in detail}) == 2 * n
        assert not (out / LOCK_NAME).exists()
        codes = sorted(rc for rc, _, _ in results)
        if codes == [0, 2]:
            winner = next(p for p, (rc, _, _) in zip(procs, results) if rc == 0)
            refused = next(err for rc, _, err in results if rc == 2).strip()
            assert len(refused.splitlines()) == 1 and str(out) in refused
            assert f"pid {winner.pid}" in refused and "in use by 'sample'" in refused
            break
        assert codes == [0, 0]                       # no overlap (one ended before the other began): try longer
        time.sleep(0.1)
    assert refused is not None, "the two runs never overlapped"


def test_correlate_refuses_a_report_folder_another_run_is_writing(tmp_path):
    from robustness_diag.analyses import stats as S
    rng = np.random.default_rng(0)
    obs = S.Observations(rng.normal(size=40), rng.binomial(1, 0.3, 40), 1, np.arange(40) // 4)
    cfg = C.CorrelateConfig(out=str(tmp_path / "corr"), n_resamples=5, results=[C.ModelResult("m", obs)])
    code = ("import sys, time\nfrom robustness_diag.analyses.folder_run import folder_lock\n"
            "with folder_lock(sys.argv[1], 'correlate'):\n    print('held', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, cfg.out], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        res = C.run(cfg)
        assert res.exit_code == 2 and "in use by 'correlate'" in res.error
        assert not (tmp_path / "corr" / "metrics.json").exists()
    finally:
        proc.kill()
        proc.wait()
    assert C.run(cfg).exit_code == 0 and (tmp_path / "corr" / "metrics.json").is_file()
