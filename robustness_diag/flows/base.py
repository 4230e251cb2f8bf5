r"""The flow contract: what every flow family implements so that scoring, detection and the analyses work unchanged.

Every family (the SRFlow family in :mod:`.network`, LLFlow in :mod:`.llflow`, HCFlow in :mod:`.hcflow`) subclasses
:class:`Flow`; :func:`robustness_diag.load_flow` returns one. ``robustness_diag.ood``, ``robustness_diag.detect``
and the analyses use only the members defined here: a new family is one new module in ``flows/`` that implements
them (plus its key patterns in :mod:`.recognition` if it loads third-party checkpoints).

Conventions (the project's ARCHITECTURE.md, "Conventions"):

* *forward* is the density direction (HR image -> latents), *inverse* is sampling (latents -> image);
* images are float NCHW RGB in [0, 1]; ``lr`` is the condition (the LR image; LLFlow: the dark image);
* ``log_prob`` is the exact log-density in nats of the continuous HR image, shape ``[B]``;
* heat is the std of every latent; randomness only through an explicit ``torch.Generator``;
* the artifact criterion is applied to :meth:`Flow.sample`'s output before clamping.

Members fall in three groups: the public API (``info``, ``log_prob``, ``decode``, ``sample``, ``features``), what
the OOD scorer needs (feature levels with their resolution ratios and default, channels, receptive field, input
alignment, condition preprocessing, conditioner features of a preprocessed input), and what the tracer needs (latent
shapes and draws, the instrumented reverse pass :meth:`Flow.decode_with_ladj` and a :class:`SamplingPlan`).
"""
from __future__ import annotations

import abc
import math
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

#: ``tracer_factory(key)`` returns a coupling tracer, ``tracer(stage, ladj)`` (see :mod:`.couplings`), or None.
TracerFactory = Callable[[object], Optional[Callable[[str, Tensor], None]]]
#: ``layer_callback(index, layer, z)``: called after every main-flow layer of the reverse pass with its output.
LayerCallback = Callable[[int, nn.Module, Tensor], None]


class SamplingPlan(abc.ABC):
    """The reverse pass of one flow as the tracer walks it, layer by layer.

    Attributes:
        net: the module owning the main flow's layers (the key of the tracer's constant-term cache).
        layers: the main flow's layers in reference (density) order; sampling runs them from the last to the first.
        level_of: the *trace level* of every layer: its output resolution is ``HR / 2**level``.
    """

    def __init__(self, net: nn.Module, layers: Sequence[nn.Module], level_of: Iterable[int]):
        self.net, self.layers, self.level_of = net, layers, list(level_of)

    @abc.abstractmethod
    def top(self, lr: Tensor, latents: list) -> Tensor:
        """The tensor ``[N, C, h, w]`` the reverse pass starts from (the top latent, or the LR image)."""

    @abc.abstractmethod
    def kind(self, layer: nn.Module) -> str:
        """``"squeeze"``, ``"split"``, ``"coupling"`` (a step with a coupling) or ``"step"`` (a step without)."""

    def stage(self, key, stage: str) -> tuple[int, str]:
        """``(trace level, stage name)`` of a coupling sub-transform reported through ``tracer_factory(key)``."""
        return self.level_of[key], stage

    def split_logs(self, layer: nn.Module, z: Tensor) -> Optional[Tensor]:
        """Per-position log-scale sum ``[N, H_l, W_l]`` of a split prior, from the layer callback's output ``z``
        (None when ``layer`` is not a split whose prior scales its latent)."""
        return None

    def decode(self, flow: "Flow", lr: Tensor, heat: float, latents: list, std: Optional[Tensor],
               tracer_factory: TracerFactory, layer_callback: LayerCallback,
               add_split_logs: Callable[[int, Tensor], None]) -> tuple[Tensor, Tensor]:
        """Runs the instrumented reverse pass; returns ``(x [N, 3, H, W], ladj [N])``. Split-prior log-scales that
        the layer callback cannot see are reported through ``add_split_logs(trace level, [N, H_l, W_l])``."""
        return flow.decode_with_ladj(lr, heat, None, latents, std, tracer_factory=tracer_factory,
                                     layer_callback=layer_callback)

    @abc.abstractmethod
    def constant_steps(self) -> list[tuple[int, nn.Module]]:
        """``(trace level, step)`` of every step whose ``actnorm`` and ``invconv`` act on the sampling path (their
        inverse log-determinants are position-independent)."""

    def layer_names(self) -> dict[int, str]:
        """Human-readable names keyed by layer index: ``"level 2 squeeze"``, ``"level 2 pre-step 1"`` (a step
        without coupling), ``"level 2 step 3 coupling"`` (1-based per level), ``"level 1 split"``."""
        names, pre, cpl = {}, {}, {}
        for i, (layer, level) in enumerate(zip(self.layers, self.level_of)):
            kind = self.kind(layer)
            if kind == "coupling":
                cpl[level] = cpl.get(level, 0) + 1
                names[i] = f"level {level} step {cpl[level]} coupling"
            elif kind == "step":
                pre[level] = pre.get(level, 0) + 1
                names[i] = f"level {level} pre-step {pre[level]}"
            else:
                names[i] = f"level {level} {kind}"
        return names


