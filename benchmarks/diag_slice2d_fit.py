"""Where the 2D U-Net's per-slice Dice is lost: training against validation slices, by lesion size.

Trains ``sap slice2d``'s U-Net (:func:`sap.slice2d.train.fit`, the config's recipe) for ``--steps``
steps on a CT cohort, then scores the training slices and the validation slices with the same
function as ``bench_slice2d_learning.py`` (per-slice Dice of SPEC §11, pooled Dice, the lesion
slices' own mean, lesion-free slices with a false positive) and splits the lesion slices' Dice by
their ground-truth pixel count (≤ 3, 4–10, > 10 pixels) and by the CT lesion kind of the slice
(lytic, blastic, mixed; from cohort.json). A model that scores its training slices
no better than its validation slices is not over-fitting; one whose small slices score 0 is
limited by them.

    sap synth --preset demo --modality ct --out /tmp/ct_demo
    OMP_NUM_THREADS=1 python benchmarks/diag_slice2d_fit.py --data /tmp/ct_demo --steps 750
    python benchmarks/diag_slice2d_fit.py --data /tmp/ct_demo --figure docs/img/slice2d_ct_lesions.png

``--figure`` draws, instead of training, the largest axial cross-section of lytic and blastic
lesions of the cohort in the bone window with the ground-truth outline (what the 2D model sees).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

SIZE_BINS = (("<=3", 0, 3), ("4-10", 4, 10), (">10", 11, None))


def lesion_pixel_bins(masks: list[np.ndarray]) -> dict[str, float]:
    """Slice counts: all, with lesion, and per lesion-pixel bin; the median lesion pixels a slice."""
    pixels = np.array([int(m.sum()) for m in masks])
    lesion = pixels[pixels > 0]
    bins = [size_bin(int(n)) for n in lesion]
    counts = {name: bins.count(name) for name, _, _ in SIZE_BINS}
    return {"slices": int(pixels.size), "lesion_slices": int(lesion.size), "median_pixels": float(np.median(lesion)) if lesion.size else 0.0, **counts}


def lesion_slice_dice(probs: list[np.ndarray], masks: list[np.ndarray], threshold: float) -> dict[int, float]:
    """Dice of each slice holding lesion (SPEC §11's :func:`sap.slice2d.metrics.score_slice`), by index."""
    from sap.slice2d.metrics import score_slice

    return {i: score_slice(p >= threshold, m > 0, distances=False).dice
            for i, (p, m) in enumerate(zip(probs, masks, strict=True)) if m.any()}


def mean_by_group(dice: dict[int, float], group_of: dict[int, str], names: tuple[str, ...]) -> dict[str, str]:
    """Mean Dice of the lesion slices in each group, with their count."""
    out = {}
    for name in names:
        values = [d for i, d in dice.items() if group_of[i] == name]
        if values:
            out[name] = f"{np.mean(values):.3f} ({len(values)} slices)"
    return out


def size_bin(pixels: int) -> str:
    return next(name for name, lo, hi in SIZE_BINS if pixels >= lo and (hi is None or pixels <= hi))


def labelled_lesions(root: Path, case: dict) -> tuple[np.ndarray, dict[int, dict]]:
    """A patient's GT as 3D components and each component's cohort.json lesion record (the GT
    masks are binary, so components are matched to lesions by voxel count)."""
    import cc3d

    from sap.data.io import read_image

    gt = read_image(root / "patients" / case["case_id"] / "GT.nii.gz").array
    components = cc3d.connected_components(gt > 0, connectivity=26)
    by_size = {lesion["n_voxels"]: lesion for lesion in case["lesions"]}
    counts = np.bincount(components.ravel())
    return components, {label: by_size[int(n)] for label, n in enumerate(counts) if label and int(n) in by_size}


def lesion_kinds(root: Path, slices) -> list[str]:
    """The CT lesion kind of each slice's lesion pixels (lytic, blastic, mixed; '' without lesion)."""
    from sap.slice2d.data import volume_to_slices

    cohort = {c["case_id"]: c for c in json.loads((root / "cohort.json").read_text())["cases"]}
    kind_stacks: dict[str, np.ndarray] = {}
    out = []
    for case_id, index, mask in zip(slices.case_ids, slices.slice_index, slices.masks, strict=True):
        if not mask.any():
            out.append("")
            continue
        if case_id not in kind_stacks:
            components, lesions = labelled_lesions(root, cohort[case_id])
            code = np.zeros(int(components.max()) + 1, np.uint8)  # 1 lytic, 2 blastic
            for label, lesion in lesions.items():
                code[label] = {"lytic": 1, "blastic": 2}.get(lesion["kind"], 0)
            kind_stacks[case_id] = volume_to_slices(code[components])
        present = set(np.unique(kind_stacks[case_id][index][mask > 0]).tolist()) - {0}
        out.append({frozenset({1}): "lytic", frozenset({2}): "blastic"}.get(frozenset(present), "mixed"))
    return out


def lesion_figure(root: Path, out: Path, per_kind: int = 6) -> None:
    """Crops (20 × 20 pixels) through the largest cross-section of the first lesions of each kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sap.data.io import read_image
    from sap.slice2d.data import bone_window, to_display

    cohort = json.loads((root / "cohort.json").read_text())
    crops: dict[str, list] = {"lytic": [], "blastic": []}
    for case in cohort["cases"]:
        if case["group"] != "patients" or not case["lesions"]:
            continue
        hu = read_image(root / "patients" / case["case_id"] / "CT.nii.gz").array
        components, lesions = labelled_lesions(root, case)
        for label, lesion in lesions.items():
            if len(crops[lesion["kind"]]) >= per_kind:
                continue
            z = int(np.argmax((components == label).sum(axis=(0, 1))))
            image, outline = to_display(hu[:, :, z]), to_display(components[:, :, z] == label)
            rows, cols = np.nonzero(outline)
            r, c = max(int(rows.mean()) - 10, 0), max(int(cols.mean()) - 10, 0)
            window = (slice(r, r + 20), slice(c, c + 20))
            title = f"{case['case_id']} {lesion['region']}\n{lesion['volume_ml']:.1f} mL, mean {image[outline].mean():.0f} HU"
            crops[lesion["kind"]].append((bone_window(image[window]), outline[window], title))
    fig, axes = plt.subplots(2, per_kind, figsize=(2.2 * per_kind, 5.2))
    for row, kind in enumerate(("lytic", "blastic")):
        for col, ax in enumerate(axes[row]):
            ax.axis("off")
            if col < len(crops[kind]):
                image, outline, title = crops[kind][col]
                ax.imshow(image, cmap="gray", vmin=0, vmax=1)
                ax.contour(outline, levels=[0.5], colors="red", linewidths=0.8)
                ax.set_title(f"{kind}: {title}", fontsize=7)
    meta = f"{cohort['preset']} CT cohort, seed {cohort['seed']}, {cohort['voxel_size_mm'][1]:g} × {cohort['voxel_size_mm'][0]:g} mm pixels"
    fig.suptitle(f"What the 2D U-Net sees: lesions in the bone window (level 400, width 1800 HU), red = GT ({meta})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CT cohort (sap synth --modality ct)")
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--steps", type=int, default=750)
    parser.add_argument("--figure", type=Path, default=None, help="draw lesion crops to this PNG instead of training")
    args = parser.parse_args(argv)
    if args.figure is not None:
        lesion_figure(Path(args.data), args.figure)
        return

    import torch

    import sap.slice2d.train as T
    from sap.config import load_config

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_slice2d_learning import scores

    torch.set_num_threads(1)
    cfg = load_config(args.config, args.set)
    cfg.data.root = args.data
    train, val, ids = T.load_slice_sets(cfg, "lesions", progress=False)
    print(json.dumps({"validation patients": ids["val"], "train": lesion_pixel_bins(train.masks), "val": lesion_pixel_bins(val.masks)}))
    settings = replace(cfg.slice2d, max_steps=args.steps, val_every_steps=args.steps)
    torch.manual_seed(settings.seed)
    model, spec = T.create_model("unet", settings)

    def score_both(net, kind, val_set, size, threshold, device) -> dict:
        result = {}
        for name, slices in (("train", train), ("val", val)):
            probs = T.predict_slices(net, kind, slices.images, size, device=device)
            dice = lesion_slice_dice(probs, slices.masks, threshold)
            sizes = {i: size_bin(int(np.count_nonzero(slices.masks[i]))) for i in dice}
            kinds = dict(enumerate(lesion_kinds(Path(args.data), slices)))
            result[name] = {
                **scores(probs, slices.masks, threshold),
                "dice_by_lesion_pixels": mean_by_group(dice, sizes, tuple(n for n, _, _ in SIZE_BINS)),
                "dice_by_kind": mean_by_group(dice, kinds, ("lytic", "blastic", "mixed")),
            }
        print(json.dumps({"step": args.steps, **result}), flush=True)
        return {"dice": result["val"]["dice"], "iou": float("nan"), "dice_pooled": result["val"]["dice_pooled"]}

    T.validate = score_both  # the fit loop calls it at its last step
    started = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        T.fit(model, spec, train, val, settings, Path(tmp), "lesions", progress=False)
    print(json.dumps({"cpu_s_with_scoring": round(time.process_time() - started, 1)}))


if __name__ == "__main__":
    main()
