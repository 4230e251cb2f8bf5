"""The engine options shared by the folder commands (``fit``, ``score``, ``sample``) and ``audit``.

``--engine local|ray`` (default local: this process, as always), ``--ray-address ADDRESS`` (default: ``RAY_ADDRESS``
from the environment, else a private local Ray instance started for the run), ``--ray-workers N`` and
``--ray-threads N``, ``--ray-keep-workers SECONDS``, ``--cpu-memory reuse|system`` (see
:class:`robustness_diag.analyses.engines.EngineOptions`). Ray is an optional dependency: :func:`engine_error` says
how to install it when it is missing. A cluster that cannot be reached is reported by the
command in one line with exit code 2.
"""
from __future__ import annotations

import argparse
from typing import Optional

from robustness_diag.allocator import MODES

from . import options as opt


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the ``engine`` option group to a command's parser."""
    e = p.add_argument_group("engine (where the per-image work runs)")
    e.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (the default); ray: Ray workers, each holding one loaded flow and one "
                        "GPU when the cluster has them (--device auto/cuda); the same rows and numbers as local "
                        "(needs pip install 'robustness-diag[ray]')")
    e.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="Ray cluster: HOST:PORT of its head node (ray start --head), or auto (the cluster started "
                        "on this machine); default: RAY_ADDRESS from the environment, else a local Ray instance "
                        "started for this run")
    e.add_argument("--ray-workers", type=opt.positive_int, default=None, metavar="N",
                   help="Ray workers (an integer >= 1; default: as many as the cluster holds: one per GPU, else its "
                        "CPUs divided by --ray-threads)")
    e.add_argument("--ray-threads", type=opt.positive_int, default=None, metavar="N",
                   help="torch threads (and CPUs reserved) per Ray worker (an integer >= 1; default: this "
                        "process's thread count, the local run's, which gives numbers identical to a local run)")
    e.add_argument("--ray-keep-workers", type=float, default=None, metavar="SECONDS",
                   help="keep the Ray workers' processes alive this long, idle, after the run (default 0: stopped "
                        "with it), so that the next command on the same cluster starts without the seconds a new "
                        "worker spends importing torch; they hold their CPUs (or GPU) while they wait")
    e.add_argument("--cpu-memory", choices=MODES, default="reuse",
                   help="how this process (and the Ray workers) get memory for large tensors on Linux: reuse (the "
                        "default) keeps freed blocks for the next layer and image instead of the C library mapping "
                        "them afresh each time, which removes most of the page-fault time of sampling at hundreds "
                        "of LR pixels (see README, CPU memory) but keeps the process near its peak memory until it "
                        "ends; system: the C library's own behaviour. Results are identical either way")


def engine_options(args):
    """The :class:`robustness_diag.analyses.engines.EngineOptions` of parsed arguments."""
    from robustness_diag.analyses.engines import EngineOptions
    return EngineOptions(kind=getattr(args, "engine", "local") or "local", address=getattr(args, "ray_address", None),
                         workers=getattr(args, "ray_workers", None), threads=getattr(args, "ray_threads", None),
                         keep_s=getattr(args, "ray_keep_workers", None) or 0.0,
                         cpu_memory=getattr(args, "cpu_memory", None) or "reuse")


def engine_error(args, prog: str) -> Optional[str]:
    """The one-line usage error of the engine options (Ray not installed: how to install it; Ray options without
    ``--engine ray``), or None."""
    from robustness_diag.analyses.engines import engine_problem
    if getattr(args, "engine", "local") == "local":
        given = [n for n, v in (("--ray-address", args.ray_address), ("--ray-workers", args.ray_workers),
                                ("--ray-threads", args.ray_threads),
                                ("--ray-keep-workers", getattr(args, "ray_keep_workers", None))) if v is not None]
        return f"{prog}: {', '.join(given)} need(s) --engine ray" if given else None
    problem = engine_problem(engine_options(args))
    return f"{prog}: {problem}" if problem else None


__all__ = ["add_engine_arguments", "engine_options", "engine_error"]
