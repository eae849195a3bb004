import json

import numpy as np
import pytest
import yaml
from PIL import Image
from synthetic import make_folder_dataset, make_pascal_layout, save_perfect_predictions
from typer.testing import CliRunner

from hiseg.cli import app
from hiseg.data import (
    DatasetError,
    PascalPersonPart,
    PersonFolder,
    check_dataset,
    dataset_stats,
    detect_format,
    open_dataset,
)

runner = CliRunner()


def test_pascal_reader(pascal_root):
    assert detect_format(pascal_root) == "pascal-person-part"
    train, val = open_dataset(pascal_root, "train"), open_dataset(pascal_root, "val")
    assert isinstance(val, PascalPersonPart)
    assert (len(train), len(val)) == (2826, 353)
    image, labels = val[0]
    assert image.dtype == np.uint8 and image.shape[2] == 3
    assert image.shape[:2] == labels.shape
    assert set(np.unique(labels)) <= set(range(7))


def test_person_folder_reader(picsart_root):
    assert detect_format(picsart_root) == "person-folder"
    train, valid = open_dataset(picsart_root, "train"), open_dataset(picsart_root, "valid")
    assert isinstance(valid, PersonFolder)
    assert (len(train), len(valid)) == (1150, 150)
    image, labels = valid[0]
    assert image.shape == (320, 240, 3) and labels.shape == (320, 240)
    assert set(np.unique(labels)) == {0, 1}  # 0/255 files read as leaf values 0/1


def test_unknown_split_and_layout_are_named(tmp_path):
    make_pascal_layout(tmp_path / "ppp", n=2)
    (tmp_path / "ppp" / "train_id.txt").write_text("2099_000000\n")
    with pytest.raises(DatasetError, match=r"no split 'test'.*\(splits: train, val\)$"):
        open_dataset(tmp_path / "ppp", "test")
    with pytest.raises(DatasetError, match="unknown dataset layout"):
        open_dataset(tmp_path, "val")


def test_check_reports_every_problem_by_name(tmp_path):
    root = tmp_path / "ppp"
    ids = make_pascal_layout(root)
    result = runner.invoke(app, ["data", "check", str(root)])
    assert result.exit_code == 0, result.output
    assert "6 samples, ok" in result.output

    truncated = root / "JPEGImages" / f"{ids[0]}.jpg"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    bad_value = root / "gt_masks" / f"{ids[1]}.png"
    mask = np.array(Image.open(bad_value))
    mask[0, 0] = 9
    Image.fromarray(mask).save(bad_value)
    (root / "gt_masks" / f"{ids[2]}.png").unlink()
    resized = root / "gt_masks" / f"{ids[3]}.png"
    Image.open(resized).resize((50, 40), Image.NEAREST).save(resized)
    (root / "JPEGImages" / f"{ids[4]}.jpg").unlink()
    with (root / "val_id.txt").open("a") as f:
        f.write("2099_999999\n")

    problems = check_dataset(open_dataset(root, "val"))
    text = "\n".join(map(str, problems))
    assert f"{ids[0]}.jpg: truncated" in text
    assert f"{ids[1]}.png: label values [9] are not in tree" in text
    assert f"{ids[2]}.jpg: mask is missing" in text
    assert f"{ids[3]}.png: mask is 50x40 but image {ids[3]}.jpg is" in text
    assert f"id '{ids[4]}' is listed in val_id.txt but JPEGImages/{ids[4]}.jpg is absent" in text
    assert "id '2099_999999' is listed" in text
    assert f"{ids[5]}" not in text  # the one clean sample is not reported

    result = runner.invoke(app, ["data", "check", str(root)])
    assert result.exit_code == 1
    for sid in ids[:5]:
        assert sid in result.output


def test_folder_format_with_its_own_tree(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    tree = {
        "name": "toy",
        "nodes": [{"name": "background", "value": 0}, {"name": "thing", "value": 3}],
    }
    (tmp_path / "tree.yaml").write_text(yaml.safe_dump(tree))
    for i in range(3):
        image = Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8))
        image.save(tmp_path / "images" / f"{i}.png")
        mask = np.zeros((20, 30), np.uint8)
        mask[5:10, 5:15] = 3 if i < 2 else 4
        Image.fromarray(mask).save(tmp_path / "masks" / f"{i}.png")
    ds = open_dataset(tmp_path, "all")
    assert ds.format == "folder" and ds.tree.name == "toy" and len(ds) == 3
    problems = check_dataset(ds)
    assert [p.path.name for p in problems] == ["2.png"]
    assert "label values [4]" in problems[0].reason


def test_an_id_with_neither_image_nor_mask_is_said_in_words(tmp_path):
    """Not "its mask is None": a listed id with no files says both are missing."""
    root = make_folder_dataset(tmp_path / "data")
    ids = (root / "val.txt").read_text().split()
    (root / "val.txt").write_text("\n".join([*ids, "ghost"]) + "\n")
    problems = check_dataset(open_dataset(root, "val"))
    reasons = [p.reason for p in problems if "ghost" in str(p.path)]
    assert "image for 'ghost' is missing (no mask either)" in reasons, reasons
    assert not any("None" in p.reason for p in problems)


