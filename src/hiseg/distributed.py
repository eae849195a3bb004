"""Prediction and evaluation past one process, on Ray Data (``--engine ray``).

Ray is an extra (``pip install 'hiseg[ray]'``) and is imported only here, only when asked for.
The driver lists the inputs (command-line sources, and listing files read by ``ray.data``);
``map_batches`` hands batches of paths to a pool of actors, each holding one loaded predictor
whose ONNX Runtime uses ``threads`` cores (actors x threads = the cores Ray may use). Workers
read images with hiseg's strict reader and write results themselves with the local runner's
:class:`~hiseg.runner.Saver` (exclusive names, atomic renames), so ``--out`` must be a folder every
worker sees (the local disk of a one-machine cluster, or a shared file system).

A bad image never stops the job: it comes back as a failed row and ends in ``failed.csv``. Each
worker appends every finished input to ``<out>/.hiseg-done/<worker>.jsonl`` after its files are in
place; a later run over the same ``--out`` skips the inputs listed there whose outputs all still
exist, so a crashed or stopped job resumes where it was.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import pickle
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hiseg.errors import HisegError
from hiseg.files import OutputError, publish
from hiseg.images import ImageReadError
from hiseg.runner import Inputs, RunReport, Saver, expand_sources

if TYPE_CHECKING:
    from hiseg.data import Dataset
    from hiseg.evaluation import EvalResult

#: Listing files: one image path per line (``.txt``), or a ``path`` column (``.csv``,
#: ``.parquet``; a CSV without that header is read by its first column).
LISTING_SUFFIXES = (".txt", ".csv", ".parquet")
#: Folder of the per-worker records of finished inputs, inside ``--out``.
DONE_FOLDER = ".hiseg-done"
#: Paths per ``map_batches`` call: small enough to spread a few hundred images over the actors.
BATCH_SIZE = 4


class EngineError(HisegError):
    """The distributed engine cannot run (Ray missing, no cluster at the address)."""


def require_ray() -> Any:
    """The ``ray`` module with ``ray.data``, or one line naming the extra to install."""
    try:
        import ray
        import ray.data  # the engine needs Ray Data, not only Ray core
    except ImportError as err:
        raise EngineError(
            f"--engine ray needs Ray Data: pip install 'hiseg[ray]' ({err})"
        ) from None
    return ray


def connect(address: str | None = None) -> Any:
    """Ray, joined to the cluster at ``address`` (``auto``, ``ray://host:port``), or to a new
    local one when ``address`` is None; a session that already called ``ray.init`` is kept."""
    ray = require_ray()
    if not ray.is_initialized():
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = address or "a new local cluster"
            raise EngineError(f"--address {where}: cannot start or join Ray ({err})") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # hiseg shows its own
    context.print_on_execution_start = False
    return ray


def plan_actors(cpus: int, workers: int | None, threads: int | None) -> tuple[int, int]:
    """(actors, ONNX Runtime threads per actor) with actors x threads = ``cpus``: by default
    one single-thread actor per core, which keeps every core busy on reading and clean-up too."""
    cpus = max(1, cpus)
    if threads is None:
        threads = max(1, cpus // workers) if workers else 1
    return workers or max(1, cpus // threads), threads


# -- predict ------------------------------------------------------------------------------------


def read_done(out: Path) -> set[str]:
    """Inputs whose outputs a past run recorded and that all still exist (absolute paths)."""
    done: set[str] = set()
    folder = out / DONE_FOLDER
    if not folder.is_dir():
        return done
    for record in sorted(folder.glob("*.jsonl")):
        text = record.read_text(encoding="utf-8", errors="replace")
        for line in text.split("\n")[:-1]:  # a line cut by a crash has no newline: not done
            try:
                path, *outputs = json.loads(line)
            except (ValueError, TypeError):  # not a record (damaged): its input runs again
                continue
            names = [path, *outputs]
            if not all(isinstance(name, str) for name in names):
                continue
            if outputs and all((out / name).is_file() for name in outputs):
                done.add(path)
    return done


class WorkerSaver(Saver):
    """A worker's :class:`Saver`: the run's ``summary.json`` is the driver's, claimed before the
    job starts, so workers never claim one of their own."""

    def summary_file(self) -> Path | None:
        return None


class Segmenter:
    """A Ray Data actor: one predictor for its lifetime, paths in, one row per input out."""

    def __init__(self, load_options: dict[str, Any], out: str, levels: bool, summary: bool):
        from hiseg.predictor import load

        self.predictor = load(**load_options)
        self.saver = WorkerSaver(Path(out), levels=levels, summary=summary)
        self.done = read_done(self.saver.out)
        record = self.saver.out / DONE_FOLDER / f"{uuid.uuid4().hex}.jsonl"
        record.parent.mkdir(exist_ok=True)
        self.record = record.open("a", encoding="utf-8")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        given = [str(p) for p in batch["path"]]
        files = [str(p) for p in batch["file"]]
        rows: dict[str, list[str]] = {k: [] for k in ("path", "status", "reason", "summary")}
        todo = [i for i, file in enumerate(files) if file not in self.done]
        results = dict(zip(todo, self._predict([files[i] for i in todo]), strict=True))
        for i, (path, file) in enumerate(zip(given, files, strict=True)):
            status, reason, summary = self._finish(path, file, results.get(i))
            rows["path"].append(path)
            rows["status"].append(status)
            rows["reason"].append(reason)
            rows["summary"].append(summary)
        return rows

    def _predict(self, files: list[str]) -> list[Any]:
        """Results or errors; a batch too large for memory is retried one image at a time, so
        only an image too large alone fails."""
        try:
            return self.predictor.predict_batch(files)
        except MemoryError:
            if len(files) == 1:
                return [HisegError("out of memory while segmenting")]
            return [item for file in files for item in self._predict([file])]

    def _finish(self, path: str, file: str, result: Any) -> tuple[str, str, str]:
        """(status, failure reason, JSON of the image's summary) of one input, saving it."""
        if result is None:
            return "skipped", "", ""
        if isinstance(result, ImageReadError):
            return "failed", result.reason, ""
        if isinstance(result, HisegError):
            return "failed", str(result), ""
        try:
            paths = self.saver.save(result, Path(path).stem)
        except (HisegError, OSError) as err:
            return "failed", f"cannot save the results ({err})", ""
        names = [p.name for p in paths]
        self.record.write(json.dumps([file, *names]) + "\n")
        self.record.flush()  # in the file before the row is reported: a crash later keeps it done
        summary = {**result.summary(), "image": path, "outputs": names}
        return "done", "", json.dumps(summary)


@dataclass
class RayRun:
    """What a Ray prediction job did, for the same printout as the local runner's."""

    report: RunReport
    inputs: int  # inputs listed (command line and listings), skipped ones included
    skipped: int = 0  # finished by an earlier run over the same --out
    failed_csv: Path | None = None
    renamed: list[tuple[str, str]] = field(default_factory=list)


def split_listings(texts: list[str]) -> tuple[list[Path], list[str]]:
    """Listing files (by suffix, existing files only) apart from the other sources."""
    listings = [Path(t) for t in texts if Path(t).suffix.lower() in LISTING_SUFFIXES]
    listings = [p for p in listings if p.is_file()]
    return listings, [t for t in texts if Path(t) not in listings]


def read_listing(ray: Any, listing: Path) -> Any:
    """A ``ray.data`` dataset of the listing's paths (column ``path``), each also made absolute
    against the listing's folder (column ``file``) so every worker finds it."""
    suffix = listing.suffix.lower()
    if suffix == ".txt":
        data = ray.data.read_text(str(listing)).rename_columns({"text": "path"})
    elif suffix == ".csv":
        data = ray.data.read_csv(str(listing))
    else:
        data = ray.data.read_parquet(str(listing))
    columns = data.columns()
    if "path" not in columns:
        if suffix == ".parquet" or not columns:
            raise EngineError(f"{listing}: no 'path' column (columns: {columns})")
        data = data.rename_columns({columns[0]: "path"})
    base = str(listing.resolve().parent)

    def absolute(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p).strip() for p in batch["path"]]
        files = [os.path.join(base, os.path.expanduser(p)) for p in paths]
        return {"path": np.array(paths, dtype=object), "file": np.array(files, dtype=object)}

    # Read to the end before the actors start: they take every core, and reading tasks
    # waiting for one behind them would never run.
    return data.select_columns(["path"]).map_batches(absolute, batch_format="numpy").materialize()


def list_inputs(ray: Any, texts: list[str]) -> tuple[Any, Inputs]:
    """The job's dataset of (path, file) rows (None when empty), and the command-line
    sources' :class:`Inputs`, with the videos and webcams among them refused as failures."""
    listings, others = split_listings(texts)
    found = expand_sources(others) if others else Inputs()
    images = []
    for source in found.sources:
        if source.kind == "image":
            images.append({"path": str(source), "file": str(Path(str(source)).resolve())})
        else:
            reason = f"the ray engine segments images, not a {source.kind}"
            found.failed.append((str(source), reason))
    parts = [read_listing(ray, listing) for listing in listings]
    if images:
        parts.append(ray.data.from_items(images))
    if not parts:
        return None, found
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]), found


