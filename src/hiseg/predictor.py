"""The prediction runtime: ONNX Runtime by default (torch is not imported), torch on request.

``hiseg.load(...)`` returns a :class:`Predictor`; ``predictor.predict(image)`` returns a
:class:`Result` with leaf probabilities at the original size, the top-down decoded leaf labels,
per-level maps, an overlay and a summary. Several models with the same tree are an ensemble: their
probabilities are averaged. Test-time augmentation (horizontal flip, several scales) averages
probabilities too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from hiseg.data import person_regions
from hiseg.images import read_image
from hiseg.inference import letterbox, normalize, softmax, unletterbox
from hiseg.taxonomy import Tree
from hiseg.visualize import overlay_with_legend

#: ONNX metadata key holding the JSON description written by ``hiseg export``.
METADATA_KEY = "hiseg"
DEFAULT_MODEL = "pascal-person-part"


class ModelError(ValueError):
    """A model cannot be found or loaded; the message names it and says why."""


# -- backends: (B, 3, H, W) float32 -> (B, leaves, H, W) logits --------------------------------


@dataclass
class Backend:
    """One loaded network and what it needs: its tree and input normalisation."""

    name: str
    run: Callable[[np.ndarray], np.ndarray]
    tree: Tree
    mean: tuple[float, ...]
    std: tuple[float, ...]
    long_side: int
    stride: int = 32
    meta: dict[str, Any] = field(default_factory=dict)


def _threads(threads: int | None) -> int:
    return threads or os.cpu_count() or 1


def onnx_backend(path: Path, threads: int | None = None) -> Backend:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads(threads)
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise ModelError(f"{path}: not a loadable ONNX model ({err})") from None
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise ModelError(f"{path}: no '{METADATA_KEY}' metadata; export it with `hiseg export`")
    meta = json.loads(raw)
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: x})[0]

    return Backend(
        name=str(path),
        run=run,
        tree=Tree.from_dict(meta["model"]["tree"], source=str(path)),
        mean=tuple(meta["model"]["mean"]),
        std=tuple(meta["model"]["std"]),
        long_side=int(meta["long_side"]),
        stride=int(meta["model"].get("output_stride", 32)),
        meta=meta,
    )


def torch_backend(path: Path, threads: int | None = None) -> Backend:
    try:
        import torch

        from hiseg.models import load_checkpoint
    except ImportError as err:
        msg = f"{path}: the torch backend needs pip install 'hiseg[train]' ({err})"
        raise ModelError(msg) from None
    if threads:
        torch.set_num_threads(threads)
    try:
        model, meta = load_checkpoint(path)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"{path}: {err}") from None

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    config = meta["model"]
    return Backend(
        name=str(path),
        run=run,
        tree=model.tree,
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        long_side=int(meta["long_side"]),
        stride=int(config.get("output_stride", 32)),
        meta=meta,
    )


def bundled_models() -> list[str]:
    """Names of the models shipped inside the package."""
    folder = resources.files("hiseg") / "weights"
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".onnx")] for p in folder.iterdir() if p.name.endswith(".onnx"))


def resolve_model(name_or_path: str | Path | None) -> Path:
    """A bundled model name or a file path -> an existing file."""
    text = str(name_or_path or DEFAULT_MODEL)
    bundled = resources.files("hiseg") / "weights" / f"{text}.onnx"
    if bundled.is_file():
        return Path(str(bundled))
    path = Path(text).expanduser()
    if path.is_file():
        return path
    known = ", ".join(bundled_models()) or "none installed"
    raise ModelError(f"{text}: no such model file and no bundled model of that name ({known})")


def load_backend(name_or_path: str | Path | None, backend: str = "auto", threads=None) -> Backend:
    path = resolve_model(name_or_path)
    kind = backend if backend != "auto" else ("torch" if path.suffix == ".ckpt" else "onnx")
    if kind == "onnx":
        return onnx_backend(path, threads)
    if kind == "torch":
        return torch_backend(path, threads)
    raise ModelError(f"unknown backend '{backend}' (auto, onnx, torch)")


# -- results ----------------------------------------------------------------------------------


@dataclass
class Result:
    """One image's prediction. ``labels`` holds leaf values at the input's size."""

    image: np.ndarray
    probs: np.ndarray  # (leaves, H, W) leaf probabilities, channel i = tree.leaves[i]
    labels: np.ndarray  # (H, W) uint8 leaf values
    tree: Tree
    path: Path | None = None

    def level(self, k: int) -> np.ndarray:
        """(H, W) uint8 index of each pixel's level-``k`` node (``tree.level(k).names``)."""
        return self.tree.level(k).map(self.labels).astype(np.uint8)

    def overlay(self, level: int | None = None, legend: bool = True) -> np.ndarray:
        return overlay_with_legend(self.image, self.labels, self.tree, level, legend)

    def summary(self) -> dict[str, Any]:
        """Pixel share per node per level, and the number of people (connected body regions)."""
        counts = np.bincount(self.labels.ravel(), minlength=256)
        total = float(self.labels.size)
        levels = {}
        for level in self.tree.levels:
            shares = np.zeros(len(level.nodes))
            np.add.at(shares, level.lut[self.tree.values], counts[self.tree.values])
            levels[str(level.index)] = dict(
                zip(level.names, (shares / total).round(5).tolist(), strict=True)
            )
        return {
            "image": str(self.path) if self.path else None,
            "height": int(self.labels.shape[0]),
            "width": int(self.labels.shape[1]),
            "levels": levels,
            "people": len(person_regions(self.labels, self.tree)),
        }


