"""Recognising a flow's family and variant from state_dict key names, and inferring its architecture from shapes.

Key-pattern rules (``tests/fixtures/manifests``): first match wins; what the weights cannot tell (stacked block
indices, eps, S, residual output, spline bounds, heat, HCFlow's quant) comes from per-variant defaults and is
reported as defaulted. The SRFlow family and LLFlow (``flowUpsamplerNet.*`` keys) are inferred by
:func:`infer_architecture`, HCFlow (``flow.*`` keys) by :func:`infer_hcflow_config`. ("Detection" in this project means
exploding-inverse detection, :mod:`robustness_diag.detect`.)
"""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass, field

import torch

from .config import default_settings
from .errors import MalformedCheckpointError

_LAYER = re.compile(r"^flowUpsamplerNet\.layers\.(\d+)\.(.*)$")
_TRUNK = re.compile(r"^RRDB\.RRDB_trunk\.(\d+)\.")
_COUPLING_ATTRS = ("affine", "affinereparam", "rqspline", "bspline")
_HC_MAIN = re.compile(r"^flow\.layers\.(\d+)\.")
_HC_COND = re.compile(r"^flow\.level(\d+)_condFlow\.")

# Sane limits of the sizes read from key patterns, tensor shapes or a header, checked before anything is built (the
# largest published flows: SRFlow/NCSR 8X with L = 4, K = 16..20, about 100 flow layers, RRDB nb = 23, widths 64..320;
# HCFlow 8X with L = 3). Beyond them a file is malformed, and building what it describes could exhaust memory or
# overflow a tensor size.
#: largest ``flowUpsamplerNet.layers.<i>`` index
MAX_LAYER_INDEX = 4096
#: levels (squeezes) L
MAX_LEVELS = 6
#: flow steps per level (K, steps without coupling, HCFlow's conditional steps)
MAX_STEPS = 256
#: RRDB blocks of a conditioner trunk
MAX_BLOCKS = 512
#: any channel width (image, RRDB, coupling hidden, conditioner features)
MAX_CHANNELS = 4096
#: channels of the flow's finest-to-coarsest squeezed tensor, ``in_nc * 4**L``
MAX_FLOW_CHANNELS = 1 << 16
#: parameters of the network to build (a lower-bound estimate; the largest published flows have about 40 million)
MAX_PARAMETERS = 500_000_000


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
    top = max(by_index)
    if top > MAX_LAYER_INDEX:
        raise MalformedCheckpointError(
            f"implausible layer index {top} (key 'flowUpsamplerNet.layers.{top}.{by_index[top][0]}'): at most "
            f"{MAX_LAYER_INDEX} flow layers are plausible (published flows have about 100); refused before building")
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


def _per_level_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _whole(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and float(v) == int(v)


def implausible_sizes(cfg) -> list[str]:
    """The sizes of a :class:`~.config.FlowConfig` or :class:`~.config.HCFlowConfig`, or of a dict of their fields
    (inferred from weights, read from a header or a YAML; absent fields are not checked), that lie outside the sane
    limits above (``MAX_*``), each as ``"name=value (plausible: ...)"``; empty when the network can be built. Checked
    before building (and before a config object expands per-level lists), so that a malformed file cannot make the
    loader allocate absurd tensors or overflow a size."""
    problems = []
    is_dict = isinstance(cfg, dict)

    def get(name):
        return cfg.get(name) if is_dict else getattr(cfg, name, None)

    def check(name, lo, hi) -> bool:
        value = get(name)
        if value is None:
            return True
        values = _per_level_list(value)
        bad = [v for v in values if not (_whole(v) and lo <= int(v) <= hi)]
        if bad:
            shown = value if len(values) <= 8 else f"{values[:8]}..."
            problems.append(f"{name}={shown!r} (plausible: integers in {lo}..{hi})")
        return not bad

    ok = [check("L", 1, MAX_LEVELS), check("K", 0, MAX_STEPS)]
    ok += [check(n, 1, MAX_CHANNELS) for n in ("in_nc", "nf", "gc", "hidden", "cond_channels")]
    ok += [check(n, 0, MAX_CHANNELS) for n in ("std_channels", "f_in", "f_out", "encoder_in_nc")]
    ok += [check("n_cond_steps", 0, MAX_STEPS), check("rrdb_nb", 0, MAX_BLOCKS)]
    ok += [check("n_additional", 0, MAX_STEPS), check("nb", 0, MAX_BLOCKS), check("kernel_hidden", 1, 15)]
    blocks = get("blocks")
    if blocks is not None and len(_per_level_list(blocks)) > MAX_BLOCKS:
        problems.append(f"{len(_per_level_list(blocks))} stacked blocks (plausible: at most {MAX_BLOCKS})")
    if is_dict or not all(ok):
        return problems
    c_top = int(cfg.in_nc) * 4 ** int(cfg.L)
    if c_top > MAX_FLOW_CHANNELS:
        problems.append(f"in_nc * 4**L = {cfg.in_nc} * 4**{cfg.L} = {c_top} flow channels at the coarsest level "
                        f"(plausible: at most {MAX_FLOW_CHANNELS})")
    else:
        n = parameter_estimate(cfg)
        if n > MAX_PARAMETERS:
            problems.append(f"the network would hold at least {n:.3g} parameters (plausible: at most "
                            f"{MAX_PARAMETERS:.3g})")
    return problems


def parameter_estimate(cfg) -> int:
    """A lower bound of the parameters of the network ``cfg`` describes (RRDB convolutions, the first convolution of
    every coupling sub-network and the 1x1 convolutions); for :func:`implausible_sizes` only."""
    nf, gc = int(cfg.nf), int(cfg.gc)
    rdb = 9 * (gc * (4 * nf + 6 * gc) + nf * (nf + 4 * gc))
    L = int(cfg.L)
    K = [int(k) for k in _per_level_list(cfg.K)] * (L if not isinstance(cfg.K, (list, tuple)) else 1)
    hidden = int(cfg.hidden)
    if getattr(cfg, "family", "") == "hcflow":
        total = sum(int(b) for b in _per_level_list(cfg.rrdb_nb)) * 3 * rdb * L
        c = int(cfg.in_nc)
        for k in K[:L]:
            c *= 4
            total += k * (c * c + 9 * hidden * (c // 2))
        return total
    total = int(cfg.nb) * 3 * rdb
    cond = int(cfg.cond_channels)
    n_add = [int(n) for n in _per_level_list(cfg.n_additional)]
    n_add = n_add * L if len(n_add) == 1 else n_add
    c = int(cfg.in_nc)
    for lv in range(L):
        c *= 4
        k = K[lv] if lv < len(K) else 0
        total += k * (9 * hidden * cond + c * c) + (n_add[lv] if lv < len(n_add) else 0) * c * c
        if lv + 1 in [int(s) for s in _per_level_list(cfg.splits)]:
            c -= c // 2
    return total


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
