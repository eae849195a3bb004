"""Videos and webcams: temporal smoothing of the per-frame probabilities, and pipelined I/O.

Each frame is segmented on its own, so where the network hesitates (borders, small parts, noise)
labels flicker from frame to frame. :class:`TemporalSmoother` blends each frame's leaf
probabilities with the previous frame's smoothed ones before decoding, at network resolution.
How much of the past is kept is decided per pixel, by ``strength`` times:

- the agreement of the current frame with the past, ``1 -`` their total variation distance: where
  the picture changed (a person moved) the past is dropped, so a moving person leaves no ghost,
  which a plain moving average does (both methods);
- for ``blend`` (the default; MediaPipe's segmentation smoothing, for several classes) also the
  current frame's uncertainty, ``1 -`` the gap between its two likeliest leaves, so only
  uncertain pixels are blended; ``ema`` (a moving average) blends every pixel.

:func:`segment_video` overlaps reading and decoding frames (one thread), the network (the calling
thread) and drawing and encoding the overlay (one thread), with bounded queues between them, so
where a core is free the other steps hide behind the network.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import cv2
import numpy as np

from hiseg.errors import HisegError
from hiseg.images import ImageReadError
from hiseg.pipeline import Probabilities, in_chunks

if TYPE_CHECKING:
    from hiseg.predictor import Predictor, Result
    from hiseg.runner import Source, StopRequest

SMOOTHING_METHODS = ("blend", "ema")
#: The weight of the past, chosen on benchmarks/video_consistency.md.
DEFAULT_STRENGTH = 0.9
#: Frames that may wait between two stages: enough to absorb jitter, little memory or latency.
QUEUE_DEPTH = 4

_T = TypeVar("_T")


class SmoothingError(HisegError, ValueError):
    """Smoothing settings out of their range."""


class TemporalSmoother:
    """Blends each frame's leaf probabilities with the previous frame's smoothed ones (see the
    module doc). One per video: the first frame, or a frame of another size, starts afresh."""

    def __init__(self, strength: float = DEFAULT_STRENGTH, method: str = "blend"):
        if method not in SMOOTHING_METHODS:
            raise SmoothingError(
                f"unknown smoothing method '{method}' ({', '.join(SMOOTHING_METHODS)})"
            )
        if not 0 <= strength < 1:
            raise SmoothingError(f"smoothing strength must be in [0, 1), not {strength}")
        self.strength, self.method = strength, method
        self._previous: np.ndarray | None = None

    def reset(self) -> None:
        self._previous = None

    def __call__(self, probs: Probabilities) -> Probabilities:
        return probs.map(self.smooth)

    def smooth(self, current: np.ndarray) -> np.ndarray:
        """(leaves, H, W) probabilities of this frame -> smoothed ones (a new array), in
        cache-sized chunks of rows."""
        previous = self._previous
        if previous is None or previous.shape != current.shape:
            out = current.copy()
        else:
            out = np.empty_like(current)

            def blend(start: int, stop: int) -> None:
                now, before, mixed = (a[:, start:stop] for a in (current, previous, out))
                np.subtract(before, now, out=mixed)
                mixed *= self.past_weight(now, before)
                mixed += now

            in_chunks(blend, current.shape[1], current.shape[2])
        self._previous = out
        return out

    def past_weight(self, current: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """(H, W) weight of ``previous`` in each pixel's blend."""
        weight = np.abs(current - previous).sum(axis=0)
        weight *= -0.5 * self.strength
        weight += self.strength  # strength * (1 - total variation distance)
        if self.method == "blend":
            # the margin between the two likeliest leaves, by a running top two (np.partition
            # over the leaves is several times slower)
            top, second = current[0].copy(), np.zeros_like(current[0])
            for leaf in current[1:]:
                np.maximum(second, np.minimum(top, leaf), out=second)
                np.maximum(top, leaf, out=top)
            top -= second
            weight *= 1 - top
        return weight


# -- frames in, frames out --------------------------------------------------------------------


class VideoWriteError(HisegError):
    """An overlay video that cannot be written."""


