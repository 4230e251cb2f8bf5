"""Checkpoint audit: what a practitioner runs before deploying a conditional flow.

For each checkpoint (default: the two bundled 4X flows, side by side):

1. **static**: the ``inspect`` report (architecture, settings' sources, NaN/Inf, theoretical inverse bound) and, per
   coupling, the inverse slopes its conditioner produces on in-distribution inputs (affine: how close to ``1/eps``);
2. **OOD statistics** fitted on in-distribution LR inputs (``images``, else crops of the scikit-image photos the
   bundled flows were trained on);
3. **stress suite**: every documented degradation (:mod:`robustness_diag.data.degradations`) at several severities
   plus graphics images, applied to held-out photo crops (chelsea, never trained on), ``samples`` samples each at
   ``heat``, traced with :func:`robustness_diag.detect.trace_sampling`: artifact and NaN rates, inverse slopes,
   explosion maps and OOD score maps; artifact rate vs severity and vs OOD score;
4. **adversarial search** (:mod:`.adversarial`) within an L-inf budget of 8/255 and unconstrained;
5. **verdict** (robust / at risk / failing, with reasons) and a recommended OOD-score threshold for gating inputs at
   the chosen false-alarm rate, in the same report as ``correlate``.

Every finished unit (per model: static, fit, each condition, the attack) is saved under ``out/work/`` as it
finishes; running again with the same ``out`` resumes from there (``resume=False`` starts over).

Verdict rules (stated in the report with the measured numbers):

* **failing**: artifacts or non-finite values on clean in-distribution inputs;
* **at risk**: the exploding inverse is reachable - a non-finite output, or an inverse slope within 1% (in log) of
  the coupling's hard bound ``1/eps``, under a documented degradation or within the 8/255 adversarial budget;
* **robust**: otherwise: finite outputs everywhere tested and no coupling near an inverse bound. Out-of-range pixel
  rates under degradations are listed as caveats.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import correlate as C
from . import stats as S

BUNDLED = ("bundled:sr4x_affine", "bundled:sr4x_rqspline")

BUDGETS = {
    # images: held-out crops per condition; lr_size: LR crop side; samples: per image and condition;
    # levels: degradation severities; fit_images: in-distribution crops for the OOD fit; attack_*: search settings
    "fast": dict(images=4, lr_size=24, samples=3, levels=(1, 3), fit_images=16, attack_images=2, attack_steps=8,
                 bootstrap=200),
    "standard": dict(images=8, lr_size=32, samples=4, levels=(1, 2, 3), fit_images=48, attack_images=4,
                     attack_steps=20, bootstrap=1000),
    "thorough": dict(images=16, lr_size=48, samples=8, levels=(1, 2, 3), fit_images=128, attack_images=8,
                     attack_steps=50, bootstrap=2000),
}
SMALL_BUDGET = 8 / 255
NEAR_BOUND = 0.99   # "at the bound": log slope >= 99% of log(1/eps)
#: Only a hard inverse-slope bound above this is a danger to reach (affine 1/eps = 1e4); smaller ones (HCFlow's atan
#: scale, 1.65 per coupling; the reparametrised affine, 1 + eps) are the coupling working as designed.
LARGE_BOUND = 100.0


@dataclass
class AuditConfig:
    """``heat``: sampling temperature (None: each checkpoint's own, ``flow.config.heat``: 0.9 for the bundled and
    SRFlow flows, 0 for LLFlow, whose reference output is deterministic). ``overrides``: entries replacing those of
    the chosen budget (e.g. a tiny setting for tests)."""

    checkpoints: list = field(default_factory=list)
    config: Optional[str] = None
    images: Optional[str] = None
    from_hr: bool = False
    budget: str = "fast"
    out: str = "runs/audit"
    heat: Optional[float] = None
    false_alarm: float = 0.05
    seed: int = 0
    device: str = "cpu"
    resume: bool = True
    progress: bool = True
    overrides: dict = field(default_factory=dict)


class AuditError(Exception):
    """A setup problem that stops the audit of one checkpoint (unreadable file, no images, ...)."""


# -- small utilities ------------------------------------------------------------------------------------------------
def _save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=C._jsonable))
    tmp.replace(path)


def _cached(path: Path, resume: bool, compute):
    """Returns the JSON at ``path`` when resuming and it exists, else computes, saves and returns it."""
    if resume and path.is_file():
        return json.loads(path.read_text())
    obj = compute()
    _save_json(path, obj)
    return obj


def _slug(spec: str) -> str:
    s = str(spec).replace("bundled:", "")
    s = Path(s).name if not str(spec).startswith("bundled:") else s
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def _condition_inputs(hr: torch.Tensor, scale: int, levels, seed: int, lr_size: int, domain=None) -> dict:
    """Condition name -> (input batch, degradation family, severity). ``hr``: held-out HR crops; ``domain``: see
    ``Flow.input_domain`` (low-light flows get darkened inputs, degraded after darkening as a camera would)."""
    from robustness_diag.data import degradations as deg
    from robustness_diag.data.photos import downscale

    domain = domain or (lambda x: x)
    g = torch.Generator().manual_seed(seed + 1)
    lr = domain(downscale(hr, scale))
    out = {"clean": (lr, "clean", 0)}
    for lv in levels:
        out[f"noise{lv}"] = (deg.add_noise(lr, lv, g), "noise", lv)
        out[f"blur{lv}"] = (domain(deg.blur_mismatch(hr, lv, scale)), "blur", lv)
        out[f"jpeg{lv}"] = (deg.jpeg(lr, lv), "jpeg", lv)
        out[f"exposure{lv}"] = (deg.exposure(lr, lv), "exposure", lv)
    out["graphics"] = (domain(deg.graphics_lr(lr_size, scale, hr.shape[0], g)), "graphics", 1)
    return out


def _events_on_feature_grid(mask: torch.Tensor, n_images: int, grid: tuple[int, int]) -> torch.Tensor:
    """Artifact masks ``[S*B, H, W]`` (sample-major) -> events per LR cell ``[B, h, w]``: in how many samples any HR
    pixel of the cell's block was an artifact."""
    m = mask.float()[:, None]
    pooled = F.adaptive_max_pool2d(m, grid)[:, 0] if tuple(m.shape[-2:]) != tuple(grid) else m[:, 0]
    return pooled.view(-1, n_images, *grid).sum(0)


