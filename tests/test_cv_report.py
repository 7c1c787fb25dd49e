"""The study's threshold tuning, pooled evaluation, run-directory rules and report, on a small
cohort with fabricated fold predictions (tests/cv_fixtures.py; no training here).

Cross-checks: Table 1 against ``sap evaluate`` run separately on the same predictions and
threshold; the wide Table 1 against the long-form CSVs; the shared threshold against a
brute-force E9 search; regions against patients.csv; the reference detector's tuning against
test-fold cases it must not read.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sap.cli import main
from sap.cv.report import build_report
from sap.cv.rundir import mark_done, parse_folds, parse_methods, step_done
from sap.errors import SapError
from tests.cv_fixtures import (
    fabricate_features,
    fabricate_finetune_logs,
    fabricate_skeletal_log,
    make_fake_study,
)

METHODS = ("baseline", "ssl", "sap")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    s = make_fake_study(tmp_path_factory.mktemp("cv"), methods=METHODS)
    fabricate_features(s)
    fabricate_skeletal_log(s)
    fabricate_finetune_logs(s, METHODS)
    for fold in s.splits.test_folds:
        s.predict("reference", fold)
    for method in (*METHODS, "reference"):
        assert s.finalize(method)
    build_report(s.run.root, progress=False)
    return s


def _test_gt_dir(study, tmp: Path) -> Path:
    """Ground truth of the test cases only (what `sap evaluate --gt` should see)."""
    gt = tmp / "gt"
    gt.mkdir()
    for fold in study.splits.test_folds:
        for case_id in study.splits.test_cases(fold):
            shutil.copy(study.cases[case_id].lesions, gt / f"{case_id}.nii.gz")
    return gt


@pytest.mark.parametrize("method", ["baseline", "sap", "reference"])
def test_table1_matches_sap_evaluate_run_separately(study, tmp_path, method):
    threshold = json.loads(study.run.threshold(method).read_text())["threshold"]
    out = tmp_path / "eval"
    rc = main(["evaluate", "--pred", str(study.run.predictions(method)), "--gt", str(_test_gt_dir(study, tmp_path)),
               "--out", str(out), "--threshold", str(threshold), "--froc", "candidate", "--no-progress",
               "--set", f"evaluate.volume_threshold_ml={study.cfg.evaluate.volume_threshold_ml}"])
    assert rc == 0
    separate = json.loads((out / "summary.json").read_text())
    table = pd.read_csv(study.run.report / "tables" / "table1.csv")
    rows = table[table["method"] == method]
    assert len(rows) == 11
    for _, row in rows.iterrows():
        if row["key"] == "icc_burden":
            expected = separate["icc_burden"]["value"]
            assert row["median"] == pytest.approx(expected, nan_ok=True)
            continue
        m = separate["metrics"][row["key"]]
        assert row["n"] == m["n"], row["key"]
        if m["n"]:
            assert row["median"] == pytest.approx(m["median"]), row["key"]
            assert [row["q25"], row["q75"]] == pytest.approx([m["q25"], m["q75"]]), row["key"]
    # n_bootstrap differs between the study config (100) and the CLI default; the point
    # estimates above do not depend on it. Pooled values and the FROC-AUC do not either.
    pooled = pd.read_csv(study.run.report / "tables" / "pooled.csv").set_index("method")
    label = {"baseline": "Baseline", "sap": "SAP", "reference": "Reference"}[method]
    assert pooled.loc[label, "Pooled sensitivity ≥ 1 mL"] == pytest.approx(
        separate["pooled_sensitivity_1ml"], nan_ok=True)
    assert pooled.loc[label, "Mean FP ≥ 1 mL per exam"] == pytest.approx(separate["mean_fp_1ml"])
    auc = float(pooled.loc[label, "FROC-AUC (15 FPPI)"].split()[0])
    assert auc == pytest.approx(separate["froc"]["auc"], abs=0.005)


def test_shared_threshold_maximises_mean_f2_over_fold_model_tuning_pairs(study):
    """Brute force: for every grid threshold, mean F2 over every (fold model, tuning case) pair
    with lesions, from counts of `sap.metrics.detection_counts`; lowest of the best wins."""
    from sap.data.io import read_image
    from sap.metrics import detection_counts

    method = "sap"
    record = json.loads(study.run.threshold(method).read_text())
    grid = study.cfg.tuning.grid
    objective = []
    for t in grid:
        f2s = []
        for fold in study.splits.test_folds:
            for case_id in study.splits.tuning_cases():
                gt = read_image(study.cases[case_id].lesions)
                prob = read_image(study.run.tuning_predictions(method, fold) / f"{case_id}_prob.nii.gz").array
                c = detection_counts(prob, gt.array, gt.spacing, threshold=t)
                if c.n_gt > 0:
                    f2s.append(c.f2)
        objective.append(np.mean(f2s))
    best = max(objective)
    expected = min(t for t, v in zip(grid, objective, strict=True) if v >= best - 1e-12)
    assert record["mode"] == "shared"
    assert record["threshold"] == pytest.approx(expected)
    assert record["shared"]["objective_value"] == pytest.approx(best)
    summary = json.loads((study.run.evaluation(method) / "summary.json").read_text())
    assert summary["settings"]["threshold"] == pytest.approx(expected)
    assert summary["settings"]["froc"] == "candidate"


def test_regions_account_for_every_lesion_and_false_positive(study):
    for method in (*METHODS, "reference"):
        patients = pd.read_csv(study.run.evaluation(method) / "patients.csv")
        regions = pd.read_csv(study.run.evaluation(method) / "regions.csv")
        gt = regions[regions["kind"] == "gt"]
        pred = regions[regions["kind"] == "pred"]
        assert len(gt) == patients["n_gt"].sum()
        assert gt["matched"].sum() == patients["detected"].sum()
        assert (~pred["matched"]).sum() == patients["fp"].sum()
        # the fixture skeleton has five labelled slabs; lesions outside them are rib/other
        assert set(regions["region"]) <= {"cervical_spine", "thoracic_spine", "lumbar_spine", "pelvis", "femurs",
                                          "rib/other"}
    table = pd.read_csv(study.run.report / "tables" / "regions.csv")
    sap_rows = table[table["method"] == "sap"]
    regions = pd.read_csv(study.run.evaluation("sap") / "regions.csv")
    assert sap_rows["n_lesions"].sum() == (regions["kind"] == "gt").sum()


def test_report_files_state_scale_and_research_use(study):
    report = study.run.report
    md = (report / "report.md").read_text()
    html = (report / "report.html").read_text()
    for text in (md, html):
        assert "shows the pipeline, not evidence" in text
        assert "Research use only" in text
    figures = sorted(p.name for p in (report / "figures").glob("*.png"))
    assert figures == ["boxplots.png", "froc.png", "learning_curves.png", "overlays.png", "regions.png",
                       "skeletal_dice.png", "tsne.png", "volume.png"]
    for name in figures:
        data = (report / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
        assert f"figures/{name}" in md
    # self-contained HTML: every figure embedded, nothing linked
    assert html.count("data:image/png;base64,") == len(figures)
    assert 'src="figures/' not in html
    sig = pd.read_csv(report / "tables" / "significance.csv")
    assert {"p", "p_adj", "stars"} <= set(sig.columns)
    assert len(sig) == 3 * len(sig["metric"].unique())  # three network pairs per metric; no reference
    assert "reference" not in set(sig["method_a"]) | set(sig["method_b"])


def test_tsne_distances_are_computed_in_feature_space(study):
    from sap.cv.report import tsne_embeddings

    emb = tsne_embeddings(study.run)
    for method in ("ssl", "sap"):
        data = np.load(study.run.features / f"{method}.npz")
        f, lab = data["features"].astype(float), data["label"]
        c1, c0 = f[lab == 1].mean(0), f[lab == 0].mean(0)
        assert emb[method]["centroid_distance"] == pytest.approx(np.linalg.norm(c1 - c0))
        assert emb[method]["perplexity"] == pytest.approx(min(15, (len(lab) - 1) / 3))
        assert emb[method]["xy"].shape == (len(lab), 2)
    # the fixture shifts SAP's lesion features further from the negatives than SSL's
    assert emb["sap"]["centroid_distance"] > emb["ssl"]["centroid_distance"]


def test_sap_report_rebuilds_from_disk(study, capsys):
    md = study.run.report / "report.md"
    md.unlink()
    assert main(["report", "--run", str(study.run.root)]) == 0
    assert md.is_file()


def test_per_fold_thresholds_evaluate_each_fold_at_its_own(tmp_path):
    from sap.data.io import read_image
    from sap.metrics import EvaluationSettings, evaluate_case

    s = make_fake_study(tmp_path, methods=("sap",), threshold_mode="per_fold")
    assert s.finalize("sap")
    record = json.loads(s.run.threshold("sap").read_text())
    assert record["mode"] == "per_fold" and record["threshold"] is None
    patients = pd.read_csv(s.run.evaluation("sap") / "patients.csv", dtype={"case": str}).set_index("case")
    for fold in s.splits.test_folds:
        t = record["folds"][str(fold)]["threshold"]
        for case_id in s.splits.test_cases(fold):
            gt = read_image(s.cases[case_id].lesions)
            prob = read_image(s.run.predictions("sap") / f"{case_id}_prob.nii.gz").array
            row = evaluate_case(prob, gt.array, gt.spacing, EvaluationSettings(threshold=t)).row
            assert patients.loc[case_id, "n_pred"] == row["n_pred"]
            assert patients.loc[case_id, "detected"] == row["detected"]


def test_finalize_waits_for_missing_folds(tmp_path):
    s = make_fake_study(tmp_path, methods=("baseline",))
    (s.run.fold("baseline", 2) / "predict.done.json").unlink()
    assert s.finalize("baseline") is False
    assert not (s.run.evaluation("baseline") / "summary.json").exists()


# ------------------------------------------------------------------------------------ run dir
def test_step_markers_reuse_refuse_and_overwrite(tmp_path):
    mark_done(tmp_path, "finetune", "abc", 1.5, checkpoint="x")
    assert step_done(tmp_path, "finetune", "abc")
    assert not step_done(tmp_path, "predict", "abc")
    with pytest.raises(SapError, match="another config"):
        step_done(tmp_path, "finetune", "other")
    assert not step_done(tmp_path, "finetune", "other", overwrite=True)
    assert not (tmp_path / "finetune.done.json").exists()


def test_step_hashes_ignore_paths_and_unrelated_settings():
    from sap.config import load_config
    from sap.cv.rundir import fold_hash, pretrain_hash

    a = load_config("tiny")
    b = load_config("tiny", ["cv.threshold=per_fold", "evaluate.n_bootstrap=10", "cv.methods=[sap]"])
    b.data.root, b.out = "/elsewhere", "/run2"
    for method in ("baseline", "ssl", "sap"):
        assert fold_hash(a, method) == fold_hash(b, method)
    steps = load_config("tiny", ["finetune.max_steps=4"])
    assert all(fold_hash(a, m) != fold_hash(steps, m) for m in ("baseline", "ssl", "sap"))
    # SSL options change the SSL pretraining and the ssl folds only
    ssl = load_config("tiny", ["pretrain.ssl.temperature=0.2"])
    assert pretrain_hash(a, "skeletal") == pretrain_hash(ssl, "skeletal")
    assert pretrain_hash(a, "ssl") != pretrain_hash(ssl, "ssl")
    assert fold_hash(a, "sap") == fold_hash(ssl, "sap") and fold_hash(a, "baseline") == fold_hash(ssl, "baseline")
    assert fold_hash(a, "ssl") != fold_hash(ssl, "ssl")
    lr = load_config("tiny", ["pretrain.lr=0.5"])
    assert fold_hash(a, "baseline") == fold_hash(lr, "baseline") and fold_hash(a, "sap") != fold_hash(lr, "sap")


def test_method_and_fold_parsing():
    assert parse_methods("sap,scratch", ["baseline"]) == ["baseline", "sap"]
    assert parse_folds("2,1", 3) == [1, 2]
    assert parse_folds(None, 4) == [1, 2, 3]
    with pytest.raises(SapError, match="not a test fold"):
        parse_folds("0", 3)
    with pytest.raises(SapError, match="unknown method"):
        parse_methods("unet", ["sap"])


# ------------------------------------------------------------------------------------ t-SNE features
def _cached(seed: int, lesion_boxes):
    from types import SimpleNamespace

    rng = np.random.default_rng(seed)
    shape = (48, 48, 64)
    lesions = np.zeros(shape, np.uint8)
    for x, y, z, s in lesion_boxes:
        lesions[x : x + s, y : y + s, z : z + s] = 1
    body = np.zeros(shape, np.uint8)
    body[4:44, 4:44, :] = 1
    image = rng.normal(0.5, 0.1, (2, *shape)).astype(np.float32)
    return SimpleNamespace(case_id=f"c{seed}", image=image, body=body, lesions=lesions, shape=shape)


def test_t_sne_patches_are_lesion_centred_and_negatives_lesion_free():
    from sap.cv.features import select_patches

    cached = [_cached(0, [(10, 10, 10, 3), (30, 30, 40, 4)]), _cached(1, [(20, 24, 30, 2)]), _cached(2, [])]
    patch = (32, 32, 32)
    patches = select_patches(cached, patch, seed=0, max_patches=24)
    labels = [p[2] for p in patches]
    assert labels.count(1) == 3 and labels.count(0) == 3
    for index, start, label in patches:
        box = tuple(slice(int(a), int(a) + 32) for a in start)
        held = cached[index].lesions[box].sum()
        assert (held > 0) if label == 1 else (held == 0)
    # at most max_patches lesions, as many negatives
    many = [_cached(3, [(4 + 6 * i, 8, 8, 2) for i in range(6)])]
    assert sum(p[2] for p in select_patches(many, patch, seed=0, max_patches=4)) == 4


def test_encoder_features_have_16_times_feature_size_values():
    from sap.config import load_config
    from sap.cv.features import encoder_patch_features, select_patches
    from sap.models.swin import build_swin_unetr

    cfg = load_config("tiny")
    model = build_swin_unetr(cfg.model, in_channels=2, out_channels=2)
    cached = [_cached(0, [(10, 10, 10, 3)])]
    patches = select_patches(cached, (32, 32, 32), seed=0)
    feats = encoder_patch_features(model, cached, patches, (32, 32, 32), batch_size=2)
    assert feats.shape == (len(patches), 16 * cfg.model.feature_size)
    assert np.isfinite(feats).all() and not np.allclose(feats[0], feats[1])


def test_overlays_show_the_lesions_named_in_lesions_csv(study):
    """Files are stored in another axis order than the canonical arrays (fixture): the overlay
    must find lesion ids the way sap.evaluate numbered them."""
    from sap.cv.report import load_method, overlay_panels

    results = {m: load_method(study.run, m) for m in METHODS}
    panels = overlay_panels(study.run, results, study.cfg)
    assert len(panels) == 3
    for panel in panels:
        assert panel["measured_volume_ml"] == pytest.approx(panel["volume_ml"])
        assert panel["gt"].any()
        assert set(panel["pred"]) == set(METHODS)


def test_evaluation_order_round_trip(study):
    """The study reads skeletons in sap.evaluate's voxel order and maps lesions back to canonical
    arrays for display: the round trip must give read_image's array."""
    from sap.cv.stages import evaluation_to_canonical, read_evaluation_order
    from sap.data.io import read_image

    case = next(iter(study.cases.values()))
    for path in (case.skeleton, case.lesions):
        array, _ = read_evaluation_order(path)
        assert np.array_equal(evaluation_to_canonical(array, path), read_image(path).array)


