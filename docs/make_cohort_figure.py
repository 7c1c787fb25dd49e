"""Make docs/img/cohort_demo.png: coronal slices of a healthy and a patient exam of the demo cohort.

Usage::

    python docs/make_cohort_figure.py                 # builds a demo cohort in a temporary folder
    python docs/make_cohort_figure.py --cohort DIR    # uses an existing cohort
    python docs/make_cohort_figure.py --out docs/img/cohort_demo.png --seed 0

Each row shows T1, b1000 (inverted grey scale, as radiologists read diffusion images) and the T1
with the skeleton labels overlaid; lesion outlines are drawn in red on every panel. Slices are
shown in radiological convention (patient right on the viewer's left).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from sap.data.io import read_image  # noqa: E402
from sap.data.labels import SKELETON_CLASSES  # noqa: E402

REGION_COLOURS = [
    (0, 0, 0, 0), "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
]


def _coronal(volume: np.ndarray, y: int) -> np.ndarray:
    """Canonical (R, A, S) volume → coronal slice with S up and patient right on the left."""
    return volume[:, y, :].T[::-1, ::-1]


def _pick_slice(skeleton: np.ndarray, lesions: np.ndarray | None) -> int:
    """The coronal slice with most lesion voxels, else the one through most lumbar spine voxels."""
    if lesions is not None and lesions.any():
        return int(np.argmax(lesions.sum(axis=(0, 2))))
    return int(np.argmax((skeleton == 3).sum(axis=(0, 2))))


def draw(cohort: Path, out: Path) -> Path:
    meta = json.loads((cohort / "cohort.json").read_text())
    healthy = next(c for c in meta["cases"] if c["group"] == "healthy")
    patient = max((c for c in meta["cases"] if c["group"] == "patients"), key=lambda c: c["n_lesions"])
    fig, axes = plt.subplots(2, 3, figsize=(8.4, 9.6), facecolor="black")
    for row, case in enumerate((healthy, patient)):
        folder = cohort / case["group"] / case["case_id"]
        t1 = read_image(folder / "T1.nii.gz")
        dwi = read_image(folder / "b1000.nii.gz").array
        skeleton = read_image(folder / "skeleton.nii.gz").array
        lesions = read_image(folder / "GT.nii.gz").array if (folder / "GT.nii.gz").exists() else None
        y = _pick_slice(skeleton, lesions)
        sx, _, sz = t1.spacing
        aspect = sz / sx
        panels = [
            (_coronal(t1.array, y), "gray", "T1"),
            (_coronal(dwi, y), "gray_r", "b1000 (inverted)"),
            (_coronal(t1.array, y), "gray", "T1 + skeleton labels"),
        ]
        for col, (image, cmap, title) in enumerate(panels):
            ax = axes[row, col]
            hi = np.percentile(image, 99.5)
            ax.imshow(image, cmap=cmap, vmin=0, vmax=hi, aspect=aspect, interpolation="nearest")
            if col == 2:
                labels = _coronal(skeleton, y)
                ax.imshow(np.ma.masked_equal(labels, 0), cmap=ListedColormap(REGION_COLOURS[1:]), vmin=1, vmax=9, alpha=0.55, aspect=aspect, interpolation="nearest")
            if lesions is not None and lesions.any():
                ax.contour(_coronal(lesions, y), levels=[0.5], colors="red", linewidths=1.0)
            ax.set_title(f"{case['case_id']}: {title}", color="white", fontsize=8)
            ax.axis("off")
    handles = [Patch(color=REGION_COLOURS[i], label=SKELETON_CLASSES[i].replace("_", " ")) for i in range(1, 10)]
    handles.append(Patch(edgecolor="red", facecolor="none", label="lesion outline"))
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False, labelcolor="white")
    fig.suptitle(f"sap synth --preset {meta['preset']} --seed {meta['seed']}: coronal slices", color="white", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor="black")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cohort", type=Path, default=None, help="existing cohort folder (default: build a demo cohort in a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img" / "cohort_demo.png", help="PNG to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo cohort built when --cohort is not given")
    args = parser.parse_args(argv)
    if args.cohort is not None:
        print(draw(args.cohort, args.out))
        return 0
    from sap.data.synth import make_cohort

    with tempfile.TemporaryDirectory() as tmp:
        cohort = make_cohort(Path(tmp) / "demo", preset="demo", seed=args.seed)
        print(draw(cohort, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
