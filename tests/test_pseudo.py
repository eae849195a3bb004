"""Pseudo-labelling (``hiseg pseudo-label``) and training on pseudo-labels (``data.pseudo``), on
synthetic photos with the bundled models as teachers."""

import json
import os

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image
from synthetic import make_person_folder_dataset
from typer.testing import CliRunner

import hiseg
from hiseg.cli import app
from hiseg.data import DatasetError
from hiseg.pseudo import MANIFEST, PseudoLabels, quantise
from hiseg.taxonomy import IGNORE_VALUE, load_tree

runner = CliRunner()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four synthetic photos (two sizes, both orientations) with no masks, and a broken one."""
    root = make_person_folder_dataset(tmp_path_factory.mktemp("unlabelled"), n=4, split="photos")
    (root / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    return root / "photos"


def label(*args: str):
    return runner.invoke(app, ["pseudo-label", *args])


def good_photos(folder):
    return sorted(p for p in folder.iterdir() if p.stem != "broken")


def test_soft_labels_are_the_teachers_probabilities(photos, tmp_path):
    """An ensemble with flip and scales: each photo's .npz holds that predictor's leaf
    probabilities at the photo's size (uint8), the manifest its teachers and settings; the
    broken photo is reported by name and the others are done."""
    out = tmp_path / "soft"
    teachers = ["-m", "person", "-m", "person"]
    result = label(*teachers, "--data", str(photos), "-o", str(out), "--flip", "--scales", "1,1.25")
    assert result.exit_code == 1, result.output
    assert "broken.jpg" in result.output and "not an image" in result.output
    assert "labelled 4 photo(s)" in result.output

    teacher = hiseg.load(["person", "person"], flip=True, scales=(1.0, 1.25))
    manifest = json.loads((out / MANIFEST).read_text())
    assert [t["tree"] for t in manifest["teachers"]] == ["person", "person"]
    assert manifest["teachers"][0]["file"].endswith("person.onnx")
    assert manifest["settings"] == {
        "mode": "soft",
        "threshold": 0.9,
        "flip": True,
        "scales": [1.0, 1.25],
        "long_side": teacher.long_side,
        "clean": teacher.clean,
    }
    assert [f["image"] for f in manifest["failed"]] == [str(photos / "broken.jpg")]
    shares = [entry["confident"] for entry in manifest["labels"].values()]
    assert f"{np.mean(shares):.1%} per photo on average" in result.output
    for photo in good_photos(photos):
        probs = teacher.predict(photo).probs
        with np.load(out / f"{photo.stem}.npz") as archive:
            stored = archive["probs"]
        width, height = Image.open(photo).size
        assert stored.dtype == np.uint8 and stored.shape == (2, height, width)
        assert np.abs(stored.astype(int) - quantise(probs)).max() <= 1
        entry = manifest["labels"][photo.stem]
        assert entry == {
            "image": photo.name,
            "file": f"{photo.stem}.npz",
            "confident": pytest.approx((probs.max(0) >= 0.9).mean(), abs=1e-4),
        }
    names = ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "broken.jpg"]
    assert sorted(p.name for p in photos.iterdir()) == names  # inputs untouched, nothing added


def test_hard_labels_ignore_the_uncertain_band(photos, tmp_path):
    """Hard mode: the teacher's labels where it is confident, IGNORE_VALUE where its highest
    leaf probability is under the threshold (a band the synthetic photos do have)."""
    out = tmp_path / "hard"
    result = label("-m", "person", "--data", str(photos), "-o", str(out), "--mode", "hard",
                   "--threshold", "0.8", "--limit", "2")  # fmt: skip
    assert result.exit_code == 0, result.output  # the broken photo is beyond --limit
    teacher = hiseg.load("person")
    done = good_photos(photos)[:2]
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([MANIFEST, *(f"{p.stem}.png" for p in done)])
    for photo in done:
        predicted = teacher.predict(photo)
        stored = np.asarray(Image.open(out / f"{photo.stem}.png"))
        uncertain = predicted.probs.max(0) < 0.8
        assert 0 < uncertain.mean() < 0.9, "the test needs an uncertain band"
        assert np.all(stored[uncertain] == IGNORE_VALUE)
        assert np.array_equal(stored[~uncertain], predicted.labels[~uncertain])
        assert set(np.unique(stored)) <= {0, 1, IGNORE_VALUE}


def test_a_rerun_resumes_and_refuses_other_settings(photos, tmp_path):
    """The same command again labels only what is missing; other settings in the same folder
    are refused in one line instead of mixing labels of two teachers."""
    out = tmp_path / "resume"
    args = ["-m", "person", "--data", str(photos), "-o", str(out), "--mode", "hard"]
    assert label(*args, "--limit", "2").exit_code == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert len(first) == 2

    (out / "1.png").unlink()  # e.g. lost when the earlier run was killed
    result = label(*args)
    assert result.exit_code == 1  # the broken photo
    assert "labelled 3 photo(s), 1 already done, 1 failed" in result.output
    assert (out / "0.png").stat().st_mtime_ns == first["0.png"]
    assert len(json.loads((out / MANIFEST).read_text())["labels"]) == 4

    result = label(*args[:-1], "soft")
    assert result.exit_code == 2
    assert 'made with other settings (mode: "hard", not "soft")' in result.output
    result = label("-m", "person", "--data", str(photos), "-o", str(photos))
    assert result.exit_code == 2 and "is the photo folder" in result.output


def test_a_broken_link_is_reported_by_name_and_the_run_goes_on(tmp_path):
    """A photo name that leads nowhere (a broken link, a link loop) is a failure naming the file
    and the reason, never skipped in silence; the other photos are labelled."""
    folder = make_person_folder_dataset(tmp_path / "data", n=1, split="photos") / "photos"
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    result = label("-m", "person", "--data", str(folder), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    assert "labelled 1 photo(s), 0 already done, 2 failed" in result.output
    assert "gone.jpg" in result.output and "broken symbolic link" in result.output
    assert "loop.png" in result.output and "symbolic link loop" in result.output
    failed = json.loads((tmp_path / "out" / MANIFEST).read_text())["failed"]
    assert sorted((os.path.basename(f["image"]), f["reason"]) for f in failed) == [
        ("gone.jpg", f"broken symbolic link (to {tmp_path / 'nowhere.jpg'})"),
        ("loop.png", "symbolic link loop"),
    ]
    # --limit 1 reaches the photo "0.png" only: the bad names after it are not its business
    result = label(
        "-m", "person", "--data", str(folder), "-o", str(tmp_path / "one"), "--limit", "1"
    )
    assert (
        result.exit_code == 0 and "labelled 1 photo(s), 0 already done, 0 failed" in result.output
    )


def test_soft_maps_follow_the_images_geometry():
    """with_maps moves soft maps exactly as the mask: scale, padding (255), crop, flip, rotation."""
    from hiseg.augment import train_transform

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (90, 70, 3), dtype=np.uint8)
    mask = np.zeros((90, 70), np.uint8)
    mask[10:60, 20:45] = 1
    mask[70:, 5:15] = 2
    maps = np.stack([(mask == v) * 200 + 20 for v in (0, 1, 2)]).astype(np.uint8)
    transform = train_transform(96, scale=(0.6, 1.4), rotate_deg=15, seed=3, background_value=0)
    for _ in range(5):
        _, moved_mask, moved = transform.with_maps(image, mask, maps)
        assert moved.shape == (3, 96, 96)
        inside = moved_mask != IGNORE_VALUE
        assert 0 < inside.mean() < 1, "the test needs padding"
        assert np.array_equal(moved.argmax(0)[inside], moved_mask[inside])
        assert np.all(moved[:, ~inside] == IGNORE_VALUE)


def test_soft_targets_of_one_hot_labels_give_the_hard_loss():
    torch = pytest.importorskip("torch")
    from hiseg.losses import HierarchicalLoss

    tree = load_tree("pascal-person-part")
    loss_fn = HierarchicalLoss(tree, level_weights=[1, 2, 1])
    logits = torch.randn(2, tree.num_leaves, 5, 6, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, tree.num_leaves, (2, 5, 6), generator=torch.Generator())
    target[0, 0, :3] = IGNORE_VALUE
    soft = torch.nn.functional.one_hot(target.clamp(max=tree.num_leaves - 1), tree.num_leaves)
    soft = soft.movedim(-1, 1).float()
    soft[0, :, 0, :3] = 0  # no target: ignored
    assert loss_fn(logits, soft).item() == pytest.approx(loss_fn(logits, target).item(), rel=1e-6)
    # a soft target between two leaves is cheapest for logits that split between them
    half = torch.zeros(1, tree.num_leaves, 1, 1)
    half[0, :2] = 0.5
    even, sure = torch.zeros_like(half), torch.zeros_like(half)
    sure[0, 0] = 5.0
    assert loss_fn(even + half * 9, half) < loss_fn(sure, half)


@pytest.fixture(scope="module")
def pascal_soft(photos, tmp_path_factory):
    """Soft pseudo-labels of the bundled Pascal-Person-Part model (the tree of tiny_data)."""
    out = tmp_path_factory.mktemp("pseudo") / "pascal"
    result = label("-m", "pascal-person-part", "--data", str(photos), "-o", str(out),
                   "--long-side", "256")  # fmt: skip
    assert result.exit_code == 1, result.output  # the broken photo
    return out


def test_pseudo_sets_join_training_and_their_soft_loss_trains(tiny_data, pascal_soft, tmp_path):
    """data.pseudo adds the labelled photos to the training set; batches carry their soft
    targets (probabilities summing to 1, 0 on padding) and the soft-target loss is finite and
    decreases as the model trains on them."""
    torch = pytest.importorskip("torch")
    from hiseg.models import preprocessing
    from hiseg.training import SegmentationTask, build_loaders

    pseudo = f"[{{root: {pascal_soft}, weight: 0.5}}]"
    # photos scaled below the crop size: crops hold padding
    small = {"data.pseudo": pseudo, "data.batch_size": 12, "data.crop_size": 64}
    small["data.scale"] = "[0.3, 0.4]"
    config = tiny_config(tiny_data, tmp_path, **small)
    norm = preprocessing(config.model.encoder)
    loader, _, train_data = build_loaders(config, norm["mean"], norm["std"])
    assert len(loader.dataset) == len(train_data) + 4
    x, groups = next(iter(loader))
    assert x.shape == (12, 3, 64, 64)
    kinds = {(target.is_floating_point(), weight): len(index) for index, target, weight in groups}
    assert kinds == {(False, 1.0): 8, (True, 0.5): 4}
    soft = next(target for _, target, _ in groups if target.is_floating_point())
    sums = soft.sum(1)
    assert 0 < (sums == 0).float().mean() < 0.9, "padding carries no target"
    assert torch.allclose(sums[sums > 0], torch.ones(()), atol=1e-5)

    task = SegmentationTask(config, train_data.tree.to_dict())
    task.log = lambda *args, **kwargs: None  # no trainer attached
    index, target, _ = next(g for g in groups if g[1].is_floating_point())
    images = x[index]
    optimizer = torch.optim.Adam(task.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        loss = task.loss_fn(task(images).float(), target)
        assert set(task.loss_fn.last_parts) == {"soft0", "soft1", "soft2"}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    # the batch's loss is the weighted sum of its groups
    task.eval()
    with torch.no_grad():
        logits = task(x).float()
        expected = sum(w * len(i) / len(x) * task.loss_fn(logits[i], t) for i, t, w in groups)
        assert task.training_step((x, groups), 0).item() == pytest.approx(expected.item())


@pytest.mark.slow
def test_a_tiny_run_trains_on_pseudo_labels(tiny_data, pascal_soft, tmp_path):
    pytest.importorskip("torch")
    from hiseg.training import train

    config = tiny_config(
        tiny_data, tmp_path, **{"data.pseudo": f"[{pascal_soft}]", "trainer.max_epochs": 1}
    )
    task = train(config, track=False)
    assert (tmp_path / "tiny" / "last.ckpt").is_file()
    assert np.isfinite(float(task.trainer.callback_metrics["train/soft_loss_epoch"]))


@pytest.fixture(scope="module")
def person_data(tmp_path_factory):
    """A tiny person-folder dataset with train and val splits (a person student's data)."""
    root = tmp_path_factory.mktemp("person")
    make_person_folder_dataset(root, n=4, split="train")
    return make_person_folder_dataset(root, n=1, split="val", seed=2)


def test_hard_labels_of_a_part_teacher_train_a_person_model(person_data, photos, tmp_path):
    """Hard labels are relabelled like masks (parts -> person); soft ones need the same tree."""
    pytest.importorskip("torch")
    from hiseg.config import ConfigError
    from hiseg.models import preprocessing
    from hiseg.training import build_loaders

    norm = preprocessing("tf_efficientnet_lite0")
    out = tmp_path / "parts_hard"
    args = ["--data", str(photos), "-o", str(out), "--long-side", "256", "--limit", "2"]
    assert label("-m", "pascal-person-part", "--mode", "hard", *args).exit_code == 0
    config = tiny_config(person_data, tmp_path, **{"data.pseudo": f"[{out}]"})
    loader, _, train_data = build_loaders(config, norm["mean"], norm["std"])
    assert train_data.tree.name == "person" and len(loader.dataset) == 4 + 2
    _, target, weight = loader.dataset[4]
    assert weight == 1.0 and set(np.unique(target.numpy())) <= {0, 1, IGNORE_VALUE}

    soft = tmp_path / "parts_soft"
    assert label("-m", "pascal-person-part", *args[:3], str(soft), *args[4:]).exit_code == 0
    config = tiny_config(person_data, tmp_path, **{"data.pseudo": f"[{soft}]"})
    with pytest.raises(ConfigError, match="soft labels of tree 'pascal-person-part' cannot train"):
        build_loaders(config, norm["mean"], norm["std"])


def test_pseudo_config_errors_are_one_line(tiny_data, photos, pascal_soft, tmp_path):
    pytest.importorskip("torch")
    from hiseg.config import ConfigError
    from hiseg.models import preprocessing
    from hiseg.training import build_loaders

    person_hard = tmp_path / "person_hard"
    assert label("-m", "person", "--data", str(photos), "-o", str(person_hard), "--mode", "hard",
                 "--limit", "1").exit_code == 0  # fmt: skip
    person_soft = tmp_path / "person_soft"
    assert label("-m", "person", "--data", str(photos), "-o", str(person_soft),
                 "--limit", "1").exit_code == 0  # fmt: skip
    norm = preprocessing("tf_efficientnet_lite0")
    cases = {
        str(tmp_path / "missing"): "no such folder of pseudo-labels",
        str(photos): "no manifest.json",
        str(person_soft): "its tree 'person' cannot train a model of tree 'pascal-person-part'",
        str(person_hard): "cannot train a model of tree 'pascal-person-part'",
        f"{{root: {pascal_soft}, images: {tmp_path / 'gone'}}}": "gone: no such folder",
    }
    for entry, reason in cases.items():
        config = tiny_config(tiny_data, tmp_path, **{"data.pseudo": f"[{entry}]"})
        with pytest.raises(ConfigError) as caught:
            build_loaders(config, norm["mean"], norm["std"])
        message = str(caught.value)
        assert message.startswith("config key 'data.pseudo[0]': ") and "\n" not in message
        assert reason in message, message
    labels = PseudoLabels(pascal_soft)
    assert labels.mode == "soft" and len(labels) == 4 and labels.images == photos.resolve()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"settings": "soft"}, "incomplete manifest"),
        ({"labels": ["a"]}, "'labels' an object"),
        ({"labels": {"a": {"image": "a.jpg"}}}, "labels entry 'a' needs 'image', 'file'"),
    ],
)
def test_a_malformed_manifest_is_one_dataset_error(photos, tmp_path, change, reason):
    """An edited or foreign manifest: one line naming it, not a KeyError or AttributeError."""
    out = tmp_path / "labels"
    result = label("-m", "person", "--data", str(photos), "-o", str(out), "--limit", "1")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, **change}))
    with pytest.raises(DatasetError, match=reason) as caught:
        PseudoLabels(out)
    assert str(out / MANIFEST) in str(caught.value)


