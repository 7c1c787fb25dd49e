"""What did pretraining give, and how much of it did fine-tuning keep? (issue 15)

For a study run folder RUN, for every network method and test fold: how far fine-tuning moved
the weights from where they started, per block of the Swin UNETR (:mod:`sap.cv.drift`: relative
L2 change ‖θ_fine-tuned − θ_start‖ / ‖θ_start‖ over the block's parameters), and in three groups:
``swinViT`` (the Swin transformer: what SSL pretrains, and SAP with it), ``encoder`` (the
fine-tuning's encoder learning-rate group, ``model.encoder_patterns``: the transformer plus the
convolutional skip blocks ``encoder1``-``encoder4``, ``encoder10``) and ``decoder`` (the rest but
the head ``out``, whose bias fine-tuning resets to the lesion prior).

θ_start is rebuilt exactly as the fine-tuning built it (:func:`sap.cv.stages.fine_tuning_start`:
torch seeded with the checkpoint's ``finetune.seed``, then the init's model with the pretrained
checkpoint the fold recorded): for SAP the skeletal model's weights, for SSL the SSL encoder (skip
blocks and decoder random), for the baseline the seed's random initialisation. θ_fine-tuned is
the fold checkpoint the study evaluated (``cv.checkpoint``).

Also what the skeletal model knows: its per-class validation Dice at the last validation of
pretraining (``RUN/pretrain/skeletal/log.csv``).

Usage::

    python benchmarks/bench_encoder_drift.py RUN [--out drift.md]

Writes Markdown (printed, and to ``--out`` with the numbers as JSON beside it, ``drift.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

#: blocks in table order; any other block of the model is appended
BLOCK_ORDER = ("swinViT.patch_embed", "swinViT.layers1", "swinViT.layers2", "swinViT.layers3", "swinViT.layers4",
               "encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
               "decoder5", "decoder4", "decoder3", "decoder2", "decoder1", "out")
GROUPS = ("swinViT", "encoder", "decoder")


def fold_drift(run_root: Path, cfg: Any, method: str, fold: int) -> dict[str, Any]:
    """Per block and group change of one fold model from its start (see the module doc)."""
    import dataclasses

    from sap.cv import stages
    from sap.cv.drift import change_by_block
    from sap.models.weights import load_checkpoint
    from sap.run_layout import INIT_OF, RunDir

    run = RunDir(run_root)
    path = run.fold(method, fold) / f"{cfg.cv.checkpoint}.pt"
    checkpoint = load_checkpoint(path)
    end, record, stored = checkpoint["state_dict"], checkpoint.get("run") or {}, checkpoint.get("config")
    # the fold's own seed when the checkpoint records it (a bench_seed_noise fold has another)
    seed = (stored or {}).get("finetune", {}).get("seed", cfg.finetune.seed) if isinstance(stored, dict) else None
    fold_cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(
        cfg.finetune, seed=int(cfg.finetune.seed if seed is None else seed)))
    pretrained = record.get("pretrained")
    if pretrained and not Path(pretrained).is_file():  # run folder moved or copied: the same file in RUN
        stage = "skeletal" if method == "sap" else "ssl"
        pretrained = str(run.pretrained(stage) if run.pretrained(stage).is_file() else run.pretrain(stage) / "last.pt")
    start = stages.fine_tuning_start(fold_cfg, INIT_OF[method], pretrained)
    changes = change_by_block(start, end, fold_cfg.model.encoder_patterns)
    return {"method": method, "fold": fold, "checkpoint": str(path), "seed": fold_cfg.finetune.seed,
            "pretrained": pretrained, "step": checkpoint.get("step"), "blocks": changes}


def skeletal_knowledge(run_root: Path) -> dict[str, Any] | None:
    """Per-class validation Dice of the skeletal pretraining at its last validation, with its step."""
    import pandas as pd

    from sap.cv.report import skeletal_dice
    from sap.run_layout import RunDir

    run = RunDir(run_root)
    found = skeletal_dice(run)
    if found is None:
        return None
    per_class, binary = found
    log = pd.read_csv(run.pretrain("skeletal") / "log.csv")
    dice_cols = [c for c in log.columns if "dice" in c.lower()]
    validated = log.dropna(subset=dice_cols, how="all")
    step = int(validated["step"].iloc[-1]) if len(validated) and "step" in log else None
    mean = [c for c in log.columns if c.lower().endswith("mean_class_dice")]
    mean_dice = float(validated[mean[0]].iloc[-1]) if mean and len(validated) else float("nan")
    return {"step": step, "per_class": per_class, "skeleton_dice": binary, "mean_class_dice": mean_dice,
            "validations": len(validated)}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or not math.isfinite(float(value)):
        return "–"
    return f"{float(value):.{digits}f}"


def markdown(drifts: list[dict], skeletal: dict | None, cfg: Any, run_root: Path) -> str:
    from sap.cv.rundir import METHOD_LABELS
    from sap.finetune.train import learning_rates
    from sap.run_layout import INIT_OF

    lines = [f"Encoder drift in {run_root}: relative L2 change ‖θ_fine-tuned − θ_start‖ / ‖θ_start‖ "
             f"(checkpoint `{cfg.cv.checkpoint}.pt`; swinViT = the Swin transformer; encoder = the fine-tuning's encoder "
             f"learning-rate group, names starting with `{'`, `'.join(cfg.model.encoder_patterns)}`; decoder = the rest "
             "but the head `out`).", ""]
    head = ["method", "fold", "seed", "lr encoder / decoder", *GROUPS]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in drifts:
        enc_lr, dec_lr = learning_rates(cfg, INIT_OF[d["method"]])
        cells = [METHOD_LABELS[d["method"]], str(d["fold"]), str(d["seed"]), f"{enc_lr:g} / {dec_lr:g}"]
        cells += [_fmt(d["blocks"].get(g, {}).get("relative")) for g in GROUPS]
        lines.append("| " + " | ".join(cells) + " |")
    blocks = list(BLOCK_ORDER) + sorted({b for d in drifts for b in d["blocks"]} - set(BLOCK_ORDER) - set(GROUPS))
    methods = list(dict.fromkeys(d["method"] for d in drifts))
    lines += ["", "Per block (mean over folds of the relative change):", "",
              "| block | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |", "|" + "---|" * (len(methods) + 1)]
    for block in blocks:
        cells = []
        for m in methods:
            values = [d["blocks"][block]["relative"] for d in drifts if d["method"] == m and block in d["blocks"]]
            values = [v for v in values if math.isfinite(v)]
            cells.append(_fmt(sum(values) / len(values)) if values else "–")
        lines.append(f"| {block} | " + " | ".join(cells) + " |")
    lines += ["", "`out`: the head, whose bias fine-tuning sets to the lesion prior before the first step (so its "
              "change includes that reset). SSL pretrains `swinViT` only: its `encoder1`-`encoder10` and decoder "
              "start random, like the baseline's whole network."]
    if skeletal is not None:
        lines += ["", f"Skeletal pretraining, last validation (step {skeletal['step']}, {skeletal['validations']} "
                      f"validations): skeleton Dice {_fmt(skeletal['skeleton_dice'], 3)}, mean class Dice "
                      f"{_fmt(skeletal['mean_class_dice'], 3)}.", "",
                  "| class | Dice |", "|---|---|"]
        lines += [f"| {name} | {_fmt(v, 3)} |" for name, v in skeletal["per_class"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from sap.cv.rundir import load_run_config
    from sap.errors import SapError
    from sap.files import atomic_write_text
    from sap.metrics import nan_to_none
    from sap.run_layout import METHODS, RunDir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="study run folder")
    p.add_argument("--out", type=Path, default=None, help="Markdown file (the JSON goes beside it)")
    p.add_argument("--methods", default=None, help="subset of baseline,ssl,sap (default: every one in RUN)")
    args = p.parse_args(argv)
    try:
        run = RunDir(args.run)
        if not run.config.is_file():
            raise SapError(f"{run.root}: not a study run folder (no config.yaml)")
        cfg = load_run_config(run.config)
        methods = [m for m in METHODS if run.method(m).is_dir()]
        if args.methods:
            from sap.cv.rundir import parse_methods

            methods = [m for m in parse_methods(args.methods, methods) if m in methods]
        drifts = []
        for method in methods:
            for fold in run.folds_present(method):
                if (run.fold(method, fold) / f"{cfg.cv.checkpoint}.pt").is_file():
                    drifts.append(fold_drift(run.root, cfg, method, fold))
        if not drifts:
            raise SapError(f"{run.root}: no fine-tuned fold checkpoint ({cfg.cv.checkpoint}.pt) found")
        skeletal = skeletal_knowledge(run.root)
    except SapError as exc:
        print(f"bench_encoder_drift: error: {exc}", file=sys.stderr)
        return 2
    md = markdown(drifts, skeletal, cfg, run.root)
    print(md)
    if args.out is not None:
        atomic_write_text(args.out, md)
        record = {"run": str(run.root), "folds": drifts, "skeletal": skeletal}
        atomic_write_text(args.out.with_suffix(".json"), json.dumps(nan_to_none(record), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
