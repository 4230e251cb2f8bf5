"""Errors of the OOD module. Each message names the file (where there is one) and the reason."""
from __future__ import annotations


class OODError(Exception):
    """Base class of the OOD module's errors."""


class NotFittedError(OODError):
    """Statistics were asked for before anything was accumulated (or from fewer than two positions)."""


class StatsFileError(OODError):
    """A statistics file that is missing, unreadable, or not one written by robustness-diag."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NonFiniteStatisticsError(OODError, ValueError):
    """NaN/Inf where statistics must be finite: conditioner features streamed into a fit (the image is refused and
    nothing of it is accumulated), the fitted moments or factors (the fit is refused), or the tensors of a loaded
    statistics file (see :class:`StatsFileError`). The message names the level, how many values are non-finite and
    the likely cause (non-finite weights, an overflow)."""


class StatsMismatchError(OODError):
    """Statistics that do not belong to the flow or the features at hand (other checkpoint, level, channels)."""
