r"""Where the per-image work of ``fit``, ``score``, ``sample`` and the audit's stress conditions runs: here (the
``local`` engine, the default) or on a Ray cluster (the ``ray`` engine, :mod:`.ray_engine`).

Either way the *driver* (the process that runs the command) lists the inputs, holds the output folder's lock and
writes every output file (the CSV rows as produced, maps, samples, run.json, the statistics), atomically where the
local run is atomic. With ``ray`` the per-image computation runs in Ray actors, *workers*, each of which loads the
flow once (through the command's own ``prepare``, so it runs the very code of the local run) and then processes one
image after another: the driver streams each image's file bytes to a worker and gets back the row, the files the
local run would have written and, for ``fit``, the float64 partial moments, which it merges in input order with the
same Chan update as the local run (:meth:`robustness_diag.ood.gaussian.GaussianAccumulator.merge_moments`). Rows are
written in input order, so ``scores.csv``, ``samples.csv`` and ``sample_rows.csv`` hold the same rows as a local run
(``seconds`` aside) and the statistics are the same tensors.

:class:`EngineOptions` is the choice; :func:`execute` runs a folder command's prepared loop with it; :func:`session`
holds one connection to the cluster for several runs (the audit's models); :func:`engine_problem` is the check a
command does before any work (Ray missing: how to install it). Cluster problems (unreachable address, workers that
cannot start) raise :class:`EngineError`, a setup error (exit code 2, one line).
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional

from robustness_diag.allocator import MODES

from .folder_run import FolderRunError, FolderRunResult, PreparedRun, folder_lock, run_folder

#: the engines a command can run on
ENGINES = ("local", "ray")
#: how to get the optional Ray dependency
RAY_INSTALL_HINT = "pip install 'robustness-diag[ray]'"
#: the oldest Ray the engine supports (setup.cfg's ``ray`` extra)
RAY_MIN_VERSION = "2.9"


class EngineError(FolderRunError):
    """The engine cannot run: Ray is not installed, the cluster cannot be reached, its workers cannot start or were
    all lost. A setup error: the command reports it in one line and exits with code 2."""


@dataclass
class EngineOptions:
    """Where to run.

    Attributes:
        kind: ``"local"`` (this process; the default) or ``"ray"``.
        address: the Ray cluster (``HOST:PORT`` of a head node, or ``auto`` for the cluster started on this machine
            by ``ray start``); None: ``RAY_ADDRESS`` from the environment, else a private local Ray instance, started
            for the run and stopped after it. A process already connected to Ray (``ray.init`` called by the
            caller) uses that connection whatever the address.
        workers: Ray workers to start (None: as many as the cluster holds: one per GPU when the workers use GPUs,
            else the CPUs divided by ``threads``).
        threads: torch threads per worker (None: this process's, ``torch.get_num_threads()``, i.e. the local run's,
            which makes the numbers identical to a local run's); a CPU worker reserves that many CPUs.
        keep_s: seconds a worker process stays alive, idle, after the run (0: stopped with the run). Kept workers
            are named actors of the cluster, one set per device and thread count: a later command on the same
            cluster reuses their running processes instead of starting new ones (a new worker process imports
            Python, torch and this package, seconds per worker); each run still loads its own flow into them. They
            hold CPUs (or a GPU) while they wait.
        cpu_memory: how the workers' processes get memory for large tensors (:mod:`robustness_diag.allocator`):
            ``"reuse"`` (the default: freed blocks reused, no page faults after the first image; given back when a
            run ends) or ``"system"`` (the C library's behaviour). The local engine leaves this process alone: the
            command line applies ``--cpu-memory`` itself.
    """

    kind: str = "local"
    address: Optional[str] = None
    workers: Optional[int] = None
    threads: Optional[int] = None
    keep_s: float = 0.0
    cpu_memory: str = "reuse"

    @property
    def is_local(self) -> bool:
        return self.kind == "local"


def ray_installed() -> bool:
    """Whether Ray can be imported here (the ``ray`` extra)."""
    return importlib.util.find_spec("ray") is not None


def engine_problem(opts: Optional[EngineOptions]) -> Optional[str]:
    """What makes ``opts`` unusable before any work (one line), or None: an unknown engine, counts below 1, or
    ``ray`` without Ray installed (the message says how to install it)."""
    if opts is not None and opts.cpu_memory not in MODES:
        return f"--cpu-memory must be one of {', '.join(MODES)}, got {opts.cpu_memory!r}"
    if opts is None or opts.is_local:
        return None
    if opts.kind not in ENGINES:
        return f"--engine must be one of {', '.join(ENGINES)}, got {opts.kind!r}"
    for name, value in (("--ray-workers", opts.workers), ("--ray-threads", opts.threads)):
        if value is not None and int(value) < 1:
            return f"{name} must be an integer >= 1, got {value}"
    if not opts.keep_s >= 0:
        return f"--ray-keep-workers must be a number of seconds >= 0, got {opts.keep_s}"
    if not ray_installed():
        return f"--engine ray needs Ray, which is not installed: {RAY_INSTALL_HINT} (or pip install " \
               f"'ray>={RAY_MIN_VERSION}')"
    return None


def options_of(config: Any) -> EngineOptions:
    """The :class:`EngineOptions` of a command configuration (its ``engine`` attribute; local when it has none)."""
    opts = getattr(config, "engine", None)
    return opts if isinstance(opts, EngineOptions) else EngineOptions()


@contextlib.contextmanager
def session(opts: Optional[EngineOptions]):
    """Holds the engine's connection for the block (re-entrant; nothing to hold for ``local``). With ``ray``: connects
    to the cluster, or starts a private local instance, and disconnects (stops it) at the end of the outermost block.

    Raises:
        EngineError: Ray missing, or the cluster cannot be reached (one line, with the address).
    """
    if opts is None or opts.is_local:
        yield None
        return
    problem = engine_problem(opts)
    if problem:
        raise EngineError(problem)
    from . import ray_engine
    with ray_engine.connected(opts) as conn:
        yield conn


def execute(config: Any, prepare: Callable[..., Any]) -> tuple[Any, Optional[FolderRunResult]]:
    """Runs a folder command: ``prepare(config)`` (the command's setup; a :class:`.folder_run.PreparedRun`, or the
    command's result object for a setup error), then its per-image loop on the engine of ``config.engine``.

    Returns ``(prepared, loop result)``; ``(setup-error result, None)`` when ``prepare`` did not return a
    :class:`PreparedRun`. The loop runs with the output folder locked, after ``prepared.before_loop``.

    Raises:
        FolderRunError: what :func:`.folder_run.run_folder` raises; :class:`EngineError` for engine problems.
    """
    opts = options_of(config)
    if opts.is_local:
        prepared = prepare(config)
        if not isinstance(prepared, PreparedRun):
            return prepared, None
        return prepared, locked_loop(prepared)
    with session(opts):
        from . import ray_engine
        return ray_engine.execute_folder(config, prepare, opts)


def locked_loop(prepared: PreparedRun, executor: Optional[Callable] = None,
                extra: Optional[Callable] = None) -> FolderRunResult:
    """:func:`.folder_run.run_folder` on ``prepared`` with the output folder locked around ``prepared.before_loop``
    and the loop; an engine passes the ``executor`` that produces the rows (see
    :class:`.folder_run.FolderRunConfig`) and the run.json ``extra`` that replaces ``prepared.extra``."""
    folder = prepared.folder if executor is None else replace(prepared.folder, executor=executor)
    lock = folder_lock(folder.out_dir, folder.command) if folder.out_dir else contextlib.nullcontext()
    with lock:
        if prepared.before_loop is not None:
            prepared.before_loop()
        return run_folder(prepared.items, prepared.work, prepared.columns, folder,
                          extra_info=extra or prepared.extra)


def stress_units(config: Any, spec: str, scenarios: list, cache, flow, scorer,
                 measure: Callable[[Any, Any, Any], tuple]) -> Iterator[tuple[dict, dict]]:
    """The audit's stress conditions of one model, ``(summary, arrays)`` per scenario in suite order, each a resume
    unit ``cond_<name>`` of ``cache`` (:class:`.audit.cache.ResumeCache`): ``measure(flow, scorer, scenario)``
    computes one. Local: one after the other here, as they are asked for. Ray (``config.engine``): the uncached
    ones as parallel tasks on workers that each load the flow (``spec`` with ``config.config``) once and hold the
    statistics; the results are the same (the seeds are per condition), stored and yielded in suite order."""
    opts = options_of(config)
    if opts.is_local:
        for sc in scenarios:
            yield cache.arrays_unit(f"cond_{sc.name}", lambda sc=sc: measure(flow, scorer, sc))
        return
    from . import ray_engine
    yield from ray_engine.stress_units(opts, spec, getattr(config, "config", None), getattr(config, "device", None),
                                       scenarios, cache, scorer, measure)


def check_cluster(opts: Optional[EngineOptions], device: Optional[str]) -> Optional[dict]:
    """Within a :func:`session`: the workers the cluster would give (:func:`.ray_engine.plan_workers`), or None for
    ``local``. Raises :class:`EngineError` when it has none for ``device`` (e.g. ``cuda`` on a cluster without GPUs)."""
    if opts is None or opts.is_local:
        return None
    from . import ray_engine
    return ray_engine.plan_workers(opts, device)


__all__ = ["ENGINES", "RAY_INSTALL_HINT", "RAY_MIN_VERSION", "EngineError", "EngineOptions", "ray_installed",
           "engine_problem", "options_of", "session", "execute", "locked_loop", "stress_units",
           "check_cluster"]
