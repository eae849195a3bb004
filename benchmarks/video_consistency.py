"""Temporal smoothing on labelled synthetic video: accuracy and frame-to-frame consistency.

    python benchmarks/video_consistency.py [--clips 24] [--frames 20] [--threads 2]
    python benchmarks/video_consistency.py --speed-only [--float-overlay]

No labelled video exists here, so clips are made from val photos of pascal-person-part (read in
place) with a known, seeded camera motion: a random walk of shift, rotation and zoom, plus sensor
noise and JPEG re-compression on every frame. Every frame's warp is known, so its ground truth
and the correspondence between consecutive frames are exact.

- accuracy: mIoU per level over all frames (one confusion matrix, pixels inside the photo);
- consistency: each prediction warped into the previous frame (nearest neighbour), over the
  pixels of the photo visible in both: the share whose leaf label flips, the share whose
  person/background label flips, and the mIoU per level between the two predictions. The ground
  truth warped the same way gives the floor that resampling alone leaves.

The network runs once per frame; every variant smooths the same network probabilities
(:class:`hiseg.video.TemporalSmoother`, at network resolution) and decodes as ``hiseg predict``
does. Then the speed of ``hiseg predict`` on a 640x480 clip: the network alone, every step one
frame after the other, and pipelined (:func:`hiseg.video.segment_video`), in the same run;
``--float-overlay`` also times both with the overlay drawn as it was before it blended in uint8
(in turns with the others). Writes OUT.md and OUT.json (default benchmarks/video_consistency, or
benchmarks/video_speed with ``--speed-only``, which leaves out the accuracy and consistency).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
from PIL import Image

import hiseg
import hiseg.visualize
from hiseg.data import open_dataset
from hiseg.metrics import ConfusionMatrix
from hiseg.pipeline import Probabilities, prepare
from hiseg.postprocess import clean_labels
from hiseg.runner import Source
from hiseg.taxonomy import IGNORE_VALUE
from hiseg.video import OverlayWriter, TemporalSmoother, segment_video

HERE = Path(__file__).resolve().parent


class Unguarded(TemporalSmoother):
    """The same without the ghost guard (the agreement with the past), for comparison:
    ``blend`` is then MediaPipe's uncertainty-weighted blend, ``ema`` a plain moving average."""

    def past_weight(self, current: np.ndarray, previous: np.ndarray) -> np.ndarray:
        if self.method == "ema":
            return np.full(current.shape[1:], self.strength, np.float32)
        top2 = np.partition(current, -2, axis=0)[-2:]
        return self.strength * (1 - (top2[1] - top2[0]))


VARIANTS: dict[str, TemporalSmoother | None] = {
    "--no-smooth": None,
    "blend 0.7": TemporalSmoother(0.7, "blend"),
    "blend 0.85": TemporalSmoother(0.85, "blend"),
    "blend 0.9 (default)": TemporalSmoother(0.9, "blend"),
    "blend 0.95": TemporalSmoother(0.95, "blend"),
    "ema 0.5": TemporalSmoother(0.5, "ema"),
    "ema 0.7": TemporalSmoother(0.7, "ema"),
    "blend 0.9 unguarded (MediaPipe's)": Unguarded(0.9, "blend"),
    "blend 0.7 unguarded (MediaPipe's)": Unguarded(0.7, "blend"),
    "ema 0.5 unguarded (plain)": Unguarded(0.5, "ema"),
}


def camera_path(
    rng: np.random.Generator, n: int, h: int, w: int, motion: float = 1.0
) -> list[np.ndarray]:
    """``n`` 2x3 affine maps photo -> frame: a hand-held camera's drift (random walk with
    momentum) of shift, rotation and zoom about the centre, zoomed in a little at the start;
    ``motion`` scales the steps."""
    shift, angle, zoom = np.zeros(2), 0.0, np.log(rng.uniform(1.0, 1.1))
    velocity = np.zeros(4)
    maps = []
    for _ in range(n):
        velocity = 0.7 * velocity + rng.normal(0, [1.5, 1.5, 0.3, 0.006]) * motion
        shift += velocity[:2]
        angle += velocity[2]
        zoom += velocity[3]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, float(np.exp(zoom)))
        m[:, 2] += shift
        maps.append(m)
    return maps


