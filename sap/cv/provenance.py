"""Where a study's data and settings come from, as the report and the exported bundles state it.

* :func:`cohort_info`: the ``cohort.json`` that ``sap synth`` writes into every cohort it makes
  (its presence marks a synthetic cohort; ``"synthetic": true``, ``preset``, ``seed`` and
  ``lesion_volume_scale`` when the writing sap recorded them).
* :func:`synthetic_training_data`: the entries a bundle trained on such a cohort carries in
  ``bundle.json`` (``sap infer`` warns when it loads one).
* :func:`paper_deviations`: every setting of a run that differs from the paper's protocol
  (``configs/paper.yaml``, read through :func:`sap.config.load_config`, never restated here) and
  the cohort's lesion volume scale, for the report's scale line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sap.config import Config
from sap.data.cases import read_cohort_json

#: settings compared with the paper preset for the scale line: (dotted key, what it is)
DEVIATION_KEYS: tuple[tuple[str, str], ...] = (
    ("finetune.max_steps", "fine-tuning steps"),
    ("pretrain.max_steps", "pretraining steps"),
    ("pretrain.ssl.max_steps", "SSL pretraining steps"),
    ("cv.k", "folds k"),
    ("finetune.lr_scratch", "lr baseline"),
    ("finetune.lr_ssl_encoder", "lr SSL encoder"),
    ("finetune.lr_ssl_decoder", "lr SSL decoder"),
    ("finetune.lr_sap_encoder", "lr SAP encoder"),
    ("finetune.lr_sap_decoder", "lr SAP decoder"),
    ("pretrain.lr", "lr pretraining"),
    ("finetune.batch_size", "batch size"),
    ("model.feature_size", "feature size"),
    ("model.patch_size", "patch"),
    ("evaluate.volume_threshold_ml", "large-lesion cut-off (mL)"),
)


def cohort_info(data_root: str | Path | None) -> dict[str, Any] | None:
    """``ROOT/cohort.json`` without its per-case records, or None when the cohort has none (or it
    cannot be read: the report still builds)."""
    return read_cohort_json(data_root, strict=False)


def is_synthetic(cohort: dict[str, Any] | None) -> bool:
    """A cohort with a ``cohort.json`` was made by ``sap synth`` unless it says otherwise."""
    return cohort is not None and bool(cohort.get("synthetic", True))


def synthetic_training_data(data_root: str | Path | None) -> dict[str, Any]:
    """Entries for ``bundle.json`` when the models were trained on a ``sap synth`` cohort:
    ``{"synthetic": true, "synthetic_data": {"preset", "seed", "modality", "lesion_volume_scale"}}``
    (those the cohort recorded); ``{}`` for real data."""
    cohort = cohort_info(data_root)
    if not is_synthetic(cohort):
        return {}
    assert cohort is not None
    details = {k: cohort[k] for k in ("preset", "seed", "modality", "lesion_volume_scale") if k in cohort}
    return {"synthetic": True, "synthetic_data": {"source": "sap synth", **details}}


def synthetic_text(info: dict[str, Any] | None) -> str:
    """``sap synth cohort, preset demo, seed 0`` from a cohort or bundle record."""
    info = info or {}
    parts = ["sap synth cohort"]
    if info.get("preset") is not None:
        parts.append(f"preset {info['preset']}")
    if info.get("seed") is not None:
        parts.append(f"seed {info['seed']}")
    return ", ".join(parts)


def lesion_volume_scale(cohort: dict[str, Any] | None) -> float:
    """The cohort's lesion volume scale s (1 when it records none)."""
    try:
        return float((cohort or {}).get("lesion_volume_scale") or 1.0)
    except (TypeError, ValueError):
        return 1.0


def _get(cfg: Config, dotted: str) -> Any:
    if dotted == "pretrain.ssl.max_steps":  # None: as long as the skeletal pretraining
        return cfg.pretrain.ssl.max_steps if cfg.pretrain.ssl.max_steps is not None else cfg.pretrain.max_steps
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "×".join(_show(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def paper_config() -> Config:
    """The paper's protocol: the ``paper`` preset."""
    from sap.config import load_config

    return load_config("paper")


def paper_deviations(cfg: Config, cohort: dict[str, Any] | None) -> list[str]:
    """Every deviation of a run from the paper's protocol, as short phrases: the cohort's lesion
    volume scale (when ≠ 1) and each :data:`DEVIATION_KEYS` setting that differs from the
    ``paper`` preset (``"fine-tuning steps 300 (paper 20000)"``)."""
    paper = paper_config()
    out = []
    scale = lesion_volume_scale(cohort)
    if scale != 1.0:
        out.append(f"lesion volumes scaled ×{scale:g}")
    features = ((cohort or {}).get("difficulty") or {}).get("features") or []
    if features:
        out.append(f"synthetic difficulty features {', '.join(map(str, features))} (ours, docs/cohort.md)")
    for key, label in DEVIATION_KEYS:
        ours, theirs = _get(cfg, key), _get(paper, key)
        if ours != theirs:
            out.append(f"{label} {_show(ours)} (paper {_show(theirs)})")
    return out


def volume_cutoff_text(cfg: Config, cohort: dict[str, Any] | None) -> str:
    """The large-lesion cut-off in use and the paper's, e.g. "≥ 8 mL (this cohort's lesion volumes
    are scaled ×8; the paper's cut-off is 1 mL)"."""
    v = float(cfg.evaluate.volume_threshold_ml)
    paper_v = float(paper_config().evaluate.volume_threshold_ml)
    scale = lesion_volume_scale(cohort)
    if v == paper_v and scale == 1.0:
        return f"≥ {v:g} mL (the paper's cut-off)"
    why = f"this cohort's lesion volumes are scaled ×{scale:g}; " if scale != 1.0 else ""
    return f"≥ {v:g} mL ({why}the paper's cut-off is {paper_v:g} mL)"
