"""Training configuration: typed sections, read from YAML files with ``key.sub=value`` overrides.

:class:`Config` and its sections are dataclasses, so code reads ``config.data.crop_size`` and a
type checker sees every key. Loading checks each key (an unknown key is an error that names it, so
a typo never silently trains with the default), each type (``2.5`` is no batch size) and each
range (``trainer.max_epochs`` at least 1), before any data or model is touched.

Checkpoints keep the config as the plain dict of :meth:`Config.to_dict` (the same layout as the
untyped config it replaced): they load with ``torch.load(weights_only=True)``, and
:meth:`Config.from_dict` reads either.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hiseg.errors import HisegError


class ConfigError(HisegError, ValueError):
    """A configuration file or override is invalid; the message names the key."""


def _bounded(default: Any, low: float | None = None, high: float | None = None) -> Any:
    """A field whose value, when set, must lie in ``[low, high]`` (checked on loading)."""
    return field(default=default, metadata={"low": low, "high": high})


@dataclass
class ExtraSet:
    """One more training set (``data.extra``): a folder, its split and layout."""

    root: str
    split: str = "train"
    format: str = "auto"


@dataclass
class PseudoSet:
    """Pseudo-labelled photos (``data.pseudo``): a folder written by ``hiseg pseudo-label``."""

    root: str
    images: str | None = None  # the photos; default: the folder its manifest names
    weight: float = _bounded(1.0, low=0)  # loss weight of its images beside labelled ones


@dataclass
class DataConfig:
    root: str | None = None
    format: str = "auto"
    train_split: str = "train"
    val_split: str = "val"
    crop_size: int = _bounded(320, low=1)  # training crops are crop_size x crop_size
    scale: list[float] = field(default_factory=lambda: [0.5, 1.5])  # random rescale range
    person_crop_prob: float = _bounded(0.7, low=0, high=1)  # share of crops centred on a person
    rotate_deg: float = 0
    hflip: bool = True
    color: bool = True
    val_long_side: int = _bounded(512, low=1)  # validation resizes the long side to this
    batch_size: int = _bounded(8, low=1)
    num_workers: int = _bounded(2, low=0)
    limit_val_images: int | None = _bounded(None, low=1)  # score only the first N val images
    # More training sets, e.g. [{root: ../shared/data/pascal-person-part, split: train}];
    # labels are turned into the main set's tree (same tree, or any tree into 'person').
    extra: list[ExtraSet] = field(default_factory=list)
    # Unlabelled photos with a teacher's labels (hiseg pseudo-label), e.g. [{root: runs/pseudo}];
    # hard labels train like masks, soft ones through the loss's soft-target term.
    pseudo: list[PseudoSet] = field(default_factory=list)
    # A text file of train ids to leave out (one per line, '#' starts a comment), e.g. the
    # masks a cross-validated model found to be wrong (see MODEL_CARD_person.md).
    drop: str | None = None
    # Decode every training image and mask once, before the first step, and keep them in memory
    # (loader workers share them, forked): no JPEG/PNG decoding per step. Pascal-Person-Part's
    # train split takes about 1.3 GB.
    cache_images: bool = False

    def _check(self, where: str) -> None:
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ConfigError(
                f"config key '{where}.scale' must be [low, high] with 0 < low <= high, "
                f"got {self.scale}"
            )


@dataclass
class ModelConfig:
    arch: str = "fpn"
    encoder: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    # The architecture's own options, passed through unchecked, e.g. decoder_pyramid_channels: 64
    decoder: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # start from this hiseg checkpoint's weights (same model)


@dataclass
class LossConfig:
    kind: Literal["ce", "focal"] = "ce"
    level_weights: list[float] | None = None
    dice: float = _bounded(0.0, low=0)
    lovasz: float = _bounded(0.0, low=0)
    tree_min: float = _bounded(0.0, low=0)


@dataclass
class OptimConfig:
    lr: float = _bounded(1.0e-3, low=0)  # decoder and head
    encoder_lr: float = _bounded(3.0e-4, low=0)
    weight_decay: float = _bounded(1.0e-4, low=0)
    warmup_steps: int = _bounded(100, low=0)
    schedule: Literal["cosine", "poly"] = "cosine"
    min_lr_ratio: float = _bounded(0.01, low=0, high=1)
    # Staged unfreezing: the encoder (ImageNet weights) stays frozen while the freshly initialised
    # decoder and head train alone for this many epochs, then everything trains.
    freeze_encoder_epochs: int = _bounded(0, low=0)
    # The encoder's stem (first conv, its BatchNorm and the first block: the layers at half the
    # input's size) keeps its ImageNet weights and statistics for the whole run: no backward pass
    # through the largest feature maps.
    freeze_stem: bool = False


@dataclass
class TrainerConfig:
    max_epochs: int = _bounded(10, low=1)
    accelerator: str = "cpu"
    devices: int = _bounded(1, low=1)
    num_nodes: int = _bounded(1, low=1)
    strategy: str = "auto"  # "ddp" for several GPUs or nodes
    precision: str = "bf16-mixed"
    channels_last: bool = True
    compile: bool = False  # torch.compile the network for training steps (inductor; C++ compiler)
    threads: int | None = _bounded(None, low=1)  # torch intra-op threads on CPU; default: all
    early_stopping_patience: int = _bounded(0, low=0)  # epochs without improvement; 0 = off
    checkpoint_every_n_steps: int = _bounded(200, low=0)  # also refresh last.ckpt in an epoch
    limit_train_batches: int | float | None = None  # batches per epoch, or a share of them
    log_every_n_steps: int = _bounded(10, low=1)
    # Exponential moving average of the weights (e.g. 0.999): validated, saved and exported.
    ema_decay: float | None = _bounded(None, low=0, high=0.99999)
    progress_bar: bool | Literal["auto"] = "auto"  # auto: a bar on a terminal, else log lines

    def _check(self, where: str) -> None:
        limit = self.limit_train_batches
        if limit is not None and (limit <= 0 or (isinstance(limit, float) and limit > 1)):
            raise ConfigError(
                f"config key '{where}.limit_train_batches' must be a number of batches (1 or "
                f"more) or a share of them (above 0, at most 1.0), got {limit!r}"
            )


@dataclass
class TrackingConfig:
    mlflow: bool = True
    uri: str = "sqlite:///runs/mlflow.db"
    experiment: str = "hiseg"
    sample_images: int = _bounded(4, low=0)  # val predictions logged as images each epoch


@dataclass
class Config:
    """Everything ``hiseg train`` needs; checkpoints go to ``<out_dir>/<name>/``."""

    name: str | None = None  # run name; default: the config file's stem
    out_dir: str = "runs"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists, numbers and strings: what checkpoints and MLflow store."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Config:
        """A checked config from a (possibly partial) dict; missing keys take their defaults."""
        return _build(cls, spec, "")


#: Mappings whose keys are passed through unchecked (the architecture's own options).
FREE_FORM = {"model.decoder"}


def _build(cls: type, spec: Any, where: str) -> Any:
    """An instance of dataclass ``cls`` from a mapping, every key, type and range checked."""
    if cls in (ExtraSet, PseudoSet) and isinstance(spec, str):
        spec = {"root": spec}  # data.extra and data.pseudo entries may be just a folder
    if not isinstance(spec, Mapping):
        raise ConfigError(f"config key '{where}' must be a mapping, got {spec!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec) - set(fields), key=str)
    if unknown:
        path = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ConfigError(f"unknown config key '{path}' (known here: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in spec.items():
        path = f"{where}.{name}" if where else name
        values[name] = _convert(path, hints[name], value)
        _check_range(path, fields[name].metadata, values[name])
    if cls in (ExtraSet, PseudoSet) and not values.get("root"):
        raise ConfigError(f"{where}.root is not set (the dataset folder)")
    built = cls(**values)
    if hasattr(built, "_check"):  # checks across keys, e.g. a range given as [low, high]
        built._check(where)
    return built


def _check_range(path: str, bounds: Mapping[str, Any], value: Any) -> None:
    low, high = bounds.get("low"), bounds.get("high")
    if value is None or (low is None and high is None):
        return
    if (low is not None and value < low) or (high is not None and value > high):
        allowed = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ConfigError(f"config key '{path}' must be {allowed}, got {value!r}")


def _convert(path: str, hint: Any, value: Any) -> Any:
    """``value`` as type ``hint``, or a :class:`ConfigError` naming the key and the type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # the value's own type first: 1.0 stays a float share of batches, not 1 batch
        for option in sorted(args, key=lambda option: option is not type(value)):
            if option is type(None):
                continue
            try:
                return _convert(path, option, value)
            except ConfigError:
                pass
        raise _wrong_type(path, hint, value)
    if origin is Literal:
        if value in args:
            return value
        allowed = ", ".join(repr(a) for a in args)
        raise ConfigError(f"config key '{path}' must be one of {allowed}, got {value!r}")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise _wrong_type(path, hint, value)
        return [_convert(f"{path}[{i}]", args[0], item) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{path}' must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. trainer.precision=32, name=2024
    elif hint in (int, float) and not isinstance(value, bool):
        number = _number(value)
        if number is not None and hint is float:
            return number
        if number is not None and float(number).is_integer():
            return int(number)
    raise _wrong_type(path, hint, value)


def _number(value: Any) -> float | None:
    """A finite number from an int, float or numeric string (YAML reads ``1e-3`` as a string)."""
    try:
        number = float(value) if isinstance(value, (int, float, str)) else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(hint))
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
    return names.get(hint) or ("null" if hint is type(None) else str(hint).replace("typing.", ""))


