"""Draw docs/img/cohort_difficulty.png: one study-cpu patient without and with the difficulty features.

Usage::

    python docs/make_difficulty_figure.py [--seed 1] [--out docs/img/cohort_difficulty.png]

Columns: b1000 (inverted, as diffusion images are read) and T1, each without the difficulty
features and with all three; the coronal slice holding most lesion voxels of the patient with the
most low-contrast lesions. Outlines: red = full-contrast lesion, orange = low-contrast lesion,
cyan = in-bone mimic (fracture or treated sclerosis; never in GT). Built in memory, no files.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sap.data.synth.cohort import phantom_exam, plan_cohort, synthesize_exam  # noqa: E402
from sap.data.synth.lesions import BONE_MIMIC_KINDS, MIMIC_KINDS  # noqa: E402
from sap.data.synth.presets import Difficulty, get_preset  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "img" / "cohort_difficulty.png"))
    args = parser.parse_args(argv)
    preset = get_preset("study-cpu")
    jobs = [j for j in plan_cohort(preset, "mr", args.seed) if j.group == "patients" and j.lesion_volumes_ml]
    labelled = {j.case_id: phantom_exam(j) for j in jobs[:20]}
    # the patient with the most low-contrast lesions and at least one in-bone mimic
    bone_mimic_values = [1 + MIMIC_KINDS.index(k) for k in BONE_MIMIC_KINDS]
    job = max(jobs[:20], key=lambda j: (np.isin(labelled[j.case_id].mimics, bone_mimic_values).any(),
                                        sum(f.contrast < 1 for f in labelled[j.case_id].lesion_findings)))
    exam_hard = synthesize_exam(job)
    plain_job = dataclasses.replace(job, preset=dataclasses.replace(preset, difficulty=Difficulty()),
                                    mimics=tuple((k, n) for k, n in job.mimics if k not in BONE_MIMIC_KINDS))
    exam_plain = synthesize_exam(plain_job)
    lab = labelled[job.case_id]
    low_ids = [f.label for f in lab.lesion_findings if f.contrast < 1]
    low = np.isin(lab.lesions, low_ids)
    full = (lab.lesions > 0) & ~low
    mimic = np.isin(lab.mimics, bone_mimic_values)
    y = int(np.argmax((lab.lesions > 0).sum(axis=(0, 2)) + 2 * mimic.sum(axis=(0, 2))))

    def coronal(a: np.ndarray) -> np.ndarray:
        return np.flipud(a[:, y, :].T)[:, ::-1]  # superior up, patient right on the viewer's left

    fig, axes = plt.subplots(1, 4, figsize=(11, 6.2))
    panels = [("b1000, no difficulty", exam_plain.images["b1000"], "gray_r", (0, 400)),
              ("b1000, all three features", exam_hard.images["b1000"], "gray_r", (0, 400)),
              ("T1, no difficulty", exam_plain.images["T1"], "gray", (0, 1100)),
              ("T1, all three features", exam_hard.images["T1"], "gray", (0, 1100))]
    aspect = preset.spacing[2] / preset.spacing[0]
    for ax, (title, image, cmap, (lo, hi)) in zip(axes, panels, strict=True):
        ax.imshow(coronal(image.astype(float)), cmap=cmap, vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        hard = "features" in title
        outlines = [(full, "red"), (low, "orange")] + ([(mimic, "cyan")] if hard else [])
        for mask, colour in outlines:
            if mask[:, y, :].any():
                ax.contour(coronal(mask.astype(float)), levels=[0.5], colors=colour, linewidths=0.9)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"sap synth --preset study-cpu --seed {args.seed}, {job.case_id}, coronal slice {y}: red = lesion, "
                 "orange = low-contrast lesion, cyan = in-bone mimic (not a lesion)", fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
