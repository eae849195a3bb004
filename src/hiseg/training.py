"""Training with Lightning: CPU first (bf16 autocast, channels_last), DDP-ready.

``train(config)`` builds the data, model, loss and trainer from one :class:`hiseg.config.Config`
and writes ``best.ckpt`` and ``last.ckpt`` atomically to
``<out_dir>/<name>/``. A checkpoint carries the tree, preprocessing and architecture under the key
``"hiseg"``, so it alone is enough to predict (:func:`hiseg.models.load_checkpoint`).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sized
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import (
    Callback,
    Checkpoint,
    EarlyStopping,
    EMAWeightAveraging,
    ModelCheckpoint,
    RichProgressBar,
)
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import ConcatDataset, DataLoader

from hiseg.augment import train_transform
from hiseg.config import Config, ConfigError
from hiseg.data import Dataset, DatasetError, open_dataset, read_id_list
from hiseg.errors import HisegError
from hiseg.files import publish
from hiseg.losses import build_loss
from hiseg.metrics import ConfusionMatrix
from hiseg.models import ARCHITECTURES, create_model, load_checkpoint, preprocessing
from hiseg.pipeline import normalize
from hiseg.predictor import Backend, Predictor
from hiseg.progress import ProgressLog, use_progress_bar
from hiseg.pseudo import PseudoLabels
from hiseg.spec import METADATA_KEY, ModelSpec
from hiseg.taxonomy import IGNORE_VALUE, Tree
from hiseg.visualize import overlay


def leaf_targets(labels: np.ndarray, tree: Tree) -> np.ndarray:
    """Leaf-value label map -> dense leaf indices, ``IGNORE_VALUE`` where unlabeled."""
    index = tree.leaf_index(labels)
    return np.where(index < 0, IGNORE_VALUE, index).astype(np.int64)


class TrainSet(torch.utils.data.Dataset):
    """Augmented, normalised crops with dense leaf-index targets in ``tree`` (default: the
    dataset's own; another is reached by :meth:`Tree.relabeller`, e.g. parts -> person).

    ``cache=True`` decodes every image and mask once, here (``data.cache_images``): forked loader
    workers share them. They are read-only, so no augmentation can alter a cached sample."""

    def __init__(
        self,
        dataset: Dataset,
        transform,
        mean,
        std,
        tree: Tree | None = None,
        cache: bool = False,
    ):
        self.dataset, self.transform, self.mean, self.std = dataset, transform, mean, std
        self.tree = tree or dataset.tree
        self.cached = [_read_only(dataset[i]) for i in range(len(dataset))] if cache else None
        try:
            self.relabel = dataset.tree.relabeller(self.tree)
        except ValueError:
            raise DatasetError(
                f"{dataset.root}: its tree '{dataset.tree.name}' cannot train a model of tree "
                f"'{self.tree.name}' (only the same tree, or any tree for 'person')"
            ) from None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = self.dataset[i] if self.cached is None else self.cached[i]
        image, labels = self.transform(image, self.relabel(labels))
        x = normalize(image, self.mean, self.std)
        return torch.from_numpy(x), torch.from_numpy(leaf_targets(labels, self.tree))


def _read_only(sample: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    for array in sample:
        array.flags.writeable = False
    return sample


class PseudoTrainSet(TrainSet):
    """Pseudo-labelled photos (:class:`hiseg.pseudo.PseudoLabels`) under the same augmentation
    as labelled ones. Hard labels are targets like masks (uncertain pixels ignored); soft labels
    (leaf probabilities) follow the same geometry and become (leaves, H, W) float targets, zero
    where padded. Items carry the set's loss ``weight`` as a third element."""

    def __init__(self, labels: PseudoLabels, transform, mean, std, tree: Tree, weight: float):
        super().__init__(labels, transform, mean, std, tree)
        self.weight = weight
        self.soft = labels.mode == "soft"
        if self.soft and not labels.tree.same_as(self.tree):
            raise ValueError(
                f"{labels.root}: soft labels of tree '{labels.tree.name}' cannot train a model "
                f"of tree '{self.tree.name}' (use --mode hard, or a teacher of that tree)"
            )
        self.leaf_values = np.array(self.tree.values, dtype=np.uint8)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, float]:  # type: ignore[override]
        if not self.soft:
            pixels, target = super().__getitem__(i)
            return pixels, target, self.weight
        image, maps = self.dataset[i]
        labels = self.leaf_values[maps.argmax(axis=0)]  # crops centre on the teacher's people
        image, labels, maps = self.transform.with_maps(image, labels, maps)
        probs = maps.astype(np.float32)
        probs[:, labels == IGNORE_VALUE] = 0  # padding
        probs /= np.maximum(probs.sum(axis=0, keepdims=True), 1e-6)  # uint8 rounding
        x = normalize(image, self.mean, self.std)
        return torch.from_numpy(x), torch.from_numpy(probs), self.weight


