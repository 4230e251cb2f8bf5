"""NLL training of SRFlow-family flows from a recipe (YAML): deterministic given its seed, resumable, logged.

``python -m robustness_diag.flows.train --recipe checkpoints/recipes/sr4x_affine.yaml --out runs/train/affine``

Writes ``OUT/state.pt`` (resumable training state, tensors and plain values only), ``OUT/log.csv`` (one row per
log interval, flushed), and on completion ``OUT/<name>.safetensors`` with the config and provenance in its header.
"""
from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data.photos import TRAIN_PHOTOS, VALIDATION_PHOTOS, downscale, load_photo, random_crops
from ..io import atomic_write
from .base import Flow
from .config import FlowConfig
from .layers import data_dependent_init
from .loading import save_flow
from .network import SRFlowFamily


@dataclass
class Recipe:
    """A training recipe. ``flow`` holds FlowConfig fields; the rest are optimisation and data settings.

    ``rrdb_frozen_fraction``: the conditioner is frozen for this fraction of the steps, then trained jointly (the
    references freeze a pretrained RRDB for the first half; here it starts from its random init).
    ``lr_noise``: NCSR-style noise sigma_max (0 = off): sigma ~ U(0, lr_noise), the same noise added to the HR
    target and, downscaled, to the LR input; flows with a std branch (``std_channels`` 3) get the noise itself as
    their std condition (SoftFlow), and a zero map when sampling, as NCSR does.
    ``dequant``: SRFlow's dequantisation (0 = off): uniform noise ``(U(0, 1) - 0.5) / dequant`` on the HR target
    (after the LR is made from the clean crop), one quantisation step of ``1/dequant`` wide. The training NLL is then
    that of the dequantised data; the log adds ``val_nll_ref``, the validation NLL the way SRFlow reports it: bits
    per HR pixel (channels not included) with the discrete offset, ``3 * val_bpd + log2(dequant)`` for RGB (without
    the offset when ``dequant`` is 0).
    """

    name: str
    flow: dict
    seed: int = 0
    steps: int = 4000
    batch: int = 16
    hr_patch: int = 32
    lr: float = 5e-4
    milestones: list = field(default_factory=lambda: [0.5, 0.75, 0.9, 0.95])
    gamma: float = 0.5
    rrdb_frozen_fraction: float = 0.0
    lr_noise: float = 0.0
    dequant: int = 0
    val_every: int = 500
    log_every: int = 50
    ckpt_every: int = 250
    val_patches: int = 64
    val_heat: float = 0.9
    train_photos: list = field(default_factory=lambda: list(TRAIN_PHOTOS))
    val_photos: list = field(default_factory=lambda: list(VALIDATION_PHOTOS))

    @classmethod
    def from_yaml(cls, path) -> "Recipe":
        import yaml
        return cls(**yaml.safe_load(Path(path).read_text()))


