"""Reading images and masks strictly: every failure names the file and the reason.

Images come back as RGB uint8 arrays, upright (EXIF orientation applied), whatever the file's mode
(grayscale, palette, CMYK, 16-bit, alpha). Masks come back as 2-D integer arrays of raw values.
:func:`as_rgb` is the one door into the predictor: it turns what a Python user passes (a path, a
PIL image, an array of any common dtype and layout) into that RGB uint8 array, or refuses it with
:class:`ImageInputError` saying what is expected.
"""

from __future__ import annotations

import errno
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hiseg.errors import HisegError

#: Largest image accepted, in pixels (about 16k x 16k would be 256 Mpx). Larger files are refused
#: from their header, before any pixel is decoded, instead of exhausting memory.
MAX_PIXELS = 100_000_000

#: What :func:`as_rgb` accepts.
ImageLike = np.ndarray | Image.Image | str | os.PathLike

EXPECTED = (
    "expected a path, a PIL image, or an (H, W, 3) RGB / (H, W, 4) RGBA / (H, W) or (H, W, 1) grey "
    "array of uint8, uint16 (0..65535), other integers in 0..255, or floats in 0..1 or 0..255"
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".npy", ".bmp", ".tif", ".tiff")


class ImageReadError(HisegError, OSError):
    """A file could not be read as an image or mask. ``str()`` gives ``path: reason``."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ImageTooLargeError(ImageReadError):
    """An image over the pixel limit, refused from its header (a service answers 413)."""


class ImageInputError(HisegError, ValueError):
    """An image passed to the Python API is not one hiseg can read; the message says what is."""


def path_fault(path: Path) -> str | None:
    """Why ``path`` leads to nothing: a symbolic link loop, a broken link, or no such file."""
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop"
        if path.is_symlink():
            return f"broken symbolic link (to {os.readlink(path)})"
        return "file not found" if err.errno == errno.ENOENT else err.strerror or str(err)
    return None


def _over_limit(width: int, height: int, max_pixels: int) -> str:
    return (
        f"image is {width}x{height} = {width * height / 1e6:.0f} Mpx, "
        f"over the {max_pixels / 1e6:.0f} Mpx limit"
    )


def _open(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image")
    if not path.is_file():  # reading a pipe would wait for a writer forever
        raise ImageReadError(path, "not a regular file (a pipe, socket or device)")
    return _decode(path, path, max_pixels)


def _decode(source: Path | io.BytesIO, path: str | Path, max_pixels: int) -> Image.Image:
    """Open and fully decode ``source`` (a file or bytes); errors name ``path``."""
    try:
        with warnings.catch_warnings():
            # hiseg's own limit below applies, not Pillow's lower warning threshold (89.5 Mpx)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)  # reads the header only
            if img.width * img.height > max_pixels:
                raise ImageTooLargeError(path, _over_limit(img.width, img.height, max_pixels))
            img.load()  # decode now: truncated data raises here, not later
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (unknown or corrupt format)") from None
    except Image.DecompressionBombError:
        # Pillow refuses headers over twice its own limit before hiseg can look at the size
        bomb = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        limit = (
            f"the {max_pixels / 1e6:.0f} Mpx limit"
            if max_pixels <= bomb
            else "Pillow's limit (PIL.Image.MAX_IMAGE_PIXELS)"
        )
        reason = f"image is over {bomb / 1e6:.0f} Mpx, over {limit}"
        raise ImageTooLargeError(path, reason) from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = str(err) or type(err).__name__
        if "truncated" in reason.lower():  # PIL's words vary by format; one reason for all
            reason = "truncated image data (the file ends before the image does)"
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
        if not np.isfinite(arr).all():  # NaN would turn black without a word
            raise ValueError("holds NaN or infinite values")
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
    return _upright_rgb(_open(path, max_pixels), path)


def decode_image(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes (an upload) -> RGB uint8, with exactly :func:`read_image`'s checks;
    errors name ``name``."""
    if not data:
        raise ImageReadError(name, "empty (no bytes)")
    return _upright_rgb(_decode(io.BytesIO(data), name, max_pixels), name)


