"""Synthetic SRFlow-family checkpoints for tests, built from the key->shape manifests of the real files.

Independent of the ``robustness_diag`` package on purpose: it is the test oracle. The manifests in
``tests/fixtures/manifests/<name>.tsv.gz`` hold one ``key<TAB>shape`` line per tensor in ``state_dict``
order (shape ``64x3x3x3``); ``flows/test_reference_exactness.py`` checks the result against the original code.

Typical use::

    entries = reduce_manifest(read_manifest("SRFlow_DF2K_4X"), nb=5, K=2)
    sd = build_state_dict(entries, seed=0)
    write_variant(sd, tmp_path / "model.pth", "raw")
    write_yaml_config(tmp_path / "conf.yml", network_G={"nb": 5, "flow": {"K": 2,
                      "stackRRDB": {"blocks": [0, 1, 3, 4]}}})
"""
from __future__ import annotations

import copy
import gzip
import io
import math
import os
import pickle
import re
import shlex
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch

MANIFEST_DIR = Path(__file__).resolve().parent / "fixtures" / "manifests"

Entry = tuple[str, tuple[int, ...]]

LAYER_PREFIX = "flowUpsamplerNet.layers."
COUPLING_MARKERS = (".affine.", ".rqspline.", ".affinereparam.", ".bspline.")
AFFINE_FAMILY = (".affine.", ".affinereparam.")
RRDB_TOP_LEVEL = ("conv_first", "RRDB_trunk", "trunk_conv", "upconv1", "upconv2", "upconv3",
                  "upconv4", "upconv5", "HRconv", "conv_last")
VARIANT_KINDS = ("raw", "module_prefix", "wrapped_state_dict", "wrapped_params_ema", "truncated",
                 "training_state", "not_checkpoint", "truncated_file", "malicious_pickle",
                 "malicious_zip", "legacy")

_LAYER_RE = re.compile(r"^flowUpsamplerNet\.layers\.(\d+)\.(.*)$")
_TRUNK_RE = re.compile(r"(?:^|\.)RRDB_trunk\.(\d+)\.")
_SUBNET_RE = re.compile(r"^(.*\.(?:affine|affinereparam|rqspline|bspline)\.[^.]+)\.(\d+)\.(.+)$")
_SPLIT_RE = re.compile(r"^flowUpsamplerNet\.layers\.\d+\.conv\.(weight|bias|logs)$")


# ----------------------------------------------------------------------------------------------
# manifests
# ----------------------------------------------------------------------------------------------

def _parse_shape(text: str) -> tuple[int, ...]:
    """``'64x3x3x3'`` -> ``(64, 3, 3, 3)``; ``'64'`` -> ``(64,)``; ``''`` -> ``()``."""
    text = text.strip()
    return tuple(int(d) for d in text.split("x")) if text else ()


def read_manifest(name: str) -> list[Entry]:
    """Reads ``tests/fixtures/manifests/<name>.tsv.gz`` into ``[(key, shape), ...]`` in file order."""
    path = MANIFEST_DIR / f"{name}.tsv.gz"
    entries: list[Entry] = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if line:
                key, shape = line.split("\t")
                entries.append((key, _parse_shape(shape)))
    return entries


def manifest_names() -> list[str]:
    """Names of every stored manifest (without ``.tsv.gz``), sorted."""
    return sorted(p.name[: -len(".tsv.gz")] for p in MANIFEST_DIR.glob("*.tsv.gz"))


def count_params(entries: Iterable[Entry]) -> int:
    """Total number of scalars described by ``entries`` (no tensors built)."""
    return sum(math.prod(shape) for _, shape in entries)


# ----------------------------------------------------------------------------------------------
# reduction of SRFlow-family layouts
# ----------------------------------------------------------------------------------------------

def _layer_index(key: str) -> Optional[int]:
    """Index ``i`` of a ``flowUpsamplerNet.layers.{i}.*`` key, else ``None``."""
    m = _LAYER_RE.match(key)
    return int(m.group(1)) if m else None


def _is_coupling_key(key: str) -> bool:
    return any(marker in key for marker in COUPLING_MARKERS)


