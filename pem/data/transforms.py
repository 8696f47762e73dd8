"""Joint training transforms on samples (image, sem_seg, panoptic and segments_info together).

The official PEM recipe (Mask2Former's dataset mappers) is, in this order:

1. ``ResizeShortestEdge`` with the short side chosen among ``int(x * 0.1 * base)`` for
   ``x = 5 .. 20`` (scales 0.5 .. 2.0), long side capped at ``max_size``;
2. ``RandomCrop_CategoryAreaConstraint`` with ``single_category_max_area = 1.0``, which never
   rejects a crop, so it is a plain random crop (:class:`RandomCrop`);
3. ``ColorAugSSD`` photometric distortion (:class:`ColorJitterSSD`, a simplified version);
4. horizontal flip with probability 0.5.

:func:`train_transforms` builds it. Images are resized bilinearly (with antialiasing when
shrinking, as PIL's resize that detectron2 uses does), label maps with nearest neighbour (exact
for any integer id). Every transform returns a new dict and leaves its input unchanged; keys other
than the sample's five are carried over. Segments that lose all their pixels (crop, or a shrink
that drops a tiny segment) are removed from ``segments_info``.

Randomness comes from torch's global RNG: ``torch.manual_seed`` makes a pipeline repeatable, and
DataLoader workers, which torch seeds differently, get different augmentations (NumPy's global RNG
would be duplicated in forked workers).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pem.data.common import Sample, prune_segments

__all__ = [
    "ColorJitterSSD",
    "Compose",
    "RandomCrop",
    "RandomHorizontalFlip",
    "ResizeShortestEdge",
    "crop_sample",
    "hflip_sample",
    "pad_sample",
    "resize_sample",
    "train_scales",
    "train_transforms",
]

Transform = Callable[[Sample], Sample]
SizeLike = int | Sequence[int]


def _pair(name: str, value: SizeLike) -> tuple[int, int]:
    """``value`` as ``(h, w)`` positive ints (an int means a square)."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name}={value!r}: expected a positive int or a pair (h, w) of them")
    return pair  # type: ignore[return-value]


def _hw(sample: Sample) -> tuple[int, int]:
    image = sample["image"]
    if not isinstance(image, Tensor) or image.dim() != 3:
        raise ValueError(f"{sample.get('file_name', '?')}: 'image' must be a Tensor [3, H, W]")
    return int(image.shape[1]), int(image.shape[2])


def _rand_uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def _coin(p: float) -> bool:
    return bool(torch.rand(()) < p)


# --------------------------------------------------------------------------------------------
# Deterministic functional transforms
# --------------------------------------------------------------------------------------------


def _nearest_index(src: int, dst: int) -> Tensor:
    # Pixel centers: output pixel i samples input (i + 0.5) * src / dst - 0.5, rounded; this is
    # torch's "nearest-exact" and PIL's NEAREST. Indexing keeps int64 ids exact.
    idx = ((torch.arange(dst, dtype=torch.float64) + 0.5) * (src / dst)).floor().long()
    return idx.clamp_(0, src - 1)


def resize_sample(sample: Sample, size: tuple[int, int]) -> Sample:
    """Resize to ``size = (h, w)``: image bilinear, sem_seg/panoptic nearest.

    Returns:
        A new sample with image ``[3, h, w]`` uint8 and ``[h, w]`` maps; segments that no longer
        have pixels are dropped.
    """
    h, w = _pair("size", tuple(size))
    old_h, old_w = _hw(sample)
    if (h, w) == (old_h, old_w):
        return {**sample}
    image = sample["image"].float()[None]
    # Antialias only matters (and only applies) when shrinking; it matches PIL's bilinear.
    image = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    rows, cols = _nearest_index(old_h, h), _nearest_index(old_w, w)
    panoptic = sample["panoptic"][rows][:, cols]
    return {
        **sample,
        "image": image[0].round_().clamp_(0, 255).to(torch.uint8),
        "sem_seg": sample["sem_seg"][rows][:, cols],
        "panoptic": panoptic,
        "segments_info": prune_segments(panoptic, sample["segments_info"]),
    }


def crop_sample(sample: Sample, top: int, left: int, height: int, width: int) -> Sample:
    """Crop the window ``[top, top + height) x [left, left + width)`` (must lie inside).

    Returns:
        A new sample of size ``[height, width]`` whose ``segments_info`` keeps only the segments
        with pixels inside the window.
    """
    h, w = _hw(sample)
    if top < 0 or left < 0 or height < 1 or width < 1 or top + height > h or left + width > w:
        raise ValueError(
            f"crop_sample: window (top={top}, left={left}, height={height}, width={width}) is "
            f"not inside the {h}x{w} image"
        )
    rows, cols = slice(top, top + height), slice(left, left + width)
    panoptic = sample["panoptic"][rows, cols].contiguous()
    return {
        **sample,
        "image": sample["image"][:, rows, cols].contiguous(),
        "sem_seg": sample["sem_seg"][rows, cols].contiguous(),
        "panoptic": panoptic,
        "segments_info": prune_segments(panoptic, sample["segments_info"]),
    }


