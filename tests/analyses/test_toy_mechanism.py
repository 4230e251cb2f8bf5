"""The toy mechanism analysis writes its JSON and figure atomically with one row per coupling and condition."""
from __future__ import annotations

import json

from robustness_diag.analyses.toy_mechanism import ToyMechanismConfig, run
from robustness_diag.cli.main import main
from robustness_diag.io import json_text


def test_toy_mechanism_outputs(tmp_path):
    from robustness_diag.reports.toy_figures import plot_layer_variance

    res = run(ToyMechanismConfig(out=str(tmp_path), steps=30, samples=200, conditions=[0.0, 30.0]),
              plot=plot_layer_variance)
    on_disk = json.loads((tmp_path / "toy_mechanism.json").read_text())
    assert on_disk == json.loads(json_text(res.to_dict()))
    assert res.paths == {"json": tmp_path / "toy_mechanism.json", "figure": tmp_path / "toy_layer_variance.png"}
    assert set(res.couplings) == {"affine", "rqspline"}
    for r in res.couplings.values():
        assert set(r["conditions"]) == {"0.0", "30.0"}
        row = r["conditions"]["30.0"]
        assert len(row["variance"]) == len(row["layers"]) == 12
    assert res.couplings["rqspline"]["conditions"]["30.0"]["max_deviation_from_translation"] <= 1.0 + 1e-6
    png = (tmp_path / "toy_layer_variance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*.tmp*"))


def test_toy_command(tmp_path, capsys):
    assert main(["toy", "--out", str(tmp_path), "--steps", "20"]) == 0
    assert (tmp_path / "toy_mechanism.json").is_file() and (tmp_path / "toy_layer_variance.png").is_file()
    assert "max inverse slope" in capsys.readouterr().out