def _classify_layers(entries: Sequence[Entry]) -> dict[int, str]:
    """Maps each present layer index to ``'coupling'``, ``'split'`` or ``'step'`` (no coupling)."""
    kinds: dict[int, str] = {}
    for key, _ in entries:
        i = _layer_index(key)
        if i is None:
            continue
        if _is_coupling_key(key):
            kinds[i] = "coupling"
        elif _SPLIT_RE.match(key):
            kinds.setdefault(i, "split")
        else:
            kinds.setdefault(i, "step")
    return kinds


def _k_for_level(K: Union[None, int, Sequence[int]], level: int) -> Optional[int]:
    """Coupling steps to keep at ``level`` (0 = layers before the first squeeze, 1 = first level)."""
    if K is None or isinstance(K, int):
        return K
    return K[max(level - 1, 0)]


def _renumber_layers(kinds: dict[int, str], K) -> dict[int, int]:
    """Old -> new index for kept layers; each missing (squeeze) index keeps one empty slot."""
    mapping: dict[int, int] = {}
    new, level, couplings = 0, 0, 0
    for old in range(max(kinds) + 1 if kinds else 0):
        kind = kinds.get(old)
        if kind is None:  # squeeze: a slot without keys, starts a level
            level, couplings = level + 1, 0
            new += 1
            continue
        if kind == "coupling":
            couplings += 1
            limit = _k_for_level(K, level)
            if limit is not None and couplings > limit:
                continue
        mapping[old] = new
        new += 1
    return mapping


def _reduce_key(key: str, nb: Optional[int], mapping: Optional[dict[int, int]]) -> Optional[str]:
    """The renamed key, or ``None`` when the reduced architecture drops it."""
    trunk = _TRUNK_RE.search(key)
    if trunk and nb is not None and int(trunk.group(1)) >= nb:
        return None
    m = _LAYER_RE.match(key)
    if m and mapping is not None:
        new = mapping.get(int(m.group(1)))
        return None if new is None else f"{LAYER_PREFIX}{new}.{m.group(2)}"
    return key


def reduce_manifest(entries: Sequence[Entry], nb: Optional[int] = None,
                    K: Union[None, int, Sequence[int]] = None) -> list[Entry]:
    """Reduces an SRFlow-family layout to ``nb`` RRDB trunk blocks and ``K`` coupling steps per level.

    Keeps RRDB trunk blocks with index < ``nb``, per flow level the first ``K`` coupling steps (``K``
    may be a per-level sequence), every no-coupling step and every Split2d. Flow layers are renumbered
    consecutively; each squeeze keeps one index with no keys. Key order and shapes are unchanged.
    ``None`` leaves that dimension as is.
    """
    mapping = _renumber_layers(_classify_layers(entries), K) if K is not None else None
    out: list[Entry] = []
    for key, shape in entries:
        new_key = _reduce_key(key, nb, mapping)
        if new_key is not None:
            out.append((new_key, tuple(shape)))
    return out


def layer_plan(entries: Sequence[Entry]) -> list[str]:
    """Per layer index: ``'squeeze'`` (missing index), ``'step'``, ``'coupling'`` or ``'split'``."""
    kinds = _classify_layers(entries)
    return [kinds.get(i, "squeeze") for i in range(max(kinds) + 1 if kinds else 0)]


# ----------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------

