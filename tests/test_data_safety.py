"""Nothing lost, nothing half-written, refused runs change nothing (issue 14 items 1–3, 9, 13, 16).

Every test goes through the real command (``sap.cli.main``) and checks the exit code, the one-line
message naming the file, and — by the md5 of every file and the list of every folder before and
after — that nothing else changed. Full disks and unwritable folders are simulated by injecting
``ENOSPC`` / ``EACCES`` into the one place every output's bytes go through
(``sap.files._write_temporary``, used by :func:`sap.files.atomic_write`), so the tests need no mounts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import sap.files
from sap.cli import main
from sap.data.io import make_geometry, write_image
from sap.files import LOCK_NAME, folder_lock
from tests.datafactory import write_cohort

GEOMETRY = make_geometry((12, 12, 12), (2.0, 2.0, 2.0))


# ------------------------------------------------------------------------------------ helpers
def snapshot(*roots: Path) -> dict[str, str]:
    """md5 of every file and a marker for every folder under ``roots`` (hidden ones included)."""
    state: dict[str, str] = {}
    for root in roots:
        if not root.exists():
            continue
        for path in sorted([root, *root.rglob("*")]):
            key = str(path)
            state[key] = "dir" if path.is_dir() else hashlib.md5(path.read_bytes()).hexdigest()
    return state


def one_error(capsys, *needles: str) -> str:
    """The command's single error line; it must name every ``needle``."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def fault(monkeypatch):
    """``fault(code, after=n)``: the (n+1)-th and every later write fails with ``code`` (an errno,
    or an exception class such as KeyboardInterrupt) after writing half a file."""

    def arm(code, after: int = 0) -> dict[str, int]:
        real = sap.files._write_temporary
        calls = {"n": 0}

        def faulty(write, tmp):
            calls["n"] += 1
            if calls["n"] <= after:
                return real(write, tmp)
            Path(tmp).write_bytes(b"half")
            if isinstance(code, int):
                raise OSError(code, os.strerror(code), tmp)
            raise code()

        monkeypatch.setattr(sap.files, "_write_temporary", faulty)
        return calls

    return arm


