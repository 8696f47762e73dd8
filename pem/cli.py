"""Argument checks and output shared by the pem commands (``pem.train``, ``pem.evaluate``,
``pem.segment``): a bad value is a usage message naming the option, not a traceback from deep
inside, and JSON output stays strict JSON."""

from __future__ import annotations

import argparse
import json
import math

import torch

__all__ = ["DEVICES", "check_device", "check_ints", "device_text", "dumps", "strict_json"]

DEVICES = ("cpu", "cuda")


def device_text(text: str) -> str:
    """argparse type of a ``--device`` (the evaluation commands', the benchmarks'): ``cpu``,
    ``cuda`` or ``cuda:N``."""
    try:
        device_type = torch.device(text).type
    except RuntimeError:
        device_type = None
    if device_type not in DEVICES:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def check_ints(
    parser: argparse.ArgumentParser, args: argparse.Namespace, least: dict[str, int]
) -> None:
    """``parser.error`` unless every option ``name`` in ``least`` is None (unset) or >= its
    bound."""
    for name, bound in least.items():
        value = getattr(args, name)
        if value is not None and value < bound:
            parser.error(f"--{name.replace('_', '-')}: expected an int >= {bound}, got {value}")


def check_device(parser: argparse.ArgumentParser, device: str | None) -> None:
    """``parser.error`` for ``--device cuda`` (or ``cuda:N``) on a machine without a CUDA device."""
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device: {device!r} was requested but no CUDA device is available")


def strict_json(value: object) -> object:
    """``value`` with every NaN or infinite float replaced by None (JSON null): Python's json
    writes them as bare NaN/Infinity, which strict JSON parsers reject."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def dumps(value: object, **kwargs) -> str:
    """``json.dumps`` of :func:`strict_json` ``(value)``, refusing anything non-finite left."""
    return json.dumps(strict_json(value), allow_nan=False, **kwargs)
