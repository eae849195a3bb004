"""hiseg's person model against MediaPipe's selfie segmentation, on the same images in one run.

    python benchmarks/person_vs_mediapipe.py [--model person] [--threads 2]
    python benchmarks/person_vs_mediapipe.py --data ../shared/data/pascal-person-part --split val \
        --out benchmarks/person_vs_mediapipe_pascal

Both are scored with one confusion matrix over the split (person = mask > 0.5 for MediaPipe's
general model; hiseg's default decoding; on a part dataset every part counts as person) and timed
per image end to end (preprocessing, network, upsampling, decision) with the thread count stated.
MediaPipe (``mediapipe==0.10.14``, whose wheel ships the model) is a benchmark-only dependency.
Writes OUT.md and OUT.json (default benchmarks/person_vs_mediapipe).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

import hiseg
from hiseg.data import open_dataset
from hiseg.metrics import ConfusionMatrix
from hiseg.taxonomy import load_tree

HERE = Path(__file__).resolve().parent
#: MediaPipe's mask is a person probability; this is where it says "person".
MEDIAPIPE_THRESHOLD = 0.5


def open_selfie():
    """MediaPipe's selfie segmentation, general model (imported here: benchmark-only)."""
    import mediapipe as mp

    return mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)


def selfie_person(selfie, image: np.ndarray) -> np.ndarray:
    """(H, W) float32 person probability of an RGB uint8 image, at its size."""
    return selfie.process(image).segmentation_mask


def run_record(command_head: str, args, n_images: int) -> dict:
    """The command (``command_head`` plus the data options every script here takes), date, split
    and image count, as the benchmarks' JSON and Markdown files record them."""
    command = (
        f"{command_head} --data {os.path.relpath(args.data)} --split {args.split}"
        f" --out {os.path.relpath(args.out)}"
    )
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "split": args.split,
        "n_images": n_images,
    }


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="person")
    parser.add_argument(
        "--data", type=Path, default=HERE.parent.parent / "shared/data/picsart-person"
    )
    parser.add_argument("--split", default="valid")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "person_vs_mediapipe")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    dataset = open_dataset(args.data, args.split)
    predictor = hiseg.load(args.model, threads=args.threads)
    selfie = open_selfie()
    person = load_tree("person")
    scores = {"hiseg": ConfusionMatrix(person), "mediapipe": ConfusionMatrix(person)}
    times: dict[str, list[float]] = {"hiseg": [], "mediapipe": []}
    for image, labels in dataset:
        labels = dataset.tree.person_labels(labels)
        result, ms = timed(predictor.predict, image)
        times["hiseg"].append(ms)
        scores["hiseg"].update(labels, predictor.tree.person_labels(result.labels))
        mask, ms = timed(selfie_person, selfie, image)
        times["mediapipe"].append(ms)
        scores["mediapipe"].update(labels, (mask > MEDIAPIPE_THRESHOLD).astype(np.uint8))
    rows = {}
    for name, cm in scores.items():
        s = cm.scores()
        rows[name] = {
            "dice": s["dice"],
            "iou": s["iou"],
            "median_ms": float(np.median(times[name][1:])),
            "p90_ms": float(np.percentile(times[name][1:], 90)),
        }
    head = f"python benchmarks/person_vs_mediapipe.py --model {args.model} --threads {args.threads}"
    meta = {
        **run_record(head, args, len(dataset)),
        "threads": args.threads,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "results": rows,
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    lines = [
        "# Person segmentation: hiseg vs MediaPipe selfie segmentation",
        "",
        f"Produced by `{meta['command']}` on {meta['date']} "
        f"({meta['cores']} cores, {args.threads} threads),",
        f"`{args.data.name}` `{args.split}` ({len(dataset)} images), one confusion over the split.",
        "Latency: one image end to end (preprocessing, network, upsampling, decision), first "
        "image excluded.",
        "",
        "| model | Dice | IoU | median ms | p90 ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['dice']:.4f} | {r['iou']:.4f} "
            f"| {r['median_ms']:.1f} | {r['p90_ms']:.1f} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
