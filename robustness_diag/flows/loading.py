"""``load_flow``: own ``.safetensors``, third-party ``.pth`` state_dicts and bundled flows -> a ready
:class:`~.base.Flow`.

``flow.info`` records where every setting came from: ``inferred`` (from weights), ``defaulted`` (per-variant reference
default, weights cannot tell), ``config`` (the user's YAML), ``metadata`` (own checkpoint header) or ``heuristic``.
"""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import RawCheckpoint, read_checkpoint
from ..devices import resolve_device
from .base import Flow
from .config import NON_INFERABLE, FlowConfig, HCFlowConfig
from .errors import ArchitectureMismatchError, CheckpointError, MalformedCheckpointError, UnsupportedFlowError
from .network import SRFlowFamily
from .recognition import (Recognition, defaults_for, hcflow_defaults, implausible_sizes, infer_architecture,
                          infer_hcflow_config, infer_std_steps, recognize_family)
from .yaml_config import apply_overrides, read_hcflow_overrides, read_yaml_overrides

FORMAT_TAG = "robustness-diag/flow"
_MAX_LISTED = 12


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundled_path(name: str) -> Path:
    """Path of a bundled checkpoint ``checkpoints/<name>.safetensors`` (installed as
    ``robustness_diag.checkpoints``)."""
    root = resources.files("robustness_diag.checkpoints")
    path = Path(str(root / f"{name}.safetensors"))
    if not path.is_file():
        available = sorted(p.stem for p in Path(str(root)).glob("*.safetensors")) if Path(str(root)).is_dir() else []
        raise CheckpointError(f"no bundled flow named {name!r} (available: {available or 'none'})")
    return path


def load_flow(path_or_name, config=None, device=None, *, residual: Optional[bool] = None) -> Flow:
    """Loads a flow for auditing: eval mode, float32, on ``device`` (default CPU).

    Arguments:
        path_or_name: an own ``.safetensors``, a third-party ``.pth`` (raw state_dict, ``module.`` prefix, or a
            ``state_dict``/``params``/``params_ema`` wrapper; read with ``weights_only=True`` only) or
            ``"bundled:<name>"``.
        config: optional upstream YAML path (or a dict of FlowConfig fields) overriding inferred/defaulted settings.
        device: torch device or "auto" (CUDA when available).
        residual: force the output mode (flow models HR - bicubic_up(LR)); None = config/default/heuristic.

    Raises:
        CheckpointError subclasses with the file, the family guess and the reason (missing/unexpected keys,
        mismatched shapes, unsafe pickle, training-state file, unsupported family, and
        :class:`~.errors.MalformedCheckpointError` for sizes beyond sane limits or any other failure to interpret
        what was read: a malformed file never escapes as another exception type).
    """
    if isinstance(path_or_name, str) and path_or_name.startswith("bundled:"):
        path = bundled_path(path_or_name.split(":", 1)[1])
    else:
        path = Path(path_or_name)
    raw = read_checkpoint(path)
    try:
        if raw.format == "safetensors" and raw.metadata.get("format") == FORMAT_TAG:
            flow = _from_own(raw, config)
        else:
            flow = _from_third_party(raw, config, residual)
    except CheckpointError as e:
        raise e.with_path(path) from None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, ArithmeticError, RuntimeError,
            MemoryError, RecursionError) as e:  # whatever else the file's contents make interpretation raise
        msg = str(e).strip().splitlines()
        raise MalformedCheckpointError(f"cannot interpret the checkpoint's contents ({type(e).__name__}: "
                                       f"{msg[0][:300] if msg else ''})", path) from None
    flow.info["sha256"] = file_sha256(path)
    if residual is not None and raw.format == "safetensors":
        flow.config.residual = bool(residual)
        flow.info["sources"]["residual"] = "argument"
    flow.info["residual"] = flow.config.residual
    return flow.to(torch.device("cpu") if device is None else resolve_device(device))


