"""CPU memory modes: "reuse" serves a large block freed earlier without page faults; "system" (and a process that
chose nothing) maps every large block afresh. Each mode is measured in a fresh process: the heap of the test process
carries the history of every test before."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from robustness_diag import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="needs glibc (mallopt)")

BLOCK = 64 << 20                        # above glibc's largest mmap threshold (32 MiB): mapped afresh by default
PAGES = BLOCK // 4096

PROBE = """
import json, resource, sys, torch
from robustness_diag import allocator
if sys.argv[1] != "none":
    assert allocator.use(sys.argv[1])
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.empty({n})
    y.fill_(2.0)
    del y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps([faults() for _ in range(8)]))
"""


def _faults(mode: str) -> list:
    """Minor page faults of allocating, filling and freeing a 64 MiB tensor eight times in a fresh process."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(n=BLOCK // 4), mode], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    return json.loads(out.stdout)


def test_reuse_serves_a_freed_block_without_page_faults():
    reuse, system, none = _faults("reuse"), _faults("system"), _faults("none")
    # the heap settles within a few rounds (glibc places the first blocks differently), then serves it fault-free
    assert reuse[0] >= PAGES // 2 and max(reuse[-3:]) < 64
    for f in (system, none):
        assert min(f) >= BLOCK // (2 << 20)                              # every round: >= one fault per 2 MiB page


def test_modes_switch_and_unknown_mode_is_refused():
    try:
        assert allocator.use("reuse") and allocator.current_mode() == "reuse"
        assert allocator.use("system") and allocator.current_mode() == "system"
    finally:
        allocator.system_defaults()
    with pytest.raises(ValueError, match="--cpu-memory must be one of reuse, system, got 'fast'"):
        allocator.use("fast")
