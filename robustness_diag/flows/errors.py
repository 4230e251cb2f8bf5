"""Exceptions raised while reading, recognising or rebuilding checkpoints. Each message names the file and reason."""
from __future__ import annotations


class CheckpointError(Exception):
    """Base class: a checkpoint could not be used. ``path`` is the offending file (may be None for in-memory dicts)."""

    def __init__(self, message: str, path=None):
        self.path = None if path is None else str(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}" if self.path else message)

    def with_path(self, path) -> "CheckpointError":
        """Names ``path`` in the message when the error was raised without one (e.g. by recognition, which sees only
        the tensors); returns ``self`` so that ``raise e.with_path(p)`` works."""
        if self.path is None and path is not None:
            self.path = str(path)
            self.args = (f"{self.path}: {self.reason}",) + tuple(self.args[1:])
        return self


class NotACheckpointError(CheckpointError):
    """The file is not a PyTorch (zip/legacy) or safetensors checkpoint, or it is truncated/corrupt."""


class MalformedCheckpointError(CheckpointError):
    """The file was read, but what it describes is impossible or absurd: a size inferred from the key patterns or
    given in the header beyond sane limits (a layer index of millions, 60 levels, a million channels), a header
    that does not parse as a configuration, or an interpretation step that failed on it. Refused before anything
    of that size is built."""


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


def internal_error(e: BaseException) -> str:
    """``"internal error: <type>: <first line of the message>"``: how a command reports an unforeseen failure of one
    input (a checkpoint, an image) as that input's reason, without a traceback, before going on with the others."""
    lines = str(e).strip().splitlines()
    return f"internal error: {type(e).__name__}" + (f": {lines[0][:300]}" if lines else "")
