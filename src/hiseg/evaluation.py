"""Scoring predictions against a dataset split with the hierarchical metrics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hiseg.data import Dataset, Sample, parallel_map
from hiseg.images import ImageReadError, read_mask
from hiseg.metrics import ConfusionMatrix


class EvaluationError(ValueError):
    """Predictions cannot be scored (missing files, wrong sizes, unknown values)."""


def score_prediction_dir(
    dataset: Dataset, pred_dir: str | Path, progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Score ``<pred_dir>/<id>.png`` leaf label maps against every sample of ``dataset``.

    Any model's output can be scored this way. Every missing or malformed prediction is named
    in one :class:`EvaluationError`, before any score is reported.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise EvaluationError(f"{pred_dir}: no such folder of predictions")
    missing = [s.id for s in dataset.samples if not (pred_dir / f"{s.id}.png").is_file()]
    if missing:
        shown = ", ".join(missing[:20]) + (
            f", ... ({len(missing)} in all)" if len(missing) > 20 else ""
        )
        raise EvaluationError(f"{pred_dir}: no prediction <id>.png for id(s) {shown}")

    def one(sample: Sample) -> ConfusionMatrix:
        path = pred_dir / f"{sample.id}.png"
        target = dataset.read_labels(sample)
        pred = read_mask(path)
        if pred.shape != target.shape:
            raise EvaluationError(
                f"{path}: prediction is {pred.shape[1]}x{pred.shape[0]}, "
                f"ground truth is {target.shape[1]}x{target.shape[0]}"
            )
        cm = ConfusionMatrix(dataset.tree)
        try:
            cm.update(target, pred.astype(np.int64))
        except ValueError as err:
            raise EvaluationError(f"{path}: {err}") from None
        return cm

    total = ConfusionMatrix(dataset.tree)
    try:
        for cm in parallel_map(one, dataset.samples):
            total.merge(cm)
            if progress:
                progress(1)
    except ImageReadError as err:
        raise EvaluationError(str(err)) from None
    return total.scores()
