"""`hiseg predict / eval / bench` against bad options, bad output locations, bad inputs,
concurrent runs and signals, on the bundled `person` model (ONNX, no torch, no data needed)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_images import png
from typer.testing import CliRunner

from hiseg.cli import app

FAST = ["-m", "person", "--long-side", "64", "--threads", "1"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def photo(path: Path, size=(24, 32), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(path)
    return path


def one_error_line(result, text: str) -> str:
    """The result is exit 2 with one line, ``error: ...`` holding ``text``, and no traceback."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert text in lines[0], result.output
    return lines[0]


# -- bounds -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (["--threads", "0"], "--threads must be at least 1, not 0"),
        (["--threads", "-3"], "--threads must be at least 1, not -3"),
        (["--long-side", "-5"], "--long-side must be between 32 and 4096, not -5"),
        (["--long-side", "100000"], "--long-side must be between 32 and 4096, not 100000"),
        (["--clean", "-1"], "--clean must be at least 0, not -1"),
        (["--max-frames", "0"], "--max-frames must be at least 1, not 0"),
        (["--scales", "nan"], "--scales must be between 0.25 and 4, not nan"),
        (["--scales", "1,0"], "--scales must be between 0.25 and 4, not 0"),
        (["--scales", "1,x"], "--scales must be numbers separated by commas, not '1,x'"),
        (["--accurate", "--flip"], "--accurate already sets --flip and --scales"),
        (["--accurate", "--scales", "1,2"], "--accurate already sets --flip and --scales"),
    ],
)
def test_predict_options_out_of_bounds(tmp_path, options, message):
    image = photo(tmp_path / "a.jpg")
    out = tmp_path / "out"
    one_error_line(cli("predict", image, "-m", "person", "-o", out, *options), message)
    assert not out.exists()  # found before anything was done


def test_threads_are_clamped_to_the_cores(tmp_path, monkeypatch):
    import hiseg.predictor

    asked = {}
    real_load = hiseg.predictor.load

    def load(*args, **kwargs):
        asked["threads"] = kwargs["threads"]
        return real_load(*args, **kwargs)

    monkeypatch.setattr(hiseg.predictor, "load", load)
    image = photo(tmp_path / "a.jpg")
    result = cli(
        "predict",
        image,
        "-m",
        "person",
        "--long-side",
        "64",
        "--threads",
        "100000",
        "-o",
        tmp_path / "out",
    )
    assert result.exit_code == 0, result.output
    cores = os.cpu_count()
    assert asked["threads"] == cores
    assert f"--threads 100000 lowered to the {cores} CPU cores" in result.output


