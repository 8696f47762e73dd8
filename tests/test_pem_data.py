"""Tests of pem.data: folder datasets on tiny generated files, the synthetic dataset and its
ADE20K-layout round trip, the training transforms, instance targets and collation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pem.data import (
    CITYSCAPES_INFO,
    SYNTHETIC_INFO,
    ADE20KDataset,
    CityscapesDataset,
    ColorJitterSSD,
    DatasetInfo,
    RandomCrop,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    SyntheticPanoptic,
    collate,
    crop_sample,
    hflip_sample,
    id2rgb,
    instance_targets,
    pad_sample,
    resize_sample,
    rgb2id,
    semantic_from_panoptic,
    train_scales,
    train_transforms,
    validate_sample,
    write_synthetic,
)
from pem.data.synthetic import main as synthetic_main

H, W = 8, 12


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rand_image(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Cityscapes-style folder
# --------------------------------------------------------------------------------------------

# Cityscapes label ids of the 19 evaluated classes, in train-id order.
CS_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
CS_CATEGORIES = [
    {"id": lid, "name": name, "isthing": int(i >= 11), "color": list(CITYSCAPES_INFO.colors[i])}
    for i, (lid, name) in enumerate(zip(CS_LABEL_IDS, CITYSCAPES_INFO.class_names))
]


def _cityscapes_image1() -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Train ids, panoptic ids (label-id space) and JSON segments of a hand-made scene."""
    train_ids = np.zeros((H, W), dtype=np.uint8)  # road
    pan = np.full((H, W), 7, dtype=np.int64)  # road segment, id = label id 7
    train_ids[:4] = 10  # sky
    pan[:4] = 23
    train_ids[4:7, 2:5] = 13  # car instance 0
    pan[4:7, 2:5] = 26000
    train_ids[6:8, 5:7] = 13  # car instance 1
    pan[6:8, 5:7] = 26001
    train_ids[5:8, 8:11] = 11  # crowd of persons
    pan[5:8, 8:11] = 24
    train_ids[0, 0] = 255  # unlabelled pixel
    pan[0, 0] = 0
    segments = [
        {"id": 7, "category_id": 7, "iscrowd": 0, "area": 1},
        {"id": 23, "category_id": 23, "iscrowd": 0},
        {"id": 26000, "category_id": 26, "iscrowd": 0},
        {"id": 33000, "category_id": 33, "iscrowd": 0},  # listed, but has no pixels
        {"id": 26001, "category_id": 26, "iscrowd": 0},
        {"id": 24, "category_id": 24, "iscrowd": 1},
    ]
    return train_ids, pan, segments


def make_cityscapes(root: Path, split: str = "train", panoptic: bool = True) -> dict:
    """Two images (cities aachen and bochum) in the Cityscapes layout; returns what was written."""
    t1, p1, s1 = _cityscapes_image1()
    t2 = np.zeros((H, W), dtype=np.uint8)
    p2 = np.full((H, W), 7, dtype=np.int64)
    s2 = [{"id": 7, "category_id": 7, "iscrowd": 0}]
    written = {}
    annotations = []
    for k, (city, name, t, p, s) in enumerate(
        [
            ("aachen", "aachen_000000_000019", t1, p1, s1),
            ("bochum", "bochum_000000_000313", t2, p2, s2),
        ]
    ):
        image = _rand_image(k)
        _save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", image)
        _save(root / "gtFine" / split / city / f"{name}_gtFine_labelTrainIds.png", t)
        if panoptic:
            png = f"{name}_gtFine_panoptic.png"
            _save(root / "gtFine" / f"cityscapes_panoptic_{split}" / png, id2rgb(p))
            annotations.append({"image_id": name, "file_name": png, "segments_info": s})
        written[name] = (image, t, p)
    if panoptic:
        data = {"annotations": annotations, "categories": CS_CATEGORIES}
        (root / "gtFine" / f"cityscapes_panoptic_{split}.json").write_text(json.dumps(data))
    return written


