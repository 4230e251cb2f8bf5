"""Architecture configurations of the flow families (:class:`FlowConfig`: the SRFlow family and LLFlow;
:class:`HCFlowConfig`: HCFlow), and the per-variant defaults for what weights cannot tell."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

#: Coupling kind -> the FlowStep attribute name used in the reference state_dicts.
COUPLING_ATTR = {"affine": "affine", "affine_reparam": "affinereparam", "rqspline": "rqspline"}

#: Settings that no weight reveals (the original projects' YAML sets them); defaults: :func:`default_settings`.
NON_INFERABLE = ("blocks", "eps", "S", "residual", "bounds", "heat")


class ConfigDict:
    """Dict/JSON round trip of a config dataclass (stored in checkpoint headers); unknown fields are refused."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**d)


@dataclass
class FlowConfig(ConfigDict):
    """Everything needed to build an SRFlow-family network (SRFlow, NCSR/FS-NCSR, robustNF).

    Attributes:
        family: "srflow", "ncsr" (affine + std branch) or "robustnf" (RQ spline / reparametrised affine).
        coupling: "affine", "affine_reparam" or "rqspline".
        coupling_attr: FlowStep attribute of the coupling ("affine", "affinereparam", "rqspline"); robustNF's plain
            ``affine`` class with ``affine_reparam: true`` keeps the attribute "affine" with coupling "affine_reparam".
        scale: SR factor; L: number of levels (squeezes); K: coupling steps per level; n_additional: steps without
            coupling right after each squeeze; splits: levels followed by a Split2d.
        nf, nb, gc, in_nc: RRDB widths/depth; blocks: stacked trunk-block indices (not inferable from weights).
        cond_channels: channels of the conditioner features fed to couplings (``nf * (1 + len(blocks))``).
        hidden, kernel_hidden: coupling sub-network hidden channels and middle kernel size.
        eps: affine scale floor (``sigmoid(raw + 2) + eps``).
        std_channels: NCSR std-map channels (0 = no std branch); S: std-conditioned steps per level (last S of K).
        frozen_invconv: robustNF ``permutation_train: false`` (fixed orthogonal 1x1 conv with stored transpose).
        residual: the flow models ``HR - bicubic_up(LR)`` (FS-NCSR, robustNF ``divide_freq``); ``sample`` adds it back.
        bounds: spline box (left, right, bottom, top).
        heat: default sampling temperature.
        f_in, f_out: shape of the unused ``flowUpsamplerNet.f.0`` conv kept for strict loading (0 = absent).
        encoder_in_nc: input channels of a conditioner whose input is not the flow image (LLFlow's ConEncoder1: 12 =
            log image + histogram-equalised image + colour map + noise map); 0 = same as ``in_nc``.

    LLFlow (family "llflow") uses this class with ``scale = 1``, ``in_nc = 3`` (the image the flow models),
    ``L = 3``, no splits and ``cond_channels`` = the reference's ``conditionInFeaDim``.
    """

    family: str = "srflow"
    coupling: str = "affine"
    coupling_attr: str = "affine"
    scale: int = 4
    L: int = 3
    K: list = 16  # int or per-level list
    n_additional: list = 2
    splits: list = field(default_factory=lambda: [1])
    in_nc: int = 3
    nf: int = 64
    nb: int = 23
    gc: int = 32
    blocks: list = field(default_factory=lambda: [1, 8, 15, 22])
    cond_channels: int = 320
    hidden: int = 64
    kernel_hidden: int = 1
    eps: float = 1e-4
    std_channels: int = 0
    S: list = 0
    frozen_invconv: bool = False
    residual: bool = False
    bounds: list = field(default_factory=lambda: [-0.5, 0.5, -0.5, 0.5])
    heat: float = 0.9
    f_in: int = 320
    f_out: int = 96
    encoder_in_nc: int = 0

    def __post_init__(self):
        self.K = _per_level(self.K, self.L, "K")
        self.n_additional = _per_level(self.n_additional, self.L, "n_additional")
        self.S = [min(s, k) for s, k in zip(_per_level(self.S, self.L, "S"), self.K)]  # S > K means "all K"
        self.blocks = [int(b) for b in self.blocks]
        self.splits = [int(s) for s in self.splits]
        self.bounds = [float(b) for b in self.bounds]

    def validate(self) -> None:
        """Raises ValueError naming every inconsistent setting."""
        errors = []
        if self.coupling not in COUPLING_ATTR:
            errors.append(f"coupling must be one of {sorted(COUPLING_ATTR)}, got {self.coupling!r}")
        if self.family == "llflow":
            if self.scale != 1:
                errors.append(f"LLFlow works at scale 1, got {self.scale}")
            if self.splits:
                errors.append(f"LLFlow has no splits, got split levels {self.splits}")
            if self.encoder_in_nc not in (0, 12):
                errors.append(f"LLFlow conditioner input of {self.encoder_in_nc} channels: only the shipped input "
                              "flags (log + histogram-equalised image, 12 channels with the maps) are supported")
        elif self.scale not in (2, 4, 8, 16):
            errors.append(f"scale must be 2, 4, 8 or 16, got {self.scale}")
        bad = [b for b in self.blocks if not 0 <= b < self.nb]
        if bad:
            errors.append(f"stacked block indices {bad} are outside the trunk of nb={self.nb} blocks")
        if self.cond_channels != self.nf * (1 + len(self.blocks)):
            errors.append(f"cond_channels={self.cond_channels} but nf*(1+len(blocks)) = "
                          f"{self.nf}*(1+{len(self.blocks)}) = {self.nf * (1 + len(self.blocks))}")
        if any(not 1 <= s <= self.L for s in self.splits):
            errors.append(f"split levels {self.splits} must lie in 1..L={self.L}")
        left, right, bottom, top = self.bounds
        if not (left < right and bottom < top):
            errors.append(f"spline bounds {self.bounds} must satisfy left < right, bottom < top")
        if errors:
            raise ValueError("; ".join(errors))


