"""``robustness-diag inspect``: reports, JSON, and clean failures with exit codes (in-process and one subprocess)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from robustness_diag.cli.main import main
from tests.synth import build_state_dict, read_manifest, reduce_manifest, write_variant, write_yaml_config


@pytest.fixture
def ckpt(tmp_path):
    def make(name="SRFlow_DF2K_4X", kind="raw", **kw):
        sd = build_state_dict(reduce_manifest(read_manifest(name), nb=5, K=2), seed=0)
        path = tmp_path / f"{name}_{kind}.pth"
        write_variant(sd, path, kind, **kw)
        return path
    return make


def test_text_report_and_verdicts(ckpt, capsys):
    code = main(["inspect", str(ckpt("SRFlow_DF2K_4X")), str(ckpt("rNF_4X_RQs"))])
    out = capsys.readouterr().out
    assert code == 0
    assert "family      srflow" in out and "family      robustnf" in out
    assert "UNBOUNDED-IN-PRACTICE INVERSE" in out and "BOUNDED INVERSE: RQ-spline" in out
    assert "defaulted   " in out and "2 of 2 checkpoints inspected" in out


def test_json_report_fields(ckpt, capsys):
    code = main(["inspect", str(ckpt("NCSR_4X")), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert code == 0
    assert rep["family"] == "ncsr" and rep["scale"] == 4 and rep["K_per_level"] == [2, 2, 2]
    assert rep["coupling_inverse_bound"]["max_inverse_slope"] == pytest.approx(1e4)
    assert rep["sources"]["blocks"] == "defaulted" and rep["sources"]["nb"] == "inferred"
    assert rep["nonfinite_tensors"] == [] and rep["invconv_condition_number"]["max"] < 1.01
    assert "flowUpsamplerNet.f (never run in forward)" in rep["unused_keys"]


@pytest.mark.parametrize("kind,error", [("truncated", "ArchitectureMismatchError"),
                                        ("training_state", "TrainingStateError"),
                                        ("not_checkpoint", "NotACheckpointError"),
                                        ("truncated_file", "NotACheckpointError"),
                                        ("malicious_pickle", "UnsafeCheckpointError")])
def test_bad_files_fail_cleanly(ckpt, tmp_path, capsys, kind, error):
    marker = tmp_path / "marker"
    extra = {"marker": marker} if kind == "malicious_pickle" else {}
    path = ckpt(kind=kind, **extra)
    code = main(["inspect", str(path)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"ERROR ({error})" in out and str(path) in out and "Traceback" not in out
    assert not marker.exists()


def test_one_bad_file_does_not_stop_the_others(ckpt, capsys):
    code = main(["inspect", str(ckpt(kind="not_checkpoint")), str(ckpt("rNF_4X_AffReparam"))])
    out = capsys.readouterr().out
    assert code == 1 and "1 of 2 checkpoints inspected" in out and "family      robustnf" in out


def test_4x_weights_with_8x_yaml(ckpt, tmp_path, capsys):
    yml = tmp_path / "8X.yml"
    write_yaml_config(yml, scale=8,
                      network_G={"nb": 5, "flow": {"K": 2, "L": 4, "stackRRDB": {"blocks": [0, 1, 3, 4]}}})
    code = main(["inspect", str(ckpt()), "--config", str(yml)])
    out = capsys.readouterr().out
    assert code == 1 and "missing keys" in out and "RRDB.upconv3.weight" in out


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["inspect"]) == 2
    assert main(["inspect", str(tmp_path / "nope.pth")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["inspect", "--bogus"]) == 2


def test_demo_and_console_script(tmp_path):
    """One end-to-end subprocess run of the installed entry point, as the README's main job does."""
    proc = subprocess.run([sys.executable, "-m", "robustness_diag.cli.main", "inspect", "--demo", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["robustnf_4x_rqspline_demo.pth",
                                                              "srflow_4x_affine_demo.pth"]
    assert proc.stdout.count("VERDICT") == 2
