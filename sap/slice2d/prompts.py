"""Zero-shot prompts from reference masks: the primitives and the 32 strategies of paper 001 (SPEC §11).

Everything here is numpy/scipy on one 2D slice; coordinates are ``(row, col)`` pixel indices of
the slice array (the SAM wrapper converts to SAM's ``(x, y)`` = ``(col, row)``).

Primitives, per 2D connected component (4-connectivity) of one class in one slice:

* **box**: tight box ``(row_min, col_min, row_max, col_max)``, inclusive pixel indices.
* **center** (EDT centre): the pixel farthest from the component border (Euclidean distance
  transform of the component, the image edge counting as border); always inside. Ties are broken
  by a seeded random choice, as the authors do ("a single candidate is kept randomly").
* **centroid**: centre of mass (float row, col); may lie outside a non-convex component.
* **positive points**: sampled without replacement from the component eroded by a 3×3 square.
* **negative points**: sampled from the ring between the component dilated by a 5×5 square and
  that dilation dilated again by a 15×15 square, excluding every pixel of the class in the slice.

Component filter: the authors' code keeps a component when it has at least ``min_pixels`` (15)
pixels **and** at least ``min_fraction`` (5 %) of the class area in the slice (``rule="and"``);
the paper's text says "or" (``rule="or"``). 1C uses the largest kept component, 5C up to the five
largest (ties in size keep label order).

Our choices where the paper is silent (documented in docs/slice2d_prompts.md):

* Points are drawn once per (slice, class, component) as one random order of up to 10 positives
  and 5 negatives; ``posK`` uses the first K, so pos1 ⊂ pos3 ⊂ pos5 ⊂ pos10 and ``box+pos1``,
  ``pos1``, ``pos1+neg1`` share their point. The generator is seeded from (seed, slice id, class).
* A component whose 3×3 erosion is empty (thinner than 3 px) samples positives from the
  component itself; fewer pixels than K give fewer points (never duplicates). An empty ring gives
  no negative points.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

#: the 16 prompt bases in the order of SPEC §11 (paper 001, Sec. 3.2)
STRATEGY_BASES: tuple[str, ...] = (
    "box",
    "center",
    "centroid",
    "pos1",
    "pos3",
    "pos5",
    "pos10",
    "box+center",
    "box+pos1",
    "box+pos5",
    "box+neg1",
    "box+neg5",
    "center+neg1",
    "center+neg5",
    "pos1+neg1",
    "pos5+neg5",
)
COMPONENT_MODES: tuple[str, ...] = ("1C", "5C")
#: the 32 strategy names: each base in §11 order, with _1C then _5C
STRATEGIES: tuple[str, ...] = tuple(f"{base}_{mode}" for base in STRATEGY_BASES for mode in COMPONENT_MODES)
#: MedSAM was fine-tuned for box prompts only (paper 001, Sec. 3.1)
MEDSAM_STRATEGIES: tuple[str, ...] = ("box_1C", "box_5C")

MAX_POSITIVES = 10
MAX_NEGATIVES = 5
FOUR_CONNECTIVITY = ndimage.generate_binary_structure(2, 1)


@dataclass
class ComponentPrimitives:
    """Every primitive of one kept component. Points are (row, col); arrays have shape (n, 2)."""

    label: int  #: component label in the 4-connected labelling of the class mask
    area: int  #: pixels
    box: tuple[int, int, int, int]  #: (row_min, col_min, row_max, col_max), inclusive
    center: tuple[int, int]  #: EDT centre (inside)
    centroid: tuple[float, float]  #: centre of mass (may be outside)
    positives: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    negatives: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))


@dataclass
class Prompt:
    """One prompt for one component: an optional box and labelled points (1 positive, 0 negative)."""

    box: tuple[int, int, int, int] | None
    points: np.ndarray  #: (n, 2) float (row, col)
    labels: np.ndarray  #: (n,) int, 1 = positive, 0 = negative


def check_strategy(name: str, family: str = "sam") -> tuple[str, str]:
    """Split a strategy name into (base, mode); unknown names and non-box MedSAM strategies raise ValueError."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown prompting strategy {name!r}; `sap slice2d prompt-bench --list-strategies` lists them")
    if family == "medsam" and name not in MEDSAM_STRATEGIES:
        raise ValueError(f"MedSAM takes box prompts only ({', '.join(MEDSAM_STRATEGIES)}), not {name!r}")
    base, mode = name.rsplit("_", 1)
    return base, mode


# ----------------------------------------------------------------------------------- primitives
def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a 2D binary mask: (labels int32, count)."""
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=FOUR_CONNECTIVITY)
    return labels.astype(np.int32, copy=False), int(count)


def tight_box(component: np.ndarray) -> tuple[int, int, int, int]:
    """Inclusive (row_min, col_min, row_max, col_max) of a non-empty 2D mask."""
    rows = np.flatnonzero(component.any(axis=1))
    cols = np.flatnonzero(component.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def edt_center(component: np.ndarray, rng: np.random.Generator | None = None) -> tuple[int, int]:
    """Pixel of a non-empty 2D mask farthest from its border; ties broken by ``rng`` (else the first).

    The image edge counts as border (the mask is zero-padded before the distance transform).
    """
    distance = ndimage.distance_transform_edt(np.pad(component.astype(bool), 1))[1:-1, 1:-1]
    best = np.argwhere(distance == distance.max())
    pick = 0 if rng is None or len(best) == 1 else int(rng.integers(len(best)))
    return int(best[pick][0]), int(best[pick][1])


def centroid(component: np.ndarray) -> tuple[float, float]:
    """Centre of mass (row, col) of a non-empty 2D mask; may fall outside a non-convex shape."""
    coords = np.argwhere(component)
    mean = coords.mean(axis=0)
    return float(mean[0]), float(mean[1])


def positive_region(component: np.ndarray) -> np.ndarray:
    """The component eroded by a 3×3 square (the component itself when the erosion is empty)."""
    eroded = ndimage.binary_erosion(component, structure=np.ones((3, 3), bool))
    return eroded if eroded.any() else component.astype(bool)


def negative_ring(component: np.ndarray, class_mask: np.ndarray) -> np.ndarray:
    """Ring between the 5×5 dilation and its further 15×15 dilation, outside every class pixel."""
    inner = ndimage.binary_dilation(component, structure=np.ones((5, 5), bool))
    outer = ndimage.binary_dilation(inner, structure=np.ones((15, 15), bool))
    return outer & ~inner & ~class_mask.astype(bool)


def sample_points(region: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``k`` distinct (row, col) pixels of ``region`` in random order, shape (n, 2)."""
    coords = np.argwhere(region)
    if len(coords) == 0 or k <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    chosen = rng.choice(len(coords), size=min(k, len(coords)), replace=False)
    return coords[chosen].astype(np.int64)


