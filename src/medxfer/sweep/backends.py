"""Where the runs of a sweep execute: in this process, in a local process pool, or as Ray tasks.

A job is a picklable object with ``run_id``, ``threads`` and ``execute() -> RunOutcome`` (a fine-tuning
:class:`RunJob`, or a pretraining / scoring job of the runner). Every backend calls :func:`execute_job`
once per job and hands each :class:`RunOutcome` to ``on_outcome`` as it arrives. A job never raises for a
failing run: :func:`execute_run` writes ``error.json`` (with the traceback) and returns a failed outcome,
so one bad run never stops a sweep. Ray is imported only by its backend.

Stopping: a full disk stops the sweep (:class:`DiskFull`, after recording the failing run if it still can),
and so does Ctrl-C (``KeyboardInterrupt``): queued runs are cancelled and worker processes stopped at once
(runs in progress resume from their checkpoint next time). Worker processes also die with the sweep process,
even a ``kill -9``-ed one (``PR_SET_PDEATHSIG`` on Linux, a watchdog thread elsewhere).
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from medxfer.config import RunConfig, config_to_dict
from medxfer.errors import ConfigError, DiskFull, FolderInUse
from medxfer.io import is_disk_full
from medxfer.records import is_done, run_dir, write_error
from medxfer.threads import apply_threads, resolve_threads

log = logging.getLogger(__name__)

RunFn = Callable[[RunConfig, Path], Any]
OnOutcome = Callable[["RunOutcome"], None]


@dataclass
class RunJob:
    """What a worker needs for one run (picklable: plain data + a module-level function)."""

    run_id: str
    config: RunConfig
    out_dir: str
    run_fn: Optional[RunFn] = None  # None = medxfer.finetune.run_finetune
    threads: Optional[int] = None  # torch threads in the worker; None = leave as is

    def execute(self) -> "RunOutcome":
        return execute_run(self)


@dataclass
class RunOutcome:
    run_id: str
    status: str  # "done" | "failed"
    seconds: float
    error: Optional[str] = None  # one line; the traceback is in runs/<id>/error.json
    disk_full: bool = False  # the run failed for lack of space: the sweep stops (every next run would fail too)


def default_run_fn(config: RunConfig, out_dir: Path) -> Any:
    from medxfer.finetune import run_finetune

    return run_finetune(config, out_dir)


def set_threads(threads: Optional[int]) -> None:
    """Cap the threads of one worker so that N workers do not oversubscribe the cores (a fine-tune then
    runs with its own ``train.threads``, which the sweep resolved to this share unless the config set it)."""
    if threads is None:
        return
    apply_threads(threads)


def _error_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


_STARTED: Any = None  # in a pool worker: the queue on which it says which run it starts (see run_process_pool)


def execute_job(job: Any) -> RunOutcome:
    """What a worker (process or Ray task) does with one job."""
    if _STARTED is not None:
        _STARTED.put((job.run_id, os.getpid()))
    set_threads(job.threads)
    return job.execute()


def execute_run(job: RunJob) -> RunOutcome:
    """Run one fine-tuning job; a failure is recorded in ``runs/<id>/error.json`` and returned, never raised."""
    started = time.perf_counter()
    run_fn = job.run_fn or default_run_fn
    try:
        run_fn(job.config, Path(job.out_dir))
        if not is_done(job.out_dir, job.run_id):
            raise RuntimeError(f"the run function returned without writing runs/{job.run_id}/result.json")
        return RunOutcome(job.run_id, "done", time.perf_counter() - started)
    except FolderInUse as exc:  # another process is running it: not this run's failure, nothing to record
        return RunOutcome(job.run_id, "failed", time.perf_counter() - started, f"{exc} (not recorded)")
    except Exception as exc:  # a failing run is data: record it and let the sweep go on
        message = _error_line(exc)
        log.info("run %s failed: %s", job.run_id, message)  # the summary reports it
        recorded = record_failure(run_dir(job.out_dir, job.run_id), {
            "kind": "finetune", "status": "failed", "run_id": job.run_id,
            "config": config_to_dict(job.config), "error": message, "traceback": traceback.format_exc(),
            "finished": datetime.now(timezone.utc).isoformat(),
        })
        if not recorded:
            message += " (not recorded: no space for error.json)"
        return RunOutcome(job.run_id, "failed", time.perf_counter() - started, message, disk_full=is_disk_full(exc))


def record_failure(directory: Path, record: dict[str, Any]) -> bool:
    """Write ``error.json``; False (with a one-line warning) where even that fails, e.g. on a full disk."""
    try:
        write_error(directory, record)
        return True
    except OSError as exc:
        log.warning("could not write %s: %s", Path(directory) / "error.json", _error_line(exc))
        return False


def run_sequential(jobs: Sequence[Any], on_outcome: OnOutcome) -> None:
    for job in jobs:
        on_outcome(job.execute())  # this process keeps its own thread settings


def threads_per_worker(workers: int) -> int:
    """Each of ``workers`` local worker processes: the user's OMP_NUM_THREADS, else its share of the CPU
    affinity mask (:func:`medxfer.threads.resolve_threads`)."""
    return resolve_threads(None, workers)


def default_run_threads(backend: str, workers: int = 1, cpus: float = 1.0) -> int:
    """The thread count of a sweep's runs that leave ``train.threads`` unset: a local worker's share
    (:func:`threads_per_worker`; one worker = the whole affinity mask), or a Ray task's ``cpus``."""
    if backend == "ray":
        return max(1, int(cpus))
    return threads_per_worker(workers)