def predict_on_ray(
    texts: list[str],
    saver: Saver,
    load_options: dict[str, Any],
    address: str | None = None,
    workers: int | None = None,
    on_image: Callable[[], None] | None = None,
) -> RayRun:
    """Segment ``texts`` (files, folders, globs, listing files) on Ray and save the results
    under ``saver.out`` (summary.json by the driver, everything else by the workers).

    ``load_options`` are :func:`hiseg.predictor.load`'s arguments; its ``threads`` (None: from
    ``workers``) sets ONNX Runtime's threads and each actor's CPUs. Failed inputs are collected
    in the report and in ``failed.csv``; inputs finished by an earlier run are skipped.
    """
    ray = connect(address)
    data, found = list_inputs(ray, texts)
    if saver.out.resolve() in {folder.resolve() for folder in found.folders}:
        raise OutputError(f"--out {saver.out} is also an input folder: its results would be inputs")
    report = RunReport(failed=list(found.failed))
    run = RayRun(report, inputs=sum(s.kind != "image" for s in found.sources))
    saver.summary_file()  # the run's summary.json before any input's names, as the local runner
    if data is not None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors, threads = plan_actors(cpus, workers, load_options.get("threads"))
        rows = data.map_batches(
            Segmenter,
            batch_size=BATCH_SIZE,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=min(threads, cpus / actors),  # more actors than cores share them
            fn_constructor_kwargs={
                "load_options": {**load_options, "threads": threads},
                "out": str(saver.out),
                "levels": saver.levels,
                "summary": saver.summary,
            },
        )
        try:
            for row in rows.iter_rows():
                _collect(run, row)
                if on_image:
                    on_image()
        except KeyboardInterrupt:
            report.stopped = signal.SIGINT
    if report.failed:
        (run.failed_csv,) = saver.claim("failed", lambda s: [f"{s}.csv"])
        publish(run.failed_csv, _csv_writer(report.failed))
    return run


