"""Exceptions raised while reading, recognising or rebuilding checkpoints. Each message names the file and reason."""
from __future__ import annotations


class CheckpointError(Exception):
    """Base class: a checkpoint could not be used. ``path`` is the offending file (may be None for in-memory dicts)."""

    def __init__(self, message: str, path=None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class NotACheckpointError(CheckpointError):
    """The file is not a PyTorch (zip/legacy) or safetensors checkpoint, or it is truncated/corrupt."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle needs objects beyond tensors and plain containers; it was refused without executing anything."""


class TrainingStateError(CheckpointError):
    """The file is a training-state file (epoch/iter/optimizer/scheduler), not network weights."""


class UnsupportedFlowError(CheckpointError):
    """The weights were recognised as a family/variant that cannot be rebuilt (yet)."""


class ArchitectureMismatchError(CheckpointError):
    """The weights do not fit the architecture inferred from them or given by a config.

    Attributes ``missing``, ``unexpected`` (key lists) and ``mismatched`` (``(key, file_shape, model_shape)``).
    """

    def __init__(self, message: str, path=None, missing=(), unexpected=(), mismatched=()):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        super().__init__(message, path)


class ConfigError(CheckpointError):
    """A user-supplied YAML config could not be read or contradicts the weights."""
