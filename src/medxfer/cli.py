"""The ``medxfer`` command line: thin commands over the library.

Library errors (``MedxferError``) print one line to stderr and exit 2; tracebacks only with ``--debug``.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medxfer.errors import ConfigError, DataError, MedxferError
from medxfer.io import check_folder_free, check_output_dir
from medxfer.progress import interactive, plain_progress_off, plain_progress_to

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="medxfer: transfer learning for medical image segmentation "
                       "(pretrain, score transferability, fine-tune, evaluate, sweep, report).")
data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate datasets.")
app.add_typer(data_app, name="data")
weights_app = typer.Typer(no_args_is_help=True, help="Bring in encoder weights made elsewhere (ImageNet).")
app.add_typer(weights_app, name="weights")

console = Console(width=None if sys.stdout.isatty() else 160)  # wide tables in logs and pipes
_state = {"debug": False, "allow_any_out": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Show info logs."),
          allow_any_out: bool = typer.Option(False, "--allow-any-out", help="Accept / or the home folder as "
                                             "an output folder (refused by default: runs would fill it).")) -> None:
    _state["debug"] = debug
    _state["allow_any_out"] = allow_any_out
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    plain_progress_to(sys.stdout)  # into a log file or pipe: plain progress lines instead of bars


def _check_out(out: Path, locked_as: Optional[str] = None) -> None:
    """The output folder is usable, and (``locked_as``: the command locks it) no other process holds it.
    Called before a command imports torch: a refusal costs a moment, not the start-up of the libraries."""
    check_output_dir(out, allow_top_level=_state["allow_any_out"])
    if locked_as is not None:
        check_folder_free(out, locked_as)


@contextmanager
def _naming_config(path: Path):
    """A config or data-option error raised while a command runs names the config file it came from, as
    parse errors do (``cfg.yaml: model.preset: unknown preset ...``); errors that begin with a file of their
    own (a bad mask, a checkpoint) are left as they are."""
    from medxfer.errors import ConfigError

    try:
        yield
    except (ConfigError, DataError) as exc:
        message = str(exc)
        head = message.split(":", 1)[0]
        if str(path) in message or Path(head).exists():
            raise
        raise type(exc)(f"{path}: {message}") from None


def _quiet_training_libraries() -> None:
    """Lightning sets up its own INFO handlers on import (GPU/TPU lines, tips); keep the CLI's output ours."""
    import warnings

    import lightning  # noqa: F401  (import first: it resets its loggers' levels on import)

    level = logging.INFO if _state["debug"] else logging.ERROR
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(level)
    if not _state["debug"]:
        warnings.filterwarnings("ignore", module=r"lightning(\..*)?")
        warnings.filterwarnings("ignore", message=r".*(does not have many workers|in eval mode at the start).*")


def _cell(value) -> str:
    """Floats with 3 decimals, NaN as n/a, anything else as it prints (counts and lengths are ints)."""
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.3f}"
    return escape(str(value))  # "[x]" is text, not rich markup


