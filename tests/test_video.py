"""Videos: temporal smoothing (less flicker, no ghost, images untouched) and pipelined I/O."""

from __future__ import annotations

import itertools
import json
import threading
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import hiseg
from hiseg.cli import app
from hiseg.images import ImageReadError
from hiseg.pipeline import Geometry, Probabilities
from hiseg.runner import Saver, Source, run
from hiseg.video import (
    Background,
    OverlayWriter,
    SmoothingError,
    TemporalSmoother,
    VideoWriteError,
    read_ahead,
    segment_video,
)

METHODS = ["blend", "ema"]
FAST = ["-m", "person", "--long-side", "96", "--threads", "1"]


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=0))
    return (e / e.sum(axis=0)).astype(np.float32)


def flips(label_maps: list[np.ndarray]) -> float:
    return float(np.mean([(a != b).mean() for a, b in itertools.pairwise(label_maps)]))


def smoothed(smoother: TemporalSmoother, sequence: list[np.ndarray]) -> list[np.ndarray]:
    return [smoother.smooth(probs).argmax(axis=0) for probs in sequence]


@pytest.mark.parametrize("method", METHODS)
def test_smoothing_reduces_flicker_on_a_noisy_still_scene(method):
    """A still scene where the network hesitates (small margins, noise): labels flip from frame
    to frame on their own; smoothed, far fewer flip, and they stay right where it was sure."""
    rng = np.random.default_rng(0)
    truth = np.zeros((48, 48), np.intp)
    truth[:, 24:] = 1
    base = np.stack([truth == c for c in range(3)]).astype(np.float32) * 0.6
    sequence = [softmax(base + rng.normal(0, 0.5, base.shape)) for _ in range(30)]
    raw = [p.argmax(axis=0) for p in sequence]
    smooth = smoothed(TemporalSmoother(0.7, method), sequence)
    assert flips(raw) > 0.2
    assert flips(smooth) < 0.6 * flips(raw), (flips(smooth), flips(raw))
    assert np.mean([(s != truth).mean() for s in smooth[5:]]) < np.mean(
        [(r != truth).mean() for r in raw[5:]]
    )


@pytest.mark.parametrize(("method", "strength"), [("blend", 0.9), ("ema", 0.7)])
def test_a_moving_person_leaves_no_ghost(method, strength):
    """A fairly sure square (0.7) moving 4 pixels a frame: the pixels it left are background at
    once, as unsmoothed, instead of trailing behind as a moving average makes them."""
    smoother = TemporalSmoother(strength, method)
    for t in range(8):
        truth = np.zeros((40, 80), np.intp)
        truth[10:30, 10 + 4 * t : 30 + 4 * t] = 1
        probs = np.where(truth == 1, [[[0.3]], [[0.7]]], [[[0.7]], [[0.3]]])
        labels = smoother.smooth(probs.astype(np.float32)).argmax(axis=0)
        np.testing.assert_array_equal(labels, truth, err_msg=f"frame {t}")


def test_blend_leaves_confident_pixels_as_the_current_frame_has_them():
    rng = np.random.default_rng(4)
    smoother = TemporalSmoother(0.9, "blend")
    smoother.smooth(softmax(rng.normal(0, 0.3, (3, 8, 8))))
    current = softmax(rng.normal(0, 0.3, (3, 8, 8)))
    current[:, :4] = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (4, 8))].transpose(2, 0, 1)
    out = smoother.smooth(current)
    np.testing.assert_array_equal(out[:, :4], current[:, :4])  # sure: not blended at all
    assert not np.allclose(out[:, 4:], current[:, 4:])  # unsure: blended


