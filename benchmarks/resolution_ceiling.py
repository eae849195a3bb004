"""The best IoU a prediction made at 1/f resolution could reach: masks averaged down, upsampled.

    python benchmarks/resolution_ceiling.py --data ../shared/data/picsart-person --split valid

If the ceiling at the model's output stride is far above the model's IoU, the errors are not
about resolution. Prints one line per factor (person vs background, one confusion over the split).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from hiseg.data import open_dataset
from hiseg.metrics import ConfusionMatrix
from hiseg.taxonomy import load_tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="valid")
    args = parser.parse_args()
    dataset = open_dataset(args.data, args.split)
    person = load_tree("person")
    targets = [dataset.tree.person_labels(dataset.read_labels(s)) for s in dataset.samples]
    for factor in (2, 4, 8):
        cm = ConfusionMatrix(person)
        for target in targets:
            h, w = target.shape
            soft = cv2.resize(
                (target == 1).astype(np.float32),
                (w // factor, h // factor),
                interpolation=cv2.INTER_AREA,
            )
            up = cv2.resize(soft, (w, h), interpolation=cv2.INTER_LINEAR) > 0.5
            cm.update(target, up.astype(np.uint8))
        print(f"1/{factor} resolution: IoU ceiling {cm.scores()['iou']:.4f}")


if __name__ == "__main__":
    main()