def test_a_fresh_run_never_replaces_files_it_did_not_write(photos, tmp_path):
    out = tmp_path / "labels"
    out.mkdir()
    (out / "1.png").write_bytes(b"someone else's file")
    result = label("-m", "person", "--data", str(photos), "-o", str(out), "--mode", "hard")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "1.png: exists, and no manifest.json says" in " ".join(result.output.split())
    assert sorted(p.name for p in out.iterdir()) == ["1.png"]
    assert (out / "1.png").read_bytes() == b"someone else's file"


def test_cli_refuses_bad_options_in_one_line(photos, tmp_path):
    for args, reason in [
        ([], "give the teacher with -m"),
        (["-m", "person", "--mode", "fuzzy"], "--mode must be one of soft, hard"),
        (["-m", "person", "--threshold", "0"], "--threshold must be above 0"),
        (["-m", "person", "--limit", "0"], "--limit must be at least 1"),
        (["-m", "no-such-model"], "no-such-model: no such model file"),
    ]:
        result = label(*args, "--data", str(photos), "-o", str(tmp_path / "x"))
        assert result.exit_code == 2 and reason in result.output, result.output
    assert not os.path.exists(tmp_path / "x")


def test_label_photos_writes_any_teachers_labels(photos, tmp_path):
    """label_photos with a teacher that is not a hiseg model (here a fixed ramp; in
    benchmarks/mediapipe_teacher.py a blend with MediaPipe): its probabilities are stored as
    pseudo_label stores them, its records and settings go in the manifest and decide resuming,
    the broken photo is reported, and PseudoLabels reads the folder back."""
    from hiseg.errors import HisegError
    from hiseg.images import as_rgb
    from hiseg.pipeline import Probabilities
    from hiseg.predictor import Result
    from hiseg.pseudo import label_photos

    tree = load_tree("person")
    expected = {}

    def ramp(paths):
        results = []
        for path in paths:
            try:
                image, _ = as_rgb(path)
            except HisegError as err:
                results.append(err)
                continue
            height, width = image.shape[:2]
            person = np.linspace(0, 1, height * width, dtype=np.float32).reshape(height, width)
            probs = np.stack([1 - person, person])
            expected[path.stem] = probs
            labels = (person >= 0.5).astype(np.uint8)
            results.append(Result(image, labels, tree, path, Probabilities.from_full(probs)))
        return results

    out = tmp_path / "ramp"
    teachers = [{"file": "ramp", "weight": 0.5}]
    report = label_photos(ramp, tree, teachers, {"ramp": 1}, photos, out, batch_size=3)
    assert report.labelled == 4 and [p for p, _ in report.failed] == [str(photos / "broken.jpg")]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["teachers"] == teachers
    assert manifest["settings"] == {"mode": "soft", "threshold": 0.9, "ramp": 1}
    dataset = PseudoLabels(out)
    assert sorted(s.id for s in dataset.samples) == sorted(expected)
    for sample in dataset.samples:
        stored = dataset.read_labels(sample)
        assert np.array_equal(stored, quantise(expected[sample.id]))
        assert manifest["labels"][sample.id]["confident"] == pytest.approx(
            (expected[sample.id].max(0) >= 0.9).mean(), abs=1e-4
        )
    with pytest.raises(ValueError, match=r"made with other settings \(ramp: 1, not 2\)"):
        label_photos(ramp, tree, teachers, {"ramp": 2}, photos, out)
