"""Reading images and masks strictly: every failure names the file and the reason.

Images come back as RGB uint8 arrays, upright (EXIF orientation applied), whatever the file's mode
(grayscale, palette, CMYK, 16-bit, alpha). Masks come back as 2-D integer arrays of raw values.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from hiseg.errors import HisegError

#: Largest image accepted, in pixels (about 16k x 16k would be 256 Mpx). Larger files are refused
#: with a clear message instead of exhausting memory.
MAX_PIXELS = 100_000_000

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".npy", ".bmp", ".tif", ".tiff")


class ImageReadError(HisegError, OSError):
    """A file could not be read as an image or mask. ``str()`` gives ``path: reason``."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _open(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            if img.width * img.height > max_pixels:
                raise ImageReadError(
                    path,
                    f"image is {img.width}x{img.height} = {img.width * img.height / 1e6:.0f} Mpx, "
                    f"over the {max_pixels / 1e6:.0f} Mpx limit",
                )
            img.load()  # decode now: truncated data raises here, not later
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as err:
        reason = str(err) or type(err).__name__
        if "truncated" in reason.lower():
            reason = f"truncated image data ({reason})"
        raise ImageReadError(path, reason) from None
    return img


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL image -> RGB uint8 array. Alpha is composited on black, 16-bit scaled to 8-bit."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        gray = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        rgba = np.asarray(img, dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file as an upright (EXIF-rotated) RGB uint8 array of shape (H, W, 3)."""
    path = Path(path)
    img = _open(path, max_pixels)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as err:  # a broken EXIF block must not hide a readable image
        warnings.warn(f"{path}: EXIF orientation ignored ({err})", stacklevel=2)
    return to_rgb(img)


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file (single-channel PNG or .npy) as a 2-D integer array of raw label values."""
    path = Path(path)
    if path.suffix == ".npy":
        if not path.exists():
            raise ImageReadError(path, "file not found")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ImageReadError(path, f"not a readable .npy array ({err})") from None
    else:
        img = _open(path, MAX_PIXELS)
        if img.mode not in ("L", "P", "I", "I;16", "1"):
            if img.mode in ("RGB", "RGBA"):
                arr = np.asarray(img)
                if not (np.all(arr[..., 0] == arr[..., 1]) and np.all(arr[..., 0] == arr[..., 2])):
                    raise ImageReadError(
                        path, f"mask is a colour ({img.mode}) image; expected one channel of labels"
                    )
                return arr[..., 0].copy()
            raise ImageReadError(path, f"mask has mode {img.mode}; expected one channel of labels")
        arr = np.asarray(img)
        if img.mode == "1":
            arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ImageReadError(path, f"mask has shape {arr.shape}; expected (height, width)")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.mod(arr, 1) == 0):
            raise ImageReadError(path, f"mask holds non-integer values ({arr.dtype})")
        arr = arr.astype(np.int64)
    return arr
