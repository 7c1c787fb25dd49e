"""Benchmarks of sap.slice2d (SPEC §12 style: median of >= 3 runs, the peer in the same run).

Part ``prompts`` (CPU): prompt primitives of every class in every bone-holding axial slice of the
real ``ct_abdomen_pelvis`` case (TotalSegmentator labels → SAP skeleton). sap computes each
component's primitives on a crop around it; the peer is the literal full-slice implementation
(erosion, dilations and distance transform on the whole slice per component, as the definitions
read). Both draw from identically seeded generators and must give identical primitives (checked).

Part ``sam``: seconds per slice of the 32 strategies with SAM ViT-B (the ``transformers`` default
``SamConfig``, 1024² input; random weights: timing does not depend on the weights). sap embeds
each slice once and reuses it for every strategy and class; the peer is the plain
``transformers`` call ``model(pixel_values=…, prompts…)`` per (strategy, class), which re-runs
the image encoder each time.

    python benchmarks/bench_slice2d.py --part prompts --runs 3
    python benchmarks/bench_slice2d.py --part sam --runs 3 --slices 4   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from sap.slice2d import prompts as P
from sap.slice2d.data import bone_window, volume_to_slices

SLICES_FILE: Path | None = None  #: --slices-file: the real slices as .npz (machines without SimpleITK)


def shared_data() -> Path:
    repo = Path(__file__).resolve().parents[1]
    for c in (os.environ.get("SAP_SHARED_DATA"), repo.parent / "shared" / "data", repo / "shared" / "data"):
        if c and (Path(c) / "README.md").is_file():
            return Path(c)
    sys.exit("shared data not found (SAP_SHARED_DATA)")


def real_slices() -> tuple[np.ndarray, np.ndarray]:
    """Bone-window slices and skeleton label slices of ``ct_abdomen_pelvis`` that hold bone."""
    if SLICES_FILE is not None and SLICES_FILE.is_file():
        data = np.load(SLICES_FILE)
        return data["images"], data["labels"]
    from sap.data.io import read_image
    from sap.data.labels import convert_totalseg, default_class_map

    folder = shared_data() / "ct_abdomen_pelvis"
    ct = read_image(folder / "ct.nii.gz")
    labels = read_image(folder / "labels_totalseg.nii.gz")
    skeleton = convert_totalseg(labels.array, default_class_map()["total"], source=str(folder))
    images = volume_to_slices(bone_window(ct.array))
    label_slices = volume_to_slices(skeleton)
    keep = label_slices.reshape(len(label_slices), -1).any(axis=1)
    return images[keep], label_slices[keep]


def full_slice_primitives(class_mask: np.ndarray, rng: np.random.Generator) -> list[P.ComponentPrimitives]:
    """Peer: the definitions applied literally on the whole slice for each component."""
    labels, kept = P.kept_components(class_mask)
    out = []
    for label, area in kept[:5]:
        comp = labels == label
        center = P.edt_center(comp, rng)
        positives = P.sample_points(P.positive_region(comp), P.MAX_POSITIVES, rng)
        inner = ndimage.binary_dilation(comp, structure=np.ones((5, 5), bool))
        outer = ndimage.binary_dilation(inner, structure=np.ones((15, 15), bool))
        negatives = P.sample_points(outer & ~inner & ~class_mask, P.MAX_NEGATIVES, rng)
        out.append(P.ComponentPrimitives(label, area, P.tight_box(comp), center, P.centroid(comp), positives, negatives))
    return out


def run_prompts(label_slices: np.ndarray, fn) -> tuple[float, list]:
    start = time.perf_counter()
    results = []
    for k, labels in enumerate(label_slices):
        for cls in np.unique(labels):
            if cls:
                results.append(fn(labels == cls, P.slice_rng(0, k, int(cls))))
    return time.perf_counter() - start, results


def same(a: list, b: list) -> bool:
    for xs, ys in zip(a, b, strict=True):
        for x, y in zip(xs, ys, strict=True):
            if (x.box, x.center, x.area) != (y.box, y.center, y.area) or not np.allclose(x.centroid, y.centroid):
                return False
            if not (np.array_equal(x.positives, y.positives) and np.array_equal(x.negatives, y.negatives)):
                return False
    return True


def bench_prompts(runs: int) -> None:
    _, label_slices = real_slices()
    n_pairs = sum(len(np.unique(s)) - 1 for s in label_slices)
    ours, peer = [], []
    for _ in range(runs):
        t_ours, r_ours = run_prompts(label_slices, lambda m, rng: P.class_primitives(m, rng))
        t_peer, r_peer = run_prompts(label_slices, full_slice_primitives)
        assert same(r_ours, r_peer), "crop and full-slice primitives differ"
        ours.append(t_ours)
        peer.append(t_peer)
    print(f"prompts: {len(label_slices)} slices of {label_slices.shape[1]}x{label_slices.shape[2]}, "
          f"{n_pairs} (slice, class) pairs; identical primitives: yes")
    for name, times in (("sap (crop per component)", ours), ("peer (full slice per component)", peer)):
        print(f"| {name} | {statistics.median(times) * 1000 / n_pairs:.3f} ms per (slice, class) | "
              f"runs (s): {', '.join(f'{t:.3f}' for t in times)} |")


def bench_sam(runs: int, n_slices: int, device: str) -> None:
    import torch
    from transformers import SamConfig, SamModel

    from sap.slice2d.sam import SamPrompter

    torch.manual_seed(0)
    model = SamModel(SamConfig()).to(device).eval()
    prompter = SamPrompter(model, "sam", device)
    images, label_slices = real_slices()
    order = np.argsort([-len(np.unique(s)) for s in label_slices], kind="stable")[:n_slices]
    # upsample the 3 mm slices to a CT-like 512 px so preprocessing does its real work
    from scipy.ndimage import zoom

    images = [zoom(images[k], 512 / max(images[k].shape), order=1) for k in order]
    labels = [zoom(label_slices[k], 512 / max(label_slices[k].shape), order=0) for k in order]
    strategies = list(P.STRATEGIES)

    def prompts_of(lab):
        per_class = {}
        for cls in np.unique(lab):
            if cls:
                prims = P.class_primitives(lab == cls, P.slice_rng(0, 0, int(cls)))
                per_class[int(cls)] = {s: P.prompts_for_strategy(prims, s) for s in strategies}
        return per_class

    all_prompts = [prompts_of(lab) for lab in labels]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def ours_once() -> float:
        sync()
        start = time.perf_counter()
        for image, per_class in zip(images, all_prompts, strict=True):
            emb = prompter.embed(image)
            for by_strategy in per_class.values():
                for prompts in by_strategy.values():
                    if prompts:
                        prompter.predict(emb, prompts)
        sync()
        return time.perf_counter() - start

    @torch.no_grad()
    def peer_once() -> float:
        sync()
        start = time.perf_counter()
        for image, per_class in zip(images, all_prompts, strict=True):
            pixels, _, _ = prompter.preprocess(image)
            emb_like = prompter.embed(image)  # only for the prompt geometry
            for by_strategy in per_class.values():
                for prompts in by_strategy.values():
                    if prompts:
                        tensors = prompter._prompt_tensors(emb_like, prompts)
                        model(pixel_values=pixels, multimask_output=False, **tensors)
        sync()
        return time.perf_counter() - start

    ours_once()  # warm-up (CUDA kernels, allocator)
    ours = [ours_once() for _ in range(runs)]
    peer = [peer_once() for _ in range(max(1, runs))]
    n_calls = sum(len(pc) for pc in all_prompts)
    print(f"sam: SAM ViT-B (random weights), {len(images)} slices at 512 px, {n_calls} (slice, class) pairs x 32 strategies, "
          f"device {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else platform.processor()})")
    for name, times in (("sap: one embedding per slice", ours), ("peer: transformers call per (strategy, class)", peer)):
        per_slice_all = statistics.median(times) / len(images)
        print(f"| {name} | {per_slice_all:.3f} s per slice for all 32 strategies | "
              f"{per_slice_all / 32:.4f} s per slice per strategy | runs (s): {', '.join(f'{t:.2f}' for t in times)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("prompts", "sam", "all"), default="prompts")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=4, help="slices for the SAM part")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--slices-file", type=Path, default=None,
                        help="read the real slices from this .npz (written by --save-slices) instead of the NIfTI files")
    parser.add_argument("--save-slices", type=Path, default=None, help="write the real slices to this .npz and exit")
    args = parser.parse_args()
    global SLICES_FILE
    SLICES_FILE = args.slices_file
    if args.save_slices:
        images, labels = real_slices()
        np.savez_compressed(args.save_slices, images=images, labels=labels)
        return
    if args.part in ("prompts", "all"):
        bench_prompts(args.runs)
    if args.part in ("sam", "all"):
        import torch

        bench_sam(args.runs, args.slices, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


if __name__ == "__main__":
    main()