_QUIETED_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")


def _parent_log_settings() -> tuple[dict[str, int], list]:
    """What the parent set for Lightning's chatter (and its warning filters), to repeat in each worker."""
    import warnings

    return {name: logging.getLogger(name).level for name in _QUIETED_LOGGERS}, list(warnings.filters)


def die_with_parent(parent_pid: int) -> None:
    """Make this worker process end when ``parent_pid`` (the sweep) ends, however it ends.

    Linux: the kernel sends SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``; strictly, when the
    parent thread that started the worker ends: the pool starts workers from the thread that submits the
    runs, which outlives the pool); elsewhere a daemon thread checks every second whether the parent is gone.
    Without this, a ``kill -9`` of the sweep left its workers running (training, holding memory) for ever.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # from <linux/prctl.h>
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before the prctl call
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="medxfer-parent-watchdog", daemon=True).start()


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them: that variable's list when it
    is set, else ``0 .. n-1`` for the n GPUs torch counts (none without CUDA)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable CUDA: no GPUs
        return []


def gpu_queue(context, workers: int, gpus: Sequence[str]):
    """A queue holding one GPU per worker (round robin when there are more workers than GPUs); None
    without GPUs. Each worker takes one as it starts (:func:`_init_worker`)."""
    if not gpus:
        return None
    queue = context.Queue()
    for index in range(workers):
        queue.put(str(gpus[index % len(gpus)]))
    return queue


def _init_worker(threads: int, levels: Optional[dict[str, int]] = None, warning_filters: Optional[list] = None,
                 parent_pid: Optional[int] = None, started: Any = None, gpus: Any = None) -> None:
    import warnings

    if gpus is not None:  # before anything can initialise CUDA: the worker sees its one GPU as cuda:0
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus.get(timeout=60)
    global _STARTED
    _STARTED = started

    if parent_pid is not None:
        die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group; the sweep process handles it (cancels the queue, stops the
    # workers), so a worker must not take it as the end of one run and start the next.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_threads(threads)
    if levels:
        import lightning  # noqa: F401  (it resets its loggers' levels on import: import it first)

        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    if warning_filters is not None:
        warnings.filters[:] = warning_filters


MAX_POOL_ATTEMPTS = 3  # a run whose pool broke this often without being the one killed fails anyway


def run_process_pool(jobs: Sequence[Any], on_outcome: OnOutcome, workers: int) -> None:
    """``workers`` spawned processes (never forked: torch and fork do not mix), each with its share of cores
    and, on a machine with GPUs, its own GPU (``CUDA_VISIBLE_DEVICES``, round robin over :func:`visible_gpus`).

    A worker process that dies (the OOM killer, a kill -9, a crash) breaks Python's pool: every run it held
    fails at once. Here the run the dead worker was doing is failed and recorded with the signal that
    ended it (``error.json``; ``--retry-failed`` redoes it), the pool is rebuilt and every other run still
    runs (a run that had already finished is found done at once).
    """
    threads = threads_per_worker(workers)
    remaining = [dataclasses.replace(job, threads=threads) for job in jobs]
    attempts: dict[str, int] = {}
    while remaining:
        lost = _pool_round(remaining, on_outcome, workers, threads)
        remaining = []
        for job, reason in lost:
            attempts[job.run_id] = attempts.get(job.run_id, 0) + 1
            if reason is None and attempts[job.run_id] < MAX_POOL_ATTEMPTS:
                remaining.append(job)  # not its fault: a victim of another worker's death
                continue
            on_outcome(_lost_run(job, reason or f"its worker pool broke {MAX_POOL_ATTEMPTS} times"))


def worker_pool(workers: int, threads: int, context: Any = None, started: Any = None,
                gpus: Any = None) -> futures.ProcessPoolExecutor:
    """``workers`` spawned processes set up as a sweep's (:func:`_init_worker`): ``threads`` torch threads each,
    the parent's Lightning log levels and warning filters, Ctrl-C left to the parent, and ending when the parent
    ends. ``started`` / ``gpus``: the queues of :func:`run_process_pool` (a worker's first job, its GPU)."""
    context = context or multiprocessing.get_context("spawn")
    return futures.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                       initargs=(threads, *_parent_log_settings(), os.getpid(), started, gpus))


