"""Running a predictor over files, folders, globs, videos and webcams, and saving what it finds.

Each image input gives ``<stem>.png`` (single-channel leaf label map, the input's size),
``<stem>_overlay.jpg`` (colour overlay with a legend) and, on request, ``<stem>_level<k>.png``
(one colour mask per level) and ``<stem>.json`` (pixel share per node, number of people). A video
gives ``<stem>_overlay.mp4``. A bad input is reported by name with its reason and the run goes on.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from hiseg.images import IMAGE_SUFFIXES, ImageReadError
from hiseg.predictor import Predictor, Result
from hiseg.visualize import colorize

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


@dataclass
class Source:
    """One thing to segment: an image file, a video file, or a webcam index."""

    kind: str  # "image", "video" or "webcam"
    path: Path | None = None
    camera: int | None = None

    @property
    def stem(self) -> str:
        return self.path.stem if self.path else f"webcam{self.camera}"

    def __str__(self) -> str:
        return str(self.path) if self.path else f"webcam {self.camera}"


@dataclass
class RunReport:
    saved: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)
    summaries: list[dict[str, Any]] = field(default_factory=list)


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def expand_sources(inputs: list[str]) -> tuple[list[Source], list[tuple[str, str]]]:
    """Files, folders (their images and videos), globs and webcam indices -> sources + errors."""
    sources: list[Source] = []
    errors: list[tuple[str, str]] = []
    for text in inputs:
        if text.isdigit():
            sources.append(Source("webcam", camera=int(text)))
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            found = [p for p in sorted(path.iterdir()) if p.is_file() and _kind(p)]
            if not found:
                errors.append((text, "folder holds no images or videos"))
            sources += [Source(_kind(p), p) for p in found]  # type: ignore[arg-type]
        elif any(c in text for c in "*?["):
            matches = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
            found = [p for p in matches if p.is_file() and _kind(p)]
            if not found:
                errors.append((text, "pattern matches no images or videos"))
            sources += [Source(_kind(p), p) for p in found]  # type: ignore[arg-type]
        elif path.is_file():
            # unknown suffixes are tried as images: the reader names the problem if they are not
            sources.append(Source(_kind(path) or "image", path))
        else:
            errors.append((text, "file not found"))
    return sources, errors


class Saver:
    """Writes results under ``out``, giving every input its own, unclashing stem."""

    def __init__(self, out: Path, levels: bool = False, summary: bool = False):
        self.out, self.levels, self.summary = out, levels, summary
        self.used: set[str] = set()
        out.mkdir(parents=True, exist_ok=True)

    def unique_stem(self, stem: str) -> str:
        name, i = stem, 1
        while name in self.used:
            i += 1
            name = f"{stem}_{i}"
        self.used.add(name)
        return name

    def save(self, result: Result, stem: str) -> list[Path]:
        paths = [self.out / f"{stem}.png", self.out / f"{stem}_overlay.jpg"]
        Image.fromarray(result.labels).save(paths[0])
        Image.fromarray(result.overlay()).save(paths[1], quality=92)
        if self.levels:
            for level in result.tree.levels:
                path = self.out / f"{stem}_level{level.index}.png"
                Image.fromarray(colorize(result.labels, result.tree, level.index)).save(path)
                paths.append(path)
        if self.summary:
            path = self.out / f"{stem}.json"
            path.write_text(json.dumps(result.summary(), indent=2))
            paths.append(path)
        return paths


def frames(source: Source) -> tuple[Iterator[np.ndarray], float, int]:
    """RGB frames of a video or webcam, its frame rate and frame count (0 when unknown)."""
    capture = cv2.VideoCapture(source.camera if source.kind == "webcam" else str(source.path))
    if not capture.isOpened():
        raise ImageReadError(str(source), "cannot open the video or camera")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if source.kind == "video" else 0

    def read() -> Iterator[np.ndarray]:
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        finally:
            capture.release()

    return read(), fps, max(count, 0)


def segment_video(
    predictor: Predictor,
    source: Source,
    out: Path,
    max_frames: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Annotated video (overlay with legend) written frame by frame as ``<stem>_overlay.mp4``."""
    stream, fps, count = frames(source)
    writer = None
    n = 0
    try:
        for frame in stream:
            picture = cv2.cvtColor(predictor.predict(frame).overlay(), cv2.COLOR_RGB2BGR)
            if writer is None:
                fourcc = cv2.VideoWriter.fourcc(*"mp4v")
                h, w = picture.shape[:2]
                writer = cv2.VideoWriter(str(out), fourcc, fps, (w, h))
            writer.write(picture)
            n += 1
            if progress:
                progress(n, count)
            if max_frames and n >= max_frames:
                break
    finally:
        if writer is not None:
            writer.release()
    if n == 0:
        raise ImageReadError(str(source), "no frames could be read")
    return out


def run(
    predictor: Predictor,
    sources: list[Source],
    saver: Saver,
    max_frames: int | None = None,
    on_image: Callable[[], None] | None = None,
    on_frame: Callable[[int, int], None] | None = None,
) -> RunReport:
    """Segment every source, saving as it goes; failures are collected, never fatal."""
    report = RunReport()
    for source in sources:
        stem = saver.unique_stem(source.stem)
        try:
            if source.kind == "image":
                result = predictor.predict(source.path)  # type: ignore[arg-type]
                report.saved += saver.save(result, stem)
                report.summaries.append(result.summary())
            else:
                path = saver.out / f"{stem}_overlay.mp4"
                report.saved.append(segment_video(predictor, source, path, max_frames, on_frame))
        except ImageReadError as err:
            report.failed.append((str(err.path), err.reason))
        except MemoryError:
            report.failed.append((str(source), "out of memory while segmenting"))
        if on_image:
            on_image()
    return report