def _print_table(title: str, columns: list[str], rows: list[list]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[_cell(v) for v in row])
    console.print(table)


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), "--out", help="Output folder."),
         quick: bool = typer.Option(False, "--quick", help="A few steps per stage (what the tests run)."),
         workers: Optional[int] = typer.Option(None, "--workers", help="Parallel runs (default: min(2, cores))."),
         study: str = typer.Option("2d", "--study", help="2d: Colin27 slices, ImageNet, Fashion-MNIST ladder; "
                                   "3d: sparse-label 3D transfer on simulated Colin27 subjects (docs/study3d.md)."),
         ) -> None:
    """A small real study on installed data (no download), resumable: a second run reuses finished work.
    --study 2d (default): Colin27 brain MRI slices, Fashion-MNIST, ImageNet EfficientNet-Lite0 weights;
    scratch vs ImageNet, a pretraining-length ladder with its stop rule, a second intensity domain.
    --study 3d: simulated subjects from Colin27 + AAL; sparse-label pretraining, new structures with 2/4/8
    volumes (scratch, full, frozen, gradual unfreeze), a second domain with its forgetting."""
    if study not in ("2d", "3d"):
        raise ConfigError(f"--study: expected 2d or 3d, got {study!r}")
    _check_out(out)
    _quiet_training_libraries()
    if study == "3d":
        _demo_3d(out, quick, workers)
        return
    from medxfer.demo import run_demo

    summary = run_demo(out, quick=quick, progress=interactive(), workers=workers)
    for name, frame in [("the study's answer (Colin27 T1: caudate, putamen, thalamus)", summary["answer_table"]),
                        ("pretraining-length ladder (Fashion-MNIST steps; length 0 = scratch)", summary["ladder"]),
                        ("source -> second domain (T1 model fine-tuned on T2-like)", summary["transfer"])]:
        if not frame.empty:
            frame = frame.drop(columns=[c for c in ("dice mean",) if c in frame.columns])
            _print_table(name, list(frame.columns), frame.values.tolist())
    _print_study_end(summary, {"results": summary["results_csv"], "robustness": summary["robustness_csv"],
                                "analysis": summary["analysis_dir"], "report": summary["report"]})


def _demo_3d(out: Path, quick: bool, workers: Optional[int]) -> None:
    from medxfer.study3d import run_study3d

    summary = run_study3d(out, quick=quick, progress=interactive(), workers=workers)
    if not summary["answer_table"].empty:
        _print_frame("the study's answer (target: hippocampus + amygdala; second domain: T2-like)",
                     summary["answer_table"])
    _print_study_end(summary, {"data": out / "data", "grid": summary["grid"], "results": summary["results_csv"],
                                "report": summary["report"]})


def _print_study_end(summary: dict, paths: dict[str, Any]) -> None:
    """A demo study's last lines: the runs by status, where its outputs are, and its findings."""
    counts = ", ".join(f"{n} {status}" for status, n in summary["counts"].items())
    console.print(f"runs: {counts}")
    console.print("\n".join(f"{name}: {path}" for name, path in paths.items()))
    for sentence in summary["headline"]:
        console.print(f"finding: {sentence}", highlight=False)


@app.command()
def finetune(config: Path = typer.Argument(..., help="Run config (YAML)."),
             out: Path = typer.Option(Path("runs_out"), "--out", help="Output folder.")) -> None:
    """Fine-tune (or train from scratch) one model and evaluate it; writes runs/<id>/result.json."""
    _check_out(out, "output folder")
    from medxfer.config import RunConfig, load_config
    from medxfer.evaluation.metrics import ABSENT_FP_RATE, PRESENT_DICE
    from medxfer.finetune import run_finetune, summary_dice
    from medxfer.io import folder_lock

    _quiet_training_libraries()
    from medxfer.records import collect

    run_config = load_config(config, RunConfig)
    with folder_lock(out, "output folder"):  # no sweep or other finetune writes here meanwhile
        try:
            with _naming_config(config):
                run = run_finetune(run_config, out, progress=interactive())
        except KeyboardInterrupt:  # the run resumes from its checkpoint next time; the table stays true
            if (out / "runs").is_dir():
                collect(out)
            raise
        collect(out)
    metrics = run.record["metrics"]
    headline = (metrics["target"].get("headline") or {}).get("metric", "dice")
    rows = [[name, summary_dice(run.record, name),
             *((metrics[name].get("class_aggregated") or {}).get(key, float("nan")) for key in (PRESENT_DICE, ABSENT_FP_RATE))]
            for name in metrics]
    convergence = run.record.get("convergence") or {}
    flag = {False: "; NOT CONVERGED", None: "; convergence undecided"}.get(convergence.get("converged"), "")
    _print_table(f"run {run.run_id} (headline: {headline}{flag})", ["test set", headline, PRESENT_DICE, ABSENT_FP_RATE],
                 rows)
    if convergence.get("converged") is not True and convergence.get("reason"):
        console.print(f"convergence: {convergence['reason']}", highlight=False)
    console.print(f"record: {run.run_dir / 'result.json'}")