def _collect(run: RayRun, row: dict[str, Any]) -> None:
    run.inputs += 1
    if row["status"] == "skipped":
        run.skipped += 1
        return
    run.report.done += 1
    if row["status"] == "failed":
        run.report.failed.append((row["path"], row["reason"]))
        return
    summary = json.loads(row["summary"])
    outputs = summary["outputs"]
    run.report.saved += [Path(name) for name in outputs]
    run.report.summaries.append(summary)
    wanted, given = Path(row["path"]).stem, Path(outputs[0]).stem
    if wanted != given:
        run.renamed.append((wanted, given))


def _csv_writer(failed: list[tuple[str, str]]) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "reason"])
            writer.writerows(failed)

    return write


# -- evaluate -----------------------------------------------------------------------------------


class Evaluator:
    """A Ray Data actor scoring batches of sample indices of one dataset split."""

    def __init__(self, load_options: dict[str, Any], dataset: Dataset, options: dict[str, Any]):
        from hiseg.predictor import load

        self.predictor = load(**load_options)
        self.dataset = dataset
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        """One row: the batch's pickled :class:`EvalResult`, or the error that stopped it (Ray
        hands a worker's exception back as text only, so hiseg's errors travel as a row)."""
        from hiseg.evaluation import EvaluationError, evaluate_model

        part = copy.copy(self.dataset)
        part.samples = [self.dataset.samples[int(i)] for i in batch["index"]]
        try:
            result, error = pickle.dumps(evaluate_model(self.predictor, part, **self.options)), ""
        except EvaluationError as err:
            result, error = b"", str(err)
        return {"result": [result], "error": [error], "n": [len(part.samples)]}