def _wrong_type(path: str, hint: Any, value: Any) -> ConfigError:
    shown = "nothing (null)" if value is None else repr(value)
    return ConfigError(f"config key '{path}' expects {_type_name(hint)}, got {shown}")


def _merge(base: dict[str, Any], update: Mapping[str, Any], where: str) -> None:
    """Merge ``update`` into ``base`` in place; nested mappings merge, other values replace."""
    for key, value in update.items():
        path = f"{where}.{key}" if where else str(key)
        if where in FREE_FORM or key not in base:  # unknown keys are named by _build
            base[key] = value
        elif isinstance(base[key], dict) and isinstance(value, Mapping):
            _merge(base[key], value, path)
        else:
            base[key] = value


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=value`` -> ``{"a": {"b": value}}``, the value parsed as YAML (numbers, lists...)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        raise ConfigError(f"override '{text}': the value is not valid YAML") from None
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file, then the overrides; checked."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            spec = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            reason = " ".join(str(err).split())
            raise ConfigError(f"{path}: not valid YAML: {reason}") from None
        except UnicodeDecodeError as err:  # e.g. a checkpoint given for the config
            reason = f"{err.reason} at byte {err.start}"
            raise ConfigError(f"{path}: not a text file ({reason})") from None
        try:
            config = _apply(config, spec)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        config.name = config.name or path.stem
    for text in overrides:
        config = _apply(config, parse_override(text))
    if not config.data.root:
        raise ConfigError("data.root is not set (the dataset folder)")
    config.name = config.name or "run"
    return config


def _apply(config: Config, update: Any) -> Config:
    if not isinstance(update, Mapping):
        raise ConfigError(f"a config must be a mapping of keys, got {update!r}")
    merged = config.to_dict()
    _merge(merged, update, "")
    return Config.from_dict(merged)
