"""MediaPipe's selfie model as an extra teacher for the person student (issue 19), at training
time only: it lives in the benchmark venv (``make .venv-bench/bin/python``), never in hiseg.

    python benchmarks/mediapipe_teacher.py score [--threads 1]
    python benchmarks/mediapipe_teacher.py label -o /work/runs/person/pseudo-mp-ens-soft
    python benchmarks/mediapipe_teacher.py label --weight 1 -o /work/runs/person/pseudo-mp-soft

``score`` scores, with one confusion matrix over PicsArt valid (as ``hiseg eval`` and
person_vs_mediapipe.py): MediaPipe alone, hiseg's TTA teacher alone (its own decoding, and its
person probability > 0.5), and blends ``w * MediaPipe + (1 - w) * hiseg`` of the two person
probabilities, person where the blend is > 0.5. The hiseg probability is first quantised as its
soft pseudo-labels store it, so a scored blend is exactly what ``label`` writes. Writes OUT.md
and OUT.json (default benchmarks/mediapipe_teacher) with the best blend weight on valid.

``label`` writes soft pseudo-labels for the unlabelled photos in ``hiseg pseudo-label``'s format
(through :func:`hiseg.pseudo.label_photos`): the blend with ``--weight`` (default: the best on
valid, read from OUT.json), reading the hiseg teacher's probabilities from the folder its
``hiseg pseudo-label -m person --mode soft --flip --scales 1,1.25,1.5`` run wrote. ``--weight 1``
is MediaPipe alone and needs no hiseg labels. Nothing is scored on the unlabelled photos.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from person_vs_mediapipe import MEDIAPIPE_THRESHOLD, open_selfie, run_record, selfie_person

import hiseg
from hiseg.data import open_dataset
from hiseg.errors import HisegError
from hiseg.images import as_rgb
from hiseg.metrics import ConfusionMatrix
from hiseg.pipeline import Probabilities
from hiseg.predictor import Result
from hiseg.pseudo import label_photos, quantise, read_manifest
from hiseg.taxonomy import Tree, load_tree

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared/data/picsart-person"
#: The hiseg teacher: the bundled person model with the TTA that scored best on valid.
TEACHER = {"model": "person", "flip": True, "scales": [1.0, 1.25, 1.5]}
WEIGHTS = (0.25, 0.5, 0.75)
#: Where this session's person runs live (the commands in OUT.md name it).
RUNS = "/work/runs/person"
MEDIAPIPE = {"file": "mediapipe==0.10.14 selfie_segmentation", "model_selection": 0}


def person_tree() -> Tree:
    """The builtin two-leaf person tree: leaf 0 background, leaf 1 person."""
    tree = load_tree("person")
    assert [leaf.name for leaf in tree.leaves] == ["background", "person"]
    return tree


def blend(mediapipe: np.ndarray, teacher: np.ndarray, weight: float) -> np.ndarray:
    """(H, W) person probability: ``weight`` of MediaPipe's, the rest the hiseg teacher's."""
    return (weight * mediapipe + (1 - weight) * teacher).astype(np.float32)


def stored(probs: np.ndarray) -> np.ndarray:
    """The hiseg teacher's person probability as its soft pseudo-labels hold it (uint8)."""
    return quantise(probs[1]).astype(np.float32) / 255


def person(probability: np.ndarray) -> np.ndarray:
    return (probability > MEDIAPIPE_THRESHOLD).astype(np.uint8)


