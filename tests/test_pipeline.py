"""The prediction pipeline against fake networks whose output is known exactly (pure NumPy).

``affine`` is a network whose probabilities are an affine function of each input pixel's colour,
so on a ramp image (red grows down, green grows right) they are a known function of the pixel's
coordinates, which every resize, pad, crop and bilinear restore must reproduce: a misplaced,
stretched, mirrored or nearest-neighbour step shows as an error far above the tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import hiseg
from hiseg import pipeline
from hiseg.errors import HisegError
from hiseg.images import ImageInputError, ImageReadError
from hiseg.pipeline import (
    Geometry,
    Probabilities,
    batch_softmax,
    letterbox,
    prepare,
    restore,
    softmax,
)
from hiseg.predictor import Backend, Predictor, Result, _checked_run, resolve_model
from hiseg.spec import METADATA_KEY, SCHEMA_VERSION, ModelError, ModelSpec
from hiseg.taxonomy import load_tree

TREE = load_tree("pascal-person-part")  # 7 leaves, values 0..6 in channel order
BASE = np.array([0.3, 0.1, 0.15, 0.1, 0.15, 0.1, 0.1], np.float32)
#: (leaf, colour) slopes; columns sum to 0 and |slope| / 2 <= BASE, so probabilities stay > 0.
SLOPE = np.zeros((7, 3), np.float32)
SLOPE[[0, 2, 4], 0] = [0.5, -0.25, -0.25]
SLOPE[[1, 3], 1] = [0.18, -0.18]
SLOPE[[5, 6], 2] = [0.18, -0.18]


def spec(long_side: int = 24, stride: int = 8, output_scale: int = 1) -> ModelSpec:
    """Inputs in [0, 1] (mean 0, std 1)."""
    return ModelSpec(
        arch="fake",
        encoder="fake",
        tree=TREE,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        long_side=long_side,
        output_stride=stride,
        output_scale=output_scale,
    )


def true_probs(image: np.ndarray) -> np.ndarray:
    """What ``affine`` gives for each pixel of ``image`` (H, W, 3) uint8: (7, H, W)."""
    x = image.astype(np.float32).transpose(2, 0, 1) / 255 - 0.5
    return BASE[:, None, None] + np.einsum("lc,chw->lhw", SLOPE, x)


def affine(x: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> logits whose softmax is BASE + SLOPE @ (x - 0.5)."""
    return np.log(BASE[None, :, None, None] + np.einsum("lc,bchw->blhw", SLOPE, x - 0.5))


def ramp(h: int, w: int) -> np.ndarray:
    """Red grows down, green grows right, blue is a smooth wave: each pixel's colour is a
    (nearly) linear function of its coordinates."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    red, green = 255 * y / (h - 1), 255 * x / (w - 1)
    blue = 127.5 + 60 * np.sin(x / w * 2 + y / h)
    return np.stack([red, green, blue], -1).round().astype(np.uint8)


def predictor(
    run=affine, long_side: int = 24, stride: int = 8, output_scale: int = 1, **options
) -> Predictor:
    return Predictor([Backend("fake", run, spec(long_side, stride, output_scale))], **options)


def interior(a: np.ndarray, margin: int) -> np.ndarray:
    return a[..., margin:-margin, margin:-margin]


# -- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(61, 47), (47, 61), (97, 33), (33, 97), (17, 13), (13, 17)])
def test_round_trip_restores_the_image_coordinates(hw):
    """Odd sizes, both orientations, shrunk and enlarged: each pixel's probabilities are its own
    colour's (bilinear resizes reproduce a ramp away from the border)."""
    image = ramp(*hw)
    result = predictor().predict(image)
    assert result.labels.shape == hw and result.probs.shape == (7, *hw)
    margin = int(np.ceil(max(hw) / 24)) + 1  # one network pixel and a bit
    error = np.abs(interior(result.probs - true_probs(image), margin))
    assert error.max() < 2e-3, error.max()
    want = TREE.decode(true_probs(image))
    assert (result.labels == want).mean() > 0.97


