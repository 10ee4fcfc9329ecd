"""``medxfer sweep``: every run of a grid file, resumably, with the work runs share done once.

Stages, each skipped where its output already exists:
1. ``pretraining``: each entry -> ``DIR/pretrain/<hash of its PretrainConfig>/`` (checkpoints + ``complete.json``);
2. ``score``: transferability once per (checkpoint folder, dataset) -> ``DIR/scores/<hash>/robustness.csv``;
3. the runs -> ``DIR/runs/<run id>/result.json`` (or ``error.json``; failed runs are retried only on request);
4. tables: ``DIR/results.csv`` and ``DIR/robustness.csv`` (:func:`medxfer.records.collect_all`).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Union

from medxfer.config import PretrainConfig, ScoreConfig, config_to_dict, parse_config
from medxfer.errors import ConfigError, FolderInUse
from medxfer.io import atomic_write_json, folder_lock, stable_hash
from medxfer.progress import ProgressLog
from medxfer import records
from medxfer.sweep.backends import (
    RunFn,
    RunJob,
    RunOutcome,
    backend_session,
    check_backend,
    check_ray_address,
    default_run_threads,
    is_disk_full,
    record_failure,
    run_jobs,
)
from medxfer.sweep.grid import (
    GridPlan,
    SweepConfig,
    expand_grid,
    format_axes,
    load_sweep,
    parse_sweep,
    pretraining_checkpoints,
    pretraining_folder,
    resolve_dataset,
)

log = logging.getLogger(__name__)

COMPLETE_FILE = "complete.json"  # written by the sweep once a scoring job has finished

# What each status of a run means in a summary.
STATUS_HELP = {
    "done": "finished in this sweep",
    "reused": "finished before; skipped",
    "failed": "failed in this sweep (error.json)",
    "skipped-failed": "failed before; skipped (use --retry-failed)",
    "blocked": "its pretraining failed; not attempted",
    "pending": "not run yet (dry run)",
    "invalid": "its config does not validate",
}


@dataclass
class SweepRun:
    run_id: str
    axes: dict[str, Any]
    status: str  # a key of STATUS_HELP
    seconds: Optional[float] = None
    error: Optional[str] = None


@dataclass
class StageOutcome:
    """One pretraining or scoring job of the sweep."""

    kind: str  # "pretrain" | "score"
    name: str
    folder: Path
    status: str  # "done" | "reused" | "failed"
    error: Optional[str] = None


@dataclass
class SweepSummary:
    name: str
    out_dir: Path
    backend: str
    dry_run: bool
    runs: list[SweepRun] = field(default_factory=list)
    stages: list[StageOutcome] = field(default_factory=list)
    duplicates: int = 0  # combinations equal to an earlier one (run once)
    results_csv: Optional[Path] = None
    robustness_csv: Optional[Path] = None
    elapsed_s: float = 0.0

    def counts(self) -> dict[str, int]:
        counts = Counter(run.status for run in self.runs)
        return {status: counts[status] for status in STATUS_HELP if counts[status]}

    @property
    def failed(self) -> list[SweepRun]:
        return [run for run in self.runs if run.status in ("failed", "skipped-failed", "blocked")]

    @property
    def invalid(self) -> list[SweepRun]:
        return [run for run in self.runs if run.status == "invalid"]

    def status_table(self) -> tuple[list[str], list[list[Any]]]:
        """The end-of-sweep table: one row per status (count and meaning), then the stages."""
        rows: list[list[Any]] = [[status, n, STATUS_HELP[status]] for status, n in self.counts().items()]
        for kind in ("pretrain", "score"):
            stage = [s for s in self.stages if s.kind == kind]
            if stage:
                counts = Counter(s.status for s in stage)
                rows.append([kind, len(stage), ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))])
        return ["status", "runs", "meaning"], rows

    def runs_table(self) -> tuple[list[str], list[list[Any]]]:
        """One row per run: id, axis values, status, seconds and the error line (what --dry-run prints)."""
        axes = list(dict.fromkeys(name for run in self.runs for name in run.axes))
        columns = ["run id", *axes, "status", "seconds", "error"]
        rows = []
        for run in self.runs:
            values = [_short(run.axes[a]) if a in run.axes else "" for a in axes]
            seconds = "" if run.seconds is None else round(run.seconds, 1)
            rows.append([run.run_id, *values, run.status, seconds, run.error or ""])
        return columns, rows


def _short(value: Any) -> str:
    from medxfer.sweep.grid import format_value

    return format_value(value)


# --- pretraining and scoring: jobs the backends run like any other --------------------------------


def _write_stage_error(folder: Path, kind: str, name: str, exc: BaseException) -> str:
    message = " ".join(f"{type(exc).__name__}: {exc}".split())
    log.warning("%s %s failed: %s", kind, name, message)
    if not record_failure(folder, {"kind": kind, "status": "failed", "name": name, "error": message,
                                   "traceback": traceback.format_exc(),
                                   "finished": datetime.now(timezone.utc).isoformat()}):
        message += " (not recorded: no space for error.json)"
    return message


def _run_stage(kind: str, name: str, folder: Path, work: Callable[[], None]) -> RunOutcome:
    """Run one shared stage into ``folder``: partial files of a killed attempt are removed first; a
    failure is recorded as ``error.json`` (and cleared by a later success)."""
    started = time.perf_counter()
    try:
        records.remove_partial_files(folder, recursive=True)
        work()
        if (folder / records.ERROR_FILE).exists():
            (folder / records.ERROR_FILE).unlink()
        return RunOutcome(name, "done", time.perf_counter() - started)
    except FolderInUse as exc:  # another process works in this folder: not a failure to record
        return RunOutcome(name, "failed", time.perf_counter() - started, str(exc))
    except Exception as exc:  # recorded; for pretraining, the runs that need it are reported as blocked
        message = _write_stage_error(folder, kind, name, exc)
        return RunOutcome(name, "failed", time.perf_counter() - started, message, disk_full=is_disk_full(exc))


@dataclass
class PretrainJob:
    run_id: str  # the pretraining entry's name
    config: PretrainConfig
    folder: str
    threads: Optional[int] = None

    def execute(self) -> RunOutcome:
        from medxfer.pretraining import run_pretraining

        # run_pretraining resumes an interrupted run and writes pretrain.json last
        return _run_stage("pretrain", self.run_id, Path(self.folder),
                          lambda: run_pretraining(self.config, Path(self.folder), threads=self.threads))


def pretraining_done(folder: Path) -> bool:
    from medxfer.pretraining.checkpoints import RECORD_FILE

    return records.load_record(folder / RECORD_FILE, warn=False) is not None


@dataclass
class ScoreJob:
    run_id: str  # "<checkpoint folder name> x <dataset>"
    config: ScoreConfig
    folder: str
    threads: Optional[int] = None

    def execute(self) -> RunOutcome:
        from medxfer.transferability.scoring import run_score

        folder = Path(self.folder)

        def work() -> None:
            run_score(self.config, folder)
            atomic_write_json(folder / COMPLETE_FILE, {"kind": "score", "config": config_to_dict(self.config),
                                                       "finished": datetime.now(timezone.utc).isoformat()})

        return _run_stage("score", self.run_id, folder, work)


def _score_jobs(sweep: SweepConfig, plan: GridPlan, out_dir: Path, failed_folders: set[str]) -> list[ScoreJob]:
    section = sweep.score
    if section is None:
        return []
    entries = [e for e in sweep.pretraining if not section.pretraining or e.name in section.pretraining]
    folders = [(e.name, pretraining_checkpoints(out_dir, e)) for e in entries]
    folders += [(Path(p).name, Path(p).resolve()) for p in section.checkpoints]
    if section.datasets:
        datasets = [(v if isinstance(v, str) else format_axes(v), resolve_dataset(sweep, v, "score.datasets"))
                    for v in section.datasets]
    elif sweep.datasets:
        datasets = [(name, resolve_dataset(sweep, name, "datasets")) for name in sweep.datasets]
    else:  # the runs' own data sections, without the per-run subset size
        seen: dict[str, dict[str, Any]] = {}
        for run in plan.runs:
            data = config_to_dict(run.config.data)
            data["train_images"] = None
            if run.config.data.label:  # not in the dump (it is no part of run ids), but the scores need it
                data["label"] = run.config.data.label
            seen.setdefault(stable_hash(data), data)
        datasets = [(data["name"], data) for data in seen.values()]
    jobs, seen = [], set()
    for folder_name, folder in folders:
        if str(folder.parent) in failed_folders:
            continue
        for dataset_name, data in datasets:
            raw = {**section.settings, "data": data, "checkpoints": str(folder)}
            key = stable_hash({k: v for k, v in raw.items() if k != "out"})
            out = (out_dir / records.SCORES_DIR / key).resolve()
            if out in seen:  # two pretraining entries that differ only in name
                continue
            seen.add(out)
            config = parse_config({**raw, "out": str(out)}, ScoreConfig,
                                  source=f"{sweep.source} (score {folder_name} x {dataset_name})")
            jobs.append(ScoreJob(f"{folder_name} x {dataset_name}", config, str(out)))
    return jobs


# --- the sweep ------------------------------------------------------------------------------------


class _Progress:
    """A rich progress bar per stage (done / failed / remaining, ETA), or nothing when not asked for."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("done {task.fields[done]} / failed {task.fields[failed]} / "
                           "remaining {task.fields[remaining]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            )

    def __enter__(self) -> "_Progress":
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def tracker(self, description: str, total: int) -> Callable[[RunOutcome], None]:
        """A callback that advances this stage's bar with each outcome."""
        counts = {"done": 0, "failed": 0}
        task = None
        if self.bar is not None and total:
            task = self.bar.add_task(description, total=total, done=0, failed=0, remaining=total)
        lines = ProgressLog(f"sweep {description}", total) if self.bar is None else None
        if lines is not None and total:
            lines.note(f"{total} to run")

        def advance(outcome: RunOutcome) -> None:
            counts["done" if outcome.status == "done" else "failed"] += 1
            if lines is not None:  # no bar (stdout is a file or pipe): a plain line per outcome, throttled
                lines.step(f"finished ({counts['failed']} failed; last {outcome.run_id}: {outcome.status})")
            if task is not None:
                finished = counts["done"] + counts["failed"]
                self.bar.update(task, advance=1, done=counts["done"], failed=counts["failed"],
                                remaining=total - finished)
        return advance


