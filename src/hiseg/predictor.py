"""The prediction runtime: ONNX Runtime by default (torch is not imported), torch on request.

``hiseg.load(...)`` returns a :class:`Predictor`; ``predictor.predict(image)`` returns a
:class:`Result` with leaf probabilities at the original size, the top-down decoded leaf labels,
per-level maps, an overlay and a summary; ``predictor.predict_batch(images)`` does the same for
several images with several images per network call. Every step goes through
:mod:`hiseg.pipeline`. Several models with the same tree are an ensemble: their probabilities are
averaged. Test-time augmentation (horizontal flip, several scales) averages probabilities too. Two
optional refinements reuse the same pass on parts of the image: sliding windows at native
resolution for images much larger than the model size (``tile``), and a second, zoomed-in look at
each small person (``zoom``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from hiseg.data import MIN_REGION_PIXELS, person_regions
from hiseg.errors import HisegError
from hiseg.images import ImageInputError, ImageLike, as_rgb
from hiseg.pipeline import (
    LONG_SIDE_RANGE,
    SCALE_RANGE,
    Geometry,
    Probabilities,
    batch_softmax,
    prepare,
    restore,
)
from hiseg.postprocess import clean_labels
from hiseg.spec import METADATA_KEY, ModelError, ModelSpec
from hiseg.taxonomy import Tree
from hiseg.visualize import overlay_with_legend

__all__ = ["METADATA_KEY", "Backend", "ModelError", "Predictor", "Result", "load"]

DEFAULT_MODEL = "pascal-person-part"
#: Test-time scales of the "accurate" preset (with flip): of the two sets measured on Pascal val
#: (benchmarks/part_probes.md) the one with the higher part-level mIoU.
ACCURATE_SCALES = (0.75, 1.0, 1.25)
#: Tiling starts when the image's long side exceeds the model size by this factor.
TILE_FACTOR = 1.5
#: A zoom-in is skipped unless the crop is seen at least this much larger than in the full pass.
MIN_ZOOM = 1.5
#: Most images per network call in :meth:`Predictor.predict_batch` (bounds memory).
BATCH_SIZE = 8


# -- backends: (B, 3, H, W) float32 -> (B, leaves, H / k, W / k) logits ------------------------


@dataclass
class Backend:
    """One loaded network and its :class:`ModelSpec` (tree, input normalisation, sizes).

    ``run`` returns a new, writable array per call: the pipeline works on it in place.
    """

    name: str
    run: Callable[[np.ndarray], np.ndarray]
    spec: ModelSpec

    @property
    def tree(self) -> Tree:
        return self.spec.tree

    @property
    def long_side(self) -> int:
        return self.spec.long_side


def _threads(threads: int | None) -> int:
    """All cores by default; more threads than cores only thrash (100000 once broke a machine)."""
    cores = os.cpu_count() or 1
    if threads is not None and threads < 1:
        raise ModelError(f"threads must be at least 1, not {threads}")
    return min(threads or cores, cores)


def _checked_run(
    name: str, spec: ModelSpec, run: Callable[[np.ndarray], np.ndarray]
) -> Callable[[np.ndarray], np.ndarray]:
    """``run``, refusing an output that does not fit the spec (one channel per leaf, the input's
    batch, its size over ``output_scale``) with a ModelError instead of a reshape crash later."""
    k = spec.output_scale

    def checked(x: np.ndarray) -> np.ndarray:
        out = run(x)
        want = (x.shape[0], spec.num_leaves, *(-(-side // k) for side in x.shape[2:]))
        if out.shape != want:
            raise ModelError(
                f"{name}: the network returned shape {tuple(out.shape)} for input "
                f"{tuple(x.shape)}; its spec's tree '{spec.tree.name}' needs {want}"
            )
        return out

    return checked


def onnx_backend(path: Path, threads: int | None = None, memory_arena: bool = True) -> Backend:
    """``memory_arena=False`` makes ONNX Runtime free each run's buffers instead of keeping them
    in an arena that grows in steps with the mix of image sizes: what a long-running server
    wants (``benchmarks/serve_load.md``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = memory_arena
    options.intra_op_num_threads = _threads(threads)
    options.inter_op_num_threads = 1
    # Idle ORT threads otherwise spin after each run and starve the NumPy steps around it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise ModelError(f"{path}: not a loadable ONNX model ({err})") from None
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise ModelError(f"{path}: no '{METADATA_KEY}' metadata; export it with `hiseg export`")
    spec = ModelSpec.from_json(raw, source=str(path))
    output = session.get_outputs()[0]
    channels = output.shape[1] if len(output.shape) == 4 else None
    if len(output.shape) != 4 or (isinstance(channels, int) and channels != spec.num_leaves):
        raise ModelError(
            f"{path}: the network's output '{output.name}' has shape {output.shape}; the tree "
            f"'{spec.tree.name}' of its metadata needs (batch, {spec.num_leaves}, height, width)"
        )
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: x})[0]

    return Backend(str(path), _checked_run(str(path), spec, run), spec)