def _upright_rgb(img: Image.Image, name: str | Path) -> np.ndarray:
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as err:  # a broken EXIF block must not hide a readable image
        warnings.warn(f"{name}: EXIF orientation ignored ({err})", stacklevel=2)
    try:
        return to_rgb(img)
    except ValueError as err:  # pixel values no image can hold (a float TIFF of NaN)
        raise ImageReadError(name, str(err)) from None


def as_rgb(image: ImageLike, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, Path | None]:
    """Whatever a user passes -> (RGB uint8 (H, W, 3) array, the file's path or None).

    Paths are read by :func:`read_image`. PIL images are taken as they are (no EXIF rotation).
    Arrays: uint8 as is; uint16 spans 0..65535 (one holding only 0..255 is refused as ambiguous);
    other integers must hold 0..255; floats must be finite and >= 0, and are read as 0..1 when
    their maximum is <= 1, else as 0..255. Grey (H, W) or (H, W, 1) is repeated to RGB, RGBA is
    composited on black (as files are). Anything else raises :class:`ImageInputError`.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return read_image(path, max_pixels), path
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ImageInputError(f"PIL image: empty ({image.width}x{image.height})")
        if image.width * image.height > max_pixels:
            reason = _over_limit(image.width, image.height, max_pixels)
            raise ImageInputError(f"PIL image: {reason}")
        try:
            return to_rgb(image), None
        except (OSError, ValueError) as err:
            raise ImageInputError(f"PIL image cannot be decoded ({err})") from None
    if not isinstance(image, np.ndarray):
        raise ImageInputError(f"got a {type(image).__name__}; {EXPECTED}")
    return _array_to_rgb(image, max_pixels), None


def _array_to_rgb(array: np.ndarray, max_pixels: int) -> np.ndarray:
    what = f"image array of shape {array.shape} and dtype {array.dtype}"
    layout_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
    if not layout_ok or array.size == 0:
        fault = "empty" if array.size == 0 else "wrong shape"
        raise ImageInputError(f"{what}: {fault}; {EXPECTED}")
    if array.shape[0] * array.shape[1] > max_pixels:
        raise ImageInputError(f"{what}: {_over_limit(array.shape[1], array.shape[0], max_pixels)}")
    if array.dtype == np.uint8:
        values = array
    elif array.dtype == np.uint16:
        top = int(array.max())
        if 0 < top <= 255:
            raise ImageInputError(
                f"{what}: uint16 holding only 0..{top} is ambiguous (16-bit images span "
                "0..65535); pass 8-bit values as uint8"
            )
        values = _round_to_uint8(array / 257.0)
    elif np.issubdtype(array.dtype, np.integer):
        if int(array.min()) < 0 or int(array.max()) > 255:
            raise ImageInputError(f"{what}: integer values outside 0..255; {EXPECTED}")
        values = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ImageInputError(f"{what}: holds NaN or infinite values")
        lowest, highest = float(array.min()), float(array.max())
        if lowest < 0 or highest > 255:
            raise ImageInputError(f"{what}: values {lowest:g}..{highest:g} outside 0..1 and 0..255")
        values = _round_to_uint8(array * 255.0 if highest <= 1.0 else array)
    else:
        raise ImageInputError(f"{what}: unsupported dtype; {EXPECTED}")
    if values.ndim == 2:
        values = values[..., None]
    if values.shape[2] == 1:
        return np.repeat(values, 3, axis=2)
    if values.shape[2] == 4:
        rgb = values[..., :3].astype(np.float32) * (values[..., 3:] / np.float32(255.0))
        return _round_to_uint8(rgb)
    return np.ascontiguousarray(values)


def _round_to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


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
        if arr.dtype.kind not in "bf":  # complex, text, objects: np.mod below would raise
            raise ImageReadError(path, f"mask holds {arr.dtype} values; expected integer labels")
        if not np.all(np.mod(arr, 1) == 0):
            raise ImageReadError(path, f"mask holds non-integer values ({arr.dtype})")
        if arr.size and np.abs(arr).max() >= 2**31:  # would wrap around when cast
            raise ImageReadError(path, f"mask holds values up to {np.abs(arr).max():g}")
        arr = arr.astype(np.int64)
    return arr
