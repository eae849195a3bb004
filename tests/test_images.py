import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hiseg.images import ImageReadError, read_image, read_mask


def save(tmp_path, name, img, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_modes_become_rgb(tmp_path):
    rgb = np.zeros((8, 6, 3), np.uint8)
    rgb[..., 0] = 200
    cases = {
        "gray.png": Image.fromarray(rgb[..., 0]),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((8, 6), 255, np.uint8)])),
        "p.png": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE),
        "i16.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
    }
    for name, img in cases.items():
        out = read_image(save(tmp_path, name, img))
        assert out.shape == (8, 6, 3) and out.dtype == np.uint8, name
        assert abs(int(out[0, 0, 0]) - 200) <= 3, name


def test_alpha_is_composited_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:2, :, 3] = 255  # top half opaque white, bottom half transparent
    out = read_image(save(tmp_path, "a.png", Image.fromarray(rgba)))
    assert out[0, 0].tolist() == [255, 255, 255] and out[3, 0].tolist() == [0, 0, 0]


def test_exif_rotation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(tmp_path, "r.jpg", img, exif=exif.tobytes())
    assert read_image(path).shape == (30, 10, 3)


def test_failures_name_file_and_reason(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, "JPEG"
    )
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buf.getvalue()[:400])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    cases = {
        truncated: "truncated",
        text: "not an image",
        tmp_path / "gone.jpg": "file not found",
    }
    for path, reason in cases.items():
        with pytest.raises(ImageReadError, match=reason) as err:
            read_image(path)
        assert err.value.path == path and str(path) in str(err.value)


def test_pixel_limit(tmp_path):
    path = save(tmp_path, "big.png", Image.new("L", (300, 300)))
    with pytest.raises(ImageReadError, match="over the 0 Mpx limit"):
        read_image(path, max_pixels=80_000)


def test_masks(tmp_path):
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.save(tmp_path / "m.npy", labels)
    assert (read_mask(tmp_path / "m.npy") == labels).all()
    assert (read_mask(save(tmp_path, "m.png", Image.fromarray(labels))) == labels).all()
    colour = np.dstack([labels, labels + 1, labels])
    with pytest.raises(ImageReadError, match="colour"):
        read_mask(save(tmp_path, "c.png", Image.fromarray(colour)))


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (np.zeros((2, 2), complex), "complex128 values; expected integer labels"),
        (np.array([["a", "b"], ["c", "d"]]), "<U1 values; expected integer labels"),
        (np.full((2, 2), 0.5), "non-integer values"),
        (np.full((2, 2), 1e30), "values up to 1e\\+30"),  # an int64 cast would wrap around
    ],
)
def test_npy_masks_of_other_values_are_named(tmp_path, values, reason):
    np.save(tmp_path / "m.npy", values)
    with pytest.raises(ImageReadError, match=rf"m\.npy: mask holds {reason}"):
        read_mask(tmp_path / "m.npy")


# -- decompression bombs and the pixel limit ----------------------------------------------------


def png(path, width, height, rows=None, bit_depth=8):
    """A grey PNG written chunk by chunk: ``rows`` zero rows of pixel data (all of them when
    None, streamed through zlib so a huge image stays small on disk and in memory)."""
    import struct
    import zlib

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\0" * (1 + (width * bit_depth + 7) // 8)  # filter byte + zero pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height if rows is None else rows))
    # a cut stream (rows given) ends unfinished, as a truncated download would
    data += packer.flush(zlib.Z_FINISH if rows is None else zlib.Z_SYNC_FLUSH)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
    return path


def test_header_claiming_10_gigapixels_is_one_named_failure(tmp_path):
    path = png(tmp_path / "claims.png", 100_000, 100_000, rows=1)
    assert path.stat().st_size < 1000
    with pytest.raises(ImageReadError, match="over the 100 Mpx limit") as err:
        read_image(path)
    assert err.value.path == path