@app.command()
def evaluate(model: Path = typer.Argument(..., help="A fine-tuning run folder or its model.pt, a whole-model "
                                                    "checkpoint, or a segmentation pretraining folder (with --length)."),
             config: Path = typer.Argument(..., help="Data config (YAML): a data section, an evaluate config, or a "
                                                     "run config (its data and evaluation sections)."),
             out: Path = typer.Option(Path("evaluate_out"), "--out", help="Output folder (evaluations/<id>/)."),
             length: Optional[int] = typer.Option(None, "--length", help="Pretraining length of the model "
                                                  "(a pretraining folder)."),
             split: Optional[str] = typer.Option(None, "--split", help="test (default) | val | train."),
             test_set: Optional[str] = typer.Option(None, "--test-set", help="Key of the metrics in the record "
                                                    "(target, or source for a forgetting baseline).")) -> None:
    """Evaluate a trained model on a dataset without training: writes the metrics record a run writes
    (the base model's source Dice, its zero-shot Dice on a new domain, the forgetting baseline)."""
    from medxfer.finetune import summary_dice
    from medxfer.model_evaluation import load_evaluate_config, run_evaluation
    from medxfer.records import collect_evaluations

    check_output_dir(out)
    evaluate_config = load_evaluate_config(config, split=split, test_set=test_set)
    record = run_evaluation(model, evaluate_config, out, length=length)
    collect_evaluations(out)
    rows = [[name, summary_dice(record, name), result.get("n_images")] for name, result in record["metrics"].items()]
    headline = next(iter(record["metrics"].values()), {}).get("headline", {}).get("metric", "dice")
    _print_table(f"evaluation {record['evaluation_id']} ({record['dataset']}, {record['split']} split)",
                 ["test set", headline, "images"], rows)
    console.print(f"model: {record['evaluated']['path']}\nrecord: "
                  f"{out / 'evaluations' / record['evaluation_id'] / 'result.json'}", highlight=False)


@app.command()
def collect(directory: Path = typer.Argument(..., help="A results folder (with runs/).")) -> None:
    """Aggregate the run records of a folder into results.csv (and its scores into robustness.csv)."""
    from medxfer.records import collect_all

    if not directory.is_dir():  # never create it: a mistyped folder would get an empty results.csv
        raise DataError(f"{directory}: results folder not found" if not directory.exists()
                        else f"{directory}: not a folder (give a results folder with runs/)")
    _check_out(directory)
    tables = collect_all(directory)
    for path in tables.values():
        if path is not None:
            console.print(f"wrote {path}")


@app.command()
def models() -> None:
    """List the model presets with their parameter counts and the weights each can start from."""
    from medxfer.models import PRESETS, preset_table

    rows = [[name, description, f"{n_params / 1e6:.2f} M", f"{dims}D", PRESETS[name].weights]
            for name, description, n_params, dims in preset_table()]
    _print_table("model presets (1 input channel, 2 classes)",
                 ["preset", "description", "parameters", "dims", "starting weights besides medxfer checkpoints"], rows)


