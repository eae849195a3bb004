"""Training augmentation for (image, label map) pairs, on albumentations 2.

Geometry is shared by image and mask (the mask always resampled with nearest neighbour, padding
marked ``IGNORE_VALUE``). Crops are biased toward people, and among people toward small ones: most
pixels in the data are background, and the smallest people are the ones the model misses.
"""

from __future__ import annotations

import random
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.crops.transforms import BaseCrop

from hiseg.taxonomy import IGNORE_VALUE


class PersonCrop(BaseCrop):
    """A ``size`` x ``size`` crop that, with probability ``person_prob``, is centred on a person.

    A person is a connected region (8-connectivity) of labels other than ``background_value`` (the
    tree's, which need not be 0: no default, so it is never silently wrong) and ``IGNORE_VALUE``.
    The region is drawn uniformly, then a pixel within it, so a tiny person is picked as often as a
    big one. Otherwise, or with no person in the mask, the crop is uniform.
    The input must be at least ``size`` in both sides (pad first).
    """

    def __init__(self, size: int, person_prob: float, *, background_value: int):
        super().__init__(p=1.0)
        self.size = size
        self.person_prob = person_prob
        self.background_value = background_value

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        if height < self.size or width < self.size:
            raise ValueError(f"crop {self.size} is larger than the {width}x{height} input")
        centre = None
        if self.py_random.random() < self.person_prob:
            centre = self._person_pixel(data["mask"])
        if centre is None:
            x0 = int(self.random_generator.integers(0, width - self.size + 1))
            y0 = int(self.random_generator.integers(0, height - self.size + 1))
        else:
            x0 = int(np.clip(centre[0] - self.size // 2, 0, width - self.size))
            y0 = int(np.clip(centre[1] - self.size // 2, 0, height - self.size))
        return {"crop_coords": (x0, y0, x0 + self.size, y0 + self.size)}

    def _person_pixel(self, mask: np.ndarray) -> tuple[int, int] | None:
        """(x, y) of a random pixel in a random person region; None without people."""
        person = ((mask != self.background_value) & (mask != IGNORE_VALUE)).astype(np.uint8)
        count, regions = cv2.connectedComponents(person, connectivity=8)
        if count < 2:
            return None
        ys, xs = np.nonzero(regions == self.random_generator.integers(1, count))
        i = self.random_generator.integers(len(ys))
        return int(xs[i]), int(ys[i])


class PairTransform:
    """``(image, mask) -> (image, mask)`` through an albumentations pipeline with one random stream.

    ``A.Compose(seed=...)`` (albumentations 2.0.8) gives every transform its own generator seeded
    with the same number, so their draws coincide (e.g. flip and grayscale always together); this
    class shares one generator instead. DataLoader workers start from copies of one state: pass
    :meth:`reseed_worker` as ``worker_init_fn`` so that they differ.
    """

    def __init__(self, transforms: list[A.BasicTransform], seed: int | None = None):
        self.compose = A.Compose(transforms, mask_interpolation=cv2.INTER_NEAREST)
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def reseed_worker(self, worker_id: int) -> None:
        """Seed from torch's per-worker seed: distinct per worker and epoch, set by manual_seed."""
        import torch

        self.reseed(torch.initial_seed())

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.compose(image=image, mask=mask)
        return out["image"], out["mask"]

    def with_maps(
        self, image: np.ndarray, mask: np.ndarray, maps: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Also moves (C, H, W) uint8 ``maps`` (soft pseudo-labels) with the mask's geometry:
        nearest resampling, ``IGNORE_VALUE`` where the mask is padded."""
        out = self.compose(image=image, mask=mask, masks=maps)
        return out["image"], out["mask"], np.asarray(out["masks"])


def train_transform(
    size: int,
    scale: tuple[float, float] = (0.5, 2.0),
    person_crop_prob: float = 0.7,
    rotate_deg: float = 0,
    hflip: bool = True,
    color: bool = True,
    seed: int | None = None,
    *,
    background_value: int,
) -> PairTransform:
    """Random rescale, pad to ``size``, person-biased ``size`` crop, flip, rotation, colour.

    Takes an RGB uint8 image and a uint8 label-value map (not leaf indices) whose background is
    ``background_value`` (``tree.background.value``). Flips keep labels: the trees have no
    left/right classes.
    """
    fill = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": IGNORE_VALUE}
    transforms: list[A.BasicTransform] = [
        A.RandomScale(scale_limit=(scale[0] - 1, scale[1] - 1), area_for_downscale="image", p=1),
        A.PadIfNeeded(size, size, position="random", **fill),
        PersonCrop(size, person_crop_prob, background_value=background_value),
    ]
    if hflip:
        transforms.append(A.HorizontalFlip(p=0.5))
    if rotate_deg:
        transforms.append(A.Rotate(limit=rotate_deg, p=1, **fill))
    if color:
        transforms += [
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03, p=0.8),
            A.ToGray(p=0.1),
        ]
    return PairTransform(transforms, seed)
