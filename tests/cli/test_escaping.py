"""Untrusted names reach the terminal escaped, and what the README and ``--help`` say is what the commands do:
a missing image named in ``--images`` is a failed row while the rest runs, an unreadable checkpoint given to
``audit`` is a failed input (exit 1) also when it is the only one, and a pickled array names its file."""
from __future__ import annotations

import json

import numpy as np
import pytest

import robustness_diag as rd
from robustness_diag.cli.main import build_parser, main
from robustness_diag.text import printable
from tests.ood.helpers import one_thread, smooth_rgb, tiny_flow, write_png  # noqa: F401  (fixture)

EVIL = "bad\nFAILED forged.png: all fine\x1b[31m\x9b"


def test_printable_escapes_c0_c1_and_del_only():
    assert printable("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert printable("\x1b[2J\x7f\x9b\x00") == "\\x1b[2J\\x7f\\x9b\\x00"
    assert printable("ünï/çødé ☃.png") == "ünï/çødé ☃.png"
    assert printable("C:\\data\\x.png") == "C:\\data\\x.png"
    assert "\n" not in printable(EVIL) and "\x1b" not in printable(EVIL)


def no_controls(text: str) -> bool:
    return not any(ord(c) < 0x20 and c != "\n" or 0x7f <= ord(c) <= 0x9f for c in text)


@pytest.fixture
def tiny(tmp_path, one_thread):
    ck = rd.save_flow(tiny_flow(), tmp_path / "tiny.safetensors")
    good = tmp_path / "imgs"
    good.mkdir()
    for i in range(2):
        write_png(good / f"g{i}.png", smooth_rgb(16, 16, seed=i))
    return ck, good


def test_fit_escapes_a_forging_file_name_and_runs_the_rest(tiny, tmp_path, capsys):
    ck, good = tiny
    evil = good / (EVIL + ".png")
    evil.write_bytes(b"not an image")
    code = main(["fit", str(ck), "--images", str(good), "--out", str(tmp_path / "s.safetensors"), "--no-progress"])
    cap = capsys.readouterr()
    assert code == 1 and (tmp_path / "s.safetensors").is_file()
    text = cap.out + cap.err
    assert no_controls(text) and "Traceback" not in text
    assert "bad\\nFAILED forged.png: all fine\\x1b[31m\\x9b.png" in text
    assert not any(line.startswith("FAILED forged") for line in text.splitlines())


def test_a_missing_image_among_explicit_inputs_is_a_failed_row(tiny, tmp_path, capsys):
    ck, good = tiny
    out = tmp_path / "s.safetensors"
    code = main(["fit", str(ck), "--images", str(good / "g0.png"), str(tmp_path / "nope.png"), str(good / "g1.png"),
                 "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert code == 1 and out.is_file()
    assert "2 of 3 images used" in text and "nope.png: no such file" in text
    # a missing folder or list is a usage error: nothing could tell what it held
    assert main(["fit", str(ck), "--images", str(good), str(tmp_path / "nodir"), "--out", str(tmp_path / "t.st"),
                 "--no-progress"]) == 2
    assert "nodir" in capsys.readouterr().err and not (tmp_path / "t.st").exists()


@pytest.mark.parametrize("argv", [
    ["inspect", "{p}"], ["audit", "{p}", "--out", "{tmp}/a"], ["fit", "{p}", "--images", "{tmp}", "--out", "{tmp}/s"],
    ["sample", "{p}", "--images", "{tmp}", "--out", "{tmp}/o"], ["toy", "--out", "{tmp}/f/{p}"],
    ["inspect", "bundled:sr4x_affine", "--config", "{p}"], ["correlate", "{p}", "--out", "{tmp}/c"],
])
def test_names_in_error_lines_are_escaped(argv, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    name = "x\nFAILED y\x1b[0m"
    args = [a.format(p=name, tmp=tmp_path) for a in argv]
    code = main(args)
    cap = capsys.readouterr()
    assert code == 2, cap.err
    assert no_controls(cap.out + cap.err) and len(cap.err.strip().splitlines()) == 1, cap.err
    assert "x\\nFAILED y\\x1b[0m" in cap.err


def test_lone_unreadable_checkpoint_is_a_failed_input_for_audit(tmp_path, capsys):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"\x00garbage")
    code = main(["audit", str(bad), "--out", str(tmp_path / "a"), "--no-progress"])
    cap = capsys.readouterr()
    assert code == 1, cap.err
    assert "NOT AUDITED" in cap.err and "broken.pth" in cap.err and "Traceback" not in cap.err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["audit", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert "1 some checkpoint failing or not auditable" in helptext


def test_a_pickled_score_map_is_named(tmp_path):
    from robustness_diag.analyses import correlate as C
    digest = "d" * 64
    sdir, pdir = tmp_path / "s", tmp_path / "p"
    for d, cmd, table in ((sdir, "score", "scores.csv"), (pdir, "sample", "samples.csv")):
        (d / "maps").mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"command": cmd, "checkpoint": {"path": "ck", "weights_digest": digest},
                                                "scoring": {"levels": ["fea_up1"]}}))
        (d / table).write_text("path,status,error\na.png,ok,\n")
    from robustness_diag.analyses.inputs import flat_name
    name = flat_name("a.png")
    np.save(sdir / "maps" / f"{name}.fea_up1.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    np.savez(pdir / "maps" / f"{name}.npz", artifact_mask=np.zeros((1, 4, 4), bool), explosion=np.zeros((1, 4, 4)))
    res = C.run(C.CorrelateConfig(run_dirs=[str(sdir), str(pdir)], out=str(tmp_path / "c")))
    assert res.exit_code == 2 and f"{name}.fea_up1.npy" in res.error and "Object arrays" in res.error, res.error
    # the other way round: a pickled sample map
    np.save(sdir / "maps" / f"{name}.fea_up1.npy", np.zeros((4, 4), np.float32))
    np.savez(pdir / "maps" / f"{name}.npz", artifact_mask=np.array([{"x": 1}], dtype=object),
             explosion=np.zeros((1, 4, 4)))
    res = C.run(C.CorrelateConfig(run_dirs=[str(sdir), str(pdir)], out=str(tmp_path / "c")))
    assert res.exit_code == 2 and f"{name}.npz" in res.error, res.error
