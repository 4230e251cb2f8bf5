r"""The Ray engine of :mod:`.engines`: Ray Core actors that each hold one loaded flow, fed one image at a time.

How a folder command runs (:func:`execute_folder`):

1. The driver connects (:func:`connected`) and starts the workers (:class:`WorkerPool`): Ray actors, one per GPU
   when the workers compute on GPUs, else one per ``threads`` CPUs of each node, each with ``torch.set_num_threads(
   threads)`` (default: the driver's thread count, the local run's). Each worker calls the command's own ``prepare``
   once (the flow loaded, the statistics read, its output folder a private scratch folder); a checkpoint or
   statistics *file* is sent to it through the object store, so the workers need no shared file system.
2. Meanwhile the driver runs the same ``prepare`` on its CPU (the setup checks, the table's columns, run.json) and
   then the local loop (:func:`.folder_run.run_folder`, output folder locked, resume as locally), with an executor
   that streams each image's file bytes to the least busy worker, at most ``2 x workers`` images in flight, and
   yields the rows in input order. A worker decodes the bytes and runs :func:`.folder_run.process_item` with the
   command's ``work``: the same row the local run computes, plus every file that ``work`` wrote into the scratch
   folder (maps, overlays, samples, ``sample_rows.csv`` lines) and, for ``fit``, the float64 moments of each chunk
   of features (:class:`MomentLog`). The driver writes those files atomically into the real output folder (tables
   are appended), replays the moments in input order with the accumulator's own Chan update, and only then hands
   the row to the loop, which appends it to the table: an image's files are complete before its row exists.

Faults: a worker that dies (killed, out of memory, its node lost) is replaced by a new one (which loads the flow
again) and every image it held is sent again, to the least busy worker; an image whose worker dies
:data:`MAX_ATTEMPTS` times is that image's failed row (``WorkerLost: ...``), never the job's. Since results are
written only by the driver, in input order, a lost worker loses no row and writes none twice; ``--resume`` works as
locally (the driver's table is the record). A bad image is its own error row, decoded on the worker with the local
run's reason. Worker set-up failures (e.g. robustness-diag missing on a node), a cluster that cannot be reached, or
workers that do not start within :data:`START_TIMEOUT_S` are :class:`.engines.EngineError` (exit code 2, one line).

Start-up: a new worker process imports Python, torch and this package (seconds per worker on a loaded machine)
before it loads the flow. ``--ray-keep-workers SECONDS`` keeps the processes alive after a run as named actors of
the cluster, so a later command with the same device and thread count starts on them at the cost of loading its
flow (:class:`WorkerPool`).

The audit's stress conditions (:func:`stress_units`) run the same way: one task per uncached condition, the flow and
the fitted statistics held by each worker, results stored in the resume cache by the driver in suite order.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import resource
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from robustness_diag.io import atomic_write_bytes
from robustness_diag.ood.gaussian import GaussianAccumulator

from .engines import EngineError, EngineOptions, locked_loop
from .folder_run import PreparedRun, process_item

#: how often one image is sent to a worker before its row fails because its workers kept dying
MAX_ATTEMPTS = 3
#: Ray namespace of kept workers (named actors: one set per device and thread count, shared by the cluster's runs)
NAMESPACE = "robustness-diag"
#: seconds to wait for the workers to start (scheduled, flow loaded) before giving up with an EngineError
START_TIMEOUT_S = float(os.environ.get("ROBUSTNESS_DIAG_RAY_START_TIMEOUT", "600"))
#: seconds to wait for a TCP connection to a cluster address before calling it unreachable
CONNECT_TIMEOUT_S = 5.0
#: config fields that name files a worker must be sent (checkpoints, statistics, the original YAML)
FILE_FIELDS = ("checkpoint", "stats", "config")
#: Ray settings of a private local instance: its pre-started worker processes import torch and this module while
#: the driver sets up, so a worker starts in about 0.2 s instead of the 3-4 s of importing torch (measured here)
LOCAL_SYSTEM_CONFIG = {"preload_python_modules": ["torch", "robustness_diag.analyses.ray_engine"]}


# ---------------------------------------------------------------------------------------------------------------------
# the connection
# ---------------------------------------------------------------------------------------------------------------------

def resolve_address(opts: EngineOptions) -> Optional[str]:
    """The cluster address of ``opts``: its ``address``, else ``RAY_ADDRESS`` from the environment, else None (a
    private local instance)."""
    return opts.address or os.environ.get("RAY_ADDRESS") or None


def _host_port(address: str) -> Optional[tuple[str, int]]:
    """``(host, port)`` of ``HOST:PORT`` / ``ray://HOST:PORT`` / ``[v6]:PORT``, None for ``auto``/``local`` or what does
    not parse."""
    a = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = a.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def probe(address: str, timeout: float = CONNECT_TIMEOUT_S) -> Optional[str]:
    """Why ``address`` cannot be reached over TCP (one line), or None (reachable, or not a ``HOST:PORT``)."""
    hp = _host_port(address)
    if hp is None:
        return None
    try:
        with socket.create_connection(hp, timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def connected(opts: EngineOptions):
    """Connects to the cluster of ``opts`` (or starts a private local instance) unless this process is connected
    already; disconnects (stopping a private instance) when the block that connected ends. Yields the address used
    (None: a private local instance, or the existing connection)."""
    import ray
    if ray.is_initialized():                     # an enclosing session, or the caller's own ray.init: reuse it
        yield None
        return
    address = resolve_address(opts)
    kw = dict(logging_level=logging.ERROR, log_to_driver=False)
    if address in (None, "local"):
        kw.update(address="local", include_dashboard=False, _system_config=LOCAL_SYSTEM_CONFIG)
    else:
        why = probe(address)
        if why:
            raise EngineError(f"cannot reach the Ray cluster at {address}: {why} (start one with 'ray start --head', "
                              f"or check --ray-address / RAY_ADDRESS)")
        kw.update(address=address)
    try:
        ray.init(**kw)
    except Exception as e:  # ConnectionError, auth or version mismatch, ...: one line
        raise EngineError(f"cannot connect to the Ray cluster at {address or 'a new local instance'}: "
                          f"{_first_line(e)}") from None
    try:
        yield address
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------------------------------
# the workers
# ---------------------------------------------------------------------------------------------------------------------

def _peak_rss() -> int:
    """Peak resident memory of this process in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if os.uname().sysname == "Darwin" else peak * 1024)


