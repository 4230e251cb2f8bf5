"""The Ray engine on a cluster reached by address: a head node started with ``ray start --head`` on 127.0.0.1 (its
own temporary folder and token), ``robustness-diag score --engine ray --ray-address 127.0.0.1:PORT`` run as a
separate process, the same rows as the local run; the head node is stopped (by its pid) whatever happens."""
from __future__ import annotations

import csv
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from robustness_diag.cli.main import main
from robustness_diag.data.photos import TRAIN_PHOTOS, VALIDATION_PHOTOS, downscale, load_photo, random_crops
from tests.cli.helpers import save_png

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'robustness-diag[ray]')")
RAY_CLI = Path(sys.executable).with_name("ray")
pytestmark = pytest.mark.ray
CKPT = "bundled:sr4x_rqspline"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(path) -> list:
    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


@pytest.fixture
def head_node():
    """``ray start --head --block`` on 127.0.0.1 with 2 CPUs, token authentication (a token of its own, not the
    user's) and a private temporary folder; yields ``(address, env)`` for drivers; SIGTERM to its pid at the end
    (it drains and stops the processes it started), SIGKILL if it does not stop within a minute."""
    if not RAY_CLI.exists():
        pytest.skip(f"no ray command beside {sys.executable}")
    tmp = Path(tempfile.mkdtemp(prefix="rdh", dir="/tmp"))       # short: Ray's socket paths must stay < 108 bytes
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    log = open(tmp / "head.log", "wb")
    head = subprocess.Popen([str(RAY_CLI), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                             "--block", f"--temp-dir={tmp / 't'}"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and head.poll() is None and b"Ray runtime started" not in (tmp / "head.log"
                                                                                                ).read_bytes():
            time.sleep(0.2)
        if head.poll() is not None or time.time() >= deadline:
            pytest.fail(f"ray start --head did not start:\n{(tmp / 'head.log').read_text()[-3000:]}")
        yield f"127.0.0.1:{port}", env
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                head.kill()
                head.wait(timeout=30)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_score_on_a_head_node_reached_by_address(head_node, tmp_path):
    address, env = head_node
    fit_dir, lr_dir = tmp_path / "fit", tmp_path / "lr"
    fit_dir.mkdir()
    lr_dir.mkdir()
    for i, x in enumerate(downscale(random_crops([load_photo(n) for n in TRAIN_PHOTOS], 4, 96,
                                                 torch.Generator().manual_seed(1), augment=False), 4)):
        save_png(x, fit_dir / f"t{i}.png")
    for i, x in enumerate(downscale(random_crops([load_photo(n) for n in VALIDATION_PHOTOS], 4, 96,
                                                 torch.Generator().manual_seed(0), augment=False), 4)):
        save_png(x, lr_dir / f"v{i}.png")
    stats = tmp_path / "stats.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                       # the workers' thread count: identical numbers
    try:
        assert main(["fit", CKPT, "--images", str(fit_dir), "--out", str(stats), "--no-progress"]) == 0
        assert main(["score", CKPT, "--stats", str(stats), "--images", str(lr_dir), "--out", str(tmp_path / "local"),
                     "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    proc = subprocess.run([sys.executable, "-m", "robustness_diag.cli.main", "score", CKPT, "--stats", str(stats),
                           "--images", str(lr_dir), "--out", str(tmp_path / "remote"), "--engine", "ray",
                           "--ray-address", address, "--ray-workers", "2", "--ray-threads", "1", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rows(tmp_path / "remote" / "scores.csv") == _rows(tmp_path / "local" / "scores.csv")
    import json
    info = json.loads((tmp_path / "remote" / "run.json").read_text())
    assert info["engine"]["address"] == address and len(info["engine"]["workers"]) == 2