def torch_backend(path: Path, threads: int | None = None, full_resolution: bool = False) -> Backend:
    """A ``hiseg train`` checkpoint's :meth:`SegmentationModel.predict_logits`, or with
    ``full_resolution`` its forward (the head's upsampling kept, ``output_scale`` 1: what a
    ``full_resolution`` export computes)."""
    try:
        import torch

        from hiseg.models import load_checkpoint
    except ImportError as err:
        msg = f"{path}: the torch backend needs pip install 'hiseg[train]' ({err})"
        raise ModelError(msg) from None
    torch.set_num_threads(_threads(threads))
    model, spec = load_checkpoint(path)
    forward = model if full_resolution else model.predict_logits
    if full_resolution:
        spec = dataclasses.replace(spec, output_scale=1)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return forward(torch.from_numpy(x)).float().numpy()

    return Backend(str(path), _checked_run(str(path), spec, run), spec)


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


def load_backend(
    name_or_path: str | Path | None,
    backend: str = "auto",
    threads: int | None = None,
    memory_arena: bool = True,
) -> Backend:
    path = resolve_model(name_or_path)
    kind = backend if backend != "auto" else ("torch" if path.suffix == ".ckpt" else "onnx")
    if kind == "onnx":
        return onnx_backend(path, threads, memory_arena)
    if kind == "torch":
        return torch_backend(path, threads)
    raise ModelError(f"unknown backend '{backend}' (auto, onnx, torch)")


# -- results ----------------------------------------------------------------------------------


