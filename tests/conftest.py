"""Shared test harness (zuko-style): ``--dtype`` / ``--device`` options, a seeded RNG and the ``gpu`` auto-skip.

Run the same suite on the GPU box with ``pytest --device cuda`` (and ``--dtype float32`` for the looser precision).
Markers (``slow``, ``gpu``) are declared in ``setup.cfg``; ``--strict-markers`` is on there.
"""
from __future__ import annotations

import pytest
import torch

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def pytest_addoption(parser):
    parser.addoption("--dtype", action="store", default="float64", choices=sorted(_DTYPES),
                     help="floating dtype for the property tests (default: float64)")
    parser.addoption("--device", action="store", default="cpu",
                     help="torch device for the property tests, e.g. cpu or cuda (default: cpu)")


def pytest_collection_modifyitems(config, items):
    """Skips tests marked ``gpu`` (with a reason) when CUDA is unavailable."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def dtype(request) -> torch.dtype:
    """The dtype chosen with ``--dtype``."""
    return _DTYPES[request.config.getoption("--dtype")]


@pytest.fixture
def device(request) -> torch.device:
    """The device chosen with ``--device``; skips when it is a CUDA device and none is available."""
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda requested but torch.cuda.is_available() is False")
    return dev


@pytest.fixture(autouse=True)
def _seed_torch():
    """Seeds torch's global RNG before every test, so every failure reproduces."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def trained_toys():
    """The 2-D toy trained with each coupling (defaults, seed 0), shared by every test that needs a trained toy
    (about 6 s each on one core). Tests must not modify them."""
    from robustness_diag.flows.toy import train_toy
    return {c: train_toy(c, seed=0)[0] for c in ("affine", "rqspline")}
