"""``robustness-diag inspect``: what a checkpoint is, where its settings came from, and whether its inverse is bounded.

``run(InspectConfig) -> InspectResult`` is plain Python (usable from notebooks); the CLI only parses and prints.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from robustness_diag.devices import DEFAULT_DEVICE, DEVICE_HELP
from robustness_diag.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from robustness_diag.text import printable

from . import options as opt
from .outputs import check_folder


@dataclass
class InspectConfig:
    """``checkpoints``: files or ``bundled:<name>``; ``config``: an upstream YAML overriding inferred settings;
    ``demo_dir``: also write and inspect the demo checkpoints there; ``device``: where the weights are loaded and
    examined (:func:`robustness_diag.devices.resolve_device`)."""

    checkpoints: list
    config: Optional[str] = None
    demo_dir: Optional[str] = None
    device: str = DEFAULT_DEVICE


@dataclass
class InspectResult:
    reports: list = field(default_factory=list)   # one dict per checkpoint: the report or {"path", "error", ...}
    exit_code: int = EXIT_OK


DEMO_FLOWS = {
    # name: (FlowConfig fields, what it stands for)
    "srflow_4x_affine_demo.pth": (dict(nb=5, K=4, blocks=[0, 1, 3, 4]), "SRFlow layout, affine couplings"),
    "robustnf_4x_rqspline_demo.pth": (dict(family="robustnf", coupling="rqspline", coupling_attr="rqspline",
                                           nb=5, K=4, blocks=[0, 1, 3, 4], std_channels=3, S=[0, 4, 4],
                                           frozen_invconv=True, residual=True),
                                      "robustNF layout, RQ-spline couplings, frozen 1x1 conv"),
}


def write_demo_checkpoints(out_dir) -> list[Path]:
    """Writes reduced reference-layout ``.pth`` files (seeded random weights, raw state_dicts as upstream saves)."""
    import torch
    from robustness_diag.flows.config import FlowConfig
    from robustness_diag.flows.network import build_flow
    from robustness_diag.flows.synthetic import randomize_flow
    from robustness_diag.io import atomic_write
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (fields, _) in DEMO_FLOWS.items():
        flow = randomize_flow(build_flow(FlowConfig(**fields)), seed=0)
        path = out / name
        state = flow.state_dict()
        atomic_write(path, lambda tmp, sd=state: torch.save(sd, tmp))
        paths.append(path)
    return paths


def run(cfg: InspectConfig) -> InspectResult:
    """Loads and inspects every checkpoint; a file that fails is reported with its reason and the others go on."""
    from robustness_diag.devices import resolve_device
    from robustness_diag.flows.errors import CheckpointError, internal_error
    from robustness_diag.flows.inspect import inspect_flow
    from robustness_diag.flows.loading import load_flow
    device = resolve_device(cfg.device)
    paths = list(cfg.checkpoints)
    if cfg.demo_dir:
        paths += [str(p) for p in write_demo_checkpoints(cfg.demo_dir)]
    result = InspectResult()
    for p in paths:
        try:
            flow = load_flow(p, config=cfg.config, device=device)
            report = inspect_flow(flow)
        except CheckpointError as e:
            result.reports.append({"path": str(p), "status": "error", "error_type": type(e).__name__,
                                   "error": str(e)})
            result.exit_code = EXIT_FAILED
            continue
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # last resort: one checkpoint's unforeseen failure is its row, the batch goes on
            result.reports.append({"path": str(p), "status": "error", "error_type": type(e).__name__,
                                   "error": f"{p}: {internal_error(e)}"})
            result.exit_code = EXIT_FAILED
            continue
        result.reports.append(report)
        if report["status"] == "fail":
            result.exit_code = EXIT_FAILED
    return result


def format_report(r: dict) -> str:
    """Human-readable text for one report."""
    if r.get("status") == "error":
        return f"{printable(r['path'])}\n  ERROR ({r['error_type']}): {printable(r['error'])}\n"
    src = r["sources"]
    tag = lambda k: f" [{src[k]}]" if src.get(k) not in (None, "inferred", "metadata") else ""  # noqa: E731
    if r["family"] == "hcflow":
        plan = (f"   conditional-flow steps per level {r['n_cond_steps']}   splits after levels "
                f"{r['split_after_levels']}")
        cond = f"  conditioner per-level RRDB trunks nf={r['nf']}, blocks {r['rrdb_nb']} (trunk0, trunk1)"
    else:
        plan = (f"   extra no-coupling steps {r['n_additional_per_level']}   splits after levels "
                f"{r['split_after_levels']}")
        cond = f"  conditioner RRDB nf={r['nf']} nb={r['nb']}, stacked blocks {r['stacked_blocks']}{tag('blocks')}"
    lines = [
        f"{printable(r['path'])}",
        f"  family      {r['family']}  ({r['variant']})",
        f"  coupling    {r['coupling']}   scale {r['scale']}X   L={r['L']}   K per level {r['K_per_level']}" + plan,
        cond,
        f"  parameters  {r['parameters']:,} in {r['tensors']} tensors ({r['format']})",
        f"  settings    eps={r['eps']:g}{tag('eps')}  heat={r['default_heat']:g}{tag('heat')}  "
        f"residual output={r['residual_output']}{tag('residual')}"
        + (f"  std branch S={r['S']}{tag('S')}" if r["std_channels"] else "")
        + (f"  spline box={r['spline_bounds']}{tag('bounds')}" if r["spline_bounds"] else ""),
    ]
    if r["defaulted"]:
        lines.append(f"  defaulted   {', '.join(r['defaulted'])} (weights cannot tell; pass --config YAML to set them)")
    for n in r["notes"]:
        lines.append(f"  note        {n}")
    for group, v in r["unused_keys"].items():
        lines.append(f"  unused      {v['count']:4d} keys: {group}")
    cn = r["invconv_condition_number"]
    if cn:
        lines.append(f"  1x1 convs   condition number {cn['min']:.4g} .. {cn['max']:.4g} "
                     f"(worst at layer {cn['worst_layer']})"
                     + (f"; frozen orthogonality error {r['frozen_invconv_orthogonality_error']:.2g}"
                        if r["frozen_invconv_orthogonality_error"] is not None else ""))
    if r["actnorm_logs_range"]:
        a, z = r["actnorm_logs_range"], r["conv2dzeros_log_scale_range"]
        lines.append(f"  ActNorm     logs in [{a[0]:.3g}, {a[1]:.3g}]   Conv2dZeros 3*logs in [{z[0]:.3g}, {z[1]:.3g}]")
    bad = r["nonfinite_tensors"]
    lines.append(f"  finite      {'yes' if not bad else 'NO: ' + ', '.join(bad[:3])}")
    lines.append(f"  bound       {r['coupling_inverse_bound'].get('note', '')}")
    lines.append(f"  VERDICT     {r['verdict']}")
    return "\n".join(lines) + "\n"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect", help="describe a checkpoint and the inverse-slope bound of its couplings",
        description="Load one or more flow checkpoints (own .safetensors, SRFlow / NCSR / robustNF .pth state_dicts, "
                    "or bundled:<name>) without running any data, and report family, variant, layer plan, which "
                    "settings were inferred from the weights or defaulted, unused keys, weight health (NaN/Inf, "
                    "1x1-conv condition numbers, ActNorm and Conv2dZeros log-scale ranges) and the theoretical "
                    "per-sub-transform inverse-slope bound, with a one-line verdict.",
        epilog="Exit codes: 0 all inspected, 1 some file could not be loaded or holds NaN/Inf, 2 usage error.\n"
               "Examples:\n  robustness-diag inspect SRFlow_DF2K_4X.pth\n"
               "  robustness-diag inspect run/4X.pth --config run/config.yml --json\n"
               "  robustness-diag inspect --demo runs/demo   # writes and inspects two small demo checkpoints",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="checkpoint files or bundled:<name>")
    p.add_argument("--config", metavar="YAML", help="the original training/test YAML; overrides inferred and "
                                                    "defaulted settings (block indices, S, eps, divide_freq, ...)")
    p.add_argument("--json", action="store_true", help="print the full reports as JSON instead of text")
    p.add_argument("--demo", metavar="DIR", help="also write two reduced demo checkpoints (affine and RQ-spline "
                                                 "layouts, seeded random weights; rewritten identically when they "
                                                 "exist) into DIR and inspect them")
    p.add_argument("--device", type=opt.device, default=DEFAULT_DEVICE, help=DEVICE_HELP)
    p.set_defaults(func=main)


def main(args) -> int:
    prog = "robustness-diag inspect"
    if not args.checkpoints and not args.demo:
        return opt.usage_error(f"{prog}: give at least one CKPT or --demo DIR (see --help)")
    missing = [c for c in args.checkpoints if not c.startswith("bundled:") and not Path(c).exists()]
    if missing:
        return opt.usage_error(f"{prog}: no such file: {', '.join(printable(m) for m in missing)}")
    if args.config and not Path(args.config).is_file():
        return opt.usage_error(f"{prog}: config file not found: {printable(args.config)}")
    out_err = check_folder(args.demo, option="--demo") if args.demo else None
    if out_err:
        return opt.usage_error(f"{prog}: {out_err}")
    from robustness_diag.devices import resolve_device
    from robustness_diag.io import json_text
    try:
        resolve_device(args.device)
    except ValueError as e:
        print(f"robustness-diag inspect: {e}")
        return EXIT_USAGE
    result = run(InspectConfig(args.checkpoints, args.config, args.demo, device=args.device))
    if args.json:
        print(json_text(result.reports if len(result.reports) != 1 else result.reports[0]), end="")
    else:
        print("\n".join(format_report(r) for r in result.reports), end="")
        bad = [printable(r["path"]) for r in result.reports if r.get("status") in ("error", "fail")]
        print(f"{len(result.reports) - len(bad)} of {len(result.reports)} checkpoints inspected"
              + (f"; failed: {', '.join(bad)}" if bad else ""))
    return result.exit_code
