"""Which train masks does a cross-validated model disagree with most?

    # 1. split train into K folds; fold i's ids go to <out>/fold<i>.txt
    python benchmarks/train_mask_audit.py folds --data ../shared/data/picsart-person --out DIR
    # 2. train one model per fold with that fold left out (data.drop), e.g. for fold 0:
    hiseg train configs/picsart-person.yaml name=audit-fold0 data.drop=DIR/fold0.txt
    # 3. score each fold's masks against the model that never saw them
    python benchmarks/train_mask_audit.py score --data ../shared/data/picsart-person \\
        --out DIR runs/audit-fold0/best.ckpt runs/audit-fold1/best.ckpt

Step 3 writes ``DIR/audit.csv`` (every train id with its person IoU between mask and held-out
prediction, lowest first) and ``DIR/lowest.png`` (image | mask | prediction of the lowest ones),
for a person to judge which masks are wrong, not the model. The valid split is never touched.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from hiseg.data import open_dataset, read_id_list

SEED = 0


def write_folds(data: Path, split: str, k: int, out: Path) -> None:
    ids = open_dataset(data, split).ids
    order = np.random.default_rng(SEED).permutation(len(ids))
    out.mkdir(parents=True, exist_ok=True)
    for i in range(k):
        fold = [ids[j] for j in sorted(order[i::k])]
        (out / f"fold{i}.txt").write_text("\n".join(fold) + "\n")
        print(f"{out / f'fold{i}.txt'}: {len(fold)} ids")


def person_iou(mask: np.ndarray, pred: np.ndarray) -> float:
    union = np.logical_or(mask, pred).sum()
    return float(np.logical_and(mask, pred).sum() / union) if union else 1.0


def score(data: Path, split: str, models: list[Path], out: Path, show: int) -> None:
    import hiseg  # after argparse, so --help is quick

    dataset = open_dataset(data, split)
    bg = dataset.tree.background.value
    rows, shown = [], []
    for i, model in enumerate(models):
        held_out = set(read_id_list(out / f"fold{i}.txt"))
        predictor = hiseg.load(model)
        for sample in (s for s in dataset.samples if s.id in held_out):
            image, labels = dataset.read(sample)
            pred = predictor.predict(image).labels != predictor.tree.background.value
            mask = labels != bg
            rows.append((sample.id, i, person_iou(mask, pred), int(mask.sum()), int(pred.sum())))
            shown.append((image, mask, pred))
        print(f"fold {i}: {len(held_out)} masks scored with {model}")
    order = sorted(range(len(rows)), key=lambda r: rows[r][2])
    with open(out / "audit.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "fold", "person_iou", "mask_pixels", "pred_pixels"])
        writer.writerows([*rows[r][:2], f"{rows[r][2]:.4f}", *rows[r][3:]] for r in order)
    ious = np.array([r[2] for r in rows])
    print(
        f"{out / 'audit.csv'}: {len(rows)} masks; person IoU median {np.median(ious):.4f}; "
        + ", ".join(f"{(ious < t).sum()} below {t}" for t in (0.5, 0.7, 0.8, 0.9))
    )
    plot_lowest(
        [rows[r][0] for r in order[:show]],
        [shown[r] for r in order[:show]],
        [rows[r][2] for r in order[:show]],
        out / "lowest.png",
    )


def plot_lowest(ids: list[str], panels: list, ious: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4  # samples per row, three panels each
    rows = -(-len(ids) // cols)
    fig, axes = plt.subplots(rows, 3 * cols, figsize=(3 * cols * 1.2, rows * 1.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for n, (sid, (image, mask, pred), iou) in enumerate(zip(ids, panels, ious, strict=True)):
        row, col = divmod(n, cols)
        for j, panel in enumerate((image, mask, pred)):
            axes[row, 3 * col + j].imshow(panel, cmap=None if j == 0 else "gray")
        axes[row, 3 * col].set_title(f"{sid}: {iou:.2f}", fontsize=7, loc="left")
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=80)
    print(f"{path}: image | mask | held-out prediction, {len(ids)} lowest")


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
    scored.add_argument("--show", type=int, default=48, help="masks in lowest.png")
    args = parser.parse_args()
    if args.step == "folds":
        write_folds(args.data, args.split, args.k, args.out)
    else:
        score(args.data, args.split, args.models, args.out, args.show)


if __name__ == "__main__":
    main()
