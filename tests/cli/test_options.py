"""Every numeric option of every command is checked while parsing: a bad value ends the command with exit code 2
and one line naming the option and the allowed range, before any work (the analyses' ``run`` is never called)."""
from __future__ import annotations

import pytest

from robustness_diag.cli import options as opt
from robustness_diag.cli.main import build_parser, main


class Ran(Exception):
    """Raised by the patched analyses: the command got past its checks."""


@pytest.fixture
def guard(monkeypatch):
    """Every analysis ``run`` raises :class:`Ran`."""
    import robustness_diag.analyses.audit as audit
    import robustness_diag.analyses.correlate as correlate
    import robustness_diag.analyses.fit as fit
    import robustness_diag.analyses.sample as sample
    import robustness_diag.analyses.score as score
    import robustness_diag.analyses.toy_mechanism as toy
    import robustness_diag.cli.inspect_cmd as inspect_cmd

    def boom(*a, **k):
        raise Ran()
    for mod in (audit, correlate, fit, sample, score, toy, inspect_cmd):
        monkeypatch.setattr(mod, "run", boom)


@pytest.fixture
def base(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"not decoded before the checks")
    stats = tmp_path / "stats.safetensors"
    stats.write_bytes(b"x")
    ck = "bundled:sr4x_affine"
    return {
        "fit": ["fit", ck, "--images", str(img), "--out", str(tmp_path / "new.safetensors"), "--no-progress"],
        "score": ["score", ck, "--stats", str(stats), "--images", str(img), "--out", str(tmp_path / "s"),
                  "--no-progress"],
        "sample": ["sample", ck, "--images", str(img), "--out", str(tmp_path / "p"), "--no-progress"],
        "correlate": ["correlate", "--toy", "--out", str(tmp_path / "c")],
        "audit": ["audit", "--out", str(tmp_path / "a"), "--no-progress"],
        "toy": ["toy", "--out", str(tmp_path / "t")],
        "inspect": ["inspect", ck],
    }


BAD = [
    # (command, option values, what the message must name)
    ("fit", ["--tile", "0"], "--tile"), ("fit", ["--tile", "-3"], "--tile"), ("fit", ["--tile", "2.5"], "--tile"),
    ("fit", ["--batch", "0"], "--batch"), ("fit", ["--margin", "-1"], "--margin"),
    ("fit", ["--min-size", "0"], "--min-size"), ("fit", ["--max-pixels", "-5"], "--max-pixels"),
    ("fit", ["--ridge", "-1e-3"], "--ridge"), ("fit", ["--ridge", "nan"], "--ridge"),
    ("fit", ["--max-condition", "1"], "--max-condition"), ("fit", ["--max-condition", "inf"], "--max-condition"),
    ("fit", ["--device", "bogus"], "--device"), ("fit", ["--device", "tpu"], "--device"),
    ("score", ["--threshold", "-1"], "--threshold"), ("score", ["--threshold", "nan"], "--threshold"),
    ("score", ["--threshold", "inf"], "--threshold"),
    ("score", ["--map-range", "5", "1"], "--map-range"), ("score", ["--map-range", "2", "2"], "--map-range"),
    ("score", ["--map-range", "0", "nan"], "--map-range"), ("score", ["--map-range", "-inf", "1"], "--map-range"),
    ("score", ["--overlay-max-side", "0"], "--overlay-max-side"), ("score", ["--tile", "0"], "--tile"),
    ("score", ["--device", "cuda:x"], "--device"),
    ("sample", ["--heat", "-1"], "--heat"), ("sample", ["--heat", "nan"], "--heat"),
    ("sample", ["--heat", "inf"], "--heat"), ("sample", ["--heat", "hot"], "--heat"),
    ("sample", ["--samples", "0"], "--samples"), ("sample", ["--seed", "-1"], "--seed"),
    ("sample", ["--seed", str(2 ** 40)], "--seed"), ("sample", ["--upper", "nan"], "--upper"),
    ("sample", ["--lower", "-inf"], "--lower"), ("sample", ["--upper", "0", "--lower", "1"], "--lower"),
    ("sample", ["--upper", "1", "--lower", "1"], "--upper"),
    ("sample", ["--max-lr-pixels", "0"], "--max-lr-pixels"), ("sample", ["--min-size", "-2"], "--min-size"),
    ("sample", ["--max-pixels", "0"], "--max-pixels"), ("sample", ["--device", "bogus"], "--device"),
    ("correlate", ["--false-alarm", "2"], "--false-alarm"), ("correlate", ["--false-alarm", "0"], "--false-alarm"),
    ("correlate", ["--false-alarm", "1"], "--false-alarm"), ("correlate", ["--false-alarm", "nan"], "--false-alarm"),
    ("correlate", ["--bins", "0"], "--bins"), ("correlate", ["--bootstrap", "-1"], "--bootstrap"),
    ("correlate", ["--seed", "-4"], "--seed"),
    ("audit", ["--heat", "-1"], "--heat"), ("audit", ["--heat", "nan"], "--heat"),
    ("audit", ["--heat", "inf"], "--heat"),
    ("audit", ["--false-alarm", "1.5"], "--false-alarm"), ("audit", ["--false-alarm", "-0.1"], "--false-alarm"),
    ("audit", ["--seed", "x"], "--seed"), ("audit", ["--device", "bogus"], "--device"),
    ("audit", ["--cpu-memory", "fast"], "--cpu-memory"), ("score", ["--cpu-memory", ""], "--cpu-memory"),
    ("toy", ["--steps", "0"], "--steps"), ("toy", ["--steps", "-10"], "--steps"), ("toy", ["--seed", "-1"], "--seed"),
    ("inspect", ["--device", "bogus"], "--device"),
]