def _from_own(raw: RawCheckpoint, config) -> Flow:
    meta = raw.metadata
    if isinstance(meta.get("config"), dict) and meta["config"].get("family") == "hcflow":
        return _hcflow_from_own(raw, config)
    _refuse_implausible(meta.get("config"), raw, "header config")
    try:
        cfg = FlowConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"robustness-diag checkpoint with an invalid config header ({e})", raw.path) from None
    sources = {k: "metadata" for k in cfg.to_dict()}
    if config is not None:
        over = config if isinstance(config, dict) else read_yaml_overrides(config)
        for k, v in apply_overrides(cfg.to_dict(), dict(over)).items():
            if getattr(cfg, k) != v:
                setattr(cfg, k, v)
                sources[k] = "config"
        cfg.__post_init__()
    rec = Recognition(cfg.family, meta.get("variant", cfg.family), cfg.coupling, cfg.coupling_attr, True,
                      ["robustness-diag safetensors header"])
    flow = _build_and_load(raw, cfg, rec)
    flow.info.update(_info(raw, cfg, rec, sources, []))
    flow.info["provenance"] = meta.get("provenance", {})
    return flow


def _from_third_party(raw: RawCheckpoint, config, residual) -> Flow:
    rec = recognize_family(raw.state.keys())
    if rec.family == "hcflow":
        return _hcflow_from_third_party(raw, config, rec)
    if rec.family in ("unknown", "rrdb-encoder"):
        raise UnsupportedFlowError(f"not a recognised flow checkpoint: {rec.variant}", raw.path)
    if not rec.supported:
        hint = {"srflow-da": "SRFlow-DA is recognised but not rebuilt",
                }.get(rec.family, "recognised, but its coupling maths is not implemented for sampling")
        raise UnsupportedFlowError(f"recognised as {rec.variant} (family {rec.family}); {hint}", raw.path)
    try:
        fields, problems = infer_architecture(raw.state, rec)
    except KeyError as e:
        raise ArchitectureMismatchError(f"recognised as {rec.variant} but key {e} is missing", raw.path,
                                        missing=[str(e).strip("'")]) from None
    _refuse_implausible(fields, raw, f"sizes inferred from the weights (recognised as {rec.variant})")
    sources = {k: "inferred" for k in fields}
    notes = list(raw.notes)
    d = defaults_for(rec, fields)
    notes += d.pop("notes")
    for k in NON_INFERABLE:
        if d.get(k) is not None:
            fields[k] = d[k]
            sources[k] = "defaulted"
    if rec.family == "ncsr" or (fields.get("std_channels") and rec.family == "robustnf"):
        S, why = infer_std_steps(raw.state, rec, fields)
        if S is not None:
            fields["S"], sources["S"] = S, "heuristic"
        notes.append(f"S: {why}")
    if fields.get("S") is None:
        fields["S"] = 0
    if config is not None:
        over = config if isinstance(config, dict) else read_yaml_overrides(config)
        for k in over:
            sources[k if k != "split_enable" else "splits"] = "config"
        fields = apply_overrides(fields, dict(over))
        problems = []  # the config's architecture is checked key by key below
    try:
        cfg = FlowConfig.from_dict({k: v for k, v in fields.items()})
        cfg.validate()
    except ValueError as e:
        raise ArchitectureMismatchError(f"recognised as {rec.variant}; inconsistent settings: {e}", raw.path) from None
    flow = _build_and_load(raw, cfg, rec, problems)
    if residual is not None:
        cfg.residual, sources["residual"] = bool(residual), "argument"
    elif rec.family == "ncsr" and sources.get("residual") == "defaulted":
        guess, why = residual_heuristic(flow)
        if guess is not None:
            cfg.residual, sources["residual"] = guess, "heuristic"
        notes.append(f"residual: {why}")
    flow.info.update(_info(raw, cfg, rec, sources, notes))
    return flow


def _refuse_implausible(fields, raw: RawCheckpoint, what: str) -> None:
    """Raises :class:`MalformedCheckpointError` when ``fields`` (a config or a dict of its fields) holds sizes beyond
    the sane limits of :func:`~.recognition.implausible_sizes`; nothing has been built yet."""
    if not isinstance(fields, dict) and not hasattr(fields, "L"):
        return
    bad = implausible_sizes(fields)
    if bad:
        raise MalformedCheckpointError(f"implausible {what}: {'; '.join(bad)}; refused before building (malformed "
                                       "file or foreign keys)", raw.path)


