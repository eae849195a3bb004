"""A real but tiny training run on synthetic images, and every config or run-folder mistake
refused before training starts."""

import csv
import dataclasses
import os
import signal

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lightning as L  # noqa: E402
from conftest import tiny_config  # noqa: E402
from synthetic import make_folder_dataset  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from hiseg import training  # noqa: E402
from hiseg.augment import PairTransform  # noqa: E402
from hiseg.cli import app  # noqa: E402
from hiseg.config import Config, ConfigError, load_config  # noqa: E402
from hiseg.data import DatasetError, open_dataset  # noqa: E402
from hiseg.models import load_checkpoint, preprocessing  # noqa: E402
from hiseg.taxonomy import IGNORE_VALUE, load_tree  # noqa: E402
from hiseg.training import (  # noqa: E402
    AtomicCheckpointIO,
    SegmentationTask,
    TrainingError,
    TrainSet,
    build_loaders,
    init_weights,
    prepare_run_dir,
    train,
)

CONFIG = "configs/pascal-person-part.yaml"


def history(folder):
    with (folder / "history.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_run_learns_checkpoints_reload_and_resume(tiny_data, tmp_path):
    config = tiny_config(tiny_data, tmp_path)
    task = train(config, track=False)
    folder = tmp_path / "tiny"
    rows = history(folder)
    assert [int(r["epoch"]) for r in rows] == list(range(6))
    losses = [float(r["loss_epoch"]) for r in rows]
    assert losses[-1] < 0.7 * losses[0], losses

    # the checkpoint alone rebuilds the model: identical predictions
    model, spec = load_checkpoint(folder / "last.ckpt")
    assert spec.tree.name == "pascal-person-part" and spec.long_side == 160
    x = torch.randn(1, 3, 96, 128)
    task.model.eval()
    with torch.no_grad():
        reloaded, trained = model(x), task.model(x)
    # channels_last (training) vs contiguous (reloaded) convolutions differ in rounding only
    torch.testing.assert_close(reloaded, trained, atol=1e-4, rtol=1e-4)
    assert torch.equal(reloaded.argmax(1), trained.argmax(1))
    assert (folder / "best.ckpt").is_file()

    # --resume continues from the saved step instead of starting over
    saved = torch.load(folder / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 12
    with pytest.raises(TrainingError, match="--resume"):
        train(config, track=False)
    train(tiny_config(tiny_data, tmp_path, **{"trainer.max_epochs": 7}), resume=True, track=False)
    resumed = torch.load(folder / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 14
    assert [int(r["epoch"]) for r in history(folder)] == list(range(7))


@pytest.mark.slow
def test_mlflow_tracking_records_params_metrics_and_images(tiny_data, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = tiny_config(
        tiny_data,
        tmp_path,
        **{"trainer.max_epochs": 1, "tracking.mlflow": "true", "tracking.uri": uri},
    )
    train(config, track=True)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = (tmp_path / "tiny" / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.data.params["config/model/arch"] == "fpn"
    assert {"val/miou0", "val/miou1", "val/miou2", "val/score"} <= set(run.data.metrics)
    artifacts = [a.path for a in client.list_artifacts(run_id, "val")]
    assert any(p.endswith(".png") for p in artifacts)


def test_killed_checkpoint_write_keeps_last_good_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dies_mid_write(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is stopped while writing

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer\.max_epoch'"):
        load_config("configs/pascal-person-part.yaml", ["trainer.max_epoch=3"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config("configs/pascal-person-part.yaml", ["trainer.max_epochs"])
    config = load_config("configs/pascal-person-part.yaml", ["data.scale=[0.3, 1.0]"])
    assert config.data.scale == [0.3, 1.0] and config.name == "pascal-person-part"
    # model.decoder passes the architecture's own options through unchecked
    config = load_config("configs/picsart-person.yaml", ["model.decoder.upsampling=2"])
    assert config.model.decoder == {
        "decoder_pyramid_channels": 64,
        "decoder_segmentation_channels": 32,
        "upsampling": 2,
    }
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.decoders'"):
        load_config("configs/picsart-person.yaml", ["model.decoders.upsampling=2"])
    # data.extra: a folder, or a mapping with root / split / format
    config = load_config("configs/picsart-person.yaml", ["data.extra=[a, {root: b, split: val}]"])
    assert [dataclasses.asdict(e) for e in config.data.extra] == [
        {"root": "a", "split": "train", "format": "auto"},
        {"root": "b", "split": "val", "format": "auto"},
    ]
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.extra\[0\]\.splits'"):
        load_config("configs/picsart-person.yaml", ["data.extra=[{root: a, splits: val}]"])


def test_extra_sets_join_training_in_the_main_sets_tree(tiny_data, tmp_path):
    """A part dataset trains a person model as person vs background; it cannot train a part
    model from person masks."""
    config = tiny_config(tiny_data, tmp_path, **{"data.extra": f"[{tiny_data}]"})
    norm = preprocessing(config.model.encoder)
    train_loader, _, train_data = build_loaders(config, norm["mean"], norm["std"])
    assert len(train_loader.dataset) == 2 * len(train_data)

    parts = open_dataset(tiny_data, "train")
    person = load_tree("person")
    identity = PairTransform([])
    as_person = TrainSet(parts, identity, norm["mean"], norm["std"], person)
    _, target = as_person[0]
    _, labels = parts[0]
    expected = np.where(labels == IGNORE_VALUE, IGNORE_VALUE, labels != 0)
    assert np.array_equal(target.numpy(), expected)
    assert set(np.unique(target.numpy())) <= {0, 1, IGNORE_VALUE}

    person_data = type("PersonData", (), {"tree": person, "root": tmp_path})()
    with pytest.raises(DatasetError, match="cannot train a model of tree 'pascal-person-part'"):
        TrainSet(person_data, identity, norm["mean"], norm["std"], parts.tree)


def test_drop_leaves_listed_train_ids_out_and_names_unknown_ones(tiny_data, tmp_path):
    """data.drop: the listed train ids (comments allowed) are left out of training; an id the
    split lacks, or a missing list file, is an error naming it."""
    ids = open_dataset(tiny_data, "train").ids
    drop = tmp_path / "drop.txt"
    drop.write_text(f"# wrong masks\n{ids[0]}  # blob outside the person\n\n{ids[3]}\n")
    config = tiny_config(tiny_data, tmp_path, **{"data.drop": drop})
    norm = preprocessing(config.model.encoder)
    _, _, train_data = build_loaders(config, norm["mean"], norm["std"])
    assert train_data.ids == [i for i in ids if i not in (ids[0], ids[3])]

    drop.write_text(f"{ids[1]}\nno_such_id\n")
    with pytest.raises(DatasetError, match="has no sample 'no_such_id'"):
        build_loaders(config, norm["mean"], norm["std"])
    config.data.drop = str(tmp_path / "missing.txt")
    with pytest.raises(DatasetError, match=r"missing\.txt: no such file"):
        build_loaders(config, norm["mean"], norm["std"])


def test_init_starts_from_a_checkpoint_and_checks_it_fits(tiny_data, tiny_checkpoint, tmp_path):
    config = tiny_config(tiny_data, tmp_path, **{"model.pretrained": "false"})
    task = SegmentationTask(config, open_dataset(tiny_data, "train").tree.to_dict())
    trained, _ = load_checkpoint(tiny_checkpoint)
    key = "net.decoder.seg_blocks.0.block.0.block.0.weight"
    assert not torch.equal(task.model.state_dict()[key], trained.state_dict()[key])
    init_weights(task, tiny_checkpoint)
    for name, value in trained.state_dict().items():
        assert torch.equal(task.model.state_dict()[name], value), name

    wider = tiny_config(tiny_data, tmp_path, **{"model.decoder.decoder_segmentation_channels": 32})
    other = SegmentationTask(wider, task.tree.to_dict(), pretrained=False)
    with pytest.raises(ConfigError, match=r"model\.init needs the same model"):
        init_weights(other, tiny_checkpoint)


def test_loss_settings_only_the_tree_can_check_are_a_config_error(tiny_data, tmp_path):
    """One error line from `hiseg train`, not a ValueError traceback."""
    config = tiny_config(tiny_data, tmp_path, **{"loss.level_weights": "[1, 2]"})
    tree = open_dataset(tiny_data, "train").tree.to_dict()
    message = r"config key 'loss': 2 level weights given; tree 'pascal-person-part' has 3 levels"
    with pytest.raises(ConfigError, match=message):
        SegmentationTask(config, tree, pretrained=False)


def test_lr_schedule_warms_up_then_decays():
    from hiseg.training import lr_schedule

    f = lr_schedule("cosine", warmup=10, total=110, min_ratio=0.01)
    values = np.array([f(s) for s in range(110)])
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert np.all(np.diff(values[10:]) <= 1e-12) and values[-1] == pytest.approx(0.01, abs=1e-3)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tiny_data, tmp_path):
    """The multi-GPU / multi-node path (DDP), run here as two CPU processes over gloo."""
    import subprocess
    import sys
    from pathlib import Path

    hiseg_cli = Path(sys.executable).parent / "hiseg"
    overrides = [
        f"data.root={tiny_data}",
        f"out_dir={tmp_path}",
        "name=ddp",
        "data.crop_size=128",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.val_long_side=160",
        "trainer.max_epochs=1",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        # what a reloaded checkpoint runs in: fp32, no channels_last (the same sums)
        "trainer.precision=32-true",
        "trainer.channels_last=false",
        "trainer.progress_bar=false",
    ]
    config = Path(__file__).resolve().parents[1] / "configs" / "pascal-person-part.yaml"
    done = subprocess.run(
        [str(hiseg_cli), "train", str(config), *overrides, "--no-track"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = tmp_path / "ddp" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 2  # 8 images / (2 processes x batch 2)
    (logged,) = history(tmp_path / "ddp")
    assert logged["epoch"] == "0"

    # The checkpoint loads for prediction, and the logged val scores are one confusion matrix
    # over the whole split (3 images on 2 processes: 2 + 1, none counted twice), as one process
    # scoring the same weights gives them, not a mean of the processes' scores.
    from hiseg.evaluation import evaluate_model
    from hiseg.predictor import load

    result = evaluate_model(load(last, threads=1), open_dataset(tiny_data, "val"))
    assert result.total.n_images == 3
    levels = result.scores()["levels"]
    for k, level in levels.items():
        assert float(logged[f"miou{k}"]) == pytest.approx(level["miou"] or 0.0, abs=1e-4), k
    score = np.mean([level["miou"] or 0.0 for level in levels.values()])
    assert float(logged["score"]) == pytest.approx(score, abs=1e-4)


@pytest.mark.slow
def test_last_checkpoint_follows_every_epoch_not_only_new_bests(tiny_data, tmp_path, monkeypatch):
    """A run killed during epoch k must resume from the end of epoch k-1, even when no epoch
    after the first improved the best score."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    import hiseg.training

    folder = tmp_path / "tiny"
    seen = []  # global_step in last.ckpt as each epoch starts

    class FirstIsBest(ModelCheckpoint):  # later epochs never improve the monitored score
        def check_monitor_top_k(self, trainer, current=None) -> bool:
            return not self.best_model_path

    class Watch(hiseg.training.History):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if (folder / "last.ckpt").exists():
                seen.append(torch.load(folder / "last.ckpt", weights_only=False)["global_step"])

    monkeypatch.setattr(hiseg.training, "ModelCheckpoint", FirstIsBest)
    monkeypatch.setattr(hiseg.training, "History", Watch)
    extra = {"trainer.max_epochs": 4, "trainer.checkpoint_every_n_steps": 0}
    train(tiny_config(tiny_data, tmp_path, **extra), track=False)
    assert torch.load(folder / "best.ckpt", weights_only=False)["global_step"] == 2
    assert seen == [2, 4, 6]


def test_config_is_typed_and_checkpoints_keep_it_as_a_plain_dict():
    """Code reads attributes; a checkpoint's copy is the plain dict of the untyped layout, which
    reads back to the same config (a run started before the typed config resumes with it)."""
    config = load_config(CONFIG, ["data.batch_size=4", "optim.lr=2e-3"])
    assert isinstance(config.data.batch_size, int) and config.data.batch_size == 4
    assert isinstance(config.optim.lr, float) and config.optim.lr == 0.002
    plain = config.to_dict()
    assert plain["data"]["crop_size"] == 320 and plain["model"]["decoder"] == {
        "decoder_pyramid_channels": 128,
        "decoder_segmentation_channels": 64,
    }
    assert Config.from_dict(plain) == config
    # the untyped dict an older run holds: YAML-style strings and ints where floats are meant
    older = {**plain, "optim": {**plain["optim"], "lr": "2e-3", "warmup_steps": 100}}
    assert Config.from_dict(older) == config
    share = load_config(CONFIG, ["trainer.limit_train_batches=1.0"]).trainer.limit_train_batches
    assert isinstance(share, float)  # all batches; the int 1 would be one batch
    with pytest.raises(ConfigError, match=r"'data\.crop_size' expects a whole number, got 'big'"):
        Config.from_dict({"data": {"crop_size": "big"}})


def test_task_hyperparameters_are_plain(tiny_data, tmp_path):
    """What Lightning puts into checkpoints must load with torch.load(weights_only=True)."""
    config = tiny_config(tiny_data, tmp_path, **{"model.pretrained": "false"})
    task = SegmentationTask(config, open_dataset(tiny_data, "train").tree.to_dict())
    assert task.hparams["config"] == config.to_dict()
    assert type(task.hparams["config"]) is dict and type(task.hparams["config"]["data"]) is dict
    again = SegmentationTask(**task.hparams)  # what load_from_checkpoint does
    assert again.config == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=", r"'trainer\.max_epochs' expects a whole number, got nothing"),
        ("trainer.max_epochs=0", r"'trainer\.max_epochs' must be at least 1, got 0"),
        ("data.batch_size=2.5", r"'data\.batch_size' expects a whole number, got 2\.5"),
        ("data.batch_size=0", r"'data\.batch_size' must be at least 1, got 0"),
        ("data.crop_size=0", r"'data\.crop_size' must be at least 1, got 0"),
        ("trainer.checkpoint_every_n_steps=-5", r"'trainer\.checkpoint_every_n_steps' must be"),
        ("data.scale=[1.5, 0.5]", r"'data\.scale' must be \[low, high\]"),
        ("optim.schedule=linear", r"'optim\.schedule' must be one of 'cosine', 'poly'"),
        ("data.hflip=maybe", r"'data\.hflip' expects true or false, got 'maybe'"),
        ("trainer.limit_train_batches=0", r"'trainer\.limit_train_batches' must be a number"),
        ("optim.lr=.nan", r"'optim\.lr' expects a number, got nan"),
    ],
)
def test_bad_values_are_one_line_errors_before_training(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])
    result = CliRunner().invoke(
        app, ["train", CONFIG, f"out_dir={tmp_path}", override, "--no-track"]
    )
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not any(tmp_path.iterdir())  # nothing was started


def test_a_binary_config_file_is_one_config_error(tmp_path):
    binary = tmp_path / "last.ckpt"
    binary.write_bytes(b"PK\x03\x04\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"last\.ckpt: not a text file"):
        load_config(binary)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.arch=fnp", r"'model\.arch': unknown architecture 'fnp'"),
        ("model.encoder=tf_efficientnet_lite9", r"'model\.encoder': unknown encoder"),
    ],
)
def test_unknown_model_names_fail_before_any_data_is_read(override, message, tmp_path):
    config = load_config(CONFIG, [f"data.root={tmp_path / 'no_such_data'}", override])
    with pytest.raises(ConfigError, match=message):
        train(config, track=False)


def test_an_unwritable_out_dir_fails_before_the_first_step(tiny_data, tmp_path, monkeypatch):
    """out_dir below a file: no folder can be made there (a read-only mount fails the same way;
    root ignores permission bits, so the test uses a file)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    steps = []
    monkeypatch.setattr(SegmentationTask, "training_step", lambda *a: steps.append(1))
    config = tiny_config(tiny_data, blocker / "runs")
    with pytest.raises(ConfigError, match=r"out_dir: cannot write checkpoints to .*a_file"):
        train(config, track=False)
    assert steps == []


def test_batch_larger_than_the_training_set_is_refused(tiny_data, tmp_path):
    """drop_last would drop every batch: the run would train nothing and say it was done."""
    config = tiny_config(tiny_data, tmp_path, **{"data.batch_size": 9})
    with pytest.raises(
        ConfigError, match=r"'data\.batch_size' is 9, but the training set has only 8"
    ):
        train(config, track=False)


def test_a_corrupt_last_checkpoint_is_one_clear_message(tiny_data, tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 half a zip, the disk filled up")
    config = tiny_config(tiny_data, tmp_path)
    with pytest.raises(TrainingError, match=r"last\.ckpt: cannot resume, the checkpoint is"):
        train(config, resume=True, track=False)
    torch.save({"weights": torch.ones(2)}, folder / "last.ckpt")  # readable, but no run state
    with pytest.raises(TrainingError, match="not a training checkpoint"):
        train(config, resume=True, track=False)
    result = CliRunner().invoke(
        app, ["train", CONFIG, f"data.root={tiny_data}", f"out_dir={tmp_path}", "name=tiny",
              "--resume", "--no-track"]
    )  # fmt: skip
    assert result.exit_code == 2 and "not a training checkpoint" in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_temporary_checkpoints_of_killed_runs_are_removed(tmp_path):
    dead = tmp_path / ".last.999999999.tmp.ckpt"  # no such pid
    alive = tmp_path / f".last.{os.getppid()}.tmp.ckpt"  # a live writer's file is kept
    other = tmp_path / "notes.tmp"
    for path in (dead, alive, other):
        path.write_bytes(b"x")
    prepare_run_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name])


def test_person_crops_use_the_trees_background_value(tmp_path):
    """A folder dataset whose background is 7: crops biased to people land on people, not on
    the background (which a 0 background would take for one big person)."""
    data = make_folder_dataset(tmp_path / "data", n_train=4, n_val=1, background=7)
    config = tiny_config(
        data,
        tmp_path,
        **{"data.crop_size": 24, "data.scale": "[1, 1]", "data.person_crop_prob": 1.0},
    )
    norm = preprocessing(config.model.encoder)
    train_loader, _, train_data = build_loaders(config, norm["mean"], norm["std"])
    assert train_data.tree.background.value == 7
    crops = train_loader.dataset
    background = train_data.tree.leaf_index(np.array(7))
    hits = [
        bool(((target != background) & (target != IGNORE_VALUE)).any())
        for _ in range(10)
        for i in range(len(crops))
        for target in [crops[i][1].numpy()]
    ]
    assert all(hits), f"{hits.count(False)} of {len(hits)} person crops hold no person"


@pytest.mark.slow
def test_frozen_encoder_epochs_keep_the_imagenet_encoder_then_train_it(tiny_data, tmp_path):
    """optim.freeze_encoder_epochs: weights and BatchNorm statistics of the encoder stay those of
    ImageNet while the decoder trains; after the frozen epochs the encoder trains too."""
    from hiseg.models import create_model

    imagenet = create_model("fpn", "tf_efficientnet_lite0", load_tree("pascal-person-part"))
    start = {k: v.clone() for k, v in imagenet.net.encoder.state_dict().items()}
    frozen = {"optim.freeze_encoder_epochs": 1, "trainer.max_epochs": 1, "name": "frozen"}
    task = train(tiny_config(tiny_data, tmp_path, **frozen), track=False)
    after = task.model.net.encoder.state_dict()
    changed = [k for k in start if not torch.equal(start[k].float(), after[k].float().cpu())]
    assert changed == [] or all(k.endswith("num_batches_tracked") for k in changed), changed[:3]
    decoder_before, decoder_after = imagenet.net.decoder, task.model.net.decoder
    assert not torch.equal(decoder_before.p5.weight, decoder_after.p5.weight.cpu())
    more = {**frozen, "trainer.max_epochs": 2}
    task = train(tiny_config(tiny_data, tmp_path, **more), resume=True, track=False)
    after = task.model.net.encoder.state_dict()
    assert any(not torch.equal(start[k].float(), after[k].float().cpu()) for k in start)


@pytest.mark.slow
def test_ema_weights_are_validated_saved_and_loaded_for_prediction(tiny_data, tmp_path):
    """trainer.ema_decay: the checkpoint's model weights are the average (what load_checkpoint
    and export use), the raw weights are kept beside them to resume training."""
    config = tiny_config(tiny_data, tmp_path, **{"trainer.ema_decay": 0.5, "trainer.max_epochs": 2})
    train(config, track=False)
    saved = torch.load(tmp_path / "tiny" / "last.ckpt", weights_only=True)
    averaged, raw = saved["state_dict"], saved["current_model_state"]
    key = next(k for k in averaged if k.endswith("segmentation_head.0.weight"))
    assert not torch.equal(averaged[key], raw[key])
    model, _ = load_checkpoint(tmp_path / "tiny" / "last.ckpt")
    assert torch.equal(model.state_dict()[key.removeprefix("model.")], averaged[key])


def test_cached_images_give_the_same_crops_without_reading_the_files_again(tmp_path):
    """data.cache_images: images and masks are decoded once, when the loaders are built; the
    crops are those of the uncached path (same seed), on a second pass too (augmentation cannot
    alter a cached sample), and come with the files gone."""
    root = make_folder_dataset(tmp_path / "data", n_train=4, n_val=1)
    sets = {}
    for cache in (False, True):
        config = tiny_config(root, tmp_path, **{"data.cache_images": cache})
        norm = preprocessing(config.model.encoder)
        sets[cache] = build_loaders(config, norm["mean"], norm["std"])[0].dataset
    passes = [[sets[False][i] for i in range(len(sets[False]))] for _ in range(2)]
    for folder in ("images", "masks"):
        for path in (root / folder).iterdir():
            path.unlink()
    for expected in passes:
        for i, (x, target) in enumerate(expected):
            cached_x, cached_target = sets[True][i]
            assert torch.equal(cached_x, x) and torch.equal(cached_target, target), i
    assert not torch.equal(passes[0][0][0], passes[1][0][0])  # the crops are random


def test_frozen_stem_keeps_its_imagenet_weights_and_statistics(tiny_data, tmp_path):
    """optim.freeze_stem: the encoder's stem conv, BatchNorm and first block are left out of the
    optimiser and keep their ImageNet weights and running statistics while the rest trains."""
    from hiseg.models import create_model
    from hiseg.training import stem

    imagenet = create_model("fpn", "tf_efficientnet_lite0", load_tree("pascal-person-part"))
    before = {k: v.clone() for k, v in imagenet.net.encoder.state_dict().items()}
    extra = {"optim.freeze_stem": True, "trainer.max_epochs": 1, "trainer.limit_train_batches": 1}
    task = train(tiny_config(tiny_data, tmp_path, **extra), track=False)
    after = task.model.net.encoder.state_dict()
    stem_keys = [
        k for k in before if k.startswith(("model.conv_stem", "model.bn1", "model.blocks.0."))
    ]
    assert len(stem_keys) > 10 and any("running_mean" in k for k in stem_keys)
    for key in stem_keys:
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(before[key], after[key].cpu()), key
    assert not torch.equal(
        before["model.blocks.1.0.conv_pw.weight"], after["model.blocks.1.0.conv_pw.weight"]
    )
    optimised = {id(p) for g in task.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in stem(task.model).parameters()}


def test_compile_compiles_the_network_in_place(tiny_data, tmp_path, monkeypatch):
    """trainer.compile: the network's calls go through torch.compile (inductor); the state dict
    keeps its keys, so checkpoints load into an uncompiled model."""
    compiled = []

    def record(fn, *args, **kwargs):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", record)
    tree = open_dataset(tiny_data, "train").tree.to_dict()
    plain = SegmentationTask(tiny_config(tiny_data, tmp_path), tree, pretrained=False)
    assert compiled == []
    config = tiny_config(tiny_data, tmp_path, **{"trainer.compile": True})
    task = SegmentationTask(config, tree, pretrained=False)
    assert [getattr(fn, "__self__", None) for fn in compiled] == [task.model.net]
    assert task.state_dict().keys() == plain.state_dict().keys()


def test_the_large_config_is_the_base_with_the_long_runs_overrides():
    """configs/pascal-person-part-large.yaml documents the run that made the large model: it
    must stay the base config plus exactly that run's command-line overrides."""
    overrides = [
        "model.encoder=tf_efficientnet_lite2",
        "data.crop_size=384",
        "model.decoder.decoder_pyramid_channels=256",
        "model.decoder.decoder_segmentation_channels=128",
        "loss.lovasz=0.5",
        "trainer.max_epochs=24",
    ]
    large = load_config("configs/pascal-person-part-large.yaml").to_dict()
    run = load_config(CONFIG, overrides).to_dict()
    assert large.pop("name") == "pascal-person-part-large" and run.pop("name")
    assert large == run


class StopAt(L.Callback):
    """Sends this process SIGTERM after training step ``step``, as a scheduler would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_saves_the_steps_done_exits_143_and_resumes(tiny_data, tmp_path, monkeypatch):
    """Stopped mid-epoch (2 steps an epoch, stopped after step 3), the run saves step 3 (the
    periodic save had step 2), exits with 143 and a resume line instead of Lightning's status 0,
    and ``--resume`` finishes it."""
    build = training.build_trainer

    def stopped_after_step_3(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callbacks.append(StopAt(3))
        return trainer

    monkeypatch.setattr(training, "build_trainer", stopped_after_step_3)
    config = tiny_config(tiny_data, tmp_path, **{"trainer.max_epochs": 3})
    # as in `hiseg train`'s own process: no handler yet (ray.init, in another test, leaves one
    # that exits, and Lightning calls it before its own)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(training.TrainingStopped, match=r"SIGTERM at epoch 2, step 3.*--resume"):
            train(config, track=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    last = tmp_path / "tiny" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3
    monkeypatch.undo()
    train(config, resume=True, track=False)
    assert torch.load(last, weights_only=False)["global_step"] == 6


def test_a_stopped_run_exits_143_naming_the_resume(monkeypatch, tmp_path):
    def stopped(*args, **kwargs):
        raise training.TrainingStopped("runs/x: stopped by SIGTERM ...; continue it with --resume")

    monkeypatch.setattr(training, "train", stopped)
    result = CliRunner().invoke(app, ["train", CONFIG, f"out_dir={tmp_path}"])
    assert result.exit_code == 143, result.output
    assert "continue it with --resume" in result.output
