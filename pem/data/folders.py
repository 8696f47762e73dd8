"""Cityscapes and ADE20K datasets read from their standard folder layouts.

Both return samples of the contract in :mod:`pem.data.common` and read panoptic annotations in
the COCO panoptic format: one PNG per image whose RGB pixels encode the segment id
``id = R + 256 G + 256^2 B`` (0 = void) plus one JSON file::

    {"annotations": [{"file_name": "<png name>", "image_id": "<image base name>",
                      "segments_info": [{"id": int, "category_id": int, "iscrowd": 0|1, ...}]}],
     "categories":  [{"id": int, "name": str, "isthing": 0|1, "color": [r, g, b] (optional)}]}

**Category ids.** The JSON's ``category_id`` values are dataset ids (Cityscapes label ids such as
7 = road, 26 = car). Contiguous class ids are positions in the JSON's ``categories`` list:
``categories[i]["id"]`` becomes class ``i``. That is the order of the semantic label maps in both
datasets (Cityscapes train ids 0..18, ADE20K's 150 classes), so ``sem_seg`` and ``panoptic`` speak
the same class ids. ``segments_info`` keeps only ``id``, the contiguous ``category_id``, ``isthing``
(from the class) and ``iscrowd`` (0 when absent); other JSON keys (``area``, ``bbox``) are dropped.

**Panoptic PNG vs JSON.** A non-zero id in the PNG that the JSON does not list is an error (the
COCO panoptic API rejects it too). A listed segment with no pixels in the PNG is left out of
``segments_info`` (it could only become an empty ground-truth mask).

**Semantic task.** With ``task="semantic"`` the panoptic annotation is optional: if the panoptic
JSON of the split exists it is used exactly as for ``task="panoptic"`` (then every image needs its
annotation and PNG); if the JSON does not exist, every sample has ``panoptic`` all 0 and
``segments_info == []``. The semantic label map is required for both tasks, because ``sem_seg`` is
always part of a sample (detectron2's Cityscapes panoptic loader requires it as well).

Cityscapes (``CityscapesDataset(root, split)``; ``split`` is ``"train"`` or ``"val"``)::

    root/
      leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
      gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png      # 0..18, 255 = ignore
      gtFine/cityscapes_panoptic_<split>/<name>_gtFine_panoptic.png
      gtFine/cityscapes_panoptic_<split>.json                    # image_id == <name>

These are the outputs of ``cityscapesscripts``' ``createTrainIdLabelImgs`` and
``createPanopticImgs``. The panoptic JSON must list the 19 evaluated classes in train-id order
(road, sidewalk, building, wall, fence, pole, traffic light, traffic sign, vegetation, terrain,
sky, person, rider, car, truck, bus, train, motorcycle, bicycle; label ids 7, 8, 11, 12, 13, 17,
19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33), which is what ``createPanopticImgs`` writes;
the names are checked so that a JSON in another order cannot silently mislabel ``panoptic``.
Things are person .. bicycle (train ids 11-18).

ADE20K (``ADE20KDataset(root, split)``; ``split`` is ``"training"`` or ``"validation"``)::

    root/
      ADEChallengeData2016/
        images/<split>/<name>.jpg            # .png images are accepted too
        annotations/<split>/<name>.png       # 0 = ignore (-> 255), 1..K -> 0..K-1
        ade20k_panoptic_<split>/<name>.png
        ade20k_panoptic_<split>.json         # image_id == <name>

The panoptic layout is the one written by Mask2Former's ``prepare_ade20k_pan_seg.py``. The label
space comes from the JSON's ``categories`` (names, ``isthing``, ``color``), so the same class also
reads other datasets written in this layout, such as :func:`pem.data.synthetic.write_synthetic`'s.
Without the JSON (semantic task only) the label space is ADE20K's 150 classes named
``"class_<i>"``, with no thing classes and generated colors: the class names are not stored in
this package.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pem.data.common import TASKS, DatasetInfo, Sample, SegmentInfo, distinct_colors, rgb2id

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_COLORS",
    "CITYSCAPES_INFO",
    "ADE20KDataset",
    "CityscapesDataset",
    "read_image",
]

PathLike = str | Path
Transform = Callable[[Sample], Sample]

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
# The official Cityscapes palette (cityscapesscripts' labels.py), in train-id order.
CITYSCAPES_COLORS: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
CITYSCAPES_INFO = DatasetInfo(
    name="cityscapes",
    class_names=CITYSCAPES_CLASSES,
    thing_ids=frozenset(range(11, 19)),
    colors=CITYSCAPES_COLORS,
)

ADE20K_NUM_CLASSES = 150
ADE20K_IMAGE_SUFFIXES = (".jpg", ".png")


# --------------------------------------------------------------------------------------------
# File decoding
# --------------------------------------------------------------------------------------------


def read_image(path: Path) -> torch.Tensor:
    """Read an image file as a uint8 RGB tensor ``[3, H, W]``."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _read_label_map(path: Path) -> np.ndarray:
    """Read a single-channel label PNG as an int64 ``[H, W]`` array.

    Palette ("P") images give their palette indices, which is what label maps store.
    """
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise ValueError(
            f"{path}: expected a single-channel label image, got array shape {list(arr.shape)}"
        )
    return arr.astype(np.int64)