def prediction_folders(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Three cases: ground truth with one cube lesion, a probability map finding it (plus noise)."""
    rng = np.random.default_rng(seed)
    for case in ("a", "b", "c"):
        gt = np.zeros((12, 12, 12), np.uint8)
        gt[3:6, 3:6, 3:6] = 1
        prob = (0.2 * rng.random((12, 12, 12))).astype(np.float32)
        prob[3:6, 3:6, 3:6] = 0.9
        write_image(gt, GEOMETRY, root / "gt" / f"{case}.nii.gz")
        write_image(prob, GEOMETRY, root / "pred" / f"{case}_prob.nii.gz")
    return root / "pred", root / "gt"


def evaluate(pred: Path, gt: Path, out: Path, *extra: str) -> int:
    return main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(out), "--no-progress",
                 "--set", "evaluate.n_bootstrap=10", *extra])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A tiny 2-channel Swin UNETR lesion checkpoint (random weights)."""
    import torch

    from sap.config import load_config
    from sap.models.swin import build_swin_unetr
    from sap.models.weights import make_checkpoint, save_checkpoint

    torch.manual_seed(0)
    cfg = load_config("tiny")
    cfg.data.channels = ["T1", "b1000"]
    network = build_swin_unetr(cfg.model, 2, 2)
    path = tmp_path_factory.mktemp("model") / "lesion.pt"
    save_checkpoint(make_checkpoint(network, config=cfg.to_dict(), channels=["T1", "b1000"], kind="lesion",
                                    out_channels=2, threshold=0.5, min_volume_ml=0.0), path)
    return path


def mr_case(folder: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    geometry = make_geometry((32, 32, 32), (4.0, 4.0, 4.0))
    for name in ("T1", "b1000"):
        image = rng.normal(100, 20, size=(32, 32, 32)).astype(np.float32)
        image[:4] = 0
        write_image(image, geometry, folder / f"{name}.nii.gz")
    return folder


def infer(inputs: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["infer", "-i", str(inputs), "-o", str(out), "--model", str(model), "--quiet", "--device", "cpu",
                 *extra])


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> Path:
    """3 healthy and 6 patient exams of 16×16×20 voxels (sap's data rules, no synthesis)."""
    return write_cohort(tmp_path_factory.mktemp("cohort") / "cohort")


def finetune(data: Path, run: Path, *extra: str) -> int:
    return main(["finetune", "--config", "tiny", "--data", str(data), "--out", str(run), "--no-progress", *extra])


def totalseg_file(path: Path) -> Path:
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[2:8, 2:8, 2:8] = 1  # a TotalSegmentator class
    write_image(labels, GEOMETRY, path)
    return path


# ------------------------------------------------------------------------------------ item 1
def test_item1_evaluate_overwrite_on_a_full_disk_keeps_the_old_outputs(tmp_path, fault, capsys):
    """The issue's reproduction: ``sap evaluate --overwrite`` runs out of space at the third file.
    The three files are one unit: the old ones stay, nothing new, no temporary, no lock."""
    pred, gt = prediction_folders(tmp_path)
    out = tmp_path / "eval"
    assert evaluate(pred, gt, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["lesions.csv", "patients.csv", "summary.json"]
    write_image(np.zeros((12, 12, 12), np.float32), GEOMETRY, pred / "a_prob.nii.gz", overwrite=True)  # new result
    before = snapshot(tmp_path)
    calls = fault(errno.ENOSPC, after=2)  # patients.csv and lesions.csv are written, summary.json fails
    assert evaluate(pred, gt, out, "--overwrite") == 2
    one_error(capsys, str(out / "summary.json"), "No space left on device")
    assert calls["n"] == 3 and snapshot(tmp_path) == before


def test_item1_killed_infer_run_keeps_its_finished_cases(tmp_path, model_file, fault, capsys):
    """A run killed during its second case keeps the first case whole (every file, the same bytes
    as an uninterrupted run) and nothing of the second."""
    mr_case(tmp_path / "in" / "a", seed=0)
    mr_case(tmp_path / "in" / "b", seed=1)
    assert infer(tmp_path / "in" / "a", tmp_path / "reference", model_file) == 0
    calls = fault(KeyboardInterrupt, after=5)  # case a: 4 files, then README.txt; case b is killed
    assert infer(tmp_path / "in", tmp_path / "out", model_file) == 130
    assert calls["n"] == 6
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["README.txt", "a_lesions.csv", "a_lesions.nii.gz", "a_prob.nii.gz", "a_summary.json"]
    for name in ("a_prob.nii.gz", "a_lesions.nii.gz", "a_lesions.csv"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


def test_item1_report_folder_is_rebuilt_whole_so_a_users_file_in_it_is_refused(tmp_path, small_cohort, capsys):
    """``RUN/report`` is one unit, swapped in whole; a file the build does not write would be lost,
    so ``sap report`` and ``sap cv`` refuse it before any work, naming it."""
    run = tmp_path / "run"
    (run / "report" / "figures").mkdir(parents=True)
    (run / "report" / "report.md").write_text("old report")
    (run / "report" / "figures" / "froc.png").write_bytes(b"png")
    (run / "report" / "figures" / "my_annotations.txt").write_text("the user's")
    before = snapshot(tmp_path, small_cohort)
    assert main(["report", "--run", str(run)]) == 2
    one_error(capsys, f"{run / 'report' / 'figures' / 'my_annotations.txt'}: not written by sap report")
    assert main(["cv", "--config", "tiny", "--data", str(small_cohort), "--out", str(run), "--methods", "baseline",
                 "--no-progress"]) == 2
    one_error(capsys, "my_annotations.txt: not written by sap report")
    assert snapshot(tmp_path, small_cohort) == before


# ------------------------------------------------------------------------------------ item 2
@pytest.mark.parametrize("foreign, named", [
    ("notes.txt", "notes.txt"),  # a user's notes
    ("patients/my_case/T1.nii.gz", "patients/my_case"),  # an extra case folder: named once
    ("patients/patient_001/manual.nii.gz", "patients/patient_001/manual.nii.gz"),  # a manual segmentation
])
def test_item2_synth_overwrite_refuses_a_folder_holding_files_it_did_not_write(tmp_path, foreign, named, capsys):
    """``--overwrite`` replaces only what ``cohort.json`` lists; a user's notes, an extra case
    folder or a manual segmentation inside a case is refused, naming it, and nothing changes."""
    cohort = tmp_path / "cohort"
    files = ["healthy/subjects.csv", "patients/subjects.csv", "patients/patient_001/T1.nii.gz"]
    for name in files:
        (cohort / name).parent.mkdir(parents=True, exist_ok=True)
        (cohort / name).write_text("sap wrote this")
    (cohort / "cohort.json").write_text(json.dumps({"files": files, "channels": ["T1"], "cases": []}))
    (cohort / ".sap_cache" / "entry").mkdir(parents=True)  # sap's cache: replaced with the cohort
    (cohort / foreign).parent.mkdir(parents=True, exist_ok=True)
    (cohort / foreign).write_text("the user's")
    before = snapshot(tmp_path)
    assert main(["synth", "--preset", "tiny", "--out", str(cohort), "--overwrite", "--workers", "1"]) == 2
    one_error(capsys, f"{cohort / named}: not written by sap synth", "cohort.json")
    assert snapshot(tmp_path) == before


def test_item2_synth_overwrite_replaces_its_own_cohort(tmp_path, capsys):
    """The same folder holding only what sap wrote (and its cache) is replaced: the listed files
    are rewritten, the stale cache goes, and the new cohort.json lists every file it wrote."""
    cohort = tmp_path / "cohort"
    (cohort / "patients" / "patient_001").mkdir(parents=True)
    (cohort / "patients" / "patient_001" / "T1.nii.gz").write_text("old")
    (cohort / ".sap_cache").mkdir()
    (cohort / "cohort.json").write_text(json.dumps({"files": ["patients/patient_001/T1.nii.gz"], "cases": []}))
    assert main(["synth", "--preset", "tiny", "--out", str(cohort), "--overwrite", "--workers", "1"]) == 0
    meta = json.loads((cohort / "cohort.json").read_text())
    written = sorted(p.relative_to(cohort).as_posix() for p in cohort.rglob("*") if p.is_file())
    assert written == sorted([*meta["files"], "cohort.json"]) and not (cohort / ".sap_cache").exists()
    assert (cohort / "patients" / "patient_001" / "T1.nii.gz").read_bytes()[:2] == b"\x1f\x8b"  # a new NIfTI


# ------------------------------------------------------------------------------------ item 3
@pytest.mark.parametrize("link", ["same", "symlink", "hardlink"])
def test_item3_labels_output_that_is_its_input_is_refused(tmp_path, link, capsys):
    """``sap labels from-totalseg --overwrite X X`` (also through a symbolic or hard link)."""
    source = totalseg_file(tmp_path / "labels.nii.gz")
    output = {"same": source, "symlink": tmp_path / "link.nii.gz", "hardlink": tmp_path / "hard.nii.gz"}[link]
    if link == "symlink":
        output.symlink_to(source)
    elif link == "hardlink":
        os.link(source, output)
    before = snapshot(tmp_path)
    assert main(["labels", "from-totalseg", str(source), str(output), "--overwrite"]) == 2
    one_error(capsys, str(output), "is an input", str(source))
    assert snapshot(tmp_path) == before


def test_item3_every_command_refuses_an_output_that_is_an_input(tmp_path, small_cohort, model_file, capsys):
    """The same rule in evaluate (--tune-on file), infer (--skeleton), finetune (--pretrained of
    the fold being replaced), synth (--anatomy) and cv (--export into the run's method folder)."""
    pred, gt = prediction_folders(tmp_path)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "patients.csv").write_text("a\n")  # an earlier output given as the list of tuning cases
    mr_case(tmp_path / "case")
    write_image(np.zeros((32, 32, 32), np.uint8), make_geometry((32, 32, 32), (4.0, 4.0, 4.0)),
                tmp_path / "infer" / "case_lesions.nii.gz")
    fold = tmp_path / "run" / "sap" / "fold_1"
    fold.mkdir(parents=True)
    shutil.copy(model_file, fold / "last.pt")
    before = snapshot(tmp_path)
    runs = [
        (lambda: evaluate(pred, gt, out, "--tune-on", str(out / "patients.csv"), "--overwrite"), out / "patients.csv"),
        (lambda: infer(tmp_path / "case", tmp_path / "infer", model_file, "--skeleton",
                       str(tmp_path / "infer" / "case_lesions.nii.gz"), "--overwrite"),
         tmp_path / "infer" / "case_lesions.nii.gz"),
        (lambda: finetune(small_cohort, tmp_path / "run", "--init", "sap", "--fold", "1", "--overwrite",
                          "--pretrained", str(fold / "last.pt")), fold / "last.pt"),
        (lambda: main(["synth", "--preset", "tiny", "--out", str(tmp_path / "in"), "--anatomy",
                       str(tmp_path / "in" / "scans")]), tmp_path / "in"),
        (lambda: main(["cv", "--config", "tiny", "--data", str(small_cohort), "--out", str(tmp_path / "run"),
                       "--methods", "sap", "--export", str(tmp_path / "run"), "--no-progress"]),
         tmp_path / "run" / "sap"),
    ]
    for command, named in runs:
        rc = command()
        line = one_error(capsys, str(named), "input")
        assert rc in (1, 2), line  # infer reports the case (exit 1); the others refuse the run (exit 2)
        assert snapshot(tmp_path) == before, line


# ------------------------------------------------------------------------------------ item 9
def test_item9_second_run_into_a_locked_unit_is_refused_and_a_stale_lock_reported(tmp_path, small_cohort, capsys):
    """A lock held by a live process (pid, host) refuses evaluate and fine-tuning before any work;
    a lock whose process is gone is reported as stale with how to remove it."""
    import socket

    pred, gt = prediction_folders(tmp_path)
    out = tmp_path / "eval"
    out.mkdir()
    host = socket.gethostname()
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": host, "started": "2026-01-01T00:00:00Z"}))
    fold = tmp_path / "run" / "baseline" / "fold_1"
    fold.mkdir(parents=True)
    (fold / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": host}))
    before = snapshot(tmp_path)
    assert evaluate(pred, gt, out) == 2
    one_error(capsys, str(out), "in use by another sap run", f"pid {os.getppid()} on {host}")
    assert finetune(small_cohort, tmp_path / "run", "--init", "scratch", "--fold", "1") == 2
    one_error(capsys, str(fold), "in use by another sap run")
    assert snapshot(tmp_path) == before  # no splits.json, no outputs, the locks untouched

    (out / LOCK_NAME).write_text(json.dumps({"pid": 2**30, "host": host}))  # no such process
    before = snapshot(tmp_path)
    assert evaluate(pred, gt, out) == 2
    one_error(capsys, str(out / LOCK_NAME), "stale lock", f"rm {out / LOCK_NAME}")
    assert snapshot(tmp_path) == before
    (out / LOCK_NAME).unlink()
    assert evaluate(pred, gt, out) == 0 and not (out / LOCK_NAME).exists()


def test_item9_lock_is_shared_within_a_process_and_waits_across_runs(tmp_path):
    """``sap cv`` locks a fold and the stage runner inside it locks it again (same process: shared);
    split runs waiting for a shared stage (``wait=True``) go on once the other run releases it."""
    folder = tmp_path / "RUN" / "pretrain" / "skeletal"
    with folder_lock(folder) as lock, folder_lock(folder) as again:
        assert lock == again and json.loads(lock.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "RUN").exists()  # created for the work, removed again when left empty
    folder.mkdir(parents=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": "another-machine"}))
    messages: list[str] = []
    threading.Timer(0.3, (folder / LOCK_NAME).unlink).start()  # the other machine finishes
    with folder_lock(folder, wait=True, poll_s=0.05, on_wait=messages.append) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert len(messages) == 1 and "another-machine" in messages[0] and folder.is_dir()


# ------------------------------------------------------------------------------------ item 13
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES], ids=["ENOSPC", "EACCES"])
def test_item13_full_disk_or_unwritable_output_is_one_line_and_writes_nothing(
    tmp_path, code, fault, small_cohort, model_file, capsys
):
    """evaluate, infer, finetune, synth and labels: the first write fails; each command exits 2
    with one line naming the output and the system's reason, and leaves nothing behind."""
    pred, gt = prediction_folders(tmp_path / "eval_in")
    mr_case(tmp_path / "case")
    source = totalseg_file(tmp_path / "totalseg.nii.gz")
    reason = os.strerror(code)
    cohort_before = snapshot(small_cohort)
    before = snapshot(tmp_path)
    runs = [
        (lambda: evaluate(pred, gt, tmp_path / "eval"), tmp_path / "eval" / "patients.csv"),
        (lambda: infer(tmp_path / "case", tmp_path / "infer", model_file), tmp_path / "infer" / "case_prob.nii.gz"),
        (lambda: finetune(small_cohort, tmp_path / "run", "--init", "scratch", "--fold", "1"),
         tmp_path / "run" / "splits.json"),
        (lambda: main(["synth", "--preset", "tiny", "--out", str(tmp_path / "synth"), "--workers", "1"]),
         tmp_path / "synth" / "healthy" / "healthy_s01_e1" / "T1.nii.gz"),
        (lambda: main(["labels", "from-totalseg", str(source), str(tmp_path / "skeleton.nii.gz")]),
         tmp_path / "skeleton.nii.gz"),
    ]
    for command, named in runs:
        fault(code)
        assert command() == 2
        one_error(capsys, f"{named}: cannot write ({reason})")
        assert snapshot(tmp_path) == before, named
    assert snapshot(small_cohort) == cohort_before


# ------------------------------------------------------------------------------------ item 16
@pytest.mark.parametrize(
    "args, named",
    [
        (["--init", "scratch", "--fold", "-1"], "--fold -1"),
        (["--init", "scratch", "--fold", "0"], "--fold 0"),
        (["--init", "scratch", "--fold", "3"], "--fold 3"),
        (["--init", "scratch", "--fold", "1", "--data", "MISSING"], "cohort folder not found"),
        (["--init", "sap", "--fold", "1"], "pretrain/skeletal/best.pt"),
    ],
    ids=["fold-1", "fold0", "fold3", "no-data", "no-pretraining"],
)
def test_item16_refused_finetune_leaves_no_folder(tmp_path, small_cohort, args, named, capsys):
    """Every refusal comes before the first folder or file: no METHOD/fold_K, no splits.json."""
    run = tmp_path / "run"
    args = [str(tmp_path / "missing") if a == "MISSING" else a for a in args]
    before = snapshot(tmp_path, small_cohort)
    assert finetune(small_cohort, run, *args) == 2
    one_error(capsys, named)
    assert snapshot(tmp_path, small_cohort) == before and not run.exists()


def test_item16_infer_without_a_finished_case_leaves_no_folder(tmp_path, model_file, capsys):
    """Every case fails (a case folder without b1000): no output folder holding only README.txt."""
    case = mr_case(tmp_path / "in" / "case")
    (case / "b1000.nii.gz").unlink()
    before = snapshot(tmp_path)
    assert infer(tmp_path / "in", tmp_path / "out", model_file) == 1
    err = capsys.readouterr().err
    assert "missing channel b1000" in err and str(case) in err
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_item16_cv_checks_every_patient_before_it_pretrains(tmp_path, capsys):
    """A patient with NaN voxels stops ``sap cv`` before anything is written or trained: no run
    folder, no cache, the cohort unchanged."""
    cohort = write_cohort(tmp_path / "cohort")
    t1 = cohort / "patients" / "p4" / "T1.nii.gz"
    image = np.full((16, 16, 20), 100.0, np.float32)
    image[5, 5, 5] = np.nan
    write_image(image, make_geometry((16, 16, 20), (2.0, 2.0, 3.0), axcodes="LPS"), t1, overwrite=True)
    before = snapshot(tmp_path)
    assert main(["cv", "--config", "tiny", "--data", str(cohort), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    one_error(capsys, str(t1), "NaN")
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()