def test_geometry_of_the_network_input():
    x, geometry = prepare(ramp(61, 47), spec(24, 8))
    assert geometry == Geometry((61, 47), (24, 18), (24, 24))
    assert x.shape == (3, 24, 24) and x.dtype == np.float32
    assert (x[:, :, 18:] == 0).all()  # padding right only, black (mean 0)
    assert (x[:, :, :18] > 0).any(axis=0).all()


def test_restore_is_bilinear_from_the_resized_area():
    """``restore`` drops the padding and upsamples bilinearly (what ``cv2.resize`` does)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 24, 24)).astype(np.float32)
    geometry = Geometry((61, 47), (24, 18), (24, 24))
    probs = softmax(logits.copy())[:, :24, :18]
    want = cv2.resize(probs.transpose(1, 2, 0), (47, 61), interpolation=cv2.INTER_LINEAR)
    restored = restore(softmax(logits), geometry).full()
    np.testing.assert_allclose(restored, want.transpose(2, 0, 1), atol=1e-6)
    batch = rng.normal(size=(2, 7, 100, 9)).astype(np.float32)
    np.testing.assert_allclose(batch_softmax(batch.copy()), softmax(batch, 1), atol=1e-7)
    pipeline.CHUNK_PIXELS, default = 50, pipeline.CHUNK_PIXELS  # chunks of 5 rows
    try:
        np.testing.assert_allclose(batch_softmax(batch.copy()), softmax(batch, 1), atol=1e-7)
    finally:
        pipeline.CHUNK_PIXELS = default


# -- decoding -------------------------------------------------------------------------------


def likeliest_at_every_level(probs: np.ndarray, labels: np.ndarray) -> None:
    """At each level a pixel's node is the likeliest child of its node one level up (the
    likeliest node at level 0): node probabilities are sums of their leaves'."""
    flat = probs.reshape(len(probs), -1)
    for k, level in enumerate(TREE.levels):
        nodes = flat.T @ TREE.membership(k)  # (pixels, nodes)
        chosen = level.lut[labels.ravel()]
        if k:
            allowed = (
                TREE._parent_index(k)[None, :] == TREE.levels[k - 1].lut[labels.ravel()][:, None]
            )
            nodes = np.where(allowed, nodes, -1)
        assert (chosen == nodes.argmax(1)).all(), f"level {k}"


def test_decoding_picks_the_likeliest_node_at_every_level():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(7) * 0.7, size=(40, 30)).transpose(2, 0, 1).astype(np.float32)
    likeliest_at_every_level(probs, TREE.decode(probs))


@pytest.mark.parametrize("hw", [(61, 47), (9, 7), (24, 18), (150, 113)])
def test_fast_decoding_equals_decoding_the_full_map(hw, monkeypatch):
    """:class:`Probabilities` decodes at network resolution and interpolates only where the four
    sources disagree; the labels are those of the full bilinear map."""
    rng = np.random.default_rng(2)
    small = rng.dirichlet(np.ones(7) * 0.5, size=(24, 18)).transpose(2, 0, 1).astype(np.float32)
    small = cv2.GaussianBlur(small.transpose(1, 2, 0), (3, 3), 0).transpose(2, 0, 1)

    def lazy() -> Probabilities:  # a fresh one: once made, the full map is used instead
        return Probabilities.from_network(small, Geometry(hw, (24, 18), (24, 24)))

    labels = lazy().decode(TREE)
    full = lazy().full()
    assert full.shape == (7, *hw)
    assert (labels == TREE.decode(full)).mean() > 0.9995
    mask = rng.random(hw) < 0.2
    np.testing.assert_allclose(lazy()[:, mask], full[:, mask], atol=1e-6)
    monkeypatch.setattr(pipeline, "CHUNK_PIXELS", 300)  # several chunks of rows
    np.testing.assert_array_equal(lazy().decode(TREE), labels)
    np.testing.assert_array_equal(Probabilities.from_full(full).decode(TREE), TREE.decode(full))


# -- a 1/k output (the head's upsampling left to the pipeline) -------------------------------


def align_corners_positions(small: int, padded: int) -> np.ndarray:
    """Where each of ``small`` output pixels sits on the ``padded`` input grid when an
    ``align_corners=True`` upsampling maps the one onto the other (first and last aligned)."""
    return np.arange(small) * ((padded - 1) / max(small - 1, 1))


