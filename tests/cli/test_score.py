"""``robustness-diag score``: output tree, exit codes 0/1/2, resume, and one subprocess run of the entry point."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import robustness_diag as rd
from robustness_diag.analyses.folder_run import read_table
from robustness_diag.analyses.inputs import flat_name
from robustness_diag.cli.main import main
from tests.ood.helpers import one_thread, smooth_rgb, tiny_flow, write_png  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fitted(tmp_path, one_thread):
    ck = rd.save_flow(tiny_flow(), tmp_path / "tiny.safetensors")
    train = tmp_path / "train"
    train.mkdir()
    for i in range(3):
        write_png(train / f"t{i}.png", smooth_rgb(16, 20, seed=i))
    stats = tmp_path / "stats.safetensors"
    assert main(["fit", str(ck), "--images", str(train), "--out", str(stats), "--no-progress"]) == 0
    test = tmp_path / "test" / "sub"
    test.mkdir(parents=True)
    write_png(test / "a.png", smooth_rgb(12, 14, seed=10))
    write_png(test.parent / "b.png", smooth_rgb(10, 16, seed=11), bits=16)
    return ck, stats, test.parent


def test_score_writes_table_maps_and_run_json(fitted, tmp_path, capsys):
    ck, stats, test = fitted
    out = tmp_path / "out"
    code = main(["score", str(ck), "--stats", str(stats), "--images", str(test), "--out", str(out), "--save-maps",
                 "--threshold", "3.5", "--no-progress", "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "2 of 2 images scored" in text
    assert sorted(p.name for p in out.iterdir()) == ["maps", "run.json", "scores.csv"]
    a, b = flat_name("sub/a.png"), flat_name("b.png")          # the whole key, escaped, plus a digest
    assert sorted(p.name for p in (out / "maps").iterdir()) == sorted([f"{b}.fea_up1.npy", f"{b}.fea_up1.png",
                                                                       f"{a}.fea_up1.npy", f"{a}.fea_up1.png"])
    _, rows = read_table(out / "scores.csv")
    assert [r["path"] for r in rows] == ["b.png", "sub/a.png"]
    m = np.load(out / "maps" / f"{a}.fea_up1.npy")                 # maps are whole; aggregates leave out
    inner = m[rd.ood.interior_mask(12, 14, rd.ood.DEFAULT_BORDER_MARGIN)]   # the border margin
    assert m.shape == (12, 14) and float(rows[1]["frac_above"]) == pytest.approx(float((inner > 3.5).mean()))
    assert float(rows[1]["max"]) == pytest.approx(float(inner.max()), rel=1e-6)
    assert "16-bit" in rows[0]["notes"] and rows[0]["threshold"] == "3.5"
    info = json.loads((out / "run.json").read_text())
    assert info["command"] == "score" and info["scoring"]["overlay_scale"] is not None
    assert info["config"]["threshold"] == 3.5 and info["counts"]["ok"] == 2
    sc = info["scoring"]
    assert sc["border_margin"] == rd.ood.DEFAULT_BORDER_MARGIN and sc["threshold_sources"]["fea_up1"]["source"] \
        == "given (--threshold)"
    assert sc["stitching"]["exact"] is True and sc["features"]["margin"] >= sc["features"]["receptive_field"]


def test_score_exit_1_names_failures_and_resume(fitted, tmp_path, capsys):
    ck, stats, test = fitted
    (test / "zero.png").write_bytes(b"")
    out = tmp_path / "out"
    args = ["score", str(ck), "--stats", str(stats), "--images", str(test), "--out", str(out), "--no-progress"]
    assert main(args) == 1
    text = capsys.readouterr().out
    assert "2 of 3 images scored; 1 failed" in text and "FAILED zero.png: empty file (0 bytes)" in text
    assert main(args) == 2 and "--resume" in capsys.readouterr().err
    write_png(test / "c.png", smooth_rgb(12, 12, seed=3))
    assert main(args + ["--resume"]) == 1              # zero.png is still a failed row of the table
    text = capsys.readouterr().out
    assert "3 of 4 images scored (3 already done, skipped); 1 failed" in text and "FAILED zero.png" in text
    _, rows = read_table(out / "scores.csv")
    assert [r["path"] for r in rows] == ["b.png", "sub/a.png", "zero.png", "c.png"]
    write_png(test / "zero.png", smooth_rgb(12, 12, seed=4))
    assert main(args + ["--resume", "--retry-failed"]) == 0
    _, rows = read_table(out / "scores.csv")
    assert [(r["path"], r["status"]) for r in rows] == [("b.png", "ok"), ("sub/a.png", "ok"), ("zero.png", "ok"),
                                                        ("c.png", "ok")]


def test_statistics_of_another_checkpoint_exit_2(fitted, tmp_path, capsys):
    _, stats, test = fitted
    other = rd.save_flow(tiny_flow(seed=3), tmp_path / "other.safetensors")
    code = main(["score", str(other), "--stats", str(stats), "--images", str(test), "--out", str(tmp_path / "o"),
                 "--no-progress"])
    assert code == 2 and "fitted on checkpoint" in capsys.readouterr().err
    code = main(["score", str(other), "--stats", str(tmp_path / "none.safetensors"), "--images", str(test),
                 "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and "statistics file not found" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_text("junk")
    code = main(["score", str(other), "--stats", str(tmp_path / "junk.safetensors"), "--images", str(test),
                 "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and "junk.safetensors: not a readable .safetensors file" in capsys.readouterr().err


def test_subprocess_entry_point(fitted, tmp_path):
    ck, stats, test = fitted
    out = tmp_path / "sp"
    proc = subprocess.run([sys.executable, "-m", "robustness_diag.cli.main", "score", str(ck), "--stats", str(stats),
                           "--images", str(test), "--out", str(out), "--device", "auto"],
                          capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                                                                            **__import__("os").environ})
    assert proc.returncode == 0, proc.stderr
    assert "2 of 2 images scored" in proc.stdout and "score" in proc.stderr      # progress bar on stderr
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "scores.csv"]