# -- the audit of one model -------------------------------------------------------------------------------------------
class _ModelAudit:
    def __init__(self, spec: str, cfg: AuditConfig, budget: dict, work: Path):
        from robustness_diag.flows.loading import load_flow

        self.spec, self.cfg, self.b, self.work = spec, cfg, budget, work
        self.device = torch.device(cfg.device)
        self.flow = load_flow(spec, config=cfg.config).eval().to(self.device)
        self.scale = int(self.flow.config.scale)
        self.heat = float(cfg.heat if cfg.heat is not None else self.flow.config.heat)
        self.name = _slug(spec)

    # 1. static ----------------------------------------------------------------------------------------------------
    def static(self, clean_lr: torch.Tensor) -> dict:
        from robustness_diag.detect import trace_sampling
        from robustness_diag.flows.inspect import inspect_flow

        rep = inspect_flow(self.flow)
        tr = trace_sampling(self.flow, clean_lr, self.heat, self.b["samples"],
                            torch.Generator().manual_seed(self.cfg.seed), keep_layer_maps=False,
                            return_image=False).cpu()
        per_layer = []
        for rec in tr.layers:
            if rec.stages:
                worst = max(float(s.log_slope_max.max()) for s in rec.stages.values())
                per_layer.append({"layer": rec.name, "max_log_slope": worst})
        bound = self.flow.log_inverse_slope_bound()
        in_dist = max((r["max_log_slope"] for r in per_layer), default=float("nan"))
        return {"inspect": rep, "bound_log_slope": bound, "in_distribution_max_log_slope": in_dist,
                "in_distribution_fraction_of_bound": (in_dist / bound) if bound else None,
                "layer_trace_clean": per_layer}

    # 2. OOD statistics --------------------------------------------------------------------------------------------
    def fit(self):
        from robustness_diag.ood import MahalanobisScorer
        from robustness_diag.ood.features import fit_flow

        path = self.work / "ood_stats.safetensors"
        if self.cfg.resume and path.is_file():
            return MahalanobisScorer.load(path).to(self.device)
        scorer = fit_flow(self.flow, (x.to(self.device) for x in self._fit_images()),
                          meta={"source": self.cfg.images or "scikit-image photos"})
        scorer.save(path)
        return scorer.to(self.device)

    def _fit_images(self):
        from robustness_diag.data.photos import TRAIN_PHOTOS, downscale, load_photo, random_crops

        if self.cfg.images:
            from robustness_diag.data.images import list_images, read_image
            items = list_images([self.cfg.images])
            if not items:
                raise AuditError(f"{self.cfg.images}: no images found for the OOD fit")
            for item in items:
                try:
                    img = read_image(item.path).image
                except Exception as e:  # a bad file is skipped and said, the fit goes on
                    print(f"[audit] skipping {item.path}: {e}")
                    continue
                img = img[None] if img.dim() == 3 else img
                yield downscale(img, self.scale) if self.cfg.from_hr else img
            return
        hr = random_crops([load_photo(n) for n in TRAIN_PHOTOS], self.b["fit_images"],
                          2 * self.b["lr_size"] * self.scale, torch.Generator().manual_seed(self.cfg.seed + 7),
                          augment=False)
        for lr in self.flow.input_domain(downscale(hr, self.scale)):
            yield lr[None]

    # 3. stress suite ----------------------------------------------------------------------------------------------
    def condition(self, name: str, lr: torch.Tensor, scorer, family: str, severity: int) -> dict:
        """Traces ``samples`` samples per image; saves arrays for the report in ``work/<name>.npz``."""
        from robustness_diag.detect import trace_sampling

        path = self.work / f"cond_{name}.json"
        if self.cfg.resume and path.is_file() and path.with_suffix(".npz").is_file():
            return json.loads(path.read_text())
        tr = trace_sampling(self.flow, lr, self.heat, self.b["samples"],
                            torch.Generator().manual_seed(self.cfg.seed + 100), keep_layer_maps=False).cpu()
        level = scorer.primary_level
        with torch.no_grad():
            score = scorer({level: self.flow.features(lr)[level]})[level].double().cpu()       # [B, h, w]
        B = lr.shape[0]
        events = _events_on_feature_grid(tr.artifact_mask, B, tuple(score.shape[-2:]))
        per_layer = [{"layer": r.name, "max_log_slope": max(float(s.log_slope_max.max()) for s in r.stages.values())}
                     for r in tr.layers if r.stages]
        finite = torch.isfinite(tr.max_log_slope)
        res = {"condition": name, "family": family, "severity": severity, "images": B,
               "samples": self.b["samples"],
               "frac_samples_with_artifact": float((tr.artifact_pixels > 0).float().mean()),
               "frac_artifact_pixels": float(tr.artifact_mask.float().mean()),
               "frac_nan_pixels": float(tr.nan_mask.float().mean()),
               "frac_nonfinite_pixels": float((tr.nan_mask | tr.inf_mask).float().mean()),
               "max_log_slope": float(tr.max_log_slope[finite].max()) if finite.any() else None,
               "explosion_max": float(torch.nan_to_num(tr.explosion_map, nan=-math.inf).max()),
               "score_mean": float(score.mean()), "score_p99": float(torch.quantile(score.flatten(), 0.99)),
               "layer_trace": per_layer}
        # one example: the sample with the most artifact pixels
        n = int(tr.artifact_pixels.argmax())
        b = int(tr.image_index[n])
        np.savez_compressed(path.with_suffix(".npz"), score=score.numpy(), events=events.numpy(),
                            lr=lr[b].permute(1, 2, 0).cpu().numpy(), sample=tr.image[n].permute(1, 2, 0).numpy(),
                            mask=tr.artifact_mask[n].numpy(), explosion=tr.explosion_map[n].numpy(),
                            attribution=tr.attribution[n].numpy(), example_image=np.array(b))
        _save_json(path, res)
        return res

    # 4. adversarial -------------------------------------------------------------------------------------------------
    def adversarial(self, lr: torch.Tensor, scorer) -> dict:
        from robustness_diag.detect import trace_sampling

        from .adversarial import AttackConfig, attack

        path = self.work / "adversarial.json"
        if self.cfg.resume and path.is_file():
            return json.loads(path.read_text())
        out = {}
        level = scorer.primary_level
        for label, eps in (("budget_8_255", SMALL_BUDGET), ("unconstrained", 1.0)):
            acfg = AttackConfig(epsilon=eps, steps=self.b["attack_steps"], heat=self.heat, seed=self.cfg.seed)
            res = attack(self.flow, lr, acfg, progress=self.cfg.progress)
            tr = trace_sampling(self.flow, res.lr, self.heat, self.b["samples"],
                                torch.Generator().manual_seed(self.cfg.seed + 200), keep_layer_maps=False).cpu()
            with torch.no_grad():
                score = scorer({level: self.flow.features(res.lr)[level]})[level].double().cpu()
            finite = torch.isfinite(tr.max_log_slope)
            out[label] = {"epsilon": eps, "steps": acfg.steps,
                          "start_max_log_slope": float(res.start_log_slope.max()),
                          "found_max_log_slope": float(res.best_log_slope.max()),
                          "sampled_max_log_slope": float(tr.max_log_slope[finite].max()) if finite.any() else None,
                          "frac_samples_with_artifact": float((tr.artifact_pixels > 0).float().mean()),
                          "frac_artifact_pixels": float(tr.artifact_mask.float().mean()),
                          "frac_nonfinite_pixels": float((tr.nan_mask | tr.inf_mask).float().mean()),
                          "score_mean": float(score.mean()), "score_p99": float(torch.quantile(score.flatten(), 0.99))}
            n = int(tr.artifact_pixels.argmax())
            b = int(tr.image_index[n])
            np.savez_compressed(self.work / f"adv_{label}.npz", lr=res.lr[b].permute(1, 2, 0).cpu().numpy(),
                                sample=tr.image[n].permute(1, 2, 0).numpy(), mask=tr.artifact_mask[n].numpy(),
                                explosion=tr.explosion_map[n].numpy(), attribution=tr.attribution[n].numpy(),
                                score=score[b].numpy())
        # the same budget spent at random (sign noise at +-8/255): what a non-adversarial perturbation does
        g = torch.Generator().manual_seed(self.cfg.seed + 300)
        noisy = (lr + SMALL_BUDGET * torch.randn(lr.shape, generator=g).sign().to(lr)).clamp(0, 1)
        tr = trace_sampling(self.flow, noisy, self.heat, self.b["samples"],
                            torch.Generator().manual_seed(self.cfg.seed + 200), keep_layer_maps=False,
                            return_image=False).cpu()
        finite = torch.isfinite(tr.max_log_slope)
        out["random_8_255"] = {"epsilon": SMALL_BUDGET,
                               "sampled_max_log_slope": float(tr.max_log_slope[finite].max()) if finite.any() else None,
                               "frac_artifact_pixels": float(tr.artifact_mask.float().mean()),
                               "frac_nonfinite_pixels": float((tr.nan_mask | tr.inf_mask).float().mean())}
        _save_json(path, out)
        return out