@dataclass
class Result:
    """One image's prediction. ``labels`` holds leaf values at the input's size; ``probs`` the
    (leaves, H, W) leaf probabilities (channel i = ``tree.leaves[i]``), made on first use."""

    image: np.ndarray
    labels: np.ndarray  # (H, W) uint8 leaf values
    tree: Tree
    path: Path | None = None
    probabilities: Probabilities | None = field(default=None, repr=False)

    def __repr__(self) -> str:  # no arrays: a list of results prints short
        height, width = self.labels.shape
        return f"Result(path={self.path!r}, size={width}x{height}, tree={self.tree.name!r})"

    @property
    def probs(self) -> np.ndarray:
        if self.probabilities is None:
            raise ValueError("this result was made without probabilities")
        return self.probabilities.full()

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
    """Runs one model or an ensemble, with optional flip / multi-scale test-time augmentation,
    sliding windows for large images (``tile``) and a zoomed-in second pass on small people
    (``zoom``).

    Zoom-in: pixels whose body probability (1 - P(background)) reaches ``zoom_threshold`` form
    connected components; each one covering less than ``zoom_max_share`` of the image is cropped
    with ``zoom_margin`` (times its longer side) of context on every side, squared and clipped to
    the image, run again at the model size, and its probabilities are blended into the crop with
    weight ``zoom_weight`` (1 replaces them), except on pixels of other components: a large
    neighbour cut by the crop keeps its full-image probabilities.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        long_side: int | None = None,
        flip: bool = False,
        scales: Sequence[float] = (1.0,),
        tile: bool = False,
        zoom: bool = False,
        zoom_threshold: float = 0.35,
        zoom_margin: float = 0.25,
        zoom_max_share: float = 0.05,
        zoom_weight: float = 0.5,
        clean: int | None = None,
        batch_size: int = BATCH_SIZE,
    ):
        if not backends:
            raise ModelError("no model given")
        tree = backends[0].tree
        for b in backends[1:]:
            if not b.tree.same_as(tree):
                raise ModelError(
                    f"{b.name}: its tree '{b.tree.name}' differs from '{tree.name}' (the models "
                    "of an ensemble average their leaves, so they must share one tree)"
                )
        low, high = LONG_SIDE_RANGE
        if long_side is not None and not low <= long_side <= high:
            raise ModelError(f"long_side must be between {low} and {high} pixels, not {long_side}")
        if not scales or not all(SCALE_RANGE[0] <= s <= SCALE_RANGE[1] for s in scales):
            # NaN fails the comparison; no scale at all would leave nothing to average
            raise ModelError(
                f"scales must be one or more in {SCALE_RANGE[0]}..{SCALE_RANGE[1]}, not {scales}"
            )
        if clean is not None and clean < 0:
            raise ModelError(f"clean must be 0 (off) or a region size in pixels, not {clean}")
        self.backends = list(backends)
        self.tree = tree
        self.long_side = long_side or backends[0].long_side
        self.flip = flip
        self.scales = tuple(scales)
        self.tile = tile
        self.zoom = zoom
        self.zoom_threshold = zoom_threshold
        self.zoom_margin = zoom_margin
        self.zoom_max_share = zoom_max_share
        self.zoom_weight = zoom_weight
        # min region size in pixels for hiseg.postprocess; 0 = off; None = the model's default
        self.clean = backends[0].spec.default_clean if clean is None else clean
        self.batch_size = max(1, batch_size)

    # -- probabilities ----------------------------------------------------------------------

    def leaf_probs(self, image: np.ndarray) -> np.ndarray:
        """(leaves, H, W) probabilities at the image's size: the full pass, averaged with the
        sliding windows when tiling applies, then refined on small people when zooming."""
        return self._refined(image, self.pass_probs(image))

    def _refined(self, image: np.ndarray, probs: np.ndarray) -> np.ndarray:
        if self._tiles(image):
            probs = (probs + self.tiled_probs(image)) / 2
        if self.zoom:
            probs = self.zoomed_probs(image, probs)
        return probs

    def _tiles(self, image: np.ndarray) -> bool:
        return self.tile and max(image.shape[:2]) > TILE_FACTOR * self.long_side

    def pass_probs(self, image: np.ndarray) -> np.ndarray:
        """One look at an image or crop, averaged over models and TTA, at the input's size."""
        return _full(self._looks([image])[0])

    def _looks(self, images: Sequence[np.ndarray]) -> list[list[Probabilities]]:
        """Each image's looks, one per size it was seen at (models and flips averaged at
        network resolution, exact since restoring is linear). Images fitted to the same network
        shape share network calls, at most ``batch_size`` (doubled by ``flip``) per call; any
        image gets exactly the same network input whatever its batch, so batched results equal
        one-at-a-time ones."""
        sums: list[dict[tuple[int, Geometry], np.ndarray]] = [{} for _ in images]
        counts: list[dict[tuple[int, Geometry], int]] = [{} for _ in images]
        for backend in self.backends:
            for s, scale in enumerate(self.scales):
                side = max(1, round(self.long_side * scale))
                inputs = [prepare(image, backend.spec, side) for image in images]
                groups: dict[tuple[int, ...], list[int]] = {}
                for i, (x, _) in enumerate(inputs):
                    groups.setdefault(x.shape, []).append(i)
                for members in groups.values():
                    for start in range(0, len(members), self.batch_size):
                        chunk = members[start : start + self.batch_size]
                        if len(chunk) == 1:  # a view: no copy
                            x = inputs[chunk[0]][0][None]
                        else:
                            x = np.stack([inputs[i][0] for i in chunk])
                        sizes = [inputs[i][1].output_hw for i in chunk]
                        hw = (max(h for h, _ in sizes), max(w for _, w in sizes))
                        probs = self._run(backend, x, hw)
                        for i, p in zip(chunk, probs, strict=True):
                            geometry = inputs[i][1].cropped()
                            h, w = geometry.output_hw
                            key = (s, geometry)
                            if key in sums[i]:
                                sums[i][key] += p[:, :h, :w]
                                counts[i][key] += 1
                            else:  # a copy out of a batch, which a result must not keep
                                own = p[:, :h, :w]
                                sums[i][key] = own.copy() if len(chunk) > 1 else own
                                counts[i][key] = 1
        looks = []
        for image_sums, image_counts in zip(sums, counts, strict=True):
            for key, n in image_counts.items():
                if n > 1:
                    image_sums[key] /= n
            looks.append([restore(p, g) for (_, g), p in image_sums.items()])
        return looks

    def _run(self, backend: Backend, x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """(B, 3, H, W) -> (B, leaves, h, w) probabilities of the top-left ``hw`` of the output
        (the resized images, without the padding the softmax need not see), flip TTA averaged
        in."""
        n = len(x)
        if self.flip:
            x = np.concatenate([x, x[..., ::-1]])
        logits = backend.run(x)
        if self.flip:
            logits[n:] = logits[n:, ..., ::-1].copy()  # mirrored back
        probs = batch_softmax(logits[..., : hw[0], : hw[1]])
        if not self.flip:
            return probs
        out = probs[:n]
        out += probs[n:]
        out /= 2
        return out

    def tiled_probs(self, image: np.ndarray) -> np.ndarray:
        """Half-overlapping model-size windows at native resolution, blended with weights that
        fall off toward each window's border (where the network lacks context)."""
        h, w = image.shape[:2]
        size = self.long_side
        total = np.zeros((self.tree.num_leaves, h, w), np.float32)
        weight = np.zeros((h, w), np.float32)
        for y in _window_starts(h, size):
            for x in _window_starts(w, size):
                crop = image[y : y + size, x : x + size]
                ch, cw = crop.shape[:2]
                ramp = np.outer(_tent(ch), _tent(cw))
                total[:, y : y + ch, x : x + cw] += self.pass_probs(crop) * ramp
                weight[y : y + ch, x : x + cw] += ramp
        return total / weight

    def zoomed_probs(self, image: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """``probs`` with each small person's crop replaced by (blended with) a zoomed-in pass."""
        h, w = image.shape[:2]
        bg = int(self.tree.leaf_index(np.array(self.tree.background.value)))
        body = (1 - probs[bg] >= self.zoom_threshold).astype(np.uint8)
        count, regions, stats, _ = cv2.connectedComponentsWithStats(body, connectivity=8)
        total = np.zeros_like(probs)
        weight = np.zeros((h, w), np.float32)
        for i, (x, y, bw, bh, area) in enumerate(stats[1:count], start=1):
            if not MIN_REGION_PIXELS <= area < self.zoom_max_share * h * w:
                continue
            y0, y1, x0, x1 = _zoom_box(x, y, bw, bh, self.zoom_margin, h, w)
            if max(y1 - y0, x1 - x0) * MIN_ZOOM > max(h, w):
                continue
            crop = regions[y0:y1, x0:x1]
            own = ((crop == i) | (crop == 0)).astype(np.float32)  # never overwrite other people
            total[:, y0:y1, x0:x1] += self.pass_probs(image[y0:y1, x0:x1]) * own
            weight[y0:y1, x0:x1] += own
        zoomed = weight > 0
        if not zoomed.any():
            return probs
        out = probs.copy()
        refined = total[:, zoomed] / weight[zoomed]
        out[:, zoomed] = (1 - self.zoom_weight) * probs[:, zoomed] + self.zoom_weight * refined
        return out

    # -- predictions ------------------------------------------------------------------------

    def predict(
        self, image: ImageLike, adjust: Callable[[Probabilities], Probabilities] | None = None
    ) -> Result:
        """One image: an RGB uint8 array, a PIL image or a path (see :func:`hiseg.images.as_rgb`
        for the other arrays accepted); a bad one raises its :class:`HisegError`. ``adjust``
        changes the probabilities before decoding (videos' temporal smoothing)."""
        image, path = as_rgb(image)
        return self._predict([image], [path], adjust)[0]

    def predict_batch(self, images: Sequence[ImageLike]) -> list[Result | HisegError]:
        """Several images, ``batch_size`` per network call, each result equal to ``predict``'s.

        Returns one item per input, in order: its :class:`Result`, or the :class:`HisegError`
        that stopped it (an unreadable or missing file, an invalid array), so one bad input
        never loses the others. Check with ``isinstance(item, Result)``.
        """
        if isinstance(images, (str, os.PathLike, np.ndarray, Image.Image)):
            # a path would be read letter by letter, an (H, W, 3) array row by row
            raise ImageInputError(
                f"predict_batch takes a list of images, not one {type(images).__name__}; "
                "use predict() for a single image"
            )
        images = list(images)
        out: list[Result | HisegError] = []
        for start in range(0, len(images), self.batch_size):
            read: list[tuple[np.ndarray, Path | None] | HisegError] = []
            for item in images[start : start + self.batch_size]:
                try:
                    read.append(as_rgb(item))
                except HisegError as err:
                    read.append(err)
            good = [r for r in read if not isinstance(r, HisegError)]
            done = iter(self._predict([image for image, _ in good], [path for _, path in good]))
            out.extend(r if isinstance(r, HisegError) else next(done) for r in read)
        return out

    def _predict(
        self,
        images: Sequence[np.ndarray],
        paths: Sequence[Path | None],
        adjust: Callable[[Probabilities], Probabilities] | None = None,
    ) -> list[Result]:
        """RGB uint8 images -> results. One look (no multi-scale, tiling or zoom) is decoded
        from the network-resolution probabilities (:meth:`Probabilities.decode`, exact);
        otherwise the refinements work on full-size probabilities."""
        results = []
        for image, path, looks in zip(images, paths, self._looks(images), strict=True):
            if len(looks) == 1 and not self.zoom and not self._tiles(image):
                probs = looks[0]
            else:
                probs = Probabilities.from_full(self._refined(image, _full(looks)))
            if adjust:
                probs = adjust(probs)
            labels = probs.decode(self.tree)
            if self.clean:
                labels = clean_labels(probs, labels, self.tree, self.clean)
            results.append(Result(image, labels, self.tree, path, probs))
        return results


def _iterable(value: Any, option: str) -> list[Any]:
    try:
        return list(value)
    except TypeError:
        raise ModelError(f"{option} must be a list, not {value!r}") from None


def load(
    model: str | Path | Sequence[str | Path] | None = None,
    backend: str = "auto",
    threads: int | None = None,
    long_side: int | None = None,
    flip: bool | None = None,
    scales: Sequence[float] = (1.0,),
    tile: bool = False,
    zoom: bool = False,
    clean: int | None = None,
    memory_arena: bool = True,
    accurate: bool = False,
) -> Predictor:
    """A predictor for a bundled model name, an ``.onnx`` file, a ``.ckpt`` checkpoint, or a
    list of them (an ensemble). ``None`` is the default bundled model. ``memory_arena``: see
    :func:`onnx_backend`. ``accurate``: the flip + :data:`ACCURATE_SCALES` preset (on the
    default part model +1.9 points of mIoU2 at about 6x the time, MODEL_CARD.md);
    it replaces ``flip`` and ``scales``, so giving either too is refused. ``flip``: average with
    the mirrored image (None: off)."""
    switches: dict[str, Any] = {"flip": flip, "tile": tile, "zoom": zoom, "accurate": accurate}
    for option, value in switches.items():
        if value is not None and not isinstance(value, (bool, np.bool_)):  # 'no' is truthy
            raise ModelError(f"{option} must be True or False, not {value!r}")
    counts: dict[str, Any] = {"threads": threads, "long_side": long_side, "clean": clean}
    for option, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral)):
            raise ModelError(f"{option} must be a whole number, not {value!r}")
    listed = [scales] if isinstance(scales, (str, bytes)) else _iterable(scales, "scales")
    if not all(isinstance(s, Real) and not isinstance(s, bool) for s in listed):
        raise ModelError(f"scales must be a list of numbers, e.g. (1.0, 1.25), not {scales!r}")
    scales = tuple(float(s) for s in listed)
    if accurate:
        if tuple(scales) != (1.0,):
            raise ModelError(f"accurate sets the scales to {ACCURATE_SCALES}; got scales {scales}")
        if flip is not None:
            raise ModelError(f"accurate sets flip; got flip={flip}: give one or the other")
        flip, scales = True, ACCURATE_SCALES
    single = model is None or isinstance(model, (str, Path))
    names: list[Any] = [model] if single else _iterable(model, "model")
    for name in names:
        if name is not None and (not isinstance(name, (str, Path)) or not str(name)):
            raise ModelError(f"model must be a bundled name, a file or a list of them: {name!r}")
    backends = [load_backend(name, backend, threads, memory_arena) for name in names]
    return Predictor(
        backends,
        long_side=long_side,
        flip=bool(flip),
        scales=scales,
        tile=tile,
        zoom=zoom,
        clean=clean,
    )