def _build(raw: RawCheckpoint, rec: Recognition, make):
    """``make()`` with construction failures (an absurd size that passed the limits, memory) as checkpoint errors."""
    try:
        return make()
    except ValueError as e:
        raise ArchitectureMismatchError(f"recognised as {rec.variant}; cannot build: {e}", raw.path) from None
    except (RuntimeError, OverflowError, MemoryError, TypeError) as e:
        msg = str(e).strip().splitlines()
        raise MalformedCheckpointError(f"recognised as {rec.variant}; cannot build the network it describes "
                                       f"({type(e).__name__}: {msg[0][:300] if msg else ''})", raw.path) from None


def _build_and_load(raw: RawCheckpoint, cfg: FlowConfig, rec: Recognition, problems=()) -> SRFlowFamily:
    _refuse_implausible(cfg, raw, f"architecture (recognised as {rec.variant})")
    flow = _build(raw, rec, lambda: model_for_config(cfg))
    bad = _load_weights(flow, raw, rec, f"scale={cfg.scale}, L={cfg.L}, K={cfg.K}, nb={cfg.nb}", problems)
    flow.info = {"nonfinite_keys": bad}
    return flow


def _load_weights(flow, raw: RawCheckpoint, rec: Recognition, built_for: str, problems=()) -> list:
    """Loads ``raw``'s tensors (as float32) into ``flow`` strictly and sets eval mode; returns the keys holding
    NaN/Inf. Raises :class:`ArchitectureMismatchError` listing missing, unexpected and mis-shaped keys first."""
    expected = flow.state_dict()
    missing = [k for k in expected if k not in raw.state]
    unexpected = [k for k in raw.state if k not in expected]
    mismatched = [(k, tuple(raw.state[k].shape), tuple(v.shape)) for k, v in expected.items()
                  if k in raw.state and tuple(raw.state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        raise ArchitectureMismatchError(_mismatch_message(rec, built_for, missing, unexpected, mismatched, problems),
                                        raw.path, missing, unexpected, mismatched)
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in raw.state.items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    flow.load_state_dict(state, strict=True)
    flow.eval()
    return bad


def _apply_hcflow_overrides(fields: dict, sources: dict, config) -> None:
    """Updates ``fields`` from the user's config (a dict of HCFlowConfig fields or an HCFlow option YAML) and marks
    them as set by the config."""
    over = dict(config) if isinstance(config, dict) else read_hcflow_overrides(config)
    fields.update(over)
    sources.update({k: "config" for k in over})


def _hcflow_load(raw: RawCheckpoint, fields: dict, sources: dict, rec: Recognition, notes: list, problems=()):
    from .hcflow import HCFlow
    _refuse_implausible(fields, raw, f"architecture (recognised as {rec.variant})")
    try:
        cfg = HCFlowConfig.from_dict(fields)
        cfg.validate()
    except ValueError as e:
        raise ArchitectureMismatchError(f"recognised as {rec.variant}; inconsistent settings: {e}", raw.path) from None
    _refuse_implausible(cfg, raw, f"architecture (recognised as {rec.variant})")
    flow = _build(raw, rec, lambda: HCFlow(cfg))
    bad = _load_weights(flow, raw, rec, f"scale={cfg.scale}, L={cfg.L}, main steps per level {cfg.K}, "
                                        f"conditional steps {cfg.n_cond_steps}, RRDB_nb {cfg.rrdb_nb}", problems)
    flow.info = {"nonfinite_keys": bad}
    flow.info.update(_info(raw, cfg, rec, sources, notes))
    return flow


def _hcflow_from_third_party(raw: RawCheckpoint, config, rec: Recognition):
    fields, problems = infer_hcflow_config(raw.state)
    sources = {k: "inferred" for k in fields}
    for k, v in hcflow_defaults(fields["scale"]).items():
        fields[k], sources[k] = v, "defaulted"
    if config is not None:
        _apply_hcflow_overrides(fields, sources, config)
        problems = []
    return _hcflow_load(raw, fields, sources, rec, list(raw.notes), problems)


def _hcflow_from_own(raw: RawCheckpoint, config):
    fields = dict(raw.metadata["config"])
    sources = {k: "metadata" for k in fields}
    if config is not None:
        _apply_hcflow_overrides(fields, sources, config)
    rec = Recognition("hcflow", raw.metadata.get("variant", "HCFlow"), "affine_atan", "affine", True,
                      ["robustness-diag safetensors header"])
    flow = _hcflow_load(raw, fields, sources, rec, [])
    flow.info["provenance"] = raw.metadata.get("provenance", {})
    return flow


def model_for_config(cfg) -> SRFlowFamily:
    """An untrained network for ``cfg``: :class:`~.llflow.LLFlow` for family "llflow", else :class:`SRFlowFamily`."""
    if cfg.family == "llflow":
        from .llflow import LLFlow
        return LLFlow(cfg)
    return SRFlowFamily(cfg)


def _listing(items, fmt=str) -> str:
    shown = ", ".join(fmt(i) for i in items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _mismatch_message(rec, built_for: str, missing, unexpected, mismatched, problems) -> str:
    """The error text of a state_dict that does not fit; ``built_for`` describes the architecture it was tried on."""
    parts = [f"weights do not fit the architecture (family guess: {rec.variant}; built for {built_for})"]
    if missing:
        parts.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches (key: file vs model): "
                     + _listing(mismatched, lambda m: f"{m[0]}: {list(m[1])} vs {list(m[2])}"))
    if problems:
        parts.append("layout problems: " + "; ".join(problems))
    return "\n  ".join(parts)


def _info(raw: RawCheckpoint, cfg: FlowConfig | HCFlowConfig, rec: Recognition, sources: dict, notes: list) -> dict:
    return {
        "path": str(raw.path), "format": raw.format,
        "family": cfg.family, "variant": rec.variant, "coupling": cfg.coupling, "scale": cfg.scale,
        "L": cfg.L, "K": list(cfg.K), "config": cfg.to_dict(),
        "sources": {k: sources.get(k, "default") for k in cfg.to_dict()},
        "inferred": sorted(k for k, v in sources.items() if v == "inferred"),
        "defaulted": sorted(k for k, v in sources.items() if v == "defaulted"),
        "evidence": rec.evidence, "notes": notes,
    }


@torch.no_grad()
def residual_heuristic(flow: Flow) -> tuple[Optional[bool], str]:
    """Guesses whether an NCSR-family flow outputs a residual: decode smooth LR images at heat 0 and compare the mean
    output with the LR mean (about equal: full image; about 0: residual). Returns ``(guess or None, explanation)``."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    base = torch.stack([0.3 + 0.3 * xx, 0.5 + 0.2 * yy, 0.4 + 0.1 * (xx + yy)])[None]
    lr = (base + 0.02 * torch.randn(2, 3, 16, 16, generator=g)).clamp(0, 1)
    try:
        out = flow.decode(lr, heat=0.0)
    except (RuntimeError, ValueError) as e:
        return None, f"heat-0 heuristic failed ({e}); kept the default"
    if not bool(torch.isfinite(out).all()):
        return None, "heat-0 decode is not finite; kept the default"
    m_out, m_lr = float(out.mean()), float(lr.mean())
    is_residual = abs(m_out) < abs(m_out - m_lr)
    return is_residual, (f"heat-0 mean output {m_out:.3f} vs LR mean {m_lr:.3f} -> "
                         f"{'residual' if is_residual else 'full image'}")


def save_flow(flow: Flow, path, provenance: Optional[dict] = None, variant: Optional[str] = None) -> Path:
    """Writes an own checkpoint: ``.safetensors`` with the FlowConfig and provenance JSON in the header, atomically."""
    from safetensors.torch import save_file

    from ..io import atomic_write, json_text
    path = Path(path)
    meta = {"format": FORMAT_TAG, "config": flow.config.to_json(),
            "provenance": json_text(provenance or {}, indent=None),
            "variant": variant or flow.info.get("variant", flow.config.family)}
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in flow.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))

