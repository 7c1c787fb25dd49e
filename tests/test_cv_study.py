"""A miniature study end to end on CPU with the real stages (SPEC §10): tiny synthetic cohort,
baseline + sap, k = 3 (tuning fold + two test folds), one optimiser step per stage.

Checks: a fold-limited run followed by the full run redoes no finished fold (the "killed
halfway" case: the first run stops after fold 1); the report's Table 1 equals ``sap evaluate``
run separately on the same predictions and threshold; the tuned threshold is in the fold
checkpoints; ``sap infer`` runs the exported ensemble bundle, which (like the report) says it was
trained on synthetic data; the reference detector runs beside the networks without training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from sap.cli import main
from sap.config import load_config
from sap.cv import stages
from sap.cv.study import run_study

OVERRIDES = [
    "cv.methods=[baseline,sap]",
    "pretrain.max_steps=1", "pretrain.val_every_steps=1",
    "finetune.max_steps=1", "finetune.val_every_steps=1",
    "infer.overlap=0.0",
    "evaluate.n_bootstrap=50",
    # MONAI's head initialisation: after one step the maps are far from 0, so the report's numbers
    # are not all zero/undefined and the cross-check below compares real values
    "finetune.prior_head=false",
]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from sap.data.synth import make_cohort

    return make_cohort(tmp_path_factory.mktemp("cohort") / "tiny", preset="tiny", seed=0, progress=False)


@pytest.fixture(scope="module")
def study(cohort, tmp_path_factory):
    """Run fold 1 only (as if the study had been killed after it), then the whole study."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("study")
    cfg = load_config("tiny", OVERRIDES)
    cfg.data.root, cfg.out = str(cohort), str(root / "run")
    calls: list[tuple[str, int]] = []
    bars: list[bool] = []  # the progress setting each training stage was called with
    real_finetune, real_pretrain = stages.finetune, stages.pretrain

    def counting_finetune(cfg, init, fold, run_root, pretrained, resume, progress=True):
        calls.append((init, fold))
        bars.append(progress)
        return real_finetune(cfg, init, fold, run_root, pretrained, resume, progress=progress)

    def recording_pretrain(cfg, stage, run_root, resume, progress=True):
        bars.append(progress)
        return real_pretrain(cfg, stage, run_root, resume, progress=progress)

    stages.finetune, stages.pretrain = counting_finetune, recording_pretrain
    try:
        run_study(cfg, folds="1", progress=False)
        first_calls = list(calls)
        run_dir = root / "run"
        fold1_files = {p: p.stat().st_mtime_ns for m in ("baseline", "sap")
                       for p in (run_dir / m / "fold_1").rglob("*") if p.is_file() and p.suffix != ".pt"}
        assert not (run_dir / "report" / "report.md").exists()  # the study is not finished yet
        run_study(cfg, export=root / "models", progress=False)
    finally:
        stages.finetune, stages.pretrain = real_finetune, real_pretrain
    return {"cfg": cfg, "run": run_dir, "root": root, "first_calls": first_calls, "calls": calls,
            "fold1_files": fold1_files, "bars": bars}


def test_resumed_study_reuses_finished_folds(study):
    assert sorted(study["first_calls"]) == [("sap", 1), ("scratch", 1)]
    assert sorted(study["calls"][len(study["first_calls"]):]) == [("sap", 2), ("scratch", 2)]
    # progress=False (sap cv/demo --no-progress) reaches the stages: no training bars in a batch log
    assert len(study["bars"]) == 5 and not any(study["bars"])  # skeletal pretraining + 4 fine-tunes
    for path, mtime in study["fold1_files"].items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"
    manifest = json.loads((study["run"] / "manifest.json").read_text())
    assert {"config_hash", "packages", "git_commit", "seeds", "durations_s"} <= set(manifest)
    assert any(k.startswith("sap/fold_2/finetune") for k in manifest["durations_s"])


def test_report_table1_matches_sap_evaluate(study, tmp_path):
    run = study["run"]
    splits = json.loads((run / "splits.json").read_text())
    test_cases = [c for f in ("1", "2") for c in splits["folds"][f]]
    gt = tmp_path / "gt"
    gt.mkdir()
    for case_id in test_cases:
        shutil.copy(study["cfg"].data.root + f"/patients/{case_id}/GT.nii.gz", gt / f"{case_id}.nii.gz")
    table = pd.read_csv(run / "report" / "tables" / "table1.csv")
    for method in ("baseline", "sap"):
        threshold = json.loads((run / method / "threshold.json").read_text())["threshold"]
        out = tmp_path / method
        assert main(["evaluate", "--pred", str(run / method / "predictions"), "--gt", str(gt), "--out", str(out),
                     "--threshold", str(threshold), "--froc", "candidate", "--no-progress",
                     "--set", f"evaluate.volume_threshold_ml={study['cfg'].evaluate.volume_threshold_ml}"]) == 0
        separate = json.loads((out / "summary.json").read_text())
        assert separate["n_cases"] == len(test_cases)
        for _, row in table[table["method"] == method].iterrows():
            if row["key"] == "icc_burden":
                assert row["median"] == pytest.approx(separate["icc_burden"]["value"], nan_ok=True)
                continue
            m = separate["metrics"][row["key"]]
            assert row["n"] == m["n"], row["key"]
            assert row["median"] == pytest.approx(m["median"], nan_ok=True), row["key"]
        # the tuned threshold is in every fold checkpoint
        from sap.models.weights import load_checkpoint

        for fold in (1, 2):
            assert load_checkpoint(run / method / f"fold_{fold}" / "last.pt")["threshold"] == pytest.approx(threshold)
    md = (run / "report" / "report.md").read_text()
    assert "Research use only" in md and "not evidence" in md
    assert "synthetic data (sap synth cohort, preset tiny, seed 0)" in md
    # the reference detector is a column of Table 1 beside the networks, and was never trained
    wide = pd.read_csv(run / "report" / "tables" / "table1_wide.csv", dtype=str, keep_default_na=False)
    assert {"Baseline", "SAP", "Reference"} <= set(wide.columns)
    assert (run / "reference" / "evaluation" / "summary.json").is_file()
    assert not list((run / "reference").rglob("*.pt"))


def test_sap_infer_runs_the_exported_bundle(study, tmp_path, capsys):
    bundle = study["root"] / "models" / "sap"
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["synthetic"] is True  # the cohort was made by sap synth (it has a cohort.json)
    data = info["synthetic_data"]
    assert {k: data[k] for k in ("source", "preset", "seed", "modality")} == {
        "source": "sap synth", "preset": "tiny", "seed": 0, "modality": "mr"}
    ensemble = json.loads((study["run"] / "sap" / "ensemble_threshold.json").read_text())
    assert info["threshold"] == pytest.approx(ensemble["threshold"])
    assert len(info["models"]) == 2
    case = next(p for p in sorted((Path(study["cfg"].data.root) / "patients").iterdir()) if p.is_dir())
    out = tmp_path / "infer"
    capsys.readouterr()
    assert main(["infer", "-i", str(case), "-o", str(out), "--model", str(bundle), "--quiet"]) == 0
    assert (out / f"{case.name}_prob.nii.gz").is_file()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "synthetic" in line]
    assert len(warnings) == 1
    assert "trained on synthetic data (sap synth cohort, preset tiny, seed 0)" in warnings[0]
