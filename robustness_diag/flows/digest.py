"""Content digest of a flow's weights: identifies "the same checkpoint" across file formats, devices and dtypes."""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def weights_digest(module: nn.Module) -> str:
    """SHA-256 (hex) of the module's state_dict: names, shapes and float32 values, in sorted name order.

    Floating tensors are hashed as float32 so that ``.double()`` or ``.cuda()`` copies of a float32 checkpoint keep
    their digest; the same weights loaded from ``.pth`` or ``.safetensors`` give the same digest.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.float32)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()
