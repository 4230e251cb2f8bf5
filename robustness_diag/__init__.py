"""robustness-diag: OOD diagnostics and exploding-inverse detection for conditional normalizing flows.

Public surface::

    import robustness_diag as rd
    flow = rd.load_flow("model.pth")      # own .safetensors, third-party .pth, or "bundled:<name>"
    flow.info; flow.log_prob(hr, lr); flow.decode(lr, heat=0.9, generator=g); flow.sample(lr); flow.features(lr)
"""
__version__ = "0.1.0"

from .flows.config import FlowConfig  # noqa: E402
from .flows.errors import CheckpointError  # noqa: E402
from .flows.loading import load_flow, save_flow  # noqa: E402
from .flows.base import Flow, SamplingPlan  # noqa: E402
from .flows.network import SRFlowFamily, build_flow  # noqa: E402
from .flows.digest import weights_digest  # noqa: E402
from . import allocator, detect, ood  # noqa: E402

__all__ = ["__version__", "load_flow", "save_flow", "build_flow", "FlowConfig", "Flow", "SamplingPlan", "SRFlowFamily",
           "CheckpointError", "weights_digest", "ood", "detect", "allocator"]