def _pool_round(jobs: Sequence[Any], on_outcome: OnOutcome, workers: int, threads: int
                ) -> list[tuple[Any, Optional[str]]]:
    """Run ``jobs`` in one pool until all are done or the pool breaks; return the jobs the broken pool lost,
    each with the reason when it was the run of a worker that died, else None."""
    context = multiprocessing.get_context("spawn")
    started = context.SimpleQueue()
    pool = worker_pool(min(workers, len(jobs)), threads, context, started,
                       gpu_queue(context, min(workers, len(jobs)), visible_gpus()))
    lost: list = []
    finished: set[str] = set()
    try:
        pending = {pool.submit(execute_job, job): job for job in jobs}
        processes = dict(getattr(pool, "_processes", None) or {})  # all spawned by now; never replaced
        for future in futures.as_completed(pending):
            job = pending[future]
            try:
                outcome = future.result()
            except futures.process.BrokenProcessPool:
                lost.append(job)
                continue
            finished.add(job.run_id)
            on_outcome(outcome)
    except BaseException:  # Ctrl-C, a full disk, a bug: no queued run may start, no worker may outlive us
        # The executor has no public way to stop work in progress: its processes (read before shutdown
        # forgets them) are stopped directly.
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        stop_workers(processes)
        raise
    pool.shutdown(wait=True)
    if not lost:
        return []
    running: dict[int, str] = {}  # worker pid -> the run it started last
    while not started.empty():
        run_id, pid = started.get()
        running[pid] = run_id
    # The pool terminates (SIGTERM) the other workers itself once one has died: any other end is the cause.
    killed = {running.get(pid): _death(process.exitcode) for pid, process in processes.items()
              if process.exitcode not in (None, 0, -signal.SIGTERM)}
    return [(job, killed.get(job.run_id) if job.run_id not in finished else None) for job in lost]


def _death(exitcode: int) -> str:
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (the out-of-memory killer sends it)" if name == "SIGKILL" else ""
        return f"its worker process was killed by {name}{hint}"
    return f"its worker process exited with code {exitcode}"


def _lost_run(job: Any, reason: str) -> "RunOutcome":
    """The failed outcome of a run whose worker died; recorded in error.json where the job is a run's."""
    message = f"worker process died: {reason}"
    log.warning("run %s failed: %s", job.run_id, message)
    if isinstance(job, RunJob):
        recorded = record_failure(run_dir(job.out_dir, job.run_id), {
            "kind": "finetune", "status": "failed", "run_id": job.run_id, "config": config_to_dict(job.config),
            "error": message, "finished": datetime.now(timezone.utc).isoformat(),
        })
        if not recorded:
            message += " (not recorded: no space for error.json)"
    return RunOutcome(job.run_id, "failed", 0.0, message)