def test_cv_command_rejects_bad_input_with_one_line(tmp_path, capsys):
    assert main(["cv", "--config", "tiny", "--out", str(tmp_path / "run")]) == 2
    assert "no data" in capsys.readouterr().err
    cohort = tmp_path / "cohort"
    from tests.cv_fixtures import write_study_cohort

    write_study_cohort(cohort, n_patients=6, n_healthy=1)
    assert main(["cv", "--config", "tiny", "--data", str(cohort), "--out", str(tmp_path / "run"),
                 "--folds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a test fold" in err[0]
    assert main(["report", "--run", str(tmp_path / "nothing")]) == 2
    assert "run folder not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the paper's shape
LABEL = {"baseline": "Baseline", "ssl": "SSL", "sap": "SAP", "reference": "Reference"}
_CELL = re.compile(r"(-?\d+\.\d\d) \[(-?\d+\.\d\d)–(-?\d+\.\d\d)\]")


def _parse_cell(text: str) -> tuple[float, float, float]:
    m = _CELL.fullmatch(text)
    assert m, f"not a 'median [lo–hi]' cell: {text!r}"
    return float(m.group(1)), float(m.group(2)), float(m.group(3))


def _md_table(md: str, header_start: str) -> list[list[str]]:
    """Rows (cells) of the Markdown table whose header line starts with ``header_start``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_wide_table1_equals_the_long_form_csv(study):
    """Every cell of the paper-shaped Table 1 (CSV and Markdown) is its long-form row, rounded."""
    tables = study.run.report / "tables"
    long = pd.read_csv(tables / "table1.csv")
    wide = pd.read_csv(tables / "table1_wide.csv", dtype=str, keep_default_na=False)
    methods = (*METHODS, "reference")
    assert list(wide.columns) == ["section", "metric", "key", *(LABEL[m] for m in methods)]
    metric_rows = wide[wide["key"].isin(set(long["key"]))]
    assert len(metric_rows) * len(methods) == len(long)  # one row per metric, one column per method
    for _, row in long.iterrows():
        cell = metric_rows.loc[metric_rows["key"] == row["key"], LABEL[row["method"]]]
        assert len(cell) == 1
        text = cell.iloc[0]
        if not np.isfinite(row["median"]):
            assert text == "–" or text.startswith("undefined ("), (row["key"], text)
            continue
        if text == "0.00 (no predicted burden)":
            assert row["key"] == "icc_burden" and abs(row["median"]) < 1e-9
            continue
        med, lo, hi = _parse_cell(text)
        assert med == pytest.approx(row["median"], abs=0.0051), (row["key"], row["method"])
        assert lo == pytest.approx(row["ci95_lo"], abs=0.0051), (row["key"], row["method"])
        assert hi == pytest.approx(row["ci95_hi"], abs=0.0051), (row["key"], row["method"])
    pooled = pd.read_csv(tables / "pooled.csv").set_index("method")
    for key, column in (("pooled_sensitivity", "Pooled sensitivity, all lesions"),
                        ("mean_fp", "Mean FP per exam, all lesions"),
                        ("pooled_sensitivity_1ml", "Pooled sensitivity ≥ 1 mL"),
                        ("mean_fp_1ml", "Mean FP ≥ 1 mL per exam")):
        for method in methods:
            text = wide.loc[wide["key"] == key, LABEL[method]].iloc[0]
            assert float(text) == pytest.approx(pooled.loc[LABEL[method], column], abs=0.0051), (key, method)
    for method in methods:
        auc = wide.loc[wide["key"] == "froc_auc", LABEL[method]].iloc[0]
        assert auc == pooled.loc[LABEL[method], "FROC-AUC (15 FPPI)"]
    # the Markdown shows the same cells, metrics as rows and methods as columns
    md = (study.run.report / "report.md").read_text()
    shown = _md_table(md, "| Section | Metric | Baseline | SSL | SAP | Reference |")
    assert len(shown) == len(wide)
    for cells, (_, row) in zip(shown, wide.iterrows(), strict=True):
        assert cells[1:] == [row["metric"], *(row[LABEL[m]] for m in methods)]


def test_significance_is_one_row_per_metric_with_method_pairs_as_columns(study):
    tables = study.run.report / "tables"
    sig = pd.read_csv(tables / "significance.csv")
    wide = pd.read_csv(tables / "significance_wide.csv", dtype=str, keep_default_na=False)
    pairs = ["Baseline vs SSL", "Baseline vs SAP", "SSL vs SAP"]
    assert list(wide.columns) == ["metric", "key", "test", *pairs]
    assert list(wide["key"]) == list(dict.fromkeys(sig["metric"]))
    for _, row in sig.iterrows():
        text = wide.loc[wide["key"] == row["metric"], f"{LABEL[row['method_a']]} vs {LABEL[row['method_b']]}"].iloc[0]
        if not np.isfinite(row["p_adj"]):
            assert text == "–"
            continue
        value, mark = text.rsplit(" ", 1)
        expected_mark = row["stars"] if isinstance(row["stars"], str) and row["stars"] else "n.s."
        assert mark == expected_mark
        if value == "< 0.001":
            assert row["p_adj"] < 0.001
        else:
            assert float(value) == pytest.approx(row["p_adj"], abs=0.00051)


def test_froc_curves_are_candidate_mode_and_monotone_in_both_axes(study):
    from sap.cv.figures import froc_plot_points

    checked = 0
    for method in (*METHODS, "reference"):
        summary = json.loads((study.run.evaluation(method) / "summary.json").read_text())
        for key in ("froc", "froc_1ml"):
            curve = summary[key]
            assert curve is not None and curve["fppi"], (method, key)
            assert curve["mode"] == "candidate"
            for xs, ys in ((np.asarray(curve["fppi"]), np.asarray(curve["sensitivity"])), froc_plot_points(curve)):
                assert xs[0] == 0 and ys[0] == 0
                assert np.all(np.diff(xs) >= 0), (method, key, xs)
                assert np.all(np.diff(ys) >= 0), (method, key, ys)
            checked += 1
    assert checked == 8


def test_froc_plot_points_catch_a_curve_that_turns_back():
    """The monotonicity check above can fail: a sweep-style V shape is not monotone."""
    from sap.cv.figures import froc_plot_points

    xs, ys = froc_plot_points({"fppi": [0.0, 0.5, 1.0, 2.0], "sensitivity": [0.0, 1.0, 0.0, 0.4], "limit": 4.0})
    assert not np.all(np.diff(ys) >= 0)


def test_html_reads_like_the_markdown(study):
    """The significance legend's stars are text in HTML, not bold markup; meant bold stays bold."""
    from sap.cv.report import _inline_html

    legend = "two-sided; * < 0.05, ** < 0.01, *** < 0.001, n.s. otherwise."
    assert _inline_html(legend) == "two-sided; * &lt; 0.05, ** &lt; 0.01, *** &lt; 0.001, n.s. otherwise."
    assert _inline_html("**Demo scale.** rest") == "<b>Demo scale.</b> rest"
    html = (study.run.report / "report.html").read_text()
    assert "* &lt; 0.05, ** &lt; 0.01, *** &lt; 0.001" in html
    for bold in re.findall(r"<b>(.*?)</b>", html):
        assert "&lt;" not in bold, bold
    assert "<b>Test scale (tiny preset): shows the pipeline, not evidence.</b>" in html


def test_learning_curves_hold_the_validation_rows_of_every_fold(study):
    from sap.cv.report import learning_curves

    curves = learning_curves(study.run, [*METHODS, "reference"])
    assert set(curves) == set(METHODS)  # the reference does not train
    for method in METHODS:
        assert sorted(curves[method]) == study.splits.test_folds
        for table in curves[method].values():
            assert list(table["step"]) == [10, 20, 30, 40]  # training-only rows dropped
            assert table[["val_f2", "val_sensitivity"]].notna().all().all()


def test_icc_cell_says_no_predicted_burden_or_undefined_for_the_null_cases():
    from sap.cv.report import icc_text
    from sap.metrics import icc_a1

    gt, none = [0.0, 1.5, 3.0, 0.2, 0.7], [0.0] * 5
    value, ci = icc_a1(gt, none)
    assert value == pytest.approx(0.0, abs=1e-12)
    assert icc_text(value, ci, gt, none) == "0.00 (no predicted burden)"
    nan = float("nan")
    assert icc_text(nan, [nan, nan], [1.0, 2.0], [0.0, 0.0]) == "undefined (n = 2 < 3 exams)"
    assert icc_text(nan, [nan, nan], [0.0] * 4, [0.0] * 4) == "undefined (all burdens equal)"
    assert icc_text(nan, [nan, nan], [2.0] * 3, [2.0] * 3) == "undefined (all burdens equal)"
    pred = [0.1, 1.2, 3.3, 0.0, 0.9]
    value, ci = icc_a1(gt, pred)
    assert icc_text(value, ci, gt, pred) == f"{value:.2f} [{ci[0]:.2f}–{ci[1]:.2f}]"


def test_report_of_a_synthetic_scaled_study_without_predicted_lesions(tmp_path):
    """Zero predictions: ICC "0.00 (no predicted burden)", "not converged at N steps" next to
    Table 1; the scale line says the data are synthetic and lists the deviations from the paper,
    read from the run's config and cohort.json (the cut-off next to the paper's 1 mL)."""
    from sap.data.io import read_image, write_image

    cohort = {"synthetic": True, "preset": "demo", "seed": 3, "lesion_volume_scale": 8, "modality": "mr"}
    s = make_fake_study(tmp_path, methods=("sap",), overrides=["evaluate.volume_threshold_ml=8",
                                                               "finetune.max_steps=300"], cohort_json=cohort)
    for path in [*s.run.predictions("sap").glob("*_prob.nii.gz"), *s.run.method("sap").glob("fold_*/tuning/*.nii.gz")]:
        image = read_image(path)
        write_image(np.zeros_like(image.array), image.geometry, path, overwrite=True)
    assert s.finalize("sap")
    build_report(s.run.root, progress=False)
    wide = pd.read_csv(s.run.report / "tables" / "table1_wide.csv", dtype=str, keep_default_na=False)
    assert wide.loc[wide["key"] == "icc_burden", "SAP"].iloc[0] == "0.00 (no predicted burden)"
    assert wide.loc[wide["key"] == "sensitivity_at_1fppi", "SAP"].iloc[0] == "0.00 (not converged at 300 steps)"
    md = (s.run.report / "report.md").read_text()
    table_end = md.index("## Significance") if "## Significance" in md else md.index("## Figures")
    assert "**Not converged at 300 steps:** SAP" in md[md.index("## Table 1"):table_end]
    assert "synthetic data (sap synth cohort, preset demo, seed 3)" in md
    assert "≥ 8 mL (this cohort's lesion volumes are scaled ×8; the paper's cut-off is 1 mL)" in md
    for deviation in ("lesion volumes scaled ×8", "fine-tuning steps 300 (paper 20000)", "folds k 3 (paper 7)",
                      "lr SAP decoder 0.0001 (paper 1e-05)"):
        assert deviation in md
    assert "Sensitivity ≥ 8 mL" in md and "≥ 1 mL" not in md.replace("cut-off is 1 mL", "")
    # read, not hard-coded: another cohort record gives another line
    (Path(s.cfg.data.root) / "cohort.json").write_text(json.dumps({**cohort, "lesion_volume_scale": 4}))
    build_report(s.run.root, progress=False)
    md = (s.run.report / "report.md").read_text()
    assert "lesion volumes scaled ×4" in md and "×8" not in md
    (Path(s.cfg.data.root) / "cohort.json").unlink()
    build_report(s.run.root, progress=False)
    md = (s.run.report / "report.md").read_text()
    assert "synthetic" not in md and "lesion volumes scaled" not in md
    assert "≥ 8 mL (the paper's cut-off is 1 mL)" in md
