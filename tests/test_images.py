import io

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