def test_accurate_is_flip_and_three_scales(tmp_path, monkeypatch):
    """--accurate reaches hiseg.load, which turns it into flip + ACCURATE_SCALES; its label maps
    are those of the options written out."""
    import hiseg.predictor

    made = []
    real_load = hiseg.predictor.load

    def load(*args, **kwargs):
        made.append(real_load(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(hiseg.predictor, "load", load)
    image = photo(tmp_path / "a.jpg", size=(48, 40))
    for name, options in [
        ("accurate", ["--accurate"]),
        ("spelt", ["--flip", "--scales", "0.75,1,1.25"]),
        ("default_scale", ["--accurate", "--scales", "1.0"]),  # the default, however written
    ]:
        result = cli("predict", image, *FAST, "-o", tmp_path / name, *options)
        assert result.exit_code == 0, result.output
    assert made[0].flip and made[0].scales == hiseg.predictor.ACCURATE_SCALES == (0.75, 1, 1.25)
    first, *others = (
        np.asarray(Image.open(tmp_path / d / "a.png"))
        for d in ("accurate", "spelt", "default_scale")
    )
    assert all(np.array_equal(first, other) for other in others)


def test_accurate_with_other_scales_or_a_flip_is_refused_by_the_api():
    from hiseg.predictor import ModelError, load

    with pytest.raises(ModelError, match="accurate sets the scales"):
        load("person", accurate=True, scales=(1.0, 1.5))
    for flip in (False, True):  # an explicit flip=False was silently overridden
        with pytest.raises(ModelError, match=f"accurate sets flip; got flip={flip}"):
            load("person", accurate=True, flip=flip)
    assert load("person", accurate=True).flip and not load("person").flip


def test_accurate_reaches_the_ray_actors(tmp_path, monkeypatch):
    """--engine ray builds the actors' ``load`` keywords itself (no cluster started here)."""
    import hiseg.cli
    from hiseg.predictor import ACCURATE_SCALES, load

    handed = {}
    monkeypatch.setattr(hiseg.cli, "predict_with_ray", lambda *args: handed.update(args[4]))
    image = photo(tmp_path / "a.jpg")
    result = cli("predict", image, *FAST, "-o", tmp_path / "out", "--engine", "ray", "--accurate")
    assert result.exit_code == 0, result.output
    predictor = load(**handed)
    assert predictor.flip and predictor.scales == ACCURATE_SCALES


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--data", ".", "-m", "person", "--limit", "0"], "--limit must be at least 1"),
        (["eval", "--data", ".", "-m", "person", "--worst", "-1"], "--worst must be at least 0"),
        # options that would otherwise be ignored in silence
        (["eval", "--data", ".", "-m", "person", "--mlflow", "x"], "--mlflow logs the scores"),
        (["eval", "--data", ".", "--pred-dir", ".", "--save-pred", "p"], "--save-pred needs"),
        (["bench", "person.onnx", "--runs", "0"], "--runs must be at least 1, not 0"),
        (["bench", "person.onnx", "--warmup", "-1"], "--warmup must be at least 0, not -1"),
        (["bench", "person.onnx", "--threads", "0"], "--threads must be at least 1, not 0"),
        (["bench", "person.onnx", "--sizes", "320,16"], "--sizes must be between 32 and 4096"),
        (["bench", "person.onnx", "--sizes", "320,"], "--sizes takes comma-separated integers"),
        (["bench", "person.onnx", "--sizes", "big"], "--sizes takes comma-separated integers"),
        (["export", "x.ckpt", "--limit", "0"], "--limit must be at least 1, not 0"),
        (["export", "x.ckpt", "--clean", "-2"], "--clean must be at least 0, not -2"),
        (["export", "x.ckpt", "--long-side", "8"], "--long-side must be between 32 and 4096"),
        (["export", "x.ckpt", "--out", "x.ckpt"], "--out x.ckpt: is the checkpoint itself"),
        (["export", "model.onnx"], "--out model.onnx: is the checkpoint itself"),
        (["export", "x.ckpt", "--out", "photo.jpg"], "--out photo.jpg: an ONNX model's name"),
    ],
)
def test_eval_bench_export_options_out_of_bounds(tmp_path, args, message):
    one_error_line(cli(*args), message)


# -- output locations ---------------------------------------------------------------------------


def test_bad_output_locations_fail_before_any_work(tmp_path):
    """Checked before the model loads: an unknown model would otherwise be the error."""
    image = photo(tmp_path / "a.jpg")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = {
        a_file: f"--out {a_file}: is a file, not a folder",
        a_file / "sub": f"--out {a_file / 'sub'}: cannot create the folder (Not a directory)",
    }
    if Path("/proc/self").is_dir():  # Linux: a folder nobody, not even root, can write in
        cases[Path("/proc/self")] = "--out /proc/self: cannot write there"
    for out, message in cases.items():
        one_error_line(cli("predict", image, "-m", "no-such-model", "-o", out), message)
    out = tmp_path / "out"  # a good place, and a model that does not load: nothing is left there
    one_error_line(cli("predict", image, "-m", "no-such-model", "-o", out, "--json"), "no-such")
    assert list(out.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path):
    image = photo(tmp_path / "a.jpg")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        one_error_line(cli("predict", image, *FAST, "-o", locked), "cannot write there")
    finally:
        locked.chmod(0o755)