def test_cityscapes_panoptic_loads_files_and_maps_label_ids_to_train_ids(tmp_path):
    written = make_cityscapes(tmp_path)
    ds = CityscapesDataset(tmp_path, split="train", task="panoptic")
    assert len(ds) == 2
    assert ds.info is CITYSCAPES_INFO
    assert ds.info.num_classes == 19 and ds.info.thing_ids == frozenset(range(11, 19))
    sample = ds[0]
    validate_sample(sample, ds.info)
    image, train_ids, pan = written["aachen_000000_000019"]
    assert sample["file_name"].endswith("aachen_000000_000019_leftImg8bit.png")
    assert sample["image"].dtype == torch.uint8
    assert torch.equal(sample["image"], torch.from_numpy(image).permute(2, 0, 1))
    assert sample["sem_seg"].dtype == torch.int64
    assert torch.equal(sample["sem_seg"], torch.from_numpy(train_ids.astype(np.int64)))
    assert int(sample["sem_seg"][0, 0]) == 255
    assert torch.equal(sample["panoptic"], torch.from_numpy(pan))
    # Label ids 7, 23, 26, 24 -> train ids 0, 10, 13, 11; the pixel-less bicycle is dropped.
    assert sample["segments_info"] == [
        {"id": 7, "category_id": 0, "isthing": False, "iscrowd": 0},
        {"id": 23, "category_id": 10, "isthing": False, "iscrowd": 0},
        {"id": 26000, "category_id": 13, "isthing": True, "iscrowd": 0},
        {"id": 26001, "category_id": 13, "isthing": True, "iscrowd": 0},
        {"id": 24, "category_id": 11, "isthing": True, "iscrowd": 1},
    ]
    # The two annotations agree: the semantic map implied by panoptic is the train-id map.
    implied = semantic_from_panoptic(sample["panoptic"], sample["segments_info"])
    assert torch.equal(implied, sample["sem_seg"])
    second = ds[1]
    assert second["file_name"].endswith("bochum_000000_000313_leftImg8bit.png")
    assert second["segments_info"] == [{"id": 7, "category_id": 0, "isthing": False, "iscrowd": 0}]


def test_cityscapes_semantic_task_without_panoptic_files(tmp_path):
    written = make_cityscapes(tmp_path, split="val", panoptic=False)
    ds = CityscapesDataset(tmp_path, split="val", task="semantic")
    sample = ds[0]
    validate_sample(sample, ds.info)
    train_ids = written["aachen_000000_000019"][1]
    assert torch.equal(sample["sem_seg"], torch.from_numpy(train_ids.astype(np.int64)))
    assert sample["panoptic"].shape == (H, W) and not sample["panoptic"].any()
    assert sample["segments_info"] == []
    # The panoptic task needs the JSON.
    with pytest.raises(FileNotFoundError, match="cityscapes_panoptic_val.json"):
        CityscapesDataset(tmp_path, split="val", task="panoptic")


def test_cityscapes_semantic_task_uses_panoptic_files_when_present(tmp_path):
    make_cityscapes(tmp_path)
    sample = CityscapesDataset(tmp_path, task="semantic")[0]
    assert [s["id"] for s in sample["segments_info"]] == [7, 23, 26000, 26001, 24]


