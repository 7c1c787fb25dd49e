"""``sap slice2d prompt-bench``: zero-shot SAM/MedSAM prompting strategies scored per slice (paper 001).

For every selected axial slice the image encoder runs once; every class present in the slice is
prompted with every requested strategy from its reference mask (:mod:`sap.slice2d.prompts`), and
each predicted mask is scored against that class (Dice, IoU, HD95 in mm, normalised HD; SPEC §11).
Seconds per slice for a strategy = the slice's encoder time + the decoder time of that strategy
summed over the slice's classes (the embedding is reused for every strategy and class).

Classes: ``--target bone`` prompts each skeleton region (labels 1–9) separately, as paper 001
prompts each bone; ``--target lesions`` prompts the lesion mask as one class. A class whose
components all fail the component filter cannot be prompted: it is skipped (no prediction, no
score) and counted in ``n_unprompted``.

Outputs in ``--out``: ``prompt_bench.csv`` (one row per slice × class × strategy),
``summary.csv`` (one row per strategy), ``settings.json``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sap.errors import SapError
from sap.files import atomic_write_text, check_writable
from sap.slice2d.metrics import SliceScore, score_slice, summarise
from sap.slice2d.prompts import (
    MEDSAM_STRATEGIES,
    STRATEGIES,
    check_strategy,
    class_primitives,
    prompts_for_strategy,
    slice_rng,
)

ROW_FIELDS = ("case", "slice", "class", "strategy", "n_components", "dice", "iou", "hd95_mm", "nhd", "decoder_s")
SUMMARY_FIELDS = (
    "strategy", "dice", "iou", "hd95_mm", "nhd", "n", "n_distance_undefined", "n_unprompted", "seconds_per_slice",
)  # fmt: skip


@dataclass
class BenchSlice:
    """One slice to prompt: image in [0, 1], class map (0 background), pixel spacing (row, col) mm."""

    case_id: str
    index: int
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float]

    @property
    def key(self) -> int:
        return zlib.crc32(f"{self.case_id}:{self.index}".encode())


def resolve_strategies(names: Iterable[str] | None, family: str) -> list[str]:
    """The requested strategies (all 32, or MedSAM's box strategies, when none are named)."""
    names = list(names or [])
    if not names:
        return list(MEDSAM_STRATEGIES if family == "medsam" else STRATEGIES)
    for name in names:
        try:
            check_strategy(name, family)
        except ValueError as exc:
            raise SapError(f"--strategies: {exc}") from exc
    return names


def run_prompt_bench(
    prompter: Any,
    slices: Iterable[BenchSlice],
    strategies: list[str],
    seed: int = 0,
    rule: str = "and",
    min_pixels: int = 15,
    min_fraction: float = 0.05,
    distances: bool = True,
    progress: bool = False,
    total: int | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Prompt every class of every slice with every strategy; returns (rows, summary rows)."""
    rows: list[dict[str, Any]] = []
    seconds: dict[str, list[float]] = {s: [] for s in strategies}
    unprompted = 0
    for item in tqdm(slices, desc="slice2d: prompt-bench", unit="slice", disable=not progress, total=total):
        # Prompts come from the reference masks (not timed, as in paper 001); a class whose
        # components all fail the filter has nothing to prompt with.
        classes = {}
        for cls in (int(c) for c in np.unique(item.labels) if c != 0):
            prims = class_primitives(item.labels == cls, slice_rng(seed, item.key, cls), 5, min_pixels, min_fraction, rule)
            if prims:
                classes[cls] = prims
            else:
                unprompted += 1
        if not classes:
            continue
        emb = prompter.embed(item.image)
        spent = dict.fromkeys(strategies, emb.seconds)
        for cls, prims in classes.items():
            truth = item.labels == cls
            for strategy in strategies:
                prompts = prompts_for_strategy(prims, strategy)
                start = time.perf_counter()
                pred = prompter.predict(emb, prompts)
                took = time.perf_counter() - start
                spent[strategy] += took
                score = score_slice(pred, truth, item.spacing, distances)
                rows.append(
                    {
                        "case": item.case_id,
                        "slice": item.index,
                        "class": cls,
                        "strategy": strategy,
                        "n_components": len(prompts),
                        "dice": score.dice,
                        "iou": score.iou,
                        "hd95_mm": score.hd95_mm,
                        "nhd": score.nhd,
                        "decoder_s": took,
                    }
                )
        for strategy in strategies:
            seconds[strategy].append(spent[strategy])
    summary = []
    for strategy in strategies:
        mine = [r for r in rows if r["strategy"] == strategy]
        stats = summarise([SliceScore(r["dice"], r["iou"], r["hd95_mm"], r["nhd"]) for r in mine])
        summary.append(
            {
                "strategy": strategy,
                "dice": stats["dice"],
                "iou": stats["iou"],
                "hd95_mm": stats["hd95_mm"],
                "nhd": stats["nhd"],
                "n": stats["n_slices"],
                "n_distance_undefined": stats["n_distance_undefined"],
                "n_unprompted": unprompted,
                "seconds_per_slice": float(np.mean(seconds[strategy])) if seconds[strategy] else math.nan,
            }
        )
    return rows, summary


def iter_bench_slices(cfg: Any, target: str, max_slices: int | None, seed: int) -> Iterator[BenchSlice]:
    """Display-oriented slices holding the target, case by case (a seeded subset of ``max_slices``)."""
    from sap.data.cases import discover_cohort
    from sap.data.preprocess import load_case
    from sap.slice2d.data import bone_window, volume_to_slices
    from sap.slice2d.train import ct_data_config

    data_cfg = ct_data_config(cfg)
    cohort = discover_cohort(data_cfg)
    cases = [c for c in cohort.cases if (c.lesions if target == "lesions" else c.skeleton) is not None]
    if not cases:
        what = "lesion masks (GT)" if target == "lesions" else "skeleton label maps"
        raise SapError(f"{cohort.root}: no case with {what} for --target {target}")
    s = cfg.slice2d
    per_case = None if not max_slices else max(1, math.ceil(max_slices / len(cases)))
    rng = np.random.default_rng(seed)
    emitted = 0
    for case in cases:
        loaded = load_case(case, data_cfg)
        labels = loaded.lesions.astype(np.uint8) if target == "lesions" else loaded.skeleton
        label_slices = volume_to_slices(labels)
        images = volume_to_slices(bone_window(loaded.image[0], s.window_level, s.window_width))
        present = np.flatnonzero(label_slices.reshape(len(label_slices), -1).any(axis=1))
        if per_case is not None and len(present) > per_case:
            present = np.sort(rng.choice(present, size=per_case, replace=False))
        spacing = loaded.spacing
        for k in present:
            if max_slices and emitted >= max_slices:
                return
            emitted += 1
            yield BenchSlice(case.case_id, int(k), images[k], label_slices[k], (float(spacing[1]), float(spacing[0])))


def write_csv(path: Path, rows: list[dict[str, Any]], fields: tuple[str, ...], overwrite: bool) -> Path:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(fields))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return atomic_write_text(path, text.getvalue(), overwrite=overwrite)


def prompt_bench(
    cfg: Any,
    sam_dir: str | Path,
    out_dir: str | Path,
    target: str = "bone",
    strategies: list[str] | None = None,
    max_slices: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """``sap slice2d prompt-bench``: run the bench on a cohort and write the CSVs; returns the summary."""
    import torch

    from sap.slice2d.models import load_hf_model
    from sap.slice2d.sam import SamPrompter

    s = cfg.slice2d
    chosen = resolve_strategies(strategies, s.sam_family)
    out = Path(out_dir)
    for name in ("prompt_bench.csv", "summary.csv", "settings.json"):
        check_writable(out / name, overwrite)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompter = SamPrompter(load_hf_model(sam_dir, "sam"), s.sam_family, device)
    rows, summary = run_prompt_bench(
        prompter,
        iter_bench_slices(cfg, target, max_slices, s.prompt_seed),
        chosen,
        seed=s.prompt_seed,
        rule=s.component_rule,
        min_pixels=s.min_component_pixels,
        min_fraction=s.min_component_fraction,
        progress=progress,
        total=max_slices,
    )
    if not rows:
        raise SapError(f"{cfg.data.root}: no slice holds the target {target!r}; nothing to prompt")
    write_csv(out / "prompt_bench.csv", rows, ROW_FIELDS, overwrite)
    write_csv(out / "summary.csv", summary, SUMMARY_FIELDS, overwrite)
    settings = {
        "sam": str(sam_dir),
        "family": s.sam_family,
        "target": target,
        "strategies": chosen,
        "component_rule": s.component_rule,
        "min_component_pixels": s.min_component_pixels,
        "min_component_fraction": s.min_component_fraction,
        "prompt_seed": s.prompt_seed,
        "window": [s.window_level, s.window_width],
        "max_slices": max_slices,
        "device": device,
    }
    atomic_write_text(out / "settings.json", json.dumps(settings, indent=2), overwrite=overwrite)
    return summary
