"""A model file's prediction written out from the raw ONNX session, without hiseg's pipeline:
what the fast path (decoding at network resolution) must reproduce exactly."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from hiseg.pipeline import normalize
from hiseg.taxonomy import Tree


def reference_labels(path: str | Path, image: np.ndarray) -> np.ndarray:
    """Metadata read by hand (hiseg 0.1's untyped dict or a schema 2 spec), letterbox,
    normalise, run, softmax, crop, the full-size map, top-down decoding of every pixel.

    A full-resolution output (hiseg 0.1) is upsampled by ``cv2.resize``; a 1/k output is read
    at each image pixel's position in it: the half-pixel position in the resized image, carried
    through the network head's align-corners upsampling from the 1/k grid to the padded one."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["hiseg"])
    model = meta.get("model", meta)  # hiseg 0.1 nested these
    side, mean, std, k = meta["long_side"], model["mean"], model["std"], meta.get("output_scale", 1)
    h, w = image.shape[:2]
    rh, rw = round(h * side / max(h, w)), round(w * side / max(h, w))
    fitted = cv2.resize(
        image, (rw, rh), interpolation=cv2.INTER_AREA if rh < h else cv2.INTER_LINEAR
    )
    ph, pw = -(-rh // 32) * 32, -(-rw // 32) * 32
    padded = np.zeros((ph, pw, 3), np.uint8)
    padded[:rh, :rw] = fitted
    # hiseg's own arithmetic: with mean = std = 0.5 every input sits on an int8 rounding tie,
    # so (v / 255 - mean) / std in float64 would flip the quantised input of many pixels
    x = normalize(padded, mean, std)[None]
    logits = session.run(None, {"image": x})[0][0].astype(np.float64)
    probs = np.exp(logits - logits.max(0))
    probs = (probs / probs.sum(0)).astype(np.float32)
    if k == 1:
        small = probs[:, :rh, :rw].transpose(1, 2, 0)
        full = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, -1)
        full = full.transpose(2, 0, 1)
    else:
        assert probs.shape[1:] == (ph // k, pw // k)
        full = probs
        for axis, out, resized, pad in ((2, w, rw, pw), (1, h, rh, ph)):  # columns, then rows
            at = np.clip((np.arange(out) + 0.5) * resized / out - 0.5, 0, resized - 1)
            at = at * (pad / k - 1) / (pad - 1)
            i0 = np.floor(at).astype(int)
            i1 = np.minimum(i0 + 1, full.shape[axis] - 1)
            weight = (at - i0).astype(np.float32)
            weight = weight.reshape([-1 if d == axis else 1 for d in range(3)])
            full = np.take(full, i0, axis) * (1 - weight) + np.take(full, i1, axis) * weight
    return Tree.from_dict(model["tree"]).decode(full)
