"""The SAP skeleton scheme and the TotalSegmentator converter (SPEC §2).

Ten output channels: background plus the paper's nine reading regions. Ribs and skull are
background, so a rib lesion's region is reported as ``"rib/other"``. The converter maps **by class
name** through a class-map JSON (label value → name per table), never by hard-coded numbers, so
new TotalSegmentator releases that renumber classes still convert correctly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from sap.errors import SapError

SKELETON_CLASSES: tuple[str, ...] = (
    "background",
    "cervical_spine",
    "thoracic_spine",
    "lumbar_spine",
    "pelvis",
    "femurs",
    "humeri",
    "scapulae",
    "clavicles",
    "sternum",
)
N_SKELETON_CLASSES = len(SKELETON_CLASSES)
OUTSIDE_REGION = "rib/other"


def region_name(label: int) -> str:
    """Region of a skeleton label value; 0 (ribs, skull, soft tissue) is ``"rib/other"``."""
    return SKELETON_CLASSES[label] if 0 < label < N_SKELETON_CLASSES else OUTSIDE_REGION


#: TotalSegmentator class name → SAP skeleton label. Patterns are full-match regular expressions.
TOTALSEG_RULES: tuple[tuple[str, int], ...] = (
    (r"vertebrae_C[1-7]", 1),
    (r"vertebrae_T([1-9]|1[0-2])", 2),
    (r"vertebrae_L[1-5]", 3),
    (r"sacrum", 4),
    (r"vertebrae_S1", 4),
    (r"hip_(left|right)", 4),
    (r"femur_(left|right)", 5),
    (r"humerus_(left|right)", 6),
    (r"scapula_(left|right)", 7),
    (r"clavicula_(left|right)", 8),
    (r"sternum", 9),
)

#: ``--vertebrae-rule`` choices for ``total_mr``'s single "vertebrae" class (no level information).
VERTEBRAE_RULES: dict[str, str] = {
    "thoracic": "every vertebra voxel → thoracic spine (2)",
    "lumbar": "every vertebra voxel → lumbar spine (3)",
    "split-by-height": "split the spine column by height: bottom 5/24 lumbar, top 7/24 cervical, rest thoracic",
    "drop": "vertebrae → background (spine regions absent)",
}


def default_class_map() -> dict[str, dict[int, str]]:
    """The TotalSegmentator v2 tables shipped with sap (``total``, ``total_mr``, ``vertebrae_body``)."""
    from importlib import resources

    return load_class_map(Path(str(resources.files("sap.data") / "resources" / "totalseg_class_map.json")))


def load_class_map(path: str | Path | None) -> dict[str, dict[int, str]]:
    """Read a class-map JSON: ``{table: {value: name}}`` (values as strings or ints)."""
    if path is None:
        return default_class_map()
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SapError(f"{path}: class-map file not found") from exc
    except json.JSONDecodeError as exc:
        raise SapError(f"{path}: class-map is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    raw = {k: v for k, v in raw.items() if not k.startswith("_")} if isinstance(raw, dict) else raw
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise SapError(f"{path}: class-map must be {{table: {{value: name}}}}")
    try:
        return {table: {int(k): str(v) for k, v in entries.items()} for table, entries in raw.items()}
    except ValueError as exc:
        raise SapError(f"{path}: class-map values must be integers ({exc})") from exc


def totalseg_lookup(table: dict[int, str], vertebrae_rule: str | None, source: str = "") -> np.ndarray:
    """Look-up array: TotalSegmentator value → SAP label, or -1 for the generic "vertebrae" class.

    Raises when the table has the generic "vertebrae" class and no ``vertebrae_rule`` is given.
    """
    size = max(table) + 1 if table else 1
    lookup = np.zeros(size, dtype=np.int16)
    for value, name in table.items():
        for pattern, label in TOTALSEG_RULES:
            if re.fullmatch(pattern, name):
                lookup[value] = label
                break
        else:
            if name == "vertebrae":
                if vertebrae_rule is None:
                    raise SapError(
                        f"{source}: the table has one 'vertebrae' class without levels; "
                        f"choose --vertebrae-rule ({', '.join(VERTEBRAE_RULES)})"
                    )
                lookup[value] = -1
    return lookup


def _split_spine_by_height(mask: np.ndarray) -> np.ndarray:
    """Assign spine voxels to cervical/thoracic/lumbar by their height along the column.

    Uses the typical share of the 24 presacral vertebrae: 7 cervical, 12 thoracic, 5 lumbar.
    Array axis 2 is superior (canonical RAS+).
    """
    out = np.zeros(mask.shape, dtype=np.uint8)
    z = np.nonzero(mask.any(axis=(0, 1)))[0]
    if z.size == 0:
        return out
    lo, hi = z.min(), z.max() + 1
    height = hi - lo
    lumbar_top = lo + height * 5 / 24
    thoracic_top = lo + height * 17 / 24
    zz = np.arange(mask.shape[2])
    level = np.where(zz < lumbar_top, 3, np.where(zz < thoracic_top, 2, 1)).astype(np.uint8)
    out[mask] = np.broadcast_to(level, mask.shape)[mask]
    return out


def convert_totalseg(
    labels: np.ndarray,
    table: dict[int, str],
    vertebrae_rule: str | None = None,
    source: str = "",
) -> np.ndarray:
    """Map a TotalSegmentator label array (canonical orientation) to the SAP skeleton scheme."""
    if vertebrae_rule is not None and vertebrae_rule not in VERTEBRAE_RULES:
        raise SapError(f"--vertebrae-rule {vertebrae_rule!r}: choose one of {', '.join(VERTEBRAE_RULES)}")
    values = np.asarray(labels)
    if not np.all(np.isfinite(values)):
        raise SapError(f"{source}: label map holds NaN/Inf values")
    ints = values.astype(np.int64)
    if np.any(ints != values):
        raise SapError(f"{source}: label map holds non-integer values")
    unknown = np.setdiff1d(np.unique(ints), [0, *table.keys()])
    if unknown.size:
        raise SapError(
            f"{source}: label values {unknown[:10].tolist()} are not in the class map; wrong --table?"
        )
    lookup = totalseg_lookup(table, vertebrae_rule, source)
    clipped = np.clip(ints, 0, lookup.size - 1)
    mapped = lookup[clipped]
    out = np.where(mapped > 0, mapped, 0).astype(np.uint8)
    generic = mapped < 0
    if generic.any():
        if vertebrae_rule == "thoracic":
            out[generic] = 2
        elif vertebrae_rule == "lumbar":
            out[generic] = 3
        elif vertebrae_rule == "split-by-height":
            split = _split_spine_by_height(generic)
            out[generic] = split[generic]
    return out


def check_skeleton(array: np.ndarray, source: str) -> np.ndarray:
    """Validate a skeleton label map (integers 0–9) and return it as uint8.

    A generic label map with other values (e.g. VerSe vertebra numbers 16–24) is refused with a
    message that says so.
    """
    if not np.all(np.isfinite(array)):
        raise SapError(f"{source}: skeleton holds NaN/Inf voxels")
    values = np.unique(array)
    bad = values[(values < 0) | (values > N_SKELETON_CLASSES - 1) | (values != np.round(values))]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:8])
        raise SapError(
            f"{source}: not a SAP skeleton: values {shown} outside 0–9 (a generic label map? "
            "convert it with `sap labels`)"
        )
    return array.astype(np.uint8)


def check_lesion_mask(array: np.ndarray, source: str, binarize: bool = False) -> np.ndarray:
    """Validate a binary lesion mask and return it as uint8 {0, 1}.

    With ``binarize`` any non-zero value is lesion (e.g. {0, 255} masks).
    """
    if not np.all(np.isfinite(array)):
        raise SapError(f"{source}: lesion mask holds NaN/Inf voxels")
    if binarize:
        return (array != 0).astype(np.uint8)
    values = np.unique(array)
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:8])
        raise SapError(f"{source}: lesion mask is not binary: values {shown} (use --binarize for {{0,255}} or instance maps)")
    return array.astype(np.uint8)


def read_label_map(path: str | Path):
    """Read any label map (integer values, possibly stored as float64) as a canonical int array.

    Returns a :class:`sap.data.io.Image` whose array is int32. Non-integer or non-finite values are
    errors naming the file.
    """
    from sap.data.io import read_image

    image = read_image(path)
    array = image.array
    if not np.all(np.isfinite(array)):
        raise SapError(f"{path}: label map holds NaN/Inf voxels")
    as_int = np.rint(array).astype(np.int32)
    if np.issubdtype(array.dtype, np.floating) and np.any(as_int != array):
        raise SapError(f"{path}: label map holds non-integer values")
    image.array = as_int
    return image