def test_smoothing_works_at_network_resolution_and_restarts_on_another_size():
    small = softmax(np.random.default_rng(1).normal(0, 1, (3, 12, 16)))
    geometry = Geometry((24, 32), (12, 16), (16, 16))
    smoother = TemporalSmoother(0.8)
    smoother(Probabilities.from_network(small, geometry))
    second = smoother(Probabilities.from_network(small[:, ::-1].copy(), geometry))
    assert second.shape == (3, 24, 32)  # still the image's size, smoothed on the 12 x 16 map
    assert not np.allclose(second.full(), Probabilities.from_network(small[:, ::-1], geometry))
    other = softmax(np.random.default_rng(2).normal(0, 1, (3, 8, 8)))
    np.testing.assert_array_equal(smoother.smooth(other), other)  # a new size starts afresh


def test_bad_smoothing_settings_are_refused():
    with pytest.raises(SmoothingError, match="strength"):
        TemporalSmoother(1.0)
    with pytest.raises(SmoothingError, match="method 'median'"):
        TemporalSmoother(0.5, "median")


# -- through the predictor and the runner -----------------------------------------------------


@pytest.fixture(scope="module")
def predictor():
    """The person model: at this size it sees the drawn people (the part model sees none)."""
    return hiseg.load("person", long_side=96, threads=1)


@pytest.fixture(scope="module")
def clip(synthetic_photo, tmp_path_factory) -> Path:
    """6 frames of 160 x 120 of drawn people, panning and noisy."""
    photo = cv2.resize(np.asarray(Image.open(synthetic_photo)), (184, 120), cv2.INTER_AREA)
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 10, (160, 120))
    for t in range(6):
        frame = photo[:, 4 * t : 4 * t + 160] + rng.normal(0, 8, (120, 160, 3))
        writer.write(frame.clip(0, 255).astype(np.uint8)[..., ::-1].copy())
    writer.release()
    return path


