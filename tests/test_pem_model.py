"""Tests of the reference PEM model: shapes, parameter counts, CSM, padding, the backend switch."""

from __future__ import annotations

import copy

import pytest
import torch

from pem_kernels import available_backends

from pem.backbones import build_backbone
from pem.model import PEM
from pem.params import count_parameters, main as params_main, parameter_table
from pem.pixel_decoder import CSM, PEMPixelDecoder
from pem.transformer_decoder import PEMTransformerDecoder, PositionEmbeddingSine


def _images(b: int, h: int, w: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(b, 3, h, w, dtype=dtype) * 255


@pytest.mark.parametrize("backbone", ["r50", "stdc1"])
@pytest.mark.parametrize("train", [False, True])
def test_output_shapes(backbone: str, train: bool) -> None:
    model = PEM(backbone, num_classes=19).train(train)
    with torch.no_grad():
        out = model(_images(2, 64, 96))
    assert out["pred_logits"].shape == (2, 100, 20)
    assert out["pred_masks"].shape == (2, 100, 16, 24)
    assert len(out["aux_outputs"]) == 6
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 100, 20)
        assert aux["pred_masks"].shape == (2, 100, 16, 24)
    assert out["padded_size"] == (64, 96) and out["image_size"] == (64, 96)
    assert torch.isfinite(out["pred_masks"]).all() and torch.isfinite(out["pred_logits"]).all()


def test_backbone_feature_shapes_stdc2() -> None:
    feats = build_backbone("stdc2")(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "res2": (1, 64, 16, 24), "res3": (1, 256, 8, 12), "res4": (1, 512, 4, 6),
        "res5": (1, 1024, 2, 3),
    }


def test_pixel_decoder_shapes() -> None:
    dec = PEMPixelDecoder({"res2": 64, "res3": 256, "res4": 512, "res5": 1024}).eval()
    feats = build_backbone("stdc1").eval()(torch.randn(2, 3, 64, 96))
    mask_features, (x32, x16, x8) = dec(feats)
    assert mask_features.shape == (2, 256, 16, 24) and (mask_features >= 0).all()
    assert (x32.shape == (2, 128, 2, 3) and x16.shape == (2, 128, 4, 6)
            and x8.shape == (2, 128, 8, 12))


def test_parameter_counts_r50() -> None:
    t19 = parameter_table(PEM("r50", 19))
    # Exact counts from the official architecture (facts section 9).
    assert t19["per_layer_pem_ca"] == 267_008
    assert t19["per_layer_self_attention"] == 263_680
    assert t19["per_layer_ffn"] == 1_051_392
    assert abs(t19["backbone"] / 1e6 - 23.51) < 0.01
    assert abs(t19["pixel_decoder"] / 1e6 - 2.18) < 0.01
    assert abs(t19["transformer_decoder"] / 1e6 - 9.85) < 0.01
    assert abs(t19["total"] / 1e6 - 35.53) < 0.01
    t150 = parameter_table(PEM("r50", 150))
    assert abs(t150["transformer_decoder"] / 1e6 - 9.88) < 0.01
    assert abs(t150["total"] / 1e6 - 35.57) < 0.01


def test_parameter_counts_stdc() -> None:
    # The official pixel decoder on STDC has 1.79M; the README reports 17.0M / 21.0M totals.
    t1 = parameter_table(PEM("stdc1", 19))
    assert abs(t1["pixel_decoder"] / 1e6 - 1.79) < 0.01
    assert abs(t1["total"] / 1e6 - 17.0) < 0.05
    assert abs(count_parameters(build_backbone("stdc2")) / 1e6 + 1.79 + 9.85 - 21.0) < 0.05


def test_params_cli(capsys: pytest.CaptureFixture[str]) -> None:
    params_main(["--backbone", "r50", "--num-classes", "150"])
    text = capsys.readouterr().out
    assert "35,566,248" in text and "267,008" in text


def test_csm_double_sigmoid_range() -> None:
    csm = CSM(128).train()
    x = torch.randn(4, 128, 5, 7) * 10
    w = csm.weights(x)
    assert w.shape == (4, 128, 1, 1)
    # sigmoid(sigmoid(.)) lies in (sigmoid(0), sigmoid(1)) = (0.5, 0.7311).
    assert w.min() > 0.5 and w.max() < 0.7311
    assert w.max() - w.min() > 0.05  # the weights really vary (not a constant)
    torch.testing.assert_close(csm(x), x * (1 + w))


