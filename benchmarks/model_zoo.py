"""The README's model-zoo table: size, val scores and end-to-end time of each part model, timed
in one run so the time ratios to the first (fast) model are fair on a shared machine.

Scores come from ``hiseg eval --json`` files (deterministic, so made once per model); time is
``Predictor.predict`` on one real photo at each model's own default long side, the models timed
in turns (:func:`hiseg.bench.time_interleaved`). An entry ending in ``:accurate`` is
the model with ``--accurate`` (flip + scales 0.75, 1, 1.25), scored by ``hiseg eval --accurate``.

    python benchmarks/model_zoo.py \\
        --zoo FAST_NAME:FAST.onnx:FAST_val.json --zoo LARGE_NAME:LARGE.onnx:LARGE_val.json \\
        --zoo LARGE_NAME:LARGE.onnx:LARGE_val_accurate.json:accurate \\
        --image ../shared/data/pascal-person-part/JPEGImages/2008_000067.jpg \\
        --out benchmarks/model_zoo.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from functools import partial
from pathlib import Path

from hiseg.bench import cpu_name, time_interleaved
from hiseg.images import read_image
from hiseg.predictor import load


def zoo_rows(
    entries: list[tuple[str, Path, Path, bool]], image: Path, threads: int, runs: int
) -> list[dict]:
    """One row per (name, model file, eval JSON, accurate): its scores, file size and median
    predict ms."""
    photo = read_image(image)
    predictors = [
        load(model, threads=threads, accurate=accurate) for _, model, _, accurate in entries
    ]
    times = time_interleaved([partial(p.predict, photo) for p in predictors], runs, warmup=5)
    rows = []
    for (name, model, scores_json, accurate), predictor, model_times in zip(
        entries, predictors, times, strict=True
    ):
        scores = json.loads(scores_json.read_text())
        rows.append(
            {
                "name": f"`{name}` --accurate" if accurate else f"`{name}`",
                "mb": model.stat().st_size / 1e6,
                "precision": predictor.backends[0].spec.precision,
                "long_side": predictor.long_side,
                "miou": [scores["levels"][str(k)]["miou"] for k in range(3)],
                "seven": scores["miou_all_with_background"],
                "ms": statistics.median(model_times),
            }
        )
    return rows


def markdown(rows: list[dict], command: str, image: Path) -> str:
    fast = rows[0]["ms"]
    lines = [
        "# Model zoo: part models on Pascal-Person-Part val (353 images)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {cpu_name()}. Time: `Predictor.predict` on `{image.name}` at the model's "
        "long side, batch 1, median of the runs, the models timed in turns; the ratio is to the "
        "first row in the same run.",
        "",
        "| model | size (MB) | precision | long side | mIoU0 | mIoU1 | mIoU2 | 7-class with bg "
        "| predict ms | x first |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m0, m1, m2 = r["miou"]
        lines.append(
            f"| {r['name']} | {r['mb']:.1f} | {r['precision']} | {r['long_side']} "
            f"| {m0:.3f} | {m1:.3f} | {m2:.3f} | {r['seven']:.3f} "
            f"| {r['ms']:.1f} | {r['ms'] / fast:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--zoo",
        action="append",
        required=True,
        metavar="NAME:MODEL:JSON[:accurate]",
        help="a model's name, .onnx file and `hiseg eval --json` scores; :accurate times and "
        "scores it with --accurate",
    )
    parser.add_argument("--image", type=Path, required=True, help="the photo to time on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/model_zoo.md"))
    args = parser.parse_args()
    entries = []
    for item in args.zoo:
        parts = item.split(":")
        if len(parts) not in (3, 4) or parts[3:] not in ([], ["accurate"]):
            parser.error(f"--zoo takes NAME:MODEL:JSON[:accurate], not {item!r}")
        name, model, scores = parts[0], Path(parts[1]), Path(parts[2])
        if model.suffix != ".onnx" or not model.is_file():
            parser.error(f"--zoo {item}: {model} is not an .onnx file (only those are timed)")
        if not scores.is_file():
            parser.error(f"--zoo {item}: no scores file {scores}")
        entries.append((name, model, scores, parts[3:] == ["accurate"]))
    rows = zoo_rows(entries, args.image, args.threads, args.runs)
    command = "python benchmarks/model_zoo.py " + shlex.join(sys.argv[1:])
    args.out.write_text(markdown(rows, command, args.image))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
