"""Parameter counts of PEM per part: ``python -m pem.params [--backbone r50] [--num-classes 19]``.

Prints the backbone, pixel decoder, transformer decoder (with its per-layer PEM-CA /
self-attention / FFN counts) and total, to compare against the official architecture
(facts section 9: R50 total 35.53M for K=19, 35.57M for K=150).
"""

from __future__ import annotations

import argparse

from torch import nn

from pem.backbones import BACKBONES
from pem.model import PEM

__all__ = ["count_parameters", "parameter_table", "main"]


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``; buffers are not counted."""
    return sum(p.numel() for p in module.parameters())


def parameter_table(model: PEM) -> dict[str, int]:
    """Per-part counts of ``model``: backbone, pixel_decoder, transformer_decoder, the first
    decoder layer's pem_ca / self_attention / ffn, and total."""
    dec = model.transformer_decoder
    return {
        "backbone": count_parameters(model.backbone),
        "pixel_decoder": count_parameters(model.pixel_decoder),
        "transformer_decoder": count_parameters(dec),
        "per_layer_pem_ca": count_parameters(dec.cross_attention_layers[0]),
        "per_layer_self_attention": count_parameters(dec.self_attention_layers[0]),
        "per_layer_ffn": count_parameters(dec.ffn_layers[0]),
        "total": count_parameters(model),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="r50", choices=BACKBONES)
    parser.add_argument("--num-classes", type=int, default=19)
    args = parser.parse_args(argv)
    if args.num_classes < 1:
        parser.error(f"--num-classes: expected a positive int, got {args.num_classes}")
    table = parameter_table(PEM(args.backbone, args.num_classes, backend="reference"))
    print(f"PEM {args.backbone}, K={args.num_classes}")
    for name, n in table.items():
        print(f"{name:<26}{n:>12,d}{n / 1e6:>10.2f}M")


if __name__ == "__main__":
    main()
