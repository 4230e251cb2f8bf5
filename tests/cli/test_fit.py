"""``robustness-diag fit``: statistics written with their provenance, exit codes 0/1/2, usage errors."""
from __future__ import annotations

import pytest
import torch

import robustness_diag as rd
from robustness_diag.cli.main import main
from robustness_diag.ood import MahalanobisScorer
from tests.ood.helpers import one_thread, smooth_rgb, tiny_flow, write_png  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(tmp_path, one_thread):
    ck = rd.save_flow(tiny_flow(), tmp_path / "tiny.safetensors")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        write_png(imgs / f"i{i}.png", smooth_rgb(16, 20, seed=i))
    return ck, imgs


def test_fit_writes_statistics_with_options(setup, tmp_path, capsys):
    ck, imgs = setup
    out = tmp_path / "s.safetensors"
    code = main(["fit", str(ck), "--images", str(imgs), "--out", str(out), "--level", "fea_up1", "--level",
                 "fea_up0", "--channels", "0:8", "--shrinkage", "ridge", "--ridge", "0.01", "--device", "cpu",
                 "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "3 of 3 images used for the fit" in text and "fea_up0:" in text and f"statistics: {out}" in text
    sc = MahalanobisScorer.load(out)
    assert sc.level_names == ["fea_up1", "fea_up0"] and sc.meta["channels"] == list(range(8))
    assert sc.meta["shrinkage"] == "ridge" and sc.meta["ridge"] == 0.01
    assert sc.meta["pixel_count"] == {"fea_up1": 2 * 16 * 20, "fea_up0": 2 * 8 * 10}   # i0.png is held out
    assert sc.levels["fea_up1"].dim == 8
    cal = sc.meta["threshold_calibration"]
    assert cal["held_out"] == [0] and set(cal["levels"]) == {"fea_up1", "fea_up0"}
    assert cal["levels"]["fea_up1"]["n_positions"] == (16 - 6) * (20 - 6)     # border margin 3 left out
    assert cal["levels"]["fea_up0"]["n_positions"] == (8 - 6) * (10 - 6)
    assert "Gaussian: 2 image(s); threshold calibration: 1 held-out image(s)" in text


def test_fit_calibration_fraction_and_border_margin_options(setup, tmp_path, capsys):
    ck, imgs = setup
    out = tmp_path / "s.safetensors"
    base = ["fit", str(ck), "--images", str(imgs), "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(base + ["--calibration-fraction", "0"]) == 0
    sc = MahalanobisScorer.load(out)
    assert sc.meta["pixel_count"] == {"fea_up1": 3 * 16 * 20} and not sc.threshold_info()["calibrated"]
    assert sc.meta["threshold_calibration"]["reason"].startswith("calibration fraction 0")
    assert "threshold calibration: none (calibration fraction 0" in capsys.readouterr().out
    assert main(base + ["--overwrite", "--calibration-fraction", "0.5", "--border-margin", "0"]) == 0
    cal = MahalanobisScorer.load(out).meta["threshold_calibration"]
    assert cal["held_out"] == [0, 2] and cal["levels"]["fea_up1"]["n_positions"] == 2 * 16 * 20
    assert cal["levels"]["fea_up1"]["border_margin"] == 0 and cal["fraction"] == 0.5
    assert main(base + ["--overwrite", "--calibration-fraction", "1"]) == 2
    assert "--calibration-fraction: must be a number in [0, 1)" in capsys.readouterr().err


def test_fit_exit_1_lists_failed_files(setup, tmp_path, capsys):
    ck, imgs = setup
    (imgs / "broken.png").write_text("nope")
    code = main(["fit", str(ck), "--images", str(imgs), "--out", str(tmp_path / "s.safetensors"), "--no-progress"])
    text = capsys.readouterr().out
    assert code == 1 and "FAILED broken.png: not a recognised image file" in text
    assert (tmp_path / "s.safetensors").is_file()          # fitted from the three good images


@pytest.mark.parametrize("args,message", [
    (["fit", "missing.pth", "--images", "IMGS", "--out", "o.safetensors"], "checkpoint not found"),
    (["fit", "CKPT", "--images", "nowhere", "--out", "o.safetensors"], "no such file or folder"),
    (["fit", "CKPT", "--images", "IMGS", "--out", "o.safetensors", "--tile", "0"], "--tile: must be an integer >= 1"),
    (["fit", "CKPT", "--images", "IMGS", "--out", "o.safetensors", "--channels", "0:99"], "out of range"),
    (["fit", "CKPT", "--images", "IMGS", "--out", "o.safetensors", "--level", "fea_up8"], "fea_up8"),
])
def test_usage_errors_exit_2(setup, tmp_path, capsys, monkeypatch, args, message):
    ck, imgs = setup
    monkeypatch.chdir(tmp_path)
    args = [str(ck) if a == "CKPT" else str(imgs) if a == "IMGS" else a for a in args]
    assert main(args + ["--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_argparse_usage_error_is_2(capsys):
    assert main(["fit", "--shrinkage", "bogus"]) == 2


def test_api_and_command_write_the_same_statistics(setup, tmp_path):
    """``rd.ood.fit_flow`` and ``robustness-diag fit`` are one fit path: same tensors, same metadata keys, same
    values apart from paths and times."""
    import json

    from safetensors import safe_open

    from robustness_diag.data.images import list_images, read_image

    ck, imgs = setup
    cli_out, api_out = tmp_path / "cli.safetensors", tmp_path / "api.safetensors"
    assert main(["fit", str(ck), "--images", str(imgs), "--out", str(cli_out), "--level", "fea_up1", "--level",
                 "fea_up0", "--channels", "0:12", "--shrinkage", "ledoit-wolf", "--device", "cpu",
                 "--no-progress"]) == 0
    flow = rd.load_flow(str(ck), device="cpu").eval()
    images = (read_image(it.path).image for it in list_images([str(imgs)]))
    opts = rd.ood.FeatureOptions(levels=["fea_up1", "fea_up0"], channels="0:12")
    rd.ood.fit_flow(flow, images, opts, shrinkage="ledoit-wolf").save(api_out)

    def read(path):
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}

    (h_cli, t_cli), (h_api, t_api) = read(cli_out), read(api_out)
    assert t_cli.keys() == t_api.keys()
    for k in t_cli:
        assert torch.equal(t_cli[k], t_api[k]), k
    assert h_cli.keys() == h_api.keys()
    assert {k: v for k, v in h_cli.items() if k != "meta"} == {k: v for k, v in h_api.items() if k != "meta"}
    m_cli, m_api = json.loads(h_cli["meta"]), json.loads(h_api["meta"])
    assert m_cli.keys() == m_api.keys()
    volatile = {"checkpoint", "images", "created", "fit_seconds"}          # paths and times
    assert {k: v for k, v in m_cli.items() if k not in volatile} == {k: v for k, v in m_api.items()
                                                                       if k not in volatile}
    assert m_cli["n_images"] == 2 and m_cli["input"] == "lr" and m_cli["n_failed"] == 0
    assert m_cli["threshold_calibration"]["status"] == "calibrated"       # the same threshold, both ways
    assert m_cli["threshold_calibration"]["held_out"] == [0]
