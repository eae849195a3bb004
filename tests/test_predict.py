"""`hiseg predict` and the Python API on a small model trained inside the session."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import hiseg
from hiseg.cli import app
from hiseg.errors import HisegError

runner = CliRunner()


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return hiseg.load(tiny_checkpoint)


def test_python_api(predictor, synthetic_photo):
    path = synthetic_photo
    result = predictor.predict(path)
    h, w = np.asarray(Image.open(path)).shape[:2]
    assert result.labels.shape == (h, w) and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) <= set(predictor.tree.values)
    np.testing.assert_allclose(result.probs.sum(0), 1.0, atol=1e-4)
    for k in range(3):
        assert result.level(k).max() < len(predictor.tree.level(k).nodes)
    assert result.overlay().shape[0] == h and result.overlay().shape[1] > w  # legend on the right
    summary = result.summary()
    assert sum(summary["levels"]["2"].values()) == pytest.approx(1.0, abs=1e-3)
    batch = predictor.predict_batch([path, result.image])
    assert np.array_equal(batch[0].labels, batch[1].labels)


def odd_images(folder, photo):
    """The same photo as CMYK, grayscale, 16-bit, RGBA and EXIF-rotated files."""
    img = Image.fromarray(photo)
    img.convert("CMYK").save(folder / "cmyk.jpg")
    img.convert("L").save(folder / "gray.png")
    Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257).save(folder / "deep.png")
    img.convert("RGBA").save(folder / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(folder / "rotated.jpg", exif=exif.tobytes())


def test_cli_many_inputs_with_bad_ones(tiny_checkpoint, synthetic_photo, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    photo = np.asarray(Image.open(synthetic_photo))
    odd_images(src, photo)
    (src / "notes.jpg").write_text("not an image")
    (src / "cut.jpg").write_bytes(synthetic_photo.read_bytes()[:2000])
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "predict",
            str(src),
            str(tmp_path / "nope.jpg"),
            "-m",
            str(tiny_checkpoint),
            "-o",
            str(out),
            "--levels",
            "--json",
        ],
    )
    assert result.exit_code == 1, result.output  # something failed, the rest went on
    assert "notes.jpg: not an image" in result.output
    assert "cut.jpg: truncated" in result.output
    assert "nope.jpg: file not found" in result.output
    h, w = photo.shape[:2]
    for stem in ("cmyk", "gray", "deep", "alpha"):
        labels = np.asarray(Image.open(out / f"{stem}.png"))
        assert labels.shape == (h, w), stem
        assert (out / f"{stem}_overlay.jpg").is_file() and (out / f"{stem}_level2.png").is_file()
    assert np.asarray(Image.open(out / "rotated.png")).shape == (w, h)  # EXIF applied
    summaries = json.loads((out / "summary.json").read_text())["images"]
    assert len(summaries) == 5 and all("people" in s for s in summaries)


def test_cli_video(tiny_checkpoint, synthetic_photo, tmp_path):
    photo = np.asarray(Image.open(synthetic_photo))[:240, :320]
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"mp4v"), 10, (320, 240))
    for shift in range(3):
        writer.write(np.roll(photo, 10 * shift, axis=1)[..., ::-1].copy())
    writer.release()
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(video), "-m", str(tiny_checkpoint), "-o", str(out)])
    assert result.exit_code == 0, result.output
    capture = cv2.VideoCapture(str(out / "clip_overlay.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3


def test_missing_model_is_named(tmp_path):
    result = runner.invoke(app, ["predict", str(tmp_path), "-m", "no-such-model"])
    assert result.exit_code == 2
    assert "no-such-model: no such model file" in result.output


def test_absent_webcam_is_reported_not_hung(tiny_checkpoint, tmp_path):
    result = runner.invoke(
        app, ["predict", "--source", "7", "-m", str(tiny_checkpoint), "-o", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "webcam 7: no such camera, or it is busy" in result.output


def test_a_file_that_is_no_video_is_one_line_of_ours(tmp_path):
    """Not OpenCV's or FFmpeg's own lines first (they write to the process's stderr directly)."""
    fake = tmp_path / "clip.mp4"
    fake.write_text("not a video")
    command = [sys.executable, "-m", "hiseg", "predict", str(fake), "-o", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    reason = f"✗ {fake}: not a video OpenCV can read (unknown or corrupt format)"
    assert lines == ["segmented 0 of 1 input(s); nothing saved", reason], lines


def test_clean_removes_islands_and_fills_holes():
    from hiseg.postprocess import clean_labels
    from hiseg.taxonomy import load_tree

    tree = load_tree("pascal-person-part")
    probs = np.zeros((7, 40, 40), np.float32)
    probs[0] = 0.9  # background everywhere ...
    probs[2, 5:35, 5:35], probs[0, 5:35, 5:35] = 0.9, 0.05  # ... but a torso square
    probs[4, 5:35, 5:35] = 0.05  # head second likeliest inside it
    probs[1:, :, :] += 0.001
    labels = tree.decode(probs)
    labels[1:3, 1:3] = 4  # a 4-pixel island of head on the background
    labels[18:20, 18:20] = 0  # a 4-pixel hole in the torso
    labels[10:12, 10:12] = 4  # a 4-pixel head island inside the torso
    cleaned = clean_labels(probs, labels, tree, min_pixels=10)
    assert (cleaned[1:3, 1:3] == 0).all()
    assert (cleaned[18:20, 18:20] == 2).all()
    assert (cleaned[10:12, 10:12] == 2).all()
    assert (cleaned[0, :] == 0).all()  # the large background touching the border stays
    np.testing.assert_array_equal(clean_labels(probs, labels, tree, 0), labels)

    # A small background notch on the image border is not a hole: it stays.
    probs[2, 0:5, 5:35], probs[0, 0:5, 5:35] = 0.9, 0.05
    labels[0:5, 5:35] = 2  # the torso reaches the top border ...
    labels[0:2, 18:20] = 0  # ... around a 4-pixel notch of background
    cleaned = clean_labels(probs, labels, tree, min_pixels=10)
    assert (cleaned[0:2, 18:20] == 0).all() and (cleaned[18:20, 18:20] == 2).all()


def test_normalize_is_mean_std_scaling_channels_first():
    from hiseg.pipeline import normalize

    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = normalize(image, mean, std)
    assert x.shape == (3, 5, 7) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    want = (image / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(x, want.transpose(2, 0, 1), atol=1e-5)


def test_training_validation_scores_what_predict_gives(tiny_checkpoint, tiny_data):
    """Validation during training predicts through the same pipeline as ``hiseg predict``: its
    last logged scores are those of ``hiseg eval`` on the checkpoint saved after it."""
    import csv

    from hiseg.data import open_dataset
    from hiseg.evaluation import evaluate_model

    with open(tiny_checkpoint.parent / "history.csv") as f:
        logged = list(csv.DictReader(f))[-1]
    result = evaluate_model(hiseg.load(tiny_checkpoint, threads=1), open_dataset(tiny_data, "val"))
    levels = result.scores()["levels"]
    for k, level in levels.items():
        assert float(logged[f"miou{k}"]) == pytest.approx(level["miou"] or 0.0, abs=1e-3), k


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"long_side": -5}, "long_side must be between 32 and 4096"),
        ({"long_side": 100000}, "long_side must be between 32 and 4096"),
        ({"scales": (1.0, float("nan"))}, "scales must be one or more in"),
        ({"scales": ()}, "scales must be one or more in"),
        ({"clean": -1}, "clean must be 0"),
        ({"threads": 0}, "threads must be at least 1"),
    ],
)
def test_the_python_api_refuses_settings_the_cli_refuses(settings, message):
    """hiseg.load checks what the CLI checks: -5 once gave all-background, 100000 the OOM
    killer."""
    with pytest.raises(HisegError, match=message):
        hiseg.load("person", **settings)


def test_threads_are_clamped_to_the_cores():
    from hiseg.predictor import _threads

    assert _threads(100000) == (os.cpu_count() or 1)
    assert _threads(None) == (os.cpu_count() or 1) and _threads(1) == 1
