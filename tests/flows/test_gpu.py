"""CUDA agreement of the flow core (skipped cleanly without a GPU)."""
from __future__ import annotations

import pytest
import torch

import robustness_diag as rd
from robustness_diag.flows.config import FlowConfig
from robustness_diag.flows.synthetic import randomize_flow

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("fields", [dict(), dict(family="robustnf", coupling="rqspline", coupling_attr="rqspline",
                                                 std_channels=3, S=[0, 2, 2], frozen_invconv=True, residual=True)])
def test_cuda_matches_cpu(fields):
    flow = randomize_flow(rd.build_flow(FlowConfig(nb=5, K=2, blocks=[0, 1, 3, 4], **fields)), seed=0)
    lr = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    hr = flow.upsample(lr)
    with torch.no_grad():
        cpu = flow.sample(lr, heat=0.9, generator=torch.Generator().manual_seed(1))
        lp_cpu = flow.log_prob(hr, lr)
        flow.to("cuda")
        gpu = flow.sample(lr.cuda(), heat=0.9, generator=torch.Generator().manual_seed(1))
        lp_gpu = flow.log_prob(hr.cuda(), lr.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lp_gpu.cpu(), lp_cpu, rtol=1e-5, atol=1e-2)
