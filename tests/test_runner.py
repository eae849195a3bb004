"""The runner's inputs (links, globs, webcam indices) and outputs (names that never collide or
replace a file, atomic writes), on the bundled `person` model: no torch, no data needed."""

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hiseg
from hiseg.runner import Saver, Source, expand_sources, run


def photo(path: Path, size=(24, 32), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(path, "PNG")
    return path


@pytest.fixture(scope="module")
def predictor():
    return hiseg.load("person", long_side=64, threads=1)


@pytest.fixture(scope="module")
def result(predictor):
    return predictor.predict(np.random.default_rng(0).integers(0, 256, (24, 32, 3), np.uint8))


# -- inputs -------------------------------------------------------------------------------------


def test_link_loops_and_broken_links_are_reported(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo(folder / "a.jpg")
    (folder / "loop.jpg").symlink_to("loop.jpg")  # a link to itself
    (folder / "gone.jpg").symlink_to("nowhere.jpg")
    (tmp_path / "linked").symlink_to("photos")
    monkeypatch.chdir(tmp_path)
    # each bad file is reached by six names: the folder, a pattern, itself, a relative name and
    # a linked folder
    names = [str(folder), f"{folder}/*.jpg", str(folder / "loop.jpg"), str(folder / "gone.jpg")]
    found = expand_sources([*names, "photos/gone.jpg", "linked"])
    assert [s.path.name for s in found.sources] == ["a.jpg"]
    assert sorted(found.failed) == [  # each once
        (str(folder / "gone.jpg"), "broken symbolic link (to nowhere.jpg)"),
        (str(folder / "loop.jpg"), "symbolic link loop"),
    ]


def test_recursive_glob_through_a_linked_folder_takes_each_file_once(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    photo(folder / "a.jpg")
    photo(folder / "sub" / "b.png")
    (folder / "sub" / "back").symlink_to("..")  # a cycle: photos/sub/back/sub/back/...
    found = expand_sources([f"{folder}/**/*", str(folder / "a.jpg")])
    names = sorted(s.path.name for s in found.sources)
    assert names == ["a.jpg", "b.png"]
    assert found.repeats >= 2
    assert found.failed == [(str(folder / "sub" / "back"), "symbolic link loop")]  # once


def test_an_existing_file_named_by_digits_is_not_a_webcam(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photo(tmp_path / "123")
    found = expand_sources(["123", "7", "./123"])
    assert [(s.kind, s.path) for s in found.sources] == [("image", Path("123")), ("webcam", None)]
    assert found.sources[1].camera == 7 and found.repeats == 1


def test_folders_named_as_inputs_are_listed(tmp_path):
    photo(tmp_path / "a.jpg")
    assert expand_sources([str(tmp_path)]).folders == [tmp_path]


# -- outputs ------------------------------------------------------------------------------------


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_level_and_summary_names_never_collide(tmp_path, predictor):
    """`p` with --levels writes p_level0.png, which the input `p_level0` would also write;
    `summary` with --json writes summary.json, the run summary's name."""
    src = tmp_path / "in"
    src.mkdir()
    names = ["p.jpg", "p_level0.jpg", "summary.jpg"]
    inputs = [photo(src / name, seed=i) for i, name in enumerate(names)]
    out = tmp_path / "out"
    saver = Saver(out, levels=True, summary=True)
    report = run(predictor, [Source("image", p) for p in inputs], saver)
    saver.write_summary(report, len(inputs))
    outputs = [name for s in report.summaries for name in s["outputs"]]
    assert len(outputs) == len(set(outputs)) == 3 * 4  # label map, overlay, 1 level, json each
    assert set(files(out)) == {*outputs, "summary.json"}
    assert saver.summary_file() == out / "summary.json"
    for item in report.summaries:  # each label map is its own input's
        labels = np.asarray(Image.open(out / item["outputs"][0]))
        assert labels.shape == (item["height"], item["width"])
    assert "summary_2.json" in outputs and "p_level0_2.png" in outputs


def test_existing_files_are_never_replaced(tmp_path, result):
    out = tmp_path / "out"
    out.mkdir()
    (out / "photo.png").write_bytes(b"the user's own photo")
    saver = Saver(out)
    first = saver.save(result, "photo")
    second = saver.save(result, "photo")
    assert [p.name for p in first] == ["photo_2.png", "photo_2_overlay.jpg"]
    assert [p.name for p in second] == ["photo_3.png", "photo_3_overlay.jpg"]
    assert (out / "photo.png").read_bytes() == b"the user's own photo"
    assert saver.renamed == [("photo", "photo_2"), ("photo", "photo_3")]


def test_an_interrupted_save_leaves_no_file_of_that_input(tmp_path, result, monkeypatch):
    out = tmp_path / "out"
    saver = Saver(out, levels=True)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(result), "overlay", interrupted)
    with pytest.raises(KeyboardInterrupt):
        saver.save(result, "photo")  # the label map is written, then the overlay fails
    assert files(out) == []  # neither the finished label map, nor claims, nor temporaries


def test_files_appear_whole_under_their_name(tmp_path, result, monkeypatch):
    """Each file is written under a hidden temporary name and renamed: at the moment of writing,
    the final name holds no partial data."""
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append((Path(src).name, Path(dst).name, Path(dst).stat().st_size))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    Saver(tmp_path).save(result, "photo")
    assert [(s.startswith(".photo") and ".tmp" in s, d, size) for s, d, size in seen] == [
        (True, "photo.png", 0),
        (True, "photo_overlay.jpg", 0),
    ]
    assert not [p for p in files(tmp_path) if p.startswith(".")]


def test_a_bad_input_is_reported_and_the_rest_go_on(tmp_path, predictor):
    from test_images import png

    good = photo(tmp_path / "good.jpg")
    bomb = png(tmp_path / "bomb.png", 100_000, 100_000, rows=1)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    sources = [Source("image", p) for p in (bomb, text, good)]
    report = run(predictor, sources, Saver(tmp_path / "out"))
    assert [name for name, _ in report.failed] == [str(bomb), str(text)]
    assert "over the 100 Mpx limit" in report.failed[0][1]
    assert report.done == 3 and [s["image"] for s in report.summaries] == [str(good)]


def test_an_input_whose_files_cannot_be_written_fails_alone(tmp_path, predictor, monkeypatch):
    """E.g. 'a:b.png' on a FAT drive: that input fails, named, and the run goes on."""
    bad, good = photo(tmp_path / "bad.png"), photo(tmp_path / "good.png")
    saver = Saver(tmp_path / "out")
    claim = saver.claim

    def refuse_bad(stem, names):
        if stem == "bad":
            raise OSError(errno.EINVAL, "Invalid argument", str(saver.out / "bad.png"))
        return claim(stem, names)

    monkeypatch.setattr(saver, "claim", refuse_bad)
    report = run(predictor, [Source("image", bad), Source("image", good)], saver)
    assert [name for name, _ in report.failed] == [str(bad)]
    assert "cannot save the results ([Errno 22] Invalid argument" in report.failed[0][1]
    assert report.done == 2 and [s["image"] for s in report.summaries] == [str(good)]


def test_predict_reads_every_accepted_form_like_uint8_and_refuses_the_rest(predictor):
    """Float 0..1 and uint16 arrays once gave silently wrong labels."""
    from hiseg.images import ImageInputError

    path = Path(__file__).parents[1] / "examples" / "astronaut.jpg"
    image = np.asarray(Image.open(path).convert("RGB"))
    want = predictor.predict(image).labels
    assert 0 < (want != predictor.tree.background.value).mean() < 1  # a real, mixed answer
    deep = (image.astype(np.uint16) * 257) | 0x40  # off the multiples of 257
    for given in (image / 255.0, image.astype(np.float32), deep, Image.fromarray(image), path):
        np.testing.assert_array_equal(predictor.predict(given).labels, want)
    for bad in (np.full((8, 8, 3), np.nan), np.zeros((8, 8, 2)), np.zeros((0, 8, 3))):
        with pytest.raises(ImageInputError):
            predictor.predict(bad)


def test_long_input_names_give_names_the_file_system_takes(tmp_path, result):
    stem = "é" * 127  # 254 bytes: the input's own name was at the limit
    paths = Saver(tmp_path, levels=True, summary=True).save(result, stem)
    assert all(len(os.fsencode(p.name)) <= 255 for p in paths)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
