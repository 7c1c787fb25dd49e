"""The deployable model bundle written by ``sap cv --export`` and read by ``sap infer`` (SPEC §8, §10).

A bundle is a folder::

    BUNDLE/
      bundle.json     {"format": "sap-bundle", "version": 1, "method": "sap",
                       "models": ["fold_1.pt", "fold_2.pt", …], "threshold": 0.45,
                       "min_volume_ml": 0.0, "channels": ["T1", "b1000"],
                       "research_use_only": true, "note": "…",
                       "synthetic": true, "synthetic_data": {"source": "sap synth",
                                       "preset": "demo", "seed": 0, …}}   (synthetic training data only)
      fold_1.pt       sap checkpoints (:func:`sap.models.weights.make_checkpoint`)
      fold_2.pt
      …

The fold models form an ensemble: inference averages their foreground probabilities (mean), then
applies the bundle's ``threshold`` and ``min_volume_ml`` (tuned for the ensemble), which take
precedence over the values stored in the individual fold checkpoints.

A bundle whose models were trained on a ``sap synth`` cohort says so (``"synthetic": true`` and
what the cohort recorded of its making); ``sap infer`` warns when it loads one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sap import RESEARCH_USE_ONLY
from sap.errors import SapError
from sap.files import staged_folder
from sap.models.weights import check_format, load_checkpoint, save_checkpoint

BUNDLE_FORMAT = "sap-bundle"
BUNDLE_VERSION = 1
BUNDLE_FILE = "bundle.json"


@dataclass
class Bundle:
    """A bundle as read from disk. ``model_paths`` are absolute, in ensemble order."""

    path: Path
    method: str
    model_paths: list[Path]
    threshold: float
    min_volume_ml: float
    channels: list[str]
    research_use_only: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def synthetic(self) -> bool:
        """True when the models were trained on synthetic data (``"synthetic": true``)."""
        return bool(self.extra.get("synthetic", False))

    def synthetic_text(self) -> str:
        """What ``bundle.json`` records of the synthetic training data ("sap synth cohort, preset
        demo, seed 0"); empty for a bundle trained on real data."""
        if not self.synthetic:
            return ""
        info = self.extra.get("synthetic_data")
        info = info if isinstance(info, dict) else {}
        parts = [f"{info.get('source', 'sap synth')} cohort"]
        parts += [f"{k} {info[k]}" for k in ("preset", "seed") if info.get(k) is not None]
        return ", ".join(parts)

    def checkpoints(self) -> list[dict[str, Any]]:
        """Load every fold checkpoint, checking that each one's channels match the bundle's."""
        loaded = []
        for path in self.model_paths:
            ckpt = load_checkpoint(path)
            if list(ckpt.get("channels", [])) != self.channels:
                raise SapError(
                    f"{path}: channels {ckpt.get('channels')} differ from the bundle's {self.channels} "
                    f"({self.path / BUNDLE_FILE})"
                )
            loaded.append(ckpt)
        return loaded


def is_bundle(path: str | Path) -> bool:
    """True for a bundle folder or its ``bundle.json``."""
    path = Path(path)
    return (path.is_dir() and (path / BUNDLE_FILE).is_file()) or (path.is_file() and path.name == BUNDLE_FILE)


def write_bundle(
    out_dir: str | Path,
    checkpoints: Sequence[str | Path | Mapping[str, Any]],
    threshold: float,
    min_volume_ml: float,
    method: str,
    overwrite: bool = False,
    **extra: Any,
) -> Path:
    """Write a bundle folder holding ``checkpoints`` as ``fold_1.pt`` … and ``bundle.json``.

    Args:
        out_dir: the bundle folder; refused when it already holds a ``bundle.json`` unless
            ``overwrite``.
        checkpoints: sap checkpoint dicts or paths to sap checkpoint files (fold order kept);
            all must carry the same channel names.
        threshold: operating threshold in [0, 1] tuned for the ensemble (mean probability).
        min_volume_ml: components smaller than this (mL) are dropped at inference (≥ 0).
        method: the initialisation the models come from (``baseline``, ``ssl``, ``sap``).
        extra: further JSON-serialisable entries for ``bundle.json`` (e.g. the tuning objective;
            ``synthetic=True, synthetic_data={...}`` for models trained on synthetic data).

    The folder is built under a temporary sibling and renamed into place, so a crash never
    leaves half a bundle. Returns the bundle folder.
    """
    out_dir = Path(out_dir)
    if not checkpoints:
        raise SapError(f"{out_dir}: a bundle needs at least one checkpoint")
    if not 0.0 <= float(threshold) <= 1.0:
        raise SapError(f"{out_dir}: bundle threshold {threshold} is outside [0, 1]")
    if float(min_volume_ml) < 0:
        raise SapError(f"{out_dir}: bundle min_volume_ml {min_volume_ml} is negative")
    if (out_dir / BUNDLE_FILE).exists() and not overwrite:
        raise SapError(f"{out_dir}: bundle exists; pass --overwrite to replace it")
    loaded: list[dict[str, Any]] = []
    for source in checkpoints:
        if isinstance(source, Mapping):
            if not check_format(source.get("format"), str(out_dir)):
                raise SapError(f"{out_dir}: a bundle holds sap checkpoints only")
            loaded.append(dict(source))
        else:
            loaded.append(load_checkpoint(source))
    channels = list(loaded[0].get("channels", []))
    for index, ckpt in enumerate(loaded, start=1):
        if list(ckpt.get("channels", [])) != channels:
            raise SapError(f"{out_dir}: fold model {index} has channels {ckpt.get('channels')}, fold 1 {channels}")
    names = [f"fold_{i}.pt" for i in range(1, len(loaded) + 1)]
    manifest = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "method": str(method),
        "models": names,
        "threshold": float(threshold),
        "min_volume_ml": float(min_volume_ml),
        "channels": channels,
        "research_use_only": True,
        "note": RESEARCH_USE_ONLY,
        **extra,
    }
    with staged_folder(out_dir) as staging:
        for name, ckpt in zip(names, loaded, strict=True):
            save_checkpoint(ckpt, staging / name)
        (staging / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def read_bundle(path: str | Path) -> Bundle:
    """Read and validate ``bundle.json`` (``path`` = the folder or the file itself).

    Raises :class:`SapError` naming the file when it is missing, not JSON, of another format or
    version, lists no models, names a model file that is absent, or carries an invalid threshold.
    Checkpoints themselves are read by :meth:`Bundle.checkpoints`.
    """
    path = Path(path)
    manifest_path = path if path.name == BUNDLE_FILE else path / BUNDLE_FILE
    if not manifest_path.is_file():
        raise SapError(f"{path}: not a sap bundle (no {BUNDLE_FILE})")
    try:
        raw = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SapError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != BUNDLE_FORMAT:
        raise SapError(f"{manifest_path}: format is not {BUNDLE_FORMAT!r}")
    if raw.get("version") != BUNDLE_VERSION:
        raise SapError(f"{manifest_path}: bundle version {raw.get('version')!r} is not supported (expected {BUNDLE_VERSION})")
    models = raw.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise SapError(f"{manifest_path}: 'models' must be a non-empty list of file names")
    folder = manifest_path.parent
    paths = [(folder / name).resolve() for name in models]
    absent = [str(p.name) for p in paths if not p.is_file()]
    if absent:
        raise SapError(f"{manifest_path}: model files missing: {', '.join(absent)}")
    try:
        threshold = float(raw["threshold"])
        min_volume = float(raw.get("min_volume_ml", 0.0))
    except (KeyError, TypeError, ValueError) as exc:
        raise SapError(f"{manifest_path}: needs a numeric 'threshold' (and 'min_volume_ml')") from exc
    if not 0.0 <= threshold <= 1.0 or min_volume < 0:
        raise SapError(f"{manifest_path}: threshold {threshold} outside [0, 1] or negative min_volume_ml {min_volume}")
    channels = raw.get("channels")
    if not isinstance(channels, list) or not channels:
        raise SapError(f"{manifest_path}: 'channels' must list the channel names")
    known = {"format", "version", "method", "models", "threshold", "min_volume_ml", "channels", "research_use_only"}
    return Bundle(
        path=folder,
        method=str(raw.get("method", "")),
        model_paths=paths,
        threshold=threshold,
        min_volume_ml=min_volume,
        channels=[str(c) for c in channels],
        research_use_only=bool(raw.get("research_use_only", True)),
        extra={k: v for k, v in raw.items() if k not in known},
    )
