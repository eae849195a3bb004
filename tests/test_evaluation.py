"""Model evaluation, TTA, tiling, zoom-in and reports, on synthetic images and a tiny model
trained on them; scoring a folder of predictions and naming every bad one."""

import json
from itertools import pairwise

import numpy as np
import pytest
from PIL import Image
from synthetic import make_pascal_layout, save_perfect_predictions
from typer.testing import CliRunner

import hiseg
from hiseg.cli import app
from hiseg.data import SIZE_BUCKETS, open_dataset, person_regions, size_bucket
from hiseg.evaluation import (
    BUCKET_NAMES,
    EvaluationError,
    evaluate_model,
    score_prediction_dir,
    size_bucket_map,
)
from hiseg.images import read_image
from hiseg.metrics import ConfusionMatrix
from hiseg.predictor import Predictor, _window_starts
from hiseg.taxonomy import load_tree


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return hiseg.load(tiny_checkpoint, threads=1)


@pytest.fixture(scope="module")
def photo(synthetic_photo):
    """500 x 375 pixels: larger than the model side (160), so tiles."""
    return read_image(synthetic_photo)


def counting(predictor: Predictor) -> list[tuple[int, int]]:
    """Record the size of every image or crop the predictor's passes see."""
    seen: list[tuple[int, int]] = []
    run = predictor.pass_probs

    def pass_probs(image):
        seen.append(image.shape[:2])
        return run(image)

    predictor.pass_probs = pass_probs  # type: ignore[method-assign]
    return seen


def check_probs(predictor: Predictor, image: np.ndarray) -> np.ndarray:
    probs = predictor.leaf_probs(image)
    assert probs.shape == (predictor.tree.num_leaves, *image.shape[:2])
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    labels = predictor.tree.decode(probs)
    assert labels.shape == image.shape[:2]
    assert set(np.unique(labels)) <= set(predictor.tree.values)
    return probs


def test_flip_and_scales(predictor, photo):
    tta = Predictor(predictor.backends, flip=True, scales=(0.75, 1.0, 1.25))
    plain = check_probs(predictor, photo)
    assert not np.allclose(check_probs(tta, photo), plain)


def test_tiling_runs_native_windows_and_the_global_pass(predictor, photo):
    tiled = Predictor(predictor.backends, tile=True)  # model side 160, photo 500 px: tiles
    seen = counting(tiled)
    check_probs(tiled, photo)
    h, w = photo.shape[:2]
    side = tiled.long_side
    windows = len(_window_starts(h, side)) * len(_window_starts(w, side))
    assert seen == [(h, w)] + [(side, side)] * windows


@pytest.mark.parametrize(("length", "size"), [(100, 160), (500, 160), (161, 160), (320, 160)])
def test_windows_cover_the_axis_with_overlap(length, size):
    starts = _window_starts(length, size)
    assert starts[0] == 0 and min(length, starts[-1] + size) == length
    assert all(b - a <= size // 2 for a, b in pairwise(starts))


def test_zoom_refines_only_the_small_person_crop(predictor, photo):
    zoom = Predictor(predictor.backends, flip=True, zoom=True, zoom_margin=0.25)
    tree = zoom.tree
    h, w = photo.shape[:2]
    probs = np.zeros((tree.num_leaves, h, w), np.float32)
    probs[tree.values.index(tree.background.value)] = 1.0  # background everywhere ...
    probs[:, 100:140, 200:220] = 1.0 / tree.num_leaves  # ... but one small likely person
    seen = counting(zoom)
    out = zoom.zoomed_probs(photo, probs)
    assert seen == [(60, 60)]  # 40 px tall + 2 x 25% margin, squared
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-4)
    changed = np.argwhere(np.abs(out - probs).max(0) > 0)
    assert changed.min(0).tolist() >= [90, 180] and changed.max(0).tolist() <= [149, 239]
    assert check_probs(zoom, photo).shape[1:] == (h, w)


def test_size_bucket_map_charges_spill_to_the_nearest_person():
    tree = load_tree("pascal-person-part")
    target = np.zeros((200, 200), np.uint8)
    target[10:190, 10:100] = 1  # a large person: 40% of the image
    target[20:30, 150:160] = 1  # a small one: 0.25%
    target[0, 199] = 255  # ignored
    pred = target.copy()
    pred[0, 199] = 0
    pred[35:40, 150:160] = 2  # spill below the small person
    pred[190:195, 40:60] = 2  # spill below the large person
    buckets = size_bucket_map(target, pred, tree)
    large, small = BUCKET_NAMES.index(">20%"), BUCKET_NAMES.index("<1%")
    assert (buckets[10:190, 10:100] == large).all() and (buckets[190:195, 40:60] == large).all()
    assert (buckets[20:30, 150:160] == small).all() and (buckets[35:40, 150:160] == small).all()
    assert (buckets == -1).sum() == target.size - 180 * 90 - 100 - 50 - 100
    shares = person_regions(target, tree)
    assert sorted(size_bucket(s) for s in shares) == ["<1%", ">20%"]