def _read_panoptic_png(path: Path) -> np.ndarray:
    """Read a COCO-panoptic PNG as int64 segment ids ``[H, W]``."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return rgb2id(arr)


# --------------------------------------------------------------------------------------------
# COCO panoptic JSON
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PanopticJson:
    """A parsed COCO panoptic JSON.

    Attributes:
        categories: the JSON's ``categories`` list (contiguous id = position).
        to_contiguous: dataset category id -> contiguous id.
        annotations: ``str(image_id)`` -> annotation dict.
    """

    categories: list[dict[str, Any]]
    to_contiguous: dict[int, int]
    annotations: dict[str, dict[str, Any]]


def _load_panoptic_json(path: Path) -> _PanopticJson:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, Mapping) or "annotations" not in data or "categories" not in data:
        raise ValueError(
            f"{path}: expected a COCO panoptic JSON with 'annotations' and 'categories'"
        )
    categories = list(data["categories"])
    if not categories:
        raise ValueError(f"{path}: 'categories' is empty")
    to_contiguous: dict[int, int] = {}
    for i, cat in enumerate(categories):
        if "id" not in cat:
            raise ValueError(f"{path}: categories[{i}] has no 'id'")
        if int(cat["id"]) in to_contiguous:
            raise ValueError(f"{path}: category id {cat['id']} appears twice in 'categories'")
        to_contiguous[int(cat["id"])] = i
    annotations: dict[str, dict[str, Any]] = {}
    for ann in data["annotations"]:
        if "image_id" not in ann or "file_name" not in ann:
            raise ValueError(f"{path}: an annotation lacks 'image_id' or 'file_name': {ann!r:.200}")
        for seg in ann.get("segments_info", []):
            if int(seg["category_id"]) not in to_contiguous:
                raise ValueError(
                    f"{path}: image {ann['image_id']!r} has a segment with category_id "
                    f"{seg['category_id']}, which is not in 'categories' "
                    f"(ids {sorted(to_contiguous)})"
                )
        annotations[str(ann["image_id"])] = ann
    return _PanopticJson(categories, to_contiguous, annotations)


def _info_from_categories(name: str, categories: Sequence[Mapping[str, Any]]) -> DatasetInfo:
    """Label space from a COCO panoptic ``categories`` list (position = contiguous id)."""
    fallback = distinct_colors(len(categories))
    colors = []
    for i, cat in enumerate(categories):
        color = cat.get("color")
        ok = isinstance(color, Sequence) and len(color) == 3
        colors.append(tuple(int(v) for v in color) if ok else fallback[i])
    return DatasetInfo(
        name=name,
        class_names=tuple(str(cat.get("name", f"class_{i}")) for i, cat in enumerate(categories)),
        thing_ids=frozenset(i for i, cat in enumerate(categories) if cat.get("isthing")),
        colors=tuple(colors),  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------------------------
# Shared dataset machinery
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """Files of one sample; ``panoptic_png``/``annotation`` are None without panoptic labels."""

    image: Path
    sem_seg: Path
    panoptic_png: Path | None
    annotation: Mapping[str, Any] | None


def _check_choice(cls: str, arg: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(
            f"{cls}: {arg}={value!r} is not supported; expected one of {list(choices)}"
        )


def _require_dir(cls: str, path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{cls}: {path} is not a directory; expected {what}")


class _FolderDataset(Dataset):
    """Loads :class:`_Record` files into samples; subclasses find the files and decode sem_seg."""

    info: DatasetInfo

    def __init__(
        self,
        info: DatasetInfo,
        records: list[_Record],
        to_contiguous: Mapping[int, int],
        transform: Transform | None,
    ) -> None:
        self.info = info
        self.records = records
        self._to_contiguous = dict(to_contiguous)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def _decode_semantic(self, raw: np.ndarray, path: Path) -> np.ndarray:
        raise NotImplementedError

    def _segments(self, rec: _Record, panoptic: np.ndarray) -> list[SegmentInfo]:
        assert rec.annotation is not None and rec.panoptic_png is not None
        present = set(np.unique(panoptic).tolist()) - {0}
        listed = {int(s["id"]) for s in rec.annotation.get("segments_info", [])}
        unlisted = sorted(present - listed)
        if unlisted:
            raise ValueError(
                f"{rec.panoptic_png}: segment ids {unlisted} occur in the PNG but not in the "
                f"JSON's segments_info for image {rec.annotation['image_id']!r}"
            )
        segments: list[SegmentInfo] = []
        for seg in rec.annotation.get("segments_info", []):
            if int(seg["id"]) not in present:
                continue  # no pixels: see the module docstring
            category = self._to_contiguous[int(seg["category_id"])]
            segments.append(
                {
                    "id": int(seg["id"]),
                    "category_id": category,
                    "isthing": category in self.info.thing_ids,
                    "iscrowd": int(seg.get("iscrowd", 0)),
                }
            )
        return segments

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        rec = self.records[index]
        image = read_image(rec.image)
        hw = tuple(image.shape[1:])
        sem = self._decode_semantic(_read_label_map(rec.sem_seg), rec.sem_seg)
        if sem.shape != hw:
            raise ValueError(
                f"{rec.sem_seg}: size {list(sem.shape)} differs from its image {rec.image} "
                f"({list(hw)})"
            )
        if rec.panoptic_png is None:
            panoptic = np.zeros(hw, dtype=np.int64)
            segments: list[SegmentInfo] = []
        else:
            panoptic = _read_panoptic_png(rec.panoptic_png)
            if panoptic.shape != hw:
                raise ValueError(
                    f"{rec.panoptic_png}: size {list(panoptic.shape)} differs from its image "
                    f"{rec.image} ({list(hw)})"
                )
            segments = self._segments(rec, panoptic)
        sample: Sample = {
            "image": image,
            "sem_seg": torch.from_numpy(sem),
            "panoptic": torch.from_numpy(panoptic),
            "segments_info": segments,
            "file_name": str(rec.image),
        }
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name!r}, {len(self)} images)"


def _panoptic_record(
    cls: str,
    image: Path,
    sem_seg: Path,
    image_id: str,
    pan: _PanopticJson | None,
    pan_dir: Path,
    json_path: Path,
) -> _Record:
    if pan is None:
        return _Record(image, sem_seg, None, None)
    ann = pan.annotations.get(image_id)
    if ann is None:
        raise FileNotFoundError(
            f"{cls}: image {image} has no annotation in {json_path} (expected one with "
            f"image_id {image_id!r})"
        )
    png = pan_dir / ann["file_name"]
    if not png.is_file():
        raise FileNotFoundError(f"{cls}: panoptic PNG {png} of image {image} does not exist")
    return _Record(image, sem_seg, png, ann)


# --------------------------------------------------------------------------------------------
# Cityscapes
# --------------------------------------------------------------------------------------------


class CityscapesDataset(_FolderDataset):
    """Cityscapes fine annotations (layout and conventions in the module docstring).

    Args:
        root: the Cityscapes folder (contains ``leftImg8bit/`` and ``gtFine/``).
        split: ``"train"`` or ``"val"``.
        task: ``"panoptic"`` (panoptic annotations required) or ``"semantic"`` (optional).
        transform: applied to every sample (e.g. :func:`pem.data.transforms.train_transforms`).

    ``info`` is :data:`CITYSCAPES_INFO` (19 classes, things = train ids 11-18).
    """

    SPLITS = ("train", "val")

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        task: str = "panoptic",
        transform: Transform | None = None,
    ) -> None:
        cls = type(self).__name__
        _check_choice(cls, "split", split, self.SPLITS)
        _check_choice(cls, "task", task, TASKS)
        root = Path(root)
        _require_dir(cls, root, "the Cityscapes root with leftImg8bit/ and gtFine/")
        image_dir = root / "leftImg8bit" / split
        sem_dir = root / "gtFine" / split
        pan_dir = root / "gtFine" / f"cityscapes_panoptic_{split}"
        json_path = root / "gtFine" / f"cityscapes_panoptic_{split}.json"
        _require_dir(cls, image_dir, "leftImg8bit/<split>/<city>/<name>_leftImg8bit.png images")
        _require_dir(cls, sem_dir, "gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png labels")

        pan: _PanopticJson | None = None
        if task == "panoptic" or json_path.is_file():
            if not json_path.is_file():
                raise FileNotFoundError(
                    f"{cls}: panoptic JSON {json_path} does not exist (needed for "
                    "task='panoptic'; create it with cityscapesscripts' createPanopticImgs)"
                )
            pan = _load_panoptic_json(json_path)
            _check_cityscapes_categories(json_path, pan.categories)

        suffix = "_leftImg8bit.png"
        images = sorted(image_dir.glob(f"*/*{suffix}"))
        if not images:
            raise FileNotFoundError(f"{cls}: no */*{suffix} images under {image_dir}")
        records = []
        for image in images:
            name = image.name[: -len(suffix)]
            sem = sem_dir / image.parent.name / f"{name}_gtFine_labelTrainIds.png"
            if not sem.is_file():
                raise FileNotFoundError(
                    f"{cls}: image {image} has no semantic label {sem} (create the "
                    "labelTrainIds with cityscapesscripts' createTrainIdLabelImgs)"
                )
            records.append(_panoptic_record(cls, image, sem, name, pan, pan_dir, json_path))
        to_contiguous = pan.to_contiguous if pan is not None else {}
        super().__init__(CITYSCAPES_INFO, records, to_contiguous, transform)

    def _decode_semantic(self, raw: np.ndarray, path: Path) -> np.ndarray:
        # labelTrainIds already store contiguous ids; anything else means a wrong file (labelIds).
        ignore = self.info.ignore_label
        bad = np.unique(raw[(raw >= self.info.num_classes) & (raw != ignore)])
        if bad.size:
            raise ValueError(
                f"{path}: values {bad.tolist()} are not Cityscapes train ids (expected 0..18 "
                f"or {ignore}); is this a labelIds image instead of labelTrainIds?"
            )
        return raw


def _check_cityscapes_categories(path: Path, categories: Sequence[Mapping[str, Any]]) -> None:
    names = [str(c.get("name", "")).strip().lower() for c in categories]
    if names != list(CITYSCAPES_CLASSES):
        raise ValueError(
            f"{path}: 'categories' must list the 19 Cityscapes classes in train-id order "
            f"{list(CITYSCAPES_CLASSES)}, got {names}"
        )
    things = [i for i, c in enumerate(categories) if c.get("isthing")]
    if frozenset(things) != CITYSCAPES_INFO.thing_ids:
        raise ValueError(
            f"{path}: 'isthing' marks classes {things} as things, expected "
            f"{sorted(CITYSCAPES_INFO.thing_ids)} (person .. bicycle)"
        )


# --------------------------------------------------------------------------------------------
# ADE20K
# --------------------------------------------------------------------------------------------


class ADE20KDataset(_FolderDataset):
    """ADE20K (SceneParsing 150) and any dataset in its layout (see the module docstring).

    Args:
        root: the folder that contains ``ADEChallengeData2016/``.
        split: ``"training"`` or ``"validation"``.
        task: ``"panoptic"`` (panoptic annotations required) or ``"semantic"`` (optional).
        transform: applied to every sample.

    ``info`` comes from the panoptic JSON's ``categories`` when the JSON exists, and is the
    150-class ``"class_<i>"`` label space otherwise.
    """

    SPLITS = ("training", "validation")

    def __init__(
        self,
        root: PathLike,
        split: str = "training",
        task: str = "panoptic",
        transform: Transform | None = None,
    ) -> None:
        cls = type(self).__name__
        _check_choice(cls, "split", split, self.SPLITS)
        _check_choice(cls, "task", task, TASKS)
        root = Path(root)
        _require_dir(cls, root, "the folder containing ADEChallengeData2016/")
        base = root / "ADEChallengeData2016"
        _require_dir(cls, base, "ADEChallengeData2016/ with images/ and annotations/")
        image_dir = base / "images" / split
        sem_dir = base / "annotations" / split
        pan_dir = base / f"ade20k_panoptic_{split}"
        json_path = base / f"ade20k_panoptic_{split}.json"
        _require_dir(cls, image_dir, "images/<split>/<name>.jpg")
        _require_dir(cls, sem_dir, "annotations/<split>/<name>.png")

        pan: _PanopticJson | None = None
        if task == "panoptic" or json_path.is_file():
            if not json_path.is_file():
                raise FileNotFoundError(
                    f"{cls}: panoptic JSON {json_path} does not exist (needed for "
                    "task='panoptic'; create it with Mask2Former's prepare_ade20k_pan_seg.py)"
                )
            pan = _load_panoptic_json(json_path)
            info = _info_from_categories("ade20k", pan.categories)
        else:
            info = DatasetInfo(
                name="ade20k",
                class_names=tuple(f"class_{i}" for i in range(ADE20K_NUM_CLASSES)),
                thing_ids=frozenset(),
                colors=distinct_colors(ADE20K_NUM_CLASSES),
            )

        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in ADE20K_IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(
                f"{cls}: no {'/'.join(ADE20K_IMAGE_SUFFIXES)} images in {image_dir}"
            )
        records = []
        for image in images:
            sem = sem_dir / f"{image.stem}.png"
            if not sem.is_file():
                raise FileNotFoundError(f"{cls}: image {image} has no semantic label {sem}")
            records.append(_panoptic_record(cls, image, sem, image.stem, pan, pan_dir, json_path))
        to_contiguous = pan.to_contiguous if pan is not None else {}
        super().__init__(info, records, to_contiguous, transform)

    def _decode_semantic(self, raw: np.ndarray, path: Path) -> np.ndarray:
        # ADE stores 0 = "other" (not evaluated) and class c as c + 1.
        k = self.info.num_classes
        if raw.size and (raw.min() < 0 or raw.max() > k):
            bad = np.unique(raw[(raw < 0) | (raw > k)])
            raise ValueError(f"{path}: values {bad.tolist()} are outside 0..{k} (0 = ignore)")
        return np.where(raw == 0, self.info.ignore_label, raw - 1)
