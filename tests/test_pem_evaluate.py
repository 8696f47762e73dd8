"""End-to-end tests of evaluation (post-processing + metrics) and of the evaluate / segment
commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pem.data import DatasetInfo, distinct_colors
from pem.evaluate import evaluate, format_table, main as evaluate_main, resized_shape
from pem.segment import main as segment_main
from pem.train import main as train_main

BIG = 30.0
INFO = DatasetInfo("blocks", ("ground", "sky", "box"), frozenset({2}), distinct_colors(3))


def _sample(with_box_at: tuple[int, int] | None) -> dict:
    """A 32x64 image: ground (left half), sky (right half), optionally an 8x8 box on the ground."""
    panoptic = torch.ones(32, 64, dtype=torch.int64)
    panoptic[:, 32:] = 2
    infos = [{"id": 1, "category_id": 0, "isthing": False, "iscrowd": 0},
             {"id": 2, "category_id": 1, "isthing": False, "iscrowd": 0}]
    if with_box_at is not None:
        y, x = with_box_at
        panoptic[y : y + 8, x : x + 8] = 3
        infos.append({"id": 3, "category_id": 2, "isthing": True, "iscrowd": 0})
    sem = torch.zeros(32, 64, dtype=torch.int64)
    for info in infos:
        sem[panoptic == info["id"]] = info["category_id"]
    return {"image": torch.zeros(3, 32, 64, dtype=torch.uint8), "sem_seg": sem,
            "panoptic": panoptic, "segments_info": infos, "file_name": "blocks.png"}


class _Dataset(torch.utils.data.Dataset):
    info = INFO

    def __init__(self, samples: list[dict]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


class _Oracle(nn.Module):
    """Returns, for the i-th call, one confident query per segment of ``predicted[i]`` (the rest
    "no object"). Its masks come at the padded resolution itself (post-processing resizes them to
    ``padded_size``, here the identity), so the expected scores are exact."""

    def __init__(self, predicted: list[dict], queries: int = 6) -> None:
        super().__init__()
        self.predicted, self.queries, self.calls = predicted, queries, 0

    def forward(self, images: torch.Tensor) -> dict:
        sample = self.predicted[self.calls]
        self.calls += 1
        logits = torch.zeros(1, self.queries, INFO.num_classes + 1)
        logits[..., -1] = BIG  # no object
        masks = torch.full((1, self.queries, 32, 64), -BIG)
        for q, info in enumerate(sample["segments_info"]):
            logits[0, q] = 0
            logits[0, q, info["category_id"]] = BIG
            masks[0, q] = torch.where(sample["panoptic"] == info["id"], BIG, -BIG)
        return {"pred_logits": logits, "pred_masks": masks, "image_size": (32, 64),
                "padded_size": (32, 64)}


def test_a_perfect_prediction_scores_100() -> None:
    gt = [_sample((8, 8)), _sample((20, 12))]
    result = evaluate(_Oracle(gt), _Dataset(gt), "panoptic", progress=False)
    assert result.summary() == {"mIoU": 100.0, "PQ": 100.0, "SQ": 100.0, "RQ": 100.0,
                                "PQ_th": 100.0, "PQ_st": 100.0}
    assert result.num_images == 2
    table = format_table(result)
    assert "box" in table and "PQ 100.00" in table


def test_a_missed_instance_costs_exactly_one_false_negative() -> None:
    gt = [_sample((8, 8)), _sample((20, 12))]
    predicted = [gt[0], _sample(None)]  # the second box is missed (its pixels become ground)
    result = evaluate(_Oracle(predicted), _Dataset(gt), "panoptic", progress=False)
    box = result.panoptic.per_category[2]
    assert (box["tp"], box["fp"], box["fn"]) == (1, 0, 1)
    # box PQ = 1 / (1 + 0.5); the ground segment (32x32 px) of image 2 swallows the box: its IoU
    # with the ground truth (ground minus box) is (1024 - 64) / 1024.
    ground_pq = (1 + (1024 - 64) / 1024) / 2
    assert result.summary()["PQ_th"] == pytest.approx(100 / 1.5, abs=0.01)
    assert result.summary()["PQ"] == pytest.approx(100 * (1 / 1.5 + ground_pq + 1) / 3, abs=0.01)
    # Semantic: 64 box pixels labelled ground. Box IoU = 64 / 128; ground IoU = 1920 / 1984.
    expected_miou = (1920 / 1984 + 1 + 64 / 128) / 3
    assert result.summary()["mIoU"] == pytest.approx(100 * expected_miou, abs=0.01)


def test_resized_shape_matches_detectron2() -> None:
    assert resized_shape(1024, 2048, 512, 2048) == (512, 1024)
    assert resized_shape(100, 1000, 512, 2048) == (205, 2048)
    assert resized_shape(300, 200, 100, 1000) == (150, 100)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train_main(["--data", "synthetic", "--synthetic-size", "64", "--synthetic-images", "8",
                "--num-queries", "8", "--num-points", "256", "--batch", "2", "--iters", "2",
                "--eval-images", "2", "--out", str(out)])
    return out / "last.pt"


def test_evaluate_command_prints_the_table(tiny_checkpoint: Path, capsys, tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    assert evaluate_main(["--checkpoint", str(tiny_checkpoint), "--images", "2",
                          "--json", str(summary)]) == 0
    out = capsys.readouterr().out
    for word in ("mIoU", "PQ_th", "circle", "sky", "iteration 2"):
        assert word in out
    assert '"PQ"' in summary.read_text()


def test_segment_command_writes_an_overlay(tiny_checkpoint: Path, capsys, tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    out_png = tmp_path / "out" / "overlay.png"
    assert segment_main(["--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "in.png"),
                         "--out", str(out_png), "--alpha", "0.0"]) == 0
    overlay = np.asarray(Image.open(out_png))
    assert overlay.shape == (40, 56, 3)
    # alpha 0 keeps the image except on the white segment boundaries.
    differs = (overlay != image).any(-1)
    assert (overlay[differs] == 255).all()
    assert "segments" in capsys.readouterr().out
    (tmp_path / "not_an_image.png").write_text("text")
    for argv, message in [
        (["--image", str(tmp_path / "nope.png")], "--image: no file at"),
        (["--image", str(tmp_path / "not_an_image.png")], "is not an image PIL can read"),
        (["--checkpoint", str(tmp_path / "nope.pt")], "--checkpoint: no file at"),
        (["--checkpoint", str(tmp_path / "in.png")], "is not a pem.train checkpoint"),
        (["--out", str(tmp_path / "overlay.xyz")], "--out: expected an image file name"),
        (["--out", str(tmp_path / "overlay.psd")], "--out: expected an image file name"),
        (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
        (["--short-side", "-3"], "--short-side: expected an int >= 1, got -3"),
        (["--backend", "gpu"], "argument --backend: invalid choice: 'gpu'"),
    ]:
        defaults = {"--checkpoint": str(tiny_checkpoint), "--image": str(tmp_path / "in.png"),
                    "--out": str(out_png)}
        defaults.update(zip(argv[::2], argv[1::2]))
        with pytest.raises(SystemExit):
            segment_main([item for pair in defaults.items() for item in pair])
        assert message in capsys.readouterr().err, argv


def test_evaluate_command_bad_arguments(tiny_checkpoint: Path, capsys, tmp_path: Path) -> None:
    """Usage errors naming the option, not tracebacks from deep inside (and --images 0 no longer
    scores nothing with NaN results)."""
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for argv, message in [
        (["--images", "0"], "--images: expected an int >= 1, got 0"),
        (["--short-side", "0"], "--short-side: expected an int >= 1, got 0"),
        (["--data", "bogus"], "--data: expected 'synthetic', 'cityscapes:ROOT'"),
        (["--data", f"ade20k:{tmp_path / 'missing'}"], "--data: ADE20KDataset:"),
        (["--backend", "gpu"], "argument --backend: invalid choice: 'gpu'"),
        (["--checkpoint", str(tmp_path / "nope.pt")], "--checkpoint: no file at"),
        (["--checkpoint", str(tmp_path / "junk.pt")], "is not a pem.train checkpoint"),
    ]:
        defaults = {"--checkpoint": str(tiny_checkpoint)}
        defaults.update(zip(argv[::2], argv[1::2]))
        with pytest.raises(SystemExit):
            evaluate_main([item for pair in defaults.items() for item in pair])
        assert message in capsys.readouterr().err, argv


def test_predict_feeds_the_image_in_the_models_dtype() -> None:
    """A model cast to bf16 takes bf16 images (PEM checks the dtype); predict converts the uint8
    image to the model's dtype, not always to fp32."""
    from pem.evaluate import predict
    from pem.model import PEM

    torch.manual_seed(0)
    model = PEM("stdc1", 5, "reference").eval().to(torch.bfloat16)
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    with torch.no_grad():
        result = predict(model, image, [], "semantic", torch.device("cpu"))
    assert result["sem_seg"].shape == (5, 40, 56)


def test_json_output_of_the_commands_is_strict() -> None:
    """NaN scores (a class never seen) are written as null: Python's json writes bare NaN, which
    strict parsers reject."""
    from pem.cli import dumps

    text = dumps({"PQ": float("nan"), "rows": [1.5, float("inf")], "name": "x"})
    assert text == '{"PQ": null, "rows": [1.5, null], "name": "x"}'
    assert json.loads(text)["PQ"] is None
