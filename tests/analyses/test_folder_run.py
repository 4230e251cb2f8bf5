"""The shared per-image loop: rows appended and flushed as produced, error rows, resume, run.json, exit codes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustness_diag.analyses.folder_run import (FolderRunConfig, FolderRunError, read_table, run_folder)
from robustness_diag.data.images import ImageItem, ImageReadError


class Decoded:
    def __init__(self, path):
        self.path = path
        self.notes = ["decoder note"] if "note" in path.name else []


def fake_decode(path: Path):
    if "undecodable" in path.name:
        raise ImageReadError(path, "not a recognised image file")
    return Decoded(path)


def _items(tmp_path, names):
    return [ImageItem(tmp_path / n, n) for n in names]


def _cfg(out, **kw):
    return FolderRunConfig(out_dir=str(out), progress=False, decode=fake_decode, command="test",
                           config={"x": 1}, **kw)


def test_rows_are_flushed_as_produced_and_failures_do_not_stop_the_run(tmp_path):
    out = tmp_path / "out"
    names = ["a.png", "b_undecodable.png", "c_boom.png", "d_note.png"]
    seen_rows = []

    def work(item, decoded):
        _, rows = read_table(out / "scores.csv")          # what is on disk before this file's row
        seen_rows.append(len(rows))
        if "boom" in item.key:
            raise RuntimeError("network exploded\non two lines")
        return {"value": len(item.key), "tags": ["x", "y"], "notes": "callback note"}

    res = run_folder(_items(tmp_path, names), work, ["value", "tags"], _cfg(out))
    assert seen_rows == [0, 2, 3]                            # a, then (b failed in decode), c, d
    header, rows = read_table(out / "scores.csv")
    assert header == ["path", "status", "error", "value", "tags", "notes", "seconds"]
    by = {r["path"]: r for r in rows}
    assert [r["path"] for r in rows] == names
    assert by["a.png"]["status"] == "ok" and by["a.png"]["value"] == "5" and by["a.png"]["tags"] == "x; y"
    assert by["b_undecodable.png"]["error"] == "not a recognised image file"
    assert by["c_boom.png"]["error"] == "RuntimeError: network exploded on two lines"
    assert by["d_note.png"]["notes"] == "decoder note; callback note"
    assert res.n_ok == 2 and res.n_failed == 2 and res.exit_code == 1
    assert [f["path"] for f in res.failed] == ["b_undecodable.png", "c_boom.png"]
    s = res.summary()
    assert "2 of 4 images processed" in s and "FAILED c_boom.png: RuntimeError" in s
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["command"] == "test" and info["config"] == {"x": 1}
    assert info["counts"] == {"inputs": 4, "ok": 2, "failed": 2, "skipped_resumed": 0, "pending": 0}
    assert {f["path"] for f in info["failed"]} == {"b_undecodable.png", "c_boom.png"}
    assert {"python", "torch", "numpy", "robustness_diag"} <= set(info["versions"])
    assert info["timing"]["processed_this_session"] == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".")]   # no temporary files left


def test_all_ok_exit_code_zero_and_extra_info(tmp_path):
    res = run_folder(_items(tmp_path, ["a.png"]), lambda it, d: {"v": 1}, ["v"], _cfg(tmp_path / "o"),
                     extra_info=lambda: {"phase_timing": {"x": 0.5}})
    assert res.exit_code == 0 and res.n_ok == 1
    assert json.loads((tmp_path / "o" / "run.json").read_text())["phase_timing"] == {"x": 0.5}


def test_resume_skips_finished_files_and_retry_failed_compacts(tmp_path):
    out = tmp_path / "out"
    calls = []
    flaky = {"fail": True}

    def work(item, decoded):
        calls.append(item.key)
        if item.key == "b.png" and flaky["fail"]:
            raise ValueError("first time fails")
        return {"v": item.key.upper()}

    run_folder(_items(tmp_path, ["a.png", "b.png"]), work, ["v"], _cfg(out))
    with pytest.raises(FolderRunError, match="--resume"):
        run_folder(_items(tmp_path, ["a.png"]), work, ["v"], _cfg(out))
    calls.clear()
    res = run_folder(_items(tmp_path, ["a.png", "b.png", "c.png"]), work, ["v"], _cfg(out, resume=True))
    assert calls == ["c.png"] and res.n_skipped == 2 and res.n_failed == 1 and res.exit_code == 1
    flaky["fail"] = False
    calls.clear()
    res = run_folder(_items(tmp_path, ["a.png", "b.png", "c.png"]), work, ["v"],
                     _cfg(out, resume=True, retry_failed=True))
    assert calls == ["b.png"] and res.n_failed == 0 and res.exit_code == 0
    _, rows = read_table(out / "scores.csv")
    assert [(r["path"], r["status"]) for r in rows] == [("a.png", "ok"), ("b.png", "ok"), ("c.png", "ok")]
    res = run_folder(_items(tmp_path, ["a.png"]), work, ["v"], _cfg(out, overwrite=True))
    assert [r["path"] for r in read_table(out / "scores.csv")[1]] == ["a.png"]


def test_resume_repairs_a_torn_last_line_and_refuses_other_columns(tmp_path):
    out = tmp_path / "out"
    run_folder(_items(tmp_path, ["a.png", "b.png"]), lambda it, d: {"v": 1}, ["v"], _cfg(out))
    csv_path = out / "scores.csv"
    csv_path.write_text(csv_path.read_text() + "c.png,ok,,1")        # a crash in the middle of a row
    calls = []
    run_folder(_items(tmp_path, ["a.png", "b.png", "c.png"]), lambda it, d: calls.append(it.key) or {"v": 2},
               ["v"], _cfg(out, resume=True))
    assert calls == ["c.png"]
    _, rows = read_table(csv_path)
    assert [r["path"] for r in rows] == ["a.png", "b.png", "c.png"] and rows[-1]["v"] == "2"
    with pytest.raises(FolderRunError, match="columns"):
        run_folder(_items(tmp_path, ["a.png"]), lambda it, d: {}, ["other"], _cfg(out, resume=True))


def test_interrupt_keeps_rows_and_marks_run_json(tmp_path):
    out = tmp_path / "out"

    def work(item, decoded):
        if item.key == "b.png":
            raise KeyboardInterrupt
        return {"v": 1}

    with pytest.raises(KeyboardInterrupt):
        run_folder(_items(tmp_path, ["a.png", "b.png", "c.png"]), work, ["v"], _cfg(out))
    assert [r["path"] for r in read_table(out / "scores.csv")[1]] == ["a.png"]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["counts"]["ok"] == 1 and info["counts"]["pending"] == 2


def test_no_output_folder_means_no_files_and_reserved_columns_are_refused(tmp_path):
    res = run_folder(_items(tmp_path, ["a.png", "x_undecodable.png"]), lambda it, d: {"v": 1}, ["v"],
                     FolderRunConfig(out_dir=None, progress=False, decode=fake_decode))
    assert res.n_ok == 1 and res.n_failed == 1 and res.csv_path is None and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="reserved"):
        run_folder([], lambda it, d: {}, ["status"], FolderRunConfig(progress=False))


def test_read_frame_keeps_text_columns_and_parses_numbers(tmp_path):
    from robustness_diag.analyses.folder_run import read_frame
    p = tmp_path / "t.csv"
    p.write_text("path,status,error,level,mean,notes,seconds\nNA,ok,,fea_up1,1.5,,0.1\n"
                 "2.png,error,bad,,,,0.0\n007,ok,,fea_up1,inf,,0.2\ntorn,o")
    df = read_frame(p)
    assert df["path"].tolist() == ["NA", "2.png", "007"] and df["error"].tolist() == ["", "bad", ""]
    assert df["level"].tolist()[0] == "fea_up1" and df["mean"].tolist()[0] == 1.5
    assert df["mean"].tolist()[2] == float("inf") and df["mean"].isna().tolist()[1]
