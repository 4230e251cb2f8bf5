"""One home for choosing the compute device: every command and API entry point resolves ``--device`` here."""
from __future__ import annotations

from typing import Optional, Union

import torch

#: The default of every command's ``--device``: CUDA when available, else the CPU.
DEFAULT_DEVICE = "auto"
#: The help text of every command's ``--device`` option.
DEVICE_HELP = ("where to compute: auto (CUDA when available, else the CPU; the default), cpu, cuda, or cuda:N; "
               "results agree across devices up to float32 round-off")


def resolve_device(name: Optional[Union[str, torch.device]] = DEFAULT_DEVICE) -> torch.device:
    """``"auto"`` (or None/"") -> ``cuda`` when available else ``cpu``; any other name is checked.

    Raises:
        ValueError: naming the option value and the reason (not a device name, or CUDA is not available).
    """
    if isinstance(name, torch.device):
        dev = name
    elif name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(str(name))
        except (RuntimeError, ValueError):
            raise ValueError(f"--device {name}: not a device name (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return dev


__all__ = ["DEFAULT_DEVICE", "DEVICE_HELP", "resolve_device"]