def _normal(shape, std: float, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=dtype) * std


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """A float64 random orthogonal ``n x n`` matrix: QR of a Gaussian, columns sign-fixed by diag(R)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def _is_rrdb_key(key: str) -> bool:
    return key.startswith("RRDB.") or key.split(".", 1)[0] in RRDB_TOP_LEVEL


def _rrdb_value(shape, gen, dtype) -> torch.Tensor:
    """Kaiming-normal scaled 0.1 for weights (ndim >= 2), zero for biases."""
    if len(shape) < 2:
        return torch.zeros(shape, dtype=dtype)
    fan_in = math.prod(shape[1:])
    return _normal(shape, math.sqrt(2.0 / fan_in) * 0.1, gen, dtype)


def _conv_zeros_value(param: str, shape, gen, dtype, odd_bias: float) -> torch.Tensor:
    """Conv2dZeros: weight N(0,0.002^2), bias N(0,0.05^2) (+``odd_bias`` on odd channels), logs N(0,0.01^2)."""
    if param == "weight":
        return _normal(shape, 0.002, gen, dtype)
    if param == "logs":
        return _normal(shape, 0.01, gen, dtype)
    bias = _normal(shape, 0.05, gen, dtype)
    if odd_bias:
        bias[1::2] += odd_bias
    return bias


class _ValueFactory:
    """Draws every tensor in manifest order from one seeded CPU generator."""

    def __init__(self, entries: Sequence[Entry], seed: int, dtype: torch.dtype, affine_scale_bias: float):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.affine_scale_bias = affine_scale_bias
        self.zero_convs = self._conv_zeros_prefixes(entries)
        self.orthogonal: dict[str, torch.Tensor] = {}

    @staticmethod
    def _conv_zeros_prefixes(entries: Sequence[Entry]) -> set[str]:
        """Prefixes ``<subnet>.<idx>`` of coupling sub-net layers that carry ``logs`` (Conv2dZeros)."""
        found = set()
        for key, _ in entries:
            m = _SUBNET_RE.match(key)
            if m and m.group(3) == "logs":
                found.add(f"{m.group(1)}.{m.group(2)}")
        return found

    def _orthogonal_for(self, owner: str, n: int) -> torch.Tensor:
        if owner not in self.orthogonal:
            self.orthogonal[owner] = random_orthogonal(n, self.gen).to(self.dtype)
        return self.orthogonal[owner]

    def _invconv(self, key: str, shape) -> torch.Tensor:
        owner, name = key.rsplit(".", 1)
        q = self._orthogonal_for(owner, shape[0])
        q = q.T if name == "weight_transpose" else q
        return q.reshape(shape).clone()

    def _subnet(self, key: str, shape) -> Optional[torch.Tensor]:
        m = _SUBNET_RE.match(key)
        if not m:
            return None
        subnet, idx, param = m.groups()
        if f"{subnet}.{idx}" in self.zero_convs:
            odd = self.affine_scale_bias if any(f in key for f in AFFINE_FAMILY) else 0.0
            return _conv_zeros_value(param, shape, self.gen, self.dtype, odd)
        if param == "weight" and len(shape) == 4:
            return _normal(shape, 0.05, self.gen, self.dtype)
        return None

    def __call__(self, key: str, shape) -> torch.Tensor:
        if _is_rrdb_key(key):
            return _rrdb_value(shape, self.gen, self.dtype)
        if key.endswith(("actnorm.bias", "actnorm.logs")):
            return _normal(shape, 0.01, self.gen, self.dtype)
        if key.endswith(("invconv.weight", "invconv.weight_transpose", "permute.weight")) \
                and len(shape) >= 2 and shape[0] == shape[1]:
            return self._invconv(key, shape)
        value = self._subnet(key, shape)
        if value is not None:
            return value
        m = _SPLIT_RE.match(key)
        if m:
            return _conv_zeros_value(m.group(1), shape, self.gen, self.dtype, 0.0)
        if key == "flowUpsamplerNet.f.0.bias":
            return torch.zeros(shape, dtype=self.dtype)
        return _normal(shape, 0.01, self.gen, self.dtype)


def build_state_dict(entries: Sequence[Entry], seed: int = 0, dtype: torch.dtype = torch.float32,
                     affine_scale_bias: float = 3.0) -> "OrderedDict[str, torch.Tensor]":
    """Deterministic tensors for ``entries`` giving a near-identity ("sane") flow.

    Rules (first match wins): RRDB weights kaiming*0.1, biases 0; ActNorm bias/logs N(0,0.01^2);
    ``invconv.weight`` a random orthogonal Q (frozen layout: ``weight_transpose`` = Q^T exactly;
    HCFlow ``permute.weight`` likewise); coupling sub-net glow convs N(0,0.05^2); Conv2dZeros (the
    sub-net layer with ``logs``, and Split2d ``conv.*``) weight N(0,0.002^2), bias N(0,0.05^2),
    logs N(0,0.01^2), with ``affine_scale_bias`` added to the odd (scale) bias channels of
    affine/affinereparam couplings (0.0 = untrained init); ``f.0.bias`` 0; anything else N(0,0.01^2).
    """
    factory = _ValueFactory(entries, seed, dtype, affine_scale_bias)
    return OrderedDict((key, factory(key, tuple(shape))) for key, shape in entries)


# ----------------------------------------------------------------------------------------------
# container variants
# ----------------------------------------------------------------------------------------------

class _SystemCall:
    """Pickles to ``os.system(command)``: runs the command in any unpickler that trusts globals."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _touch_command(marker) -> str:
    if marker is None:
        raise ValueError("malicious variants need marker=<path of the file the payload would touch>")
    return f"touch {shlex.quote(str(marker))}"