def test_official_inits() -> None:
    dec = PEMPixelDecoder([256, 512, 1024, 2048])
    layer = dec.deform_layers[0]
    assert (layer.dcn.offset_conv.weight.abs().sum() == 0
            and layer.dcn.offset_conv.bias.abs().sum() == 0)
    w = layer.up_sample.weight
    bilinear = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(w[:, 0], (bilinear[:, None] * bilinear[None, :]).expand(128, 4, 4))
    assert not torch.allclose(w[:, 1], w[:, 0])  # only output channel 0 is bilinear


def test_position_embedding_sine() -> None:
    pos = PositionEmbeddingSine(128, normalize=True)(torch.zeros(2, 256, 3, 5))
    assert pos.shape == (2, 256, 3, 5)
    # Channel 0 is sin of the normalized y coordinate, channel 128 sin of x (dim_t[0] = 1).
    y = torch.arange(1, 4, dtype=torch.float32) / (3 + 1e-6) * 2 * torch.pi
    x = torch.arange(1, 6, dtype=torch.float32) / (5 + 1e-6) * 2 * torch.pi
    torch.testing.assert_close(pos[0, 0, :, 0], y.sin())
    torch.testing.assert_close(pos[0, 128, 0, :], x.sin())
    torch.testing.assert_close(pos[0, 1, :, 0], y.cos())
    # The official code's construction ([H, W, C], then permuted): the same values, bit for bit.
    y_embed, x_embed = y[:, None].expand(3, 5), x[None, :].expand(3, 5)
    dim_t = torch.arange(128, dtype=torch.float32)
    dim_t = 10000.0 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / 128)
    pos_x, pos_y = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=3).flatten(2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=3).flatten(2)
    assert torch.equal(pos[1], torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1))
    # Built channel-first: a batch-1 encoding is contiguous (no copy in the fused kernels).
    assert PositionEmbeddingSine(128, normalize=True)(torch.zeros(1, 256, 3, 5)).is_contiguous()


def test_position_embedding_cache() -> None:
    """Eager calls reuse one encoding per (H, W, dtype, device, inference mode): the same values
    as a fresh computation, none held across .to(), at most CACHE_SIZE kept, and encodings made
    under inference mode never handed to autograd-recording code."""
    layer = PositionEmbeddingSine(16, normalize=True)
    fresh = PositionEmbeddingSine(16, normalize=True)
    first = layer(torch.zeros(2, 32, 3, 5))
    again = layer(torch.zeros(1, 32, 3, 5))
    assert again.data_ptr() == first.data_ptr()  # the same stored encoding, expanded
    assert torch.equal(again, fresh._encoding(3, 5, torch.float32, torch.device("cpu")))
    assert layer(torch.zeros(1, 32, 3, 5, dtype=torch.float64)).dtype == torch.float64
    assert len(layer._cache) == 2
    layer.double()
    assert not layer._cache
    for size in range(1, PositionEmbeddingSine.CACHE_SIZE + 3):
        layer(torch.zeros(1, 32, size, 2))
    assert len(layer._cache) <= PositionEmbeddingSine.CACHE_SIZE
    with torch.inference_mode():
        inference = layer(torch.zeros(1, 32, 4, 4))
    normal = layer(torch.zeros(1, 32, 4, 4))
    assert inference.is_inference() and not normal.is_inference()
    assert torch.equal(inference, normal)
    layer.temperature = 100.0  # a setting changed after a forward: not the stored encoding
    changed = PositionEmbeddingSine(16, temperature=100.0, normalize=True).double()
    assert torch.equal(layer(torch.zeros(1, 32, 4, 4)), changed(torch.zeros(1, 32, 4, 4)))
    assert not torch.equal(layer(torch.zeros(1, 32, 4, 4)), normal)


def test_padding_keeps_the_padded_canvas() -> None:
    model = PEM("stdc1", 19).eval()
    images = _images(1, 50, 70)
    with torch.no_grad():
        out = model(images)
        assert out["padded_size"] == (64, 96) and out["image_size"] == (50, 70)
        assert out["pred_masks"].shape == (1, 100, 16, 24)
        # Padding with the pixel mean (0 after normalization) by hand must give the same result.
        padded = model.pixel_mean.expand(1, 3, 64, 96).clone()
        padded[..., :50, :70] = images
        ref = model(padded)
    torch.testing.assert_close(out["pred_masks"], ref["pred_masks"])
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"])


