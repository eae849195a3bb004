"""The one prediction pipeline, in NumPy so the ONNX path never imports torch.

Every consumer (``hiseg predict``, ``hiseg eval``, training-time validation, export checks and
``hiseg bench``) goes through these steps, so they all measure what a user gets:

- :func:`prepare`: the image is resized so its long side is the model size (aspect ratio kept),
  padded bottom/right to the network stride, and normalised -> ``(3, H, W)`` and its
  :class:`Geometry`;
- the network runs on a batch of such inputs (``(B, 3, H, W)`` -> ``(B, leaves, H/k, W/k)``
  logits, ``k`` the spec's ``output_scale``);
- :func:`batch_softmax`, then :func:`restore`: the resized area cropped out of the padding,
  probabilities upsampled bilinearly to the image's size (labels are never resized
  nearest-neighbour);
- :meth:`Probabilities.decode`: top-down through the class tree (:meth:`Tree.decode`).

:class:`Probabilities` does restore + decode exactly but cheaply: the decision at each level is an
argmax of linear functions of the leaf probabilities, and a bilinear pixel's probabilities are a
convex combination of its 2x2 source pixels', so where those four decode to the same leaf the
pixel does too. It decodes at network resolution and interpolates probabilities only on the pixels
whose sources disagree (the borders between regions); full-size maps are made only on request.

A network with ``output_scale`` k (4 for smp's FPN) stops before its head's upsampling, an
``align_corners=True`` bilinear x k on the padded input grid, so softmax and decoding see k^2
times fewer pixels. Restoring maps each image pixel through both steps the full-size output took,
cv2's half-pixel resize from the image to the resized size and the align-corners grid from the
padded size to the 1/k map, and interpolates the 1/k map bilinearly there (:func:`_taps`). That
interpolates probabilities where the graph interpolated logits, and once where it did twice: a
small change of predictions, measured in ``benchmarks/quarter_output.md``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import cv2
import numpy as np

if TYPE_CHECKING:
    from hiseg.spec import ModelSpec
    from hiseg.taxonomy import Tree


#: Network input long sides accepted: below 32 px nothing is left to see, above 4096 px the
#: full-size probability maps no longer fit a typical machine's memory.
LONG_SIDE_RANGE = (32, 4096)
#: TTA scales accepted (times the long side).
SCALE_RANGE = (0.25, 4.0)


@dataclass(frozen=True)
class Geometry:
    """How an image was fitted to the network, so the output can be mapped back."""

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    padded_hw: tuple[int, int]
    #: Input pixels per output pixel along each side (the spec's ``output_scale``).
    output_scale: int = 1

    @property
    def output_hw(self) -> tuple[int, int]:
        """Rows and columns of the network output that restoring reads (the rest is padding)."""
        if self.output_scale == 1:
            return self.resized_hw
        (rh, rw), (ph, pw) = self.resized_hw, self.padded_hw
        return _source_size(rh, ph, self.output_scale), _source_size(rw, pw, self.output_scale)

    def cropped(self) -> Geometry:
        """This geometry once the output is cropped to :attr:`output_hw`. The padding no longer
        matters at scale 1, so looks from networks of other strides share it; a 1/k output's
        mapping depends on the padded size (the grid its upsampling was aligned to)."""
        if self.output_scale == 1:
            return Geometry(self.original_hw, self.resized_hw, self.resized_hw)
        return self


def letterbox(image: np.ndarray, long_side: int, stride: int = 32) -> tuple[np.ndarray, Geometry]:
    """Resize ``image`` (H, W, C) so its long side is ``long_side``; zero-pad to the stride."""
    h, w = image.shape[:2]
    scale = long_side / max(h, w)
    rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
    if (rh, rw) != (h, w):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (rw, rh), interpolation=interp)
    ph, pw = -(-rh // stride) * stride, -(-rw // stride) * stride
    if (ph, pw) != (rh, rw):
        image = cv2.copyMakeBorder(image, 0, ph - rh, 0, pw - rw, cv2.BORDER_CONSTANT, value=0)
    return image, Geometry((h, w), (rh, rw), (ph, pw))


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, normalised with mean/std in [0, 1] units."""
    # (v / 255 - mean) / std as one multiply-add per pixel, on the channels-first copy.
    std_ = np.asarray(std, np.float32)
    scale = np.float32(1.0) / (np.float32(255.0) * std_)
    offset = -np.asarray(mean, np.float32) / std_
    x = image.transpose(2, 0, 1).astype(np.float32, order="C")
    x *= scale[:, None, None]
    x += offset[:, None, None]
    return x


