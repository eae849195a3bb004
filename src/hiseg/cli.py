"""The ``hiseg`` command line: a thin layer over the Python API, one verb per task."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperGroup

from hiseg import __version__
from hiseg.config import load_config
from hiseg.data import (
    FORMATS,
    Dataset,
    DatasetError,
    check_dataset,
    dataset_splits,
    dataset_stats,
    open_dataset,
)
from hiseg.errors import HisegError
from hiseg.evaluation import EvaluationError, score_prediction_dir
from hiseg.files import json_writer, publish, writable_file, writable_folder
from hiseg.metrics import format_score
from hiseg.pipeline import LONG_SIDE_RANGE, SCALE_RANGE
from hiseg.predictor import DEFAULT_MODEL, bundled_models
from hiseg.taxonomy import BACKGROUND, TreeError, builtin_trees, load_tree

if TYPE_CHECKING:
    from hiseg.predictor import Predictor
    from hiseg.runner import RunReport


class HisegGroup(TyperGroup):
    """The one error handler of every command: a user mistake or a bad path (any HisegError, any
    OSError) prints one ``error:`` line and exits 2 (or the error's own ``exit_code``), never a
    traceback."""

    def invoke(self, ctx: Any) -> Any:  # Any: typer keeps its Context class private (typer._click)
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # `hiseg ... | head` closed the pipe: nothing left to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # so Python's own flush can't complain
            raise typer.Exit(1) from None
        except (HisegError, OSError) as err:
            raise fail(str(err) or type(err).__name__, getattr(err, "exit_code", 2)) from None


app = typer.Typer(
    cls=HisegGroup,
    help="Hierarchical human segmentation: person, upper/lower body and six parts.",
    no_args_is_help=True,
    add_completion=False,
)
data_app = typer.Typer(help="Check and describe datasets.", no_args_is_help=True)
tree_app = typer.Typer(help="Show class trees.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(tree_app, name="tree")

#: Columns of output when no standard stream is a terminal (nohup, cron, CI logs), where Rich
#: would fold tables at 80.
LOG_WIDTH = 200


def _on_terminal() -> bool:
    """Whether Rich can measure a terminal: it tries stdin, stdout and stderr in turn."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        try:
            if stream is not None and stream.isatty():
                return True
        except ValueError:  # closed
            pass
    return False


def _console(stderr: bool = False) -> Console:
    """A console that never breaks a file name across lines; with no terminal to measure,
    tables up to LOG_WIDTH wide (unless COLUMNS gives a width, as Rich reads it)."""
    wide = not _on_terminal() and not os.environ.get("COLUMNS", "").isdigit()
    return Console(stderr=stderr, soft_wrap=True, width=LOG_WIDTH if wide else None)


console = _console()
err_console = _console(stderr=True)

FORMAT_HELP = f"Dataset layout: auto or one of {', '.join(FORMATS)}."


def fail(message: str, code: int = 2) -> typer.Exit:
    # escaped: messages name files and extras ('hiseg[ray]') that Rich would read as markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


LOG_PROGRESS_FROM = 20  # inputs; shorter runs off a terminal print only their result


@contextmanager
def progress_bar(total: int, description: str) -> Iterator[Callable[..., None]]:
    """A Rich progress bar; yields ``advance(n, new_description=None)`` (a video's frames update
    the description between inputs). Off a terminal (a log file, nohup) a bar draws nothing, so
    a long run prints a plain line at every tenth of its total instead."""
    if not err_console.is_terminal:
        done, shown = 0, 0

        def log(n: int, new_description: str | None = None) -> None:
            nonlocal done, shown
            done += n
            tenth = 10 * done // total if total >= LOG_PROGRESS_FROM else 0
            if tenth > shown:
                shown = tenth
                err_console.print(f"{description}: {done}/{total}", highlight=False)

        yield log
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int, new_description: str | None = None) -> None:
            bar.update(task, advance=n, description=new_description)

        yield advance


