"""Running a predictor over files, folders, globs, videos and webcams, and saving what it finds.

Each image input gives ``<stem>.png`` (single-channel leaf label map, the input's size),
``<stem>_overlay.jpg`` (colour overlay with a legend) and, on request, ``<stem>_level<k>.png``
(one colour mask per level) and ``<stem>.json`` (pixel share per node, number of people). A video
gives ``<stem>_overlay.mp4``. A bad input is reported by name with its reason and the run goes on.

Outputs never replace an existing file (an input, an earlier run's result, a concurrent run's
result): each input's whole set of names is claimed with exclusive creates, and a taken name moves
the input to ``<stem>_2``, ``<stem>_3``, ... Every file is written to a hidden temporary name and
renamed, so an interrupted run leaves no truncated file.
"""

from __future__ import annotations

import glob
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from hiseg.errors import HisegError
from hiseg.files import json_writer, png_writer, publish, unlink_all, writable_folder
from hiseg.images import IMAGE_SUFFIXES, ImageReadError, path_fault
from hiseg.predictor import Predictor, Result
from hiseg.taxonomy import Tree
from hiseg.video import TemporalSmoother, segment_video
from hiseg.visualize import colorize

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
GLOB_CHARS = "*?["
#: Stems are cut to this many bytes, so that with their suffixes (``_overlay.jpg``,
#: ``_level2.png``, ``_2``) names stay under the usual 255-byte limit of file systems.
MAX_STEM_BYTES = 200


class Stopped(KeyboardInterrupt):
    """A second SIGINT or SIGTERM: stop at once (files being written are removed)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class StopRequest:
    """Set by the first signal under :func:`stop_on_signals`. The runner looks at it between
    inputs and between video frames, so stopping never cuts a file short."""

    signum: int | None = None


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
class Inputs:
    """What the command line named: the sources, the names that failed, the repeats dropped."""

    sources: list[Source] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)
    repeats: int = 0  # paths leading to a file already taken (links, overlapping globs)
    folders: list[Path] = field(default_factory=list)  # folders named as inputs


@dataclass
class RunReport:
    saved: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    videos: list[dict[str, Any]] = field(default_factory=list)  # {"input", "outputs"}
    done: int = 0  # inputs finished, successfully or not
    stopped: int | None = None  # the signal that stopped the run early


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def _loop_link(path: Path) -> Path:
    """The first part of ``path`` that leads back to a folder passed before it (a link to an
    ancestor, which ``**`` globs follow until the system refuses), else ``path``."""
    seen: set[Path] = set()
    prefix = Path()
    for part in path.parts:
        prefix = prefix / part
        try:
            real = prefix.resolve(strict=True)
        except (OSError, RuntimeError):
            break
        if real in seen:
            return prefix
        seen.add(real)
    return path


def expand_sources(texts: list[str]) -> Inputs:
    """Files, folders (their images and videos), globs and webcam indices -> :class:`Inputs`.

    An existing path wins over a webcam index: ``0`` is webcam 0 only when nothing named ``0``
    exists (write ``./0`` for such a file). Every file is taken once, by its resolved path,
    however many names (links, ``**`` globs through linked folders, repeats) lead to it.
    Symbolic link loops and broken links are reported, never skipped in silence, and each once.
    """
    inputs = Inputs()
    taken: set[Path] = set()
    reported: set[str] = set()

    def fail(name: str, reason: str) -> None:
        """One failure per path, however many names, patterns or linked folders reach it (a
        broken name's last part cannot be resolved; its folder can)."""
        full = os.path.abspath(os.path.expanduser(name))
        key = os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))
        if key not in reported:
            reported.add(key)
            inputs.failed.append((name, reason))

    def add(path: Path, kind: str) -> None:
        real = path.resolve()
        if real in taken:
            inputs.repeats += 1
        else:
            taken.add(real)
            inputs.sources.append(Source(kind, path))

    def add_found(text: str, candidates: list[Path], empty: str) -> None:
        found = 0
        for path in candidates:
            fault = path_fault(path)
            if fault:
                fail(str(_loop_link(path) if fault == "symbolic link loop" else path), fault)
            elif path.is_file() and (kind := _kind(path)):
                add(path, kind)
                found += 1
        if not found:
            fail(text, empty)

    for text in texts:
        path = Path(text).expanduser()
        exists = os.path.lexists(path)
        if text.isdigit() and not exists:
            inputs.sources.append(Source("webcam", camera=int(text)))
        elif any(c in text for c in GLOB_CHARS) and not exists:
            matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
            add_found(text, matches, "pattern matches no images or videos")
        elif fault := path_fault(path):
            fail(text, fault)
        elif path.is_dir():
            inputs.folders.append(path)
            add_found(text, sorted(path.iterdir()), "folder holds no images or videos")
        else:
            # unknown suffixes are tried as images: the reader names the problem if they are not
            add(path, _kind(path) or "image")
    return inputs