class RayWorker:
    """One worker (a Ray actor): a process with ``threads`` torch threads on ``device`` that holds one context per run.

    :meth:`setup` runs ``builder(*args, files=, device=, workdir=)`` once per run (``key``); its result (the context:
    a prepared command, a loaded flow) is handed to every :meth:`call` of that run. ``files``: name -> (file name,
    object reference of its bytes), written to a private folder first. A builder failure is kept and returned by
    every call (``{"fatal": reason}``), so the driver can stop with the reason instead of retrying.
    :meth:`release` drops a run's context. A worker kept after its run (``keep_s > 0``) ends its process once it has
    held no context for ``keep_s`` seconds."""

    def __init__(self, threads: int, device: str, keep_s: float = 0.0):
        import torch
        torch.set_num_threads(int(threads))
        self.device, self.threads = device, int(threads)
        self.contexts: dict = {}            # run key -> (context, private folder, fatal reason or None)
        self.runs = 0                       # runs served by this process (> 1: a kept worker was reused)
        self.keep_s = 0.0
        self.last = time.monotonic()
        self._expiry: Optional[threading.Thread] = None
        self.keep(keep_s)

    def keep(self, seconds: float) -> None:
        """Stay alive ``seconds`` after the last run's context is released (0: until killed)."""
        self.keep_s = float(seconds)
        if self.keep_s > 0 and self._expiry is None:
            self._expiry = threading.Thread(target=self._expire, daemon=True)
            self._expiry.start()

    def _expire(self) -> None:
        while True:
            time.sleep(min(1.0, self.keep_s / 4))
            if self.keep_s > 0 and not self.contexts and time.monotonic() - self.last > self.keep_s:
                os._exit(0)                  # Ray sees the actor exit; its name is free again

    def setup(self, key: str, builder: Callable, args: tuple, files: dict, keep_s: float = 0.0,
              cpu_memory: str = "reuse") -> dict:
        """Builds run ``key``'s context (``cpu_memory``: :func:`robustness_diag.allocator.use`'s mode, process-wide);
        returns :meth:`info`."""
        import ray
        import torch

        from robustness_diag import allocator
        self.last = time.monotonic()
        self.keep(max(self.keep_s, float(keep_s)))
        torch.set_num_threads(self.threads)
        allocator.use(cpu_memory)
        workdir = tempfile.mkdtemp(prefix="robustness-diag-worker-")
        context, fatal = None, None
        try:
            local = {}
            for name, (file_name, ref) in files.items():
                folder = os.path.join(workdir, "files", name)
                os.makedirs(folder, exist_ok=True)
                local[name] = os.path.join(folder, file_name)
                with open(local[name], "wb") as fh:
                    fh.write(ray.get(ref))
            context = builder(*args, files=local, device=self.device, workdir=workdir)
        except Exception as e:  # reported by every call: the driver stops with this reason
            fatal = f"{_first_line(e)} (on {socket.gethostname()})"
        self.contexts[key] = (context, workdir, fatal)
        self.runs += 1
        self.last = time.monotonic()
        return self.info(key)

    def info(self, key: Optional[str] = None) -> dict:
        import ray
        import torch
        fatal = self.contexts[key][2] if key in self.contexts else None
        return {"pid": os.getpid(), "host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id(),
                "device": self.device, "threads": torch.get_num_threads(), "peak_rss_bytes": _peak_rss(),
                "runs": self.runs, "error": fatal}

    def call(self, key: str, fn: Callable, *args) -> Any:
        self.last = time.monotonic()
        entry = self.contexts.get(key)
        if entry is None:
            return {"fatal": f"this worker holds no context for the run (on {socket.gethostname()})"}
        if entry[2]:
            return {"fatal": entry[2]}
        try:
            out = fn(entry[0], *args)
        finally:
            self.last = time.monotonic()
        if isinstance(out, dict):
            out.setdefault("worker", {"pid": os.getpid(), "peak_rss_bytes": _peak_rss()})
        return out

    def release(self, key: str) -> None:
        """Drops run ``key``'s context and its private folder; with no context left, gives the memory the process
        kept for reuse back to the system (a kept worker waits small)."""
        entry = self.contexts.pop(key, None)
        if entry is not None:
            shutil.rmtree(entry[1], ignore_errors=True)
            del entry
            gc.collect()
        if not self.contexts:
            from robustness_diag import allocator
            allocator.return_freed_memory()
        self.last = time.monotonic()

    def close(self) -> None:
        for key in list(self.contexts):
            self.release(key)


