"""Training configuration: YAML files over defaults, with ``key.sub=value`` overrides.

Every key a user may set is in :data:`DEFAULTS`; an unknown key is an error that names it, so a
typo never silently trains with the default.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from hiseg.errors import HisegError

DEFAULTS: dict[str, Any] = {
    "name": None,  # run name; default: the config file's stem
    "out_dir": "runs",  # checkpoints go to <out_dir>/<name>/
    "seed": 0,
    "data": {
        "root": None,
        "format": "auto",
        "train_split": "train",
        "val_split": "val",
        "crop_size": 320,  # training crops are crop_size x crop_size
        "scale": [0.5, 1.5],  # random rescale range before cropping
        "person_crop_prob": 0.7,  # share of crops centred on a person region
        "rotate_deg": 0,
        "hflip": True,
        "color": True,
        "val_long_side": 512,  # validation resizes the long side to this
        "batch_size": 8,
        "num_workers": 2,
        "limit_val_images": None,  # score only the first N val images (for quick runs)
        # More training sets, e.g. [{root: ../shared/data/pascal-person-part, split: train}];
        # labels are turned into the main set's tree (same tree, or any tree into 'person').
        "extra": [],
        # A text file of train ids to leave out (one per line, '#' starts a comment), e.g. the
        # masks a cross-validated model found to be wrong (see MODEL_CARD_person.md).
        "drop": None,
    },
    "model": {
        "arch": "fpn",
        "encoder": "tf_efficientnet_lite0",
        "pretrained": True,
        "decoder": {},  # the architecture's own options, e.g. decoder_pyramid_channels: 64
        "init": None,  # start from this hiseg checkpoint's weights (same model), e.g. to fine-tune
    },
    "loss": {"kind": "ce", "level_weights": None, "dice": 0.0, "lovasz": 0.0, "tree_min": 0.0},
    "optim": {
        "lr": 1.0e-3,  # decoder and head
        "encoder_lr": 3.0e-4,
        "weight_decay": 1.0e-4,
        "warmup_steps": 100,
        "schedule": "cosine",  # or "poly"
        "min_lr_ratio": 0.01,
    },
    "trainer": {
        "max_epochs": 10,
        "accelerator": "cpu",
        "devices": 1,
        "num_nodes": 1,
        "strategy": "auto",  # "ddp" for several GPUs or nodes
        "precision": "bf16-mixed",
        "channels_last": True,
        "threads": None,  # torch intra-op threads on CPU; default: all cores
        "early_stopping_patience": 0,  # epochs without improvement; 0 = off
        "checkpoint_every_n_steps": 200,  # also refresh last.ckpt within long epochs
        "limit_train_batches": None,
        "log_every_n_steps": 10,
        "progress_bar": True,
    },
    "tracking": {
        "mlflow": True,
        "uri": "sqlite:///runs/mlflow.db",
        "experiment": "hiseg",
        "sample_images": 4,  # val predictions logged as images each epoch
    },
}


#: Mappings whose keys are passed through unchecked (the architecture's own options).
FREE_FORM = {"model.decoder"}


class ConfigError(HisegError, ValueError):
    """A configuration file or override is invalid; the message names the key."""


def _merge(base: dict[str, Any], update: Mapping[str, Any], where: str) -> None:
    """Merge ``update`` into ``base``, checking keys and types (except under ``FREE_FORM``)."""
    for key, value in update.items():
        path = f"{where}.{key}" if where else key
        if where in FREE_FORM:
            base[key] = value
            continue
        if key not in base:
            known = ", ".join(sorted(base))
            raise ConfigError(f"unknown config key '{path}' (known here: {known})")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{path}' must be a mapping, got {value!r}")
            _merge(base[key], value, path)
        else:
            base[key] = _coerce(path, base[key], value)


def _coerce(path: str, default: Any, value: Any) -> Any:
    """Check a value against its default's type; YAML reads ``1e-3`` as a string, so parse it."""
    if default is None or value is None or isinstance(default, str):
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, (int, float)):
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is not None:
            return int(number) if isinstance(default, int) and number.is_integer() else number
    elif isinstance(default, list) and isinstance(value, list):
        return value
    raise ConfigError(f"config key '{path}' expects {type(default).__name__}, got {value!r}")


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=value`` -> ``{"a": {"b": value}}``, the value parsed as YAML (numbers, lists...)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Defaults, then the YAML file, then the overrides; validated."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            spec = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        try:
            _merge(config, spec, "")
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        config["name"] = config["name"] or path.stem
    for text in overrides:
        _merge(config, parse_override(text), "")
    if not config["data"]["root"]:
        raise ConfigError("data.root is not set (the dataset folder)")
    config["data"]["extra"] = [_extra_set(i, e) for i, e in enumerate(config["data"]["extra"])]
    config["name"] = config["name"] or "run"
    return config


#: What an entry of ``data.extra`` may say, with defaults.
EXTRA_SET = {"root": None, "split": "train", "format": "auto"}


def _extra_set(index: int, entry: Any) -> dict[str, Any]:
    """One ``data.extra`` entry, checked and completed with :data:`EXTRA_SET` defaults."""
    where = f"data.extra[{index}]"
    if isinstance(entry, str):
        entry = {"root": entry}
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a folder or a mapping with 'root', got {entry!r}")
    unknown = sorted(set(entry) - set(EXTRA_SET))
    if unknown:
        known = ", ".join(EXTRA_SET)
        raise ConfigError(f"unknown key '{where}.{unknown[0]}' (known: {known})")
    if not entry.get("root"):
        raise ConfigError(f"{where}.root is not set (the dataset folder)")
    return {**EXTRA_SET, **entry}
