"""The preprocessing cache: each case decoded and normalised once, then memory-mapped (SPEC §2).

Entries live in ``data.cache_dir`` (default ``COHORT/.sap_cache``) as
``<case_id>-<key>/{image,body,lesions,skeleton}.npy`` plus ``meta.json``. The key hashes the
source files' bytes and every setting that changes the arrays, so an edited scan or a new
normalisation gives a new entry and a stale one is never read. Entries are written into a
temporary folder and renamed into place, so an interrupted run leaves no half-written entry.
Patch samplers slice the memory-mapped arrays: no NIfTI is decoded during training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sap.config import DataConfig
from sap.data.cases import Case, check_case_id
from sap.data.io import Geometry
from sap.data.preprocess import preprocess_case
from sap.files import staged_folder

CACHE_FORMAT = 1
#: the cache folder inside a cohort when ``data.cache_dir`` is not set
CACHE_NAME = ".sap_cache"
_SETTINGS = ("channels", "modality", "normalization", "percentiles", "ct_window", "target_spacing",
             "n4", "resample_channels", "binarize")


@dataclass
class CachedCase:
    """A preprocessed case backed by memory-mapped arrays.

    ``image`` (C, X, Y, Z) float32 normalised; ``body``, ``lesions``, ``skeleton`` (X, Y, Z) uint8
    (labels None when the case has none); ``spacing`` in mm, array axis order; ``geometry`` of the
    source files (for writing predictions back).
    """

    case_id: str
    subject_id: str
    group: str
    image: np.ndarray
    body: np.ndarray
    spacing: tuple[float, float, float]
    geometry: Geometry
    lesions: np.ndarray | None = None
    skeleton: np.ndarray | None = None
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[1:])  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def _hash_file(path: Path, digest: hashlib._Hash) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)


def cache_key(case: Case, cfg: DataConfig) -> str:
    """Hash of the case's file contents and the preprocessing settings."""
    digest = hashlib.blake2b(digest_size=10)
    settings = {name: getattr(cfg, name) for name in _SETTINGS}
    digest.update(json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True).encode())
    for role, path in [*case.channels.items(), ("lesions", case.lesions), ("skeleton", case.skeleton)]:
        digest.update(role.encode())
        if path is not None:
            _hash_file(Path(path), digest)
    return digest.hexdigest()


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    if cfg.root:
        return Path(cfg.root) / CACHE_NAME
    return Path.home() / ".cache" / "sap"


def _geometry_to_json(geometry: Geometry) -> dict:
    return {
        "size": list(geometry.size),
        "spacing": list(geometry.spacing),
        "origin": list(geometry.origin),
        "direction": list(geometry.direction),
        "ornt": [list(o) for o in geometry.ornt],
    }


def _geometry_from_json(raw: dict) -> Geometry:
    return Geometry(
        size=tuple(raw["size"]),
        spacing=tuple(raw["spacing"]),
        origin=tuple(raw["origin"]),
        direction=tuple(raw["direction"]),
        ornt=tuple(tuple(o) for o in raw["ornt"]),
    )


def _open_entry(folder: Path) -> CachedCase:
    meta = json.loads((folder / "meta.json").read_text())

    def mapped(name: str) -> np.ndarray | None:
        path = folder / f"{name}.npy"
        return np.load(path, mmap_mode="r") if path.exists() else None

    return CachedCase(
        case_id=meta["case_id"],
        subject_id=meta["subject_id"],
        group=meta["group"],
        image=mapped("image"),  # type: ignore[arg-type]
        body=mapped("body"),  # type: ignore[arg-type]
        lesions=mapped("lesions"),
        skeleton=mapped("skeleton"),
        spacing=tuple(meta["spacing"]),  # type: ignore[arg-type]
        geometry=_geometry_from_json(meta["geometry"]),
        path=folder,
    )


def is_cached(case: Case, cfg: DataConfig) -> bool:
    """True when the case's current files are in the cache (read and checked before)."""
    return (cache_root(cfg) / f"{case.case_id}-{cache_key(case, cfg)}" / "meta.json").is_file()


def load_cached(case: Case, cfg: DataConfig) -> CachedCase:
    """The cached, memory-mapped case; preprocesses and stores it first when missing."""
    root = cache_root(cfg)
    check_case_id(case.case_id, next(iter(case.channels.values()), root))  # never a folder outside root
    folder = root / f"{case.case_id}-{cache_key(case, cfg)}"
    if (folder / "meta.json").is_file():
        return _open_entry(folder)
    pre = preprocess_case(case, cfg)
    # another process caching the same case first wins: its entry is used
    with staged_folder(folder, replace=False) as tmp:
        np.save(tmp / "image.npy", np.ascontiguousarray(pre.image, dtype=np.float32))
        np.save(tmp / "body.npy", np.ascontiguousarray(pre.body, dtype=np.uint8))
        if pre.lesions is not None:
            np.save(tmp / "lesions.npy", np.ascontiguousarray(pre.lesions, dtype=np.uint8))
        if pre.skeleton is not None:
            np.save(tmp / "skeleton.npy", np.ascontiguousarray(pre.skeleton, dtype=np.uint8))
        meta = {
            "case_id": case.case_id,
            "subject_id": case.subject_id,
            "group": case.group,
            "spacing": list(pre.spacing),
            "geometry": _geometry_to_json(pre.geometry),
            "sources": {k: str(v) for k, v in case.channels.items()},
            "format": CACHE_FORMAT,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return _open_entry(folder)


def cache_cases(cases: list[Case], cfg: DataConfig, progress: bool = True) -> list[CachedCase]:
    """Load (and cache when needed) every case, with a progress bar."""
    return [
        load_cached(case, cfg)
        for case in tqdm(cases, desc="caching cases", unit="case", disable=not progress or len(cases) < 2)
    ]