@dataclass
class Lost:
    """A task whose workers died :data:`MAX_ATTEMPTS` times (``reason``: the last error, one line)."""

    reason: str
    attempts: int


def plan_workers(opts: EngineOptions, device: Optional[str], n_tasks: Optional[int] = None) -> dict:
    """How many workers, with which resources: ``{"workers", "threads", "device", "resources"}``.

    GPU workers (one GPU each) when ``device`` is ``cuda``/``cuda:N`` (refused when the cluster has none) or
    ``auto``/None and the cluster has GPUs; else CPU workers of ``threads`` CPUs each, as many as fit on the nodes.
    At most ``n_tasks`` workers (at least one)."""
    import ray
    import torch
    threads = int(opts.threads or torch.get_num_threads())
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    gpus = int(sum(r.get("GPU", 0) for r in nodes))
    dev = str(device or "auto")
    if dev.startswith("cuda") and gpus < 1:
        raise EngineError(f"--device {dev}: the Ray cluster has no GPU (use --device auto or cpu)")
    if dev.startswith("cuda") or (dev == "auto" and gpus >= 1):
        slots, resources, worker_device = gpus, {"num_gpus": 1, "num_cpus": 1}, "cuda"
    else:
        slots = int(sum(int(r.get("CPU", 0) // threads) for r in nodes))
        resources, worker_device = {"num_cpus": threads}, "cpu"
        if slots < 1:
            raise EngineError(f"no node of the Ray cluster has {threads} CPUs for a worker of {threads} threads "
                              f"(set --ray-threads)")
    if opts.workers and int(opts.workers) > slots:
        raise EngineError(f"--ray-workers {opts.workers}: the Ray cluster has room for {slots} "
                          f"{'GPU' if worker_device == 'cuda' else f'{threads}-thread CPU'} worker(s)")
    n = int(opts.workers or slots)
    if n_tasks is not None:
        n = max(1, min(n, int(n_tasks)))
    return {"workers": n, "threads": threads, "device": worker_device, "resources": resources}


class WorkerPool:
    """Ray workers built by ``builder`` (see :class:`RayWorker`) and a loop that runs tasks on them in order.

    A worker that dies is replaced by a new one (same builder, files sent again from the object store), and the tasks
    it held are sent again (:meth:`run_ordered`). The actors themselves are not restarted by Ray (``max_restarts=0``):
    the pool does it, so it knows which tasks to resend and how often.

    With ``opts.keep_s > 0`` the workers are the cluster's named, detached actors ``worker-<device>-<threads>t-<slot>``
    in namespace :data:`NAMESPACE`: found running when an earlier run kept them (their process, torch and this
    package already imported), started otherwise, and left running after :meth:`close` until they have been idle
    ``keep_s`` seconds. Every run sets up its own context in them (keyed by the run), so runs that share workers
    never see each other's flow or files; replacements of dead workers belong to the run alone.

    Arguments:
        builder, args: the worker context: ``builder(*args, files=, device=, workdir=)``.
        files: name -> local path of the files the workers need (put in the object store once).
        opts: :class:`.engines.EngineOptions`; device: the command's ``--device``; n_tasks: caps the worker count.
    """

    def __init__(self, builder: Callable, args: tuple, files: dict, opts: EngineOptions, device: Optional[str],
                 n_tasks: Optional[int] = None):
        import ray
        self.plan = plan_workers(opts, device, n_tasks)
        self.key = uuid.uuid4().hex          # this run's contexts on the workers
        self.keep_s = float(opts.keep_s or 0.0)
        self.cpu_memory = opts.cpu_memory
        self._refs = {name: (Path(p).name, ray.put(Path(p).read_bytes())) for name, p in files.items()}
        self._remote = ray.remote(max_restarts=0, max_task_retries=0, **self.plan["resources"])(RayWorker)
        self._builder = (builder, args)
        n = self.plan["workers"]
        self.kept = [self.keep_s > 0] * n    # slots held by named, detached workers that outlive the run
        self.actors = [self._new_actor(i) for i in range(n)]
        self._setups = [self._setup(a) for a in self.actors]
        self.generation = [0] * n
        self._infos: list = [None] * n
        self._ready = False
        self.replaced = 0                   # workers that died and were replaced
        self.lost_tasks = 0                 # task results lost with their worker (each sent again)
        self.failed_tasks = 0               # tasks given up after MAX_ATTEMPTS
        self.peaks: dict = {}               # worker pid -> peak resident bytes seen in its results

    def _new_actor(self, slot: int):
        """A worker for ``slot``: the cluster's kept worker of this name (started if absent) when ``kept``, else a
        worker of this run alone."""
        ctor = (self.plan["threads"], self.plan["device"], self.keep_s if self.kept[slot] else 0.0)
        if not self.kept[slot]:
            return self._remote.remote(*ctor)
        name = f"worker-{self.plan['device']}-{self.plan['threads']}t-{slot}"
        return self._remote.options(name=name, namespace=NAMESPACE, lifetime="detached",
                                    get_if_exists=True).remote(*ctor)

    def _setup(self, actor):
        return actor.setup.remote(self.key, *self._builder, self._refs, self.keep_s, self.cpu_memory)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> list:
        """Blocks until every worker has built this run's context; returns their :meth:`RayWorker.info`. A kept
        worker that ended (its idle time ran out) just as this run found it is replaced once.

        Raises:
            EngineError: a worker's builder failed (its reason), or they did not start within ``timeout`` seconds.
        """
        import ray
        from ray.exceptions import GetTimeoutError
        if self._ready:
            return self._infos
        deadline = time.monotonic() + timeout
        infos = []
        for slot in range(len(self.actors)):
            for attempt in (0, 1):
                try:
                    infos.append(ray.get(self._setups[slot], timeout=max(0.0, deadline - time.monotonic())))
                    break
                except GetTimeoutError:
                    raise EngineError(f"the Ray workers did not start within {timeout:.0f} s (the cluster may lack "
                                      f"the resources: {self.plan['workers']} x {self.plan['resources']}; see 'ray "
                                      f"status')") from None
                except Exception as e:
                    if attempt or not self.kept[slot]:
                        raise EngineError(f"a Ray worker could not start: {_first_line(e)}") from None
                    self._replace(slot, count=False)
        bad = [i["error"] for i in infos if i.get("error")]
        if bad:
            raise EngineError(f"a Ray worker could not start: {bad[0]}")
        self._infos, self._ready = infos, True
        return infos

    def describe(self) -> dict:
        """The pool for run.json: plan, workers (pid, host, device, threads, peak memory, ``reused``: a kept worker
        process that served an earlier run; replacements of dead workers are listed by the pid their results came
        from), replaced workers, lost and failed tasks, ``keep_s``."""
        workers, known = [], set()
        for i in self._infos:
            if i:
                w = {k: i[k] for k in ("pid", "host", "device", "threads")}
                w["peak_rss_bytes"] = max(self.peaks.get(i["pid"], 0), i.get("peak_rss_bytes", 0))
                w["reused"] = i.get("runs", 1) > 1
                workers.append(w)
                known.add(i["pid"])
        workers += [{"pid": pid, "replacement": True, "peak_rss_bytes": peak} for pid, peak in self.peaks.items()
                    if pid not in known]
        return {"kind": "ray", "workers": workers, "threads": self.plan["threads"], "device": self.plan["device"],
                "replaced_workers": self.replaced, "lost_tasks": self.lost_tasks, "failed_tasks": self.failed_tasks,
                "keep_s": self.keep_s}

    def _replace(self, slot: int, count: bool = True) -> None:
        """A new worker of this run alone in ``slot`` (the old one is dead, or unreachable: it is killed to be sure),
        its context set up first (a worker runs its calls in the order they were sent)."""
        import ray
        with contextlib.suppress(Exception):
            ray.kill(self.actors[slot], no_restart=True)
        self.kept[slot] = False
        self.actors[slot] = self._new_actor(slot)
        self._setups[slot] = self._setup(self.actors[slot])
        self.generation[slot] += 1
        self.replaced += int(count)

    def run_ordered(self, tasks: Iterable[tuple[Any, Optional[tuple]]], fn: Callable) -> Iterator[tuple[Any, Any]]:
        """Runs ``fn(context, *args)`` on the workers for each ``(key, args)`` of ``tasks`` (read lazily) and yields
        ``(key, result)`` in the order of ``tasks``. ``args`` None: no remote work, the result is None. A task whose
        worker dies is sent again (to the least busy worker; the dead one is replaced) up to :data:`MAX_ATTEMPTS`
        times, then its result is a :class:`Lost`. At most ``2 x workers`` tasks run at once and ``4 x workers``
        wait to be yielded.

        Raises:
            EngineError: a worker reported that it could not be built.
        """
        import ray
        import ray.exceptions as rex
        lost_errors = tuple(getattr(rex, n) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                                      "WorkerCrashedError", "ObjectLostError", "NodeDiedError")
                            if hasattr(rex, n))             # (the later names are not in every Ray 2.x)
        self.wait_ready()
        n = len(self.actors)
        load = [0] * n
        pending: dict = {}                 # object ref -> (sequence number, worker slot, its generation)
        specs: dict = {}                   # sequence number -> (key, args), until yielded
        results: dict = {}
        attempts: dict = {}
        source = iter(tasks)
        exhausted, seq, head = False, 0, 0

        def submit(s: int) -> None:
            a = min(range(n), key=lambda i: load[i])
            ref = self.actors[a].call.remote(self.key, fn, *specs[s][1])
            pending[ref] = (s, a, self.generation[a])
            load[a] += 1

        try:
            while True:
                while not exhausted and len(pending) < 2 * n and seq - head < 4 * n:
                    try:
                        key, args = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    specs[seq] = (key, args)
                    if args is None:
                        results[seq] = None
                    else:
                        submit(seq)
                    seq += 1
                while head in results:
                    res = results.pop(head)
                    key = specs.pop(head)[0]
                    head += 1
                    yield key, res
                if exhausted and head == seq:
                    return
                if not pending:
                    continue
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    s, a, gen = pending.pop(ref)
                    load[a] -= 1
                    try:
                        res = ray.get(ref)
                    except lost_errors as e:
                        self.lost_tasks += 1
                        if gen == self.generation[a]:
                            self._replace(a)
                        attempts[s] = attempts.get(s, 0) + 1
                        if attempts[s] < MAX_ATTEMPTS:
                            submit(s)
                        else:
                            self.failed_tasks += 1
                            results[s] = Lost(_first_line(e), attempts[s])
                        continue
                    except Exception as e:  # the task machinery failed (e.g. a result that cannot be sent)
                        results[s] = Lost(_first_line(e), attempts.get(s, 0) + 1)
                        continue
                    if isinstance(res, dict) and "fatal" in res:
                        raise EngineError(f"a Ray worker could not start: {res['fatal']}")
                    if isinstance(res, dict) and "worker" in res:
                        w = res["worker"]
                        self.peaks[w["pid"]] = max(self.peaks.get(w["pid"], 0), w["peak_rss_bytes"])
                    results[s] = res
        finally:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=False)

    def close(self) -> None:
        """Releases this run's contexts (private folders removed, when the workers answer) and stops the workers,
        except the kept ones, which wait for the next run (``keep_s``)."""
        import ray
        with contextlib.suppress(Exception):
            ray.get([a.release.remote(self.key) for a in self.actors], timeout=10)
        for a, kept in zip(self.actors, self.kept):
            if not kept:
                with contextlib.suppress(Exception):
                    ray.kill(a, no_restart=True)
        self.actors = []


# ---------------------------------------------------------------------------------------------------------------------
# folder commands: fit, score, sample
# ---------------------------------------------------------------------------------------------------------------------

class MomentLog(GaussianAccumulator):
    """An accumulator that records the moments of each part instead of merging them (a worker's side of ``fit``);
    the driver replays them in input order with :meth:`GaussianAccumulator.merge_moments`, the very update the local
    run applies, so the statistics are bitwise the local ones."""

    def __init__(self, dim: int, device=None):
        super().__init__(dim, device=device)
        self.parts: list = []

    def merge_moments(self, n, mean, m2, t3, q4) -> None:
        self.parts.append((int(n), mean.cpu(), m2.cpu(), t3.cpu(), q4.cpu()))
        self.n += int(n)

    def snapshot(self) -> tuple:
        return (len(self.parts), self.n)

    def restore(self, snap: tuple) -> None:
        del self.parts[snap[0]:]
        self.n = snap[1]

    def take(self) -> list:
        """The recorded parts, emptied."""
        parts, self.parts = self.parts, []
        return parts


@dataclass
class FolderContext:
    """A worker's prepared folder command: its :class:`.folder_run.PreparedRun`, the scratch output folder, the
    folder images are written to, and the moment logs (``fit``)."""

    prepared: PreparedRun
    scratch: Path
    inbox: Path
    logs: dict = field(default_factory=dict)
    initial_state: Optional[dict] = None


def _replace_known(config: Any, **changes) -> Any:
    """``dataclasses.replace`` with the changes whose field ``config`` has."""
    names = {f.name for f in fields(config)}
    return replace(config, **{k: v for k, v in changes.items() if k in names})


def folder_context(prepare: Callable, config: Any, *, files: dict, device: str, workdir: str) -> FolderContext:
    """A worker's context: ``prepare`` on ``config`` with the files it was sent, ``device``, a scratch output folder,
    no listing of the inputs, the local engine, no progress bar; ``fit``'s accumulators become :class:`MomentLog`."""
    scratch = Path(workdir) / "out"
    scratch.mkdir(parents=True, exist_ok=True)
    cfg = _replace_known(config, out_dir=str(scratch), device=device, progress=False, engine=EngineOptions(), **files)
    prepared = prepare(cfg, listing=False)
    if not isinstance(prepared, PreparedRun):
        raise RuntimeError(getattr(prepared, "error", None) or f"setup failed: {prepared!r}")
    logs = {}
    if prepared.accumulators:
        for lv, acc in list(prepared.accumulators.items()):
            logs[lv] = prepared.accumulators[lv] = MomentLog(acc.dim, device=acc.device)
    initial = copy.deepcopy(prepared.state) if prepared.state is not None else None
    return FolderContext(prepared, scratch, Path(workdir) / "in", logs, initial)


def _clear(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)


def folder_item(ctx: FolderContext, item, data: bytes) -> dict:
    """One image on a worker: its row (:func:`.folder_run.process_item` with the command's ``work``), the files
    ``work`` wrote (relative path -> bytes), the moment parts per level (``fit``) and the phase seconds it added."""
    prepared = ctx.prepared
    _clear(ctx.scratch)
    _clear(ctx.inbox)
    local = ctx.inbox / (Path(item.path).name or "image")
    local.write_bytes(data)
    before = dict(prepared.timing)
    if prepared.state is not None:                 # this image's own record, merged by the driver in input order
        prepared.state.clear()
        prepared.state.update(copy.deepcopy(ctx.initial_state))
    row = process_item(item, prepared.work, lambda _path: prepared.folder.decode(local))
    if row.get("error"):
        row["error"] = str(row["error"]).replace(str(local), str(item.path))
    out = {p.relative_to(ctx.scratch).as_posix(): p.read_bytes() for p in sorted(ctx.scratch.rglob("*"))
           if p.is_file()}
    moments = {lv: log.take() for lv, log in ctx.logs.items()}
    timing = {k: v - before.get(k, 0.0) for k, v in prepared.timing.items()}
    state = copy.deepcopy(prepared.state) if prepared.state is not None else None
    return {"row": row, "files": out, "moments": moments, "timing": timing, "state": state}


def _apply(prepared: PreparedRun, result: dict) -> None:
    """The driver's side of :func:`folder_item`: files written atomically (tables appended, header once), moments
    merged into the driver's accumulators, phase seconds added."""
    out_dir = Path(prepared.folder.out_dir) if prepared.folder.out_dir else None
    files = result.get("files") or {}
    if files and out_dir is None:
        raise RuntimeError("a worker wrote files but the command has no output folder")
    tables = [r for r in files if r in prepared.append_tables]
    for rel in [r for r in files if r not in prepared.append_tables] + tables:
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        data = files[rel]
        if rel in prepared.append_tables:
            if target.is_file() and target.stat().st_size > 0:
                data = data.split(b"\n", 1)[1] if b"\n" in data else b""
            with open(target, "ab") as fh:
                fh.write(data)
                fh.flush()
        else:
            atomic_write_bytes(target, data)
    for lv, parts in (result.get("moments") or {}).items():
        acc = prepared.accumulators[lv]
        for n, mean, m2, t3, q4 in parts:
            acc.merge_moments(n, mean.to(acc.device), m2.to(acc.device), t3.to(acc.device), q4.to(acc.device))
    for k, v in (result.get("timing") or {}).items():
        prepared.timing[k] = prepared.timing.get(k, 0.0) + v
    if result.get("state") is not None and prepared.merge_state is not None:
        prepared.merge_state(prepared.state, result["state"])


def _read(path) -> Optional[bytes]:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None               # the driver decodes it itself: the same error row as a local run


def _lost_row(item, lost: Lost) -> dict:
    return {"path": item.key, "status": "error", "notes": "", "seconds": 0.0,
            "error": f"WorkerLost: the Ray worker processing this image died {lost.attempts} time(s) "
                     f"(last: {lost.reason})"}


def folder_executor(pool: WorkerPool, prepared: PreparedRun) -> Callable:
    """The :class:`.folder_run.FolderRunConfig` executor that runs ``prepared``'s work on ``pool``."""
    def executor(todo: list) -> Iterator[tuple[Any, dict]]:
        def tasks():
            for it in todo:
                data = _read(it.path)
                yield it, (None if data is None else (it, data))
        for it, res in pool.run_ordered(tasks(), folder_item):
            if res is None:                       # unreadable here: decoded by the driver, as locally
                row = process_item(it, prepared.work, prepared.folder.decode)
            elif isinstance(res, Lost):
                row = _lost_row(it, res)
            else:
                _apply(prepared, res)
                row = res["row"]
            yield it, row
    return executor


def _shipped_files(config: Any) -> dict:
    """name -> path of the config's file fields that name existing files (``bundled:`` checkpoints need none)."""
    out = {}
    for name in FILE_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (str, os.PathLike)) and not str(value).startswith("bundled:") and Path(value).is_file():
            out[name] = str(value)
    return out