def quiet_video_backends() -> None:
    """Silence OpenCV's and FFmpeg's own lines on a file or camera that can't be opened: they
    would come before hiseg's one-line reason and say less. A user's OPENCV_* setting wins."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # read when FFmpeg first opens a file
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def frames(source: Source) -> tuple[Generator[np.ndarray, None, None], float, int]:
    """RGB frames of a video or webcam, its frame rate and frame count (0 when unknown)."""
    if source.camera is not None:
        capture = cv2.VideoCapture(source.camera)
    else:
        capture = cv2.VideoCapture(str(source.path))
    if not capture.isOpened():
        reason = (
            "no such camera, or it is busy"
            if source.camera is not None
            else "not a video OpenCV can read (unknown or corrupt format)"
        )
        raise ImageReadError(str(source), reason)
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if source.kind == "video" else 0

    def read() -> Generator[np.ndarray, None, None]:
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        finally:
            capture.release()

    return read(), fps, max(count, 0)


def _put(items: queue.Queue, item: Any, cancelled: threading.Event) -> bool:
    """``items.put(item)`` unless ``cancelled`` is set first (the other side is gone)."""
    while not cancelled.is_set():
        try:
            items.put(item, timeout=0.05)
            return True
        except queue.Full:
            pass
    return False


_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def read_ahead(stream: Iterable[_T], depth: int = QUEUE_DEPTH) -> Generator[_T, None, None]:
    """The items of ``stream``, produced by a thread up to ``depth`` ahead of the consumer. Its
    errors are raised here; closing this iterator stops the thread and closes ``stream``."""
    items: queue.Queue = queue.Queue(depth)
    cancelled = threading.Event()

    def produce() -> None:
        iterator = iter(stream)
        try:
            for item in iterator:
                if not _put(items, item, cancelled):
                    return
            _put(items, _END, cancelled)
        except BaseException as err:  # handed to the consumer, raised there
            _put(items, _Failure(err), cancelled)
        finally:
            close = getattr(iterator, "close", None)
            if close:
                close()

    thread = threading.Thread(target=produce, name="hiseg-read", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        cancelled.set()
        thread.join()


class Background(Generic[_T]):
    """``consume(item)`` for each item :meth:`put`, in a thread, at most ``depth`` waiting. Its
    first error is raised by the next :meth:`put` or by :meth:`close`; :meth:`abandon` drops
    what waits."""

    def __init__(self, consume: Callable[[_T], None], depth: int = QUEUE_DEPTH):
        self._items: queue.Queue = queue.Queue(depth)
        self._failed = threading.Event()
        self._abandoned = threading.Event()
        self._error: BaseException | None = None
        self._consume = consume
        self._thread = threading.Thread(target=self._work, name="hiseg-write", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while (item := self._items.get()) is not _END:
                if not self._abandoned.is_set():
                    self._consume(item)
        except BaseException as err:
            self._error = err
            self._failed.set()

    def put(self, item: _T) -> None:
        if not _put(self._items, item, self._failed):
            self._raise()

    def close(self) -> None:
        """Waits for the items put so far to be consumed."""
        _put(self._items, _END, self._failed)
        self._thread.join()
        self._raise()

    def abandon(self) -> None:
        """Stops after the item being consumed, dropping the others; raises nothing."""
        self._abandoned.set()
        _put(self._items, _END, self._failed)
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


class Inline(Generic[_T]):
    """:class:`Background`'s interface, consuming in the caller's thread (sequential runs)."""

    def __init__(self, consume: Callable[[_T], None]):
        self.put = consume

    def close(self) -> None:
        pass

    def abandon(self) -> None:
        pass


class OverlayWriter:
    """Draws each result's overlay and appends it to an mp4 made on the first frame."""

    def __init__(self, out: Path, fps: float):
        self.out, self.fps = out, fps
        self.count = 0
        self._writer: cv2.VideoWriter | None = None

    def __call__(self, result: Result) -> None:
        picture = cv2.cvtColor(result.overlay(), cv2.COLOR_RGB2BGR)
        if self._writer is None:
            h, w = picture.shape[:2]
            self._writer = cv2.VideoWriter(
                str(self.out), cv2.VideoWriter.fourcc(*"mp4v"), self.fps, (w, h)
            )
            if not self._writer.isOpened():  # else every frame would be dropped in silence
                raise VideoWriteError(f"{self.out}: OpenCV cannot write an mp4v video there")
        self._writer.write(picture)
        self.count += 1

    def release(self) -> None:
        if self._writer is not None:
            self._writer.release()


def segment_video(
    predictor: Predictor,
    source: Source,
    out: Path,
    max_frames: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    stop: StopRequest | None = None,
    smoother: TemporalSmoother | None = None,
    pipelined: bool = True,
) -> None:
    """Annotated video (overlay with legend) written frame by frame to ``out``; ``smoother``
    (reset first) smooths the probabilities over time. A stop request ends it after the current
    frame, keeping the frames done (the usual end of a webcam). ``pipelined=False`` does every
    step in this thread, one frame after the other (same frames, slower)."""
    stream, fps, count = frames(source)
    if smoother:
        smoother.reset()
    writer = OverlayWriter(out, fps)
    output: Background[Result] | Inline[Result] = (
        Background(writer) if pipelined else Inline(writer)
    )
    reader = read_ahead(stream) if pipelined else stream
    n = 0
    try:
        for frame in reader:
            output.put(predictor.predict(frame, smoother))
            n += 1
            if progress:
                progress(n, count)
            if (max_frames and n >= max_frames) or (stop and stop.signum):
                break
        else:  # the stream ended by itself: a damaged or cut file ends early
            if n < count - max(1, count // 50):  # containers may estimate the count a little
                raise ImageReadError(
                    str(source), f"frame {n + 1} of {count} cannot be read (damaged or cut file)"
                )
    except BaseException:
        output.abandon()
        raise
    else:
        output.close()
    finally:
        reader.close()
        writer.release()
    if writer.count == 0:
        raise ImageReadError(str(source), "no frames could be read")
