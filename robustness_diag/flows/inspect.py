"""Static inspection of a loaded flow: what it is, where its settings came from, weight health and the theoretical
inverse-slope bound of its couplings, ending in a one-line verdict. No data and no sampling are needed."""
from __future__ import annotations

import math

import torch

from .base import Flow
from .couplings import ConditionalCoupling
from .layers import Conv2dZeros, FrozenInvConv1x1
from .network import FlowStep
from .rrdb import LEVEL_TO_NAME, UPCONV_NAMES


def unused_keys(flow: Flow) -> dict[str, list[str]]:
    """Groups of state_dict keys that the flow never uses in log_prob or sampling, with the reason as the group name."""
    keys = list(flow.state_dict().keys())
    if flow.config.family == "hcflow":
        return {}  # every HCFlow tensor is on the sampling or the likelihood path
    if flow.config.family == "llflow":
        groups = {
            "flowUpsamplerNet.f (never run in forward)": [k for k in keys if k.startswith("flowUpsamplerNet.f.")],
            "ConEncoder1 heads never run (HRconv, conv_last, downconv3, awb_para)": [
                k for k in keys if k.startswith(("RRDB.HRconv.", "RRDB.conv_last.", "RRDB.downconv3.",
                                                 "RRDB.awb_para."))],
        }
        return {k: v for k, v in groups.items() if v}
    used_feats = set(LEVEL_TO_NAME[flow.config.scale].values())
    chain = list(UPCONV_NAMES)  # fea_up2, fea_up4, ... each computed from the previous one
    finest = max((chain.index(k) for k in used_feats if k in chain), default=-1)
    dead_upconvs = {UPCONV_NAMES[k] for k in chain[finest + 1:] if hasattr(flow.RRDB, UPCONV_NAMES[k])}
    groups = {
        "flowUpsamplerNet.f (never run in forward)": [k for k in keys if k.startswith("flowUpsamplerNet.f.")],
        "RRDB SR head (HRconv, conv_last)": [k for k in keys if k.startswith(("RRDB.HRconv.", "RRDB.conv_last."))],
        "RRDB upconvs above the finest flow level": [k for k in keys if k.split(".")[1] in dead_upconvs],
    }
    std_dead = []
    for i, _, step in flow.coupling_steps():
        c = step.coupling
        if isinstance(c, ConditionalCoupling) and c.std_channels > 0 and not c.use_std:
            std_dead += [k for k in keys if k.startswith(f"flowUpsamplerNet.layers.{i}.{step.coupling_attr}."
                                                         f"{c.net_names[2]}.")]
    groups["std branch in steps outside S"] = std_dead
    return {k: v for k, v in groups.items() if v}


def _range(values) -> list[float] | None:
    values = [float(v) for v in values]
    return [min(values), max(values)] if values else None


@torch.no_grad()
def defaulted_values(info: dict) -> dict:
    """``{setting: value}`` of the settings the weights could not tell and that were defaulted (``info["defaulted"]``
    with the values from ``info["config"]``)."""
    cfg = info.get("config") or {}
    return {k: cfg.get(k) for k in info.get("defaulted", [])}