def version_callback(value: bool) -> None:
    if value:
        console.print(f"hiseg {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """hiseg: hierarchical human segmentation."""


# -- tree -------------------------------------------------------------------------------------


@tree_app.command("list")
def tree_list() -> None:
    """List the builtin class trees."""
    for name in builtin_trees():
        console.print(name)


@tree_app.command("show")
def tree_show(tree: str = typer.Argument(..., help="Builtin tree name or tree YAML file.")) -> None:
    """Print a tree and the nodes of each level."""
    t = load_tree(tree)
    console.print(t.render(), highlight=False)
    for level in t.levels:
        console.print(f"level {level.index}: {', '.join(level.names)}", highlight=False)


# -- data -------------------------------------------------------------------------------------


def _datasets(path: Path, split: str | None, fmt: str) -> list[Dataset]:
    """The named split, or every split, of a dataset folder.

    Never empty: a folder with no splits, or a format that does not fit it, is a DatasetError.
    """
    names = [split] if split else dataset_splits(path, fmt)
    return [open_dataset(path, name, fmt) for name in names]


@data_app.command("check")
def data_check(
    path: Path = typer.Argument(..., help="Dataset folder."),
    split: str | None = typer.Option(None, help="One split (default: every split)."),
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
) -> None:
    """Check every sample; report each problem with its file. Exit 1 if any."""
    problems = []
    datasets = _datasets(path, split, format)
    for dataset in datasets:
        name = dataset.split
        with progress_bar(len(dataset), f"checking {name}") as advance:
            found = check_dataset(dataset, advance)
        for problem in found:
            console.print(f"[red]✗[/] {escape(str(problem))}", highlight=False)
        status = "[green]ok[/]" if not found else f"[red]{len(found)} problem(s)[/]"
        console.print(f"{dataset.format} {name}: {len(dataset)} samples, {status}", highlight=False)
        problems.extend(found)
    if problems:
        raise typer.Exit(1)
    if not sum(len(d) for d in datasets):  # check_dataset names empty splits; belt and braces
        raise fail(f"{path}: nothing to check (no samples)", code=1)


def refuse_inside_dataset(option: str, output: Path, data: Path) -> None:
    """Results never go among the data they describe: a .json over a mask or an id list, or
    plots in a mask folder (read as masks next time), would change the data."""
    if output.resolve().is_relative_to(data.resolve()):
        raise fail(f"{option} {output}: inside the dataset {data}; write results elsewhere")


@data_app.command("stats")
def data_stats(
    path: Path = typer.Argument(..., help="Dataset folder."),
    split: str | None = typer.Option(None, help="One split (default: every split)."),
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    out: Path = typer.Option(Path("runs/stats"), help="Folder for the PNG and JSON."),
) -> None:
    """Image sizes, pixel share per node per level, and person sizes, as tables and a PNG."""
    refuse_inside_dataset("--out", out, path)
    writable_folder(out, "--out")
    for dataset in _datasets(path, split, format):
        name = dataset.split
        if not len(dataset):
            raise fail(f"{path}: split '{name}' has no samples")
        with progress_bar(len(dataset), f"reading {name}") as advance:
            stats = dataset_stats(dataset, advance)
        summary = stats.to_dict()
        _print_stats(f"{path.name} / {name}", summary)
        stem = out / f"{path.resolve().name}_{name}"
        publish(Path(f"{stem}.json"), json_writer(summary))
        try:
            png = stats.plot(f"{stem}.png")
        except ImportError:
            png = None
            err_console.print(
                "matplotlib is not installed: no PNG (pip install 'hiseg[plot]')", markup=False
            )
        console.print(f"saved {stem}.json" + (f" and {png}" if png else ""), highlight=False)
        for problem in stats.skipped:
            console.print(f"[yellow]skipped[/] {problem}", highlight=False)


def share_table(title: str, levels: dict[str, dict[str, float]], number: str) -> Table:
    """A table of the share of each node, level by level."""
    table = Table(title=title)
    table.add_column("level")
    table.add_column("node")
    table.add_column("share", justify="right")
    for k, shares in levels.items():
        for i, (node, share) in enumerate(shares.items()):
            table.add_row(k if i == 0 else "", node, number.format(share))
        table.add_section()
    return table


def _print_stats(title: str, s: dict[str, Any]) -> None:
    w, h = s["width"], s["height"]
    console.print(
        f"[bold]{title}[/]: {s['n_images']} images, width {w['min']}-{w['max']} "
        f"(median {w['median']:.0f}), height {h['min']}-{h['max']} (median {h['median']:.0f})",
        highlight=False,
    )
    console.print(share_table("pixel share per node", s["levels"], "{:.2%}"))
    regions = s["person_regions"]
    table = Table(
        title=f"person regions ({regions['count']}, median {regions['median_share']:.1%} of image)"
    )
    table.add_column("size (share of image)")
    table.add_column("regions", justify="right")
    for bucket, count in regions["buckets"].items():
        table.add_row(bucket, str(count))
    console.print(table)


# -- eval -------------------------------------------------------------------------------------


# Options shared by `predict` and `eval`: one declaration each, one loader.
BUNDLED = ", ".join(bundled_models())
MODELS = typer.Option(
    None,
    "--model",
    "-m",
    help=f"Bundled model ({BUNDLED}; default {DEFAULT_MODEL}), .onnx or .ckpt; repeat for an "
    "ensemble.",
)
EVAL_MODELS = typer.Option(
    None,
    "--model",
    "-m",
    help=f"Model to score: bundled ({BUNDLED}), .onnx or .ckpt; repeat for an ensemble. "
    "Or --pred-dir.",
)
BACKEND = typer.Option("auto", help="auto (onnx for .onnx, torch for .ckpt), onnx, torch.")
THREADS = typer.Option(None, help="CPU threads, 1 to the number of cores (default: all cores).")
LONG_SIDE = typer.Option(
    None, help="Model input long side, 32 to 4096 pixels (default: the model's)."
)
FLIP = typer.Option(False, "--flip", help="Average with the mirrored image (TTA).")
SCALES = typer.Option("1", help="Comma-separated TTA scales, e.g. 0.75,1,1.25.")
ACCURATE = typer.Option(
    False,
    "--accurate",
    help="Preset: --flip and --scales 0.75,1,1.25 (more accurate, about 6x slower).",
)
TILE = typer.Option(False, "--tile", help="Sliding windows on large images.")
ZOOM = typer.Option(False, "--zoom", help="Second, zoomed-in pass on small people.")
CLEAN = typer.Option(
    None,
    "--clean",
    help="Remove islands / fill holes under N pixels, per level (0 = off; default: the model's).",
)

ENGINE = typer.Option(
    "local",
    "--engine",
    help="local (this process) or ray (Ray Data actors; needs pip install 'hiseg\\[ray]').",
)
ADDRESS = typer.Option(
    None,
    "--address",
    help="With --engine ray: the cluster to join, auto or ray://host:port (default: a new "
    "local one on this machine's cores).",
)
WORKERS = typer.Option(
    None,
    "--workers",
    help="With --engine ray: predictor actors (default: one per CPU of the cluster, or CPUs / "
    "--threads); each uses CPUs / workers threads unless --threads.",
)


def at_least(option: str, value: int | None, low: int) -> int | None:
    """``value`` if None or >= ``low``; else one clear error line (exit 2)."""
    if value is not None and value < low:
        raise fail(f"{option} must be at least {low}, not {value}")
    return value


def in_range(option: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise fail(f"{option} must be between {low:g} and {high:g}, not {value:g}")


def cpu_threads(threads: int | None, option: str = "--threads") -> int | None:
    """``threads`` clamped to the machine's cores (more only thrash); below 1 is an error."""
    at_least(option, threads, 1)
    cores = os.cpu_count() or 1
    if threads is None or threads <= cores:
        return threads
    err_console.print(f"note: {option} {threads} lowered to the {cores} CPU cores", highlight=False)
    return cores


def check_long_side(option: str, value: int | None) -> int | None:
    if value is not None:
        in_range(option, value, *LONG_SIDE_RANGE)
    return value


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise fail(f"--scales must be numbers separated by commas, not '{text}'") from None
    for scale in scales:
        in_range("--scales", scale, *SCALE_RANGE)  # also refuses nan
    return scales


def load_options(
    model: list[str] | None,
    backend: str,
    threads: int | None,
    long_side: int | None,
    flip: bool,
    scales: str,
    accurate: bool,
    clean: int | None,
    tile: bool = False,
    zoom: bool = False,
) -> dict[str, Any]:
    """:func:`hiseg.load`'s keywords from the shared options of ``predict``, ``eval`` and
    ``pseudo-label`` (the local and the Ray engines load from the same dict), each checked against
    its bounds before any work starts (one error line otherwise). ``--accurate`` with ``--flip`` /
    ``--scales`` is refused rather than merged, so the preset always means the one measured
    setting."""
    at_least("--clean", clean, 0)
    parsed = parse_scales(scales)
    if accurate and (flip or parsed != (1.0,)):
        raise fail("--accurate already sets --flip and --scales: give one or the other")
    return {
        "model": model or None,
        "backend": backend,
        "threads": cpu_threads(threads),
        "long_side": check_long_side("--long-side", long_side),
        "flip": flip or None,  # not given: hiseg.load refuses an explicit flip beside accurate
        "scales": parsed,
        "accurate": accurate,
        "clean": clean,
        "tile": tile,
        "zoom": zoom,
    }


# The prediction options' defaults as load_options gives them, by flag (threads aside: resolved).
PREDICTION_DEFAULTS: dict[str, tuple[str, Any]] = {
    "--long-side": ("long_side", None),
    "--flip": ("flip", None),
    "--scales": ("scales", (1.0,)),
    "--accurate": ("accurate", False),
    "--clean": ("clean", None),
    "--tile": ("tile", False),
    "--zoom": ("zoom", False),
}


def load_predictor(options: dict[str, Any]) -> Predictor:
    """The predictor :func:`load_options` describes; a model that can't load is one error line
    (the handler of :class:`HisegGroup`)."""
    from hiseg.predictor import load

    return load(**options)


@app.command("eval")
def evaluate(
    data: Path = typer.Option(..., "--data", help="Dataset folder."),
    split: str = typer.Option("val", help="Split to score."),
    model: list[str] | None = EVAL_MODELS,
    pred_dir: Path | None = typer.Option(
        None, "--pred-dir", help="Or: a folder of <id>.png predicted leaf label maps."
    ),
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    json_out: Path | None = typer.Option(None, "--json", help="Write the scores as JSON here."),
    report: Path | None = typer.Option(
        None, "--report", help="Write a report (markdown, plots, worst images) to this folder."
    ),
    save_pred: Path | None = typer.Option(None, help="Save the model's label maps here."),
    limit: int | None = typer.Option(None, help="Score only the first N images."),
    worst: int = typer.Option(
        8, help="List (and show in the report) the N images of lowest mIoU, e.g. to find bad masks."
    ),
    backend: str = BACKEND,
    threads: int | None = THREADS,
    long_side: int | None = LONG_SIDE,
    flip: bool = FLIP,
    scales: str = SCALES,
    accurate: bool = ACCURATE,
    tile: bool = TILE,
    zoom: bool = ZOOM,
    clean: int | None = CLEAN,
    mlflow_uri: str | None = typer.Option(
        None,
        "--mlflow",
        help="Log scores and report to this MLflow store, e.g. sqlite:///runs/mlflow.db.",
    ),
    engine: str = ENGINE,
    address: str | None = ADDRESS,
    workers: int | None = WORKERS,
) -> None:
    """Score a model (or a folder of predictions) per level of the class tree."""
    if (model is None) == (pred_dir is None):
        raise fail("give either --model (one or more) or --pred-dir")
    if report is not None and model is None:
        raise fail("--report needs --model (the report shows the model's worst images)")
    if save_pred is not None and model is None:
        raise fail("--save-pred needs --model (it saves the model's label maps)")
    if limit is not None and model is None:
        raise fail("--limit needs --model (--pred-dir scores every id of the split)")
    if report is not None and importlib.util.find_spec("matplotlib") is None:
        raise fail("--report draws plots with matplotlib: pip install 'hiseg[plot]'")
    if mlflow_uri is not None and report is None:
        raise fail("--mlflow logs the scores and the report: give --report too")
    if check_engine(engine, address, workers) == "ray" and pred_dir is not None:
        raise fail("--engine ray runs a model; --pred-dir is scored in this process")
    at_least("--limit", limit, 1)
    at_least("--worst", worst, 0)
    options = load_options(
        model, backend, threads, long_side, flip, scales, accurate, clean, tile, zoom
    )
    if pred_dir is not None:
        given = [
            flag for flag, (key, default) in PREDICTION_DEFAULTS.items() if options[key] != default
        ]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise fail(f"--pred-dir scores saved label maps: {', '.join(given)} {verb} to a model")
    for option, output in (("--report", report), ("--json", json_out)):
        if output is not None:
            refuse_inside_dataset(option, output, data)
    for option, folder in (("--report", report), ("--save-pred", save_pred)):
        if folder is not None:
            writable_folder(folder, option)
    if json_out is not None:
        writable_file(json_out, "--json")
    try:
        dataset = open_dataset(data, split, format)
        if len(dataset) == 0:  # scores of nothing would be NaN, not a pass
            raise fail(f"{data}: split '{split}' has no samples; nothing to score")
        if pred_dir is not None:
            with progress_bar(len(dataset), f"scoring {split}") as advance:
                scores = score_prediction_dir(dataset, pred_dir, advance)
            result = None
        else:
            from hiseg.evaluation import evaluate_model

            predictor = load_predictor(options)
            if not predictor.tree.same_as(dataset.tree):
                console.print(
                    f"the model's tree '{predictor.tree.name}' differs from the data's "
                    f"'{dataset.tree.name}': scoring person vs background only",
                    highlight=False,
                )
            n = min(limit or len(dataset), len(dataset))
            with progress_bar(n, f"evaluating on {split}") as advance:
                if engine == "ray":
                    from hiseg.distributed import evaluate_on_ray

                    result = evaluate_on_ray(
                        dataset, options, limit, worst, save_pred, address, workers, advance
                    )
                else:
                    result = evaluate_model(
                        predictor, dataset, limit, advance, keep_worst=worst, save_dir=save_pred
                    )
            scores = result.scores()
    except EvaluationError as err:  # bad predictions: the run's result, exit 1 (not a mistake)
        raise fail(str(err), code=1) from None
    print_scores(scores, len(dataset))
    if json_out:
        publish(json_out, json_writer(scores))
        console.print(f"saved {json_out}", highlight=False)
    if result is not None and report is not None:
        from hiseg.report import log_report_to_mlflow, write_report

        console.print(f"report saved to {write_report(result, report)}", highlight=False)
        if mlflow_uri:
            run_id = log_report_to_mlflow(report, scores, mlflow_uri)
            console.print(f"logged to MLflow run {run_id}", highlight=False)


def print_scores(scores: dict[str, Any], split_size: int) -> None:
    """The per-level table that ``hiseg eval`` prints, then its lowest-scoring images."""
    if scores["n_images"] != split_size:  # --limit: not the whole split's score
        console.print(f"scored the first {scores['n_images']} of {split_size} images")
    table = Table(title=f"{scores['tree']}: {scores['n_images']} images")
    table.add_column("level")
    table.add_column("node")
    table.add_column("IoU", justify="right")
    table.add_column("Dice", justify="right")
    for k, level in scores["levels"].items():
        for node, iou in level["iou"].items():
            style = "dim" if node == BACKGROUND else None
            table.add_row(
                "", node, format_score(iou), format_score(level["dice"][node]), style=style
            )
        table.add_row(
            f"mIoU{k}", "(background excluded)", format_score(level["miou"]), "", style="bold"
        )
        table.add_section()
    console.print(table)
    console.print(
        "mIoU over all leaves with background: "
        f"{format_score(scores['miou_all_with_background'])}   "
        f"pixel accuracy: {format_score(scores['pixel_accuracy'])}",
        highlight=False,
    )
    if "by_size" in scores:
        table = Table(title="mIoU by person size (share of the image per person region)")
        table.add_column("size")
        table.add_column("regions", justify="right")
        for k in scores["levels"]:
            table.add_column(f"mIoU{k}", justify="right")
        for bucket, s in scores["by_size"].items():
            levels = [format_score(level["miou"]) for level in s["levels"].values()]
            table.add_row(bucket, str(s["regions"]), *levels)
        console.print(table)
    if scores.get("worst"):
        worst = ", ".join(
            f"{item['id']} ({format_score(item['miou'])})" for item in scores["worst"]
        )
        console.print(f"lowest mIoU: {worst}", highlight=False)


# -- train ------------------------------------------------------------------------------------


@app.command("train")
def train_command(
    config: Path = typer.Argument(..., help="Training config YAML (see configs/)."),
    overrides: list[str] | None = typer.Argument(
        None, help="Config overrides as key.sub=value, e.g. trainer.max_epochs=2."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last.ckpt."),
    track: bool = typer.Option(True, "--track/--no-track", help="MLflow tracking."),
) -> None:
    """Train a model; checkpoints go to <out_dir>/<name>/ (best.ckpt, last.ckpt)."""
    cfg = load_config(config, overrides or [])
    try:
        from hiseg.training import run_dir, train
    except ImportError as err:
        raise fail(f"training needs the train extra: pip install 'hiseg[train]' ({err})") from None
    train(cfg, resume=resume, track=track)  # a HisegError is one line (HisegGroup)
    console.print(f"checkpoints saved to {run_dir(cfg)}/ (best.ckpt, last.ckpt, history.csv)")


# -- predict ----------------------------------------------------------------------------------


#: ``hiseg predict`` prints a per-node table for each image when given at most this many.
SUMMARY_TABLES_UP_TO = 5


def print_summary(item: dict[str, Any]) -> None:
    """Pixel share per node per level, and the number of people, of one predicted image."""
    title = f"{item['image']}: {item['width']}x{item['height']}, {item['people']} person region(s)"
    console.print(share_table(title, item["levels"], "{:.1%}"))


def check_engine(engine: str, address: str | None, workers: int | None) -> str:
    if engine not in ("local", "ray"):
        raise fail(f"--engine must be local or ray, not '{engine}'")
    if engine == "local" and (address is not None or workers is not None):
        raise fail("--address and --workers need --engine ray")
    at_least("--workers", workers, 1)
    return engine


def predict_with_ray(
    texts: list[str],
    out: Path,
    levels: bool,
    summary: bool,
    options: dict[str, Any],
    address: str | None,
    workers: int | None,
) -> None:
    """``hiseg predict --engine ray``: the local engine's outputs and printout, plus the skipped
    inputs (finished by an earlier run) and failed.csv."""
    from hiseg.distributed import predict_on_ray
    from hiseg.runner import Saver

    load_predictor(options)  # a model that can't load is one error line before any cluster starts
    saver = Saver(out, levels=levels, summary=summary)
    with progress_bar(0, "segmenting on Ray") as advance:
        job = predict_on_ray(texts, saver, options, address, workers, lambda: advance(1))
    report = job.report
    summary_path = saver.write_summary(report, job.inputs)
    n_ok = len(report.summaries)
    skipped = f" ({job.skipped} done by an earlier run, skipped)" if job.skipped else ""
    files = {"summary": summary_path, "failed": job.failed_csv}
    finish_run(report, n_ok, job.inputs, out, job.renamed, files, skipped)


@app.command("predict")
def predict_command(
    inputs: list[str] = typer.Argument(
        None, help="Images, folders, globs ('photos/*.jpg'), videos, or a webcam index."
    ),
    model: list[str] | None = MODELS,
    source: str | None = typer.Option(
        None,
        "--source",
        help="Webcam index (e.g. 0) or input; digits name a webcam unless such a file exists.",
    ),
    out: Path = typer.Option(
        Path("runs/predict"),
        "--out",
        "-o",
        help="Output folder; existing files are never replaced (taken names get _2, _3, ...).",
    ),
    levels: bool = typer.Option(False, "--levels", help="Also save one colour mask per level."),
    summary: bool = typer.Option(
        False, "--json", help="Also save a JSON summary per image and summary.json for the run."
    ),
    backend: str = BACKEND,
    threads: int | None = THREADS,
    long_side: int | None = LONG_SIDE,
    flip: bool = FLIP,
    scales: str = SCALES,
    accurate: bool = ACCURATE,
    tile: bool = TILE,
    zoom: bool = ZOOM,
    clean: int | None = CLEAN,
    max_frames: int | None = typer.Option(None, help="Stop videos/webcams after N frames."),
    smooth: bool = typer.Option(
        True,
        "--smooth/--no-smooth",
        help="Smooth videos and webcams over time: less flicker (images are never affected).",
    ),
    smooth_strength: float | None = typer.Option(
        None,
        "--smooth-strength",
        help="Weight of the past frames in smoothing, 0 to 0.95 (default 0.9); only uncertain "
        "pixels that agree with the past are blended.",
    ),
    engine: str = ENGINE,
    address: str | None = ADDRESS,
    workers: int | None = WORKERS,
) -> None:
    """Segment images, folders, videos or a webcam; results are saved under --out.

    Ctrl-C (or SIGTERM) stops after the current input (a second one at once): finished results
    (and a webcam's video so far) are kept, summary.json lists them, and the exit code is 128 +
    the signal number. Videos and webcams are smoothed over time unless --no-smooth.
    """
    from hiseg.runner import Saver, expand_sources, run, stop_on_signals
    from hiseg.video import quiet_video_backends

    texts = list(inputs or []) + ([source] if source is not None else [])
    if not texts:
        raise fail("nothing to segment: give images, folders, globs, videos or --source 0")
    at_least("--max-frames", max_frames, 1)
    if smooth_strength is not None:
        in_range("--smooth-strength", smooth_strength, 0.0, 0.95)
    options = load_options(
        model, backend, threads, long_side, flip, scales, accurate, clean, tile, zoom
    )
    if check_engine(engine, address, workers) == "ray":
        predict_with_ray(texts, out, levels, summary, options, address, workers)
        return
    found = expand_sources(texts)
    quiet_video_backends()  # hiseg's line names a video that fails, not FFmpeg's before it
    if out.resolve() in {folder.resolve() for folder in found.folders}:
        raise fail(f"--out {out} is also an input folder: its results would become inputs")
    saver = Saver(out, levels=levels, summary=summary)
    predictor = load_predictor(options)
    sources = found.sources
    smoother = None
    if smooth:
        from hiseg.video import DEFAULT_STRENGTH, TemporalSmoother

        strength = DEFAULT_STRENGTH if smooth_strength is None else smooth_strength
        smoother = TemporalSmoother(strength)
    n_inputs = len(sources) + len(found.failed)  # paths that led to nothing count as failed inputs
    with stop_on_signals() as stop, progress_bar(len(sources), "segmenting") as advance:

        def on_frame(n: int, count: int) -> None:
            shown = min(count, max_frames or count)
            advance(0, f"segmenting: frame {n}" + (f"/{shown}" if shown else ""))

        report = run(
            predictor,
            sources,
            saver,
            max_frames,
            lambda: advance(1, "segmenting"),
            on_frame,
            stop=stop,
            smoother=smoother,
        )
        report.failed[:0] = found.failed
        report.done += len(found.failed)
        summary_path = saver.write_summary(report, n_inputs)
    n_ok = report.done - len(report.failed)
    if found.repeats:
        console.print(f"note: {found.repeats} repeated path(s) to an input were skipped")
    finish_run(report, n_ok, n_inputs, out, saver.renamed, {"summary": summary_path})


def finish_run(
    report: RunReport,
    n_ok: int,
    n_inputs: int,
    out: Path,
    renamed: Sequence[tuple[str, str]],
    files: dict[str, Path | None],
    detail: str = "",
) -> None:
    """The end of a predict run, local or on Ray: the per-image tables of a short run, the
    count, the run's files (summary.json, failed.csv), renamed outputs, each failure, and the
    exit code (128 + signal when stopped, 1 when an input failed)."""
    if len(report.summaries) <= SUMMARY_TABLES_UP_TO:
        for item in report.summaries:
            print_summary(item)
    done = f"segmented {n_ok} of {n_inputs} input(s){detail}"
    if report.stopped:
        done = f"stopped by {signal.Signals(report.stopped).name}: {done}"
    saved = f"results saved to {out}/" if n_ok else "nothing saved"
    console.print(f"{done}; {saved}", highlight=False)
    for what, path in files.items():
        if path:
            console.print(f"{what}: {path}", highlight=False)
    if renamed:
        shown = ", ".join(f"{a} -> {b}" for a, b in renamed[:3])
        more = ", ..." if len(renamed) > 3 else ""
        err_console.print(
            f"note: {len(renamed)} name(s) already taken in {out}/ (existing files are "
            f"never replaced): {shown}{more}",
            highlight=False,
        )
    for name, reason in report.failed:
        err_console.print(f"[red]✗[/] {escape(name)}: {escape(reason)}", highlight=False)
    if report.stopped:
        raise typer.Exit(128 + report.stopped)
    if report.failed:
        raise typer.Exit(1)


# -- pseudo-label -----------------------------------------------------------------------------


@app.command("pseudo-label")
def pseudo_label_command(
    model: list[str] | None = typer.Option(
        None,
        "--model",
        "-m",
        help=f"The teacher: a bundled model ({BUNDLED}), .onnx or .ckpt; repeat for an ensemble.",
    ),
    data: Path = typer.Option(..., "--data", help="Folder of unlabelled photos (read in place)."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder for the labels and manifest.json; rerun to resume."
    ),
    mode: str = typer.Option(
        "soft", help="soft: uint8 leaf probabilities (.npz); hard: label PNG, uncertain = ignore."
    ),
    threshold: float = typer.Option(
        0.9, help="A pixel is confident when its highest leaf probability reaches this (0-1]."
    ),
    limit: int | None = typer.Option(None, help="Label only the first N photos."),
    backend: str = BACKEND,
    threads: int | None = THREADS,
    long_side: int | None = LONG_SIDE,
    flip: bool = FLIP,
    scales: str = SCALES,
    accurate: bool = ACCURATE,
    clean: int | None = CLEAN,
) -> None:
    """Label unlabelled photos with a teacher (one model or an ensemble, with flip/scales TTA)
    for semi-supervised training (data.pseudo in a training config). Running the same command
    again skips the photos already done. Exit 1 if any photo failed."""
    from hiseg.pseudo import MODES, list_photos, pseudo_label

    if not model:
        raise fail("give the teacher with -m (repeat for an ensemble)")
    if mode not in MODES:
        raise fail(f"--mode must be one of {', '.join(MODES)}, not '{mode}'")
    if not 0 < threshold <= 1:
        raise fail(f"--threshold must be above 0 and at most 1, not {threshold:g}")
    at_least("--limit", limit, 1)
    options = load_options(model, backend, threads, long_side, flip, scales, accurate, clean)
    predictor = load_predictor(options)
    total = len(list_photos(data)[0]) if data.is_dir() else 0
    with progress_bar(min(total, limit or total), "pseudo-labelling") as advance:
        report = pseudo_label(predictor, data, out, mode, threshold, limit, advance)
    console.print(
        f"labelled {report.labelled} photo(s), {report.skipped} already done, "
        f"{len(report.failed)} failed; manifest: {report.manifest}",
        highlight=False,
    )
    if report.mean_confident is not None:
        console.print(
            f"confident pixels (highest leaf probability >= {threshold:g}): "
            f"{report.mean_confident:.1%} per photo on average",
            highlight=False,
        )
    for name, reason in report.failed:
        err_console.print(f"[red]✗[/] {escape(name)}: {escape(reason)}", highlight=False)
    if report.failed:
        raise typer.Exit(1)


# -- export / bench ---------------------------------------------------------------------------


@app.command("export")
def export_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint from `hiseg train` (.ckpt)."),
    out: Path | None = typer.Option(None, "--out", help="ONNX file (default: CKPT as .onnx)."),
    int8: bool = typer.Option(
        False, "--int8", help="Also write OUT.int8.onnx if it costs <= 1 mIoU point per level."
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Dataset: check the export on real images; needed by --int8."
    ),
    split: str = typer.Option("val", help="Split to check and score on."),
    limit: int | None = typer.Option(None, help="Score int8 on the first N images only."),
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    clean: int = typer.Option(
        0, "--clean", help="Store this island / hole clean-up size as the model's default."
    ),
    long_side: int | None = typer.Option(
        None,
        "--long-side",
        help="Store this inference long side (px) as the model's default (default: the "
        "checkpoint's); int8 is calibrated and scored at it.",
    ),
) -> None:
    """Export a checkpoint to ONNX for the torch-free runtime; optionally an int8 copy."""
    if int8 and data is None:
        raise fail("--int8 needs --data: int8 is calibrated and scored on real images")
    at_least("--limit", limit, 1)
    at_least("--clean", clean, 0)
    check_long_side("--long-side", long_side)
    out = out or checkpoint.with_suffix(".onnx")
    if out.resolve() == checkpoint.resolve():  # a checkpoint named .onnx, or --out CKPT
        raise fail(f"--out {out}: is the checkpoint itself; write the ONNX file elsewhere")
    if out.suffix.lower() != ".onnx":  # a photo or a document would be replaced by a model
        raise fail(f"--out {out}: an ONNX model's name ends in .onnx")
    writable_file(out, "--out")
    try:  # the data before the export: a wrong --data or --split writes nothing
        val = open_dataset(data, split, format) if data is not None else None
    except (DatasetError, TreeError) as err:
        raise fail(str(err)) from None
    try:
        from hiseg.export import (
            VALIDATION_IMAGES,
            export_int8_if_close,
            export_onnx,
            sample_images,
            validate_export,
        )
    except ImportError as err:
        raise fail(f"export needs the train extra: pip install 'hiseg[train]' ({err})") from None
    try:
        export_onnx(checkpoint, out, clean=clean, long_side=long_side)
    except (OSError, ValueError) as err:
        raise fail(str(err)) from None
    console.print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB, fp32)", highlight=False)
    if val is None or data is None:
        return
    try:
        calibration_split = "train" if "train" in dataset_splits(data, format) else split
        calibration = open_dataset(data, calibration_split, format)
        check = validate_export(checkpoint, out, sample_images(val, VALIDATION_IMAGES))
        console.print(
            f"ONNX Runtime vs torch on {check['images']} {split} images: argmax agrees on "
            f"{check['argmax_agreement']:.4%} of pixels, "
            f"max |logit diff| {check['max_abs_diff']:.2g}",
            highlight=False,
        )
        if not check["ok"]:
            raise fail(f"{out}: the export disagrees with the checkpoint; do not ship it", code=1)
        if not int8:
            return
        with console.status(f"int8: calibrating on {calibration_split}, scoring on {split} ..."):
            report = export_int8_if_close(out, val, sample_images(calibration), limit=limit)
    except (DatasetError, TreeError, OSError, ValueError) as err:  # ModelError, image errors
        raise fail(str(err)) from None
    table = Table(title=f"mIoU on {report['images']} {split} images (background excluded)")
    for column in ("level", "fp32", "int8", "drop"):
        table.add_column(column, justify="left" if column == "level" else "right")
    for k, drop in report["drop"].items():
        fp32, q = report["fp32"][k], report["int8"][k]
        table.add_row(k, format_score(fp32), format_score(q), f"{drop:+.4f}")
    console.print(table)
    size = f"{report['int8_mb']:.1f} MB vs {report['fp32_mb']:.1f} MB"
    if report["kept"]:
        console.print(f"saved {report['path']} ({size}, int8)", highlight=False)
    else:
        console.print(
            f"[yellow]int8 not kept[/]: a level lost more than {report['max_drop']:.2f} mIoU "
            f"({size})",
            highlight=False,
        )


