"""Make the figures of docs/cohort.md: coronal slices of synthetic exams with lesion outlines.

Usage::

    python docs/make_cohort_figure.py                 # builds the cohorts in a temporary folder
    python docs/make_cohort_figure.py --cohort DIR    # MR figure from an existing cohort only
    python docs/make_cohort_figure.py --seed 0 --anatomy ../shared/data/ct_abdomen_pelvis

``docs/img/cohort_demo.png`` (MR demo cohort): each row shows T1, b1000 (inverted grey scale, as
radiologists read diffusion images) and the T1 with the skeleton labels overlaid, for a healthy exam
and the patient with most lesions. ``docs/img/cohort_ct.png`` (CT): a phantom patient in a bone
window, the same exam as a maximum-intensity projection, and, when ``--anatomy`` points to real CT
with TotalSegmentator labels, a patient simulated on that real anatomy. Lesion outlines are red;
slices are in radiological convention (patient right on the viewer's left).
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


def draw_ct(phantom_cohort: Path, real_cohort: Path | None, out: Path) -> Path:
    """CT figure: phantom patient (bone window, MIP) and optionally a real-anatomy patient."""
    panels = []
    for cohort in [phantom_cohort] + ([real_cohort] if real_cohort is not None else []):
        meta = json.loads((cohort / "cohort.json").read_text())
        case = max((c for c in meta["cases"] if c["group"] == "patients"), key=lambda c: c["n_lesions"])
        folder = cohort / "patients" / case["case_id"]
        ct = read_image(folder / "CT.nii.gz")
        lesions = read_image(folder / "GT.nii.gz").array
        y = _pick_slice(np.zeros(1), lesions)
        aspect = ct.spacing[2] / ct.spacing[0]
        source = "phantom" if meta["anatomy"] == "phantom" else f"real CT {Path(meta['anatomy']).name}"
        panels.append((_coronal(ct.array, y), _coronal(lesions, y), aspect, f"{case['case_id']}, {source}"))
        if meta["anatomy"] == "phantom":
            mip = ct.array.max(axis=1).T[::-1, ::-1]
            panels.append((mip, _coronal(lesions, y) * 0, aspect, f"{case['case_id']}: projection (max)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 5.6), facecolor="black")
    for ax, (image, outline, aspect, title) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.imshow(image, cmap="gray", vmin=-250, vmax=1250, aspect=aspect, interpolation="nearest")
        if outline.any():
            ax.contour(outline, levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(title, color="white", fontsize=7)
        ax.axis("off")
    fig.suptitle("sap synth --modality ct: Hounsfield units, window -250 to 1250", color="white", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out, dpi=80, facecolor="black")
    plt.close(fig)
    return out


def _default_anatomy() -> Path | None:
    candidate = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct_abdomen_pelvis"
    return candidate if candidate.is_dir() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cohort", type=Path, default=None, help="existing cohort folder (default: build a demo cohort in a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img" / "cohort_demo.png", help="PNG to write")
    parser.add_argument("--ct-out", type=Path, default=Path(__file__).parent / "img" / "cohort_ct.png", help="CT PNG to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cohorts built when --cohort is not given")
    parser.add_argument(
        "--anatomy", type=Path, default=_default_anatomy(),
        help="real CT with TotalSegmentator labels for the CT figure's third panel (default: ../shared/data/ct_abdomen_pelvis when present)",
    )
    args = parser.parse_args(argv)
    if args.cohort is not None:
        print(draw(args.cohort, args.out))
        return 0
    import warnings

    from sap.data.synth import make_cohort

    with tempfile.TemporaryDirectory() as tmp:
        cohort = make_cohort(Path(tmp) / "demo", preset="demo", seed=args.seed)
        print(draw(cohort, args.out))
        ct = make_cohort(Path(tmp) / "demo_ct", preset="demo", modality="ct", seed=args.seed)
        real = None
        if args.anatomy is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # one source for many subjects is expected here
                real = make_cohort(Path(tmp) / "real_ct", preset="tiny", modality="ct", anatomy=args.anatomy, seed=args.seed)
        print(draw_ct(ct, real, args.ct_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