def _count_inputs(config: Any) -> Optional[int]:
    """How many inputs ``config`` lists (caps the worker count), None when they cannot be listed (the command's own
    setup then reports why)."""
    from .inputs import list_inputs
    inputs = getattr(config, "inputs", None)
    try:
        return len(list_inputs(inputs)) if inputs is not None else None
    except Exception:  # reported by the command's setup
        return None


def execute_folder(config: Any, prepare: Callable, opts: EngineOptions) -> tuple[Any, Any]:
    """:func:`.engines.execute` on Ray (connected already): the workers started (they load the flow while the driver
    runs its own setup on its CPU), then the loop with :func:`folder_executor`. run.json gets ``engine`` (workers:
    pid, host, device, threads, peak memory; replaced workers, lost and failed tasks) and the workers' device in place
    of the driver's."""
    from .inputs import config_record
    worker_config = _replace_known(config, engine=EngineOptions())
    pool = WorkerPool(folder_context, (prepare, worker_config), _shipped_files(config), opts,
                      getattr(config, "device", None), n_tasks=_count_inputs(config))
    try:
        prepared = prepare(_replace_known(config, device="cpu"))
        if not isinstance(prepared, PreparedRun):
            return prepared, None
        if prepared.folder.config:
            prepared.folder = replace(prepared.folder, config=config_record(config))
        base_extra = prepared.extra

        def extra() -> dict:
            info = dict(base_extra()) if base_extra else {}
            for v in info.values():
                if isinstance(v, dict) and "device" in v:
                    v["device"] = pool.plan["device"]
            info["engine"] = {**pool.describe(), "address": resolve_address(opts)}
            return info
        pool.wait_ready()
        loop = locked_loop(prepared, folder_executor(pool, prepared), extra)
        return prepared, loop
    finally:
        pool.close()


