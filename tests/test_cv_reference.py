"""The study's non-learning reference detector (sap.cv.reference): its map, and that it goes through
the study's own predict → tune → evaluate path, tuned on the tuning fold only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sap.config import DataConfig
from sap.cv.reference import REFERENCE_FLOOR_PERCENTILE, lesion_channel, reference_map
from sap.data.preprocess import body_mask, normalise
from tests.cv_fixtures import make_fake_study


def test_lesion_channel_is_b1000_for_mr_and_the_ct_channel_for_ct():
    assert lesion_channel(DataConfig(modality="mr", channels=["T1", "b1000"])) == 1
    assert lesion_channel(DataConfig(modality="mr", channels=["B1000", "T1"])) == 0
    assert lesion_channel(DataConfig(modality="mr", channels=["T1", "DWI"])) == 1  # no b1000: the last
    assert lesion_channel(DataConfig(modality="ct", channels=["CT"])) == 0


def test_reference_map_is_the_normalised_lesion_channel_inside_the_body():
    rng = np.random.default_rng(0)
    image = np.zeros((2, 20, 18, 16), np.float32)
    image[:, 3:17, 3:15, 2:14] = rng.uniform(100, 200, (2, 14, 12, 12))
    image[1, 8:11, 8:11, 6:9] = 2000.0  # a bright lesion on b1000
    image[0, 8:11, 8:11, 6:9] = 50.0
    data = DataConfig(modality="mr", channels=["T1", "b1000"])
    prob = reference_map(image, ["T1", "b1000"], data)
    body = body_mask(image, "mr")
    normalised = np.clip(normalise(image, body, data)[1], 0, 1)
    floor = np.percentile(normalised[body > 0], REFERENCE_FLOOR_PERCENTILE)
    expected = np.clip((normalised - floor) / (1 - floor), 0, 1) * (body > 0)
    assert prob.dtype == np.float32 and prob.shape == image.shape[1:]
    np.testing.assert_allclose(prob, expected, atol=1e-6)
    assert prob.min() >= 0 and prob.max() <= 1 and np.all(prob[body == 0] == 0)
    assert prob[9, 9, 7] == 1.0  # the lesion is as bright as the map goes
    # the body's ordinary tissue is below the FROC's t_min, so candidates are bright structures only
    assert np.mean(prob[body > 0] >= 0.05) <= 1 - REFERENCE_FLOOR_PERCENTILE / 100 + 1e-9


def test_reference_tuning_reads_only_tuning_fold_cases(tmp_path, monkeypatch):
    """The reference is tuned by the study's own E9 code on the tuning fold: its tuning reads no
    test-fold case, and gives the same operating point when every test-fold file is unreadable."""
    import sap.evaluate.api as api

    s = make_fake_study(tmp_path, methods=("sap",))
    for fold in s.splits.test_folds:
        s.predict("reference", fold)
    tuning, test = set(s.splits.tuning_cases()), {c for f in s.splits.test_folds for c in s.splits.test_cases(f)}
    assert tuning and test and not tuning & test
    read: list[str] = []
    real = api.load_pair

    def spy(pair):
        read.append(pair.case_id)
        return real(pair)

    monkeypatch.setattr(api, "load_pair", spy)
    first = s.tune("reference")
    assert read and set(read) == tuning
    assert first["tuning_cases"] == s.splits.tuning_cases()
    # test-fold images, masks and reference maps made unreadable: tuning is unchanged
    for case_id in test:
        for path in s.cases[case_id].files:
            path.write_bytes(b"not an image")
        (s.run.predictions("reference") / f"{case_id}_prob.nii.gz").write_bytes(b"not an image")
    again = s.tune("reference")
    assert again["shared"] == first["shared"]
    # and the test cases are what the evaluation (not the tuning) would need: it now fails
    with pytest.raises(Exception):  # noqa: B017 - any reading error
        s.evaluate("reference", again)


def test_reference_is_evaluated_like_a_network(tmp_path):
    """Same threshold record, same evaluation files, same candidate-mode FROC as the networks."""
    s = make_fake_study(tmp_path, methods=("sap",))
    for fold in s.splits.test_folds:
        s.predict("reference", fold)
    assert s.finalize("reference") and s.finalize("sap")
    ref = json.loads(s.run.threshold("reference").read_text())
    net = json.loads(s.run.threshold("sap").read_text())
    assert set(ref) == set(net) and ref["threshold"] in s.cfg.tuning.grid
    for name in ("patients.csv", "lesions.csv", "summary.json", "regions.csv"):
        assert (s.run.evaluation("reference") / name).is_file()
    summary = json.loads((s.run.evaluation("reference") / "summary.json").read_text())
    assert summary["settings"]["threshold"] == pytest.approx(ref["threshold"])
    assert summary["froc"]["mode"] == "candidate" and summary["n_cases"] == len(
        [c for f in s.splits.test_folds for c in s.splits.test_cases(f)])
    # no training: the reference's fold folders hold tuning maps and step markers only
    for fold in s.splits.test_folds:
        assert not list(s.run.fold("reference", fold).glob("*.pt"))