def merge_results(parts: list[EvalResult], order: list[str], keep_worst: int) -> EvalResult:
    """One :class:`EvalResult` of several disjoint parts of a split, equal to scoring the split in
    one process: matrices merged, region counts added, per-image scores and the worst images put
    back in the split's order (``order``: its sample ids)."""
    from hiseg.evaluation import EvalResult

    first = parts[0]
    merged = EvalResult(
        total=copy.deepcopy(first.total),
        by_size=copy.deepcopy(first.by_size),
        regions=dict(first.regions),
    )
    for part in parts[1:]:
        merged.total.merge(part.total)
        for name, matrix in part.by_size.items():
            merged.by_size[name].merge(matrix)
        for name, count in part.regions.items():
            merged.regions[name] += count
    position = {sample_id: i for i, sample_id in enumerate(order)}
    scored = {k: v for part in parts for k, v in part.image_miou.items()}
    merged.image_miou = {k: scored[k] for k in sorted(scored, key=position.__getitem__)}
    # evaluate_model keeps the later of tied images, and lists the kept ones in split order
    worst = [e for part in parts for e in part.worst]
    kept = sorted(worst, key=lambda e: (e.miou, -position[e.id]))[:keep_worst]
    merged.worst = sorted(kept, key=lambda e: (e.miou, position[e.id]))
    return merged


def evaluate_on_ray(
    dataset: Dataset,
    load_options: dict[str, Any],
    limit: int | None = None,
    keep_worst: int = 8,
    save_dir: Path | None = None,
    address: str | None = None,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """:func:`hiseg.evaluation.evaluate_model` over Ray actors: each scores batches of the split,
    the driver merges their confusion matrices (:meth:`ConfusionMatrix.merge`)."""
    ray = connect(address)
    from hiseg.evaluation import EvaluationError

    n = min(limit or len(dataset), len(dataset))
    if n == 0:
        raise EvaluationError(f"{dataset.root}: split '{dataset.split}' has no samples")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors, threads = plan_actors(cpus, workers, load_options.get("threads"))
    options = {"keep_worst": keep_worst, "save_dir": save_dir}
    rows = ray.data.from_items([{"index": i} for i in range(n)]).map_batches(
        Evaluator,
        batch_size=BATCH_SIZE,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=min(threads, cpus / actors),
        fn_constructor_kwargs={
            "load_options": {**load_options, "threads": threads},
            "dataset": dataset,
            "options": options,
        },
    )
    parts = []
    for row in rows.iter_rows():
        if row["error"]:
            raise EvaluationError(row["error"])
        parts.append(pickle.loads(row["result"]))
        if progress:
            progress(int(row["n"]))
    return merge_results(parts, [s.id for s in dataset.samples[:n]], keep_worst)
