"""One bad checkpoint never stops a batch: ``inspect`` and ``audit`` over good and malformed checkpoints report the
good ones, name every bad one with its reason, exit 1 (some inputs failed) and never print a traceback."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import robustness_diag as rd
from robustness_diag.cli.main import main
from tests.malformed import write_bad
from tests.ood.helpers import tiny_flow

#: the malformed kinds of each batch (tests/malformed.py), with the NaN-weight checkpoint added to both
INSPECT_BAD = ("corrupt_header", "header_length", "truncated_safetensors", "truncated_pth_renamed", "random_bytes",
               "empty", "extra_layer_huge", "extra_layer_40", "absurd_width", "absurd_header")
AUDIT_BAD = ("corrupt_header", "truncated_safetensors", "truncated_pth_renamed", "random_bytes", "extra_layer_huge",
             "absurd_width")
#: the audit at a tiny budget, through the real command line (the budget table is patched in the child process)
AUDIT_SCRIPT = """
import sys
from robustness_diag.analyses.audit import config as C
C.BUDGETS["fast"].update(images=2, lr_size=12, samples=2, levels=(3,), fit_images=2, attack_images=1, attack_steps=2,
                         bootstrap=10)
from robustness_diag.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """``(good paths, {name: (bad path, words of its reason)})``: an own and a raw-.pth good flow, a .pth renamed
    .safetensors (read by its content: good), every malformed kind, and a flow with a NaN conditioner weight."""
    d = tmp_path_factory.mktemp("batch")
    own = rd.save_flow(tiny_flow(), d / "good.safetensors")
    state = {k: v.clone() for k, v in tiny_flow().state_dict().items()}
    torch.save(state, d / "good.pth")
    torch.save(state, d / "renamed_pth.safetensors")
    bad = {kind: write_bad(kind, d, own, state) for kind in set(INSPECT_BAD) | set(AUDIT_BAD)}
    nan = {k: v.clone() for k, v in state.items()}
    nan["RRDB.conv_first.weight"][0, 0, 0, 0] = float("nan")
    torch.save(nan, d / "nan_weights.pth")
    bad["nan_weights"] = (d / "nan_weights.pth", ["NaN/Inf", "RRDB.conv_first.weight"])
    return [own, d / "good.pth", d / "renamed_pth.safetensors"], bad


def _run(argv, script=None, timeout=600):
    cmd = [sys.executable, "-c", script, *argv] if script else [sys.executable, "-m", "robustness_diag.cli.main",
                                                                 *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    return proc


def test_inspect_batch_reports_good_and_names_every_bad_one(batch):
    good, bad = batch
    kinds = list(INSPECT_BAD) + ["nan_weights"]
    paths = [good[0], bad["corrupt_header"][0], good[1]] + [bad[k][0] for k in kinds[1:]] + [good[2]]
    proc = _run(["inspect", "--json", *map(str, paths)])
    assert proc.returncode == 1, proc.stderr
    reports = {r["path"]: r for r in json.loads(proc.stdout)}
    assert len(reports) == len(paths)
    for p in good:
        r = reports[str(p)]
        assert r["status"] in ("ok", "warning") and r["family"] == "srflow", r
    assert reports[str(good[2])]["format"] == "torch-zip"             # a .pth named .safetensors: read as a .pth
    for k in INSPECT_BAD:
        path, words = bad[k]
        r = reports[str(path)]
        assert r["status"] == "error" and r["error"].startswith(f"{path}: "), (k, r)
        assert r["error_type"].endswith("Error") and all(w in r["error"] for w in words), (k, r)
    r = reports[str(bad["nan_weights"][0])]
    assert r["status"] == "fail" and "NaN/Inf" in r["verdict"] and r["nonfinite_tensors"] == ["RRDB.conv_first.weight"]


def test_inspect_text_summary_names_the_failed(batch, capsys):
    good, bad = batch
    paths = [good[0], bad["random_bytes"][0], bad["extra_layer_huge"][0], bad["nan_weights"][0]]
    assert main(["inspect", *map(str, paths)]) == 1
    out = capsys.readouterr().out
    assert "1 of 4 checkpoints inspected; failed: " in out and "VERDICT     FAIL" in out
    assert "ERROR (NotACheckpointError)" in out and "ERROR (MalformedCheckpointError)" in out
    assert main(["inspect", str(bad["empty"][0]), str(bad["absurd_width"][0])]) == 1    # all failed: still 1
    assert "0 of 2 checkpoints inspected" in capsys.readouterr().out


def test_inspect_unforeseen_failure_is_an_internal_error_row(batch, monkeypatch, capsys):
    from robustness_diag.flows import inspect as I
    good, _ = batch
    real = I.inspect_flow

    def flaky(flow):
        if flow.info["format"] == "torch-zip":
            raise ZeroDivisionError("division by zero")
        return real(flow)

    monkeypatch.setattr(I, "inspect_flow", flaky)
    assert main(["inspect", "--json", str(good[1]), str(good[0])]) == 1
    first, second = json.loads(capsys.readouterr().out)
    assert first["status"] == "error" and first["error"] == \
        f"{good[1]}: internal error: ZeroDivisionError: division by zero"
    assert second["family"] == "srflow"


def test_audit_batch_audits_the_good_and_names_every_bad_one(batch, tmp_path):
    good, bad = batch
    kinds = list(AUDIT_BAD) + ["nan_weights"]
    out = tmp_path / "audit"
    proc = _run(["audit", str(bad["corrupt_header"][0]), str(good[0]), *[str(bad[k][0]) for k in kinds[1:]],
                 "--out", str(out), "--no-progress"], script=AUDIT_SCRIPT)
    assert proc.returncode == 1, proc.stderr
    assert "good.safetensors (affine): " in proc.stdout
    failures = {f["checkpoint"]: f["error"] for f in json.loads((out / "audit.json").read_text())["failures"]}
    assert len(failures) == len(kinds)
    for k in kinds:
        path, words = bad[k]
        assert f"{path}: NOT AUDITED: " in proc.stderr, (k, proc.stderr)
        assert all(w in failures[str(path)] for w in words), (k, failures[str(path)])
    assert "statistics refused" in failures[str(bad["nan_weights"][0])]
    assert [m["name"] for m in json.loads((out / "audit.json").read_text())["models"]] == ["good.safetensors"]


def test_audit_unforeseen_failure_is_an_entry_and_the_others_go_on(monkeypatch, tmp_path):
    from robustness_diag.analyses import audit as A
    from robustness_diag.analyses.audit import pipeline as P
    from robustness_diag.flows.errors import NotACheckpointError

    def measure(spec, *a, **k):
        if spec == "a.pth":
            raise KeyError("fea_up1")
        raise NotACheckpointError("not a checkpoint", spec)

    monkeypatch.setattr(P, "measure_model", measure)
    res = A.run(A.AuditConfig(checkpoints=["a.pth", "b.pth"], out=str(tmp_path / "o"), progress=False))
    assert res.failures == [{"checkpoint": "a.pth", "error": "a.pth: internal error: KeyError: 'fea_up1'"},
                            {"checkpoint": "b.pth", "error": "b.pth: not a checkpoint"}]
    assert res.summaries == [] and (tmp_path / "o" / "audit.json").is_file()