def render(image: np.ndarray, m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The photo seen through ``m``: reflected beyond its border, sensor noise, JPEG."""
    h, w = image.shape[:2]
    frame = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    noisy = frame + rng.normal(0, rng.uniform(2, 6), frame.shape)
    buffer = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(
        buffer, "JPEG", quality=int(rng.integers(60, 91))
    )
    return np.asarray(Image.open(buffer).convert("RGB"))


def warp_labels(labels: np.ndarray, m: np.ndarray) -> np.ndarray:
    h, w = labels.shape
    return cv2.warpAffine(labels, m, (w, h), flags=cv2.INTER_NEAREST, borderValue=(IGNORE_VALUE,))


def between(m_from: np.ndarray, m_to: np.ndarray) -> np.ndarray:
    """The 2x3 map frame ``from`` -> frame ``to`` when both are maps from the photo."""
    full = np.vstack([m_to, [0, 0, 1]]) @ np.linalg.inv(np.vstack([m_from, [0, 0, 1]]))
    return full[:2]


class Scores:
    """Accuracy and consistency of one variant over every clip."""

    def __init__(self, tree):
        self.tree = tree
        self.accuracy = ConfusionMatrix(tree)
        self.agreement = ConfusionMatrix(tree)
        self.flips = np.zeros(2)  # leaf, person
        self.visible = 0

    def add_frame(self, labels: np.ndarray, truth: np.ndarray) -> None:
        self.accuracy.update(truth, labels)

    def add_pair(self, before: np.ndarray, after_warped: np.ndarray, visible: np.ndarray) -> None:
        """``before``: frame t-1's labels; ``after_warped``: frame t's, in frame t-1."""
        a, b = before[visible], after_warped[visible]
        background = self.tree.background.value
        self.flips += [(a != b).sum(), ((a == background) != (b == background)).sum()]
        self.visible += int(visible.sum())
        target = np.where(visible, before, IGNORE_VALUE).astype(np.uint8)
        self.agreement.update(target, np.where(visible, after_warped, before))

    def row(self) -> dict[str, float]:
        acc, agree = self.accuracy.scores()["levels"], self.agreement.scores()["levels"]
        out = {
            f"miou{k}": 100 * (acc[str(k)]["miou"] or np.nan) for k in range(self.tree.num_levels)
        }
        out.update({f"cons{k}": 100 * agree[str(k)]["miou"] for k in range(self.tree.num_levels)})
        out["flips_leaf"] = 100 * self.flips[0] / self.visible
        out["flips_person"] = 100 * self.flips[1] / self.visible
        return out


def decode(predictor, probs: Probabilities) -> np.ndarray:
    """Labels as :meth:`hiseg.Predictor.predict` makes them from ``probs``."""
    labels = probs.decode(predictor.tree)
    if predictor.clean:
        labels = clean_labels(probs, labels, predictor.tree, predictor.clean)
    return labels


def consistency_run(args, predictor, motion: float) -> tuple[dict[str, dict[str, float]], int]:
    dataset = open_dataset(args.data, "val")
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(dataset), size=args.clips, replace=False)
    scores = {name: Scores(predictor.tree) for name in [*VARIANTS, "ground truth"]}
    n_frames = 0
    looks: list[Probabilities] = []

    def keep(probs: Probabilities) -> Probabilities:
        looks.append(probs)
        return probs

    for c, index in enumerate(picks):
        image, labels = dataset[int(index)]
        h, w = labels.shape
        clip_rng = np.random.default_rng([args.seed, int(index)])
        maps = camera_path(clip_rng, args.frames, h, w, motion)
        truths = [warp_labels(labels, m) for m in maps]
        inside = [warp_labels(np.zeros_like(labels), m) == 0 for m in maps]
        looks.clear()
        for m in maps:
            predictor.predict(render(image, m, clip_rng), keep)
        n_frames += len(maps)
        for name, smoother in [*VARIANTS.items(), ("ground truth", None)]:
            if smoother:
                smoother.reset()
            previous = None
            for t, truth in enumerate(truths):
                if name == "ground truth":
                    pred = np.where(truth == IGNORE_VALUE, predictor.tree.background.value, truth)
                else:
                    pred = decode(predictor, smoother(looks[t]) if smoother else looks[t])
                    scores[name].add_frame(pred.astype(np.uint8), truth)
                if previous is not None:
                    back = between(maps[t], maps[t - 1])
                    warped = warp_labels(pred.astype(np.uint8), back)
                    visible = inside[t - 1] & (warp_labels(inside[t].view(np.uint8), back) == 1)
                    scores[name].add_pair(previous, warped, visible)
                previous = pred.astype(np.uint8)
        print(f"clip {c + 1}/{args.clips} done", file=sys.stderr, flush=True)
    return {name: s.row() for name, s in scores.items()}, n_frames


def float_overlay(image, labels, tree, level=None, alpha=0.55) -> np.ndarray:
    """``hiseg.visualize.overlay`` as it was before it blended in uint8 (float32 NumPy over the
    whole image), for ``--float-overlay``."""
    colours = tree.palette(level)[labels].astype(np.float32)
    out = image.astype(np.float32)
    fg = (labels != tree.background.value)[..., None]
    out = np.where(fg, (1 - alpha) * out + alpha * colours, out)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def speed_run(args, predictor, smoother: TemporalSmoother) -> dict[str, dict[str, float]]:
    """Frames/s on a 640x480 clip: network alone, sequential and pipelined ``segment_video``
    (and both with the float overlay, ``--float-overlay``); each as a median, and as a share of
    the network alone in the same turn (a median too: under a varying load, the steadier)."""
    dataset = open_dataset(args.data, "val")
    image = cv2.resize(dataset[0][0], (640, 480), interpolation=cv2.INTER_LINEAR)
    rng = np.random.default_rng(args.seed)
    maps = camera_path(rng, args.speed_frames, 480, 640)
    clip_frames = [render(image, m, rng) for m in maps]
    backend = predictor.backends[0]
    uint8_overlay = hiseg.visualize.overlay
    predict, write = predictor.predict, OverlayWriter.__call__
    runs = [("sequential", False, uint8_overlay), ("pipelined", True, uint8_overlay)]
    if args.float_overlay:
        runs += [
            ("sequential, float overlay", False, float_overlay),
            ("pipelined, float overlay", True, float_overlay),
        ]
    names = ["network alone"] + [r[0] for r in runs]
    measures = ("fps", "cpu_ms", "predict_ms", "write_ms")
    values: dict[str, dict[str, list[float]]] = {m: {n: [] for n in names} for m in measures}
    busy = {"predict_ms": 0.0, "write_ms": 0.0}

    def busy_in(key: str, work):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return work(*args, **kwargs)
            finally:
                busy[key] += time.perf_counter() - start

        return run

    def timed(name: str, work) -> None:
        """Frames/s; CPU time per frame of this process (all its threads), under a varying
        load the steadier measure of the work done; and the time per frame of the calling
        thread's ``predict`` and of the writer's drawing and encoding, to find the bottleneck."""
        busy.update(predict_ms=0.0, write_ms=0.0)
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        values["fps"][name].append(len(clip_frames) / (time.perf_counter() - wall))
        values["cpu_ms"][name].append(1000 * (time.process_time() - cpu) / len(clip_frames))
        for key, seconds in busy.items():
            values[key][name].append(1000 * seconds / len(clip_frames))

    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        writer = cv2.VideoWriter(str(clip), cv2.VideoWriter.fourcc(*"mp4v"), 25, (640, 480))
        for frame in clip_frames:
            writer.write(frame[..., ::-1].copy())
        writer.release()
        inputs = [prepare(frame, backend.spec)[0][None] for frame in clip_frames]
        backend.run(inputs[0])  # warm-up
        for turn in range(args.speed_repeats):  # in turns, so load changes hit all alike
            timed("network alone", lambda: [backend.run(x) for x in inputs])
            for name, pipelined, drawing in runs if turn % 2 else runs[::-1]:
                with (
                    mock.patch.object(hiseg.visualize, "overlay", drawing),
                    mock.patch.object(predictor, "predict", busy_in("predict_ms", predict)),
                    mock.patch.object(OverlayWriter, "__call__", busy_in("write_ms", write)),
                ):
                    timed(
                        name,
                        lambda pipelined=pipelined: segment_video(
                            predictor,
                            Source("video", clip),
                            Path(tmp) / "out.mp4",
                            smoother=smoother,
                            pipelined=pipelined,
                        ),
                    )
    network = np.array(values["fps"]["network alone"])
    out = {name: {m: float(np.median(values[m][name])) for m in measures} for name in names}
    for name in names:
        out[name]["share"] = float(np.median(np.array(values["fps"][name]) / network))
    return out


def numbers(text: str, kind=float) -> list:
    return [kind(t) for t in text.split(",")]


def table(rows: dict[str, dict[str, float]], levels: int) -> list[str]:
    base = rows["--no-smooth"]
    lines = [
        "| variant | "
        + " | ".join(f"mIoU L{k}" for k in range(levels))
        + " | "
        + " | ".join(f"cons L{k}" for k in range(levels))
        + " | flips leaf % | flips person % | flip change |",
        "|---|" + "---:|" * (2 * levels + 3),
    ]
    for name, row in rows.items():
        change = 100 * (row["flips_leaf"] / base["flips_leaf"] - 1)
        cells = [f"{row[f'miou{k}']:.2f}" if name != "ground truth" else "-" for k in range(levels)]
        cells += [f"{row[f'cons{k}']:.2f}" for k in range(levels)]
        cells += [f"{row['flips_leaf']:.2f}", f"{row['flips_person']:.2f}", f"{change:+.0f}%"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pascal-person-part")
    parser.add_argument(
        "--data", type=Path, default=HERE.parent.parent / "shared/data/pascal-person-part"
    )
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--motion", default="1,3", help="Camera motion scales, one table each.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed-threads", default="1,2", help="Network threads of speed runs.")
    parser.add_argument("--speed-frames", type=int, default=60)
    parser.add_argument("--speed-repeats", type=int, default=3)
    parser.add_argument("--machine", default="2-core x86_64 VM, shared with a niced training")
    parser.add_argument("--speed-only", action="store_true", help="Only the speed section.")
    parser.add_argument(
        "--float-overlay", action="store_true", help="Also time the old float32 overlay."
    )
    parser.add_argument("--out", type=Path, help="default benchmarks/video_consistency or _speed")
    args = parser.parse_args()
    args.out = args.out or HERE / ("video_speed" if args.speed_only else "video_consistency")
    predictor = hiseg.load(args.model, threads=args.threads)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()[0]
    results, n_frames = {}, 0
    for motion in [] if args.speed_only else numbers(args.motion):
        rows, n_frames = consistency_run(args, predictor, motion)
        results[motion] = rows
    speed = {
        threads: speed_run(args, hiseg.load(args.model, threads=threads), TemporalSmoother())
        for threads in numbers(args.speed_threads, int)
    }
    command = "python benchmarks/video_consistency.py " + shlex.join(sys.argv[1:])
    data = {"command": command, "frames": n_frames, "motion": results, "speed": speed}
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    title = "Video speed" if args.speed_only else "Temporal smoothing on labelled synthetic video"
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {args.machine} ({os.cpu_count()} logical cores), CPython "
        f"{platform.python_version()}; model `{args.model}`, {args.threads} threads; {started}; "
        f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
    ]
    if not args.speed_only:
        lines += consistency_section(args, results, n_frames, predictor.tree.num_levels)
    lines += speed_section(args, speed)
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def consistency_section(args, results, n_frames: int, levels: int) -> list[str]:
    lines = [
        "",
        f"{args.clips} clips x {args.frames} frames ({n_frames} frames) from pascal-person-part "
        f"val photos, seed {args.seed}; see the script's docstring for how clips and scores are "
        "made. mIoU: accuracy against the warped ground truth; cons: mIoU between consecutive "
        "predictions mapped into one frame; flips: share of pixels (visible in both frames) whose "
        "label changes, leaf level and person/background. Flip change is relative to --no-smooth.",
        "Variants: `blend s` is `--smooth-strength s` (the default method), `ema s` the guarded "
        "moving average, `unguarded` the same without the ghost guard (agreement with the past).",
    ]
    for motion, rows in results.items():
        lines += ["", f"## Camera motion x{motion:g}", ""]
        lines += table(rows, levels)
    return lines


def speed_section(args, speed: dict[int, dict[str, dict[str, float]]]) -> list[str]:
    lines = [
        "",
        f"## Speed: a 640x480 clip, {args.speed_frames} frames (median of "
        f"{args.speed_repeats} runs, in turns)",
        "",
        "| network threads | run | frames/s | of the network alone | CPU ms | predict ms | "
        "write ms |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for threads, runs in speed.items():
        for name, v in runs.items():
            steps = f"{v['predict_ms']:.1f} | {v['write_ms']:.1f}" if v["predict_ms"] else "- | -"
            lines.append(
                f"| {threads} | {name} | {v['fps']:.1f} | {v['share']:.0%} | {v['cpu_ms']:.1f} "
                f"| {steps} |"
            )
    lines += [
        "",
        "network alone: the ONNX session on ready inputs. sequential / pipelined: "
        "`segment_video` from the mp4 to the overlay mp4 (decode, network, smoothing, decode of "
        "the tree, overlay, encode) with smoothing on, every step in turn / in three threads. "
        "float overlay: the same with the overlay blended in float32 NumPy as before "
        "(`--float-overlay`). The share is the median over turns of each turn's ratio; CPU ms: "
        "this process's CPU time per frame, all threads (the work done, steadier than frames/s "
        "under load). predict ms / write ms: wall time per frame in `Predictor.predict` (the "
        "calling thread: network, smoothing, decoding) and in the writer (overlay, encoding); "
        "pipelined, the larger bounds the speed. The runs of a turn go in reverse order every "
        "other turn.",
        "",
    ]
    return lines


if __name__ == "__main__":
    main()