def test_real_zlib_bomb_is_refused_with_bounded_memory(tmp_path):
    """A 20000x20000 (400 Mpx) PNG of real zero pixels, ~50 kB on disk; decoding it would take
    400 MB. Refused from its header in a fresh process whose peak memory stays far below."""
    import subprocess
    import sys

    path = png(tmp_path / "bomb.png", 20_000, 20_000, bit_depth=1)
    assert path.stat().st_size < 200_000
    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc/self/status (Linux)")
    # VmHWM is this process's own peak (ru_maxrss would include the parent's, from before exec)
    code = (
        "from pathlib import Path\n"
        "from hiseg.images import ImageReadError, read_image\n"
        "try:\n"
        f"    read_image({str(path)!r})\n"
        "except ImageReadError as err:\n"
        "    print(err)\n"
        "status = Path('/proc/self/status').read_text().split('VmHWM:')[1]\n"
        "print(int(status.split()[0]) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    message, peak_mb = out.stdout.strip().splitlines()
    assert message.startswith(f"{path}: image is") and "over the 100 Mpx limit" in message
    assert int(peak_mb) < 150, f"peak memory {peak_mb} MB: the bomb was decoded"


def test_limit_is_hisegs_100_mpx_not_pillows_89_mpx(tmp_path):
    """95 Mpx passes the size check (the pixel data, cut short here, is what fails); 101 Mpx
    does not."""
    under = png(tmp_path / "95mpx.png", 10_000, 9_500, rows=1)
    with pytest.raises(ImageReadError) as err:
        read_image(under)
    assert "limit" not in err.value.reason and "truncated" in err.value.reason
    over = png(tmp_path / "101mpx.png", 10_100, 10_000, rows=1)
    with pytest.raises(ImageReadError, match=r"10100x10000 = 101 Mpx, over the 100 Mpx limit"):
        read_image(over)


# -- as_rgb: what the Python API accepts ---------------------------------------------------------


PHOTO = np.random.default_rng(1).integers(0, 256, (9, 7, 3), np.uint8)
#: PHOTO in 16 bits, off the exact multiples of 257 (which a plain cast would also get right)
DEEP = np.minimum(PHOTO.astype(np.int64) * 257 + 100, 65535).astype(np.uint16)


@pytest.mark.parametrize(
    "name, image",
    [
        ("uint8", PHOTO),
        ("float 0..1", PHOTO / 255.0),
        ("float32 0..1", (PHOTO / 255.0).astype(np.float32)),
        ("float 0..255", PHOTO.astype(np.float64)),
        ("uint16", DEEP),
        ("int64 0..255", PHOTO.astype(np.int64)),
        ("PIL", Image.fromarray(PHOTO)),
        ("opaque RGBA", np.dstack([PHOTO, np.full(PHOTO.shape[:2], 255, np.uint8)])),
        ("channels-last view", np.asfortranarray(PHOTO)),
    ],
)
def test_as_rgb_reads_every_accepted_form_as_the_same_pixels(name, image):
    from hiseg.images import as_rgb

    rgb, path = as_rgb(image)
    assert path is None
    assert rgb.dtype == np.uint8 and rgb.shape == PHOTO.shape and rgb.flags["C_CONTIGUOUS"], name
    np.testing.assert_array_equal(rgb, PHOTO, err_msg=name)


def test_as_rgb_grey_alpha_and_paths(tmp_path):
    from hiseg.images import as_rgb

    grey = PHOTO[..., 0]
    for image in (grey, grey[..., None], grey / 255.0, Image.fromarray(grey)):
        rgb, _ = as_rgb(image)
        np.testing.assert_array_equal(rgb, np.repeat(grey[..., None], 3, axis=2))
    half = np.dstack([PHOTO, np.full(PHOTO.shape[:2], 128, np.uint8)])
    rgb, _ = as_rgb(half)  # composited on black, as RGBA files are
    np.testing.assert_allclose(rgb, PHOTO * (128 / 255), atol=1)
    path = save(tmp_path, "p.png", Image.fromarray(PHOTO))
    for given in (path, str(path)):
        rgb, found = as_rgb(given)
        assert found == path
        np.testing.assert_array_equal(rgb, PHOTO)


@pytest.mark.parametrize(
    "image, reason",
    [
        (np.full((4, 4, 3), np.nan), "NaN"),
        (np.full((4, 4, 3), np.inf, np.float32), "infinite"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.empty((4, 4, 3), object), "dtype object"),
        (np.zeros((4, 4, 3), bool), "dtype bool"),
        (np.zeros((4, 4, 2), np.uint8), "wrong shape"),
        (np.zeros((3, 4, 4, 3), np.uint8), "wrong shape"),
        (np.zeros((4,), np.uint8), "wrong shape"),
        (np.full((4, 4, 3), 300.0), "outside 0..1 and 0..255"),
        (np.full((4, 4, 3), -0.5), "outside 0..1 and 0..255"),
        (np.full((4, 4, 3), 256, np.int32), "outside 0..255"),
        (np.full((4, 4, 3), 200, np.uint16), "ambiguous"),
        ([[1, 2], [3, 4]], "got a list"),
        (b"photo.jpg", "got a bytes"),
        (Image.new("RGB", (0, 0)), r"PIL image: empty \(0x0\)"),  # was a ZeroDivisionError
        (Image.new("RGB", (0, 10)), r"PIL image: empty \(0x10\)"),  # was a cv2.error
        (Image.fromarray(np.full((4, 4), np.nan, np.float32)), "NaN"),  # was turned black
    ],
)
def test_as_rgb_refuses_with_what_is_expected(image, reason):
    from hiseg.errors import HisegError
    from hiseg.images import ImageInputError, as_rgb

    with pytest.raises(ImageInputError, match=reason) as err:
        as_rgb(image)
    assert isinstance(err.value, HisegError) and "\n" not in str(err.value)


def test_as_rgb_applies_the_pixel_limit_to_arrays_and_pil_images():
    from hiseg.images import ImageInputError, as_rgb

    with pytest.raises(ImageInputError, match="over the 0 Mpx limit"):
        as_rgb(PHOTO, max_pixels=10)
    with pytest.raises(ImageInputError, match="PIL image: image is 7x9"):
        as_rgb(Image.fromarray(PHOTO), max_pixels=10)


def test_a_pipe_is_refused_not_waited_on(tmp_path):
    import os
    import signal

    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)

    def waited(*args):
        raise TimeoutError("read_image waited for a writer on the pipe")

    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(5)
    try:
        with pytest.raises(ImageReadError, match="not a regular file"):
            read_image(pipe)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_float_tiff_of_nan_is_a_named_read_failure(tmp_path):
    from hiseg.images import ImageReadError, read_image

    path = tmp_path / "nan.tif"
    Image.fromarray(np.full((5, 6), np.nan, np.float32)).save(path)
    with pytest.raises(ImageReadError, match=r"nan\.tif: holds NaN or infinite values"):
        read_image(path)