@dataclass
class HCFlowConfig(ConfigDict):
    """Architecture of an HCFlow SR network (``test_SR_*_HCFlow.yml`` ``network_G.flowDownsampler``).

    Attributes:
        scale: 4 (L = 2) or 8 (L = 3); K: main (unconditional) steps per level, i.e. the reference ``K -
            after_flowstep``; n_cond_steps: conditional-flow steps per level (``splitOff.after_flowstep``);
        rrdb_nb: blocks of ``RRDB_trunk0`` and ``RRDB_trunk1`` in every conditional flow; nf, gc: their widths;
        hidden: coupling sub-network width (``hidden_channels``); in_nc: image channels;
        heat: default sampling temperature (0.9 for 4X, 0.8 for 8X, the test YAMLs); quant: dequantisation levels
        of the reference NLL (64 for 4X, 256 for 8X; not inferable).
    """

    family: str = "hcflow"
    coupling: str = "affine_atan"
    scale: int = 4
    L: int = 2
    K: list = 13
    n_cond_steps: list = 13
    rrdb_nb: list = field(default_factory=lambda: [7, 7])
    nf: int = 64
    gc: int = 32
    hidden: int = 64
    in_nc: int = 3
    heat: float = 0.9
    quant: int = 64
    residual: bool = False

    def __post_init__(self):
        self.K = [int(k) for k in (self.K if isinstance(self.K, (list, tuple)) else [self.K] * self.L)][:self.L]
        n = self.n_cond_steps
        self.n_cond_steps = [int(k) for k in (n if isinstance(n, (list, tuple)) else [n] * self.L)][:self.L]
        self.rrdb_nb = [int(b) for b in self.rrdb_nb]

    def validate(self) -> None:
        """Raises ValueError naming every inconsistent setting."""
        errors = []
        if self.family != "hcflow":
            errors.append(f"family must be 'hcflow', got {self.family!r}")
        if self.L not in (2, 3) or self.scale != 2 ** self.L:
            errors.append(f"HCFlow SR exists for scale 4 (L=2) and 8 (L=3), got scale={self.scale}, L={self.L}")
        if len(self.K) != self.L or len(self.n_cond_steps) != self.L:
            errors.append(f"K {self.K} and n_cond_steps {self.n_cond_steps} need {self.L} entries")
        if len(self.rrdb_nb) != 2:
            errors.append(f"rrdb_nb needs 2 entries (RRDB_trunk0, RRDB_trunk1), got {self.rrdb_nb}")
        if errors:
            raise ValueError("; ".join(errors))

    def level_channels(self) -> list[tuple[int, int]]:
        """The level plan: ``(channels after the squeeze, channels kept by the split)`` per level, finest first."""
        out, c = [], self.in_nc
        for level in range(self.L):
            c *= 4
            keep = c // 2 if level < self.L - 1 else 3
            out.append((c, keep))
            c = keep
        return out


def _per_level(value, L: int, name: str) -> list:
    if isinstance(value, int):
        return [value] * L
    value = [int(v) for v in value]
    if len(value) < L:
        raise ValueError(f"{name} has {len(value)} entries but L={L} levels")
    return value[:L]


def default_settings(family: str, coupling: str, scale: int, nb: int, n_blocks: int) -> dict:
    """Reference defaults (the original projects' configs and code) for the settings no weight reveals.

    Returns a dict with ``blocks``, ``eps``, ``S``, ``residual``, ``bounds``, ``heat`` and a ``notes`` list saying
    where a reference default did not fit the weights and a fallback was used.
    """
    notes = []
    if family == "llflow":
        blocks = [1] if n_blocks == 1 else [1, 3, 5, 7]  # LOL_smallNet / LOL-pc, LOLv2-pc
    elif family == "srflow":
        blocks = [1, 3, 5, 7] if scale >= 8 else [1, 8, 15, 22]
    else:
        blocks = [1, 8, 15, 22]
    if len(blocks) != n_blocks or max(blocks) >= nb:
        # Reduced or custom architecture: the reference indices cannot apply. Spread n_blocks indices over the
        # trunk the way [1, 8, 15, 22] spreads 4 over 23 blocks; the result is a guess and is reported as one.
        step = max(1, (nb - 1) // max(1, n_blocks))
        blocks = [min(nb - 1, 1 + i * step) if nb > n_blocks else i for i in range(n_blocks)]
        if len(set(blocks)) != n_blocks:
            blocks = list(range(n_blocks))
        notes.append(f"reference block indices do not fit nb={nb} with {n_blocks} stacked blocks; guessed {blocks}")
    if family in ("srflow", "llflow"):
        S = None
    else:
        S = [0, 16, 16] if scale == 4 else [0, 0, 16, 16]
    residual = family == "robustnf"
    bounds = [-0.5, 0.5, -0.5, 0.5] if coupling == "rqspline" else None
    eps = 1e-4 if coupling in ("affine", "affine_reparam") else None
    heat = 0.0 if family == "llflow" else 0.9  # LLFlow's reference output is the heat-0 (colour-map) decode
    return {"blocks": blocks, "eps": eps, "S": S, "residual": residual, "bounds": bounds, "heat": heat,
            "notes": notes}