def test_cityscapes_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        CityscapesDataset(missing)
    with pytest.raises(ValueError, match="split='test'"):
        CityscapesDataset(tmp_path, split="test")
    with pytest.raises(ValueError, match="task='instance'"):
        CityscapesDataset(tmp_path, task="instance")
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        CityscapesDataset(tmp_path)  # empty root

    make_cityscapes(tmp_path)
    label = tmp_path / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png"
    label.unlink()
    with pytest.raises(
        FileNotFoundError, match="bochum_000000_000313_leftImg8bit.png.*no semantic"
    ):
        CityscapesDataset(tmp_path)
    # A labelIds image (values like 26) instead of labelTrainIds.
    _save(label, np.full((H, W), 26, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[26\].*labelTrainIds"):
        CityscapesDataset(tmp_path)[1]


def test_cityscapes_panoptic_json_errors(tmp_path):
    make_cityscapes(tmp_path)
    json_path = tmp_path / "gtFine/cityscapes_panoptic_train.json"
    data = json.loads(json_path.read_text())

    # Categories in another order would shift every class id: rejected.
    shuffled = dict(data, categories=data["categories"][::-1])
    json_path.write_text(json.dumps(shuffled))
    with pytest.raises(ValueError, match="train-id order"):
        CityscapesDataset(tmp_path)

    # A PNG segment id that the JSON does not list.
    broken = json.loads(json.dumps(data))
    broken["annotations"][0]["segments_info"] = [
        s for s in broken["annotations"][0]["segments_info"] if s["id"] != 26001
    ]
    json_path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"\[26001\].*not in the JSON"):
        CityscapesDataset(tmp_path)[0]

    # An image without an annotation entry.
    json_path.write_text(json.dumps(dict(data, annotations=data["annotations"][:1])))
    with pytest.raises(FileNotFoundError, match="bochum_000000_000313"):
        CityscapesDataset(tmp_path)


# --------------------------------------------------------------------------------------------
# ADE20K-style folder
# --------------------------------------------------------------------------------------------

ADE_CATEGORIES = [
    {"id": 10, "name": "wall", "isthing": 0, "color": [1, 2, 3]},
    {"id": 20, "name": "person", "isthing": 1},  # no color: a generated one is used
    {"id": 30, "name": "car", "isthing": 1, "color": [9, 9, 9]},
]


def make_ade(root: Path, split: str = "training", panoptic: bool = True) -> dict:
    """Two images (one PNG, one JPEG) in the ADE20K layout; returns what was written."""
    base = root / "ADEChallengeData2016"
    sem = np.ones((H, W), dtype=np.uint8)  # wall (class 0 stored as 1)
    pan = np.ones((H, W), dtype=np.int64)  # wall segment id 1
    sem[2:5, 1:4] = 2  # person
    pan[2:5, 1:4] = 2
    sem[5:8, 6:10] = 3  # car
    pan[5:8, 6:10] = 3
    sem[0, :] = 0  # "other": ignore, void
    pan[0, :] = 0
    segs = [
        {"id": 1, "category_id": 10, "iscrowd": 0},
        {"id": 2, "category_id": 20, "iscrowd": 0},
        {"id": 3, "category_id": 30},  # iscrowd missing: 0
    ]
    written, annotations = {}, []
    for k, (name, ext) in enumerate([("ADE_x_0001", "png"), ("ADE_x_0002", "jpg")]):
        image = _rand_image(10 + k)
        _save(base / "images" / split / f"{name}.{ext}", image)
        _save(base / "annotations" / split / f"{name}.png", sem)
        if panoptic:
            _save(base / f"ade20k_panoptic_{split}" / f"{name}.png", id2rgb(pan))
            annotations.append(
                {"image_id": name, "file_name": f"{name}.png", "segments_info": segs}
            )
        written[name] = (image, sem, pan)
    if panoptic:
        data = {"annotations": annotations, "categories": ADE_CATEGORIES}
        (base / f"ade20k_panoptic_{split}.json").write_text(json.dumps(data))
    return written


def test_ade20k_panoptic_label_space_from_json(tmp_path):
    written = make_ade(tmp_path)
    ds = ADE20KDataset(tmp_path, split="training", task="panoptic")
    assert len(ds) == 2
    assert ds.info.class_names == ("wall", "person", "car")
    assert ds.info.thing_ids == frozenset({1, 2}) and ds.info.stuff_ids == frozenset({0})
    assert ds.info.colors[0] == (1, 2, 3) and ds.info.colors[2] == (9, 9, 9)
    assert len(ds.info.colors[1]) == 3
    sample = ds[0]
    validate_sample(sample, ds.info)
    image, sem, pan = written["ADE_x_0001"]
    assert torch.equal(sample["image"], torch.from_numpy(image).permute(2, 0, 1))
    # 0 -> 255, v -> v - 1.
    expected_sem = np.where(sem == 0, 255, sem.astype(np.int64) - 1)
    assert torch.equal(sample["sem_seg"], torch.from_numpy(expected_sem))
    assert torch.equal(sample["panoptic"], torch.from_numpy(pan))
    # Dataset category ids 10/20/30 -> positions 0/1/2.
    assert sample["segments_info"] == [
        {"id": 1, "category_id": 0, "isthing": False, "iscrowd": 0},
        {"id": 2, "category_id": 1, "isthing": True, "iscrowd": 0},
        {"id": 3, "category_id": 2, "isthing": True, "iscrowd": 0},
    ]
    assert torch.equal(semantic_from_panoptic(sample["panoptic"], sample["segments_info"]),
                       sample["sem_seg"])  # fmt: skip
    jpeg = ds[1]  # JPEG images are accepted (lossy, so only the size is exact)
    assert jpeg["file_name"].endswith("ADE_x_0002.jpg") and jpeg["image"].shape == (3, H, W)


def test_ade20k_semantic_without_json_is_150_classes(tmp_path):
    make_ade(tmp_path, split="validation", panoptic=False)
    base = tmp_path / "ADEChallengeData2016/annotations/validation"
    _save(base / "ADE_x_0001.png", np.full((H, W), 150, dtype=np.uint8))
    ds = ADE20KDataset(tmp_path, split="validation", task="semantic")
    assert ds.info.num_classes == 150
    assert ds.info.class_names[0] == "class_0" and ds.info.thing_ids == frozenset()
    sample = ds[0]
    validate_sample(sample, ds.info)
    assert torch.all(sample["sem_seg"] == 149)
    assert sample["segments_info"] == [] and not sample["panoptic"].any()
    _save(base / "ADE_x_0001.png", np.full((H, W), 151, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[151\] are outside 0..150"):
        ds[0]


def test_ade20k_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        ADE20KDataset(tmp_path)
    with pytest.raises(ValueError, match="split='train'.*'training'"):
        ADE20KDataset(tmp_path, split="train")
    make_ade(tmp_path)
    (tmp_path / "ADEChallengeData2016/annotations/training/ADE_x_0002.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_x_0002.jpg has no semantic label"):
        ADE20KDataset(tmp_path)
    (tmp_path / "ADEChallengeData2016/ade20k_panoptic_training/ADE_x_0001.png").unlink()
    with pytest.raises(FileNotFoundError, match="panoptic PNG .*ADE_x_0001.png"):
        ADE20KDataset(tmp_path, task="semantic")  # the JSON exists, so its PNGs must too


def test_panoptic_png_id_encoding_round_trip():
    ids = np.array([[0, 1, 255], [256, 65536, 256**3 - 1]], dtype=np.int64)
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb[1, 0].tolist() == [0, 1, 0]
    assert np.array_equal(rgb2id(rgb), ids)
    with pytest.raises(ValueError, match="ids must be in"):
        id2rgb(np.array([256**3]))


def test_dataset_info_validation():
    info = DatasetInfo("t", ("a", "b", "c"), frozenset({2}), ((0, 0, 0),) * 3)
    assert info.num_classes == 3 and info.stuff_ids == frozenset({0, 1})
    with pytest.raises(ValueError, match="colors has 2 entries"):
        DatasetInfo("t", ("a", "b", "c"), frozenset(), ((0, 0, 0),) * 2)
    with pytest.raises(ValueError, match=r"thing_ids \[3\]"):
        DatasetInfo("t", ("a", "b", "c"), frozenset({3}), ((0, 0, 0),) * 3)
    with pytest.raises(ValueError, match="ignore_label = 1"):
        DatasetInfo("t", ("a", "b", "c"), frozenset(), ((0, 0, 0),) * 3, ignore_label=1)


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def _assert_same_sample(a: dict, b: dict) -> None:
    for key in ("image", "sem_seg", "panoptic"):
        assert torch.equal(a[key], b[key]), key
    assert a["segments_info"] == b["segments_info"]


def test_synthetic_is_deterministic_and_independent_of_access_order():
    a = SyntheticPanoptic(6, size=(40, 56), seed=3)
    b = SyntheticPanoptic(6, size=(40, 56), seed=3)
    later = [b[i] for i in (5, 2, 4)]
    _assert_same_sample(a[4], later[2])
    _assert_same_sample(a[2], later[1])
    _assert_same_sample(a[-1], a[5])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["image"], SyntheticPanoptic(6, (40, 56), seed=4)[0]["image"])
    val = SyntheticPanoptic(6, (40, 56), seed=3, split="val")
    assert not torch.equal(a[0]["image"], val[0]["image"])
    with pytest.raises(IndexError):
        a[6]


def test_synthetic_samples_are_consistent():
    ds = SyntheticPanoptic(24, size=(48, 64), seed=0)
    assert ds.info is SYNTHETIC_INFO and ds.info.num_classes == 7
    assert ds.info.stuff_ids == frozenset({0, 1, 2, 3})
    assert len(set(ds.info.colors)) == 7
    seen = set()
    for i in range(len(ds)):
        s = ds[i]
        # Shapes, dtypes, every listed segment has pixels and every pixel id is listed,
        # category ranges and isthing flags.
        validate_sample(s, ds.info)
        assert s["image"].shape == (3, 48, 64)
        assert bool((s["panoptic"] > 0).all())  # no void
        assert torch.equal(semantic_from_panoptic(s["panoptic"], s["segments_info"]), s["sem_seg"])
        stuff = [g["category_id"] for g in s["segments_info"] if not g["isthing"]]
        things = [g for g in s["segments_info"] if g["isthing"]]
        assert len(stuff) == len(set(stuff)) >= 1  # one segment per stuff class
        assert 1 <= len(things) <= 6
        assert all(g["iscrowd"] == 0 for g in s["segments_info"])
        seen.update(g["category_id"] for g in s["segments_info"])
    assert seen == set(range(7))


def test_synthetic_things_are_told_apart_by_color_family():
    # Mean color of each thing class over many instances: the class tints must differ clearly.
    ds = SyntheticPanoptic(12, size=(64, 64), seed=1)
    sums = {c: torch.zeros(3) for c in (4, 5, 6)}
    counts = dict.fromkeys(sums, 0)
    for i in range(len(ds)):
        s = ds[i]
        for c in sums:
            m = s["sem_seg"] == c
            sums[c] += s["image"][:, m].float().sum(1)
            counts[c] += int(m.sum())
    means = [sums[c] / counts[c] for c in (4, 5, 6)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert float((means[i] - means[j]).abs().max()) > 40


def test_write_synthetic_round_trip_through_ade20k_loader(tmp_path):
    root = write_synthetic(tmp_path, num_train=3, num_val=2, size=(40, 56), seed=5)
    assert root == tmp_path
    for split, ade, n in (("train", "training", 3), ("val", "validation", 2)):
        loaded = ADE20KDataset(tmp_path, split=ade, task="panoptic")
        made = SyntheticPanoptic(n, size=(40, 56), seed=5, split=split)
        assert len(loaded) == n
        assert loaded.info.class_names == SYNTHETIC_INFO.class_names
        assert loaded.info.thing_ids == SYNTHETIC_INFO.thing_ids
        assert loaded.info.colors == SYNTHETIC_INFO.colors
        for i in range(n):
            _assert_same_sample(loaded[i], made[i])
            assert Path(loaded[i]["file_name"]).name == made[i]["file_name"]
    semantic = ADE20KDataset(tmp_path, split="training", task="semantic")
    _assert_same_sample(semantic[1], SyntheticPanoptic(3, (40, 56), seed=5)[1])

    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic(tmp_path, 1, 1, size=(40, 56))
    write_synthetic(tmp_path, 1, 1, size=(40, 56), seed=6, overwrite=True)
    loaded = ADE20KDataset(tmp_path, split="training")
    assert len(loaded) == 1
    _assert_same_sample(loaded[0], SyntheticPanoptic(1, (40, 56), seed=6)[0])


def test_write_synthetic_never_overwrites_other_data(tmp_path):
    make_ade(tmp_path)  # a "real" ADE20K folder
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_synthetic(tmp_path, 1, 1, size=(16, 16), overwrite=True)
    assert len(ADE20KDataset(tmp_path)) == 2  # untouched


def test_synthetic_cli(tmp_path, capsys):
    synthetic_main(["--out", str(tmp_path), "--train", "2", "--val", "1", "--size", "16", "24"])
    assert "wrote 2 training and 1 validation images" in capsys.readouterr().out
    ds = ADE20KDataset(tmp_path, "validation")
    assert len(ds) == 1 and ds[0]["image"].shape == (3, 16, 24)


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def coordinate_sample(h: int = 10, w: int = 14) -> dict:
    """A sample whose image encodes each pixel's (row, col) and whose labels are functions of
    the pixel position, so alignment after a transform can be checked pixel by pixel."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack([rows, cols, (rows + cols) % 256]).to(torch.uint8)
    panoptic = 1 + rows // 5 * 10 + cols // 4  # blocks of 5x4 pixels, ids > 0
    panoptic[0, 0] = 99  # a one-pixel segment in the corner
    ids = sorted(set(panoptic.flatten().tolist()))
    segments = [{"id": i, "category_id": i % 3, "isthing": i % 3 == 2, "iscrowd": 0} for i in ids]
    return {
        "image": image,
        "sem_seg": semantic_from_panoptic(panoptic, segments),
        "panoptic": panoptic,
        "segments_info": segments,
        "file_name": "coords",
    }


def test_hflip_twice_is_identity_and_flips_all_maps_together():
    s = coordinate_sample()
    once = hflip_sample(s)
    assert torch.equal(once["image"][1, :, 0], torch.full((10,), 13, dtype=torch.uint8))
    assert torch.equal(once["panoptic"], s["panoptic"].flip(-1))
    assert torch.equal(once["sem_seg"], s["sem_seg"].flip(-1))
    _assert_same_sample(hflip_sample(once), s)
    torch.manual_seed(0)
    flipped = [RandomHorizontalFlip(0.5)(s) for _ in range(40)]
    n = sum(not torch.equal(f["image"], s["image"]) for f in flipped)
    assert 5 < n < 35
    assert torch.equal(RandomHorizontalFlip(1.0)(s)["image"], once["image"])


def test_crop_sample_window_and_pruning():
    s = coordinate_sample()
    c = crop_sample(s, top=5, left=4, height=5, width=8)
    assert torch.equal(c["image"], s["image"][:, 5:10, 4:12])
    assert torch.equal(c["sem_seg"], s["sem_seg"][5:10, 4:12])
    assert torch.equal(c["panoptic"], s["panoptic"][5:10, 4:12])
    # Only the two 5x4 blocks of the window remain (ids 12 and 13); the rest are dropped.
    assert [g["id"] for g in c["segments_info"]] == [12, 13]
    validate_sample(c)
    assert len(s["segments_info"]) == 9  # the input is unchanged
    with pytest.raises(ValueError, match="not inside"):
        crop_sample(s, top=6, left=0, height=5, width=5)


def test_random_crop_is_a_window_of_the_input():
    s = coordinate_sample()
    torch.manual_seed(0)
    offsets = set()
    for _ in range(20):
        c = RandomCrop((4, 6))(s)
        assert c["image"].shape == (3, 4, 6)
        top, left = int(c["image"][0, 0, 0]), int(c["image"][1, 0, 0])  # encoded coordinates
        offsets.add((top, left))
        assert torch.equal(c["image"], s["image"][:, top : top + 4, left : left + 6])
        assert torch.equal(c["sem_seg"], s["sem_seg"][top : top + 4, left : left + 6])
        assert torch.equal(c["panoptic"], s["panoptic"][top : top + 4, left : left + 6])
        validate_sample(c)  # segments_info pruned to exactly the ids in the window
    # Both offsets vary (uniform over 7 tops and 9 lefts).
    assert len({t for t, _ in offsets}) > 2 and len({left for _, left in offsets}) > 2


def test_random_crop_pads_when_the_image_is_smaller():
    s = coordinate_sample(h=6, w=14)
    torch.manual_seed(0)
    c = RandomCrop((8, 10))(s)
    assert c["image"].shape == (3, 8, 10) and c["sem_seg"].shape == (8, 10)
    left = int(c["image"][1, 0, 0])
    assert torch.equal(c["panoptic"][:6], s["panoptic"][:, left : left + 10])
    assert bool((c["sem_seg"][6:] == 255).all()) and bool((c["panoptic"][6:] == 0).all())
    assert bool((c["image"][:, 6:] == 128).all())
    validate_sample(c)
    p = pad_sample(s, (6, 16), ignore_label=7, image_value=3)
    assert bool((p["sem_seg"][:, 14:] == 7).all()) and bool((p["image"][:, :, 14:] == 3).all())


def test_resize_shortest_edge_sizes():
    r = ResizeShortestEdge([4], max_size=1000)
    assert r.output_size(8, 12, 4) == (4, 6)
    assert r.output_size(12, 8, 4) == (6, 4)
    # Short side 20 would make the long side 80 > 50: capped, 12.5 rounds half up.
    assert ResizeShortestEdge([20], max_size=50).output_size(10, 40, 20) == (13, 50)
    torch.manual_seed(0)
    sizes = {
        ResizeShortestEdge([5, 10, 20])(coordinate_sample())["image"].shape[1] for _ in range(30)
    }
    assert sizes == {5, 10, 20}


def test_resize_labels_are_nearest_and_aligned():
    s = coordinate_sample(h=10, w=12)
    up = resize_sample(s, (20, 24))
    expected = s["panoptic"].repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(up["panoptic"], expected)
    assert torch.equal(up["sem_seg"], s["sem_seg"].repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert up["image"].dtype == torch.uint8 and up["image"].shape == (3, 20, 24)
    # Halving samples the odd pixels: the one-pixel segment 99 at (0, 0) disappears.
    down = resize_sample(s, (5, 6))
    assert torch.equal(down["panoptic"], s["panoptic"][1::2, 1::2])
    assert 99 not in [g["id"] for g in down["segments_info"]]
    validate_sample(down)
    flat = {**s, "image": torch.full((3, 10, 12), 77, dtype=torch.uint8)}
    assert bool((resize_sample(flat, (7, 9))["image"] == 77).all())


def test_color_jitter_changes_only_the_image():
    s = coordinate_sample()
    torch.manual_seed(0)
    out = [ColorJitterSSD()(s) for _ in range(10)]
    assert any(not torch.equal(o["image"], s["image"]) for o in out)
    for o in out:
        assert o["image"].dtype == torch.uint8 and o["image"].shape == s["image"].shape
        assert torch.equal(o["sem_seg"], s["sem_seg"]) and torch.equal(o["panoptic"], s["panoptic"])
    identity = ColorJitterSSD(0.0, (1.0, 1.0), (1.0, 1.0))
    assert all(torch.equal(identity(s)["image"], s["image"]) for _ in range(5))
    gray = {**s, "image": torch.full((3, 10, 14), 100, dtype=torch.uint8)}
    jittered = ColorJitterSSD(brightness_delta=0.0, contrast_range=(1.0, 1.0))(gray)["image"]
    assert bool((jittered == 100).all())  # saturation leaves a gray image gray
    # Contrast alone (factor 2, applied half of the time): every output is 50 or 100 everywhere.
    fifty = {**s, "image": torch.full((3, 10, 14), 50, dtype=torch.uint8)}
    contrast = ColorJitterSSD(0.0, (2.0, 2.0), (1.0, 1.0))
    values = {tuple(contrast(fifty)["image"].unique().tolist()) for _ in range(30)}
    assert values == {(50,), (100,)}
    # Brightness alone: one shift for all pixels, within +-10.
    for _ in range(10):
        shift = ColorJitterSSD(10.0, (1.0, 1.0), (1.0, 1.0))(fifty)["image"].unique()
        assert shift.numel() == 1 and 40 <= int(shift) <= 60


def test_train_scales_and_pipeline():
    scales = train_scales(1024)
    assert len(scales) == 16 and scales[0] == 512 and scales[5] == 1024 and scales[-1] == 2048
    assert train_scales(640)[:3] == [320, 384, 448]
    ds = SyntheticPanoptic(6, size=(48, 64), seed=2, transform=train_transforms(48, (32, 40), 256))
    torch.manual_seed(0)
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 32, 40)
        validate_sample(s, ds.info)
        # sem_seg and panoptic went through the same geometry (padding is ignore/void in both).
        assert torch.equal(semantic_from_panoptic(s["panoptic"], s["segments_info"]), s["sem_seg"])


# --------------------------------------------------------------------------------------------
# Targets and collation
# --------------------------------------------------------------------------------------------


def test_instance_targets_panoptic_skips_crowd():
    panoptic = torch.tensor([[5, 5, 7, 0], [5, 9, 7, 7], [9, 9, 5, 0]])
    sample = {
        "sem_seg": torch.tensor([[0, 0, 2, 255], [0, 2, 2, 2], [2, 2, 0, 255]]),
        "panoptic": panoptic,
        "segments_info": [
            {"id": 7, "category_id": 2, "isthing": True, "iscrowd": 0},
            {"id": 9, "category_id": 2, "isthing": True, "iscrowd": 1},
            {"id": 5, "category_id": 0, "isthing": False, "iscrowd": 0},
        ],
    }
    t = instance_targets(sample, "panoptic")
    assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == [2, 0]
    assert t["masks"].dtype == torch.bool and t["masks"].shape == (2, 3, 4)
    assert t["masks"][0].tolist() == [
        [False, False, True, False],
        [False, False, True, True],
        [False, False, False, False],
    ]
    assert t["masks"][1].tolist() == [
        [True, True, False, False],
        [True, False, False, False],
        [False, False, True, False],
    ]

    s = instance_targets(sample, "semantic")
    assert s["labels"].tolist() == [0, 2]  # ignore excluded, increasing class order
    assert torch.equal(s["masks"][0], sample["sem_seg"] == 0)
    assert torch.equal(s["masks"][1], sample["sem_seg"] == 2)
    assert int(s["masks"].sum()) == 10  # the two ignore pixels are in no mask

    empty = instance_targets({**sample, "segments_info": []}, "panoptic")
    assert empty["labels"].shape == (0,) and empty["masks"].shape == (0, 3, 4)
    assert empty["masks"].dtype == torch.bool
    with pytest.raises(ValueError, match="task='instance'"):
        instance_targets(sample, "instance")


def test_collate():
    a, b = coordinate_sample(), coordinate_sample()
    images, samples = collate([a, b])
    assert images.dtype == torch.float32 and images.shape == (2, 3, 10, 14)
    assert torch.equal(images[1], a["image"].float()) and samples == [a, b]
    with pytest.raises(ValueError, match=re.escape("[(10, 14), (8, 14)]")):
        collate([a, coordinate_sample(h=8)])
    with pytest.raises(ValueError, match="empty"):
        collate([])