def test_a_mask_value_outside_the_tree_is_an_error_not_ignored(tiny_data, tmp_path):
    """As --pred-dir already said: a mask holding values the tree does not know is wrong data,
    named with its file, not pixels quietly left out of the score."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    dataset = open_dataset(data, "val")
    mask = dataset.samples[1].mask_path
    labels = np.asarray(Image.open(mask)).copy()
    labels[:3, :3] = 77
    Image.fromarray(labels).save(mask)
    with pytest.raises(EvaluationError, match=r"ground-truth values \[77\] are not in tree"):
        evaluate_model(hiseg.load("pascal-person-part", long_side=64), open_dataset(data, "val"))


def test_evaluate_model_and_report(predictor, tiny_data, tmp_path):
    from hiseg.report import write_report

    dataset = open_dataset(tiny_data, "train")
    dataset.samples = dataset.samples[:6]
    model = Predictor(predictor.backends, flip=True, zoom=True)
    ticks = []
    result = evaluate_model(model, dataset, progress=ticks.append, keep_worst=3, save_dir=tmp_path)
    assert len(ticks) == 6 and len(result.worst) == 3
    assert [e.miou for e in result.worst] == sorted(e.miou for e in result.worst)
    assert result.worst[0].miou == min(v for v in result.image_miou.values() if v is not None)

    report = write_report(result, tmp_path / "report")
    folder = report.parent
    for name in ("report.md", "scores.json", "by_size.png", "worst.png"):
        assert (folder / name).stat().st_size > 0
    for k in range(3):
        assert (folder / f"confusion_level{k}.png").stat().st_size > 0
    saved = json.loads((folder / "scores.json").read_text())

    independent = ConfusionMatrix(dataset.tree)
    for sample in dataset.samples:
        pred = np.asarray(Image.open(tmp_path / f"{sample.id}.png"))
        independent.update(dataset.read_labels(sample), pred)
    rescored = score_prediction_dir(dataset, tmp_path)
    for k, level in independent.scores()["levels"].items():
        assert saved["levels"][k]["miou"] == pytest.approx(level["miou"])
        assert rescored["levels"][k]["miou"] == pytest.approx(level["miou"])
    assert list(saved["by_size"]) == [name for name, _, _ in SIZE_BUCKETS]
    regions = [
        size_bucket(share)
        for sample in dataset.samples
        for share in person_regions(dataset.read_labels(sample), dataset.tree)
    ]
    counts = {name: regions.count(name) for name in BUCKET_NAMES}
    assert {name: b["regions"] for name, b in saved["by_size"].items()} == counts
    text = report.read_text()
    assert "IoU by person size" in text and result.worst[0].id in text


def test_a_part_model_is_scored_on_person_masks_as_person_vs_background(
    predictor, tiny_person_data
):
    dataset = open_dataset(tiny_person_data, "valid")
    dataset.samples = dataset.samples[:4]
    scores = evaluate_model(predictor, dataset).scores()
    assert scores["tree"] == "person" and list(scores["levels"]) == ["0"]
    independent = ConfusionMatrix(load_tree("person"))
    for image, target in dataset:
        labels = predictor.predict(image).labels
        independent.update(target, predictor.tree.person_labels(labels))
    assert scores["iou"] == pytest.approx(independent.scores()["iou"])
    assert 0 < scores["iou"] < 1


def test_log_report_to_mlflow(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from hiseg.report import flat_metrics, log_report_to_mlflow

    monkeypatch.chdir(tmp_path)  # the sqlite store keeps artifacts under ./mlruns
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("# report\n")
    level = {"miou": 0.5, "iou": {"background": 0.9, "person": 0.5}, "dice": {}}
    scores = {
        "levels": {"0": level},
        "pixel_accuracy": 0.9,
        "miou_all_with_background": 0.7,
        "by_size": {"<1%": {"levels": {"0": {"miou": None}}}},
    }
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = log_report_to_mlflow(tmp_path / "report", scores, uri, "eval-test")
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).data.metrics == flat_metrics(scores)
    assert "eval/iou0/person" in flat_metrics(scores)
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/report.md"]


def test_cli_eval_across_trees_lists_the_worst_images(tiny_checkpoint, tiny_person_data, tmp_path):
    out = tmp_path / "scores.json"
    args = ["eval", "--data", str(tiny_person_data), "--split", "valid", "--limit", "3"]
    args += ["-m", str(tiny_checkpoint), "--worst", "2", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "scoring person vs background only" in " ".join(result.output.split())
    scores = json.loads(out.read_text())
    assert scores["tree"] == "person" and scores["n_images"] == 3
    assert len(scores["worst"]) == 2
    text = " ".join(result.output.split())
    # --limit's scores are not mistaken for the whole split's; --worst lists on the terminal too
    assert "scored the first 3 of 4 images" in text
    assert all(f"{item['id']} (" in text.split("lowest mIoU: ")[1] for item in scores["worst"])


def test_a_prediction_folder_names_every_bad_prediction_and_ground_truth(tmp_path):
    """Each malformed prediction is named (not only the first), and ground-truth values outside
    the tree are reported instead of silently ignored; no score is given."""
    ids = make_pascal_layout(tmp_path / "ppp", n=6)
    dataset = open_dataset(tmp_path / "ppp", "val")
    preds = save_perfect_predictions(dataset, tmp_path / "preds")
    assert score_prediction_dir(dataset, preds)["levels"]["2"]["miou"] == 1.0

    def edit(path, change):
        array = np.array(Image.open(path))
        Image.fromarray(change(array)).save(path)

    edit(preds / f"{ids[0]}.png", lambda a: a[:-3])  # wrong size
    edit(preds / f"{ids[1]}.png", lambda a: np.where(a == 2, 7, a).astype(np.uint8))  # not a leaf
    (preds / f"{ids[2]}.png").write_bytes(b"not a png")  # unreadable
    edit(preds / f"{ids[3]}.png", lambda a: np.dstack([a * 30, a, a]))  # colour picture
    gt = tmp_path / "ppp" / "gt_masks" / f"{ids[4]}.png"
    edit(gt, lambda a: np.where(a == 4, 9, a).astype(np.uint8))  # head labelled 9: not in tree
    with pytest.raises(EvaluationError) as caught:
        score_prediction_dir(dataset, preds)
    message = str(caught.value)
    assert message.startswith("5 problem(s): ") and "\n" not in message
    assert f"{ids[0]}.png: prediction is" in message
    assert f"{ids[1]}.png: values [7] are not leaf values" in message
    assert f"{ids[2]}.png: " in message
    assert f"{ids[3]}.png: mask is a colour (RGB) image" in message
    assert f"{ids[4]}.png: ground-truth values [9] are not in tree" in message
    assert ids[5] not in message

    args = ["eval", "--data", str(tmp_path / "ppp"), "--pred-dir", str(preds)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert all(f"{sid}.png" in text for sid in ids[:5]) and "mIoU" not in text


def test_predictions_are_never_saved_over_the_split_masks(tmp_path):
    """--save-pred gt_masks/ would replace each ground-truth <id>.png by the model's labels."""
    make_pascal_layout(tmp_path / "ppp", n=2)
    dataset = open_dataset(tmp_path / "ppp", "val")
    masks = tmp_path / "ppp" / "gt_masks"
    before = {p.name: p.read_bytes() for p in masks.iterdir()}
    assert any(name.endswith(".png") for name in before)
    with pytest.raises(EvaluationError, match="gt_masks: holds the split's images or masks"):
        evaluate_model(hiseg.load("person", threads=1), dataset, save_dir=masks)
    assert {p.name: p.read_bytes() for p in masks.iterdir()} == before


def test_history_plot_is_titled_by_the_run_folder_or_the_given_title(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from hiseg import report

    run = tmp_path / "my-run"
    run.mkdir()
    (run / "history.csv").write_text("epoch,step,loss_epoch,miou0,miou1\n0,10,1.0,0.5,0.4\n")
    titles = []
    monkeypatch.setattr(report, "_save", lambda fig, path, dpi: titles.append(
        [(ax.get_title(), len(ax.lines)) for ax in fig.axes]
    ))  # fmt: skip
    report.plot_history(run / "history.csv", tmp_path / "a.png")
    report.plot_history(run / "history.csv", tmp_path / "b.png", title="the large model")
    assert titles == [[("my-run", 2)], [("the large model", 2)]]
