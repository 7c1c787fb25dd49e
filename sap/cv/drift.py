"""How far fine-tuning moves a network's weights from where it started, block by block (issue 15).

A Swin UNETR's parameters are grouped into blocks by name: ``swinViT.patch_embed`` and
``swinViT.layers1`` … ``swinViT.layers4`` (the Swin transformer, each stage with its patch
merging), the convolutional skip blocks ``encoder1`` … ``encoder4``, ``encoder10``, the decoder
blocks ``decoder1`` … ``decoder5`` and the head ``out``. The change of a set of tensors is the
relative L2 distance ‖θ_end − θ_start‖₂ / ‖θ_start‖₂ over all their values together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def block_of(name: str) -> str:
    """The block of a parameter name: ``swinViT.<part>`` inside the transformer, else the first part."""
    parts = name.removeprefix("module.").split(".")
    return ".".join(parts[:2]) if parts[0] == "swinViT" and len(parts) > 1 else parts[0]


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def relative_change(start: Mapping[str, Any], end: Mapping[str, Any], names: Sequence[str]) -> dict[str, float]:
    """``{"relative", "absolute", "norm_start", "n_values"}`` of the tensors ``names`` taken together.

    ``relative`` = ‖end − start‖₂ / ‖start‖₂ (NaN when the start is all zero); a name missing from
    either mapping or with another shape is an error (the two are not the same network)."""
    diff_sq = norm_sq = 0.0
    n = 0
    for name in names:
        if name not in start or name not in end:
            raise KeyError(f"{name}: not in both weight sets")
        a, b = _as_array(start[name]), _as_array(end[name])
        if a.shape != b.shape:
            raise ValueError(f"{name}: shape {a.shape} at the start, {b.shape} at the end")
        diff_sq += float(np.sum((b - a) ** 2))
        norm_sq += float(np.sum(a**2))
        n += a.size
    absolute = float(np.sqrt(diff_sq))
    return {"relative": absolute / float(np.sqrt(norm_sq)) if norm_sq > 0 else float("nan"),
            "absolute": absolute, "norm_start": float(np.sqrt(norm_sq)), "n_values": n}


def change_by_block(
    start: Mapping[str, Any], end: Mapping[str, Any], encoder_patterns: Sequence[str] = ("swinViT.", "encoder"),
    names: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """:func:`relative_change` per block (:func:`block_of`) and for the groups ``swinViT`` (the
    transformer), ``encoder`` (names starting with one of ``encoder_patterns``: the fine-tuning's
    encoder learning-rate group) and ``decoder`` (the rest, the head ``out`` excluded). ``names``:
    the tensors to compare (default: every name of ``start``)."""
    names = list(start) if names is None else list(names)
    blocks: dict[str, list[str]] = {}
    for name in names:
        blocks.setdefault(block_of(name), []).append(name)
    out = {block: relative_change(start, end, members) for block, members in blocks.items()}
    groups = {
        "swinViT": [n for n in names if n.startswith("swinViT.")],
        "encoder": [n for n in names if any(n.startswith(p) for p in encoder_patterns)],
        "decoder": [n for n in names if not any(n.startswith(p) for p in encoder_patterns)
                    and block_of(n) != "out"],
    }
    for group, members in groups.items():
        if members:
            out[group] = relative_change(start, end, members)
    return out