def prepare(
    image: np.ndarray, spec: ModelSpec, long_side: int | None = None
) -> tuple[np.ndarray, Geometry]:
    """(H, W, 3) uint8 RGB -> the network input (3, H', W') float32 and how it was fitted;
    ``long_side`` defaults to the model's inference size."""
    fitted, geometry = letterbox(image, long_side or spec.long_side, spec.output_stride)
    if spec.output_scale != 1:
        geometry = dataclasses.replace(geometry, output_scale=spec.output_scale)
    return normalize(fitted, spec.mean, spec.std), geometry


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    return softmax_in_place(logits.astype(np.float32, copy=True), axis)


def softmax_in_place(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    """Overwrites ``logits`` (float32, may be a view): no full-size allocation, whose first
    touch costs more than the arithmetic."""
    logits -= logits.max(axis=axis, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=axis, keepdims=True)
    return logits


def batch_softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the channels of (B, C, H, W) logits, in place, in chunks of rows."""
    _, _, rows, width = logits.shape
    in_chunks(lambda a, b: softmax_in_place(logits[:, :, a:b], axis=1), rows, width)
    return logits


_T = TypeVar("_T")
#: Pixels per chunk of rows: the temporaries of a chunk stay in cache (about 25% faster than
#: whole-image arrays, which also pay for fresh memory pages on every call). Spreading chunks
#: over threads was measured too: no faster on the 2 shared cores, slower under load.
CHUNK_PIXELS = 32_768


def in_chunks(fn: Callable[[int, int], _T], rows: int, width: int) -> list[_T]:
    """``fn(start, stop)`` over consecutive chunks of ``rows`` rows of ``width`` pixels."""
    step = max(1, CHUNK_PIXELS // max(1, width))
    return [fn(a, min(a + step, rows)) for a in range(0, rows, step)]


def restore(probs: np.ndarray, geometry: Geometry) -> Probabilities:
    """The network's (leaves, >= output H, >= output W) softmax output -> the image's
    probabilities: padding dropped, upsampled bilinearly to the image's size on demand
    (:meth:`Probabilities.full`); :meth:`Probabilities.decode` gives the labels."""
    return Probabilities.from_network(probs, geometry)


class Probabilities:
    """Leaf probabilities at an image's size, kept at network resolution until asked for.

    Made from the network's probabilities (:meth:`from_network`) or from a full-size map
    (:meth:`from_full`). ``probs[:, mask]`` (as :func:`hiseg.postprocess.clean_labels` reads them)
    interpolates only the masked pixels; :meth:`full` makes the whole map once.
    """

    def __init__(self, small: np.ndarray | None, geometry: Geometry | None, full=None):
        self._small, self._geometry, self._full = small, geometry, full

    @classmethod
    def from_network(cls, probs: np.ndarray, geometry: Geometry) -> Probabilities:
        """``probs``: (leaves, >= output H, >= output W) softmax output (see
        :attr:`Geometry.output_hw`); padding is dropped."""
        h, w = geometry.output_hw
        small = np.ascontiguousarray(probs[:, :h, :w])
        same = geometry.resized_hw == geometry.original_hw and geometry.output_scale == 1
        full = small if same else None
        return cls(small, geometry, full)

    @classmethod
    def from_full(cls, probs: np.ndarray) -> Probabilities:
        return cls(None, None, probs)

    @property
    def shape(self) -> tuple[int, ...]:
        if self._full is not None:
            return self._full.shape
        assert self._small is not None and self._geometry is not None
        return (self._small.shape[0], *self._geometry.original_hw)

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> Probabilities:
        """``fn`` applied to the (leaves, h, w) map at the resolution it is kept at (network
        resolution unless only a full-size map exists), so per-pixel steps such as temporal
        smoothing cost little; ``fn`` must keep the shape."""
        if self._small is None:
            return Probabilities.from_full(fn(self._full))
        small = fn(self._small)
        return Probabilities(small, self._geometry, small if self._full is self._small else None)

    def full(self) -> np.ndarray:
        """(leaves, H, W) float32 at the image's size (bilinear, as ``cv2.resize`` at scale 1)."""
        if self._full is None:
            assert self._small is not None and self._geometry is not None
            oh, ow = self._geometry.original_hw
            if self._geometry.output_scale == 1:
                hwc = cv2.resize(
                    self._small.transpose(1, 2, 0), (ow, oh), interpolation=cv2.INTER_LINEAR
                )
                self._full = hwc.reshape(oh, ow, -1).transpose(2, 0, 1)
            else:  # cv2 cannot map through the align-corners grid: separable, as _interpolate
                (y0, y1, wy), _ = self._taps()
                widened, wy = self._widened(), wy[:, None]
                self._full = widened.take(y0, axis=1) * (1 - wy) + widened.take(y1, axis=1) * wy
        return self._full

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        full = self.full()
        return full if dtype is None else full.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        if (
            self._full is None
            and isinstance(key, tuple)
            and len(key) == 2
            and key[0] == slice(None)
            and isinstance(key[1], np.ndarray)
            and key[1].dtype == bool
        ):
            return self.at(key[1])
        return self.full()[key]

    def at(self, mask: np.ndarray) -> np.ndarray:
        """(leaves, N) probabilities of the N pixels where ``mask`` (H, W) is set."""
        if self._full is not None:
            return self._full[:, mask]
        return self._interpolate(*_nonzero(mask))

    def decode(self, tree: Tree) -> np.ndarray:
        """(H, W) leaf values, equal to ``tree.decode(self.full())`` (see the module doc)."""
        if self._full is not None:
            return _decode(tree, self._full)
        assert self._small is not None and self._geometry is not None
        small = self._small
        h = small.shape[1]
        small_labels = _decode(tree, small)
        ow = self._geometry.original_hw[1]
        (y0, _, _), (x0, _, _) = self._taps()
        # A pixel's sources are (i, j), (i, j + 1), (i + 1, j), (i + 1, j + 1), clamped to the
        # map (see _taps), so whether they disagree is known per (i, j), at network resolution.
        # (take, not fancy indexing, which would leave the maps in column order.)
        below = np.concatenate([small_labels[1:], small_labels[-1:]])
        mixed_at = small_labels != below
        mixed_at[:, :-1] |= small_labels[:, :-1] != small_labels[:, 1:]
        mixed_at[:, :-1] |= small_labels[:, :-1] != below[:, 1:]
        mixed_at = mixed_at.take(y0, axis=0).take(x0, axis=1)
        widened = None
        if 2 * np.count_nonzero(mixed_at) > h * ow:
            # Many mixed pixels (a 1/4 map's borders are 4 pixels wide): interpolate along the
            # rows first, to the image's width, and decode that. A pixel lies between two of
            # its pixels, (y0, x) and (y1, x), so only where those two disagree is it mixed,
            # and it needs two gathers, not four.
            widened = self._widened()
            row_labels = _decode(tree, widened)
            below = np.concatenate([row_labels[1:], row_labels[-1:]])
            mixed_at = (row_labels != below).take(y0, axis=0)
            labels = row_labels.take(y0, axis=0)
        else:
            labels = small_labels.take(y0, axis=0).take(x0, axis=1)
        # Only the mixed pixels need their probabilities, taken in cache-sized runs.
        mixed = np.flatnonzero(mixed_at)
        for start in range(0, len(mixed), CHUNK_PIXELS):
            ys, xs = np.divmod(mixed[start : start + CHUNK_PIXELS], ow)
            labels[ys, xs] = tree.decode(self._interpolate(ys, xs, widened)[:, :, None])[:, 0]
        return labels

    def _interpolate(
        self, ys: np.ndarray, xs: np.ndarray, widened: np.ndarray | None = None
    ) -> np.ndarray:
        """Bilinear probabilities (as :meth:`full` makes them) at output pixels (ys, xs);
        ``widened``: :meth:`_widened`, if made (the same values, fewer gathers)."""
        assert self._small is not None
        rows, cols = self._taps()
        y0, y1, wy = (t[ys] for t in rows)
        if widened is None:
            x0, x1, wx = (t[xs] for t in cols)
            flat, width = self._small.reshape(len(self._small), -1), self._small.shape[2]
            y0 *= width
            y1 *= width

            def at(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
                return flat.take(rows + cols, axis=1)

            top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
            bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
        else:
            flat, width = widened.reshape(len(widened), -1), widened.shape[2]
            top, bottom = flat.take(y0 * width + xs, axis=1), flat.take(y1 * width + xs, axis=1)
        return top * (1 - wy) + bottom * wy

    def _widened(self) -> np.ndarray:
        """The kept map interpolated along its rows to the image's width: (leaves, rows, W)."""
        assert self._small is not None
        _, (x0, x1, wx) = self._taps()
        # take, not [:, :, x0], which would leave the result in (W, leaves, rows) memory order
        # and make every later reshape a copy
        return self._small.take(x0, axis=2) * (1 - wx) + self._small.take(x1, axis=2) * wx

    def _taps(self) -> tuple[_Taps, _Taps]:
        """The bilinear sources of the image's rows and columns in the kept map."""
        assert self._geometry is not None
        g = self._geometry
        return tuple(  # type: ignore[return-value]
            _taps(o, r, p, g.output_scale)
            for o, r, p in zip(g.original_hw, g.resized_hw, g.padded_hw, strict=True)
        )


def _decode(tree: Tree, probs: np.ndarray) -> np.ndarray:
    """``tree.decode`` of a (leaves, h, w) map, in chunks of rows."""
    _, h, w = probs.shape
    return np.concatenate(in_chunks(lambda a, b: tree.decode(probs[:, a:b]), h, w))


def _nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 2-D mask, ten times faster through the flat indices."""
    return np.divmod(np.flatnonzero(mask), mask.shape[1])


_Taps = tuple[np.ndarray, np.ndarray, np.ndarray]


def _source_size(resized: int, padded: int, scale: int) -> int:
    """Rows (or columns) of a 1/``scale`` output that the resized area's pixels read."""
    last = (resized - 1) * (padded / scale - 1) / max(padded - 1, 1)
    return min(padded // scale, int(last) + 2)


@functools.lru_cache(maxsize=64)
def _taps(out_size: int, in_size: int, padded: int, scale: int) -> _Taps:
    """Bilinear sources along one axis: for each output index, the two indices of the kept
    network output and the weight of the second. Cached, so read-only.

    At ``scale`` 1 the output has ``in_size`` (the resized size) and these are the taps of
    ``cv2.resize`` (INTER_LINEAR). At ``scale`` k the half-pixel position in the resized image
    (clamped to it, as cv2 does) is carried through the graph's align-corners upsampling from
    the 1/k grid to the ``padded`` one: position y there is y (padded / k - 1) / (padded - 1)
    in the 1/k map."""
    f = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    if scale != 1:
        f = np.clip(f, 0, in_size - 1) * ((padded / scale - 1) / max(padded - 1, 1))
        in_size = _source_size(in_size, padded, scale)
    i0 = np.floor(f).astype(np.intp)
    w = (f - i0).astype(np.float32)
    w[i0 < 0], i0[i0 < 0] = 0, 0
    last = i0 >= in_size - 1
    w[last], i0[last] = 0, in_size - 1
    taps = (i0, np.minimum(i0 + 1, in_size - 1), w)
    for t in taps:
        t.flags.writeable = False
    return taps
