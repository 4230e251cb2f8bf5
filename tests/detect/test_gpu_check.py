"""benchmarks/gpu_check.py: its comparison logic (CPU vs CPU here, CPU vs CUDA with the gpu marker)."""
from __future__ import annotations

import pytest
import torch

from tests.detect.helpers import load_benchmark, lr_batch, tiny_flow

@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark("gpu_check")


def test_same_device_comparison_agrees_exactly(gpu_check):
    st = gpu_check.compare(tiny_flow("affine"), lr_batch(2), "cpu", "cpu", torch.float32, n_samples=2)
    assert st["samples"] == 4 and st["artifact_mask_disagreement"] == 0.0 and st["attribution_disagreement"] == 0.0
    assert st["explosion_map_max_rel_err_calm"] == 0.0 and st["first_layer_equal"]
    assert gpu_check.agreement_failures(st, strict=True) == []
    bad = dict(st, artifact_mask_disagreement=0.01, explosion_map_max_rel_err_calm=1e-3)
    assert len(gpu_check.agreement_failures(bad, strict=True)) == 2
    assert len(gpu_check.agreement_failures(bad, strict=False)) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_exits_cleanly_without_cuda(gpu_check, capsys):
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["affine", "rqspline"])
def test_cpu_and_cuda_traces_agree(gpu_check, variant):
    flow = tiny_flow(variant)
    st = gpu_check.compare(flow, lr_batch(2), "cpu", "cuda", torch.float64, n_samples=2)
    assert gpu_check.agreement_failures(st, strict=True) == []
    syncs = gpu_check.count_syncs(flow.to("cuda"), lr_batch(2).cuda())
    assert syncs["traced"] <= syncs["plain"]