class Flow(nn.Module, abc.ABC):
    """A conditional normalizing flow ``p(HR | LR)``; every family implements this contract.

    Attributes:
        config: the family's config dataclass (``family``, ``scale``, ``L``, ``heat``, ``coupling`` at least).
        info: what the loader knows (family, variant, coupling, scale, inferred vs defaulted settings).

    Shapes: ``lr`` is ``[B, C_in, h, w]`` (``C_in = 3``; LLFlow also takes its 6-channel preprocessed form) and HR is
    ``[B, 3, scale*h, scale*w]``.
    """

    config: object
    info: dict

    # -- identity --------------------------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        """The family name (``"srflow"``, ``"ncsr"``, ``"robustnf"``, ``"llflow"``, ``"hcflow"``)."""
        return str(self.config.family)

    @property
    def scale(self) -> int:
        """Upscaling factor HR / LR (1 for LLFlow)."""
        return int(self.config.scale)

    @property
    def default_heat(self) -> float:
        """The heat used when none is given (0.9 for SR flows, 0 for LLFlow's deterministic reference output)."""
        return float(self.config.heat)

    @property
    def residual(self) -> bool:
        """True when :meth:`sample` adds ``upsample(lr)`` to the decode output."""
        return bool(getattr(self.config, "residual", False))

    # -- public API ------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def log_prob(self, hr: Tensor, lr: Tensor, std: Optional[Tensor] = None) -> Tensor:
        """Exact ``log p(HR | LR)`` in nats, ``[B]``, for a continuous HR image ``[B, 3, H, W]`` in [0, 1]."""

    @abc.abstractmethod
    def features(self, lr: Tensor) -> dict[str, Tensor]:
        """Conditioner features per level: ``{name: [B, feature_channels(), h*r, w*r]}`` for every level of
        :meth:`feature_levels` (``r`` its ratio)."""

    @abc.abstractmethod
    def latent_shapes(self, lr: Tensor) -> list[tuple[int, ...]]:
        """Shapes of the latent list for this LR batch, in the family's documented order."""

    @abc.abstractmethod
    def draw_latents(self, lr: Tensor, heat: float, generator: Optional[torch.Generator] = None) -> list[Tensor]:
        """Latents for one sample per LR image, drawn on the generator's device (CPU by default), then moved to
        ``lr``'s device and dtype, so a seed gives the same latents on CPU and CUDA."""

    @abc.abstractmethod
    def decode_with_ladj(self, lr: Tensor, heat: Optional[float] = None, generator: Optional[torch.Generator] = None,
                         latents: Optional[list[Tensor]] = None, std: Optional[Tensor] = None,
                         tracer_factory: Optional[TracerFactory] = None,
                         layer_callback: Optional[LayerCallback] = None) -> tuple[Tensor, Tensor]:
        """The reverse pass: ``(x [B, 3, H, W], log|dx/d latents| [B])``. ``tracer_factory`` and
        ``layer_callback`` are read-only instrumentation (see :class:`SamplingPlan`)."""

    def decode(self, lr: Tensor, heat: Optional[float] = None, generator: Optional[torch.Generator] = None,
               latents: Optional[list[Tensor]] = None, std: Optional[Tensor] = None) -> Tensor:
        """Raw flow output ``[B, 3, H, W]``, exactly as the reference reverse pass (no clamp, no add-back).
        ``heat`` defaults to :attr:`default_heat` and is ignored when ``latents`` are given."""
        return self.decode_with_ladj(lr, heat, generator, latents, std)[0]

    def sample(self, lr: Tensor, heat: Optional[float] = None, generator: Optional[torch.Generator] = None,
               latents: Optional[list[Tensor]] = None, std: Optional[Tensor] = None) -> Tensor:
        """Final image ``[B, 3, H, W]`` before clamping: :meth:`decode`, plus :meth:`upsample` for residual flows.
        Apply the artifact criterion to this tensor; clamp to [0, 1] only for display."""
        x = self.decode(lr, heat, generator, latents, std)
        return self.finish_sample(x, lr)

    def finish_sample(self, x: Tensor, lr: Tensor) -> Tensor:
        """The final image from a decode output ``x`` and its condition ``lr`` (adds the bicubic LR for residual
        flows; the identity otherwise)."""
        return x + self.upsample(lr) if self.residual else x

    def upsample(self, lr: Tensor) -> Tensor:
        """Bicubic x``scale`` upsampling of ``lr`` (torch, ``align_corners=False``), as the references' test
        scripts add back for residual flows."""
        return nn.functional.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)

    def check_latents(self, lr: Tensor, latents: Sequence[Tensor]) -> None:
        """Raises ValueError unless ``latents`` have the shapes :meth:`latent_shapes` gives for ``lr``."""
        want = self.latent_shapes(lr)
        got = [tuple(t.shape) for t in latents]
        if got != want:
            raise ValueError(f"latents have shapes {got}, expected {want} (in the {self.family} latent order)")

    # -- what the OOD scorer needs ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def feature_levels(self) -> dict[str, float]:
        """The conditioner's feature levels, finest first: ``{name: resolution / input resolution}``. Names are
        identifiers that are not ``nn.Module`` attributes (the scorer keys its statistics by them)."""

    @abc.abstractmethod
    def feature_channels(self) -> int:
        """Channels of every feature level."""

    def default_feature_level(self) -> str:
        """The level closest to the input resolution (the finer one on ties)."""
        levels = self.feature_levels()
        return min(levels, key=lambda k: (abs(math.log2(levels[k])), -levels[k]))

    @abc.abstractmethod
    def receptive_field(self, levels: Sequence[str]) -> int:
        """Receptive-field radius in input pixels of the conditioner features at ``levels`` (counted convs): a tile
        margin of at least this makes tiled features equal to whole-image ones."""

    def input_alignment(self) -> int:
        """Input sizes must be multiples of this (``2**L / gcd(2**L, scale)``: HR divisible by ``2**L``)."""
        m = 2 ** int(self.config.L)
        return m // math.gcd(m, self.scale)

    def condition_input(self, lr: Tensor) -> Tensor:
        """The conditioner's input for ``lr`` (global preprocessing, run on the whole padded image before tiling);
        the identity unless a family preprocesses (LLFlow). Idempotent."""
        return lr

    def conditioner_features(self, x: Tensor, levels: Sequence[str]) -> dict[str, Tensor]:
        """``{level: [B, C, h*r, w*r]}`` from a preprocessed input ``x`` (:meth:`condition_input`); equals
        :meth:`features` on those levels. Families override it to compute only what ``levels`` need."""
        feats = self.features(x)
        return {k: feats[k] for k in levels}

    def input_domain(self, photos: Tensor) -> Tensor:
        """Maps clean LR-like photos ``[B, 3, h, w]`` to the flow's in-distribution inputs (the identity for SR;
        LLFlow darkens them). Used to build stress suites for any family."""
        return photos

    # -- what the tracer needs ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    def sampling_plan(self) -> SamplingPlan:
        """The :class:`SamplingPlan` of this flow's reverse pass."""

    @abc.abstractmethod
    def coupling_steps(self) -> list:
        """``(layer_index, level, step)`` of every main-flow step that has a coupling (``step.coupling``)."""

    def coupling_bound(self) -> dict:
        """The couplings' ``inverse_slope_bound()`` (shared by every coupling of a flow), or {} without couplings:
        ``max_inverse_slope`` (None when unbounded in the multiplicative sense) and how it is derived."""
        steps = self.coupling_steps()
        return steps[0][2].coupling.inverse_slope_bound() if steps else {}

    def log_inverse_slope_bound(self) -> Optional[float]:
        """``log`` of the couplings' hard inverse-slope bound (affine: ``log 1/eps``), None when there is none."""
        b = self.coupling_bound().get("max_inverse_slope")
        return math.log(b) if b else None


__all__ = ["Flow", "SamplingPlan", "TracerFactory", "LayerCallback"]
