"""t-SNE features of the pretrained encoders (SPEC §10, paper Fig. 3).

Feature of a patch = global mean of the Swin ViT stage-4 output (16 × feature_size values),
computed with the pretrained weights **before** fine-tuning, for SSL and SAP, on patches centred
on lesion centroids and on as many random negative patches (no lesion voxel inside), at most
``MAX_PATCHES`` of each. The same patches go through both encoders. Stored in
``RUN/features/{ssl,sap}.npz`` (``features`` (n, 16·feature_size), ``label`` (n,) 1 = lesion,
``case`` (n,)); the t-SNE itself runs in the report.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from sap.cv.rundir import mark_done, read_marker
from sap.files import atomic_write

#: at most this many lesion patches and as many negatives per model (SPEC §10 demo budget)
MAX_PATCHES = 24
ENCODERS = {"ssl": ("ssl", "ssl"), "sap": ("skeletal", "sap")}  # method → (pretrain stage, load part)


def select_patches(cached: list[Any], patch: tuple[int, int, int], seed: int,
                   max_patches: int = MAX_PATCHES) -> list[tuple[int, np.ndarray, int]]:
    """(case index, patch start, label) for lesion-centred and random negative patches.

    Lesions: centroid of each connected component (random subset of ``max_patches``).
    Negatives: random body voxels whose patch holds no lesion voxel (as many as lesions).
    """
    import cc3d

    from sap.sampling.patches import start_around

    rng = np.random.default_rng(seed)
    lesions = []
    for index, case in enumerate(cached):
        if case.lesions is None:
            continue
        labels, n = cc3d.connected_components(np.asarray(case.lesions) > 0, connectivity=26, return_N=True)
        if n == 0:
            continue
        centroids = cc3d.statistics(labels)["centroids"][1:]  # one pass for all lesions
        for centre in centroids:
            lesions.append((index, np.round(centre).astype(np.int64)))
    if len(lesions) > max_patches:
        lesions = [lesions[i] for i in sorted(rng.choice(len(lesions), max_patches, replace=False))]
    out = [(i, start_around(c, cached[i].shape, patch), 1) for i, c in lesions]
    size = np.asarray(patch)
    tries = 0
    negatives = 0
    while negatives < len(lesions) and tries < 200 * max(1, len(lesions)):
        tries += 1
        index = int(rng.integers(len(cached)))
        case = cached[index]
        body = np.flatnonzero(np.asarray(case.body).reshape(-1))
        if body.size == 0:
            continue
        centre = np.array(np.unravel_index(int(body[rng.integers(body.size)]), case.shape))
        start = start_around(centre, case.shape, patch)
        lo, hi = np.maximum(start, 0), np.minimum(start + size, case.shape)
        if case.lesions is not None and np.asarray(case.lesions)[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].any():
            continue
        out.append((index, start, 0))
        negatives += 1
    return out


def encoder_patch_features(model: Any, cached: list[Any], patches: list, patch: tuple[int, int, int],
                           batch_size: int = 4) -> np.ndarray:
    """(n, 16·feature_size) stage-4 global means of ``patches`` (CPU or GPU, no gradients)."""
    import torch

    from sap.models.engine import default_device
    from sap.models.swin import encoder_features
    from sap.sampling.patches import read_patch

    device = default_device()
    model = model.to(device).eval()
    feats = []
    with torch.no_grad():
        for first in range(0, len(patches), batch_size):
            batch = np.stack([read_patch(cached[index].image, start, patch).astype(np.float32)
                              for index, start, _ in patches[first : first + batch_size]])
            feats.append(encoder_features(model, torch.from_numpy(batch).to(device)).cpu().numpy())
    return np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, 0), np.float32)


def compute_features(study: Any, max_patches: int = MAX_PATCHES) -> dict[str, Path]:
    """Write ``RUN/features/{ssl,sap}.npz`` once per config (skipped when already there)."""
    from sap.cv.rundir import pretrain_hash
    from sap.data.cache import load_cached
    from sap.models.swin import build_swin_unetr
    from sap.models.weights import load_weights

    cfg = study.cfg
    folder = study.run.features
    config_hash = pretrain_hash(cfg, "ssl") + pretrain_hash(cfg, "skeletal")
    marker = read_marker(folder, "features")
    paths = {m: folder / f"{m}.npz" for m in ENCODERS}
    if marker is not None and marker.get("config_hash") == config_hash and all(p.is_file() for p in paths.values()):
        return paths
    t0 = time.perf_counter()
    cached = [load_cached(case, cfg.data) for case in study.cohort.patients]
    patch = tuple(int(p) for p in cfg.model.patch_size)
    patches = select_patches(cached, patch, cfg.cv.seed, max_patches)
    labels = np.array([p[2] for p in patches], dtype=np.int8)
    cases = np.array([cached[p[0]].case_id for p in patches])
    folder.mkdir(parents=True, exist_ok=True)
    for method, (stage, part) in ENCODERS.items():
        checkpoint = study.pretrained_checkpoint(stage)
        model = build_swin_unetr(cfg.model, in_channels=len(cfg.data.channels), out_channels=2)
        load_weights(model, checkpoint, expect=part, verbose=False)
        feats = encoder_patch_features(model, cached, patches, patch)
        arrays = {"features": feats, "label": labels, "case": cases, "checkpoint": str(checkpoint)}
        atomic_write(paths[method], partial(np.savez, **arrays), suffix=".tmp.npz")
    mark_done(folder, "features", config_hash, time.perf_counter() - t0, n_lesion=int(labels.sum()),
              n_negative=int((labels == 0).sum()))
    return paths