def inspect_flow(flow: Flow) -> dict:
    """Returns a JSON-able report (see the keys); ``verdict`` is one line, ``status`` one of ok/warning/fail."""
    if flow.config.family == "hcflow":
        return _inspect_hcflow(flow)
    cfg, info = flow.config, flow.info
    fu = flow.flowUpsamplerNet
    steps = [(i, l) for i, l in enumerate(fu.layers) if isinstance(l, FlowStep)]
    nonfinite = [k for k, v in flow.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    conds, ortho = [], []
    for _, step in steps:
        conds.append(step.invconv.condition_number())
        if isinstance(step.invconv, FrozenInvConv1x1):
            ortho.append(step.invconv.orthogonality_error())
    step_actnorm_logs = [v for _, s in steps for v in s.actnorm.logs.flatten().tolist()]
    zeros_logs = [v * Conv2dZeros.LOGSCALE_FACTOR for m in fu.modules() if isinstance(m, Conv2dZeros)
                  for v in m.logs.flatten().tolist()]
    couplings = [s.coupling for _, _, s in flow.coupling_steps()]
    n_sub = sum(len(c.stages(_StdProbe(c))) for c in couplings)
    bound = couplings[0].inverse_slope_bound() if couplings else {}
    report = {
        "path": info.get("path"), "format": info.get("format"), "sha256": info.get("sha256"),
        "family": cfg.family, "variant": info.get("variant", cfg.family), "coupling": cfg.coupling,
        "scale": cfg.scale, "L": cfg.L, "K_per_level": list(cfg.K), "n_additional_per_level": list(cfg.n_additional),
        "split_after_levels": list(cfg.splits), "stacked_blocks": list(cfg.blocks), "nb": cfg.nb, "nf": cfg.nf,
        "frozen_invconv": cfg.frozen_invconv, "residual_output": cfg.residual, "std_channels": cfg.std_channels,
        "S": list(cfg.S), "eps": cfg.eps, "spline_bounds": list(cfg.bounds) if cfg.coupling == "rqspline" else None,
        "default_heat": cfg.heat,
        "parameters": sum(p.numel() for p in flow.parameters()), "tensors": len(flow.state_dict()),
        "sources": info.get("sources", {}), "inferred": info.get("inferred", []),
        "defaulted": info.get("defaulted", []), "defaulted_values": defaulted_values(info),
        "notes": info.get("notes", []),
        "unused_keys": {k: {"count": len(v), "examples": v[:3]} for k, v in unused_keys(flow).items()},
        "nonfinite_tensors": nonfinite,
        "invconv_condition_number": {"min": min(conds), "max": max(conds),
                                     "worst_layer": steps[conds.index(max(conds))][0]} if conds else None,
        "frozen_invconv_orthogonality_error": max(max(o) for o in ortho) if ortho else None,
        "actnorm_logs_range": _range(step_actnorm_logs),
        "conv2dzeros_log_scale_range": _range(zeros_logs),
        "coupling_inverse_bound": bound,
        "coupling_sub_transforms_on_sampling_path": n_sub,
    }
    report["status"], report["verdict"] = _verdict(report)
    return report


def _inspect_hcflow(flow) -> dict:
    """HCFlow report: same keys as the SRFlow-family report (SRFlow-only settings None) plus ``n_cond_steps`` and
    ``rrdb_nb``. Certificate: every coupling's inverse slope lies in (exp(-0.4995), exp(0.4995))."""
    cfg, info = flow.config, flow.info
    steps = [s for _, _, s in flow.coupling_steps()] + [s for _, _, s in flow.conditional_coupling_steps()]
    nonfinite = [k for k, v in flow.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    conds = [s.permute.condition_number() for s in steps]
    keys = [i for i, _, _ in flow.coupling_steps()] + [k for k, _, _ in flow.conditional_coupling_steps()]
    zeros_logs = [v * Conv2dZeros.LOGSCALE_FACTOR for m in flow.modules() if isinstance(m, Conv2dZeros)
                  for v in m.logs.flatten().tolist()]
    bound = steps[0].coupling.inverse_slope_bound() if steps else {}
    report = {
        "path": info.get("path"), "format": info.get("format"), "sha256": info.get("sha256"),
        "family": "hcflow", "variant": info.get("variant", "HCFlow"), "coupling": cfg.coupling,
        "scale": cfg.scale, "L": cfg.L, "K_per_level": list(cfg.K), "n_additional_per_level": None,
        "n_cond_steps": list(cfg.n_cond_steps), "rrdb_nb": list(cfg.rrdb_nb),
        "split_after_levels": list(range(1, cfg.L + 1)), "stacked_blocks": None, "nb": None, "nf": cfg.nf,
        "frozen_invconv": False, "residual_output": False, "std_channels": 0, "S": None,
        "eps": 0.0,  # no scale floor: the atan bounds the scale instead (see coupling_inverse_bound)
        "spline_bounds": None, "default_heat": cfg.heat, "quant": cfg.quant,
        "parameters": sum(p.numel() for p in flow.parameters()), "tensors": len(flow.state_dict()),
        "sources": info.get("sources", {}), "inferred": info.get("inferred", []),
        "defaulted": info.get("defaulted", []), "defaulted_values": defaulted_values(info),
        "notes": list(info.get("notes", [])) + ["eps=0: HCFlow couplings have no scale floor; exp(0.318*atan(2s)) "
                                                "bounds the scale in (0.607, 1.648)"],
        "unused_keys": {}, "nonfinite_tensors": nonfinite,
        "invconv_condition_number": {"min": min(conds), "max": max(conds),
                                     "worst_layer": keys[conds.index(max(conds))]} if conds else None,
        "frozen_invconv_orthogonality_error": None,
        "actnorm_logs_range": _range(v for s in steps for v in s.actnorm.logs.flatten().tolist()),
        "conv2dzeros_log_scale_range": _range(zeros_logs),
        "coupling_inverse_bound": bound,
        "coupling_sub_transforms_on_sampling_path": len(steps),
    }
    report["status"], report["verdict"] = _verdict(report)
    return report


class _StdProbe:
    """Stands in for a LevelCondition when counting sub-transforms: the std branch runs wherever a step is flagged."""

    def __init__(self, coupling):
        self.std = True if coupling.use_std else None
        self.features = None


def _verdict(r: dict) -> tuple[str, str]:
    if r["nonfinite_tensors"]:
        return "fail", f"FAIL: {len(r['nonfinite_tensors'])} tensors hold NaN/Inf (e.g. {r['nonfinite_tensors'][0]})"
    issues = []
    cn = r["invconv_condition_number"]
    if cn and cn["max"] > 1e4:
        issues.append(f"ill-conditioned 1x1 conv (condition number {cn['max']:.3g} at layer {cn['worst_layer']})")
    oe = r["frozen_invconv_orthogonality_error"]
    if oe is not None and oe > 1e-4:
        issues.append(f"frozen 1x1 conv is not orthogonal / transpose mismatch (error {oe:.2g})")
    b, n = r["coupling_inverse_bound"], r["coupling_sub_transforms_on_sampling_path"]
    if b.get("kind") == "multiplicative" and b["max_inverse_slope"] > 10:
        worst = n * math.log10(b["max_inverse_slope"])
        head = (f"UNBOUNDED-IN-PRACTICE INVERSE: {r['coupling']} couplings can amplify by up to "
                f"{b['max_inverse_slope']:.0e} per sub-transform ({n} sub-transforms on the sampling path, worst case "
                f"1e{worst:.0f}); OOD conditions can trigger exploding inverses")
        status = "warning"
    elif b.get("kind") == "additive":
        head = (f"BOUNDED INVERSE: RQ-spline couplings deviate from a translation by at most "
                f"{b['max_inverse_deviation']:g} per sub-transform ({n} on the sampling path)")
        status = "ok"
    elif r["family"] == "hcflow":
        head = (f"BOUNDED INVERSE: HCFlow atan-affine couplings, |log scale| < 0.318*pi/2, inverse slope in "
                f"[{b['min_inverse_slope']:.3f}, {b['max_inverse_slope']:.3f}] per coupling "
                f"({n} on the sampling path); "
                "1x1 convs and ActNorms are not bounded by construction (see condition numbers)")
        status = "ok"
    else:
        head = f"BOUNDED INVERSE: {r['coupling']} inverse slope <= {b.get('max_inverse_slope', float('nan')):.4g}"
        status = "ok"
    if issues:
        status = "warning"
        head += "; also " + "; ".join(issues)
    return status, head