def _label(c: dict) -> str:
    """``"noise1 (LR Gaussian noise, sigma 0.05)"``: a stress condition's label with what it is."""
    from robustness_diag.data.degradations import describe

    text = describe(c["condition"])
    return c["condition"] if text == c["condition"] else f"{c['condition']} ({text})"


def verdict(static: dict, conditions: list, adversarial: dict) -> dict:
    """Applies the module's verdict rules; returns ``{"verdict", "reasons", "caveats"}``."""
    reasons, caveats = [], []
    clean = next(c for c in conditions if c["condition"] == "clean")
    bound = static["bound_log_slope"]
    if clean["frac_artifact_pixels"] > 0 or clean["frac_nonfinite_pixels"] > 0:
        reasons.append(f"artifacts on clean held-out inputs: {clean['frac_artifact_pixels']:.2%} of pixels "
                       f"({clean['frac_nonfinite_pixels']:.2%} non-finite)")
        return {"verdict": "failing", "reasons": reasons, "caveats": caveats}

    def at_bound(v):
        return bound is not None and bound > math.log(LARGE_BOUND) and v is not None and v >= NEAR_BOUND * bound

    for c in conditions:
        if c["frac_nonfinite_pixels"] > 0:
            reasons.append(f"{_label(c)}: NaN/Inf output in {c['frac_nonfinite_pixels']:.2%} of pixels")
        elif at_bound(c["max_log_slope"]):
            reasons.append(f"{_label(c)}: inverse slope {math.exp(c['max_log_slope']):.3g} reaches the 1/eps "
                           f"bound {math.exp(bound):.3g}")
    small = adversarial.get("budget_8_255", {})
    if small:
        if small["frac_nonfinite_pixels"] > 0 or at_bound(small["found_max_log_slope"]):
            rnd = adversarial.get("random_8_255", {})
            vs = "" if rnd.get("sampled_max_log_slope") is None else \
                (f" (random sign noise of the same budget: inverse slope {math.exp(rnd['sampled_max_log_slope']):.3g}, "
                 f"{rnd['frac_artifact_pixels']:.2%} artifact pixels)")
            reasons.append(f"adversarial LR within 8/255: inverse slope {math.exp(small['found_max_log_slope']):.3g}"
                           f"{vs}, {small['frac_artifact_pixels']:.2%} artifact and {small['frac_nonfinite_pixels']:.2%} "
                           f"non-finite pixels")
    for c in conditions:
        if c["frac_artifact_pixels"] > 0.01 and c["frac_nonfinite_pixels"] == 0:
            caveats.append(f"{_label(c)}: {c['frac_artifact_pixels']:.2%} of pixels out of range (finite)")
    unc = adversarial.get("unconstrained", {})
    if unc:
        caveats.append(f"unconstrained adversarial input: inverse slope {math.exp(unc['found_max_log_slope']):.3g}, "
                       f"{unc['frac_artifact_pixels']:.2%} out-of-range and {unc['frac_nonfinite_pixels']:.2%} "
                       f"non-finite pixels")
    if reasons:
        return {"verdict": "at risk", "reasons": reasons, "caveats": caveats}
    kind = "bounded by construction (no 1/eps bound reached)" if bound is None else \
        f"bounded by construction (at most {math.exp(bound):.3g} per coupling)" if bound <= math.log(LARGE_BOUND) else \
        f"largest inverse slope {max(math.exp(c['max_log_slope'] or 0) for c in conditions):.3g} < bound " \
        f"{math.exp(bound):.3g}"
    return {"verdict": "robust", "caveats": caveats,
            "reasons": [f"finite outputs under every degradation and the 8/255 adversarial search; inverse {kind}"]}


