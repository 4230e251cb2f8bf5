"""Reading checkpoint files safely: third-party ``.pth`` (``weights_only=True`` only) and own ``.safetensors``.

Audited files are untrusted: nothing here ever unpickles arbitrary objects. A pickle that asks for anything beyond
tensors and plain containers is refused with :class:`UnsafeCheckpointError` and nothing in it runs.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import NotACheckpointError, TrainingStateError, UnsafeCheckpointError

#: Dict wrappers seen around state_dicts, in order of preference (EMA weights first, as BasicSR-style tools do).
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "netG", "net_g", "generator")
TRAINING_STATE_KEYS = {"epoch", "iter", "optimizers", "schedulers", "optimizer", "scheduler"}


@dataclass
class RawCheckpoint:
    """Tensors read from a file, before any interpretation.

    Attributes:
        path: the file.
        format: "safetensors", "torch-zip" or "torch-legacy".
        state: ``OrderedDict[str, Tensor]`` after unwrapping and stripping ``module.``.
        metadata: safetensors header metadata (own checkpoints carry ``config``/``provenance`` JSON there).
        notes: what was done to get there (wrapper used, prefix stripped, non-float32 tensors).
    """

    path: Path
    format: str
    state: "OrderedDict[str, torch.Tensor]"
    metadata: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def _sniff(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch-legacy"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def read_checkpoint(path) -> RawCheckpoint:
    """Reads ``path`` into a :class:`RawCheckpoint`; raises a :class:`CheckpointError` subclass naming the reason."""
    path = Path(path)
    if not path.is_file():
        raise NotACheckpointError("no such file" if not path.exists() else "not a regular file", path)
    kind = _sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind == "unknown":
        raise NotACheckpointError("not a checkpoint: neither a PyTorch file (zip or legacy pickle) nor safetensors "
                                  f"(first bytes {_head_hex(path)})", path)
    obj = _torch_load(path, kind)
    state, notes = unwrap_state_dict(obj, path)
    return RawCheckpoint(path, kind, state, {}, notes)


def _head_hex(path: Path) -> str:
    with open(path, "rb") as fh:
        return fh.read(8).hex(" ")


def _torch_load(path: Path, kind: str):
    if kind == "torch-zip":
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
            if bad is not None:
                raise NotACheckpointError(f"corrupt zip archive (bad CRC in {bad!r})", path)
        except zipfile.BadZipFile as e:
            raise NotACheckpointError(f"truncated or corrupt PyTorch zip archive ({e})", path) from None
    try:
        # an open file, not the path: torch.load hands any path ending in ".safetensors" to the safetensors reader,
        # so a renamed .pth would fail there; the content (sniffed above) decides the reader here
        with open(path, "rb") as fh:
            return torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        detail = next((ln for ln in reason if "GLOBAL" in ln or "Unsupported" in ln), reason[0] if reason else "")
        raise UnsafeCheckpointError("refused: the pickle asks for objects beyond tensors and plain containers, "
                                    f"which could run code ({detail.strip()}); it was not executed", path) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # any failure of the reader on a malformed file (native errors included) is the file's
        raise NotACheckpointError(f"unreadable PyTorch file, truncated or corrupt ({_describe(e)})", path) from None


def _describe(e: BaseException) -> str:
    """``"Type: first line of the message"`` of a reader's exception (long native messages cut)."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def _read_safetensors(path: Path) -> RawCheckpoint:
    from safetensors import SafetensorError, safe_open
    try:
        state = OrderedDict()
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            for k in fh.keys():
                state[k] = fh.get_tensor(k)
    except (SafetensorError, OSError, ValueError) as e:
        raise NotACheckpointError(f"unreadable safetensors file, truncated or corrupt ({e})", path) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the native reader's panics derive from BaseException; a bad file must not escape
        raise NotACheckpointError(f"unreadable safetensors file, truncated or corrupt ({_describe(e)})",
                                  path) from None
    for k in ("config", "provenance"):
        if k in metadata:
            try:
                metadata[k] = json.loads(metadata[k])
            except (json.JSONDecodeError, RecursionError):
                raise NotACheckpointError(f"safetensors metadata field {k!r} is not valid JSON", path) from None
    return RawCheckpoint(path, "safetensors", state, metadata, [])


def unwrap_state_dict(obj, path=None) -> tuple["OrderedDict[str, torch.Tensor]", list]:
    """Finds the state_dict inside a loaded object: raw dict, ``module.`` prefixes, or a known wrapper.

    Returns ``(state, notes)``. Raises :class:`TrainingStateError` for training-state files and
    :class:`NotACheckpointError` when no tensor dict is found.
    """
    notes = []
    if not isinstance(obj, dict):
        raise NotACheckpointError(f"the file holds a {type(obj).__name__}, not a dict of tensors", path)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                inner, inner_notes = unwrap_state_dict(obj[key], path)
                return inner, [f"unwrapped '{key}'"] + inner_notes
        if TRAINING_STATE_KEYS & set(obj):
            found = sorted(TRAINING_STATE_KEYS & set(obj))
            raise TrainingStateError(f"this is a training-state file (keys {found}), not network weights; load the "
                                     "matching *_G.pth / model file instead", path)
        raise NotACheckpointError(f"no tensors found (top-level keys: {sorted(map(str, obj))[:10]})", path)
    others = sorted(str(k) for k in obj if k not in tensors)
    if others:
        notes.append(f"ignored non-tensor entries {others[:5]}")
    state = OrderedDict((str(k), v) for k, v in obj.items() if isinstance(v, torch.Tensor))
    if state and all(k.startswith("module.") for k in state):
        state = OrderedDict((k[len("module."):], v) for k, v in state.items())
        notes.append("stripped 'module.' prefix")
    odd = sorted({str(v.dtype) for v in state.values() if v.dtype != torch.float32})
    if odd:
        notes.append(f"non-float32 tensors present ({', '.join(odd)}); converted to float32 on load")
    return state, notes
