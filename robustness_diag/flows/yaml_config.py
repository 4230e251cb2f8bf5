"""Reading the original projects' YAML option files (SRFlow ``confs/*.yml``, NCSR/robustNF ``confs/*.yml``, LLFlow
``confs/*.yml`` into :class:`~.config.FlowConfig` fields; HCFlow ``options/test/*.yml`` into
:class:`~.config.HCFlowConfig` fields).

Only the settings that shape the network or its sampling are taken; everything else in the file is ignored.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .config import COUPLING_ATTR
from .errors import ConfigError

_COUPLING_NAMES = {
    "CondAffineSeparatedAndCond": "affine",
    "CondAffineReparamSeparatedAndCond": "affine_reparam",
    "CondRQsplineSeparatedAndCond": "rqspline",
    "CondBsplineSeparatedAndCond": "bspline",
}


def _get(d, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _find_key(d, key):
    """First value of ``key`` anywhere in a nested dict (breadth-first), or None."""
    queue = [d]
    while queue:
        cur = queue.pop(0)
        if isinstance(cur, dict):
            if key in cur:
                return cur[key]
            queue.extend(cur.values())
    return None


def _load_yaml(path):
    """The parsed YAML file; ConfigError when it is missing or not YAML."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError("config file not found", path) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"not a valid YAML file ({e})", path) from None


def read_yaml_overrides(path) -> dict:
    """Returns FlowConfig fields set by an upstream YAML (absent settings are simply not in the dict)."""
    path = Path(path)
    opt = _load_yaml(path)
    if not isinstance(opt, dict) or "network_G" not in opt:
        raise ConfigError("not an SRFlow-family option file (no 'network_G' section)", path)
    g, flow = opt["network_G"], _get(opt, "network_G", "flow", default={}) or {}
    out: dict = {}
    put = lambda k, v: out.__setitem__(k, v) if v is not None else None  # noqa: E731
    put("scale", opt.get("scale") or g.get("scale"))
    put("nf", g.get("nf"))
    put("nb", g.get("nb"))
    put("in_nc", g.get("in_nc"))
    put("L", flow.get("L"))
    put("K", flow.get("K"))
    put("n_additional", flow.get("additionalFlowNoAffine"))
    blocks = _get(flow, "stackRRDB", "blocks")
    if blocks is not None:
        out["blocks"] = [int(b) for b in blocks]
    put("eps", _get(flow, "CondAffineSeparatedAndCond", "eps"))
    put("hidden", _get(flow, "CondAffineSeparatedAndCond", "hidden_channels"))
    put("std_channels", flow.get("std_channels"))
    put("cond_channels", flow.get("conditionInFeaDim"))
    if opt.get("cond_encoder") is not None:
        _llflow_flags(opt, out, path)
    put("S", flow.get("S"))
    coupling = flow.get("coupling")
    if coupling is not None:
        if coupling not in _COUPLING_NAMES:
            raise ConfigError(f"unknown coupling {coupling!r}", path)
        out["coupling"] = _COUPLING_NAMES[coupling]
        if out["coupling"] in COUPLING_ATTR:
            out["coupling_attr"] = COUPLING_ATTR[out["coupling"]]
    if flow.get("affine_reparam") and out.get("coupling", "affine") == "affine":
        out["coupling"], out["coupling_attr"] = "affine_reparam", "affine"
    if flow.get("permutation_train") is not None:
        out["frozen_invconv"] = not bool(flow["permutation_train"])
    rq = flow.get("CondRQsplineSeparatedAndCond") or {}
    if rq:
        out["bounds"] = [float(rq.get("left", -0.5)), float(rq.get("righ", rq.get("right", 0.5))),
                         float(rq.get("bottom", -0.5)), float(rq.get("top", 0.5))]
    split = _get(flow, "split", "enable")
    if split is not None:
        out["split_enable"] = bool(split)
    divide = _find_key(opt, "divide_freq")
    if divide is not None:
        out["residual"] = bool(divide)
    heat = _find_key(opt, "heat")
    if isinstance(heat, (int, float)):
        out["heat"] = float(heat)
    return out