def audit_model(spec: str, cfg: AuditConfig, root: Path) -> tuple[dict, C.ModelResult]:
    """Runs (or resumes) every stage for one checkpoint. Returns its summary and its correlation observations."""
    from robustness_diag.data.photos import VALIDATION_PHOTOS, load_photo, random_crops

    b = {**BUDGETS[cfg.budget], **cfg.overrides}
    work = root / "work" / _slug(spec)
    work.mkdir(parents=True, exist_ok=True)
    m = _ModelAudit(spec, cfg, b, work)
    hr = random_crops([load_photo(n) for n in VALIDATION_PHOTOS], b["images"], b["lr_size"] * m.scale,
                      torch.Generator().manual_seed(cfg.seed), augment=False)
    conds = {k: (lr.to(m.device), fam, sev)
             for k, (lr, fam, sev) in _condition_inputs(hr, m.scale, b["levels"], cfg.seed, b["lr_size"],
                                                             m.flow.input_domain).items()}
    static = _cached(work / "static.json", cfg.resume, lambda: m.static(conds["clean"][0]))
    scorer = m.fit()
    names = list(conds)
    it = names
    if cfg.progress:
        from tqdm import tqdm
        it = tqdm(names, desc=f"stress {m.name}", unit="cond", leave=False)
    rows = [m.condition(n, conds[n][0], scorer, conds[n][1], conds[n][2]) for n in it]
    adv = m.adversarial(conds["clean"][0][:b["attack_images"]], scorer)
    v = verdict(static, rows, adv)

    # per-position observations over all conditions (one "image" per condition x crop)
    scores, events, image = [], [], []
    for k, n in enumerate(names):
        z = np.load(work / f"cond_{n}.npz")
        scores.append(z["score"].ravel())
        events.append(z["events"].ravel())
        per = z["score"][0].size
        image.append(np.repeat(np.arange(z["score"].shape[0]) + 1000 * k, per))
    obs = S.Observations(np.concatenate(scores), np.concatenate(events), b["samples"], np.concatenate(image))
    worst = max(rows, key=lambda r: (r["frac_nonfinite_pixels"], r["frac_artifact_pixels"]))
    examples = []
    for label, f in ((f"worst degradation: {worst['condition']}", work / f"cond_{worst['condition']}.npz"),
                     ("adversarial 8/255", work / "adv_budget_8_255.npz")):
        z = np.load(f)
        sc = z["score"][int(z["example_image"])] if "example_image" in z.files else z["score"]
        examples.append({"title": label, "lr": z["lr"], "sample": z["sample"], "mask": z["mask"], "ood": sc,
                         "explosion": z["explosion"], "attribution": z["attribution"]})
    traces = {"clean": static["layer_trace_clean"], worst["condition"]: worst["layer_trace"]}
    result = C.ModelResult(m.name, obs, layer_traces=traces, slope_bound=static["bound_log_slope"],
                           examples=examples,
                           image_names=None, notes=[])
    summary = {"checkpoint": str(spec), "name": m.name, "coupling": m.flow.config.coupling,
               "family": m.flow.family, "heat": m.heat,
               "static": {k: v for k, v in static.items() if k != "inspect"},
               "inspect_verdict": static["inspect"].get("verdict"), "conditions": rows, "adversarial": adv,
               **v, "ood_fit": scorer.fit_report}
    return summary, result


