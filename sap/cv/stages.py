"""The one place where ``sap cv`` calls the stages (SPEC §1: only ``sap/cv`` imports stages).

Each function here is a thin adapter over a stage's importable Python function, so a change in a
stage's signature is fixed in one place. Stage imports happen inside the functions: the report
can be rebuilt without torch being imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sap.config import Config
from sap.data.cases import Case
from sap.errors import SapError
from sap.files import atomic_write_text


def _missing(stage: str, name: str) -> SapError:
    return SapError(f"sap cv needs {stage}.{name}, which this installation of sap does not provide yet")


# ------------------------------------------------------------------------------------ pretraining
def pretrain(cfg: Config, stage: str, run_root: Path, resume: bool, progress: bool = True) -> Path:
    """Run ``sap pretrain --stage STAGE`` into ``RUN/pretrain/STAGE``; return the best checkpoint.

    Without ``resume`` whatever a killed attempt left before its first checkpoint is replaced
    (the study's step marker says the stage has not finished).
    """
    from sap.pretrain import run_pretrain

    cfg = dataclasses.replace(cfg, out=str(run_root))
    result = run_pretrain(cfg, stage, resume=resume, overwrite=not resume, progress=progress)
    return Path(result.best)


# ------------------------------------------------------------------------------------ fine-tuning
def finetune(cfg: Config, init: str, fold: int, run_root: Path, pretrained: Path | None, resume: bool,
             progress: bool = True) -> Path:
    """Run ``sap finetune --init INIT --fold FOLD`` into ``RUN/{method}/fold_{FOLD}``."""
    try:
        from sap.finetune import run_finetune
    except ImportError as exc:
        raise _missing("sap.finetune", "run_finetune") from exc
    cfg = dataclasses.replace(cfg, out=str(run_root))
    result = run_finetune(cfg, init, fold, pretrained=pretrained, resume=resume, overwrite=not resume,
                          progress=progress)
    return Path(getattr(result, "out_dir", run_root))


def fine_tuning_start(cfg: Config, init: str, pretrained: Path | str | None) -> dict[str, Any]:
    """The weights a fine-tuning with ``cfg`` started from (before its first step), rebuilt: the
    stage seeds torch with ``finetune.seed`` and then builds the init's model (random parts from
    that seed, the pretrained part from ``pretrained``), so the same calls in the same order give
    the same tensors. The output head ``out.*`` differs: fine-tuning then sets its bias to the
    lesion prior of the training exams (``finetune.prior_head``). Parameters only (no buffers)."""
    from sap.finetune.train import build_model
    from sap.models.training import seed_everything

    seed_everything(cfg.finetune.seed)
    model = build_model(cfg, init, len(cfg.data.channels), pretrained, verbose=False)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------------ inference
def load_predictor(checkpoint: Path | str, cfg: Config) -> Any:
    """A loaded lesion model (checkpoint or bundle) from ``sap.infer``, reused across cases."""
    from sap.infer import load_model

    return load_model(checkpoint, expect_kind="lesion")


def predict_probability(predictor: Any, case: Case, cfg: Config) -> tuple[np.ndarray, Any]:
    """Foreground probability ``(X, Y, Z)`` float32 (canonical, source grid) of one case and the
    geometry to write it with (the first channel's)."""
    from sap.data.io import read_geometry
    from sap.infer import predict

    i = cfg.infer
    prob = predict(case, predictor, tta=i.tta, overlap=i.overlap, sw_batch_size=i.sw_batch_size, amp=i.amp)
    return prob, read_geometry(next(iter(case.channels.values())))


def set_checkpoint_threshold(path: Path, threshold: float, min_volume_ml: float) -> None:
    """Write the tuned operating point into a fine-tuned checkpoint (atomically)."""
    from sap.models.weights import load_checkpoint, save_checkpoint

    checkpoint = load_checkpoint(path)
    checkpoint["threshold"] = float(threshold)
    checkpoint["min_volume_ml"] = float(min_volume_ml)
    save_checkpoint(checkpoint, path)


def write_bundle(members: Sequence[Path], threshold: float, min_volume_ml: float, out: Path, method: str,
                 **info: Any) -> Path:
    """An ensemble bundle ``sap infer --model`` accepts (format owned by ``sap.models.bundle``)."""
    from sap.models.bundle import write_bundle as _write

    return _write(out, list(members), threshold=threshold, min_volume_ml=min_volume_ml, method=method,
                  overwrite=True, **info)


# ------------------------------------------------------------------------------------ evaluation
def evaluate_pairs(
    pairs: Sequence[tuple[str, Path, Path]],
    settings_by_case: dict[str, Any],
    summary_settings: Any,
    out_dir: Path,
    on_case: Callable[[str, np.ndarray, np.ndarray, tuple], None] | None = None,
    extra: Callable[[], dict[str, Callable[[Path], Any]]] | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """Evaluate (case, ground truth, prediction) triples, each at its own settings; write
    ``patients.csv``, ``lesions.csv``, ``summary.json`` and, for probability maps,
    ``candidates.csv`` (:func:`write_candidates`) to ``out_dir``. Returns (results, summary).

    Uses ``sap.evaluate``'s file reading and writing and ``sap.metrics`` for the rules; the pairs
    are given explicitly because a study's test cases and their predictions live in different
    folders than ``sap evaluate`` would search. ``on_case(case_id, prob, gt, spacing)`` sees each
    case's arrays once (the study attributes lesions to skeletal regions there); ``extra()``, called
    after the last case, gives more files (name → writer) published together with the three.
    """
    from sap.evaluate.api import CasePair, load_pair, write_outputs
    from sap.metrics import evaluate_case, summarize

    results = []
    for case_id, gt, pred in pairs:
        prob, mask, spacing = load_pair(CasePair(case_id, Path(gt), Path(pred)))
        results.append(evaluate_case(prob, mask, spacing, settings_by_case[case_id], case_id=case_id))
        if on_case is not None:
            on_case(case_id, prob, mask, spacing)
    summary = summarize(results, summary_settings)
    files = extra() if extra is not None else {}
    if results and all(r.candidates is not None for r in results):
        files = {CANDIDATES_FILE: lambda p: write_candidates(p, results), **files}
    write_outputs(out_dir, results, summary, overwrite=True, extra=files)
    return results, summary


#: the FROC candidates of every evaluated test case (paired FROC bootstrap of the report)
CANDIDATES_FILE = "candidates.csv"


def write_candidates(path: Path, results: Sequence[Any]) -> Path:
    """``candidates.csv`` (:data:`sap.metrics.CANDIDATE_COLUMNS`) of evaluated cases, so the report
    can redraw FROC curves on resampled cases without reading the probability maps again."""
    import pandas as pd

    from sap.metrics import CANDIDATE_COLUMNS, candidate_rows

    rows = [row for r in results for row in candidate_rows(r.case_id, r.candidates)]
    # repr-precision floats: the stored scores give back the evaluation's FROC exactly
    text = pd.DataFrame(rows, columns=list(CANDIDATE_COLUMNS)).to_csv(index=False, float_format="%.17g")
    return atomic_write_text(path, text)


def read_evaluation_order(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A volume in the voxel order :func:`sap.evaluate.api.load_pair` uses (and its spacing), so
    skeleton labels and lesion ids line up with ``lesions.csv``."""
    from sap.evaluate.api import read_volume

    return read_volume(path)


def evaluation_to_canonical(array: np.ndarray, path: Path) -> np.ndarray:
    """Inverse of :func:`read_evaluation_order` for an array on the grid of ``path``: the
    canonical (RAS+) array :func:`sap.data.io.read_image` would give."""
    from sap.data.io import read_geometry, to_canonical

    return to_canonical(np.ascontiguousarray(array.T), read_geometry(path))  # evaluate reads (z, y, x)
