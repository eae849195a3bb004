from __future__ import annotations

import cv2
import numpy as np
import pytest

pytest.importorskip("albumentations")

from hiseg.augment import train_transform
from hiseg.taxonomy import IGNORE_VALUE


def encode(mask: np.ndarray) -> np.ndarray:
    """An RGB image whose grey level tells the label: 30 * (value + 1); ignore -> 0 like padding."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[:7] = 30 * (np.arange(7) + 1)
    return np.repeat(lut[mask][..., None], 3, axis=2)


def block_mask() -> np.ndarray:
    mask = np.zeros((120, 160), dtype=np.uint8)
    for i, value in enumerate(range(1, 7)):
        y, x = 10 + 35 * (i // 3), 10 + 50 * (i % 3)
        mask[y : y + 30, x : x + 40] = value
    mask[:, 150:] = IGNORE_VALUE
    return mask


def hit_rate(transform, mask: np.ndarray, value: int | None = None, n: int = 150) -> float:
    """Share of crops holding a person pixel (or a pixel of ``value``)."""
    image = np.zeros((*mask.shape, 3), dtype=np.uint8)
    hits = 0
    for _ in range(n):
        _, out = transform(image, mask)
        person = (out == value) if value is not None else (out != 0) & (out != IGNORE_VALUE)
        hits += bool(person.any())
    return hits / n


def test_crop_pad_and_flip_are_pixel_exact() -> None:
    mask = block_mask()
    transform = train_transform(96, scale=(1, 1), color=False, seed=1, background_value=0)
    for shape in [(120, 160), (60, 80)]:  # larger than the crop, then smaller (padded)
        small = cv2.resize(mask, shape[::-1], interpolation=cv2.INTER_NEAREST)
        for _ in range(10):
            image_out, mask_out = transform(encode(small), small)
            assert np.array_equal(image_out, encode(mask_out))


def test_rescale_and_rotation_keep_image_and_mask_aligned() -> None:
    mask = block_mask()
    transform = train_transform(96, rotate_deg=15, color=False, seed=3, background_value=0)
    interior_pixels = 0
    for _ in range(20):
        image_out, mask_out = transform(encode(mask), mask)
        # The image is resampled bilinearly (edges blur by up to ~3 px at 2x), the mask nearest:
        # compare them away from label edges and the crop border only.
        kernel = np.ones((7, 7), np.uint8)
        inside = cv2.erode(mask_out, kernel) == cv2.dilate(mask_out, kernel)
        inside[:3], inside[-3:], inside[:, :3], inside[:, -3:] = False, False, False, False
        diff = np.abs(image_out[..., 0].astype(int) - encode(mask_out)[..., 0].astype(int))
        assert diff[inside].max(initial=0) <= 2
        interior_pixels += int(inside.sum())
    assert interior_pixels > 20 * 96 * 96 // 4


@pytest.mark.parametrize("shape", [(50, 40), (300, 500)])
def test_output_size_and_values(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    mask = rng.choice(np.array([0, 2, 4], dtype=np.uint8), size=shape)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    transform = train_transform(96, rotate_deg=10, seed=0, background_value=0)
    for _ in range(5):
        image_out, mask_out = transform(image, mask)
        assert image_out.shape == (96, 96, 3) and image_out.dtype == np.uint8
        assert mask_out.shape == (96, 96) and mask_out.dtype == np.uint8
        assert set(np.unique(mask_out)) <= {0, 2, 4, IGNORE_VALUE}


def test_same_seed_same_outputs() -> None:
    mask = block_mask()
    image = encode(mask)
    first, second, other = (
        train_transform(64, rotate_deg=10, seed=s, background_value=0) for s in (7, 7, 8)
    )
    runs = [[t(image, mask) for _ in range(4)] for t in (first, second, other)]
    for (i1, m1), (i2, m2) in zip(runs[0], runs[1], strict=True):
        assert np.array_equal(i1, i2) and np.array_equal(m1, m2)
    assert any(
        not np.array_equal(i1, i3) for (i1, _), (i3, _) in zip(runs[0], runs[2], strict=True)
    )
    other.reseed(7)
    assert np.array_equal(other(image, mask)[0], runs[0][0][0])


def test_person_crops_find_a_small_person() -> None:
    mask = np.zeros((400, 400), dtype=np.uint8)
    mask[300:306, 250:254] = 2
    biased = hit_rate(
        train_transform(64, scale=(1, 1), person_crop_prob=1.0, seed=0, background_value=0), mask
    )
    uniform = hit_rate(
        train_transform(64, scale=(1, 1), person_crop_prob=0.0, seed=0, background_value=0), mask
    )
    assert biased > 0.95
    assert uniform < 0.2


def test_person_crops_use_the_trees_background_value() -> None:
    """A tree whose background is 5: taking 0 for background would make the whole image one
    person, and the person-biased crops uniform."""
    mask = np.full((400, 400), 5, dtype=np.uint8)
    mask[300:306, 250:254] = 1

    def person_hits(background: int) -> float:
        transform = train_transform(
            64, scale=(1, 1), person_crop_prob=1.0, seed=0, background_value=background
        )
        return hit_rate(transform, mask, value=1)

    assert person_hits(5) > 0.95
    assert person_hits(0) < 0.2


def test_small_people_are_picked_as_often_as_big_ones() -> None:
    mask = np.zeros((400, 400), dtype=np.uint8)
    mask[10:200, 10:160] = 2  # a big person, ~18% of the image
    mask[350:354, 350:353] = 4  # a tiny one, 12 pixels
    transform = train_transform(64, scale=(1, 1), person_crop_prob=1.0, seed=0, background_value=0)
    assert 0.3 < hit_rate(transform, mask, value=4) < 0.7


def test_person_crops_on_real_masks(pascal_root) -> None:
    from hiseg.data import open_dataset

    dataset = open_dataset(pascal_root, "val")
    masks = [dataset.read_labels(s) for s in dataset.samples[:40]]
    labelled = [m for m in masks if ((m != 0) & (m != IGNORE_VALUE)).any()]
    mask = min(labelled, key=lambda m: ((m != 0) & (m != IGNORE_VALUE)).mean())
    biased = hit_rate(
        train_transform(128, person_crop_prob=1.0, seed=0, background_value=0), mask, n=100
    )
    uniform = hit_rate(
        train_transform(128, person_crop_prob=0.0, seed=0, background_value=0), mask, n=100
    )
    assert biased > 0.95
    assert biased > 2 * uniform


def test_dataloader_workers_get_distinct_streams() -> None:
    torch = pytest.importorskip("torch")
    mask = block_mask()
    image = encode(mask)

    class Crops(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.transform = train_transform(64, seed=0, background_value=0)

        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> np.ndarray:
            return self.transform(image, mask)[0]

    data = Crops()

    def run(seed: int) -> list[np.ndarray]:
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(
            data, batch_size=None, num_workers=2, worker_init_fn=data.transform.reseed_worker
        )
        return [batch.numpy() for batch in loader]

    first, again = run(0), run(0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], first[1])  # items 0 and 1 come from different workers