def run(cfg: AuditConfig, render=None) -> dict:
    """Audits every checkpoint (default: both bundled flows) and writes ``audit.json``, the correlate statistics and
    report data; ``render(out_dir) -> Path`` draws the figures and ``report.html`` (the CLI passes
    :func:`robustness_diag.reports.correlate_report.rerender`). Returns the summaries and the report path (None
    without ``render`` or when nothing could be audited)."""
    if cfg.budget not in BUDGETS:
        raise ValueError(f"budget must be one of {sorted(BUDGETS)}, got {cfg.budget!r}")
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = list(cfg.checkpoints) or list(BUNDLED)
    summaries, results, failures = [], [], []
    for spec in specs:
        try:
            s, r = audit_model(spec, cfg, out)
        except Exception as e:  # noqa: BLE001 - one bad checkpoint must not stop the others; said in the report
            from robustness_diag.flows.errors import CheckpointError
            if not isinstance(e, (CheckpointError, AuditError, FileNotFoundError, ValueError)):
                raise
            failures.append({"checkpoint": str(spec), "error": str(e)})
            continue
        summaries.append(s)
        results.append(r)
    _save_json(out / "audit.json", {"config": asdict(cfg), "budget": BUDGETS[cfg.budget], "models": summaries,
                                    "failures": failures})
    report = write_report(out, cfg, summaries, results, failures, render) if results else None
    return {"out": str(out), "models": summaries, "failures": failures,
            "report": None if report is None else str(report)}


