"""Model-independent inference steps, in NumPy so the ONNX path never imports torch.

An image is resized so its long side is the model size (aspect ratio kept), padded bottom/right to
the network stride, and normalised. The network's leaf probabilities are cropped back to the
resized area and upsampled bilinearly to the original size before any decision: labels are never
resized with nearest-neighbour. Decisions are made top-down through the class tree.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np


class Letterbox(NamedTuple):
    """How an image was fitted to the network, so the output can be mapped back."""

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    padded_hw: tuple[int, int]


def letterbox(image: np.ndarray, long_side: int, stride: int = 32) -> tuple[np.ndarray, Letterbox]:
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
    return image, Letterbox((h, w), (rh, rw), (ph, pw))


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, normalised with mean/std in [0, 1] units."""
    # (v / 255 - mean) / std as one multiply-add per pixel, on the channels-first copy.
    scale = 1.0 / (255.0 * np.asarray(std, np.float32))
    offset = -np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    x = image.transpose(2, 0, 1).astype(np.float32, order="C")
    x *= scale[:, None, None]
    x += offset[:, None, None]
    return x


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def unletterbox(probs: np.ndarray, box: Letterbox) -> np.ndarray:
    """(C, padded H, padded W) probabilities -> (C, original H, original W), bilinear."""
    rh, rw = box.resized_hw
    probs = probs[:, :rh, :rw]
    oh, ow = box.original_hw
    if (rh, rw) == (oh, ow):
        return np.ascontiguousarray(probs)
    hwc = cv2.resize(probs.transpose(1, 2, 0), (ow, oh), interpolation=cv2.INTER_LINEAR)
    return hwc.reshape(oh, ow, -1).transpose(2, 0, 1)