def test_eval_and_bench_outputs_are_checked_first(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    data = tmp_path / "no-data"  # would be the error if the outputs were checked later
    one_error_line(cli("eval", "--data", data, "-m", "person", "--json", tmp_path), "--json")
    one_error_line(  # the path given is named, then what is wrong with it
        cli("eval", "--data", data, "-m", "person", "--json", a_file / "s.json"),
        f"--json {a_file / 's.json'}: {a_file} is a file, not a folder",
    )
    one_error_line(
        cli("eval", "--data", data, "-m", "person", "--save-pred", a_file / "p"), "--save-pred"
    )
    one_error_line(cli("eval", "--data", data, "-m", "person", "--report", a_file), "--report")
    one_error_line(cli("bench", "no-such.onnx", "--out", a_file / "b.md"), "--out")


def test_eval_never_writes_into_the_dataset_it_scores(tiny_data, tmp_path):
    """--json over a mask or the id list, or --report plots in a mask folder, would change the
    data; refused before any work, and the files stay as they were."""
    masks = tiny_data / "masks"
    before = {p.name: p.read_bytes() for p in [*masks.iterdir(), tiny_data / "val.txt"]}
    mask = masks / sorted(before)[0]
    for option, path in [("--json", mask), ("--json", tiny_data / "val.txt"), ("--report", masks)]:
        result = cli("eval", "--data", tiny_data, "-m", "person", option, path)
        one_error_line(result, f"{option} {path}: inside the dataset {tiny_data}")
    after = {p.name: p.read_bytes() for p in [*masks.iterdir(), tiny_data / "val.txt"]}
    assert after == before


def test_eval_says_what_an_option_needs_before_any_work(tmp_path, monkeypatch):
    data = tmp_path / "no-data"  # would be the error if the checks came later
    preds = tmp_path / "preds"
    one_error_line(
        cli("eval", "--data", data, "--pred-dir", preds, "--limit", "2"), "--limit needs"
    )
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name: None if name == "matplotlib" else real_find_spec(name),
    )
    report = tmp_path / "report"
    result = cli("eval", "--data", data, "-m", "person", "--report", report)
    one_error_line(result, "pip install 'hiseg[plot]'")
    assert not report.exists()


def test_help_shows_extras_in_brackets():
    # Rich reads [ray] as markup and would print "pip install 'hiseg'"
    assert "'hiseg[ray]'" in " ".join(cli("predict", "--help").output.split())


def test_bench_times_predict_on_the_given_photo(tmp_path):
    import hiseg

    model = Path(hiseg.__file__).parent / "weights" / "person.onnx"
    image = photo(tmp_path / "p.png", size=(48, 40))
    out = tmp_path / "bench.md"
    args = [model, "--sizes", "64", "--runs", "1", "--warmup", "0", "--threads", "1"]
    result = cli("bench", *args, "--out", out, "--image", image)
    assert result.exit_code == 0, result.output
    table = out.read_text()
    assert "48x40x3 photo -> 1x3x64x64" in table and f"--image {image}" in table
    one_error_line(cli("bench", *args, "--out", out, "--image", tmp_path / "none.png"), "none.png")
    before = image.read_bytes()
    one_error_line(cli("bench", *args, "--out", image, "--image", image), "is the --image")
    assert image.read_bytes() == before