def _truncate_keys(sd: dict) -> "OrderedDict[str, torch.Tensor]":
    keep = len(sd) - len(sd) // 4
    return OrderedDict(list(sd.items())[:keep])


def _payload(state_dict: dict, kind: str):
    """The object ``torch.save`` writes for the dict-shaped variants."""
    if kind in ("raw", "legacy"):
        return state_dict
    if kind == "module_prefix":
        return OrderedDict((f"module.{k}", v) for k, v in state_dict.items())
    if kind == "wrapped_state_dict":
        return {"state_dict": state_dict}
    if kind == "wrapped_params_ema":
        return {"params_ema": state_dict, "params": state_dict}
    if kind == "truncated":
        return _truncate_keys(state_dict)
    if kind == "training_state":
        return {"epoch": 3, "iter": 1000, "optimizers": [{"state": {}, "param_groups": []}],
                "schedulers": []}
    raise ValueError(f"unknown variant kind {kind!r}; expected one of {VARIANT_KINDS}")


def _raw_bytes(state_dict: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getvalue()


_PNG_LIKE = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"not a checkpoint\n" * 4


def write_variant(state_dict: dict, path, kind: str, *, marker=None) -> Path:
    """Writes ``state_dict`` to ``path`` in container variant ``kind`` (see ``VARIANT_KINDS``).

    ``raw`` torch.save of the dict; ``module_prefix`` keys prefixed ``module.``; ``wrapped_state_dict``
    / ``wrapped_params_ema`` dict wrappers; ``truncated`` last 25% of keys dropped; ``training_state``
    an optimizer/scheduler ``.state`` dict (no weights); ``not_checkpoint`` PNG-like bytes;
    ``truncated_file`` the raw bytes cut at half length; ``legacy`` the non-zip serialisation;
    ``malicious_pickle`` a plain protocol-2 pickle whose unpickling runs ``touch <marker>``;
    ``malicious_zip`` the same payload inside a zip ``torch.save`` (``{'state_dict': payload}``).
    """
    path = Path(path)
    if kind == "not_checkpoint":
        path.write_bytes(_PNG_LIKE)
    elif kind == "truncated_file":
        data = _raw_bytes(state_dict)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "malicious_pickle":
        with open(path, "wb") as fh:
            pickle.dump(_SystemCall(_touch_command(marker)), fh, protocol=2)
    elif kind == "malicious_zip":
        torch.save({"state_dict": _SystemCall(_touch_command(marker))}, path)
    elif kind == "legacy":
        torch.save(state_dict, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(_payload(state_dict, kind), path)
    return path


# ----------------------------------------------------------------------------------------------
# YAML configs
# ----------------------------------------------------------------------------------------------

DELETE = object()
"""Pass as a field value to remove that key from the base config."""

SRFLOW_4X_CONFIG = {
    "name": "synthetic",
    "model": "SRFlow",
    "distortion": "sr",
    "scale": 4,
    "heat": 0.9,
    "network_G": {
        "which_model_G": "SRFlowNet",
        "in_nc": 3,
        "out_nc": 3,
        "nf": 64,
        "nb": 23,
        "upscale": 4,
        "train_RRDB": False,
        "flow": {
            "K": 16,
            "L": 3,
            "noInitialInj": True,
            "coupling": "CondAffineSeparatedAndCond",
            "additionalFlowNoAffine": 2,
            "split": {"enable": True},
            "fea_up0": True,
            "stackRRDB": {"blocks": [1, 8, 15, 22], "concat": True},
            "CondAffineSeparatedAndCond": {"eps": 0.0001, "hidden_channels": 64},
        },
    },
}
"""Upstream ``code/confs/SRFlow_DF2K_4X.yml`` network part (the hidden/eps defaults made explicit)."""

NCSR_FLOW_FIELDS = {"S": [0, 16, 16], "std_channels": 3}
"""Extra ``network_G.flow`` fields of NCSR/robustNF ``confs/4X.yml`` (8X: K 20, L 4, S [0,0,16,16])."""


def merge_config(base: dict, fields: dict) -> dict:
    """Recursive merge: dicts merge, other values replace, ``DELETE`` removes the key. Returns a copy."""
    out = copy.deepcopy(base)
    for key, value in fields.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_yaml_config(path, base: Optional[dict] = None, **fields) -> Path:
    """Writes an upstream-style YAML: ``base`` (default ``SRFLOW_4X_CONFIG``) merged with ``fields``.

    Example: ``write_yaml_config(p, scale=8, network_G={'nb': 5, 'flow': {'K': 2, 'L': 4}})``.
    ``network_G.upscale`` follows ``scale`` unless given. NCSR/robustNF fields go in the same tree:
    ``model='NCSR', divide_freq=True, network_G={'which_model_G': 'NCSRNet', 'flow': {'S': [0, 2, 2],
    'std_channels': 3, 'permutation_train': False, 'coupling': 'CondRQsplineSeparatedAndCond'}}``.
    """
    import yaml  # local: only this helper needs PyYAML

    config = merge_config(SRFLOW_4X_CONFIG if base is None else base, fields)
    net = config.get("network_G")
    given_upscale = isinstance(fields.get("network_G"), dict) and "upscale" in fields["network_G"]
    if "scale" in fields and isinstance(net, dict) and not given_upscale:
        net["upscale"] = fields["scale"]
    path = Path(path)
    path.write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=None), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# reduction of HCFlow layouts (prefix ``flow.``; manifests ``SR_*_HCFlow.tsv.gz``)
# ----------------------------------------------------------------------------------------------

_HC_MAIN_RE = re.compile(r"^flow\.layers\.(\d+)\.(.*)$")
_HC_COND_RE = re.compile(r"^(flow\.level\d+_condFlow\.)(additional_flow_steps|RRDB_trunk[01])\.(\d+)\.(.*)$")


def reduce_hcflow_manifest(entries: Sequence[Entry], K: int = 2, n_cond: int = 1, rrdb_nb: int = 1) -> list[Entry]:
    """Reduces an HCFlow layout: ``K`` main steps per level, ``n_cond`` conditional steps and ``rrdb_nb`` blocks in
    each of ``RRDB_trunk0/1`` per conditional flow. Main layers are renumbered per level as
    ``[squeeze][K steps][split]`` (squeeze and split keep an index without keys), key order and shapes unchanged.
    The matching upstream options: ``flowDownsampler.K = K + n_cond``, ``splitOff.after_flowstep = [n_cond] * L``,
    ``splitOff.RRDB_nb = [rrdb_nb, rrdb_nb]``."""
    from robustness_diag.flows.recognition import consecutive_runs

    runs = consecutive_runs(sorted({int(m.group(1)) for key, _ in entries for m in [_HC_MAIN_RE.match(key)] if m}))
    mapping: dict[int, int] = {}
    for level, run in enumerate(runs):
        base = level * (K + 2) + 1
        for j, old in enumerate(run[:K]):
            mapping[old] = base + j
    out: list[Entry] = []
    for key, shape in entries:
        m = _HC_MAIN_RE.match(key)
        if m:
            new = mapping.get(int(m.group(1)))
            if new is not None:
                out.append((f"flow.layers.{new}.{m.group(2)}", tuple(shape)))
            continue
        c = _HC_COND_RE.match(key)
        if c:
            limit = n_cond if c.group(2) == "additional_flow_steps" else rrdb_nb
            if int(c.group(3)) < limit:
                out.append((key, tuple(shape)))
            continue
        out.append((key, tuple(shape)))
    return out


def small_llflow_checkpoint(path, seed: int = 3) -> Path:
    """A reduced LLFlow smallNet (``nb=2``, ``K=2``) with random weights, written as a raw state_dict ``.pth``."""
    sd = build_state_dict(reduce_manifest(read_manifest("LLFlow_LOL_smallNet"), nb=2, K=2), seed=seed)
    return write_variant(sd, Path(path), "raw")


def small_hcflow_checkpoint(path, seed: int = 3) -> Path:
    """A reduced 4X HCFlow (``K=2``, one conditional step, one RRDB per trunk) with random weights, as a raw
    ``.pth``."""
    sd = build_state_dict(reduce_hcflow_manifest(read_manifest("SR_DF2K_4X_HCFlow"), K=2, n_cond=1, rrdb_nb=1),
                          seed=seed)
    return write_variant(sd, Path(path), "raw")


def state_hash(sd) -> str:
    """sha256 over a state_dict's keys and raw tensor bytes, in order (fixtures record it to prove the same weights)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()