# ---------------------------------------------------------------------------------------------------------------------
# the audit's stress conditions
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class FlowContext:
    """A worker's audit context: the flow, the fitted statistics and the compute function, on ``device``."""

    flow: Any
    scorer: Any
    measure: Callable
    device: str


def flow_context(spec: str, yaml: Optional[str], scorer, measure: Callable, *, files: dict, device: str,
                 workdir: str) -> FlowContext:
    """Loads the flow (``spec`` with the original YAML ``yaml``; the files sent replace paths) on ``device``."""
    import torch

    from robustness_diag.flows.loading import load_flow
    dev = torch.device(device)
    flow = load_flow(files.get("checkpoint", spec), config=files.get("config", yaml)).eval().to(dev)
    return FlowContext(flow, scorer.to(dev), measure, device)


def flow_unit(ctx: FlowContext, scenario) -> dict:
    """One stress condition on a worker: ``measure(flow, scorer, scenario)`` with the scenario on the worker's
    device."""
    import torch
    sc = replace(scenario, lr=scenario.lr.to(torch.device(ctx.device)))
    return {"value": ctx.measure(ctx.flow, ctx.scorer, sc)}


class _NotCached(Exception):
    pass


def _not_cached():
    raise _NotCached


def stress_units(opts: EngineOptions, spec: str, yaml: Optional[str], device: Optional[str], scenarios: list, cache,
                 scorer, measure: Callable) -> Iterator[tuple[dict, dict]]:
    """:func:`.engines.stress_units` on Ray: the uncached conditions as parallel tasks, results stored in ``cache``
    (``cond_<name>``) and yielded in suite order. Raises :class:`.engines.EngineError` when a condition's workers
    kept dying."""
    from .engines import session
    bar = scenarios if hasattr(scenarios, "update") else None       # a tqdm bar: advanced as results arrive
    scenarios = list(getattr(scenarios, "iterable", scenarios))
    cached: dict = {}
    for sc in scenarios:
        with contextlib.suppress(_NotCached):
            cached[sc.name] = cache.arrays_unit(f"cond_{sc.name}", _not_cached)
    todo = [sc for sc in scenarios if sc.name not in cached]
    if not todo:
        for sc in scenarios:
            yield cached[sc.name]
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return
    with session(opts):
        files = {}
        if not str(spec).startswith("bundled:") and Path(spec).is_file():
            files["checkpoint"] = str(spec)
        if yaml and Path(yaml).is_file():
            files["config"] = str(yaml)
        pool = WorkerPool(flow_context, (spec, yaml, scorer.to("cpu"), measure), files, opts, device,
                          n_tasks=len(todo))
        try:
            tasks = ((sc.name, (replace(sc, lr=sc.lr.cpu()),)) for sc in todo)
            results = pool.run_ordered(tasks, flow_unit)
            for sc in scenarios:
                if sc.name in cached:
                    unit = cached[sc.name]
                else:
                    name, res = next(results)
                    if isinstance(res, Lost):
                        raise EngineError(f"stress condition {name}: its Ray worker died {res.attempts} time(s) "
                                          f"(last: {res.reason})")
                    value = res["value"]
                    unit = cache.arrays_unit(f"cond_{name}", lambda v=value: v)
                yield unit
                if bar is not None:
                    bar.update(1)
        finally:
            pool.close()
            if bar is not None:
                bar.close()


__all__ = ["MAX_ATTEMPTS", "START_TIMEOUT_S", "FILE_FIELDS", "RayWorker", "WorkerPool", "Lost", "MomentLog",
           "FolderContext", "FlowContext", "connected", "probe", "resolve_address", "plan_workers", "folder_context",
           "folder_item", "folder_executor", "execute_folder", "flow_context", "flow_unit", "stress_units"]