def video_frames(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return out
        out.append(frame)


def test_a_video_cut_short_is_a_failure_not_a_shorter_result(predictor, tmp_path):
    """A file declaring 10 frames whose data ends after 5 fails, naming the frame, and leaves
    no overlay video: it was saved as if whole (exit 0)."""
    whole, cut = tmp_path / "whole.avi", tmp_path / "cut.avi"
    writer = cv2.VideoWriter(str(whole), cv2.VideoWriter.fourcc(*"MJPG"), 10, (64, 48))
    for i in range(10):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()
    data = whole.read_bytes()
    chunks = [i for i in range(len(data)) if data.startswith(b"00dc", i)]  # the header's, then
    cut.write_bytes(data[: chunks[6]])  # frames 1-5 kept; the header still declares 10
    out = tmp_path / "out.mp4"
    with pytest.raises(ImageReadError, match=r"cut.avi: frame \d of 10 cannot be read"):
        segment_video(predictor, Source("video", cut), out)
    segment_video(predictor, Source("video", whole), out)  # the whole file is fine
    assert len(video_frames(out)) == 10


def test_pipelined_video_gives_the_frames_of_a_sequential_run(predictor, clip, tmp_path):
    outs = {}
    for pipelined in (False, True):
        outs[pipelined] = tmp_path / f"{pipelined}.mp4"
        segment_video(
            predictor,
            Source("video", clip),
            outs[pipelined],
            smoother=TemporalSmoother(0.8),
            pipelined=pipelined,
        )
    sequential, pipelined = video_frames(outs[False]), video_frames(outs[True])
    assert len(sequential) == 6
    assert all(np.array_equal(a, b) for a, b in zip(sequential, pipelined, strict=True))


def test_a_still_image_is_unaffected_by_smoothing(predictor, clip, tmp_path):
    """After a video of the same size, with strong smoothing on, an image's labels are exactly
    its own prediction's."""
    frame = cv2.cvtColor(video_frames(clip)[-1], cv2.COLOR_BGR2RGB)[:, ::-1]
    image = tmp_path / "still.png"
    Image.fromarray(frame).save(image)
    saver = Saver(tmp_path / "out")
    sources = [Source("video", clip), Source("image", image)]
    report = run(predictor, sources, saver, smoother=TemporalSmoother(0.95))
    assert not report.failed, report.failed
    saved = np.asarray(Image.open(tmp_path / "out" / "still.png"))
    np.testing.assert_array_equal(saved, predictor.predict(image).labels)


def test_cli_video_with_and_without_smoothing(clip, tmp_path, monkeypatch):
    """Both give every frame; they share the first frame (nothing to smooth with yet) and
    differ after it. The progress bar counts frames; summary.json lists the video's output."""
    descriptions = []

    @contextmanager
    def recording_bar(total, description):
        yield lambda n, new_description=None: descriptions.append(new_description)

    monkeypatch.setattr("hiseg.cli.progress_bar", recording_bar)
    frames = {}
    for option in ("--smooth", "--no-smooth"):
        out = tmp_path / option
        args = ["predict", str(clip), *FAST, option, "-o", str(out), "--json"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        frames[option] = video_frames(out / "clip_overlay.mp4")
        summary = json.loads((out / "summary.json").read_text())
        assert summary["videos"] == [{"input": str(clip), "outputs": ["clip_overlay.mp4"]}]
    assert "segmenting: frame 1/6" in descriptions and "segmenting: frame 6/6" in descriptions
    smooth, raw = frames["--smooth"], frames["--no-smooth"]
    assert len(smooth) == len(raw) == 6
    assert np.array_equal(smooth[0], raw[0])
    assert all(not np.array_equal(a, b) for a, b in zip(smooth[1:], raw[1:], strict=True))


def test_cli_refuses_a_smoothing_strength_out_of_range(clip, tmp_path):
    args = ["predict", str(clip), *FAST, "--smooth-strength", "1.5", "-o", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "--smooth-strength must be between 0 and 0.95, not 1.5" in result.output


# -- the pipeline's threads -------------------------------------------------------------------


def test_read_ahead_raises_the_producers_error_after_its_items():
    def produce():
        yield from range(3)
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in read_ahead(produce(), depth=1):
            got.append(item)
    assert got == [0, 1, 2]


def test_closing_read_ahead_stops_its_thread_and_closes_the_source():
    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    items = read_ahead(endless(), depth=2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()
    assert closed.is_set()
    assert not [t for t in threading.enumerate() if t.name == "hiseg-read"]


def test_background_consumes_in_order_and_raises_its_error():
    seen = []
    background = Background(seen.append, depth=2)
    for i in range(20):
        background.put(i)
    background.close()
    assert seen == list(range(20))

    def fail(item):
        raise ValueError(f"cannot encode {item}")

    failing = Background(fail, depth=1)
    with pytest.raises(ValueError, match="cannot encode 0"):
        for i in range(10):
            failing.put(i)
        failing.close()


def test_a_failure_mid_video_stops_every_thread(predictor, clip, tmp_path):
    """The network failing on frame 3 ends the video with that error at once: the reading and
    writing threads are gone (frames still waiting are dropped) and the writer is closed."""
    calls = []

    class Failing:
        def predict(self, frame, adjust=None):
            calls.append(1)
            if len(calls) == 3:
                raise MemoryError("no room for frame 3")
            return predictor.predict(frame, adjust)

    with pytest.raises(MemoryError, match="frame 3"):
        segment_video(Failing(), Source("video", clip), tmp_path / "out.mp4")  # type: ignore[arg-type]
    assert not [t for t in threading.enumerate() if t.name in ("hiseg-read", "hiseg-write")]
    assert len(video_frames(tmp_path / "out.mp4")) <= 2


def test_an_overlay_video_that_cannot_be_written_is_a_named_error(predictor, tmp_path):
    out = tmp_path / "no-such-folder" / "clip.mp4"
    result = predictor.predict(np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(VideoWriteError, match=r"no-such-folder/clip\.mp4: OpenCV cannot write"):
        OverlayWriter(out, 25.0)(result)
