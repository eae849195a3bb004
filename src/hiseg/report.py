"""Evaluation reports: a markdown page with pictures, the score JSON, and MLflow logging.

``write_report`` turns an :class:`~hiseg.evaluation.EvalResult` into files a reviewer reads
without running anything: per-level IoU tables, a row-normalised confusion heatmap per level, IoU
by person size (table and bar chart), and a gallery of the worst images (image | ground truth |
prediction). Plots use matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from hiseg.evaluation import EvalResult, Example
from hiseg.files import json_writer, publish
from hiseg.metrics import format_score
from hiseg.taxonomy import BACKGROUND, Tree
from hiseg.visualize import overlay

SCORES_FILE = "scores.json"
REPORT_FILE = "report.md"
BY_SIZE_FILE = "by_size.png"
GALLERY_FILE = "worst.png"
#: The gallery shows at most this many of the worst images (the table lists them all).
GALLERY_ROWS = 12


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, dpi: int) -> Path:
    """``fig`` as ``path`` (PNG), written whole or not at all, and closed."""
    try:
        publish(path, lambda tmp: fig.savefig(tmp, dpi=dpi))
    finally:
        _pyplot().close(fig)
    return path


def _unit_rgb(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """A 0..255 colour as matplotlib's 0..1 triple."""
    r, g, b = rgb
    return (r / 255, g / 255, b / 255)


def confusion_file(k: int) -> str:
    return f"confusion_level{k}.png"


