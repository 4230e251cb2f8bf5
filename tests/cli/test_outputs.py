"""Where the commands write: an output that cannot be written ends every writing command with exit code 2 and one
line before any work, and no command replaces existing results unless ``--overwrite`` (or ``--resume``) is given.

Tests run as root, where permissions do not block writes: unwritable places are a path under a regular file, a
regular file where a folder is expected (and the reverse), and a folder under ``/proc``."""
from __future__ import annotations

import pytest

from robustness_diag.cli.main import build_parser, main
from robustness_diag.cli.outputs import check_file, check_folder
from tests.cli.test_options import Ran, base, guard  # noqa: F401  (fixtures)

FOLDER_COMMANDS = ["score", "sample", "correlate", "audit", "toy"]


def with_out(args, out):
    args = list(args)
    args[args.index("--out") + 1] = str(out)
    return args


def bad_folders(tmp_path):
    regular = tmp_path / "regular.txt"
    regular.write_text("x")
    return {"a file": regular, "under a file": regular / "out", "deep under a file": regular / "a" / "b",
            "proc": "/proc/robustness-diag-no-such/out"}


@pytest.mark.parametrize("cmd", FOLDER_COMMANDS)
def test_unwritable_out_folder_exit_2_one_line_before_work(cmd, base, guard, tmp_path, capsys):
    for label, out in bad_folders(tmp_path).items():
        assert main(with_out(base[cmd], out)) == 2, label       # guard: no analysis ran (it would raise Ran)
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and "--out" in lines[0], (label, cap.err)
        assert "Traceback" not in cap.err + cap.out


def test_fit_out_must_be_a_writable_file(base, guard, tmp_path, capsys):
    folder = tmp_path / "adir"
    folder.mkdir()
    cases = dict(bad_folders(tmp_path), folder=folder, slash=str(tmp_path / "new") + "/")
    cases["a file"] = tmp_path / "regular.txt" / "stats.safetensors"
    for label, out in cases.items():
        assert main(with_out(base["fit"], out)) == 2, label
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "--out" in lines[0], (label, lines)


def test_inspect_demo_folder_is_checked(guard, tmp_path, capsys):
    regular = tmp_path / "f"
    regular.write_text("x")
    assert main(["inspect", "--demo", str(regular / "demo")]) == 2
    err = capsys.readouterr().err
    assert "--demo" in err and len(err.strip().splitlines()) == 1


def test_report_needs_an_existing_writable_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2                 # no report_data.json
    err = capsys.readouterr().err
    assert "report_data.json" in err and len(err.strip().splitlines()) == 1


# -- one rule for existing results ----------------------------------------------------------------------------------

def test_fit_refuses_an_existing_file_without_overwrite(base, guard, tmp_path, capsys):
    out = tmp_path / "stats.safetensors"
    out.write_bytes(b"old")
    assert main(with_out(base["fit"], out)) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"old"
    with pytest.raises(Ran):
        main(with_out(base["fit"], out) + ["--overwrite"])


@pytest.mark.parametrize("cmd,table", [("score", "scores.csv"), ("sample", "samples.csv"),
                                       ("sample", "sample_rows.csv")])
def test_score_and_sample_need_resume_or_overwrite(cmd, table, base, guard, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / table).write_text("path,status\n")
    args = with_out(base[cmd], out)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    for flag in ("--resume", "--overwrite"):
        with pytest.raises(Ran):
            main(args + [flag])


@pytest.mark.parametrize("cmd,result", [("correlate", "metrics.json"), ("correlate", "report_data.json"),
                                        ("toy", "toy_mechanism.json")])
def test_correlate_and_toy_need_overwrite(cmd, result, base, guard, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / result).write_text("{}")
    args = with_out(base[cmd], out)
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(Ran):
        main(args + ["--overwrite"])


def test_an_empty_existing_folder_is_fine(base, guard, tmp_path):
    for cmd in FOLDER_COMMANDS:
        out = tmp_path / f"empty_{cmd}"
        out.mkdir()
        with pytest.raises(Ran):
            main(with_out(base[cmd], out))


def test_audit_resumes_by_default_and_overwrite_restarts(base, monkeypatch, tmp_path):
    import robustness_diag.analyses.audit as audit
    seen = []

    def fake(cfg, render=None):
        seen.append(cfg.resume)
        raise Ran()
    monkeypatch.setattr(audit, "run", fake)
    for extra in ([], ["--resume"], ["--overwrite"], ["--restart"]):
        with pytest.raises(Ran):
            main(base["audit"] + extra)
    assert seen == [True, True, False, False]


def test_every_writing_command_states_the_rule(capsys):
    for cmd in ("fit", "score", "sample", "correlate", "audit", "toy"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "never replaced silently" in out and "--overwrite" in out, cmd


def test_check_functions(tmp_path):
    assert check_folder(tmp_path / "new" / "deeper") is None and (tmp_path / "new" / "deeper").is_dir()
    assert list((tmp_path / "new" / "deeper").iterdir()) == []          # the probe file is removed
    assert check_file(tmp_path / "x" / "s.safetensors") is None
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in check_folder(f)
    assert "is a file" in check_folder(f / "sub")
    assert "is a folder" in check_file(tmp_path)
    assert "already exists" in check_file(f) and check_file(f, overwrite=True) is None