def test_stats_on_real_val(pascal_root, tmp_path):
    stats = dataset_stats(open_dataset(pascal_root, "val"))
    summary = stats.to_dict()
    assert summary["n_images"] == 353
    for k in range(3):
        assert sum(summary["levels"][str(k)].values()) == pytest.approx(1.0)
    buckets = summary["person_regions"]["buckets"]
    assert sum(buckets.values()) == summary["person_regions"]["count"] > 353
    assert buckets["<1%"] > 0  # the small people every seed project missed

    result = runner.invoke(
        app, ["data", "stats", str(pascal_root), "--split", "val", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    png = tmp_path / "pascal-person-part_val.png"
    assert png.stat().st_size > 10_000
    assert json.loads((tmp_path / "pascal-person-part_val.json").read_text()) == summary


def test_eval_prediction_dir(tmp_path):
    ids = make_pascal_layout(tmp_path / "ppp", n=5)
    preds = save_perfect_predictions(open_dataset(tmp_path / "ppp", "val"), tmp_path / "preds")
    out = tmp_path / "scores.json"
    args = ["eval", "--data", str(tmp_path / "ppp"), "--split", "val", "--pred-dir", str(preds)]
    result = runner.invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    assert scores["n_images"] == 5
    assert [scores["levels"][k]["miou"] for k in "012"] == [1.0, 1.0, 1.0]
    assert "mIoU2" in result.output

    (preds / f"{ids[3]}.png").unlink()
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert ids[3] in result.output and "no prediction" in result.output

    # model options would be silently ignored on saved label maps: refused, named
    result = runner.invoke(app, [*args, "--accurate", "--long-side", "640"])
    assert result.exit_code == 2
    assert "--long-side, --accurate apply to a model" in " ".join(result.output.split())
    result = runner.invoke(app, [*args, "--flip"])
    assert result.exit_code == 2 and "--flip applies to a model" in result.output


def test_long_runs_off_a_terminal_print_progress_lines(tmp_path):
    """A log file gets a line at every tenth of a long run (a Rich bar draws nothing there)."""
    make_pascal_layout(tmp_path / "ppp", n=20)
    preds = save_perfect_predictions(open_dataset(tmp_path / "ppp", "val"), tmp_path / "preds")
    args = ["eval", "--data", str(tmp_path / "ppp"), "--split", "val", "--pred-dir", str(preds)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("scoring val: ")]
    assert lines == [f"scoring val: {n}/20" for n in range(2, 21, 2)]


def check(*args: str):
    return runner.invoke(app, ["data", "check", *map(str, args)])


def test_a_binary_id_list_is_one_error_line(tmp_path):
    root = tmp_path / "ppp"
    make_pascal_layout(root, n=2)
    (root / "val_id.txt").write_bytes(b"2099_000000\n\xff\xfe\n")
    result = check(root)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "val_id.txt: not a text list of ids" in " ".join(result.output.split())


def test_check_never_passes_while_checking_nothing(tmp_path):
    """A --format that does not fit the folder, an unknown one, a layout without split lists
    and an empty split list each fail, naming why; before, some returned 0 having checked
    nothing."""
    root = tmp_path / "ppp"
    make_pascal_layout(root, n=2)
    assert check(root).exit_code == 0
    for fmt, message in [
        ("person-folder", "not a person-folder dataset (expected <split>/ + <split>_mask/"),
        ("folder", "not a folder dataset (expected images/ + masks/ + tree.yaml)"),
        ("pascal", "unknown format 'pascal' (known: auto, pascal-person-part, person-folder"),
    ]:
        result = check(root, "--format", fmt)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), fmt
    (root / "val_id.txt").write_text("# no ids yet\n")
    result = check(root)
    assert result.exit_code == 1 and "val_id.txt: split 'val' has no samples" in result.output
    result = runner.invoke(app, ["data", "stats", str(root), "--out", str(tmp_path / "stats")])
    assert result.exit_code == 2 and "split 'val' has no samples" in result.output
    (root / "val_id.txt").unlink()
    result = check(root)
    assert result.exit_code == 2 and "no splits in this pascal-person-part dataset" in " ".join(
        result.output.split()
    )


def test_check_flags_ids_listed_twice(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n_train=3, n_val=1)
    ids = (data / "train.txt").read_text().split()
    (data / "train.txt").write_text("\n".join([*ids, ids[1], ids[1]]) + "\n")
    problems = check_dataset(open_dataset(data, "train"))
    assert [str(p) for p in problems] == [f"{data / 'train.txt'}: id '{ids[1]}' is listed 3 times"]
    result = check(data, "--split", "train")
    assert result.exit_code == 1 and f"id '{ids[1]}' is listed 3 times" in result.output


def test_stats_list_an_unreadable_mask_and_count_the_rest(tmp_path):
    root = make_folder_dataset(tmp_path / "data", n_train=3, n_val=1)
    (root / "masks" / "synth_001.png").write_bytes(b"not a png")
    stats = dataset_stats(open_dataset(root, "train"))
    assert stats.n_images == 2 and len(stats.sizes) == 2
    assert [p.path.name for p in stats.skipped] == ["synth_001.png"]