def _llflow_flags(opt: dict, out: dict, path) -> None:
    """LLFlow option files (``cond_encoder``): the conditioner input width from the input flags; unsupported flags
    are refused with the flag named."""
    if opt["cond_encoder"] != "ConEncoder1":
        raise ConfigError(f"LLFlow cond_encoder {opt['cond_encoder']!r} is not supported (only ConEncoder1)", path)
    for flag in ("to_yuv", "encode_color_map", "le_curve", "avg_color_map", "histeq_as_input", "sigmoid_output",
                 "concat_color_map", "gray_map"):
        if opt.get(flag):
            raise ConfigError(f"LLFlow option {flag}: true is not supported", path)
    if not opt.get("concat_histeq") or _get(opt, "datasets", "train", "log_low") is False:
        raise ConfigError("LLFlow without concat_histeq/log_low is not supported (the shipped configs use both)", path)
    out["encoder_in_nc"] = 12
    out["family"] = "llflow"


def apply_overrides(fields: dict, over: dict) -> dict:
    """Merges YAML overrides into inferred fields and recomputes what depends on them (splits, f.0, cond width)."""
    merged = dict(fields)
    split_enable = over.pop("split_enable", None)
    merged.update(over)
    L = int(merged["L"])
    if "L" in over or split_enable is not None:
        enabled = bool(merged.get("splits")) if split_enable is None else split_enable
        # SRFlow's off-by-one rule (correct_splits false): a split after every level < L - 1.
        merged["splits"] = [lv for lv in range(1, L + 1) if lv < L - 1] if enabled else []
    if "blocks" in over or "nf" in over:
        merged["cond_channels"] = merged["nf"] * (1 + len(merged["blocks"]))
        merged["f_in"] = 64 * (1 + len(merged["blocks"]))
    if "L" in over or split_enable is not None:
        merged["f_out"] = 96 if merged["splits"] else 384
    return merged


def read_hcflow_overrides(path) -> dict:
    """Returns HCFlowConfig fields set by an HCFlow option YAML (``network_G.flowDownsampler``); see
    :func:`read_hcflow_yaml`."""
    opt = _load_yaml(path)
    if not isinstance(opt, dict) or "flowDownsampler" not in (opt.get("network_G") or {}):
        raise ConfigError("not an HCFlow option file (no 'network_G.flowDownsampler' section)", path)
    return read_hcflow_yaml(opt)


def read_hcflow_yaml(opt: dict) -> dict:
    """HCFlowConfig fields from an HCFlow option dict (``network_G.flowDownsampler``, ``scale``, ``quant``,
    ``val.heats``: the largest non-zero heat)."""
    out: dict = {}
    fd = (opt.get("network_G") or {}).get("flowDownsampler") or {}
    so = fd.get("splitOff") or {}
    if opt.get("scale") is not None:
        out["scale"] = int(opt["scale"])
    if fd.get("L") is not None:
        out["L"] = int(fd["L"])
    after = so.get("after_flowstep")
    if fd.get("K") is not None and after is not None:
        L = out.get("L", len(after) if isinstance(after, list) else 2)
        after_l = after if isinstance(after, list) else [after] * L
        k_l = fd["K"] if isinstance(fd["K"], list) else [fd["K"]] * L
        out["K"] = [int(k) - int(a) for k, a in zip(k_l, after_l)]
        out["n_cond_steps"] = [int(a) for a in after_l]
    if so.get("RRDB_nb") is not None:
        out["rrdb_nb"] = [int(b) for b in so["RRDB_nb"]]
    for src, dst in (("RRDB_nf", "nf"), ("RRDB_gc", "gc")):
        if so.get(src) is not None:
            out[dst] = int(so[src])
    if fd.get("hidden_channels") is not None:
        out["hidden"] = int(fd["hidden_channels"])
    if opt.get("quant") is not None:
        out["quant"] = int(opt["quant"])
    heats = (opt.get("val") or {}).get("heats")
    if isinstance(heats, list) and any(float(h) > 0 for h in heats):
        out["heat"] = max(float(h) for h in heats)
    return out