def test_data_stats_checks_its_out_first_and_never_writes_into_the_dataset(tiny_data, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    before = sorted(p.name for p in (tiny_data / "masks").iterdir())
    one_error_line(
        cli("data", "stats", tiny_data, "--out", tiny_data / "masks"), "inside the dataset"
    )
    assert sorted(p.name for p in (tiny_data / "masks").iterdir()) == before
    one_error_line(  # before reading anything (it was after, as an [Errno 17])
        cli("data", "stats", tmp_path / "no-data", "--out", a_file), "is a file, not a folder"
    )


def test_eval_of_an_empty_split_is_an_error_not_a_score(tiny_data, tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("images", "masks", "tree.yaml"):
        (tmp_path / "data" / name).symlink_to(tiny_data / name)
    (tmp_path / "data" / "val.txt").write_text("# no ids yet\n\n")
    json_out = tmp_path / "scores.json"
    result = cli("eval", "--data", tmp_path / "data", "-m", "person", "--json", json_out)
    one_error_line(result, "split 'val' has no samples; nothing to score")
    assert not json_out.exists()


def test_consoles_are_wide_with_no_terminal_unless_columns_gives_a_width(monkeypatch):
    """Logs (nohup, CI) get tables up to LOG_WIDTH wide; a terminal on any standard stream, or
    a COLUMNS width, leaves the width to Rich."""
    import io

    from hiseg import cli as cli_module

    for name in ("stdin", "stdout", "stderr"):
        monkeypatch.setattr(f"sys.{name}", io.StringIO())
    monkeypatch.delenv("COLUMNS", raising=False)
    assert cli_module._console().width == cli_module._console(stderr=True).width == 200
    monkeypatch.setenv("COLUMNS", "abc")  # not a width: Rich ignores it too
    assert cli_module._console().width == 200
    monkeypatch.setenv("COLUMNS", "120")
    assert cli_module._console().width == 120
    monkeypatch.delenv("COLUMNS")
    monkeypatch.setattr("sys.stdout", None)  # closed by a daemon: no crash
    assert cli_module._console().width == 200

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Terminal())
    assert cli_module._console().width != 200


def test_bench_by_name_writes_under_runs_a_command_that_reruns(tmp_path, monkeypatch):
    """Its table goes to runs/ (never over the repository's benchmarks/), and the command it
    records is the one given: no '--sizes None' that the CLI would refuse."""
    monkeypatch.chdir(tmp_path)
    result = cli("bench", "person", "--runs", "1", "--warmup", "0", "--threads", "1")
    assert result.exit_code == 0, result.output
    table = (tmp_path / "runs" / "bench.md").read_text()
    assert "`hiseg bench person --threads 1 --runs 1" in table and "1x3x320x256" in table
    # off a terminal (here, as in a log file) each row stays on one line, whole
    row = next(line for line in result.output.splitlines() if "predict" in line)
    assert "person.onnx" in row and "500x375x3 photo -> 1x3x320x256" in row, result.output


# -- inputs are never overwritten, names never collide -------------------------------------------


def test_out_equal_to_an_input_folder_is_refused(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    photo(photos / "photo.png")
    before = (photos / "photo.png").read_bytes()
    one_error_line(cli("predict", photos, *FAST, "-o", photos), "is also an input folder")
    assert sorted(p.name for p in photos.iterdir()) == ["photo.png"]
    assert (photos / "photo.png").read_bytes() == before


def test_writing_beside_an_input_never_replaces_it(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    photo(photos / "photo.png", seed=1)
    photo(photos / "photo.jpg", seed=2)
    before = (photos / "photo.png").read_bytes()
    result = cli("predict", photos / "photo.jpg", photos / "photo.png", *FAST, "-o", photos)
    assert result.exit_code == 0, result.output
    assert (photos / "photo.png").read_bytes() == before
    assert "photo -> photo_2" in result.output and "never replaced" in result.output
    names = {p.name for p in photos.iterdir()}
    assert {"photo_2.png", "photo_2_overlay.jpg", "photo_3.png", "photo_3_overlay.jpg"} <= names


def test_level_and_summary_names_do_not_collide(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate(["p.jpg", "p_level0.jpg", "summary.jpg"]):
        photo(src / name, size=(20 + 4 * i, 30), seed=i)
    out = tmp_path / "out"
    result = cli("predict", src, *FAST, "-o", out, "--levels", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    outputs = [name for item in summary["images"] for name in item["outputs"]]
    assert len(outputs) == len(set(outputs)) == 12
    assert sorted(p.name for p in out.iterdir()) == sorted([*outputs, "summary.json"])
    for item in summary["images"]:
        labels = np.asarray(Image.open(out / item["outputs"][0]))
        assert labels.shape == (item["height"], item["width"])


# -- errors: one handler, failed inputs reported, the batch goes on -------------------------------


def test_a_batch_with_bad_inputs_goes_on_and_lists_them(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = photo(src / "good.jpg")
    bomb = png(src / "bomb.png", 100_000, 100_000, rows=1)  # a header claiming 10 Gpx
    zlib_bomb = png(src / "zbomb.png", 20_000, 20_000, bit_depth=1)  # 400 Mpx of real zeros
    (src / "notes.jpg").write_text("not an image")
    (src / "loop.jpg").symlink_to("loop.jpg")
    out = tmp_path / "out"
    result = cli("predict", src, tmp_path / "missing.jpg", *FAST, "-o", out, "--json")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    failures = {
        str(bomb): "image is over",
        str(zlib_bomb): "image is over",
        str(src / "notes.jpg"): "not an image",
        str(src / "loop.jpg"): "symbolic link loop",
        str(tmp_path / "missing.jpg"): "file not found",
    }
    summary = json.loads((out / "summary.json").read_text())
    listed = {f["input"]: f["reason"] for f in summary["failed"]}
    assert listed.keys() == failures.keys()
    for name in (bomb, zlib_bomb):
        assert "over the 100 Mpx limit" in listed[str(name)]
    for name, reason in failures.items():
        assert reason in listed[name]
        assert f"✗ {name}: {reason}" in result.output
    assert [item["image"] for item in summary["images"]] == [str(good)]
    # paths that led to nothing (the loop, the missing file) count as inputs, failed, like on Ray
    assert (out / "good.png").is_file() and "segmented 1 of 6 input(s)" in result.output
    assert (summary["inputs"], summary["finished"]) == (6, 6)


def test_user_mistakes_are_one_line_without_traceback(tmp_path, monkeypatch):
    image = photo(tmp_path / "a.jpg")
    one_error_line(
        cli("predict", image, "-m", "no-such-model", "-o", tmp_path / "o"),
        "no-such-model: no such model file",
    )
    one_error_line(cli("tree", "show", "no-such-tree"), "no-such-tree")
    one_error_line(cli("predict", "-o", tmp_path / "o"), "nothing to segment")

    import hiseg.runner

    def denied(texts):
        raise PermissionError(13, "Permission denied", texts[0])

    monkeypatch.setattr(hiseg.runner, "expand_sources", denied)
    one_error_line(cli("predict", image, *FAST, "-o", tmp_path / "o"), "Permission denied")


# -- real processes: concurrent runs, signals ----------------------------------------------------


def hiseg(*args) -> subprocess.Popen:
    command = [sys.executable, "-c", "from hiseg.cli import app; app(prog_name='hiseg')"]
    return subprocess.Popen(
        [*command, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_concurrent_runs_into_one_folder_keep_every_result(tmp_path):
    """Three runs over 12 images of the same names (each run its own image size) into one
    --out: every run keeps all 12 results, and each result is its own run's."""
    out = tmp_path / "out"
    runs = []
    for k in range(3):
        src = tmp_path / f"in{k}"
        src.mkdir()
        for i in range(12):
            photo(src / f"img{i:02d}.png", size=(40 + 8 * k, 48), seed=i)
        runs.append(hiseg("predict", src, *FAST, "-o", out, "--json"))
    summaries = []
    for k, process in enumerate(runs):
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        assert "segmented 12 of 12 input(s)" in stdout
        path = Path(stdout.split("summary: ")[1].split()[0])
        summaries.append((k, json.loads(path.read_text())))
    label_maps = set()
    for k, summary in summaries:
        assert len(summary["images"]) == 12
        for item in summary["images"]:
            label_map = out / item["outputs"][0]
            assert np.asarray(Image.open(label_map)).shape == (40 + 8 * k, 48)
            label_maps.add(label_map.name)
    assert len(label_maps) == 36
    assert not [p for p in out.iterdir() if p.name.startswith(".") and "tmp" in p.name]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_run_keeps_whole_files_and_the_summary(tmp_path, signum):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(300):
        photo(src / f"img{i:03d}.jpg", size=(120, 160), seed=i)
    out = tmp_path / "out"
    process = hiseg("predict", src, *FAST, "-o", out, "--json", "--levels")
    deadline = time.monotonic() + 60
    while len(list(out.glob("img*_overlay.jpg"))) < 3 and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, stderr
    assert f"stopped by {name}: segmented" in stdout and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == name and 3 <= summary["finished"] < 300
    listed = {name for item in summary["images"] for name in item["outputs"]}
    on_disk = {p.name for p in out.iterdir()} - {"summary.json"}
    assert on_disk == listed  # no claim, temporary or half-saved input left behind
    for file in out.iterdir():
        if file.suffix == ".json":
            json.loads(file.read_text())
        else:
            Image.open(file).load()  # whole, not truncated


def test_a_signal_mid_video_keeps_the_frames_done(tmp_path):
    """The usual end of a webcam run: Ctrl-C keeps a whole, playable video of the frames done."""
    import cv2

    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"mp4v"), 25, (96, 72))
    rng = np.random.default_rng(0)
    for _ in range(400):
        writer.write(rng.integers(0, 256, (72, 96, 3), np.uint8))
    writer.release()
    out = tmp_path / "out"
    process = hiseg("predict", video, *FAST, "-o", out)
    deadline = time.monotonic() + 60
    while not list(out.glob(".clip_overlay.*.tmp.mp4")) and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "stopped by SIGINT: segmented 1 of 1 input(s)" in stdout
    assert [p.name for p in out.iterdir()] == ["clip_overlay.mp4"]
    capture = cv2.VideoCapture(str(out / "clip_overlay.mp4"))
    assert 0 < int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) < 400
    ok, frame = capture.read()
    assert ok and frame.shape[0] == 72


def test_a_failed_name_with_brackets_is_printed_whole(tmp_path):
    bad = tmp_path / "shot[b].jpg"  # Rich would read [b] as markup (bold) and drop it
    bad.write_text("not an image")
    result = cli("predict", bad, *FAST, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert f"✗ {bad}: not an image" in result.output


@pytest.mark.parametrize("command", ["predict", "eval", "pseudo-label"])
def test_model_option_help_names_every_bundled_model(command):
    from hiseg.predictor import bundled_models

    help_text = " ".join(cli(command, "--help").output.replace("│", " ").split())
    for name in bundled_models():
        assert name in help_text
    # a default only where one applies: eval needs a model or --pred-dir, pseudo-label a teacher
    assert ("default pascal-person-part" in help_text) == (command == "predict")


def test_export_checks_its_out_and_data_before_writing(tiny_checkpoint, tiny_data, tmp_path):
    """A wrong --data or --split, or an --out under a file, is one line and no file is written
    (the export used to be saved first)."""
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    out = tmp_path / "m.onnx"
    for extra, words in [
        (["--data", tmp_path / "nowhere"], "nowhere"),
        (["--data", tiny_data, "--split", "nosuch"], "no split 'nosuch'"),
    ]:
        one_error_line(cli("export", tiny_checkpoint, "--out", out, *extra), words)
        assert not out.exists()
    one_error_line(
        cli("export", tiny_checkpoint, "--out", a_file / "m.onnx"), f"{a_file} is a file"
    )