def sample_linearly(a: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """``a`` read at fractional ``positions`` along ``axis``, linearly between neighbours."""
    i0 = np.clip(np.floor(positions).astype(int), 0, a.shape[axis] - 1)
    i1 = np.minimum(i0 + 1, a.shape[axis] - 1)
    w = (positions - i0).reshape([-1 if d == axis else 1 for d in range(a.ndim)])
    return np.take(a, i0, axis) * (1 - w) + np.take(a, i1, axis) * w


def quarter(run, k: int = 4):
    """A network that outputs 1/k of ``run``'s map: its probabilities at the input pixels that
    an align-corners x k upsampling puts its output pixels on (the points the upsampling
    interpolates between), as the bundled models compute before their head's upsampling."""

    def small(x: np.ndarray) -> np.ndarray:
        probs = softmax(run(x), axis=1)
        for axis in (2, 3):
            padded = x.shape[axis]
            probs = sample_linearly(probs, align_corners_positions(padded // k, padded), axis)
        return np.log(probs)

    return small


@pytest.mark.parametrize(
    "hw", [(61, 47), (47, 61), (97, 33), (33, 97), (17, 13), (13, 17), (48, 37)]
)
def test_a_quarter_output_restores_the_image_coordinates(hw):
    """Odd sizes (resized sides not multiples of 4), both orientations, shrunk, enlarged and
    already at the model size (48 x 37: no resize, yet a 1/4 map to restore): each pixel's
    probabilities are its own colour's, so image pixels are mapped to the 1/4 map through the
    resize and the align-corners upsampling the network's head was trained with."""
    image = ramp(*hw)
    model = predictor(quarter(affine), long_side=48, output_scale=4)
    result = model.predict(image)
    assert result.labels.shape == hw and result.probs.shape == (7, *hw)
    margin = int(np.ceil(4 * max(hw) / 48)) + 1  # one 1/4-map pixel and a bit
    error = np.abs(interior(result.probs - true_probs(image), margin))
    assert error.max() < 3e-3, error.max()
    want = interior(TREE.decode(true_probs(image)), margin)
    assert (interior(result.labels, margin) == want).mean() > 0.97
    lazy = model.predict(image).probabilities  # the labels came from the 1/4 map, never full
    assert lazy is not None and lazy._full is None


def composed_full(small: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The image-size map of a 1/k output, written out: each image pixel's position in the
    resized image (cv2's half-pixel rule, clamped to it), on the align-corners 1/k grid of the
    padded input, read bilinearly."""
    out = small
    for axis in (1, 2):
        o, r, p = (
            g[axis - 1] for g in (geometry.original_hw, geometry.resized_hw, geometry.padded_hw)
        )
        resized = np.clip((np.arange(o) + 0.5) * r / o - 0.5, 0, r - 1)
        on_small = resized * (p / geometry.output_scale - 1) / (p - 1)
        out = sample_linearly(out, on_small, axis)
    return out


def test_restoring_a_quarter_output_is_the_training_graphs_upsampling_then_the_resize():
    """On a map linear in its coordinates every bilinear step is exact, so mapping each image
    pixel through the composed steps equals doing the steps: the graph's align-corners x4 on the
    padded grid, the crop to the resized area, then cv2's resize to the image."""
    padded, resized, original = (32, 24), (27, 21), (61, 47)
    small_hw = (8, 6)
    q = np.mgrid[0 : small_hw[0], 0 : small_hw[1]].astype(np.float32)
    small = np.stack([0.3 + 0.02 * q[0] - 0.01 * q[1], 0.7 - 0.02 * q[0] + 0.01 * q[1]])
    upsampled = small
    for axis in (1, 2):
        positions = np.arange(padded[axis - 1]) * (small_hw[axis - 1] - 1) / (padded[axis - 1] - 1)
        upsampled = sample_linearly(upsampled, positions, axis)
    cropped = upsampled[:, : resized[0], : resized[1]].transpose(1, 2, 0)
    want = cv2.resize(cropped, original[::-1], interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
    geometry = Geometry(original, resized, padded, output_scale=4)
    restored = restore(small.copy(), geometry).full()
    np.testing.assert_allclose(restored, want, atol=1e-5)


@pytest.mark.parametrize(
    ("hw", "resized", "padded"),
    [
        ((61, 47), (27, 21), (32, 24)),
        ((47, 61), (21, 27), (24, 32)),
        ((150, 113), (48, 36), (48, 40)),
        ((9, 7), (24, 19), (24, 24)),
    ],
)
def test_decoding_a_quarter_map_equals_decoding_its_full_map(hw, resized, padded, monkeypatch):
    """Decoded at 1/4 resolution, interpolated only where the sources disagree: the labels of
    the full map made by the same composed mapping (written out in ``composed_full``)."""
    geometry = Geometry(hw, resized, padded, output_scale=4)
    rng = np.random.default_rng(6)
    small_hw = geometry.output_hw
    small = rng.dirichlet(np.ones(7) * 0.5, size=small_hw).transpose(2, 0, 1).astype(np.float32)
    network = np.zeros((7, padded[0] // 4, padded[1] // 4), np.float32)  # padding kept
    network[:, : small_hw[0], : small_hw[1]] = small

    def lazy() -> Probabilities:
        return restore(network, geometry)

    want = composed_full(small, geometry)
    full = lazy().full()
    assert full.shape == (7, *hw)
    np.testing.assert_allclose(full, want, atol=1e-6)
    labels = lazy().decode(TREE)
    assert (labels == TREE.decode(want)).mean() > 0.9995
    mask = rng.random(hw) < 0.2
    np.testing.assert_allclose(lazy()[:, mask], want[:, mask], atol=1e-6)
    ys, xs = np.nonzero(mask)
    one = lazy()  # many mixed pixels are read off the map widened first: the same values
    np.testing.assert_array_equal(one._interpolate(ys, xs, one._widened()), one[:, mask])
    monkeypatch.setattr(pipeline, "CHUNK_PIXELS", 300)
    np.testing.assert_array_equal(lazy().decode(TREE), labels)


def test_a_quarter_output_is_checked_and_cropped_to_what_the_image_reads():
    x, geometry = prepare(ramp(61, 47), spec(48, 16, output_scale=4))
    assert geometry == Geometry((61, 47), (48, 37), (48, 48), output_scale=4)
    assert geometry.output_hw == (12, 10)  # resized column 36 sits at 8.4 on the 1/4 grid
    assert geometry.cropped() == geometry  # the padded grid is part of the mapping
    plain = Geometry((61, 47), (48, 37), (48, 48))
    assert plain.output_hw == (48, 37) and plain.cropped().padded_hw == (48, 37)
    quarter_spec = spec(48, 16, output_scale=4)
    with pytest.raises(
        ModelError, match=r"returned shape \(1, 7, 48, 48\).*needs \(1, 7, 12, 12\)"
    ):
        _checked_run("fake", quarter_spec, affine)(x[None])  # a loaded model's full-size output
    assert _checked_run("fake", quarter_spec, quarter(affine))(x[None]).shape == (1, 7, 12, 12)


def test_flip_tta_on_a_quarter_output_is_mirror_equivariant():
    """The align-corners grid is symmetric: the mirrored-back 1/4 map of the mirrored input
    lies on the same grid (shrunk to 48 x 32, no padding)."""
    image = np.random.default_rng(7).integers(0, 256, (72, 48, 3), np.uint8)
    flip = predictor(quarter(positional), long_side=48, output_scale=4, flip=True)
    probs = flip.predict(image).probs
    np.testing.assert_allclose(flip.predict(image[:, ::-1]).probs, probs[..., ::-1], atol=1e-5)


# -- test-time augmentation ------------------------------------------------------------------


def positional(x: np.ndarray) -> np.ndarray:
    """Not mirror-symmetric: the logits depend on the column and on the colour."""
    w = x.shape[3]
    column = np.linspace(-3, 3, w, dtype=np.float32)
    out = np.log(BASE[None, :, None, None] + np.einsum("lc,bchw->blhw", SLOPE, x - 0.5))
    out[:, 1] += column
    out[:, 3] -= column**2
    return out


@pytest.mark.parametrize("hw", [(24, 16), (36, 24)])  # as is, and shrunk; no padding needed
def test_flip_tta_makes_any_network_mirror_equivariant(hw):
    """Averaging f(I) with the mirrored-back f(mirror(I)) commutes with mirroring."""
    image = np.random.default_rng(3).integers(0, 256, (*hw, 3), np.uint8)
    flip = predictor(positional, flip=True)
    plain = predictor(positional).predict(image).probs
    probs = flip.predict(image).probs
    mirrored = flip.predict(image[:, ::-1]).probs
    np.testing.assert_allclose(mirrored, probs[..., ::-1], atol=1e-5)
    assert not np.allclose(plain, probs, atol=1e-2)  # the flip did something


def test_scales_each_map_back_to_the_image():
    seen = []

    def recording(x):
        seen.append(x.shape[2:])
        return affine(x)

    image = ramp(61, 47)
    result = predictor(recording, scales=(0.75, 1.0, 1.5), flip=True).predict(image)
    assert sorted(max(s) for s in seen) == [24, 24, 40]  # 18 -> padded 24, 24, 36 -> 40
    error = np.abs(interior(result.probs - true_probs(image), 4))
    assert error.max() < 2e-3, error.max()


# -- tiling and zoom -------------------------------------------------------------------------


def test_tiling_equals_no_tiling_for_a_translation_equivariant_network():
    """Windows at native resolution, blended: for a per-pixel network exactly the one pass at
    native resolution, whatever the image content."""
    image = np.random.default_rng(4).integers(0, 256, (70, 53, 3), np.uint8)
    tiled = predictor(long_side=24, tile=True)
    whole = predictor(long_side=70).pass_probs(image)  # its own size: no resize
    np.testing.assert_allclose(tiled.tiled_probs(image), whole, atol=1e-5)
    np.testing.assert_allclose(whole, true_probs(image), atol=1e-5)
    blended = tiled.leaf_probs(image)  # the global pass averaged in
    np.testing.assert_allclose(blended, (tiled.pass_probs(image) + whole) / 2, atol=1e-5)


def test_zoom_sees_a_small_person_sharper_and_leaves_the_rest():
    """A small dark-red blob is "body" (background probability falls with red); the zoomed-in
    pass sees it at higher resolution, so its probabilities move toward the true ones, and
    nothing outside the crop changes."""
    h, w = 160, 120
    image = np.full((h, w, 3), 230, np.uint8)
    y, x = np.mgrid[0:h, 0:w]
    blob = np.exp(-((y - 100) ** 2 + (x - 40) ** 2) / (2 * 5.0**2))
    image[..., 0] = (230 * (1 - blob)).round().astype(np.uint8)
    zoom = predictor(long_side=32, zoom=True, zoom_threshold=0.6, zoom_weight=1.0)
    full = zoom.pass_probs(image)
    out = zoom.zoomed_probs(image, full)
    changed = np.abs(out - full).max(0) > 1e-6
    ys, xs = np.nonzero(changed)
    assert ys.min() >= 85 and ys.max() <= 115 and xs.min() >= 25 and xs.max() <= 55
    crop = np.s_[:, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    truth = true_probs(image)
    assert np.abs(out[crop] - truth[crop]).mean() < 0.25 * np.abs(full[crop] - truth[crop]).mean()


# -- batches ---------------------------------------------------------------------------------


def global_context(x: np.ndarray) -> np.ndarray:
    """Each image's logits depend on its own mean colour too: a batch that mixed images, or
    padded one more than alone, would change them."""
    out = affine(x)
    return out + x.mean(axis=(1, 2, 3))[:, None, None, None] * np.arange(7)[None, :, None, None]


def test_batch_equals_one_at_a_time_and_reports_bad_items(tmp_path):
    rng = np.random.default_rng(5)
    images = [ramp(61, 47), rng.integers(0, 256, (47, 61, 3), np.uint8), ramp(60, 45)]
    images.append(images[0][::-1].copy())
    calls = []

    def counting(x):
        calls.append(len(x))
        return global_context(x)

    model = predictor(counting, batch_size=3, flip=True)
    alone = [model.predict(image) for image in images]
    calls.clear()
    items = [images[0], tmp_path / "missing.png", images[1], np.zeros((0, 4, 3), np.uint8)]
    items += images[2:]
    batch = model.predict_batch(items)
    assert len(calls) < 4 + 4  # several images per call (flip doubles each call)
    assert isinstance(batch[1], ImageReadError) and "missing.png" in str(batch[1])
    assert isinstance(batch[3], HisegError) and not isinstance(batch[3], Result)
    good = [batch[0], batch[2], batch[4], batch[5]]
    for one, many in zip(alone, good, strict=True):
        assert isinstance(many, Result)
        np.testing.assert_array_equal(one.labels, many.labels)
        np.testing.assert_allclose(one.probs, many.probs, atol=1e-6)


def test_predict_batch_refuses_one_image_and_takes_any_iterable(tmp_path):
    """A path would be read letter by letter, an (H, W, 3) array row by row: refused, saying
    to use predict(); a generator of images is a batch like a list."""
    model = predictor(global_context, batch_size=2)
    image = ramp(61, 47)
    for one in (str(tmp_path / "a.png"), tmp_path / "a.png", image, Image.fromarray(image)):
        with pytest.raises(ImageInputError, match="use predict"):
            model.predict_batch(one)
    batch = model.predict_batch(im for im in [image, image, image])
    assert len(batch) == 3 and all(isinstance(r, Result) for r in batch)


def test_load_refuses_options_of_the_wrong_type_by_name():
    """'no' is truthy and '2' < 1 a TypeError: each is a ModelError naming the option."""
    for options, words in [
        ({"flip": "no"}, "flip must be True or False, not 'no'"),
        ({"accurate": "no"}, "accurate must be True or False"),
        ({"tile": "no"}, "tile must be True or False"),
        ({"threads": "2"}, "threads must be a whole number"),
        ({"long_side": 100.5}, "long_side must be a whole number"),
        ({"clean": 1.5}, "clean must be a whole number"),
        ({"threads": True}, "threads must be a whole number"),
        ({"scales": 1.0}, "scales must be a list"),
        ({"scales": "1"}, "scales must be a list of numbers"),
        ({"model": 123}, "model must be a list"),
        ({"model": ""}, "model must be a bundled name, a file or a list of them"),
    ]:
        with pytest.raises(ModelError, match=re.escape(words)):
            hiseg.load(**{"model": "person", **options})
    model = hiseg.load("person", scales=np.array([1.0, 1.25]), threads=np.int64(1))
    assert model.scales == (1.0, 1.25)


def test_letterbox_keeps_the_aspect_ratio():
    fitted, geometry = letterbox(ramp(61, 47), 24, 8)
    assert geometry.resized_hw == (24, 18) and fitted.shape == (24, 24, 3)
    assert (fitted[:, 18:] == 0).all()


def test_prediction_modules_never_import_torch():
    code = (
        "import sys\n"
        "import hiseg.pipeline, hiseg.predictor, hiseg.spec\n"
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- the model spec --------------------------------------------------------------------------


def test_spec_round_trips_through_json():
    original = spec(320, 32)
    again = ModelSpec.from_json(original.to_json())
    assert again == original and again.tree.same_as(TREE) and again.schema == SCHEMA_VERSION
    assert again != dataclasses.replace(original, long_side=321)


LEGACY_SPECS = Path(__file__).parent / "data"


@pytest.mark.parametrize(
    ("name", "long_side", "leaves", "clean"),
    [("pascal-person-part", 512, 7, 0), ("person", 320, 2, 1000)],
)
def test_legacy_metadata_is_read_as_a_spec(name, long_side, leaves, clean):
    """The bundled files of hiseg 0.1 carried an untyped dict (schema 0, kept in tests/data)."""
    raw = (LEGACY_SPECS / f"legacy_spec_{name}.json").read_text()
    assert "schema" not in json.loads(raw)  # really the old format
    legacy = ModelSpec.from_json(raw, source=name)
    assert (legacy.arch, legacy.encoder) == ("fpn", "tu-tf_efficientnet_lite0")
    assert (legacy.long_side, legacy.train_size, legacy.num_leaves) == (long_side, 320, leaves)
    assert (legacy.precision, legacy.default_clean, legacy.output_stride) == ("int8", clean, 32)
    assert legacy.mean == legacy.std == (0.5, 0.5, 0.5) and legacy.tree.name == name
    assert legacy.output_scale == 1 and legacy.schema == SCHEMA_VERSION
    assert ModelSpec.from_json(legacy.to_json()) == legacy  # and written in the new one


def test_the_bundled_person_model_kept_its_legacy_spec():
    """The person file now carries its 0.1 spec with ``output_scale`` 4 (its head's x4
    upsampling stripped, ``benchmarks/quarter_output.md``); nothing else changed."""
    import onnxruntime as ort

    legacy = ModelSpec.from_json((LEGACY_SPECS / "legacy_spec_person.json").read_text())
    path = resolve_model("person")
    bundled = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map[METADATA_KEY]
    assert json.loads(bundled)["schema"] == SCHEMA_VERSION == 2
    assert ModelSpec.from_json(bundled) == dataclasses.replace(legacy, output_scale=4)


def test_a_full_resolution_spec_is_written_as_schema_1_for_older_readers():
    """Only a 1/k output needs schema 2; a full-size one stays readable by an older hiseg."""
    full, quarter = spec(), spec(output_scale=4)
    written = json.loads(full.to_json())
    assert written["schema"] == 1 and "output_scale" not in written
    assert ModelSpec.from_json(full.to_json()) == full
    written = json.loads(quarter.to_json())
    assert written["schema"] == 2 and written["output_scale"] == 4
    assert ModelSpec.from_json(quarter.to_json()).output_scale == 4


def test_a_schema_1_spec_reads_as_a_full_resolution_output():
    """Written before ``output_scale`` existed (schema 1): the network output is full size."""
    data = {**spec(output_scale=4).to_dict(), "schema": 1}
    del data["output_scale"]
    read = ModelSpec.from_dict(data)
    assert read == spec() and read.output_scale == 1 and read.schema == SCHEMA_VERSION
    quarter_spec = spec(output_scale=4)
    assert ModelSpec.from_json(quarter_spec.to_json()) == quarter_spec != spec()


def broken(change) -> str:
    data = spec().to_dict()
    change(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (broken(lambda d: d.pop("long_side")), "lacks field(s) long_side"),
        (broken(lambda d: d.update(long_side="512")), "'long_side' must be a whole number"),
        (broken(lambda d: d.update(long_side=True)), "'long_side' must be a whole number"),
        (broken(lambda d: d.update(mean=[0.5, 0.5])), "'mean' must be three numbers"),
        (broken(lambda d: d.update(std=[0.5, 0.0, 0.5])), "'std' must be three numbers above 0"),
        (broken(lambda d: d.update(precision="fp8")), "'precision' must be fp32 or fp16 or int8"),
        (broken(lambda d: d.update(default_clean=-1)), "'default_clean' must be a whole number"),
        (broken(lambda d: d.update(decoder=[1])), "'decoder' must be an object"),
        (broken(lambda d: d.update(tree={"name": "x"})), "a tree needs a 'nodes' list"),
        (broken(lambda d: d.update(colour=1)), "unknown field(s) colour"),
        (broken(lambda d: d.update(schema=SCHEMA_VERSION + 1)), "written by a newer hiseg"),
        (broken(lambda d: d.update(schema="1")), "'schema' must be a whole number"),
        (broken(lambda d: d.update(output_scale=0)), "'output_scale' must be a whole number"),
        (broken(lambda d: d.update(output_scale=3)), "'output_scale' 3 must divide"),
        ('{"version": "0.1.0", "long_side": 512}', "lacks the 'model' object"),
    ],
)
def test_a_malformed_spec_is_one_clear_model_error(text, reason):
    with pytest.raises(ModelError) as caught:
        ModelSpec.from_json(text, source="some/model.onnx")
    message = str(caught.value)
    assert isinstance(caught.value, HisegError)
    assert message.startswith("some/model.onnx: ") and reason in message and "\n" not in message