def _full(looks: Sequence[Probabilities]) -> np.ndarray:
    """The mean of an image's looks at its size; one look (the default) is returned as is."""
    if len(looks) == 1:
        return looks[0].full()
    total = looks[0].full().copy()
    for look in looks[1:]:
        total += look.full()
    total /= len(looks)
    return total


def _window_starts(length: int, size: int) -> list[int]:
    """Window origins along one axis: first and last flush with the edges, half-overlapping."""
    if length <= size:
        return [0]
    n = -(-(length - size) // (size // 2)) + 1
    return np.linspace(0, length - size, n).round().astype(int).tolist()


def _tent(n: int) -> np.ndarray:
    """Blending weights along a window: 1 in the middle, 0.1 at the borders (never 0)."""
    return (1 - 0.9 * np.abs(np.linspace(-1, 1, n))).astype(np.float32)


def _zoom_box(
    x: int, y: int, bw: int, bh: int, margin: float, h: int, w: int
) -> tuple[int, int, int, int]:
    """A square around a box with ``margin`` of its longer side on each side, clipped to the
    image: (y0, y1, x0, x1)."""
    half = max(bw, bh) * (0.5 + margin)
    cy, cx = y + bh / 2, x + bw / 2
    y0, y1 = max(0, round(cy - half)), min(h, round(cy + half))
    x0, x1 = max(0, round(cx - half)), min(w, round(cx + half))
    return y0, y1, x0, x1