def plot_confusion(matrix: np.ndarray, names: list[str], title: str, path: Path) -> Path:
    """Heatmap of a confusion matrix with each ground-truth row normalised to 1."""
    plt = _pyplot()
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    side = 1.2 + 0.75 * len(names)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for (i, j), v in np.ndenumerate(norm):
        if v >= 0.005:
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if v > 0.5 else "black",
            )
    ax.set(xlabel="prediction", ylabel="ground truth", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def plot_by_size(scores: dict[str, Any], path: Path) -> Path:
    """Grouped bars: mIoU of each level for each person-size bucket."""
    plt = _pyplot()
    buckets = scores["by_size"]
    levels = list(scores["levels"])
    x = np.arange(len(buckets))
    width = 0.8 / len(levels)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(buckets), 3.8))
    for i, k in enumerate(levels):
        values = [b["levels"][k]["miou"] for b in buckets.values()]
        ax.bar(
            x + (i - (len(levels) - 1) / 2) * width,
            [v or 0 for v in values],
            width,
            label=f"level {k}",
        )
    ax.set_xticks(x, [f"{name}\n({b['regions']} people)" for name, b in buckets.items()])
    ax.set(ylim=(0, 1), ylabel="mIoU (background excluded)", xlabel="person size (% of image)")
    ax.set_title("IoU by person size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def plot_gallery(examples: list[Example], tree: Tree, path: Path) -> Path:
    """One row per image: the photo, the ground truth and the prediction, titled id and mIoU."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    fig, axes = plt.subplots(len(examples), 3, figsize=(10, 2.9 * len(examples)), squeeze=False)
    for row, ex in zip(axes, examples, strict=True):
        panels = (ex.image, overlay(ex.image, ex.target, tree), overlay(ex.image, ex.pred, tree))
        for ax, panel, name in zip(
            row, panels, ("image", "ground truth", "prediction"), strict=True
        ):
            ax.imshow(panel)
            ax.set_axis_off()
            ax.set_title(f"{ex.id}  mIoU {ex.miou:.3f}" if name == "image" else name, fontsize=9)
    leaves = [leaf.name for leaf in tree.leaves if leaf.name != BACKGROUND]
    handles = [Patch(color=_unit_rgb(tree.color(n)), label=n) for n in leaves]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.9 * len(examples))))
    return _save(fig, path, dpi=90)


def _markdown(scores: dict[str, Any], result: EvalResult) -> str:
    tree = result.tree
    lines = [
        f"# Evaluation: {tree.name}",
        "",
        f"{scores['n_images']} images, {scores['n_pixels']} labelled pixels. "
        f"Pixel accuracy {format_score(scores['pixel_accuracy'])}; "
        f"mIoU over all leaves with background {format_score(scores['miou_all_with_background'])}.",
        "",
        "## IoU per level",
        "",
        "mIoU is the mean over the non-background nodes; one confusion matrix over the split.",
    ]
    for k, level in scores["levels"].items():
        lines += [
            "",
            f"### Level {k}: mIoU {format_score(level['miou'])}",
            "",
            "| node | IoU | Dice |",
        ]
        lines.append("| --- | ---: | ---: |")
        lines += [
            f"| {n} | {format_score(iou)} | {format_score(level['dice'][n])} |"
            for n, iou in level["iou"].items()
        ]
        lines += ["", f"![confusion level {k}]({confusion_file(int(k))})"]
    levels = list(scores["levels"])
    lines += [
        "",
        "## IoU by person size",
        "",
        "Each ground-truth person (connected body region) falls in a bucket by the share of the "
        "image it covers. A bucket is scored on its people's pixels plus the pixels predicted as "
        "body where the ground truth is background and whose nearest person is in the bucket.",
        "",
        "| size | people | images | " + " | ".join(f"mIoU{k}" for k in levels) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in levels) + " |",
    ]
    for name, b in scores["by_size"].items():
        cells = " | ".join(format_score(b["levels"][k]["miou"]) for k in levels)
        lines.append(f"| {name} | {b['regions']} | {b['n_images']} | {cells} |")
    lines += ["", f"![IoU by person size]({BY_SIZE_FILE})"]
    if result.worst:
        lines += ["", f"## The {len(result.worst)} worst images (finest-level mIoU)", ""]
        lines += ["| id | mIoU |", "| --- | ---: |"]
        lines += [f"| {e.id} | {e.miou:.4f} |" for e in result.worst]
        lines += ["", f"![the worst {GALLERY_ROWS} images]({GALLERY_FILE})"]
    return "\n".join(lines) + "\n"


def write_report(result: EvalResult, out_dir: str | Path) -> Path:
    """Write ``report.md``, ``scores.json`` and the PNGs into ``out_dir``; return the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tree = result.tree
    scores = result.scores()
    publish(out / SCORES_FILE, json_writer(scores))
    for k in range(tree.num_levels):
        title = f"level {k} (rows: ground truth, normalised)"
        plot_confusion(
            result.total.level_matrix(k), tree.level(k).names, title, out / confusion_file(k)
        )
    plot_by_size(scores, out / BY_SIZE_FILE)
    if result.worst:
        plot_gallery(result.worst[:GALLERY_ROWS], tree, out / GALLERY_FILE)
    path = out / REPORT_FILE
    text = _markdown(scores, result)
    publish(path, lambda tmp: tmp.write_text(text))
    return path


def _metric_tag(bucket: str) -> str:
    """A bucket name as an MLflow-safe metric name part: '<1%' -> 'lt1pct'."""
    return bucket.replace("<", "lt").replace(">", "gt").replace("%", "pct")


def flat_metrics(scores: dict[str, Any]) -> dict[str, float]:
    """The scalar scores under MLflow names like the training's (``eval/miou2``)."""
    out = {
        "eval/pixel_accuracy": scores["pixel_accuracy"],
        "eval/miou_all_with_background": scores["miou_all_with_background"],
    }
    for k, level in scores["levels"].items():
        out[f"eval/miou{k}"] = level["miou"]
        out.update({f"eval/iou{k}/{n}": v for n, v in level["iou"].items()})
    for name, bucket in scores.get("by_size", {}).items():
        for k, level in bucket["levels"].items():
            out[f"eval/size_{_metric_tag(name)}/miou{k}"] = level["miou"]
    return {key: float(v) for key, v in out.items() if v is not None}


def log_report_to_mlflow(
    out_dir: str | Path, scores: dict[str, Any], uri: str, experiment: str = "hiseg"
) -> str:
    """Log the scalar scores and every report file (as artifacts) to a new MLflow run."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"eval-{Path(out_dir).name}") as run:
        mlflow.log_metrics(flat_metrics(scores))
        mlflow.log_artifacts(str(out_dir), artifact_path="eval")
    return run.info.run_id


def plot_history(history_csv: str | Path, path: str | Path, title: str | None = None) -> Path:
    """Val mIoU per level per epoch from a run's ``history.csv`` (written by ``hiseg train``),
    titled by ``title`` or else the run's folder name."""
    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [int(r["epoch"]) + 1 for r in rows]
    for key in sorted(k for k in rows[0] if k.startswith("miou")):
        ax.plot(epochs, [float(r[key]) for r in rows], marker="o", label=f"mIoU{key[4:]}")
    title = title or Path(history_csv).parent.name
    ax.set(xlabel="epoch", ylabel="val mIoU (background excluded)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    return _save(fig, path, dpi=110)