@app.command("bench")
def bench_command(
    model: list[Path] = typer.Argument(
        ...,
        help="Model files (.onnx, .ckpt) or bundled model names; existing x.onnx / x.int8.onnx "
        "beside a file join.",
    ),
    sizes: str | None = typer.Option(
        None, help="Comma-separated long sides in pixels (default: each model's own)."
    ),
    threads: int = typer.Option(2, help="Threads for every runtime."),
    runs: int = typer.Option(30, help="Timed runs per row."),
    warmup: int = typer.Option(5, help="Untimed runs before them."),
    out: Path = typer.Option(Path("runs/bench.md"), help="Markdown table to write."),
    image: Path | None = typer.Option(
        None,
        help="Photo for the predict rows (default: a random 500x375 photo, the worst case for "
        "decoding: every pixel borders another label).",
    ),
) -> None:
    """Latency (median, p90) and images/s of the network and of predict, per runtime."""
    from hiseg.bench import benchmark, write_markdown
    from hiseg.images import as_rgb

    try:
        long_sides = [int(s) for s in sizes.split(",")] if sizes else None
    except ValueError:
        raise fail(f"--sizes takes comma-separated integers, not '{sizes}'") from None
    for long_side in long_sides or []:
        check_long_side("--sizes", long_side)
    threads = cpu_threads(threads) or 1
    at_least("--runs", runs, 1)
    at_least("--warmup", warmup, 0)
    writable_file(out, "--out")
    if image is not None and out.resolve() == image.resolve():
        raise fail(f"--out {out}: is the --image being timed; write the table elsewhere")
    photo = as_rgb(image)[0] if image is not None else None
    rows = benchmark(model, long_sides, threads=threads, runs=runs, warmup=warmup, image=photo)
    table = Table(title=f"batch 1, {threads} thread(s), {runs} runs")
    text = ("model", "runtime", "precision", "task", "input")
    numbers = ("median_ms", "p90_ms", "images_per_s")
    for column in text:
        table.add_column(column)
    for column in ("median ms", "p90 ms", "images/s"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(*(str(r[k]) for k in text), *(f"{r[k]:.1f}" for k in numbers))
    console.print(table)
    command = (
        f"hiseg bench {' '.join(map(str, model))}{f' --sizes {sizes}' if sizes else ''} "
        f"--threads {threads} --runs {runs} --warmup {warmup} --out {out}"
        + (f" --image {image}" if image else "")
    )
    console.print(f"saved {write_markdown(rows, out, command)}", highlight=False)


# -- serve ------------------------------------------------------------------------------------


@app.command("serve")
def serve_command(
    model: list[str] | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Model to serve (name or .onnx); repeat for several (default: "
        "every bundled model, the first is the default).",
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: str | None = typer.Option(
        None, envvar="HISEG_API_KEY", help="Key required on every /v1 call (X-API-Key header)."
    ),
    cors: list[str] | None = typer.Option(
        None, "--cors", help="Origin allowed to call from a browser; repeatable (default: none)."
    ),
    workers: int | None = typer.Option(
        None, help="Inferences at once, sharing the cores (default: one per two cores)."
    ),
    queue: int = typer.Option(8, help="Requests waiting beyond the workers; more get 503."),
    timeout: float = typer.Option(60.0, help="Seconds per request before 504."),
    max_upload_mb: float = typer.Option(20.0, help="Largest upload in MB (413 above)."),
    max_pixels: int = typer.Option(40_000_000, help="Largest image in pixels (413 above)."),
    long_side: int | None = LONG_SIDE,
) -> None:
    """Serve the REST API (/v1/segment, /v1/models, /healthz, /docs) and the web page at /."""
    try:
        from hiseg.service import Settings, serve
    except ImportError as err:
        raise fail(f"hiseg serve needs pip install 'hiseg[serve]' ({err})") from None

    at_least("--queue", queue, 0)
    at_least("--max-pixels", max_pixels, 1)
    in_range("--port", port, 0, 65535)
    in_range("--timeout", timeout, 0.1, 3600)
    in_range("--max-upload-mb", max_upload_mb, 0.001, 1024)
    settings = Settings(
        api_key=api_key or None,
        cors=list(cors or []),
        queue=queue,
        timeout=timeout,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_pixels=max_pixels,
        long_side=check_long_side("--long-side", long_side),
    )
    if model:
        settings.models = list(model)
    if workers is not None:
        settings.workers = cpu_threads(workers, "--workers") or 1
    serve(settings, host, port)