def score(args: argparse.Namespace) -> None:
    dataset = open_dataset(args.data, args.split)
    teacher = hiseg.load(
        TEACHER["model"], flip=TEACHER["flip"], scales=TEACHER["scales"], threads=args.threads
    )
    selfie = open_selfie()
    rows = {
        "MediaPipe alone (w = 1)": lambda mp, result: person(mp),
        "hiseg teacher alone, its decoding (clean-up 1000 px)": lambda mp, result: (
            teacher.tree.person_labels(result.labels)
        ),
        "hiseg teacher alone, probability > 0.5 (w = 0)": lambda mp, result: person(
            stored(result.probs)
        ),
    }
    for w in WEIGHTS:
        rows[f"blend, w = {w}"] = lambda mp, result, w=w: person(blend(mp, stored(result.probs), w))
    scores = {name: ConfusionMatrix(person_tree()) for name in rows}
    start = time.perf_counter()
    for image, labels in dataset:
        truth = dataset.tree.person_labels(labels)
        result = teacher.predict(image)
        mp = selfie_person(selfie, image)
        for name, decide in rows.items():
            scores[name].update(truth, decide(mp, result))
    minutes = (time.perf_counter() - start) / 60
    results = {name: {k: cm.scores()[k] for k in ("dice", "iou")} for name, cm in scores.items()}
    best = max(WEIGHTS, key=lambda w: results[f"blend, w = {w}"]["iou"])
    head = f".venv-bench/bin/python benchmarks/mediapipe_teacher.py score --threads {args.threads}"
    meta = {
        **run_record(head, args, len(dataset)),
        "teacher": TEACHER,
        "mediapipe": MEDIAPIPE,
        "best_weight": best,
        "minutes": round(minutes, 2),
        "results": results,
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    scales = ",".join(f"{s:g}" for s in TEACHER["scales"])
    lines = [
        "# MediaPipe as an extra teacher: MediaPipe, hiseg's TTA teacher and their blends",
        "",
        f"Produced by `{meta['command']}` on {meta['date']} in the benchmark venv "
        f"(`make person-teacher`), {minutes:.1f} min,",
        f"`{args.data.name}` `{args.split}` ({len(dataset)} images), one confusion over the split "
        "(as `hiseg eval`).",
        "",
        f"hiseg teacher: `hiseg.load('person', flip=True, scales=({scales}))` "
        f"(`hiseg eval -m person --flip --scales {scales}`). Blend: "
        "`w * MediaPipe + (1 - w) * hiseg` person probabilities, person where > 0.5, with the "
        "hiseg probability quantised to uint8 as its soft pseudo-labels store it (so the blend "
        "scored here is the one `label` writes). The blends skip hiseg's clean-up.",
        "",
        "| teacher | Dice | IoU |",
        "| --- | --- | --- |",
        *(f"| {name} | {r['dice']:.4f} | {r['iou']:.4f} |" for name, r in results.items()),
        "",
        f"Best blend on {args.split}: **w = {best}** (chosen by IoU among "
        f"{', '.join(map(str, WEIGHTS))}). Its soft pseudo-labels for the unlabelled photos, "
        "and MediaPipe's alone:",
        "",
        "```bash",
        f"{meta['command'].split(' score ')[0]} label -o {RUNS}/pseudo-mp-ens-soft",
        f"{meta['command'].split(' score ')[0]} label --weight 1 -o {RUNS}/pseudo-mp-soft",
        "```",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def hiseg_labels(folder: Path, photos: Path) -> dict[str, Any]:
    """The manifest of the hiseg teacher's soft labels, checked to be that teacher's on these
    photos."""
    manifest = read_manifest(folder)
    settings = manifest["settings"]
    made = {"model": Path(manifest["teachers"][0]["file"]).stem, **settings}
    wanted = {**TEACHER, "mode": "soft"}
    if len(manifest["teachers"]) != 1 or any(made.get(k) != v for k, v in wanted.items()):
        raise SystemExit(f"{folder}: not the hiseg teacher's soft labels ({wanted})")
    if Path(manifest["images"]) != photos.resolve():
        raise SystemExit(f"{folder}: labels of {manifest['images']}, not of {photos}")
    return manifest


def label(args: argparse.Namespace) -> None:
    weight = args.weight
    if weight is None:
        weight = json.loads(args.scores.read_text())["best_weight"]
    if not 0 <= weight <= 1:
        raise SystemExit(f"--weight must be in [0, 1], not {weight}")
    tree = person_tree()
    selfie = open_selfie()
    teachers: list[dict[str, Any]] = [{**MEDIAPIPE, "weight": weight}]
    manifest: dict[str, Any] = {"labels": {}}
    if weight < 1:
        manifest = hiseg_labels(args.hiseg_labels, args.photos)
        teachers.append(
            {
                "labels": str(args.hiseg_labels.resolve()),
                "teachers": manifest["teachers"],
                "settings": manifest["settings"],
                "weight": 1 - weight,
            }
        )

    def teacher_person(path: Path, shape: tuple[int, ...]) -> np.ndarray:
        entry = manifest["labels"].get(path.stem)
        if entry is None or entry["image"] != path.name:
            raise HisegError(f"{path}: no hiseg teacher label in {args.hiseg_labels}")
        with np.load(args.hiseg_labels / entry["file"], allow_pickle=False) as archive:
            probs = archive["probs"]
        if probs.shape[1:] != shape:
            raise HisegError(f"{path}: hiseg teacher label of another size {probs.shape}")
        return probs[1].astype(np.float32) / 255

    def label_one(path: Path) -> Result:
        image, _ = as_rgb(path)
        mp = selfie_person(selfie, image)
        p = mp if weight == 1 else blend(mp, teacher_person(path, image.shape[:2]), weight)
        probs = np.stack([1 - p, p])
        return Result(image, person(p), tree, path, Probabilities.from_full(probs))

    def label_batch(paths: list[Path]) -> Iterator[Result | HisegError]:
        for path in paths:
            try:
                yield label_one(path)
            except HisegError as err:
                yield err

    start = time.perf_counter()
    settings = {"mediapipe_weight": weight}
    report = label_photos(
        lambda paths: list(label_batch(paths)), tree, teachers, settings, args.photos, args.out,
        "soft", args.threshold, args.limit,
    )  # fmt: skip
    print(
        f"labelled {report.labelled} photo(s), {report.skipped} already done, "
        f"{len(report.failed)} failed, in {time.perf_counter() - start:.0f} s; weight {weight}; "
        f"mean confident share {report.mean_confident}; {report.manifest}"
    )
    for photo, reason in report.failed:
        print(f"failed: {photo}: {reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    scoring = modes.add_parser("score", help="score the teachers on a labelled split")
    scoring.add_argument("--data", type=Path, default=DATA)
    scoring.add_argument("--split", default="valid")
    scoring.add_argument("--threads", type=int, default=1)
    scoring.add_argument("--out", type=Path, default=HERE / "mediapipe_teacher")
    labelling = modes.add_parser("label", help="write soft pseudo-labels for unlabelled photos")
    labelling.add_argument("--photos", type=Path, default=DATA / "unlabeled")
    labelling.add_argument("--hiseg-labels", type=Path, default=Path(RUNS) / "pseudo-tta-soft")
    labelling.add_argument("-o", "--out", type=Path, required=True)
    labelling.add_argument(
        "--weight", type=float, help="MediaPipe's share (default: best on valid)"
    )
    labelling.add_argument("--scores", type=Path, default=HERE / "mediapipe_teacher.json")
    labelling.add_argument("--threshold", type=float, default=0.9, help="for the confident share")
    labelling.add_argument("--limit", type=int)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(getattr(args, "threads", 1)))
    score(args) if args.mode == "score" else label(args)


if __name__ == "__main__":
    main()
