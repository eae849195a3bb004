"""Which train masks does a cross-validated model disagree with most?

    # 1. split train into K folds; fold i's ids go to <out>/fold<i>.txt
    python benchmarks/train_mask_audit.py folds --data ../shared/data/picsart-person --out DIR
    # 2. train one model per fold with that fold left out (data.drop), e.g. for fold 0:
    hiseg train configs/picsart-person.yaml name=audit-fold0 data.drop=DIR/fold0.txt
    # 3. score each fold's masks against the model that never saw them
    python benchmarks/train_mask_audit.py score --data ../shared/data/picsart-person \\
        --out DIR runs/audit-fold0/best.ckpt runs/audit-fold1/best.ckpt

Step 3 writes ``DIR/audit.csv``: every train id with the person IoU between its mask and the
held-out prediction, and its largest *mask-only blob* (a connected region the mask calls person
and the prediction background, after an opening that removes bands under ``BAND`` pixels wide, so
a loose outline does not count but a labelled patch of wall does). ``DIR/lowest.png`` and
``DIR/blobs.png`` show image | mask | prediction for the lowest IoUs and the largest blobs, for a
person to judge which masks are wrong, not the model. The valid split is never touched.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from hiseg.data import open_dataset, read_id_list

SEED = 0
BAND = 7  # pixels; the opening's square side


def write_folds(data: Path, split: str, k: int, out: Path) -> None:
    ids = open_dataset(data, split).ids
    order = np.random.default_rng(SEED).permutation(len(ids))
    out.mkdir(parents=True, exist_ok=True)
    for i in range(k):
        fold = [ids[j] for j in sorted(order[i::k])]
        (out / f"fold{i}.txt").write_text("\n".join(fold) + "\n")
        print(f"{out / f'fold{i}.txt'}: {len(fold)} ids")


class Audit(NamedTuple):
    """One train mask against the prediction of the model that never saw it."""

    id: str
    fold: int
    person_iou: float
    mask_only_blob: int
    mask_pixels: int
    pred_pixels: int


def person_iou(mask: np.ndarray, pred: np.ndarray) -> float:
    union = np.logical_or(mask, pred).sum()
    return float(np.logical_and(mask, pred).sum() / union) if union else 1.0


def largest_blob(region: np.ndarray) -> int:
    """Pixels in the largest connected part of ``region`` that survives a BAND-wide opening."""
    kernel = np.ones((BAND, BAND), np.uint8)
    opened = cv2.morphologyEx(region.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    _, _, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    return int(stats[1:, cv2.CC_STAT_AREA].max(initial=0))


def score(data: Path, split: str, models: list[Path], out: Path, show: int) -> None:
    import hiseg  # after argparse, so --help is quick

    dataset = open_dataset(data, split)
    samples = {s.id: s for s in dataset.samples}
    rows: list[Audit] = []
    preds: dict[str, np.ndarray] = {}  # kept for the pictures; images are read again for those
    for i, model in enumerate(models):
        held_out = read_id_list(out / f"fold{i}.txt")
        predictor = hiseg.load(model)
        for sid in held_out:
            image, labels = dataset.read(samples[sid])
            mask = dataset.tree.person_labels(labels) == 1
            pred = predictor.tree.person_labels(predictor.predict(image).labels) == 1
            blob = largest_blob(mask & ~pred)
            rows.append(Audit(sid, i, person_iou(mask, pred), blob, mask.sum(), pred.sum()))
            preds[sid] = pred
        print(f"fold {i}: {len(held_out)} masks scored with {model}")
    rows.sort(key=lambda r: r.person_iou)
    with open(out / "audit.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(Audit._fields)
        writer.writerows(r._replace(person_iou=f"{r.person_iou:.4f}") for r in rows)
    ious = np.array([r.person_iou for r in rows])
    print(
        f"{out / 'audit.csv'}: {len(rows)} masks; person IoU median {np.median(ious):.4f}; "
        + ", ".join(f"{(ious < t).sum()} below {t}" for t in (0.5, 0.7, 0.8, 0.9))
    )
    blobs = np.array([r.mask_only_blob for r in rows])
    print(f"mask-only blobs: {(blobs >= 500).sum()} of >= 500 px, {(blobs >= 2000).sum()} >= 2000")
    by_blob = sorted(rows, key=lambda r: -r.mask_only_blob)
    for name, ranked in (("lowest.png", rows), ("blobs.png", by_blob)):
        top = ranked[:show]
        panels = []
        for r in top:
            image, labels = dataset.read(samples[r.id])
            panels.append((image, dataset.tree.person_labels(labels) == 1, preds[r.id]))
        titles = [f"{r.id}: IoU {r.person_iou:.2f}, blob {r.mask_only_blob}" for r in top]
        plot_triples(titles, panels, out / name)


def plot_triples(titles: list[str], panels: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4  # samples per row, three panels each
    rows = -(-len(titles) // cols)
    fig, axes = plt.subplots(rows, 3 * cols, figsize=(3 * cols * 1.2, rows * 1.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for n, (title, (image, mask, pred)) in enumerate(zip(titles, panels, strict=True)):
        row, col = divmod(n, cols)
        for j, panel in enumerate((image, mask, pred)):
            axes[row, 3 * col + j].imshow(panel, cmap=None if j == 0 else "gray")
        axes[row, 3 * col].set_title(title, fontsize=6, loc="left")
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=80)
    print(f"{path}: image | mask | held-out prediction, {len(titles)} masks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    folds = sub.add_parser("folds", help="split the train ids into K folds")
    scored = sub.add_parser("score", help="score each fold's masks with its held-out model")
    for p in (folds, scored):
        p.add_argument("--data", type=Path, required=True)
        p.add_argument("--split", default="train")
        p.add_argument("--out", type=Path, required=True)
    folds.add_argument("--k", type=int, default=2)
    scored.add_argument("models", type=Path, nargs="+", help="fold i's model, in fold order")
    scored.add_argument("--show", type=int, default=48, help="masks per picture")
    args = parser.parse_args()
    if args.step == "folds":
        write_folds(args.data, args.split, args.k, args.out)
    else:
        score(args.data, args.split, args.models, args.out, args.show)


if __name__ == "__main__":
    main()
