"""Recognising a flow's family and variant from state_dict key names, and inferring its architecture from shapes.

Key-pattern rules (``tests/fixtures/manifests``): first match wins; what the weights cannot tell (stacked block
indices, eps, S, residual output, spline bounds, heat, HCFlow's quant) comes from per-variant defaults and is
reported as defaulted. The SRFlow family and LLFlow (``flowUpsamplerNet.*`` keys) are inferred by
:func:`infer_architecture`, HCFlow (``flow.*`` keys) by :func:`infer_hcflow_config`. ("Detection" in this project means
exploding-inverse detection, :mod:`robustness_diag.detect`.)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .config import default_settings

_LAYER = re.compile(r"^flowUpsamplerNet\.layers\.(\d+)\.(.*)$")
_TRUNK = re.compile(r"^RRDB\.RRDB_trunk\.(\d+)\.")
_COUPLING_ATTRS = ("affine", "affinereparam", "rqspline", "bspline")
_HC_MAIN = re.compile(r"^flow\.layers\.(\d+)\.")
_HC_COND = re.compile(r"^flow\.level(\d+)_condFlow\.")


@dataclass
class Recognition:
    """What the key names say about a checkpoint.

    Attributes:
        family: "srflow", "ncsr", "robustnf", "srflow-da", "llflow", "hcflow", "rrdb-encoder" or "unknown".
        variant: a human-readable name, e.g. "robustNF RQ-spline (frozen 1x1 conv)".
        coupling: "affine", "affine_reparam", "rqspline", "bspline" or None.
        coupling_attr: the FlowStep attribute holding the coupling in the keys.
        supported: whether this toolkit can rebuild and sample it.
        evidence: the key patterns that decided it.
    """

    family: str
    variant: str
    coupling: str | None = None
    coupling_attr: str | None = None
    supported: bool = False
    evidence: list = field(default_factory=list)


def recognize_family(keys) -> Recognition:
    """Classifies a checkpoint from its key names (the patterns are listed in the README's checkpoint table)."""
    keys = list(keys)
    has = lambda frag: any(frag in k for k in keys)  # noqa: E731
    frozen = has("invconv.weight_transpose")
    suffix = " (frozen 1x1 conv)" if frozen else ""
    if any(k.startswith("flow.level0_condFlow.") for k in keys):
        return Recognition("hcflow", "HCFlow", "affine_atan", "affine", True, evidence=["flow.level0_condFlow.*"])
    if not has("flowUpsamplerNet.") and any(k.startswith(("RRDB_trunk.", "conv_first.")) for k in keys):
        return Recognition("rrdb-encoder", "RRDB encoder only (an SRFlow conditioner pre-training file, not a flow)",
                         evidence=["conv_first.*/RRDB_trunk.* at top level, no flowUpsamplerNet.*"])
    if "RRDB.conv_second.weight" in keys or has("RRDB.fine_tune_color_map.0.weight"):
        return Recognition("llflow", "LLFlow (low-light enhancement)", "affine", "affine", True,
                         evidence=["RRDB.conv_second / RRDB.fine_tune_color_map"])
    if not has("flowUpsamplerNet.layers."):
        return Recognition("unknown", "unknown (no flowUpsamplerNet.layers.* or other known flow keys)")
    if has(".rqspline."):
        return Recognition("robustnf", "robustNF RQ-spline" + suffix, "rqspline", "rqspline", True, [".rqspline."])
    if has(".bspline."):
        return Recognition("robustnf", "robustNF B-spline" + suffix, "bspline", "bspline", False, [".bspline."])
    if has(".affinereparam."):
        return Recognition("robustnf", "robustNF affine-reparam" + suffix, "affine_reparam", "affinereparam", True,
                         [".affinereparam."])
    if has(".affine.fAffine_std."):
        return Recognition("ncsr", "NCSR / FS-NCSR (affine + std branch)" + suffix, "affine", "affine", True,
                         [".affine.fAffine_std."])
    if has(".affine.fAffine1."):
        return Recognition("srflow-da", "SRFlow-DA-R/D", "affine", "affine", evidence=[".affine.fAffine1."])
    if has(".affine.fAffine.0.bias") and not has(".affine.fAffine.0.actnorm.bias"):
        return Recognition("srflow-da", "SRFlow-DA", "affine", "affine", evidence=["fAffine.0.bias without actnorm"])
    if has(".affine.fAffine."):
        return Recognition("srflow", "SRFlow" + suffix, "affine", "affine", True, [".affine.fAffine."])
    return Recognition("unknown", "SRFlow-like layer list without a known coupling")


@dataclass
class LayerSlot:
    index: int
    kind: str  # "squeeze", "step", "coupling", "split"
    channels: int = 0


def scan_layers(state) -> list[LayerSlot]:
    """Rebuilds the layer list: a missing index is a squeeze, ``conv.weight`` a Split2d, ``actnorm`` a step."""
    by_index: dict[int, list[str]] = {}
    for k in state:
        m = _LAYER.match(k)
        if m:
            by_index.setdefault(int(m.group(1)), []).append(m.group(2))
    if not by_index:
        return []
    slots = []
    for i in range(max(by_index) + 1):
        rest = by_index.get(i)
        if rest is None:
            slots.append(LayerSlot(i, "squeeze"))
        elif "conv.weight" in rest:
            slots.append(LayerSlot(i, "split", int(state[f"flowUpsamplerNet.layers.{i}.conv.weight"].shape[1])))
        else:
            c = _actnorm_width(state, i)
            coupled = any(r.split(".")[0] in _COUPLING_ATTRS for r in rest)
            slots.append(LayerSlot(i, "coupling" if coupled else "step", c))
    return slots


def _actnorm_width(state, i: int) -> int:
    t = state.get(f"flowUpsamplerNet.layers.{i}.actnorm.bias")
    return int(t.shape[1]) if t is not None and t.dim() == 4 else 0


def infer_architecture(state, rec: Recognition) -> tuple[dict, list]:
    """Infers FlowConfig fields from shapes. Returns ``(fields, problems)``; ``fields`` holds only what the weights
    tell (architecture), ``problems`` lists inconsistencies (channel progression, non-uniform K, ...)."""
    problems = []
    shape = lambda k: tuple(state[k].shape) if k in state else None  # noqa: E731
    f = {"family": rec.family, "coupling": rec.coupling, "coupling_attr": rec.coupling_attr}
    cf = shape("RRDB.conv_first.weight")
    if cf is None:
        raise KeyError("RRDB.conv_first.weight")
    f["nf"], f["in_nc"] = cf[0], cf[1]
    trunk = {int(m.group(1)) for k in state for m in [_TRUNK.match(k)] if m}
    f["nb"] = 1 + max(trunk) if trunk else 0
    c1 = shape("RRDB.RRDB_trunk.0.RDB1.conv1.weight")
    f["gc"] = c1[0] if c1 else 32
    f["scale"] = 16 if "RRDB.upconv4.weight" in state else 8 if "RRDB.upconv3.weight" in state else 4
    if rec.family == "llflow":
        # ConEncoder1: conv_first sees log + histeq image + colour/noise maps (12); the flow models a 3-channel image.
        f["scale"], f["encoder_in_nc"], f["in_nc"] = 1, cf[1], 3

    slots = scan_layers(state)
    levels: list[dict] = []
    for s in slots:
        if s.kind == "squeeze":
            levels.append({"n_add": 0, "K": 0, "split": False, "widths": set()})
        elif not levels:
            problems.append(f"layer {s.index} comes before the first squeeze (index 0 must be a squeeze)")
            levels.append({"n_add": 0, "K": 0, "split": False, "widths": set()})
        elif s.kind == "split":
            levels[-1]["split"] = True
        else:
            levels[-1]["n_add" if s.kind == "step" else "K"] += 1
            levels[-1]["widths"].add(s.channels)
    f["L"] = len(levels)
    f["K"] = [lv["K"] for lv in levels]
    f["n_additional"] = [lv["n_add"] for lv in levels]
    f["splits"] = [i + 1 for i, lv in enumerate(levels) if lv["split"]]
    expect_l = {1: 3, 4: 3, 8: 4, 16: 4}.get(f["scale"])
    if expect_l is not None and f["L"] != expect_l:
        problems.append(f"{f['L']} levels found but a {f['scale']}X SRFlow-family flow has {expect_l}")
    if len(set(f["K"])) > 1:
        problems.append(f"coupling steps per level differ ({f['K']}): truncated file or non-standard config")
    c = f["in_nc"]
    for i, lv in enumerate(levels):
        c *= 4
        if lv["widths"] and lv["widths"] != {c}:
            problems.append(f"level {i + 1}: step widths {sorted(lv['widths'])}, expected {c}")
        if lv["split"]:
            c = c - int(round(c * 0.5))

    first = next((s for s in slots if s.kind == "coupling"), None)
    attr = rec.coupling_attr
    if first is not None and attr:
        p = f"flowUpsamplerNet.layers.{first.index}.{attr}."
        feat = shape(p + "fFeatures.0.weight")
        if feat:
            f["hidden"], f["cond_channels"] = feat[0], feat[1]
        mid = shape(p + "fFeatures.2.weight")
        if mid:
            f["kernel_hidden"] = mid[-1]
        std_net = {"affine": "fAffine_std", "affinereparam": "fAffine_std", "rqspline": "fRQspline_std"}.get(attr)
        std_w = shape(p + f"{std_net}.0.weight") if std_net else None
        f["std_channels"] = std_w[1] - first.channels // 2 if std_w else 0
    f["frozen_invconv"] = any(k.endswith("invconv.weight_transpose") for k in state)
    fw = shape("flowUpsamplerNet.f.0.weight")
    # Upstream always registers f.0 (strict loading needs it); when absent, expect its reference shape so that the
    # mismatch report names it.
    n_blocks = f.get("cond_channels", 320) // max(1, f["nf"]) - 1
    f["f_in"], f["f_out"] = (fw[1], fw[0]) if fw else (64 * (1 + n_blocks), 96 if f["splits"] else 384)
    return f, problems


def infer_std_steps(state, rec: Recognition, fields: dict) -> tuple[list | None, str]:
    """NCSR ``S`` from weights: a std branch that never ran keeps its init (``.4.*`` and ``.0.actnorm.*`` all zero).

    Returns ``(S or None, explanation)``; None when the heuristic is inconclusive (no step, or every step, at init).
    """
    std_net = {"affine": "fAffine_std", "affinereparam": "fAffine_std", "rqspline": "fRQspline_std"}.get(
        rec.coupling_attr)
    if not std_net or not fields.get("std_channels"):
        return None, "no std branch"
    slots = scan_layers(state)
    level, per_level = 0, []
    for s in slots:
        if s.kind == "squeeze":
            level += 1
            per_level.append([])
        elif s.kind == "coupling":
            p = f"flowUpsamplerNet.layers.{s.index}.{rec.coupling_attr}.{std_net}."
            at_init = all(
                p + k in state and not bool(torch.count_nonzero(state[p + k]))
                for k in ("4.weight", "4.bias", "4.logs", "0.actnorm.bias", "0.actnorm.logs"))
            per_level[-1].append(not at_init)
    flags = [f for lv in per_level for f in lv]
    if not flags or all(flags) or not any(flags):
        return None, ("std-branch weights trained in every step" if flags and all(flags)
                      else "std-branch weights at init in every step") + ": heuristic inconclusive"
    S = []
    for lv in per_level:
        n = 0
        for trained in reversed(lv):
            if not trained:
                break
            n += 1
        if any(lv[:len(lv) - n]):
            return None, "trained std branches are not the last steps of their level: heuristic inconclusive"
        S.append(n)
    return S, "std-branch weights still at init mark the steps that never ran it"


def defaults_for(rec: Recognition, fields: dict) -> dict:
    """Per-variant reference defaults for the non-inferable settings, fitted to the inferred architecture."""
    n_blocks = max(0, fields.get("cond_channels", 320) // max(1, fields["nf"]) - 1)
    return default_settings(rec.family, rec.coupling or "affine", fields["scale"], fields["nb"], n_blocks)


# -- HCFlow (keys ``flow.*``) -------------------------------------------------------------------------------------

def consecutive_runs(indices) -> list[list[int]]:
    """Splits sorted layer indices into runs of consecutive ones (``[1, 2, 5, 6]`` -> ``[[1, 2], [5, 6]]``)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def infer_hcflow_config(state) -> tuple[dict, list]:
    """HCFlowConfig fields from key names and shapes; returns ``(fields, problems)``.

    Main steps per level: runs of consecutive ``flow.layers.{i}`` indices (a squeeze and a split leave gaps);
    conditional steps and RRDB depths: counted under each ``level{l}_condFlow``; hidden: ``conv1`` output channels.
    """
    problems = []
    idx = sorted({int(m.group(1)) for k in state for m in [_HC_MAIN.match(k)] if m})
    levels = sorted({int(m.group(1)) for k in state for m in [_HC_COND.match(k)] if m})
    L = len(levels)
    runs = consecutive_runs(idx)
    K = [len(r) for r in runs]
    if len(K) != L:
        problems.append(f"{len(K)} runs of main flow steps but {L} conditional flows")
    expected_first = 1
    for r in runs:
        if r[0] != expected_first:
            problems.append(f"main steps start at index {r[0]}, expected {expected_first} (squeeze/split gaps)")
        expected_first = r[-1] + 3

    def count(prefix: str, pat: str) -> int:
        rx = re.compile(re.escape(prefix) + pat)
        found = {int(m.group(1)) for k in state for m in [rx.match(k)] if m}
        return 1 + max(found) if found else 0

    n_cond = [count(f"flow.level{l}_condFlow.", r"additional_flow_steps\.(\d+)\.") for l in levels]
    nb0 = count("flow.level0_condFlow.", r"RRDB_trunk0\.(\d+)\.")
    nb1 = count("flow.level0_condFlow.", r"RRDB_trunk1\.(\d+)\.")
    cf = state.get("flow.level0_condFlow.conv_first.weight")
    c1 = state.get("flow.layers.1.affine.f.conv1.weight")
    in_nc = 3
    an = state.get("flow.layers.1.actnorm.bias")
    if an is not None:
        in_nc = int(an.shape[1]) // 4
    g = state.get("flow.level0_condFlow.RRDB_trunk0.0.RDB1.conv1.weight")
    fields = {"scale": 2 ** L, "L": L, "K": K, "n_cond_steps": n_cond, "rrdb_nb": [nb0, nb1],
              "nf": int(cf.shape[0]) if cf is not None else 64, "gc": int(g.shape[0]) if g is not None else 32,
              "hidden": int(c1.shape[0]) if c1 is not None else 64, "in_nc": in_nc}
    return fields, problems


def hcflow_defaults(scale: int) -> dict:
    """Settings no weight reveals (the test YAMLs): heat 0.9 and quant 64 for 4X, heat 0.8 and quant 256 for 8X."""
    return {"heat": 0.8, "quant": 256} if scale == 8 else {"heat": 0.9, "quant": 64}