def keep_component(area: int, class_area: int, min_pixels: int = 15, min_fraction: float = 0.05, rule: str = "and") -> bool:
    """The component filter: ``area >= min_pixels`` and/or ``area >= min_fraction × class_area``."""
    big = area >= min_pixels
    share = area >= min_fraction * class_area
    if rule == "and":
        return big and share
    if rule == "or":
        return big or share
    raise ValueError(f"component rule {rule!r}: choose 'and' (authors' code) or 'or' (paper text)")


def kept_components(
    class_mask: np.ndarray, min_pixels: int = 15, min_fraction: float = 0.05, rule: str = "and"
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Label the class mask and list kept components as (label, area), largest first.

    Returns ``(labels, kept)``; ties in area keep label order (stable sort).
    """
    labels, count = label_components(class_mask)
    if count == 0:
        return labels, []
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    class_area = int(areas.sum())
    kept = [
        (index + 1, int(area))
        for index, area in enumerate(areas)
        if keep_component(int(area), class_area, min_pixels, min_fraction, rule)
    ]
    kept.sort(key=lambda item: -item[1])
    return labels, kept


def class_primitives(
    class_mask: np.ndarray,
    rng: np.random.Generator,
    max_components: int = 5,
    min_pixels: int = 15,
    min_fraction: float = 0.05,
    rule: str = "and",
) -> list[ComponentPrimitives]:
    """Primitives of up to ``max_components`` kept components of one class, largest first."""
    class_mask = np.asarray(class_mask, dtype=bool)
    labels, kept = kept_components(class_mask, min_pixels, min_fraction, rule)
    out = []
    for label, area in kept[:max_components]:
        # Work in a crop around the component padded by the ring width (2 + 7 px) to stay fast.
        r0, c0, r1, c1 = tight_box(labels == label)
        pad = 10
        rs, cs = max(r0 - pad, 0), max(c0 - pad, 0)
        re, ce = min(r1 + pad + 1, class_mask.shape[0]), min(c1 + pad + 1, class_mask.shape[1])
        comp = labels[rs:re, cs:ce] == label
        offset = np.array([rs, cs])
        # Exact: the nearest non-component pixel lies within one pixel of the box.
        cr, cc = edt_center(comp, rng)
        cy, cx = centroid(comp)
        positives = sample_points(positive_region(comp), MAX_POSITIVES, rng) + offset
        negatives = sample_points(negative_ring(comp, class_mask[rs:re, cs:ce]), MAX_NEGATIVES, rng) + offset
        out.append(
            ComponentPrimitives(
                label=int(label),
                area=area,
                box=(r0, c0, r1, c1),
                center=(cr + rs, cc + cs),
                centroid=(cy + rs, cx + cs),
                positives=positives,
                negatives=negatives,
            )
        )
    return out


# ----------------------------------------------------------------------------------- strategies
def prompts_for_strategy(primitives: list[ComponentPrimitives], strategy: str) -> list[Prompt]:
    """Prompts (one per used component) of one strategy from a class's primitives (largest first).

    An empty list means the class has no kept component in this slice (nothing to prompt).
    """
    base, mode = check_strategy(strategy)
    used = primitives[:1] if mode == "1C" else primitives[:5]
    parts = base.split("+")
    prompts = []
    for prim in used:
        box = prim.box if "box" in parts else None
        points: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        for part in parts:
            if part == "center":
                points.append(np.array([prim.center], dtype=np.float64))
                labels.append(np.ones(1, dtype=np.int64))
            elif part == "centroid":
                points.append(np.array([prim.centroid], dtype=np.float64))
                labels.append(np.ones(1, dtype=np.int64))
            elif part.startswith("pos"):
                chosen = prim.positives[: int(part[3:])].astype(np.float64)
                points.append(chosen)
                labels.append(np.ones(len(chosen), dtype=np.int64))
            elif part.startswith("neg"):
                chosen = prim.negatives[: int(part[3:])].astype(np.float64)
                points.append(chosen)
                labels.append(np.zeros(len(chosen), dtype=np.int64))
        all_points = np.concatenate(points) if points else np.zeros((0, 2), dtype=np.float64)
        all_labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        prompts.append(Prompt(box=box, points=all_points.reshape(-1, 2), labels=all_labels))
    return prompts


def slice_rng(seed: int, slice_key: int, class_label: int) -> np.random.Generator:
    """The seeded generator of one (slice, class): same points whatever else runs."""
    return np.random.default_rng([int(seed), int(slice_key), int(class_label)])
