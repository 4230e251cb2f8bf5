"""Every entry a folder scan sees is accounted for: used, or skipped with the reason, in the listing's ScanReport, the
loop's summary and run.json; the counts add up to the entries on disk (hardening issue, class 8)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from robustness_diag.analyses.folder_run import FolderRunConfig, run_folder
from robustness_diag.analyses.inputs import InputOptions, list_inputs
from robustness_diag.data.images import ImageList, ScanReport, list_images

symlinks = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs POSIX symlinks")


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(path)


def _tree(root):
    """A folder with 30 entries that are not searched folders: 19 images and 11 things to skip."""
    for i in range(15):
        _img(root / f"img{i:02d}.png")
    for i in range(3):
        _img(root / "sub" / f"s{i}.png")                    # searched folder: its entries count, not the folder
    _img(root / "sub" / "old_x.png")                        # excluded by --exclude old_*
    (root / "notes.txt").write_text("x")
    (root / "meta.json").write_text("{}")
    (root / "README").write_text("x")                       # no extension
    (root / ".DS_Store").write_bytes(b"\0")                 # hidden file
    _img(root / ".cache" / "h.png")                         # hidden folder (not searched)
    _img(root / "old" / "o.png")                            # folder excluded by --exclude old
    os.symlink(root / "missing.png", root / "dangling.png")
    os.symlink(root / "loop_b.png", root / "loop_a.png")
    os.symlink(root / "loop_a.png", root / "loop_b.png")
    os.symlink(root / "sub", root / "linked_dir")           # symlink to a folder: not followed
    os.symlink(root / "img00.png", root / "zz_same.png")     # the same file again
    return 30


@symlinks
def test_scan_report_accounts_for_every_entry(tmp_path):
    root = tmp_path / "in"
    n_entries = _tree(root)
    items = list_images([root], exclude=["old", "old_*"])
    assert isinstance(items, ImageList) and isinstance(items.scan, ScanReport)
    scan = items.scan
    assert len(items) == 18 and scan.used == 18
    counts = {r: len(v) for r, v in scan.skipped.items()}
    assert counts == {"unsupported extension": 3, "hidden": 2, "dangling symlink": 1, "symlink loop": 2,
                      "symlink to a folder (not followed)": 1, "folder excluded by --exclude": 1,
                      "excluded by --exclude": 1, "duplicate (same file listed already)": 1}
    assert scan.entries == n_entries == scan.used + sum(counts.values())
    assert scan.extensions == {".txt": 1, ".json": 1, "(none)": 1}
    assert scan.skipped["dangling symlink"] == ["dangling.png"] and scan.skipped["hidden"] == [".DS_Store", ".cache/"]
    assert scan.skipped["folder excluded by --exclude"] == ["old/"]
    line = scan.describe()
    assert line.startswith("30 entries: 18 images used, 3 unsupported extension (") and "1 dangling symlink" in line
    assert "2 symlink loop (loop_a.png, loop_b.png)" in line and ".json" in line
    d = scan.to_dict()
    assert d["entries"] == 30 and d["used"] == 18
    assert sum(v["count"] for v in d["skipped"].values()) + d["used"] == d["entries"]
    assert d["skipped"]["unsupported extension"]["extensions"] == {"(none)": 1, ".json": 1, ".txt": 1}


@symlinks
def test_include_and_recursive_off_are_reasons(tmp_path):
    root = tmp_path / "in"
    _tree(root)
    scan = list_images([root], include=["img0*"], recursive=False).scan
    assert scan.used == 10
    assert scan.skipped["not matched by --include"] == [f"img1{i}.png" for i in range(5)]
    assert scan.skipped["duplicate (same file listed already)"] == ["zz_same.png"]   # same file as img00.png
    assert scan.skipped["folder not searched (not recursive)"] == ["old/", "sub/"]
    assert scan.entries == 27 == scan.used + sum(len(v) for v in scan.skipped.values())   # the top folder's entries


@symlinks
def test_summary_and_run_json_add_up(tmp_path):
    root = tmp_path / "in"
    n_entries = _tree(root)
    items = list_inputs(InputOptions(images=[str(root)], exclude=["old", "old_*"]))
    out = tmp_path / "out"
    res = run_folder(items, lambda it, d: {"w": d.width}, ["w"],
                     FolderRunConfig(out_dir=str(out), progress=False, command="test"))
    assert res.n_ok == 18 and res.exit_code == 0
    s = res.summary()
    assert "inputs: 30 entries: 18 images used, 3 unsupported extension" in s and "1 dangling symlink" in s
    info = json.loads((out / "run.json").read_text())
    scan = info["scan"]
    assert scan["entries"] == n_entries
    assert scan["used"] + sum(v["count"] for v in scan["skipped"].values()) == n_entries
    assert scan["used"] == info["counts"]["inputs"] == 18
    assert scan["skipped"]["symlink loop"]["first"] == ["loop_a.png", "loop_b.png"]


def test_no_images_error_says_what_was_seen(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / ".hidden.png").write_text("x")
    with pytest.raises(ValueError, match=r"2 entries: 0 images used, 1 unsupported extension \(\.txt\), 1 hidden"):
        list_inputs(InputOptions(images=[str(tmp_path)]))


def test_explicit_files_and_lists_are_counted(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    lst = tmp_path / "l.txt"
    lst.write_text("a.png\nb.png\nmissing.png\na.png\n")
    items = list_images([lst, tmp_path / "a.png"])
    assert [it.key for it in items] == ["a.png", "b.png", "missing.png"]
    assert items.scan.used == 3 and items.scan.skipped == {"duplicate (same file listed already)": ["a.png", "a.png"]}
    assert items.scan.entries == 5
