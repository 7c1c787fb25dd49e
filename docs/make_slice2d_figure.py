"""Figure of docs/slice2d_prompts.md: the prompts of three zero-shot strategies on a real CT slice.

    python docs/make_slice2d_figure.py [--data ../shared/data] [--checkpoint SAM_DIR] [--out docs/img/slice2d_prompts.png]

The slice comes from ``ct_abdomen_pelvis`` (TotalSegmentator labels converted to the SAP skeleton
scheme by ``sap.data.labels``). Boxes and points are computed by ``sap.slice2d.prompts`` exactly as
``sap slice2d prompt-bench`` computes them. Masks are drawn from the SAM/MedSAM weights of
``--checkpoint`` (a local transformers folder); without one, a randomly initialised small SAM
draws them and every panel says "random weights, not a result".
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from sap.data.io import read_image  # noqa: E402
from sap.data.labels import SKELETON_CLASSES, convert_totalseg, default_class_map  # noqa: E402
from sap.slice2d.data import bone_window, volume_to_slices  # noqa: E402
from sap.slice2d.prompts import class_primitives, prompts_for_strategy, slice_rng  # noqa: E402

STRATEGIES = ("box_5C", "box+center_5C", "pos5+neg5_5C")
COLOURS = {3: "#1f77b4", 4: "#ff7f0e", 5: "#2ca02c"}  # lumbar spine, pelvis, femurs


def default_data() -> Path:
    repo = Path(__file__).resolve().parents[1]
    for candidate in (os.environ.get("SAP_SHARED_DATA"), repo.parent / "shared" / "data", repo / "shared" / "data"):
        if candidate and (Path(candidate) / "README.md").is_file():
            return Path(candidate)
    sys.exit("real data not found: pass --data (the shared data folder)")


def random_sam():
    """A small randomly initialised SAM (the same classes as the real model)."""
    import torch
    from transformers import SamConfig, SamModel
    from transformers.models.sam.configuration_sam import (
        SamMaskDecoderConfig,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    torch.manual_seed(0)
    vision = SamVisionConfig(hidden_size=64, output_channels=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=256, patch_size=16, window_size=4, global_attn_indexes=[1], num_pos_feats=32)
    prompt = SamPromptEncoderConfig(hidden_size=64, image_size=256, patch_size=16, mask_input_channels=8)
    decoder = SamMaskDecoderConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_dim=128)
    return SamModel(SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                              mask_decoder_config=decoder.to_dict()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="shared data folder (default: ../shared/data)")
    parser.add_argument("--checkpoint", default=None, help="local transformers SAM/MedSAM folder for real masks")
    parser.add_argument("--family", choices=("sam", "medsam"), default="sam")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "img" / "slice2d_prompts.png")
    args = parser.parse_args()

    from sap.slice2d.models import load_hf_model
    from sap.slice2d.sam import SamPrompter

    folder = (args.data or default_data()) / "ct_abdomen_pelvis"
    ct = read_image(folder / "ct.nii.gz")
    labels = read_image(folder / "labels_totalseg.nii.gz")
    skeleton = convert_totalseg(labels.array, default_class_map()["total"], source=str(folder))
    label_slices = volume_to_slices(skeleton)
    # the slice with the most of the three regions, then the most bone
    n_regions = np.array([sum((s == c).any() for c in COLOURS) for s in label_slices])
    k = int(np.argmax(n_regions * 10**6 + (label_slices > 0).sum(axis=(1, 2))))
    image = volume_to_slices(bone_window(ct.array))[k]
    truth = label_slices[k]

    model = load_hf_model(args.checkpoint, "sam") if args.checkpoint else random_sam()
    prompter = SamPrompter(model, args.family)
    emb = prompter.embed(image)  # one embedding for every strategy and class
    real = args.checkpoint is not None

    # Without user weights the strategy panels show prompts only; one extra panel shows what a
    # randomly initialised SAM returns, so the pipeline is visible and nobody mistakes it for a result.
    panels = list(STRATEGIES) + ([] if real else ["random"])
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
    for ax, strategy in zip(axes, panels, strict=True):
        if strategy == "random":
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            for cls, colour in COLOURS.items():
                prompts = prompts_for_strategy(class_primitives(truth == cls, slice_rng(0, k, cls)), "box+center_5C")
                predicted = prompter.predict(emb, prompts)
                ax.contour(predicted, levels=[0.5], colors=[colour], linewidths=0.8)
            ax.set_title("SAM masks for box+center_5C\nrandom weights, not a result", fontsize=10, color="#b00000")
            ax.set_axis_off()
            continue
        ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        for cls, colour in COLOURS.items():
            mask_ref = truth == cls
            ax.contour(mask_ref, levels=[0.5], colors=[colour], linewidths=0.8)
            prims = class_primitives(mask_ref, slice_rng(0, k, cls))
            prompts = prompts_for_strategy(prims, strategy)
            if real:
                predicted = prompter.predict(emb, prompts)
                ax.imshow(np.ma.masked_where(~predicted, predicted), cmap=matplotlib.colors.ListedColormap([colour]),
                          alpha=0.35, interpolation="nearest")
            for q in prompts:
                if q.box is not None:
                    r0, c0, r1, c1 = q.box
                    ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False,
                                           edgecolor=colour, linewidth=1.2))
                pos, neg = q.points[q.labels == 1], q.points[q.labels == 0]
                ax.scatter(pos[:, 1], pos[:, 0], marker="+", s=40, c="#00ff66", linewidths=1.3)
                ax.scatter(neg[:, 1], neg[:, 0], marker="x", s=28, c="#ff3333", linewidths=1.2)
        ax.set_title(f"{strategy}: prompts" + (" and SAM masks" if real else ""), fontsize=10)
        ax.set_axis_off()
    names = ", ".join(f"{SKELETON_CLASSES[c]} ({COLOURS[c]})" for c in COLOURS if (truth == c).any())
    source = f"filled = SAM masks ({args.checkpoint})" if real else "no SAM weights given: masks only in the last panel (random weights, not a result)"
    fig.suptitle(
        f"ct_abdomen_pelvis, axial slice {k} (bone window 400/1800 HU); classes: {names}\n"
        f"+ positive point, x negative point, rectangle box, contours = reference; {source}",
        fontsize=8.5,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # a 256-colour palette keeps the PNG small (the docs budget is 200 kB per image)
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    Image.open(buffer).convert("RGB").quantize(colors=256).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} kB)")


if __name__ == "__main__":
    main()
