"""Malformed checkpoint files for the tests of the loader and of the batch commands (``inspect``, ``audit``):
corrupt or truncated safetensors, a truncated .pth renamed .safetensors, random bytes, an empty file, an extra layer
key or a zero-element tensor that makes shape inference absurd, an absurd or non-config header."""
from __future__ import annotations

import json

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

LAYER = "flowUpsamplerNet.layers"
#: every kind :func:`write_bad` writes
BAD = ("corrupt_header", "header_length", "truncated_safetensors", "truncated_pth_renamed", "random_bytes", "empty",
       "extra_layer_huge", "extra_layer_40", "absurd_width", "absurd_header", "header_not_a_config")


def coupling_key(state, suffix="fFeatures.0.weight"):
    return next(k for k in state if k.startswith(LAYER) and k.endswith(f".affine.{suffix}"))


def write_bad(kind: str, d, own, state):
    """Writes malformed variant ``kind`` (of :data:`BAD`) into folder ``d``, made from the own checkpoint ``own``
    (a ``.safetensors`` written by ``save_flow``) and its raw ``state`` dict; returns ``(path, words the reason
    must hold)``."""
    raw = own.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    if kind == "corrupt_header":
        path = d / "corrupt_header.safetensors"
        hdr = bytearray(raw[8:8 + n])
        hdr[n // 2:n // 2 + 6] = b'\x00}"{\xff,'
        path.write_bytes(raw[:8] + bytes(hdr) + raw[8 + n:])
        return path, ["safetensors"]
    if kind == "header_length":
        path = d / "header_length.safetensors"
        path.write_bytes((len(raw) * 2).to_bytes(8, "little") + raw[8:])
        return path, ["safetensors"]
    if kind == "truncated_safetensors":
        path = d / "truncated.safetensors"
        path.write_bytes(raw[:len(raw) // 2])
        return path, ["truncated or corrupt"]
    if kind == "truncated_pth_renamed":
        path = d / "truncated_pth.safetensors"
        torch.save(state, d / "full.pth")
        b = (d / "full.pth").read_bytes()
        path.write_bytes(b[:len(b) // 2])
        return path, ["PyTorch"]
    if kind == "random_bytes":
        path = d / "random.pth"
        path.write_bytes(b"\x13" + np.random.default_rng(0).bytes(4095))
        return path, ["not a checkpoint"]
    if kind == "empty":
        path = d / "empty.safetensors"
        path.write_bytes(b"")
        return path, ["not a checkpoint"]
    if kind in ("extra_layer_huge", "extra_layer_40"):
        idx = 10 ** 8 if kind == "extra_layer_huge" else 40
        path = d / f"{kind}.pth"
        torch.save({**state, f"{LAYER}.{idx}.actnorm.bias": torch.zeros(1, 12, 1, 1)}, path)
        return path, ["implausible", "layer index" if idx > 4096 else "L="]
    if kind == "absurd_width":
        # a zero-element tensor claims 10^9 conditioner channels for free: the file is tiny, the network it describes
        # is not
        path = d / "absurd_width.pth"
        key = coupling_key(state)
        torch.save({**state, key: torch.empty(6, 10 ** 9, 0, 0)}, path)
        return path, ["implausible", "cond_channels"]
    if kind == "absurd_header":
        path = d / "absurd_header.safetensors"
        with safe_open(str(own), framework="pt") as fh:
            meta = dict(fh.metadata())
        cfg = json.loads(meta["config"])
        cfg.update(L=60, K=[1] * 60, n_additional=[1] * 60)
        meta["config"] = json.dumps(cfg)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
        return path, ["implausible header config", "L=60"]
    if kind == "header_not_a_config":
        path = d / "header_list.safetensors"
        with safe_open(str(own), framework="pt") as fh:
            meta = dict(fh.metadata())
        meta["config"] = "[1, 2, 3]"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
        return path, ["config"]
    raise ValueError(kind)
