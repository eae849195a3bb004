"""Export a checkpoint to the ONNX file the runtime serves, check it, and quantise it to int8.

The ONNX file carries what :mod:`hiseg.predictor` needs (tree, normalisation, model size) as its
:class:`~hiseg.spec.ModelSpec` JSON under the metadata key ``"hiseg"``, so it predicts with no torch
and no training config. Every image reaches the network through :func:`hiseg.pipeline.prepare`.
int8 is optional and kept only when it costs at most one mIoU point at every level of the tree: a
faster model that is visibly worse is no gain.

int8 is static QDQ quantisation with per-channel weights: ONNX Runtime's CPU provider fuses each
DequantizeLinear -> Conv -> QuantizeLinear into an integer QLinearConv, about twice as fast as fp32
here. (The QOperator format fails on these graphs: the quantiser reports "Graph is not a DAG".)
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from hiseg import __version__
from hiseg.bench import int8_path
from hiseg.data import Dataset
from hiseg.files import publish
from hiseg.metrics import ConfusionMatrix
from hiseg.models import load_checkpoint
from hiseg.pipeline import prepare
from hiseg.predictor import load, load_backend, torch_backend
from hiseg.spec import METADATA_KEY, ModelError, ModelSpec

INPUT, OUTPUT = "image", "logits"
#: ONNX opset of every export.
OPSET = 17
DYNAMIC_AXES = {name: {0: "batch", 2: "height", 3: "width"} for name in (INPUT, OUTPUT)}
#: An export is sound when ONNX Runtime and torch pick the same leaf on this share of pixels.
MIN_ARGMAX_AGREEMENT = 0.999
#: int8 is kept when no level's mIoU drops by more than this (one point).
MAX_MIOU_DROP = 0.01
#: Images used to calibrate int8 activation ranges.
CALIBRATION_IMAGES = 16
#: Images on which an export is compared with torch (spread over the split).
VALIDATION_IMAGES = 8
#: Nodes under this prefix (the last conv, and its upsampling in a full-resolution export) stay
#: float: cheap, and they shape the logits that the decision is made on.
HEAD_PREFIX = "/net/segmentation_head/"
#: Ops left float: ONNX Runtime has no int8 CPU kernel for them (GroupNorm exports as these).
FLOAT_OPS = ("InstanceNormalization",)


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    clean: int = 0,
    full_resolution: bool = False,
    long_side: int | None = None,
) -> Path:
    """Write ``checkpoint`` as one ONNX file, ``image`` (B, 3, H, W) -> ``logits``
    (B, leaves, H / k, W / k) for any batch and size, with the checkpoint's metadata (``fp32``).

    k is the spec's ``output_scale``: the head's final upsampling is stripped
    (:func:`strip_head_upsampling`) and left to the pipeline, unless ``full_resolution`` keeps
    it (k = 1, hiseg 0.1's format, for runtimes other than hiseg's); k is 1 too for a head
    that does not upsample (Unet, Linknet). ``clean`` is stored as the model's default clean-up
    (:mod:`hiseg.postprocess`), for models where it was measured to help; the predictor uses it
    unless told otherwise. ``long_side`` likewise replaces the checkpoint's inference long side
    (one checkpoint can ship as a faster model at a smaller size).
    """
    model, spec = load_checkpoint(checkpoint)
    side = spec.long_side
    example = torch.zeros(1, 3, side, side * 3 // 4)  # not a stride multiple: exercises the pad
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the dynamo exporter needs onnxscript, not installed
        warnings.filterwarnings(
            "ignore", "You are using the legacy TorchScript", DeprecationWarning
        )
        torch.onnx.export(
            model,
            (example,),
            buffer,  # type: ignore[arg-type]  # torch accepts a file object too
            input_names=[INPUT],
            output_names=[OUTPUT],
            opset_version=OPSET,
            dynamic_axes=DYNAMIC_AXES,
            dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    fold_same_padding(proto)
    stripped = not full_resolution and model.output_scale != 1  # Unet's head does not upsample
    scale = _strip_upsampling(proto, str(checkpoint)) if stripped else 1
    spec = dataclasses.replace(
        spec,
        precision="fp32",
        default_clean=clean,
        long_side=long_side or spec.long_side,
        hiseg_version=__version__,
        output_scale=scale,
    )
    _set_metadata(proto, spec)
    onnx.checker.check_model(proto, full_check=True)
    return _save_atomic(proto, Path(out))


def fold_same_padding(proto: onnx.ModelProto) -> int:
    """Let each convolution do its own TF-"same" padding; returns how many Pads were folded.

    timm's ``tf_`` encoders pad stride-2 convolutions by shape arithmetic -> ``Pad`` -> ``Conv``.
    ONNX's ``auto_pad=SAME_UPPER`` is the same padding (the odd pixel at the end), and without
    the float ``Pad`` between them int8 tensors stay quantised (the A/B is in
    ``benchmarks/fold_same_padding.md``). A Pad is folded only when its pads are computed (not
    constant), its mode is constant zero, and its one consumer is a Conv with no padding.
    """
    graph = proto.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = {init.name for init in graph.initializer}
    folded = []
    for pad in graph.node:
        users = consumers.get(pad.output[0], [])
        if pad.op_type != "Pad" or len(users) != 1 or users[0].op_type != "Conv":
            continue
        conv = users[0]
        pad_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in pad.attribute}
        conv_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
        constant_value = pad.input[2] if len(pad.input) > 2 else ""
        if (
            pad_attrs.get("mode", b"constant") != b"constant"
            or pad.input[1] in constants
            or _nonzero_constant(graph, constant_value)
            or any(conv_attrs.get("pads", [0]))
            or conv_attrs.get("auto_pad", b"NOTSET") != b"NOTSET"
        ):
            continue
        for attr in [a for a in conv.attribute if a.name == "pads"]:
            conv.attribute.remove(attr)
        conv.attribute.append(onnx.helper.make_attribute("auto_pad", "SAME_UPPER"))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    _drop_dead_nodes(graph)
    return len(folded)


def strip_head_upsampling(onnx_in: str | Path, out: str | Path) -> ModelSpec:
    """Rewrite an exported hiseg model (fp32 or int8, weights untouched) so its output is the
    head convolution's 1/k logits, and store ``output_scale`` k in its spec; returns the spec.

    The graph's head upsamples by k (``Resize``, bilinear, align-corners) before cropping to the
    input size (``Slice``); the pipeline restores the 1/k map to the image instead, on k^2 times
    fewer pixels (:mod:`hiseg.pipeline`). How much this changes predictions is measured in
    ``benchmarks/quarter_output.md``.
    """
    onnx_in = Path(onnx_in)
    proto = onnx.load(onnx_in)
    raw = {p.key: p.value for p in proto.metadata_props}.get(METADATA_KEY)
    if raw is None:
        raise ModelError(f"{onnx_in}: no '{METADATA_KEY}' metadata; not a hiseg export")
    spec = ModelSpec.from_json(raw, source=str(onnx_in))
    if spec.output_scale != 1:
        raise ModelError(f"{onnx_in}: already outputs 1/{spec.output_scale} of its input")
    scale = _strip_upsampling(proto, str(onnx_in))
    spec = dataclasses.replace(spec, output_scale=scale)
    _set_metadata(proto, spec)
    onnx.checker.check_model(proto)
    _save_atomic(proto, Path(out))
    return spec


def _strip_upsampling(proto: onnx.ModelProto, source: str) -> int:
    """The graph surgery of :func:`strip_head_upsampling`; returns k.

    From the output back: ``Slice`` nodes (the crop to the input size, starting at 0, step 1),
    then the head's ``Resize`` (linear, align_corners, scales (1, 1, k, k)). The Resize becomes
    an Identity (which ONNX Runtime removes), so the Slices crop the convolution's output, to
    ceil(size / k).
    """
    graph = proto.graph
    producer = {name: node for node in graph.node for name in node.output}
    slices = []
    node = producer.get(graph.output[0].name)
    while node is not None and node.op_type == "Slice":
        slices.append(node)
        node = producer.get(node.input[0])
    resize = node
    attrs = {} if resize is None else _attributes(resize)
    scales = _constant(graph, resize.input[2]) if resize and len(resize.input) > 2 else None
    if (
        resize is None
        or resize.op_type != "Resize"
        or not resize.name.startswith(HEAD_PREFIX)
        or attrs.get("mode") != b"linear"
        or attrs.get("coordinate_transformation_mode") != b"align_corners"
        or scales is None
        or len(scales) != 4
        or list(scales[:2]) != [1, 1]
        or scales[2] != scales[3]
        or not float(scales[2]).is_integer()
    ):
        raise ModelError(
            f"{source}: the output is not the head's align-corners upsampling (then a crop), "
            "so there is nothing known to strip"
        )
    scale = int(scales[2])
    for crop in slices:
        starts = _constant(graph, crop.input[1])
        steps = _constant(graph, crop.input[4]) if len(crop.input) > 4 else None
        ends = _constant(graph, crop.input[2])
        if (
            starts is None
            or starts.any()
            or (steps is not None and (steps != 1).any())
            or (ends is not None and (ends >= 2**31).any())  # "to the end": ends + k overflows
        ):
            raise ModelError(
                f"{source}: the crop '{crop.name}' is not one from 0 to a size, with step 1"
            )
    k, k_less_1 = f"{resize.name}/scale", f"{resize.name}/scale_minus_1"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([scale], np.int64), k),
            numpy_helper.from_array(np.array([scale - 1], np.int64), k_less_1),
        ]
    )
    for crop in slices:  # ends -> ceil(ends / k) = (ends + k - 1) // k, just before the crop
        at = list(graph.node).index(crop)
        rounded = onnx.helper.make_node("Add", [crop.input[2], k_less_1], [f"{crop.name}/up"])
        divided = onnx.helper.make_node("Div", [rounded.output[0], k], [f"{crop.name}/over_k"])
        crop.input[2] = divided.output[0]
        graph.node.insert(at, divided)
        graph.node.insert(at, rounded)
    at = list(graph.node).index(resize)
    graph.node.remove(resize)
    graph.node.insert(at, onnx.helper.make_node("Identity", [resize.input[0]], [resize.output[0]]))
    _drop_dead_nodes(graph)
    _drop_unused_initializers(proto)
    stale = {resize.output[0], *(crop.output[0] for crop in slices)}  # shapes now wrong
    for info in [v for v in graph.value_info if v.name in stale]:
        graph.value_info.remove(info)
    dims = graph.output[0].type.tensor_type.shape.dim
    for dim, name in zip(dims[2:4], ("height", "width"), strict=True):
        if dim.HasField("dim_value"):
            dim.dim_value = -(-dim.dim_value // scale)
        else:
            dim.dim_param = f"{name}_over_{scale}"
    return scale


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of an initializer or Constant node ``name``; None when computed at run time."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and name in node.output:
            value = onnx.helper.get_attribute_value(node.attribute[0])
            if isinstance(value, onnx.TensorProto):
                value = numpy_helper.to_array(value)
            return np.asarray(value)
    return None


def _nonzero_constant(graph: onnx.GraphProto, name: str) -> bool:
    """Whether ``name`` is a Constant node or initializer holding anything but zeros."""
    if not name:
        return False
    value = _constant(graph, name)
    return True if value is None else bool(value.any())  # computed at run time: not zero


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads (the folded Pads' shape arithmetic)."""
    while True:
        used = {name for node in graph.node for name in node.input}
        used.update(output.name for output in graph.output)
        dead = [node for node in graph.node if not any(o in used for o in node.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def validate_export(
    checkpoint: str | Path,
    onnx_path: str | Path,
    images: Sequence[np.ndarray],
    threads: int | None = None,
) -> dict[str, Any]:
    """Compare ONNX Runtime with torch on a few real images, over the image area (padding
    excluded). ``ok``: the argmax leaf agrees on ``MIN_ARGMAX_AGREEMENT`` of the pixels or more.
    No image is an error: "the export disagrees" would be the wrong reason.
    """
    if not images:
        raise ModelError(f"{onnx_path}: no image to check the export on (an empty split?)")
    exported = load_backend(onnx_path, "onnx", threads)
    full_resolution = exported.spec.output_scale == 1  # as the export's output
    reference = torch_backend(Path(checkpoint), threads, full_resolution)
    inputs = [prepare(image, exported.spec) for image in images]
    # All of torch first: ONNX Runtime's threads spin after each run and would slow torch down.
    wanted = [reference.run(x[None]) for x, _ in inputs]
    agree = pixels = 0
    max_diff = 0.0
    for (x, geometry), want in zip(inputs, wanted, strict=True):
        x = x[None]
        h, w = geometry.output_hw
        want, got = want[..., :h, :w], exported.run(x)[..., :h, :w]
        max_diff = max(max_diff, float(np.abs(want - got).max()))
        agree += int((want.argmax(1) == got.argmax(1)).sum())
        pixels += h * w
    share = agree / max(pixels, 1)
    return {
        "images": len(images),
        "pixels": pixels,
        "max_abs_diff": max_diff,
        "argmax_agreement": share,
        "ok": share >= MIN_ARGMAX_AGREEMENT,
    }


def sample_images(dataset: Dataset, count: int = CALIBRATION_IMAGES) -> list[np.ndarray]:
    """``count`` images spread evenly over ``dataset`` (not just its first ids)."""
    step = max(1, len(dataset) // max(count, 1))
    return [dataset.read(sample)[0] for sample in dataset.samples[::step][:count]]


class _Calibration(CalibrationDataReader):
    """Feeds preprocessed images to onnxruntime's calibrator, one at a time."""

    def __init__(self, inputs: Iterator[np.ndarray]):
        self.inputs = inputs

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self.inputs, None)
        return None if x is None else {INPUT: x}


def quantize_int8(
    onnx_fp32: str | Path, out: str | Path, calibration_images: Sequence[np.ndarray]
) -> Path:
    """Static int8 (QDQ, per-channel weights) of an exported model, calibrated on real images
    preprocessed as the runtime does; metadata kept, with precision ``int8``."""
    if not calibration_images:
        raise ModelError(f"{onnx_fp32}: int8 calibration needs at least one image (none given)")
    source = load_backend(onnx_fp32, "onnx")
    inputs = (prepare(image, source.spec)[0][None] for image in calibration_images)
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        # Symbolic shape inference cannot follow the TF-"same" padding; onnx's own inference can.
        quant_pre_process(str(onnx_fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            prepared,
            quantized,
            _Calibration(inputs),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            # U8S8; on AVX2 CPUs without VNNI it can saturate: the mIoU check would catch it.
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=_float_nodes(onnx.load(prepared)),
        )
        proto = onnx.load(quantized)
    _drop_unused_initializers(proto)
    _set_metadata(proto, dataclasses.replace(source.spec, precision="int8"))
    onnx.checker.check_model(proto)
    return _save_atomic(proto, Path(out))


def per_level_miou(
    model_path: str | Path, dataset: Dataset, limit: int | None = None
) -> dict[str, float | None]:
    """mIoU per tree level of the runtime's predictions on the first ``limit`` samples."""
    predictor = load(model_path)
    matrix = ConfusionMatrix(dataset.tree)
    for sample in dataset.samples[:limit]:
        image, labels = dataset.read(sample)
        matrix.update(labels, predictor.predict(image).labels)
    return {k: level["miou"] for k, level in matrix.scores()["levels"].items()}


def export_int8_if_close(
    onnx_fp32: str | Path,
    val: Dataset,
    calibration_images: Sequence[np.ndarray],
    out: str | Path | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Quantise, score fp32 and int8 on ``val`` (first ``limit`` samples), and keep the int8 file
    (default ``model.int8.onnx``) only if no level's mIoU drops by more than :data:`MAX_MIOU_DROP`.

    Reports both scores, the drop per level and the decision either way. An undefined mIoU (no
    such node in the images) counts as 0. A rejected int8 also removes an older file at ``out``,
    which belonged to another export.
    """
    onnx_fp32 = Path(onnx_fp32)
    out = Path(out) if out else int8_path(onnx_fp32)
    candidate = quantize_int8(
        onnx_fp32, out.with_name(f".{out.name}.candidate"), calibration_images
    )
    try:
        fp32 = per_level_miou(onnx_fp32, val, limit)
        int8 = per_level_miou(candidate, val, limit)
        drop = {k: (fp32[k] or 0.0) - (int8[k] or 0.0) for k in fp32}
        kept = all(d <= MAX_MIOU_DROP for d in drop.values())
        size_mb = candidate.stat().st_size / 1e6
        if kept:
            os.replace(candidate, out)
        else:
            out.unlink(missing_ok=True)
    finally:
        candidate.unlink(missing_ok=True)
    return {
        "images": len(val.samples[:limit]),
        "fp32": fp32,
        "int8": int8,
        "drop": drop,
        "max_drop": MAX_MIOU_DROP,
        "kept": kept,
        "path": str(out) if kept else None,
        "fp32_mb": onnx_fp32.stat().st_size / 1e6,
        "int8_mb": size_mb,
    }


# -- ONNX graph helpers -----------------------------------------------------------------------


def _set_metadata(proto: onnx.ModelProto, spec: ModelSpec) -> None:
    onnx.helper.set_model_props(proto, {METADATA_KEY: spec.to_json()})


def _float_nodes(proto: onnx.ModelProto) -> list[str]:
    """Nodes int8 must not touch: the output head, ``FLOAT_OPS``, and shape arithmetic.

    The shape arithmetic (Shape -> Div -> Ceil -> ... -> Pad) computes the dynamic padding;
    quantised, its values round to wrong sizes and the graph fails on most inputs. A node is
    shape arithmetic when a Shape result feeds it and every other input is a constant.
    """
    constant = {init.name for init in proto.graph.initializer} | {""}
    shaped: set[str] = set()
    names = []
    for node in proto.graph.node:  # topologically sorted
        if node.op_type == "Constant":
            constant.update(node.output)
            continue
        from_shape = any(i in shaped for i in node.input)
        if node.op_type == "Shape" or (
            from_shape and all(i in shaped or i in constant for i in node.input)
        ):
            shaped.update(node.output)
            names.append(node.name)
        elif node.name.startswith(HEAD_PREFIX) or node.op_type in FLOAT_OPS:
            names.append(node.name)
    return names


def _drop_unused_initializers(proto: onnx.ModelProto) -> None:
    """Remove constants the quantiser left behind, which ONNX Runtime warns about on load."""
    used = {i for node in proto.graph.node for i in node.input}
    used.update(o.name for o in proto.graph.output)
    unused = [init for init in proto.graph.initializer if init.name not in used]
    for init in unused:
        proto.graph.initializer.remove(init)


def _save_atomic(proto: onnx.ModelProto, out: Path) -> Path:
    """Through the runner's temporary-file-and-rename writer: a reader never sees a
    half-written model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    publish(out, lambda tmp: tmp.write_bytes(proto.SerializeToString()))
    return out
