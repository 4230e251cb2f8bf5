"""Writes a markdown model card for an own checkpoint from its provenance header and a phenomenon run.

``python -m robustness_diag.analyses.model_card FLOW.safetensors --phenomenon runs/phenomenon/phenomenon.json``
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from robustness_diag.flows.loading import load_flow
from robustness_diag.io import atomic_write_text, from_json_number as num

from .clustered import rate_cell


def card_text(flow, phenomenon: dict | None, flow_key: str | None = None) -> str:
    """The card's markdown: identity, architecture, training recipe and validation from the provenance header, and,
    given the ``phenomenon.json`` content of a run (rows of ``flow_key``, or all rows when None), its artifact
    rates. Numbers in ``phenomenon`` may be the strings ``"nan"``/``"inf"`` (:func:`robustness_diag.io.to_jsonable`)."""
    prov = flow.info.get("provenance", {})
    rec = prov.get("recipe", {})
    cfg = flow.config
    lines = [
        f"# {rec.get('name', Path(flow.info['path']).stem)}",
        "",
        f"A {cfg.scale}X super-resolution flow of the SRFlow family with **{cfg.coupling}** couplings "
        f"({'residual output: the flow models HR - bicubic_up(LR)' if cfg.residual else 'full-image output'}), "
        "trained by robustness-diag's recipe on photos that ship with scikit-image. It exists to demonstrate and "
        "test the diagnostics; it is not a competitive SR model.",
        "",
        "## Architecture",
        f"RRDB conditioner nf={cfg.nf}, nb={cfg.nb}, stacked blocks {cfg.blocks} ({cfg.cond_channels} feature "
        f"channels); L={cfg.L} levels, K={cfg.K} coupling steps, {cfg.n_additional} extra steps without coupling, "
        f"split after levels {cfg.splits}; hidden {cfg.hidden}; "
        + (f"eps={cfg.eps:g}." if cfg.coupling.startswith("affine") else f"spline box {cfg.bounds}."),
        f"Parameters: {sum(p.numel() for p in flow.parameters()):,}. File sha256: `{flow.info.get('sha256')}`.",
        "",
        "## Training",
        f"- data: HR crops of {rec.get('hr_patch')} px from {', '.join(rec.get('train_photos', []))}; LR by bicubic "
        f"downscaling with anti-aliasing; validation on held-out {', '.join(rec.get('val_photos', []))}",
        f"- {rec.get('steps')} steps, batch {rec.get('batch')}, Adam lr {rec.get('lr')} halved at "
        f"{rec.get('milestones')} of the run, seed {rec.get('seed')}, torch {prov.get('torch')}",
        f"- recipe: `checkpoints/recipes/{rec.get('name')}.yaml`; reproduce with "
        f"`python -m robustness_diag.flows.train --recipe checkpoints/recipes/{rec.get('name')}.yaml --out DIR`",
        "",
        "## Validation",
        f"- NLL: {prov.get('val_bpd', float('nan')):.4f} bits/dim (channels included; 64 fixed held-out patches)",
        f"- LR-consistency PSNR of samples at heat {rec.get('val_heat')}: {prov.get('lr_psnr', float('nan')):.2f} dB",
    ]
    if phenomenon:
        rows = [r for r in phenomenon["rows"] if flow_key is None or r["flow"] == flow_key]
        c = phenomenon["config"]
        lines += ["", "## Artifact rates (`analyses/phenomenon.py`)",
                  f"{c['images']} held-out LR crops of {c['lr_size']} px x {c['samples']} samples at heat "
                  f"{c['heat']}, seed {c['seed']}; artifact = a channel > {c['upper']} or < {c['lower']} or "
                  "non-finite, before clamping.", "",
                  "| condition | samples with artifacts | flagged samples (k/n [95% interval]) | artifact pixels | "
                  "NaN pixels | max inverse slope |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            flag = r.get("paper_flag") if isinstance(r.get("paper_flag"), dict) else None
            lines.append(f"| {r['condition']} | {num(r['frac_samples_with_artifact']):.3f} | {rate_cell(flag)} | "
                         f"{num(r['frac_artifact_pixels']):.2e} | {num(r['frac_nan_pixels']):.2e} | "
                         f"{num(r['max_inverse_slope']):.3g} |")
    return "\n".join(lines) + "\n"


def study_text(study: dict, coupling: str) -> str:
    """The card's "across seeds" section from a seed study (``analyses/seed_study.py``'s ``study.json``): every
    statement about ``coupling`` (or both couplings) with the number of seeds that support it, and this coupling's
    per-condition ranges across the seeds of each recipe."""
    from .seed_study import METRICS, cell
    lines = ["", f"## Across seeds and recipes (`analyses/seed_study.py`, {study['steps_note']})",
             "Which statements made from this flow hold for other training seeds of the same recipe (and for the "
             "study's other recipes, where it has them); cells are mean [min, max] across seeds.", "",
             "| statement | holds for |", "|---|---|"]
    for s in study["statements"]:
        if s["coupling"] in (coupling, "both", "pair"):
            lines.append(f"| {s['text']} | {s['n_hold']} of {s['n']} ({', '.join(s['tested'])}) |")
    lines += ["", "| recipe | seeds | condition | " + " | ".join(METRICS.values()) + " |",
              "|---|---|---|" + "---|" * len(METRICS)]
    for r in study["summary"]:
        if r["coupling"] == coupling:
            lines.append(f"| {r['recipe']} | {','.join(map(str, r['seeds']))} | {r['condition']} | "
                         + " | ".join(cell(r, m) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("flow")
    p.add_argument("--phenomenon", help="phenomenon.json of a run that included this flow")
    p.add_argument("--study", help="study.json of a seed study (analyses/seed_study.py): adds the across-seeds section")
    p.add_argument("--out", help="card path (default: next to the flow, .md)")
    a = p.parse_args(argv)
    flow = load_flow(a.flow)
    phen = json.loads(Path(a.phenomenon).read_text()) if a.phenomenon else None
    key = next((r["flow"] for r in phen["rows"] if Path(r["flow"]).name == Path(a.flow).name), None) if phen else None
    out = Path(a.out) if a.out else Path(a.flow).with_suffix(".md")
    text = card_text(flow, phen, key)
    if a.study:
        text += study_text(json.loads(Path(a.study).read_text()), flow.config.coupling)
    atomic_write_text(out, text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
