"""The resumability rules of a cross-validated study (SPEC §1, §10): step markers, hashes, manifest.

The folder layout itself is :mod:`sap.run_layout` (one place for every stage, the study and the
report).

Every finished step leaves a marker ``STEP.done.json`` beside its outputs holding the hash of the
settings the step depends on, its duration and what it wrote. A step whose marker matches is
reused; a step without a marker is (re)done from its last checkpoint; a marker with another hash
means the folder holds results of a different config and is refused without ``--overwrite``.
Markers also carry the durations, so ``manifest.json`` can be rebuilt after folds were computed
on several machines and copied together (``sap report`` merges).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from sap.config import PATH_KEYS, Config, without_keys
from sap.errors import SapError
from sap.files import LOCK_NAME, atomic_write_text
from sap.run_layout import (
    ALL_METHODS,
    FOLD_EXTRA,
    FOLD_SECTIONS,
    METHODS,
    NETWORK_SECTIONS,
    PRETRAIN_OF,
    REFERENCE,
    STUDY_SECTIONS,
    RunDir,
)

METHOD_LABELS = {"baseline": "Baseline", "ssl": "SSL", "sap": "SAP", REFERENCE: "Reference"}

MANIFEST_VERSION = 1
_PACKAGES = ("torch", "monai", "numpy", "scipy", "SimpleITK", "nibabel",
             "connected-components-3d", "pandas", "matplotlib", "scikit-learn", "accelerate")


def canonical_method(name: str) -> str:
    """``scratch`` → ``baseline``; unknown names are an error."""
    name = name.strip().lower()
    name = "baseline" if name == "scratch" else name
    if name not in METHODS:
        raise SapError(f"unknown method {name!r}: choose from baseline (alias scratch), ssl, sap")
    return name


def parse_methods(text: str | list[str] | None, default: list[str]) -> list[str]:
    """``"baseline,sap"`` or a list → canonical names in report order, duplicates removed."""
    items = default if text is None else (text.split(",") if isinstance(text, str) else text)
    chosen = {canonical_method(item) for item in items if item.strip()}
    if not chosen:
        raise SapError("no method chosen: pass --methods baseline,ssl,sap (or a subset)")
    return [m for m in METHODS if m in chosen]


def parse_folds(text: str | None, k: int) -> list[int]:
    """``"1,2"`` → [1, 2]; None → every test fold 1…k−1. Fold 0 (tuning) is not a test fold."""
    if text is None:
        return list(range(1, k))
    folds = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) < k:
            raise SapError(f"--folds {text}: {item!r} is not a test fold (1…{k - 1}; fold 0 tunes the threshold)")
        folds.append(int(item))
    if not folds:
        raise SapError(f"--folds {text}: no fold given")
    return sorted(set(folds))


def settings_hash(cfg: Config, sections: tuple[str, ...]) -> str:
    """Hash of the config sections (dotted names allowed) a step depends on; paths excluded."""
    full = without_keys(cfg.to_dict(), PATH_KEYS)
    content: dict[str, Any] = {}
    for dotted in sections:
        node: Any = full
        for part in dotted.split("."):
            node = node[part]
        content[dotted] = node
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def pretrain_hash(cfg: Config, stage: str) -> str:
    """Settings a pretraining stage depends on: the SSL options only matter to the ``ssl`` stage."""
    pretrain = {k: v for k, v in cfg.to_dict()["pretrain"].items() if stage == "ssl" or k != "ssl"}
    return hashlib.sha256(json.dumps([stage, settings_hash(cfg, NETWORK_SECTIONS), pretrain],
                                     sort_keys=True).encode()).hexdigest()[:16]


#: version of the reference detector's definition (a change of sap.cv.reference bumps it, so
#: stored reference maps of an older definition are redone)
REFERENCE_VERSION = 1


def fold_hash(cfg: Config, method: str) -> str:
    """Settings a fine-tuned fold (and its predictions) depends on, pretraining included when the
    method starts from pretrained weights. The reference detector's maps depend on the data
    settings and the splits only."""
    if method == REFERENCE:
        base = settings_hash(cfg, ("scale", "data", "cv.k", "cv.seed"))
        return hashlib.sha256(f"{REFERENCE}:{REFERENCE_VERSION}:{base}".encode()).hexdigest()[:16]
    stage = PRETRAIN_OF[method]
    base = settings_hash(cfg, (*NETWORK_SECTIONS, *FOLD_EXTRA))
    return base if stage is None else hashlib.sha256(f"{base}:{pretrain_hash(cfg, stage)}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- step markers
def marker_path(folder: Path, step: str) -> Path:
    return folder / f"{step}.done.json"


def read_marker(folder: Path, step: str) -> dict[str, Any] | None:
    """The marker of a finished step, or None when the step has not finished."""
    path = marker_path(folder, step)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SapError(f"{path}: corrupt step marker ({exc.msg}); delete it to redo the step") from exc


def step_done(folder: Path, step: str, config_hash: str, overwrite: bool = False) -> bool:
    """True when ``step`` finished in ``folder`` with the same settings.

    A marker with another hash means the folder holds results of a different config: an error
    naming the folder, unless ``overwrite`` (then the marker is dropped and the step redone).
    """
    marker = read_marker(folder, step)
    if marker is None:
        return False
    if marker.get("config_hash") == config_hash:
        return True
    if overwrite:
        marker_path(folder, step).unlink()
        return False
    raise SapError(
        f"{folder}: holds '{step}' results of another config (hash {marker.get('config_hash')} ≠ "
        f"{config_hash}); use a new --out or pass --overwrite to redo it"
    )


def mark_done(folder: Path, step: str, config_hash: str, seconds: float, **info: Any) -> Path:
    """Write the marker of a finished step (atomically, after its outputs)."""
    record = {"step": step, "config_hash": config_hash, "seconds": round(float(seconds), 3),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "host": platform.node(), **info}
    return atomic_write_text(marker_path(folder, step), json.dumps(record, indent=1, default=str) + "\n")


def clear_folder(folder: Path) -> None:
    """Empty a stale step folder (only called with ``--overwrite``); its lock file stays."""
    if not folder.exists():
        return
    for child in folder.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# ---------------------------------------------------------------------------------- manifest
def package_versions() -> dict[str, str | None]:
    from sap import __version__

    # sap's own version from the running code: its distribution is called sap-bone, and a source
    # tree on PYTHONPATH has none at all
    out: dict[str, str | None] = {"python": platform.python_version(), "sap": __version__}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def manifest_commits(manifest: dict) -> list[str]:
    """Every git commit that ran ``sap cv`` or ``sap report`` on a run, oldest first, from its
    manifest; a manifest of an earlier sap holds only ``git_commit``, the latest one."""
    if manifest.get("git_commits"):
        return list(manifest["git_commits"])
    return [manifest["git_commit"]] if manifest.get("git_commit") else []


def git_commit() -> str | None:
    """Commit of the sap source tree when it is a git checkout (with ``+dirty`` for local edits)."""
    source = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def collect_durations(run: RunDir) -> dict[str, float]:
    """Seconds of every finished step, read from the markers (merges folds from other machines)."""
    out: dict[str, float] = {}
    for path in sorted(run.root.rglob("*.done.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        key = str(path.parent.relative_to(run.root) / record.get("step", path.name)).replace("\\", "/")
        out[key] = float(record.get("seconds", float("nan")))
    return out


def write_manifest(run: RunDir, cfg: Config, methods: list[str], extra: dict[str, Any] | None = None) -> Path:
    """(Re)write ``RUN/manifest.json`` from the config and the step markers on disk."""
    previous: dict[str, Any] = {}
    if run.manifest.is_file():
        try:
            previous = json.loads(run.manifest.read_text())
        except json.JSONDecodeError:
            previous = {}
    commit = git_commit()
    commits = manifest_commits(previous)
    if commit and commit not in commits:
        commits.append(commit)
    manifest = {
        "version": MANIFEST_VERSION,
        "config_hash": settings_hash(cfg, STUDY_SECTIONS),
        "fold_hash": settings_hash(cfg, FOLD_SECTIONS),
        "scale": cfg.scale,
        "methods": sorted(set(previous.get("methods", [])) | set(methods), key=ALL_METHODS.index),
        "k": cfg.cv.k,
        "seeds": {"cv": cfg.cv.seed, "pretrain": cfg.pretrain.seed, "finetune": cfg.finetune.seed,
                  "evaluate": cfg.evaluate.seed},
        "packages": package_versions(),
        "git_commit": commit,
        # every commit that ran sap cv or sap report on this run folder, oldest first: a study
        # resumed or finished on another checkout says so in its report, not only the last one
        "git_commits": commits,
        "created": previous.get("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "durations_s": collect_durations(run),
        **(previous.get("extra", {}) and {"extra": previous["extra"]}),
    }
    if extra:
        manifest["extra"] = {**manifest.get("extra", {}), **extra}
    return atomic_write_text(run.manifest, json.dumps(manifest, indent=1, default=str) + "\n")


def load_run_config(path: Path) -> Config:
    """The resolved config stored in a run folder.

    A run written by an older sap may hold keys this version no longer knows (e.g. a removed
    option of another stage); those are dropped with a warning so the run can still be reported,
    while wrong types or values of known keys stay errors.
    """
    import dataclasses
    import sys
    import typing

    from sap.config import ConfigError, config_from_dict, load_config, read_yaml

    try:
        return load_config(path)
    except ConfigError:
        raw = read_yaml(path)
    dropped: list[str] = []

    def prune(cls: type, node: Any, prefix: str) -> Any:
        if not isinstance(node, dict) or not dataclasses.is_dataclass(cls):
            return node
        hints = typing.get_type_hints(cls)
        out = {}
        for key, value in node.items():
            if key not in hints:
                dropped.append(prefix + key)
                continue
            out[key] = prune(hints[key], value, f"{prefix}{key}.") if dataclasses.is_dataclass(hints[key]) else value
        return out

    cfg = config_from_dict(prune(Config, raw, ""), source=str(path))
    print(f"sap: warning: {path}: ignored keys this sap version does not know: {', '.join(dropped)}",
          file=sys.stderr)
    return cfg