def stop_workers(processes: Sequence[Any], grace_s: float = 5.0) -> None:
    """SIGTERM each worker process, then SIGKILL those still alive after ``grace_s`` seconds. Their runs in
    progress are lost (they resume from their last checkpoint in the next sweep); finished records are kept."""
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(1.0)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("backend 'ray' needs Ray: pip install 'medxfer[ray]'") from None
    return ray


RAY_CONNECT_TIMEOUT_S = 30.0


def check_ray_address(address: Optional[str], timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Refuse, with one line and before anything is written, a cluster address where nothing answers:
    ``ray.init`` retries such an address for many minutes (and ignores SIGTERM meanwhile). Only a TCP
    connect with ``timeout_s``; ``auto`` and no address (a local instance) are left to Ray."""
    import socket

    if not address or address == "auto":
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        why = "no answer within {:g} s".format(timeout_s) if isinstance(exc, socket.timeout) else (
            exc.strerror or str(exc))
        raise ConfigError(f"--address {address}: no Ray cluster reachable there ({why}); start one with "
                          "`ray start --head`, or fix the address") from None


def connect_ray(address: Optional[str] = None) -> bool:
    """Connect to the cluster at ``address``, or start a local Ray instance; True if this call did either
    (the caller then shuts it down). A local instance starts without Ray's dashboard: measured 2.8 s
    against 4.7 s to start here (2 cores); start ``ray start --head`` yourself and pass its address to
    keep the dashboard."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(log_to_driver=False, include_dashboard=False)
    return True


def run_ray(jobs: Sequence[Any], on_outcome: OnOutcome, address: Optional[str] = None,
            cpus: float = 1.0, gpus: float = 0.0) -> None:
    """One Ray task per run with ``cpus``/``gpus`` each, on the cluster at ``address`` (or the Ray instance
    this process already started, or a new local one). ``out_dir`` must be a path every node can write."""
    ray = import_ray()
    started_here = connect_ray(address)
    waiting: list = []
    try:
        threads = max(1, int(cpus))
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus)(execute_job)
        refs = {remote.remote(dataclasses.replace(job, threads=threads)): job for job in jobs}
        waiting = list(refs)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            for ref in ready:
                job = refs[ref]
                try:
                    outcome = ray.get(ref)
                except Exception as exc:  # the worker died (node lost, OOM): redo next time, as above
                    outcome = RunOutcome(job.run_id, "failed", 0.0, f"ray task died ({_error_line(exc)}); "
                                         "not recorded, the next sweep redoes it")
                on_outcome(outcome)
    except BaseException:  # Ctrl-C, a full disk: cancel what is queued or running on the cluster
        for ref in waiting:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray.shutdown()


BACKENDS = ("local", "ray")


@contextlib.contextmanager
def backend_session(backend: str, address: Optional[str] = None) -> Iterator[None]:
    """Ray: one connection for all the stages of a sweep (started here = shut down here). Local: nothing."""
    if backend != "ray":
        yield
        return
    ray = import_ray()
    started_here = connect_ray(address)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def run_jobs(jobs: Sequence[Any], on_outcome: OnOutcome, backend: str = "local", workers: int = 1,
             address: Optional[str] = None, cpus: float = 1.0, gpus: float = 0.0) -> None:
    if not jobs:
        return
    check_backend(backend, workers, address)

    def handle(outcome: RunOutcome) -> None:
        on_outcome(outcome)
        if outcome.disk_full:
            raise DiskFull(f"no space left on the device: {outcome.run_id} failed ({outcome.error}); the sweep "
                           "stopped, finished runs are kept; free space and run it again (--retry-failed "
                           "redoes the failed run)")

    if backend == "local":
        if workers == 1:
            run_sequential(jobs, handle)
        else:  # a job's threads are its worker's share however many jobs there are: its numbers depend on --workers only
            run_process_pool(jobs, handle, workers)
    else:
        run_ray(jobs, handle, address=address, cpus=cpus, gpus=gpus)


def check_backend(backend: str, workers: int = 1, address: Optional[str] = None) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "local" and address is not None:
        raise ConfigError("--address is for the ray backend only")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if backend == "ray" and workers != 1:
        raise ConfigError("--workers is for the local backend; Ray runs as many runs at once as the cluster fits")