class Predictor:
    """Runs one model or an ensemble, with optional flip / multi-scale test-time augmentation."""

    def __init__(
        self,
        backends: Sequence[Backend],
        long_side: int | None = None,
        flip: bool = False,
        scales: Sequence[float] = (1.0,),
    ):
        if not backends:
            raise ModelError("no model given")
        tree = backends[0].tree
        for b in backends[1:]:
            if b.tree.to_dict() != tree.to_dict():
                raise ModelError(f"{b.name}: its tree '{b.tree.name}' differs from '{tree.name}'")
        self.backends = list(backends)
        self.tree = tree
        self.long_side = long_side or backends[0].long_side
        self.flip = flip
        self.scales = tuple(scales)

    def leaf_probs(self, image: np.ndarray) -> np.ndarray:
        """(leaves, H, W) probabilities at the image's size, averaged over models and TTA."""
        total = np.zeros((self.tree.num_leaves, *image.shape[:2]), np.float32)
        n = 0
        for backend in self.backends:
            for scale in self.scales:
                fitted, box = letterbox(image, round(self.long_side * scale), backend.stride)
                x = normalize(fitted, backend.mean, backend.std)[None]
                if self.flip:
                    x = np.concatenate([x, x[..., ::-1]])
                probs = softmax(backend.run(np.ascontiguousarray(x)), axis=1)
                if self.flip:
                    probs = np.stack([probs[0], probs[1][..., ::-1]])
                for p in probs:
                    total += unletterbox(p, box)
                    n += 1
        return total / n

    def predict(self, image: np.ndarray | str | Path) -> Result:
        path = None
        if not isinstance(image, np.ndarray):
            path = Path(image)
            image = read_image(path)
        probs = self.leaf_probs(image)
        return Result(image, probs, self.tree.decode(probs), self.tree, path)

    def predict_batch(self, images: Sequence[np.ndarray | str | Path]) -> list[Result]:
        return [self.predict(image) for image in images]


def load(
    model: str | Path | Sequence[str | Path] | None = None,
    backend: str = "auto",
    threads: int | None = None,
    long_side: int | None = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> Predictor:
    """A predictor for a bundled model name, an ``.onnx`` file, a ``.ckpt`` checkpoint, or a
    list of them (an ensemble). ``None`` is the default bundled model."""
    names = [model] if model is None or isinstance(model, (str, Path)) else list(model)
    backends = [load_backend(name, backend, threads) for name in names]
    return Predictor(backends, long_side=long_side, flip=flip, scales=scales)