def _as_sweep(grid: Union[str, Path, SweepConfig, dict]) -> SweepConfig:
    if isinstance(grid, SweepConfig):
        return grid
    if isinstance(grid, dict):
        return parse_sweep(grid)
    return load_sweep(grid)


def _dry_run_summary(sweep: SweepConfig, plan: GridPlan, out_dir: Path, backend: str) -> SweepSummary:
    summary = SweepSummary(sweep.name, out_dir, backend, dry_run=True, duplicates=plan.duplicates)
    for run in plan.runs:
        status = records.run_status(out_dir, run.run_id)
        error = (records.read_error(out_dir, run.run_id) or {}).get("error") if status == "failed" else None
        summary.runs.append(SweepRun(run.run_id, run.axes, status, error=error))
    summary.runs += [SweepRun("-", axes, "invalid", error=message) for axes, message in plan.invalid]
    return summary


def run_sweep(grid: Union[str, Path, SweepConfig, dict], out_dir: str | Path, backend: str = "local",
              workers: int = 1, address: Optional[str] = None, retry_failed: bool = False,
              dry_run: bool = False, progress: bool = False, run_fn: Optional[RunFn] = None) -> SweepSummary:
    """Run every run of ``grid`` (a grid file, a parsed :class:`SweepConfig`, or its mapping) under ``out_dir``.

    Finished runs are skipped, interrupted ones redone (they resume from their last checkpoint), failed ones
    skipped unless ``retry_failed``. ``backend``: "local" (``workers`` spawned processes; 1 = this process)
    or "ray" (``address`` of a cluster, else the running / a new local Ray instance). ``run_fn(config,
    out_dir)`` replaces :func:`medxfer.finetune.run_finetune` (it must write the run's record; it must be a
    module-level function for workers > 1 or Ray). ``dry_run`` only plans: each run's id, axis values and
    current state. Returns the summary; the caller prints it.
    """
    started = time.perf_counter()
    check_backend(backend, workers, address)
    sweep = _as_sweep(grid)
    out_dir = Path(out_dir).resolve()
    # The runs' default thread count comes from --workers (or Ray's cpus), never from how many runs are left:
    # a resumed sweep plans the same ids and finds its finished runs.
    plan = expand_grid(sweep, out_dir, threads=default_run_threads(backend, workers, sweep.resources.cpus))
    if dry_run:
        summary = _dry_run_summary(sweep, plan, out_dir, backend)
        summary.elapsed_s = time.perf_counter() - started
        return summary
    if plan.invalid:
        axes, message = plan.invalid[0]
        more = f" (and {len(plan.invalid) - 1} more invalid combination(s); see --dry-run)" \
            if len(plan.invalid) > 1 else ""
        raise ConfigError(f"{message}{more}")

    if backend == "ray":
        check_ray_address(address)  # before the folder, its lock or the sweep's record
    out_dir.mkdir(parents=True, exist_ok=True)
    # One sweep per folder at a time: a second one would run every run and pretraining again, and resume
    # from the first one's live checkpoints.
    with folder_lock(out_dir, "sweep folder"):
        records.remove_partial_files(out_dir)  # tables and plans left half-written by a killed sweep
        records.remove_partial_files(out_dir / "sweeps")
        atomic_write_json(out_dir / "sweeps" / f"{_safe(sweep.name)}.json", {
            "name": sweep.name, "source": sweep.source, "config": sweep.model_dump(mode="json"),
            "runs": [{"run_id": run.run_id, "axes": run.axes} for run in plan.runs],
        })
        summary = SweepSummary(sweep.name, out_dir, backend, dry_run=False, duplicates=plan.duplicates)
        options = dict(backend=backend, workers=workers, address=address,
                       cpus=sweep.resources.cpus, gpus=sweep.resources.gpus)
        try:
            _run_stages(sweep, plan, out_dir, summary, options, retry_failed, progress, run_fn)
        except BaseException:  # Ctrl-C, a full disk: the tables still show every run finished so far
            try:
                _write_tables(summary)
            except Exception as exc:  # e.g. no space for them either; the records are what counts
                log.warning("could not refresh the tables of %s: %s", out_dir, " ".join(str(exc).split()))
            raise
        _write_tables(summary)
    summary.elapsed_s = time.perf_counter() - started
    return summary


