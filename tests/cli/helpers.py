"""Small shared helpers of the CLI tests: writing test images and reading result tables."""
from __future__ import annotations

import csv

import numpy as np
from PIL import Image


def save_png(t, path) -> None:
    """Saves a ``[3, H, W]`` tensor in [0, 1] as an 8-bit RGB PNG."""
    Image.fromarray((t.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)


def read_rows(path) -> list[dict]:
    """Rows of a CSV file as dicts (strings)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