def collate_targets(items: list[tuple]) -> tuple[torch.Tensor, list[tuple]]:
    """A training batch: the images stacked, and their targets grouped by kind (leaf indices or
    leaf probabilities) and loss weight, as ``(batch positions, targets, weight)``. Labelled
    items are ``(image, target)`` and weigh 1; pseudo-labelled ones add their set's weight."""
    groups: dict[tuple[bool, float], list[int]] = {}
    for i, item in enumerate(items):
        weight = float(item[2]) if len(item) > 2 else 1.0
        groups.setdefault((item[1].is_floating_point(), weight), []).append(i)
    x = torch.stack([item[0] for item in items])
    return x, [
        (torch.tensor(index), torch.stack([items[i][1] for i in index]), weight)
        for (_, weight), index in groups.items()
    ]


class ValSet(torch.utils.data.Dataset):
    """Whole images and their labels, as read: validation predicts them as ``hiseg predict``."""

    def __init__(self, dataset: Dataset, limit: int | None = None):
        self.dataset = dataset
        self.n = len(dataset) if limit is None else min(limit, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset[i]


def _single(batch: list) -> Any:
    return batch[0]


class SegmentationTask(L.LightningModule):
    """The model, its loss and optimiser, and per-level validation on the whole split."""

    def __init__(
        self, config: Config | dict[str, Any], tree: dict[str, Any], pretrained: bool | None = None
    ):
        super().__init__()
        self.config = config if isinstance(config, Config) else Config.from_dict(config)
        # Plain values only: checkpoints load with weights_only=True, and resume older runs.
        hparams = {"config": self.config.to_dict(), "tree": tree, "pretrained": pretrained}
        self.save_hyperparameters(hparams)
        self.tree = Tree.from_dict(tree)
        m = self.config.model
        use_pretrained = m.pretrained if pretrained is None else pretrained
        self.model = create_model(
            m.arch, m.encoder, self.tree, pretrained=use_pretrained, decoder=m.decoder
        )
        if self.config.trainer.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.config.optim.freeze_stem:
            stem(self.model).requires_grad_(False)
        if self.config.trainer.compile:
            # in place: the state dict keeps its keys; validation (predict_logits) runs eagerly
            self.model.net.compile()
        try:
            self.loss_fn = build_loss(self.tree, dataclasses.asdict(self.config.loss))
        except ValueError as err:  # settings that only the tree can check: weights per level
            raise ConfigError(f"config key 'loss': {err}") from None
        self.confusion = ConfusionMatrix(self.tree)
        self.samples: list[np.ndarray] = []

    def forward(self, x: torch.Tensor, full_resolution: bool = True) -> torch.Tensor:
        """Logits at the input's size (the loss's), or ``full_resolution=False`` as the model
        predicts them (:meth:`SegmentationModel.predict_logits`)."""
        if self.config.trainer.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x) if full_resolution else self.model.predict_logits(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Each group of targets (:func:`collate_targets`) through the one loss, weighted by
        its weight and its share of the batch; soft pseudo-labels' part is logged apart."""
        x, groups = batch
        logits = self(x).float()
        loss = logits.new_zeros(())
        for index, target, weight in groups:
            part = self.loss_fn(logits[index], target)
            loss = loss + weight * len(index) / len(x) * part
            if target.is_floating_point():
                self.log("train/soft_loss", part, on_epoch=True, batch_size=len(index))
        self.log(
            "train/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=len(x)
        )
        return loss

    def on_train_epoch_start(self) -> None:
        """The frozen stem stays frozen (after FreezeEncoder's unfreezing, which runs first) and
        keeps its BatchNorm statistics (Lightning sets train mode each epoch)."""
        if self.config.optim.freeze_stem:
            stem(self.model).requires_grad_(False).eval()

    def on_validation_epoch_start(self) -> None:
        self.confusion = ConfusionMatrix(self.tree)
        self.samples = []

    def spec(self) -> ModelSpec:
        """What the model's checkpoints store: it predicts at ``data.val_long_side``."""
        return self.model.spec(self.config.data.val_long_side, self.config.data.crop_size)

    def _padding(self, batch_idx: int) -> bool:
        """Whether this val image is a repeat that DistributedSampler adds so every process gets
        as many batches (3 images on 2 processes: 2 + 2). Counting it would weigh it twice in the
        split's one confusion matrix. Rank r's i-th image (batch size 1, unshuffled) is item
        r + i x world of the padded list, whose items past the split's end are the repeats."""
        world = self.trainer.world_size
        if world == 1:
            return False
        loader = self.trainer.val_dataloaders
        assert loader is not None, "a validation step runs with its loader"
        return self.global_rank + batch_idx * world >= len(loader.dataset)

    def validation_step(self, batch, batch_idx: int) -> None:
        """Predict one val image through :class:`hiseg.predictor.Predictor`, the code of
        ``hiseg predict`` (the network is this model in its current state)."""
        if self._padding(batch_idx):
            return
        image, labels = batch

        def run(x: np.ndarray) -> np.ndarray:
            logits = self(torch.from_numpy(x).to(self.device), full_resolution=False)
            return logits.float().cpu().numpy()

        predictor = Predictor([Backend("validation", run, self.spec())])
        pred = predictor.predict(image).labels
        self.confusion.update(labels, pred)
        if batch_idx < self.config.tracking.sample_images:
            self.samples.append(
                np.concatenate(
                    [overlay(image, labels, self.tree), overlay(image, pred, self.tree)], 1
                )
            )

    def on_validation_epoch_end(self) -> None:
        matrix = torch.from_numpy(self.confusion.matrix).to(self.device)
        self.confusion.matrix = self.trainer.strategy.reduce(matrix, reduce_op="sum").cpu().numpy()
        scores = self.confusion.scores()
        mious = []
        for k, level in scores["levels"].items():
            miou = level["miou"] or 0.0
            mious.append(miou)
            self.log(f"val/miou{k}", miou, sync_dist=True)
            for node, iou in level["iou"].items():
                if iou is not None:
                    self.log(f"val/iou{k}/{node}", iou, sync_dist=True)
        self.log("val/score", float(np.mean(mious)), prog_bar=True, sync_dist=True)
        self.log("val/pixel_accuracy", scores["pixel_accuracy"] or 0.0, sync_dist=True)

    def configure_optimizers(self):
        o = self.config.optim
        encoder = set(self.model.net.encoder.parameters())
        frozen = set(stem(self.model).parameters()) if o.freeze_stem else set()
        trained = [p for p in self.model.parameters() if p not in frozen]
        groups = [
            {"params": [p for p in trained if p in encoder], "lr": o.encoder_lr},
            {"params": [p for p in trained if p not in encoder], "lr": o.lr},
        ]
        optimizer = torch.optim.AdamW(groups, weight_decay=o.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = lr_schedule(o.schedule, o.warmup_steps, total, o.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[METADATA_KEY] = self.spec().to_json()


STEM = ("model.conv_stem", "model.bn1", "model.blocks.0")


def stem(model: torch.nn.Module) -> torch.nn.Sequential:
    """The encoder's layers at half the input's size (``optim.freeze_stem``): timm
    EfficientNet / MobileNet stem conv, its BatchNorm and first block."""
    encoder = model.get_submodule("net.encoder")
    try:
        return torch.nn.Sequential(*(encoder.get_submodule(name) for name in STEM))
    except AttributeError:
        raise ConfigError(
            f"config key 'optim.freeze_stem': encoder {type(encoder).__name__} has no "
            "conv_stem / bn1 / blocks.0 (an EfficientNet or MobileNet stem)"
        ) from None


def lr_schedule(kind: str, warmup: int, total: int, min_ratio: float):
    """Step -> LR factor: linear warmup, then cosine or poly decay to ``min_ratio``."""
    if kind not in ("cosine", "poly"):
        raise ValueError(f"optim.schedule must be 'cosine' or 'poly', not {kind!r}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else (1 - t) ** 0.9
        return min_ratio + (1 - min_ratio) * decay

    return factor


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file and rename: a killed run never leaves a half-written checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename: a power cut keeps the old one

        publish(path, write)


class SaveLast(Checkpoint):
    """``last.ckpt`` after every epoch (validation included) and every ``every_n_steps`` steps.

    ModelCheckpoint's ``save_last`` is not enough: Lightning 2.6 refreshes it at epoch end only
    when that epoch also saved a top-k checkpoint, so ``--resume`` would lose the epoch.
    """

    def __init__(self, path: Path, every_n_steps: int):
        self.path = path
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            trainer.save_checkpoint(self.path, weights_only=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.path, weights_only=False)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        """A SIGTERM (a scheduler's or a session's stop) keeps the steps done since the last save.

        Lightning stops between training steps, a consistent state like the periodic saves';
        stopped during validation, the last save stands (a half-run validation is not resumable).
        """
        if isinstance(exception, SIGTERMException) and trainer.training:
            trainer.save_checkpoint(self.path, weights_only=False)


class History(Callback):
    """Per-epoch mean train loss and val scores appended to ``history.csv`` in the run folder."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        row: dict[str, float] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for key, value in sorted(trainer.callback_metrics.items()):
            if key.startswith("val/miou") or key in ("val/score", "train/loss_epoch"):
                row[key.split("/")[1]] = round(float(value), 5)
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


class FreezeEncoder(Callback):
    """Staged unfreezing: the pretrained encoder is frozen (no gradients, BatchNorm statistics
    kept) for the first ``epochs`` epochs, so the randomly initialised decoder cannot wreck its
    ImageNet features with large early gradients; then everything trains. Decided per epoch
    from the epoch number, so a resumed run freezes exactly when the uninterrupted one would."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        frozen = trainer.current_epoch < self.epochs
        encoder = pl_module.get_submodule("model.net.encoder")
        encoder.requires_grad_(not frozen)
        if frozen:
            encoder.eval()


class SampleImages(Callback):
    """A few val images (ground truth | prediction overlays) logged to MLflow each epoch."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = trainer.logger
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if not isinstance(logger, MLFlowLogger) or not isinstance(pl_module, SegmentationTask):
            return
        for i, picture in enumerate(pl_module.samples):
            logger.experiment.log_image(
                logger.run_id,
                picture,
                artifact_file=f"val/epoch{trainer.current_epoch:03d}_{i}.png",
            )


class RunLogger(MLFlowLogger):
    """MLflow logger that continues a resumed run: MLflow refuses to change logged params, so a
    resumed run keeps the params it started with (the overrides are in the command line)."""

    def __init__(self, *args, resumed: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.resumed = resumed

    def log_hyperparams(self, params) -> None:
        if not self.resumed:
            super().log_hyperparams(params)


def run_dir(config: Config) -> Path:
    return Path(config.out_dir) / str(config.name)


def build_trainer(config: Config, folder: Path, track: bool) -> L.Trainer:
    t = config.trainer
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=folder,
            filename="best",
            monitor="val/score",
            mode="max",
            save_top_k=1,
            enable_version_counter=False,
        ),
        SaveLast(folder / "last.ckpt", t.checkpoint_every_n_steps),
        History(folder / "history.csv"),
    ]
    bar = use_progress_bar(t.progress_bar)
    callbacks.append(RichProgressBar() if bar else ProgressLog(t.log_every_n_steps))
    if t.ema_decay:
        callbacks.append(EMAWeightAveraging(decay=t.ema_decay))
    if config.optim.freeze_encoder_epochs:
        callbacks.append(FreezeEncoder(config.optim.freeze_encoder_epochs))
    if t.early_stopping_patience:
        callbacks.append(
            EarlyStopping(monitor="val/score", mode="max", patience=t.early_stopping_patience)
        )
    logger: Any = False
    if track:
        id_file = folder / "mlflow_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        logger = RunLogger(
            experiment_name=config.tracking.experiment,
            run_name=config.name,
            tracking_uri=config.tracking.uri,
            run_id=run_id,
            resumed=run_id is not None,
        )
        folder.mkdir(parents=True, exist_ok=True)
        run_id = logger.run_id
        publish(id_file, lambda tmp: tmp.write_text(run_id))  # a resume reads it whole
        callbacks.append(SampleImages())
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,  # type: ignore[arg-type]  # Lightning checks the name
        max_epochs=t.max_epochs,
        limit_train_batches=t.limit_train_batches,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=bar,
        callbacks=callbacks,
        logger=logger,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=folder,
        num_sanity_val_steps=0,
        deterministic=False,
    )


def build_loaders(config: Config, mean, std) -> tuple[DataLoader, DataLoader, Dataset]:
    d = config.data
    assert d.root is not None, "load_config requires data.root"
    train_data = open_dataset(d.root, d.train_split, d.format)
    if d.drop:
        if not Path(d.drop).is_file():
            raise DatasetError(f"{d.drop}: no such file (data.drop, the train ids to leave out)")
        dropped = read_id_list(d.drop)
        train_data.drop(dropped)
        rank_zero_info(f"data.drop: {len(set(dropped))} train ids in {d.drop} left out")
    val_data = open_dataset(d.root, d.val_split, d.format)
    background = train_data.tree.background.value
    assert background is not None, "a tree's background is a leaf, so it has a value"
    transform = train_transform(
        d.crop_size,
        scale=(d.scale[0], d.scale[1]),
        person_crop_prob=d.person_crop_prob,
        rotate_deg=d.rotate_deg,
        hflip=d.hflip,
        color=d.color,
        seed=config.seed,
        # crops centre on what is not background in this tree (extra sets are relabelled to it)
        background_value=background,
    )
    extra = [open_dataset(e.root, e.split, e.format) for e in d.extra]
    workers = d.num_workers
    sets = [
        TrainSet(data, transform, mean, std, train_data.tree, cache=d.cache_images)
        for data in [train_data, *extra]
    ]
    for i, pseudo in enumerate(d.pseudo):
        try:
            labels = PseudoLabels(pseudo.root, pseudo.images)
            if not len(labels):
                raise DatasetError(f"{pseudo.root}: its manifest lists no labelled photo")
            tree, weight = train_data.tree, pseudo.weight
            sets.append(PseudoTrainSet(labels, transform, mean, std, tree, weight))
        except ValueError as err:  # DatasetError too
            raise ConfigError(f"config key 'data.pseudo[{i}]': {err}") from None
    train_sets: ConcatDataset = ConcatDataset(sets)
    if len(train_sets) < d.batch_size:  # every batch would be dropped: nothing would train
        raise ConfigError(
            f"config key 'data.batch_size' is {d.batch_size}, but the training set has only "
            f"{len(train_sets)} image(s)"
        )
    train = DataLoader(
        train_sets,
        batch_size=d.batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        collate_fn=collate_targets,
        persistent_workers=workers > 0,
        worker_init_fn=transform.reseed_worker if workers else None,
    )
    val = DataLoader(
        ValSet(val_data, d.limit_val_images),
        batch_size=1,
        num_workers=workers,
        collate_fn=_single,
        persistent_workers=workers > 0,
    )
    return train, val, train_data


def init_weights(task: SegmentationTask, checkpoint: str | Path) -> None:
    """Start ``task`` from a trained checkpoint's weights (fine-tuning); the optimiser, schedule
    and epoch count start afresh. The checkpoint must hold the same model and tree."""
    model, spec = load_checkpoint(checkpoint)
    ours = task.spec()
    want = {"arch": ours.arch, "encoder": ours.encoder, "decoder": dict(ours.decoder)}
    have = {"arch": spec.arch, "encoder": spec.encoder, "decoder": dict(spec.decoder)}
    if have != want or not model.tree.same_as(task.tree):
        raise ConfigError(
            f"{checkpoint}: model.init needs the same model and tree; it holds {have}, "
            f"tree '{model.tree.name}', the config asks for {want}, tree '{task.tree.name}'"
        )
    task.model.load_state_dict(model.state_dict())


class TrainingError(HisegError, RuntimeError):
    """A run cannot start or continue: nothing to resume, a run already there, a bad checkpoint."""


class TrainingStopped(TrainingError):
    """The run was stopped by SIGTERM; ``last.ckpt`` holds where it stood, for ``--resume``."""

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a process it stopped


def check_model_names(config: Config) -> None:
    """Unknown architecture or encoder names fail before any data is read."""
    m = config.model
    if m.arch.lower() not in ARCHITECTURES:
        known = ", ".join(ARCHITECTURES)
        raise ConfigError(f"config key 'model.arch': unknown architecture '{m.arch}' ({known})")
    try:
        preprocessing(m.encoder)
    except ValueError as err:
        raise ConfigError(f"config key 'model.encoder': {err}") from None


def prepare_run_dir(folder: Path) -> None:
    """Create the run folder and write to it, so an unwritable ``out_dir`` fails before the first
    step; and delete the temporary checkpoints that killed runs left (see AtomicCheckpointIO)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"out_dir: cannot write checkpoints to {folder} ({reason})") from None
    for tmp in folder.glob(".*.tmp.ckpt"):  # files.publish's names: .last.<pid>.tmp.ckpt
        pid = tmp.name.rsplit(".", 3)[-3]
        if not (pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid))):
            tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_resumable(last: Path) -> None:
    """``last.ckpt`` loads (safely, no code from the file) and holds a training state."""
    try:
        checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = " ".join(str(err).split())[:200]
        raise TrainingError(
            f"{last}: cannot resume, the checkpoint is unreadable or corrupt "
            f"({type(err).__name__}: {reason}); delete it to start over, or restore a copy"
        ) from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "loops"} <= set(checkpoint):
        raise TrainingError(
            f"{last}: cannot resume, not a training checkpoint of hiseg (no model or loop state)"
        )


