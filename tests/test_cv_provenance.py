"""Bundles and reports say when the training data were synthetic (sap.cv.provenance, bundle.json),
and the report's scale line lists the deviations from the paper's protocol."""

from __future__ import annotations

import json

from sap.config import load_config
from sap.cv.provenance import paper_deviations, synthetic_training_data, volume_cutoff_text
from sap.models.bundle import read_bundle, write_bundle
from sap.models.weights import CHECKPOINT_FORMAT


def test_a_sap_synth_cohort_marks_bundles_synthetic(tmp_path):
    assert synthetic_training_data(tmp_path) == {}  # no cohort.json: real data
    assert synthetic_training_data(None) == {}
    (tmp_path / "cohort.json").write_text(json.dumps({"preset": "demo", "seed": 2, "modality": "ct", "cases": []}))
    info = synthetic_training_data(tmp_path)  # an older sap synth wrote no "synthetic" key
    assert info == {"synthetic": True,
                    "synthetic_data": {"source": "sap synth", "preset": "demo", "seed": 2, "modality": "ct"}}
    (tmp_path / "cohort.json").write_text(json.dumps({"synthetic": False, "preset": "x"}))
    assert synthetic_training_data(tmp_path) == {}


def test_bundle_json_records_synthetic_training_data(tmp_path):
    ckpt = {"format": CHECKPOINT_FORMAT, "channels": ["T1", "b1000"], "state_dict": {}}
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "cohort.json").write_text(json.dumps({"synthetic": True, "preset": "demo", "seed": 0,
                                                    "lesion_volume_scale": 8}))
    out = write_bundle(tmp_path / "b", [ckpt], 0.5, 0.0, "sap", **synthetic_training_data(cohort))
    raw = json.loads((out / "bundle.json").read_text())
    assert raw["synthetic"] is True and raw["synthetic_data"]["preset"] == "demo"
    bundle = read_bundle(out)
    assert bundle.synthetic
    assert bundle.synthetic_text() == "sap synth cohort, preset demo, seed 0"
    real = read_bundle(write_bundle(tmp_path / "r", [ckpt], 0.5, 0.0, "sap"))
    assert not real.synthetic and real.synthetic_text() == ""
    assert "synthetic" not in json.loads((tmp_path / "r" / "bundle.json").read_text())


def test_deviations_are_read_from_the_config_and_the_cohort():
    paper = load_config("paper")
    assert paper_deviations(paper, None) == []
    assert volume_cutoff_text(paper, None) == "≥ 1 mL (the paper's cut-off)"
    cfg = load_config("paper", ["finetune.max_steps=300", "cv.k=3", "finetune.lr_sap_encoder=2e-4",
                                "evaluate.volume_threshold_ml=8"])
    assert paper_deviations(cfg, {"lesion_volume_scale": 8}) == [
        "lesion volumes scaled ×8", "fine-tuning steps 300 (paper 20000)", "folds k 3 (paper 7)",
        "lr SAP encoder 0.0002 (paper 2e-06)", "large-lesion cut-off (mL) 8 (paper 1)"]
    assert volume_cutoff_text(cfg, {"lesion_volume_scale": 8}) == (
        "≥ 8 mL (this cohort's lesion volumes are scaled ×8; the paper's cut-off is 1 mL)")


def test_manifest_keeps_every_commit_that_ran_the_study_and_the_report_names_them(tmp_path, monkeypatch):
    import sap.cv.rundir as rundir
    from sap import __version__
    from sap.cv.report import provenance_text

    run = rundir.RunDir(tmp_path / "run")
    run.root.mkdir()
    cfg = load_config("tiny")
    for commit in ("a" * 40, "b" * 40 + "+dirty", "b" * 40 + "+dirty"):  # resumed on another checkout, then again
        monkeypatch.setattr(rundir, "git_commit", lambda commit=commit: commit)
        rundir.write_manifest(run, cfg, ["sap"])
    manifest = json.loads(run.manifest.read_text())
    assert manifest["git_commits"] == ["a" * 40, "b" * 40 + "+dirty"] and manifest["git_commit"] == "b" * 40 + "+dirty"
    text = provenance_text(manifest)
    assert f"Run with sap {__version__}" in text and "git aaaaaaaaaaaa, then bbbbbbbbbbbb+dirty" in text
    assert "report built by" not in text  # the same version built it
    manifest["packages"]["sap"] = "0.0.1"
    assert provenance_text(manifest).endswith(f"report built by sap {__version__}.")
    # a manifest of an older sap (one commit, no list) still reads
    assert "git cccccccccccc." in provenance_text({"git_commit": "c" * 40, "packages": {"sap": __version__}})