def pad_sample(
    sample: Sample, size: tuple[int, int], ignore_label: int = 255, image_value: int = 128
) -> Sample:
    """Pad at the bottom and right up to ``size = (h, w)`` (each >= the current size).

    Padding is unlabelled: ``sem_seg`` gets ``ignore_label``, ``panoptic`` 0 (void), the image
    ``image_value`` (Mask2Former's mappers pad images with 128).
    """
    h, w = _pair("size", tuple(size))
    old_h, old_w = _hw(sample)
    if h < old_h or w < old_w:
        raise ValueError(f"pad_sample: size={(h, w)} is smaller than the image ({old_h}, {old_w})")
    pad = (0, w - old_w, 0, h - old_h)
    return {
        **sample,
        "image": F.pad(sample["image"], pad, value=image_value),
        "sem_seg": F.pad(sample["sem_seg"], pad, value=ignore_label),
        "panoptic": F.pad(sample["panoptic"], pad, value=0),
    }


def hflip_sample(sample: Sample) -> Sample:
    """Mirror left-right (no pixel is lost, so ``segments_info`` is unchanged)."""
    return {
        **sample,
        "image": sample["image"].flip(-1),
        "sem_seg": sample["sem_seg"].flip(-1),
        "panoptic": sample["panoptic"].flip(-1),
        "segments_info": [dict(s) for s in sample["segments_info"]],
    }


# --------------------------------------------------------------------------------------------
# Random transforms
# --------------------------------------------------------------------------------------------