def save_resolved_config(config: Config, folder: Path) -> Path:
    """The full config this run uses (defaults included) as ``config.yaml`` in the run folder,
    so a run can be reproduced or resumed without the command line that started it."""
    path = folder / "config.yaml"
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    publish(path, lambda tmp: tmp.write_text(text))
    return path


def start_line(config: Config, folder: Path, train_images: int, val_images: int) -> str:
    """One line with what a user checks first in a log: where, what model, what data, how."""
    d, m, t = config.data, config.model, config.trainer
    threads = t.threads or torch.get_num_threads()
    return (
        f"run {folder}: {m.arch} on {m.encoder}, crop {d.crop_size}, batch {d.batch_size}, "
        f"{t.max_epochs} epochs, {t.precision}, {t.accelerator} x{t.devices} "
        f"({threads} threads); {train_images} train / {val_images} val images; "
        f"config in {folder / 'config.yaml'}"
    )


def train(config: Config, resume: bool = False, track: bool = True) -> SegmentationTask:
    """Train from a config; checkpoints go to :func:`run_dir`. Returns the trained task.

    Every mistake that can be found without training (names, the run folder, the checkpoint
    to resume, the data) is found before the first step.
    """
    folder = run_dir(config)
    last = folder / "last.ckpt"
    check_model_names(config)
    if resume and not last.exists():
        raise TrainingError(f"{last}: nothing to resume (no last checkpoint in {folder})")
    if not resume and last.exists():
        raise TrainingError(
            f"{folder} already holds a run: continue it with --resume, or choose another name "
            "(name=...) or out_dir"
        )
    if resume:
        check_resumable(last)
    prepare_run_dir(folder)
    if config.trainer.threads:
        torch.set_num_threads(config.trainer.threads)
    L.seed_everything(config.seed, workers=True, verbose=False)
    norm = preprocessing(config.model.encoder)
    train_loader, val_loader, train_data = build_loaders(config, norm["mean"], norm["std"])
    task = SegmentationTask(config, train_data.tree.to_dict())
    save_resolved_config(config, folder)
    train_set, val_set = train_loader.dataset, val_loader.dataset
    assert isinstance(train_set, Sized) and isinstance(val_set, Sized), "our datasets have a length"
    rank_zero_info(start_line(config, folder, len(train_set), len(val_set)))
    if config.model.init and not resume:
        init_weights(task, config.model.init)
    trainer = build_trainer(config, folder, track)
    try:
        trainer.fit(task, train_loader, val_loader, ckpt_path=str(last) if resume else None)
    except SIGTERMException:  # Lightning's SystemExit would end the process with status 0
        raise TrainingStopped(
            f"{folder}: stopped by SIGTERM at epoch {trainer.current_epoch + 1}, step "
            f"{trainer.global_step}; {last.name} holds the run up to its last save, continue it "
            "with --resume"
        ) from None
    return task