def bits_per_dim(log_prob: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """``-log_prob / (ln 2 * C*H*W)`` (channels included)."""
    return -log_prob / (math.log(2.0) * hr[0].numel())


def reference_nll(val_bpd: float, channels: int, dequant: int) -> float:
    """SRFlow's reported NLL from bits per dimension (channels included): ``channels * val_bpd`` bits per HR pixel,
    plus ``log2(dequant)`` (its ``-ln(quant) * H * W`` log-det term) when the data were dequantised."""
    return channels * val_bpd + (math.log2(dequant) if dequant else 0.0)


def _target(flow: Flow, hr, lr):
    """The flow's modelled target: ``hr``, or ``hr - upsample(lr)`` for residual flows."""
    return hr - flow.upsample(lr) if flow.config.residual else hr


@torch.no_grad()
def validate(flow: SRFlowFamily, hr: torch.Tensor, lr: torch.Tensor, heat: float, seed: int) -> dict:
    """Validation NLL (bits/dim) and LR-consistency PSNR (dB) of samples at ``heat`` on fixed patches."""
    flow.eval()
    lp = flow.encode(_target(flow, hr, lr), lr)[1]
    sr = flow.sample(lr, heat=heat, generator=torch.Generator().manual_seed(seed)).clamp(0, 1)
    mse = ((downscale(sr, flow.config.scale) - lr) ** 2).mean()
    flow.train()
    return {"val_bpd": float(bits_per_dim(lp, hr).mean()), "lr_psnr": float(-10 * torch.log10(mse))}


def train(recipe: Recipe, out_dir, progress: bool = True, stop_at: int | None = None) -> Path | None:
    """Runs (or resumes) the recipe; returns the path of the final ``.safetensors``.

    ``stop_at``: save the training state and return None after this step (a time-boxed run; resume later).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    flow = SRFlowFamily(FlowConfig(**recipe.flow))
    train_imgs = [load_photo(n) for n in recipe.train_photos]
    val_imgs = [load_photo(n) for n in recipe.val_photos]
    gv = torch.Generator().manual_seed(10_000 + recipe.seed)
    val_hr = random_crops(val_imgs, recipe.val_patches, recipe.hr_patch, gv, augment=False)
    val_lr = downscale(val_hr, flow.config.scale)
    opt = torch.optim.Adam(flow.parameters(), lr=recipe.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(m * recipe.steps) for m in recipe.milestones],
                                                 recipe.gamma)
    g = torch.Generator().manual_seed(recipe.seed)
    step = 0
    state_path = out / "state.pt"
    if state_path.exists():
        st = torch.load(state_path, weights_only=True)
        flow.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        g.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        step = int(st["step"])
    flow.train()
    log_path = out / "log.csv"
    new_log = not log_path.exists() or step == 0
    log = open(log_path, "w" if new_log else "a", newline="")
    writer = csv.writer(log)
    if new_log:
        writer.writerow(["step", "train_bpd", "val_bpd", "lr_psnr", "lr", "seconds", "val_nll_ref"])
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=recipe.steps, initial=step, desc=recipe.name, unit="step")
    t0, running = time.time(), []
    frozen_until = int(recipe.rrdb_frozen_fraction * recipe.steps)
    while step < recipe.steps:
        hr = random_crops(train_imgs, recipe.batch, recipe.hr_patch, g)
        lr = downscale(hr, flow.config.scale)
        std = None
        if recipe.lr_noise > 0:
            sigma = torch.rand(hr.shape[0], 1, 1, 1, generator=g) * recipe.lr_noise
            noise = torch.randn(hr.shape, generator=g) * sigma
            hr, lr = hr + noise, lr + downscale(noise, flow.config.scale)
            if flow.config.std_channels:
                std = noise  # NCSR: the noise realisation itself conditions the std branch (zeros at test time)
        if recipe.dequant:
            hr = hr + (torch.rand(hr.shape, generator=g) - 0.5) / recipe.dequant
        if step == 0:
            with torch.no_grad(), data_dependent_init(flow):
                flow.encode(_target(flow, hr, lr), lr)
        for p in flow.RRDB.parameters():
            p.requires_grad_(step >= frozen_until)
        loss = bits_per_dim(flow.encode(_target(flow, hr, lr), lr, std)[1], hr).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 50.0)
        opt.step()
        sched.step()
        step += 1
        running.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(bpd=f"{running[-1]:.3f}")
        if step % recipe.log_every == 0 or step == recipe.steps:
            val = validate(flow, val_hr, val_lr, recipe.val_heat, recipe.seed) if (
                step % recipe.val_every == 0 or step == recipe.steps) else {"val_bpd": "", "lr_psnr": ""}
            ref = "" if val["val_bpd"] == "" else reference_nll(val["val_bpd"], hr.shape[1], recipe.dequant)
            writer.writerow([step, sum(running) / len(running), val["val_bpd"], val["lr_psnr"],
                             opt.param_groups[0]["lr"], round(time.time() - t0, 1), ref])
            log.flush()
            running = []
        if step % recipe.ckpt_every == 0 or step == recipe.steps:
            state = {"model": flow.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "generator": g.get_state(), "torch_rng": torch.get_rng_state(), "step": step}
            atomic_write(state_path, lambda tmp, st=state: torch.save(st, tmp))
        if stop_at is not None and step >= stop_at and step < recipe.steps:
            if step % recipe.ckpt_every:
                raise ValueError(f"stop_at={stop_at} must be a multiple of ckpt_every={recipe.ckpt_every}")
            log.close()
            return None
    log.close()
    if bar is not None:
        bar.close()
    flow.eval()
    final = validate(flow, val_hr, val_lr, recipe.val_heat, recipe.seed)
    flow.info = {"variant": f"robustness-diag {recipe.name}"}
    return save_flow(flow, out / f"{recipe.name}.safetensors",
                     provenance={"recipe": asdict(recipe), "torch": torch.__version__, **final,
                                 "val_nll_ref": reference_nll(final["val_bpd"], 3, recipe.dequant)})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe YAML (see checkpoints/recipes/)")
    p.add_argument("--out", required=True, help="run folder; an existing state.pt there is resumed")
    p.add_argument("--steps", type=int, help="override the recipe's step count (e.g. a short check)")
    p.add_argument("--stop-at", type=int, help="save state and stop after this step (resume by running again)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    recipe = Recipe.from_yaml(a.recipe)
    if a.steps:
        recipe.steps = a.steps
    path = train(recipe, a.out, progress=not a.no_progress, stop_at=a.stop_at)
    print(f"wrote {path}" if path else f"stopped at step {a.stop_at}; run again to resume")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