class Saver:
    """Writes results under ``out``: every input's names claimed exclusively, every file
    written to a hidden temporary name and renamed into place."""

    def __init__(self, out: Path, levels: bool = False, summary: bool = False):
        self.out, self.levels, self.summary = writable_folder(out), levels, summary
        self.renamed: list[tuple[str, str]] = []  # (wanted stem, stem given) when a name was taken
        self._summary_path: Path | None = None

    def summary_file(self) -> Path | None:
        """The run summary's file, claimed on first call: before any input's names (so an input
        called "summary" cannot take it), yet not when the run fails before its first input."""
        if self.summary and self._summary_path is None:
            self._summary_path = self.claim("summary", lambda s: [f"{s}.json"])[0]
        return self._summary_path

    def claim(self, stem: str, names: Callable[[str], list[str]]) -> list[Path]:
        """Creates ``names(stem)`` (else of ``stem_2``, ``stem_3``, ...) empty and exclusively:
        no existing file, input or concurrent run's output is ever replaced."""
        while len(os.fsencode(stem)) > MAX_STEM_BYTES:
            stem = stem[:-1]
        candidate, i = stem, 1
        while True:
            claimed: list[Path] = []
            try:
                for name in names(candidate):
                    path = self.out / name
                    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                    claimed.append(path)
            except FileExistsError:
                unlink_all(claimed)
                i += 1
                candidate = f"{stem}_{i}"
                continue
            except BaseException:
                unlink_all(claimed)
                raise
            if candidate != stem:
                self.renamed.append((stem, candidate))
            return claimed

    def image_names(self, stem: str, tree: Tree) -> list[str]:
        names = [f"{stem}.png", f"{stem}_overlay.jpg"]
        if self.levels:
            names += [f"{stem}_level{level.index}.png" for level in tree.levels]
        if self.summary:
            names.append(f"{stem}.json")
        return names

    def save(self, result: Result, stem: str) -> list[Path]:
        """The result's files, all or none (an interrupt removes the ones already written)."""
        self.summary_file()
        paths = self.claim(stem, lambda s: self.image_names(s, result.tree))
        levels = result.tree.levels if self.levels else []
        try:
            publish(paths[0], png_writer(result.labels))
            picture = Image.fromarray(result.overlay())
            publish(paths[1], lambda tmp: picture.save(tmp, "JPEG", quality=92))
            for level, path in zip(levels, paths[2:], strict=False):
                publish(path, png_writer(colorize(result.labels, result.tree, level.index)))
            if self.summary:
                publish(paths[-1], json_writer(result.summary()))
        except BaseException:
            unlink_all(paths)
            raise
        return paths

    def save_video(
        self,
        predictor: Predictor,
        source: Source,
        max_frames: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        stop: StopRequest | None = None,
        smoother: TemporalSmoother | None = None,
    ) -> Path:
        """``<stem>_overlay.mp4``; a stop request ends it early with the frames done kept."""
        self.summary_file()
        (path,) = self.claim(source.stem, lambda s: [f"{s}_overlay.mp4"])

        def write(tmp: Path) -> None:
            segment_video(predictor, source, tmp, max_frames, progress, stop, smoother)

        try:
            publish(path, write)
        except BaseException:
            unlink_all([path])
            raise
        return path

    def write_summary(self, report: RunReport, inputs: int) -> Path | None:
        """``summary.json``: every finished image and video, every failure, and whether the run
        stopped."""
        path = self.summary_file()
        if path is None:
            return None
        summary = {
            "inputs": inputs,
            "finished": report.done,
            "stopped_by": signal.Signals(report.stopped).name if report.stopped else None,
            "images": report.summaries,
            "videos": report.videos,
            "failed": [{"input": name, "reason": reason} for name, reason in report.failed],
        }
        publish(path, json_writer(summary))
        return path


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """SIGINT and SIGTERM ask the run to stop after the current input or video frame; a second
    one stops at once (:class:`Stopped`). The previous handlers come back afterwards. Main
    thread only."""
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in handled}
    request = StopRequest()

    def stop(signum: int, frame: Any) -> None:
        if request.signum is not None:
            raise Stopped(signum)
        request.signum = signum

    for s in handled:
        signal.signal(s, stop)
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(
    predictor: Predictor,
    sources: list[Source],
    saver: Saver,
    max_frames: int | None = None,
    on_image: Callable[[], None] | None = None,
    on_frame: Callable[[int, int], None] | None = None,
    stop: StopRequest | None = None,
    smoother: TemporalSmoother | None = None,
) -> RunReport:
    """Segment every source, saving as it goes; failures are collected, never fatal. A stop
    request (see :func:`stop_on_signals`) or a KeyboardInterrupt ends the run early with every
    finished input saved whole and nothing of the others. ``smoother`` smooths videos and
    webcams over time, never images."""
    report = RunReport()
    try:
        for source in sources:
            if stop and stop.signum:
                report.stopped = stop.signum
                break
            try:
                if source.kind == "image":
                    assert source.path is not None, "an image source is a file"
                    result = predictor.predict(source.path)
                    paths = saver.save(result, source.stem)
                    report.saved += paths
                    report.summaries.append(
                        {**result.summary(), "outputs": [p.name for p in paths]}
                    )
                else:
                    path = saver.save_video(predictor, source, max_frames, on_frame, stop, smoother)
                    report.saved.append(path)
                    report.videos.append({"input": str(source), "outputs": [path.name]})
                    if stop and stop.signum:  # the video was cut short
                        report.stopped = stop.signum
            except HisegError as err:
                reason = err.reason if isinstance(err, ImageReadError) else str(err)
                report.failed.append((str(source), reason))
            except OSError as err:  # e.g. a name the output's file system refuses (as on Ray)
                report.failed.append((str(source), f"cannot save the results ({err})"))
            except MemoryError:
                report.failed.append((str(source), "out of memory while segmenting"))
            report.done += 1
            if on_image:
                on_image()
    except KeyboardInterrupt as err:
        report.stopped = err.signum if isinstance(err, Stopped) else signal.SIGINT
    return report