def _parse_options(pairs: list[str]) -> dict:
    from medxfer.config import safe_load_yaml
    from medxfer.errors import ConfigError

    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--option {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        options[key.strip()] = safe_load_yaml(value, f"--option {key.strip()}")
    return options


def _parse_size(text: Optional[str], flag: str) -> Optional[list[int]]:
    """``128,128`` (or ``128x128``) -> [128, 128]; DataConfig then checks the sizes against the dims."""
    from medxfer.errors import ConfigError

    if text is None:
        return None
    try:
        return [int(side) for side in text.replace("x", ",").split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected whole numbers separated by commas, e.g. 128,128") from None


@weights_app.command("import")
def weights_import(
    source: str = typer.Argument(..., help="A state-dict file (torchvision/timm, MONAI network or bundle, Models "
                                           "Genesis, SuPreM; plain or wrapped; .pt/.pth/"
                                           ".safetensors), a known name (efficientnet-lite0/1/2), or a timm "
                                           "model name whose weights are in the local hub cache."),
    preset: str = typer.Option(..., "--preset", help="The model preset whose encoder takes the weights."),
    out: Path = typer.Option(..., "--out", help="Output folder (the encoder checkpoint and its manifest)."),
    in_channels: int = typer.Option(3, "--in-channels", help="Encoder input channels (first conv adapted)."),
    width: Optional[int] = typer.Option(None, "--width", help="The preset's width (default 32; e.g. 48 for "
                                                               "MONAI SwinUNETR checkpoints)."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Encoder levels (default: the preset's)."),
    option: list[str] = typer.Option([], "--option", help="Preset option KEY=VALUE (repeatable)."),
    licence: Optional[str] = typer.Option(None, "--licence", help="Licence of the weights, for the manifest."),
    top1: Optional[float] = typer.Option(None, "--top1", help="Their ImageNet top-1 (%), for the manifest."),
) -> None:
    """Import external weights into a preset's encoder -> an encoder checkpoint folder that finetune
    (pretrained.checkpoint), score, pretrain (pretrained.checkpoint) and sweeps take."""
    from medxfer.models.importing import import_weights, imported_summary

    path = import_weights(source, preset, out, in_channels=in_channels, width=width, depth=depth,
                          options=_parse_options(option), licence=licence, imagenet_top1=top1)
    _print_table("imported encoder", ["field", "value"], [list(row) for row in imported_summary(path)])


@data_app.command("check")
def data_check(name: str = typer.Argument(..., help="Dataset layout: acdc, covidqu, idrid, folders, msd, colin27, demo."),
               root: Optional[Path] = typer.Argument(None, help="Dataset folder as distributed."),
               dims: int = typer.Option(2, "--dims", help="2 (slices/images) or 3 (volumes)."),
               option: list[str] = typer.Option([], "--option", "-o",
                                                help="Dataset option KEY=VALUE (YAML value), repeatable."),
               patch_size: Optional[str] = typer.Option(None, "--patch-size", help=(
                   "The run's data.patch_size, e.g. 128,128: images may then differ in size.")),
               resize: Optional[str] = typer.Option(None, "--resize", help=(
                   "The run's data.resize, e.g. 512,512: images are checked resized."))) -> None:
    """Validate a dataset layout; print counts, shapes, classes and intensity ranges. Training images of
    different sizes are an error (exit 2) unless --patch-size or --resize says how the run handles them."""
    from medxfer.config import DataConfig, parse_config
    from medxfer.data.check import check_dataset, check_report_lines

    config = parse_config({"name": name, "root": root, "spatial_dims": dims, "options": _parse_options(option),
                           "patch_size": _parse_size(patch_size, "--patch-size"),
                           "resize": _parse_size(resize, "--resize")},
                          DataConfig, source="data check")  # a bad name or --dims: one line, not a traceback
    report = check_dataset(config)
    for line in check_report_lines(report):
        console.print(line, highlight=False, soft_wrap=True)


@data_app.command("colin27-subjects")
def data_colin27_subjects(out: Path = typer.Argument(..., help="Output folder (one nnU-Net v2 dataset per task)."),
                          source: int = typer.Option(40, "--source", help="Sparsely annotated source subjects."),
                          target: int = typer.Option(16, "--target", help="Target subjects (hippocampus, amygdala)."),
                          t2like: int = typer.Option(12, "--t2like", help="Second-domain (T2-like) source subjects."),
                          seed: int = typer.Option(0, "--seed", help="Generator seed (subject i depends on it only)."),
                          ) -> None:
    """Build the multi-subject 3D stand-in from Colin27 + AAL (real one brain; simulated subject variability):
    OUT/source (sparse labels), OUT/target, OUT/source_t2like, each readable as data name msd, spatial_dims 3."""
    from medxfer.data.colin27_subjects import write_subjects

    check_output_dir(out)
    for task, n in (("source", source), ("target", target), ("source_t2like", t2like)):
        console.print(f"{task}: {write_subjects(out / task, task, n, seed=seed)} ({n} subjects)", highlight=False)


@app.command()
def pretrain(config: Path = typer.Argument(..., help="Pretraining config (YAML)."),
             out: Path = typer.Option(Path("pretrain_out"), "--out", help="Output folder.")) -> None:
    """Pretrain an encoder, saving checkpoints at the scheduled pretraining lengths."""
    _check_out(out, "pretraining folder")
    from medxfer.config import PretrainConfig, load_config
    from medxfer.pretraining import run_pretraining

    _quiet_training_libraries()
    pretrain_config = load_config(config, PretrainConfig)
    with _naming_config(config):
        result = run_pretraining(pretrain_config, out, progress=interactive())
    rows = []
    for entry in result.checkpoints:
        accuracy, dice = entry.manifest.get("val_accuracy"), entry.manifest.get("val_dice")
        rows.append([entry.length, "n/a" if accuracy is None else accuracy, "n/a" if dice is None else dice,
                     entry.path])
    _print_table(f"pretraining checkpoints ({result.record.get('status', 'done')})",
                 ["length", "val accuracy", "val dice", "path"], rows)


def _print_frame(title: str, frame) -> None:
    _print_table(title, [str(c) for c in frame.columns], frame.values.tolist())


@app.command()
def score(config: Path = typer.Argument(..., help="Score config (YAML)."),
          out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the config's `out`).")
          ) -> None:
    """Score the transferability of every checkpoint on the target data; writes robustness.csv."""
    from medxfer.transferability.scoring import load_score_config, run_score

    score_config = load_score_config(config)
    _check_out(out if out is not None else score_config.out, "score folder")
    with _naming_config(config):
        result = run_score(score_config, out, progress=interactive())
    try:
        _print_frame("robustness of each checkpoint (stop variant; lower = more robust)",
                     result.summary(score_config.stop))
    except MedxferError as exc:  # the recommended rule reads every variant; the table is written, whole
        console.print(f"{exc}; every scored variant is in robustness.csv", markup=False)
    if result.n_checkpoints == 1:
        console.print("one checkpoint: nothing to choose (no recommended pretraining length)", markup=False)
    if result.recommendation is not None:
        rec = result.recommendation
        if rec.stop_rule:  # the online rule: where it stopped is the recommendation
            fired = (f"pretraining could have stopped at {rec.stopped_at:g}" if rec.fired
                     else "the rule did not stop before the last checkpoint")
            console.print(f"recommended pretraining length: {rec.length:g} ({rec.rule}: {fired})", markup=False)
        else:
            fired = "the rule fired" if rec.fired else "the rule did not fire; best so far"
            console.print(f"recommended pretraining length: {rec.length:g} (score {rec.score:.4f}; rule {rec.rule}"
                          f"{f' patience {rec.patience}' if rec.rule == 'patience' else ''}: {fired}; "
                          f"variant {rec.variant})")
    for name, path in result.paths.items():
        console.print(f"{name}: {path}")


@app.command()
def analyze(downstream: Path = typer.Option(..., "--downstream", help="results.csv (downstream Dice)."),
            robustness: Path = typer.Option(..., "--robustness", help="robustness.csv (scores)."),
            baselines: Optional[Path] = typer.Option(None, "--baselines", help="baselines.csv (optional)."),
            names: Optional[Path] = typer.Option(None, "--names", help="YAML name mapping (optional)."),
            patience: list[int] = typer.Option([1], "--patience", help="Patience rules to evaluate (repeatable)."),
            keep_copies: bool = typer.Option(False, "--keep-copies", help="Keep blocks that copy another "
                                             "length's values (default: flag and leave them out)."),
            out: Path = typer.Option(Path("analysis"), "--out", help="Output folder.")) -> None:
    """Check the inputs, relate transferability scores to downstream Dice, evaluate stop rules (in-sample,
    leave-one-dataset-out, against baselines and oracles) and check the reference study's claims."""
    from medxfer.report.analyze import analyze as run_analysis, correlation_summary, seeds_text, summary_for_print
    from medxfer.report.quality import summary_lines

    _check_out(out)
    result = run_analysis(downstream, robustness, baselines=baselines, names=names, patience=patience,
                          keep_copies=keep_copies, out_dir=out)
    console.print(f"{len(result.groups)} groups (model x dataset x scheme x frozen); Dice: {seeds_text(result.groups)}")
    console.print("data quality:" if result.quality else "data quality: no problem found")
    for line in summary_lines(result.quality):
        console.print(f"  {line}", markup=False, highlight=False)
    _print_frame("stop rules: mean Dice regret vs each group's best length; saved = pretraining not run "
                 "(at the stopped length); W/T/L vs always longest, T = within the group's seed noise",
                 summary_for_print(result))
    correlation = correlation_summary(result)
    if not correlation.empty:
        _print_frame("predictors of Dice over lengths (mean over groups; score oriented: higher = predicted "
                     "better)", correlation)
    _print_frame("the reference study's claims, checked on these tables", result.claims[["claim", "figure", "verdict"]])
    console.print(f"recommended rule: {result.recommended or 'none'}", markup=False)
    saved_rule = result.recommended_rule
    if saved_rule is not None:
        f = saved_rule["figures"]
        console.print(f"  regret {f['regret_mean']:.4f} [{f['regret_ci_low']:.4f}, {f['regret_ci_high']:.4f}] at "
                      f"{f['saved_mean']:.0%} pretraining saved vs always longest {f['always_longest_regret']:.4f} "
                      f"at 0% ({f['coverage']}); goal (>= 50% saved, regret <= always longest) "
                      f"{'met' if saved_rule['goal_met'] else 'NOT met'}; use it with "
                      f"stop: {{rule: recommended, rule_file: {out / 'recommended_rule.json'}}}", markup=False)
    for name, path in result.paths.items():
        console.print(f"{name}: {path}")


@app.command()
def sweep(grid: Path = typer.Argument(..., help="Grid file (YAML): base config, axes, include/exclude."),
          out: Path = typer.Option(Path("sweep_out"), "--out", help="Output folder (runs/, results.csv, ...)."),
          backend: str = typer.Option("local", "--backend", help="local | ray"),
          workers: int = typer.Option(1, "--workers", help="local: parallel worker processes."),
          address: Optional[str] = typer.Option(None, "--address", help="ray: address of a running cluster "
                                                "(default: a local Ray instance)."),
          retry_failed: bool = typer.Option(False, "--retry-failed", help="Run failed runs again."),
          dry_run: bool = typer.Option(False, "--dry-run", help="List the runs (id, axis values, state); run nothing."),
          ) -> None:
    """Run a grid of fine-tuning runs, resumably: finished runs are skipped, interrupted ones redone."""
    if not dry_run:
        _check_out(out, "sweep folder")
    from medxfer.errors import MedxferError
    from medxfer.sweep.runner import run_sweep

    _quiet_training_libraries()
    summary = run_sweep(grid, out, backend=backend, workers=workers, address=address,
                        retry_failed=retry_failed, dry_run=dry_run, progress=interactive())
    if dry_run:
        columns, rows = summary.runs_table()
        _print_table(f"sweep {summary.name}: {len(summary.runs)} runs (dry run)", columns[:-2] + columns[-1:],
                     [row[:-2] + row[-1:] for row in rows])
        if summary.invalid:
            raise MedxferError(f"{len(summary.invalid)} invalid combination(s); first: {summary.invalid[0].error}")
        return
    columns, rows = summary.status_table()
    _print_table(f"sweep {summary.name} ({summary.elapsed_s:.0f} s)", columns, rows)
    for run in summary.failed:
        console.print(f"[red]{run.status}[/red] {run.run_id} ({', '.join(f'{k}={v}' for k, v in run.axes.items())}): "
                      f"{run.error}")
    console.print(f"records: {summary.out_dir / 'runs'}\nresults: {summary.results_csv}"
                  + (f"\nrobustness: {summary.robustness_csv}" if summary.robustness_csv else ""))
    if summary.failed:
        raise typer.Exit(1)  # some runs failed (and are recorded); the sweep itself worked


@app.command()
def report(results_dir: Path = typer.Argument(..., help="A results folder (runs/ and/or robustness.csv)."),
           run: Optional[list[str]] = typer.Option(None, "--run", help="Run id for the overlay grid (repeatable).")
           ) -> None:
    """Write the HTML report (figures embedded), the PNGs and the summary tables of a results folder."""
    from medxfer.report import write_report

    if results_dir.is_dir():  # (a missing folder is write_report's one-line error)
        _check_out(results_dir / "report")
    console.print(f"wrote {write_report(results_dir, overlay_runs=run or None)}")


@app.command()
def predict(run: Path = typer.Argument(..., help="A run folder or its model.pt."),
            inputs: Path = typer.Argument(..., help="An image/volume file or a folder of them."),
            out: Path = typer.Option(..., "--out", help="Output folder."),
            overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Also write overlay PNGs."),
            axis: Optional[str] = typer.Option(None, "--axis", help="2D model on a volume: the voxel axis to slice "
                                               "along (i, j, k) or the plane (axial, coronal, sagittal, from the "
                                               "affine). Default: k, the third voxel axis.")) -> None:
    """Apply a trained model to new images or volumes; masks in the input's format plus overlays."""
    from medxfer.predict import predict as run_predict

    _check_out(out)
    summary = run_predict(run, inputs, out, overlays=overlays, axis=axis)
    for entry in summary["written"]:
        if entry.get("slice_axis"):
            console.print(f"{Path(entry['input']).name}: sliced along voxel axis {entry['slice_axis']} "
                          f"({entry['slice_plane']})", markup=False, highlight=False)
        for problem in entry.get("geometry_warnings") or []:
            console.print(f"warning: {Path(entry['input']).name}: {problem}", markup=False, highlight=False)
    console.print(f"{len(summary['written'])} mask(s) written to {out}")
    if summary["failed"]:  # each skipped input was already logged with its reason
        typer.echo(f"{len(summary['failed'])} input(s) skipped", err=True)
        raise typer.Exit(1)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: run the app; turn library errors into one line on stderr and exit code 2."""
    try:
        return _run(argv)
    finally:
        plain_progress_off()  # the progress lines' stream may not outlive the command (tests, embedding)


def _run(argv: Optional[list[str]]) -> int:
    try:
        code = app(args=argv, standalone_mode=False)  # returns the exit code of typer.Exit
    except MedxferError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # The environment refused a write (read-only or full filesystem, a file where a folder belongs):
        # not a bug, so one line naming the path, as for bad input.
        if _state["debug"]:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # typer/click exits (e.g. --help)
        return int(exc.code or 0)
    except Exception as exc:
        # Usage errors of typer's click (typer may vendor its own copy, so test by shape, not by class).
        if hasattr(exc, "exit_code") and hasattr(exc, "show"):
            exc.show()
            return int(exc.exit_code)
        if type(exc).__name__ == "Abort":
            return 1
        raise
    if code == 130:  # typer turns a KeyboardInterrupt into a silent Exit(130)
        print("interrupted", file=sys.stderr)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