@pytest.mark.parametrize("cmd,extra,option", BAD, ids=[f"{c}{' '.join(e)}" for c, e, _ in BAD])
def test_bad_values_exit_2_with_one_line_naming_the_option(cmd, extra, option, base, guard, capsys):
    assert main(base[cmd] + extra) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert option in lines[0] and "Traceback" not in cap.err + cap.out
    assert cap.out == ""


def test_cuda_refused_on_a_machine_without_it(base, guard, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(base["sample"] + ["--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("cmd,extra", [
    ("sample", ["--heat", "0", "--seed", "0", "--samples", "1", "--lower=-1e3", "--upper", "1e3"]),
    ("score", ["--threshold", "0", "--map-range", "0", "1e-6", "--margin", "0"]),
    ("fit", ["--ridge", "0", "--max-condition", "1.5", "--device", "cpu"]),
    ("correlate", ["--false-alarm", "0.999", "--bins", "1", "--bootstrap", "1", "--seed", str(opt.MAX_SEED)]),
    ("audit", ["--heat", "0", "--false-alarm", "1e-6", "--device", "auto"]),
    ("toy", ["--steps", "1"]),
])
def test_values_at_the_limits_are_accepted(cmd, extra, base, guard):
    with pytest.raises(Ran):
        main(base[cmd] + extra)


def test_usage_errors_of_argparse_are_one_line(capsys):
    assert main(["sample", "--bogus"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["audit", "--budget", "huge"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--budget" in err


def test_help_states_the_ranges(capsys):
    for cmd, words in [("sample", ["an integer >= 1", "a number >= 0"]), ("correlate", ["in (0, 1)"]),
                       ("toy", ["an integer >= 1"]), ("audit", ["a number >= 0", "in (0, 1)"])]:
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for w in words:
            assert w in out, (cmd, w)


@pytest.mark.parametrize("mode", ["system", "reuse"])
def test_cpu_memory_mode_is_applied_before_the_command_runs(mode, base, guard, monkeypatch):
    from robustness_diag import allocator
    seen = []
    monkeypatch.setattr(allocator, "use", lambda m: seen.append(m) or True)
    with pytest.raises(Ran):
        main(base["sample"] + ([] if mode == "reuse" else ["--cpu-memory", mode]))
    assert seen == [mode]


def test_cpu_memory_reaches_the_engine_options():
    from robustness_diag.analyses.engines import EngineOptions, engine_problem
    from robustness_diag.cli.engine_args import engine_options
    args = build_parser().parse_args(["score", "bundled:sr4x_affine", "--stats", "s", "--images", "a", "--out", "o",
                                      "--engine", "ray", "--cpu-memory", "system"])
    assert engine_options(args).cpu_memory == "system"
    assert "--cpu-memory must be one of reuse, system" in engine_problem(EngineOptions(cpu_memory="lots"))