def _write_tables(summary: SweepSummary) -> None:
    tables = records.collect_all(summary.out_dir)
    summary.results_csv, summary.robustness_csv = tables["results"], tables["robustness"]


def _run_stages(sweep: SweepConfig, plan: GridPlan, out_dir: Path, summary: SweepSummary, options: dict[str, Any],
                retry_failed: bool, progress: bool, run_fn: Optional[RunFn]) -> None:
    """Pretraining, scores, then the runs; each stage's outcomes go into ``summary`` as they arrive."""
    from medxfer.finetune import tidy_finished_run

    with backend_session(options["backend"], options["address"]), _Progress(progress) as bars:
        # 1. pretraining, once per entry (entries that differ only in name share one folder)
        pretrain_jobs, failed_folders, names_of = [], set(), {}
        for entry in sweep.pretraining:
            folder = pretraining_folder(out_dir, entry)
            if str(folder) in names_of:
                names_of[str(folder)].append(entry.name)
            elif pretraining_done(folder):
                names_of[str(folder)] = [entry.name]
                summary.stages.append(StageOutcome("pretrain", entry.name, folder, "reused"))
            else:
                names_of[str(folder)] = [entry.name]
                pretrain_jobs.append(PretrainJob(entry.name, entry, str(folder)))
        folder_of = {job.run_id: Path(job.folder) for job in pretrain_jobs}
        advance_pretraining = bars.tracker("pretraining", len(pretrain_jobs))

        def on_pretrain(outcome: RunOutcome) -> None:
            advance_pretraining(outcome)
            folder = folder_of[outcome.run_id]
            if outcome.status != "done":
                failed_folders.add(str(folder))
            name = " = ".join(names_of[str(folder)])
            summary.stages.append(StageOutcome("pretrain", name, folder, outcome.status, outcome.error))

        run_jobs(pretrain_jobs, on_pretrain, **options)

        # 2. transferability scores, once per (checkpoint folder, dataset)
        score_jobs = []
        for job in _score_jobs(sweep, plan, out_dir, failed_folders):
            if (Path(job.folder) / COMPLETE_FILE).is_file():
                summary.stages.append(StageOutcome("score", job.run_id, Path(job.folder), "reused"))
            else:
                score_jobs.append(job)
        score_folder = {job.run_id: Path(job.folder) for job in score_jobs}
        advance_scoring = bars.tracker("scoring", len(score_jobs))

        def on_score(outcome: RunOutcome) -> None:
            advance_scoring(outcome)
            summary.stages.append(StageOutcome("score", outcome.run_id, score_folder[outcome.run_id],
                                               outcome.status, outcome.error))

        run_jobs(score_jobs, on_score, **options)

        # 3. the runs
        jobs, by_id = [], {}
        for run in plan.runs:
            entry = SweepRun(run.run_id, run.axes, "pending")
            by_id[run.run_id] = entry
            summary.runs.append(entry)
            status = records.run_status(out_dir, run.run_id)
            checkpoint = run.config.pretrained.checkpoint
            if status == "done":
                entry.status = "reused"
                tidy_finished_run(records.run_dir(out_dir, run.run_id))
            elif status == "failed" and not retry_failed:
                entry.status = "skipped-failed"
                entry.error = (records.read_error(out_dir, run.run_id) or {}).get("error")
            elif checkpoint is not None and str(Path(checkpoint).parent) in failed_folders:
                entry.status = "blocked"
                entry.error = f"its pretraining failed (see {Path(checkpoint).parent / records.ERROR_FILE})"
            else:
                records.remove_partial_files(records.run_dir(out_dir, run.run_id), recursive=True)
                jobs.append(RunJob(run.run_id, run.config, str(out_dir), run_fn))
        log.info("sweep %s: %d runs, %d to run", sweep.name, len(plan.runs), len(jobs))

        advance_runs = bars.tracker("runs", len(jobs))

        def on_run(outcome: RunOutcome) -> None:
            advance_runs(outcome)
            entry = by_id[outcome.run_id]
            entry.status, entry.seconds, entry.error = outcome.status, outcome.seconds, outcome.error

        run_jobs(jobs, on_run, **options)



def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "sweep"