class Compose:
    """Apply ``transforms`` in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        inner = ",\n    ".join(repr(t) for t in self.transforms)
        return f"Compose([\n    {inner},\n])"


class ResizeShortestEdge:
    """Resize so that the short side is one of ``short_sides`` (uniform choice, detectron2's
    "choice" sample style), unless the long side would exceed ``max_size``, in which case the long
    side becomes ``max_size``. The aspect ratio is kept; sizes are rounded to the nearest int.

    Args:
        short_sides: candidate short-side lengths (one value = deterministic resize, e.g. for
            evaluation).
        max_size: cap on the long side.
    """

    def __init__(self, short_sides: int | Sequence[int], max_size: int = sys.maxsize) -> None:
        sides = (short_sides,) if isinstance(short_sides, int) else tuple(short_sides)
        if not sides or any(not isinstance(s, int) or s < 1 for s in sides):
            raise ValueError(f"short_sides={short_sides!r}: expected positive ints")
        if not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size={max_size!r}: expected a positive int")
        self.short_sides = sides
        self.max_size = max_size

    def output_size(self, h: int, w: int, short_side: int) -> tuple[int, int]:
        """Size ``(h', w')`` of an ``h x w`` image resized to ``short_side`` (detectron2 rule)."""
        scale = short_side / min(h, w)
        new_h, new_w = h * scale, w * scale
        if max(new_h, new_w) > self.max_size:
            cap = self.max_size / max(new_h, new_w)
            new_h, new_w = new_h * cap, new_w * cap
        return int(new_h + 0.5), int(new_w + 0.5)

    def __call__(self, sample: Sample) -> Sample:
        short = self.short_sides[int(torch.randint(len(self.short_sides), ()))]
        return resize_sample(sample, self.output_size(*_hw(sample), short))

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(short_sides={list(self.short_sides)}, max_size={self.max_size})"


class RandomCrop:
    """Crop a uniformly random ``size = (h, w)`` window; the output is always exactly ``size``.

    Along a side where the image is smaller than the crop, the whole side is kept (as detectron2's
    RandomCrop) and the result is padded at the bottom/right as in :func:`pad_sample`:
    ``sem_seg`` with ``ignore_label``, ``panoptic`` with 0 (void), the image with
    ``image_pad_value``. Mask2Former pads the same way to its size divisibility, which equals the
    crop size for ADE20K.

    PEM's ``RandomCrop_CategoryAreaConstraint`` runs with ``single_category_max_area = 1.0``,
    which accepts every crop, so no area constraint is implemented.
    """

    def __init__(self, size: SizeLike, ignore_label: int = 255, image_pad_value: int = 128) -> None:
        self.size = _pair("size", size)
        self.ignore_label = ignore_label
        self.image_pad_value = image_pad_value

    def __call__(self, sample: Sample) -> Sample:
        h, w = _hw(sample)
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        top = int(torch.randint(h - ch + 1, ()))
        left = int(torch.randint(w - cw + 1, ()))
        out = crop_sample(sample, top, left, ch, cw)
        if (ch, cw) != self.size:
            out = pad_sample(out, self.size, self.ignore_label, self.image_pad_value)
        return out

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, ignore_label={self.ignore_label})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p={p!r}: expected a probability in [0, 1]")
        self.p = p

    def __call__(self, sample: Sample) -> Sample:
        return hflip_sample(sample) if _coin(self.p) else {**sample}

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ColorJitterSSD:
    """Photometric distortion in the spirit of SSD / detectron2's ``ColorAugSSDTransform``.

    Each step is applied with probability 1/2, with clipping to [0, 255] after each: brightness
    (add ``U(-brightness_delta, brightness_delta)``), contrast (multiply by ``U(contrast_range)``,
    SSD's multiplicative "contrast"), saturation (blend with the luma image, ``gray + a * (img -
    gray)`` with ``a ~ U(saturation_range)``). As in SSD, contrast comes before or after
    saturation with equal chance. Simplifications: saturation is a luma blend instead of scaling
    HSV saturation, and there is no hue jitter. Labels are untouched.
    """

    # ITU-R BT.601 luma weights (R, G, B).
    _LUMA = (0.299, 0.587, 0.114)

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
    ) -> None:
        for name, (lo, hi) in (
            ("contrast_range", contrast_range),
            ("saturation_range", saturation_range),
        ):
            if not 0.0 <= lo <= hi:
                raise ValueError(f"{name}={(lo, hi)!r}: expected 0 <= low <= high")
        if brightness_delta < 0:
            raise ValueError(f"brightness_delta={brightness_delta!r}: expected >= 0")
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)

    def _contrast(self, img: Tensor) -> Tensor:
        if _coin(0.5):
            img = (img * _rand_uniform(*self.contrast_range)).clamp_(0, 255)
        return img

    def _saturation(self, img: Tensor) -> Tensor:
        if _coin(0.5):
            weights = torch.tensor(self._LUMA, dtype=img.dtype).view(3, 1, 1)
            gray = (img * weights).sum(0, keepdim=True)
            img = (gray + _rand_uniform(*self.saturation_range) * (img - gray)).clamp_(0, 255)
        return img

    def __call__(self, sample: Sample) -> Sample:
        img = sample["image"].float()
        if _coin(0.5):
            delta = _rand_uniform(-self.brightness_delta, self.brightness_delta)
            img = (img + delta).clamp_(0, 255)
        if _coin(0.5):
            img = self._saturation(self._contrast(img))
        else:
            img = self._contrast(self._saturation(img))
        return {**sample, "image": img.round_().to(torch.uint8)}

    def __repr__(self) -> str:
        return (
            f"ColorJitterSSD(brightness_delta={self.brightness_delta}, contrast_range="
            f"{self.contrast_range}, saturation_range={self.saturation_range})"
        )


def train_scales(base_short_side: int) -> list[int]:
    """The official short sides ``int(x * 0.1 * base)`` for ``x = 5 .. 20`` (0.5x .. 2.0x).

    Written with the configs' exact float expression so that rounding matches them.
    """
    return [int(x * 0.1 * base_short_side) for x in range(5, 21)]


def train_transforms(
    base_short_side: int, crop_size: SizeLike, max_size: int, ignore_label: int = 255
) -> Compose:
    """The official PEM training augmentation (see the module docstring).

    Args:
        base_short_side: 1024 (Cityscapes), 512 (ADE20K semantic), 640 (ADE20K panoptic).
        crop_size: ``(h, w)`` or an int: 512x1024, 512, 640 respectively.
        max_size: long-side cap: 4096, 2048, 2560 respectively.
        ignore_label: ``sem_seg`` value used for padding.

    Returns:
        ResizeShortestEdge -> RandomCrop -> ColorJitterSSD -> RandomHorizontalFlip; every output
        sample has exactly ``crop_size``.
    """
    if not isinstance(base_short_side, int) or base_short_side < 2:
        raise ValueError(f"base_short_side={base_short_side!r}: expected an int >= 2")
    return Compose(
        [
            ResizeShortestEdge(train_scales(base_short_side), max_size),
            RandomCrop(crop_size, ignore_label=ignore_label),
            ColorJitterSSD(),
            RandomHorizontalFlip(0.5),
        ]
    )