def write_report(out: Path, cfg: AuditConfig, summaries: list, results: list, failures: list, render=None):
    """Report data of the stress-suite observations (the correlate statistics plus verdicts, stress tables and
    warnings), then ``render(out)`` if given; returns what ``render`` returned (the report's path) or None."""
    budget = {**BUDGETS[cfg.budget], **cfg.overrides}
    ccfg = C.CorrelateConfig(out=str(out), n_resamples=budget["bootstrap"], false_alarm=cfg.false_alarm,
                             seed=cfg.seed, title="Checkpoint audit: " + ", ".join(s["name"] for s in summaries))
    res = C.run(results, ccfg)
    data = json.loads((out / "report_data.json").read_text())
    verdicts = []
    for s in summaries:
        thr = res["metrics"][s["name"]]["threshold"]
        gate = (f"gate inputs at OOD score >= {thr['value']:.3g} (per position; {thr['false_alarm']:.1%} false "
                f"alarms on the stress suite)") if thr.get("value") is not None else \
            f"no gating threshold: {thr.get('undefined')}"
        verdicts.append({"model": s["name"], "verdict": s["verdict"], "reasons": s["reasons"] + s["caveats"] + [gate]})
        s["recommended_threshold"] = thr
    data["verdicts"] = verdicts
    data["warnings"] = [f"{f['checkpoint']}: not audited: {f['error']}" for f in failures]
    data["tables"] = _stress_tables(summaries)
    data["notes"] = [f"Budget '{cfg.budget}': {budget}. Held-out chelsea crops, degradations of "
                     "robustness_diag/data/degradations.py; artifact = any channel > 1.5 or < -0.5 or non-finite; "
                     "inverse slopes are natural logs; the OOD statistics are fitted on in-distribution crops."]
    _save_json(out / "report_data.json", data)
    _save_json(out / "audit.json", {"config": asdict(cfg), "budget": BUDGETS[cfg.budget], "models": summaries,
                                    "failures": failures})
    return render(out) if render is not None else None


def _stress_tables(summaries: list) -> list:
    tables = []
    for s in summaries:
        rows = [[_label(c), c["frac_samples_with_artifact"], c["frac_artifact_pixels"], c["frac_nonfinite_pixels"],
                 None if c["max_log_slope"] is None else math.exp(c["max_log_slope"]), c["score_mean"]]
                for c in s["conditions"]]
        for label, a in s["adversarial"].items():
            slope = a.get("found_max_log_slope", a.get("sampled_max_log_slope"))
            rows.append([f"{'random' if label.startswith('random') else 'adversarial'} {label}",
                         a.get("frac_samples_with_artifact"), a["frac_artifact_pixels"], a["frac_nonfinite_pixels"],
                         None if slope is None else math.exp(slope), a.get("score_mean")])
        tables.append({"title": f"Stress suite: {s['name']} ({s['family']}, {s['coupling']}, heat {s['heat']:g})",
                       "columns": ["condition", "samples with artifacts", "artifact pixels", "NaN/Inf pixels",
                                   "max inverse slope", "mean OOD score"], "rows": rows})
    return tables