def _loss(out: dict) -> torch.Tensor:
    # Touch every prediction (final and aux) so every parameter gets a gradient.
    total = out["pred_masks"].square().mean() + out["pred_logits"].square().mean()
    for aux in out["aux_outputs"]:
        total = total + aux["pred_masks"].sin().mean() + aux["pred_logits"].square().mean()
    return total


def test_fused_matches_reference_outputs_and_gradients() -> None:
    ops = ("deform_conv2d", "prototype_select", "prototype_attention")
    if not all("cpu" in available_backends(op, "cpu", torch.float64) for op in ops):
        pytest.skip(
            "the fused CPU kernels (pem_kernels._C) are not built: auto would be the reference"
        )
    model = PEM("r50", 19, backend="auto").double().train()
    with torch.no_grad():
        # Non-zero offsets so the deformable conv samples between pixels (its bilinear-weight
        # gradients are exercised) and real modulation masks.
        for layer in model.pixel_decoder.deform_layers:
            layer.dcn.offset_conv.weight.normal_(0, 0.02)
            layer.dcn.offset_conv.bias.normal_(0, 0.3)
    reference = copy.deepcopy(model).set_backend("reference")
    assert model.pixel_decoder.deform_layers[0].dcn.backend == "auto"
    assert reference.transformer_decoder.cross_attention_layers[0].backend == "reference"
    images = _images(2, 64, 64, torch.float64)
    out_a, out_r = model(images), reference(images)
    torch.testing.assert_close(out_a["pred_masks"], out_r["pred_masks"], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out_a["pred_logits"], out_r["pred_logits"], rtol=1e-9, atol=1e-11)
    for aux_a, aux_r in zip(out_a["aux_outputs"], out_r["aux_outputs"]):
        torch.testing.assert_close(aux_a["pred_masks"], aux_r["pred_masks"], rtol=1e-9, atol=1e-11)
    _loss(out_a).backward()
    _loss(out_r).backward()
    grads_r = [p.grad for p in reference.parameters()]
    scale = max(g.abs().max().item() for g in grads_r)
    checked = 0
    for (name, p_a), g_r in zip(model.named_parameters(), grads_r):
        assert p_a.grad is not None and g_r is not None, name
        torch.testing.assert_close(p_a.grad, g_r, rtol=1e-7, atol=1e-10 * scale,
                                   msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked == len(list(model.parameters()))
    # The gradients reach the fused ops' parameters.
    assert model.transformer_decoder.cross_attention_layers[5].alpha.grad.abs().sum() > 0
    assert model.pixel_decoder.deform_layers[0].dcn.weight.grad.abs().sum() > 0


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="backend"):
        PEM("stdc1", 19, backend="fast")
    with pytest.raises(ValueError, match="backbone"):
        PEM("r101", 19)
    with pytest.raises(ValueError, match="num_classes"):
        PEMTransformerDecoder(0)
    model = PEM("stdc1", 19)
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("gpu")
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match="images"):
        model(torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8))
    with pytest.raises(TypeError, match="images: dtype torch.float64, expected the model's"):
        model(torch.rand(1, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_queries: expected a positive int, got 0"):
        PEMTransformerDecoder(19, num_queries=0)
    dec = PEMPixelDecoder([64, 256, 512, 1024])
    bad = build_backbone("stdc1")(torch.randn(1, 3, 64, 96))
    bad["res5"] = bad["res5"][..., :1]
    with pytest.raises(ValueError, match="features"):
        dec(bad)
    with pytest.raises(ValueError, match="features"):
        dec(build_backbone("stdc1")(torch.randn(1, 3, 48, 96)))
    with pytest.raises(ValueError, match="in_channels"):
        PEMPixelDecoder([64, 256, 512])


def test_backbone_weights_path_loads_local_file(tmp_path) -> None:
    source = build_backbone("r50")
    path = tmp_path / "r50.pth"
    torch.save(source.state_dict(), path)
    loaded = build_backbone("r50", weights_path=path)
    torch.testing.assert_close(loaded.layer4[2].conv3.weight, source.layer4[2].conv3.weight)
    with pytest.raises(FileNotFoundError, match="weights_path"):
        build_backbone("r50", weights_path=tmp_path / "missing.pth")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises((ValueError, RuntimeError), match="weights_path|size mismatch"):
        build_backbone("r50", weights_path=tmp_path / "bad.pth")
