"""sap.slice2d networks: each model overfits a fixed batch, tiny SAM prompting end to end, the hybrid,
and the ``sap slice2d`` commands on a small CT cohort (tiny random configs of the real classes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sap.cli import main
from sap.config import Slice2DConfig
from sap.data.io import make_geometry, read_image, write_image
from sap.errors import SapError
from sap.slice2d import prompts as p
from sap.slice2d.data import SliceSet
from sap.slice2d.metrics import dice_iou
from sap.slice2d.models import (
    ModelSpec,
    build_model,
    foreground_probability,
    load_state_checked,
    make_loss,
    unet_filters,
)
from sap.slice2d.sam import SamPrompter, boxes_from_instances, boxes_from_mask, expand_box, refine_with_sam
from sap.slice2d.train import batch_loss, make_optimizer

SIZE = 64


def training_step(model, loss_fn, optimizer, x, y) -> float:
    """One optimiser step outside the stage runner (the models' own tests)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = batch_loss(model, loss_fn, x, y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def tiny_sam_config(image_size: int = SIZE):
    from transformers import SamConfig
    from transformers.models.sam.configuration_sam import (
        SamMaskDecoderConfig,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    vision = SamVisionConfig(
        hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
        patch_size=8, window_size=4, global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64,
    )  # fmt: skip
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=image_size, patch_size=8, mask_input_channels=8)
    decoder = SamMaskDecoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, iou_head_hidden_dim=32)
    return SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(), mask_decoder_config=decoder.to_dict())


def tiny_dino_config(image_size: int = SIZE):
    from transformers import DINOv3ViTConfig

    return DINOv3ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4,
        image_size=image_size, num_register_tokens=2,
    )  # fmt: skip


def tiny_sam(seed: int = 0):
    from transformers import SamModel

    torch.manual_seed(seed)
    return SamModel(tiny_sam_config()).eval()


def disc_batch(n: int = 4, size: int = SIZE, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Bright discs on a noisy background: fixed images and masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for _ in range(n):
        cy, cx, r = rng.integers(18, size - 18), rng.integers(18, size - 18), rng.integers(8, 14)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        images.append((0.2 + 0.6 * mask + 0.05 * rng.standard_normal((size, size))).astype(np.float32))
        masks.append(mask.astype(np.uint8))
    return images, masks


# ----------------------------------------------------------------------------------- overfitting
SPECS = {
    "unet": (lambda: ModelSpec("unet", SIZE, {"filters": unet_filters(SIZE, 8, 32)}), 30, 0.01),
    "foundation": (
        lambda: ModelSpec(
            "foundation", SIZE, {"encoder_config": tiny_dino_config().to_dict(), "head_channels": [16, 16, 16], "freeze_encoder": False}
        ),
        80,
        3e-3,
    ),
    "sam": (
        lambda: ModelSpec(
            "sam", SIZE, {"sam_config": tiny_sam_config().to_dict(), "adapter_channels": [8, 16, 16], "n_tokens": 2, "freeze_encoder": False}
        ),
        60,
        3e-3,
    ),
}


@pytest.mark.parametrize("kind", list(SPECS))
def test_each_model_overfits_a_fixed_batch(kind):
    make_spec, steps, lr = SPECS[kind]
    torch.manual_seed(0)
    spec = make_spec()
    model = build_model(spec)
    images, masks = disc_batch()
    x = torch.as_tensor(np.stack(images))[:, None]
    y = torch.as_tensor(np.stack(masks), dtype=torch.float32)[:, None]
    settings = Slice2DConfig(image_size=SIZE, lr=lr, unet_lr=lr)
    optimizer, schedule = make_optimizer(kind, model, settings, steps)
    loss_fn = make_loss(kind)
    model.eval()
    with torch.no_grad():
        before = foreground_probability(kind, model(x)).numpy()
    for _ in range(steps):
        training_step(model, loss_fn, optimizer, x, y)
        schedule.step()
    model.eval()
    with torch.no_grad():
        logits = model(x)
        prob = foreground_probability(kind, logits).numpy()
    assert logits.shape[-2:] == (SIZE, SIZE) and prob.shape == (4, SIZE, SIZE)
    dice = [dice_iou(prob[i] >= 0.5, masks[i])[0] for i in range(4)]
    dice_before = [dice_iou(before[i] >= 0.5, masks[i])[0] for i in range(4)]
    assert np.mean(dice) >= 0.8, dice
    assert np.mean(dice) > np.nanmean(np.nan_to_num(dice_before)) + 0.2


def test_frozen_foundation_encoder_does_not_change():
    spec = SPECS["foundation"][0]()
    spec.arch["freeze_encoder"] = True
    model = build_model(spec)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    images, masks = disc_batch(2)
    x = torch.as_tensor(np.stack(images))[:, None]
    y = torch.as_tensor(np.stack(masks), dtype=torch.float32)[:, None]
    optimizer, _ = make_optimizer("foundation", model, Slice2DConfig(lr=1e-2), 3)
    for _ in range(3):
        training_step(model, make_loss("foundation"), optimizer, x, y)
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder_before.items())
    assert any(not torch.equal(v, model.head.state_dict()[k]) for k, v in head_before.items() if v.is_floating_point())


def test_checkpoint_that_does_not_fit_is_refused_with_counts():
    spec = ModelSpec("unet", SIZE, {"filters": [8, 16, 32]})
    model = build_model(spec)
    state = build_model(ModelSpec("unet", SIZE, {"filters": [8, 16, 16]})).state_dict()
    with pytest.raises(SapError, match="shape-mismatched"):
        load_state_checked(model, state, "other.pt")


# ----------------------------------------------------------------------------------- zero-shot SAM
def test_prompt_tensors_use_sam_xy_and_the_resize_scale():
    prompter = SamPrompter(tiny_sam())
    image = np.zeros((32, 48), np.float32)  # longest side 48 → encoder 64, 32 rows → round(42.7) = 43
    emb = prompter.embed(image)
    sy, sx = 43 / 32, 64 / 48  # per-axis factors of the rounded size, as SAM's ResizeLongestSide
    assert emb.scale == pytest.approx((sy, sx)) and emb.resized == (43, 64)
    prompts = [
        p.Prompt(box=(2, 4, 10, 20), points=np.array([[10.0, 20.0]]), labels=np.array([1])),
        p.Prompt(box=(12, 30, 20, 40), points=np.array([[15.0, 35.0], [1.0, 1.0]]), labels=np.array([1, 0])),
    ]
    t = prompter._prompt_tensors(emb, prompts)
    np.testing.assert_allclose(t["input_boxes"][0, 0].numpy(), [4 * sx, 2 * sy, 20 * sx, 10 * sy], rtol=1e-6)
    np.testing.assert_allclose(t["input_points"][0, 0, 0].numpy(), [20 * sx, 10 * sy], rtol=1e-6)
    assert t["input_labels"][0].tolist() == [[1, -10], [1, 0]]  # -10 pads the shorter prompt
    mask = prompter.predict(emb, prompts)
    assert mask.shape == (32, 48) and mask.dtype == bool


def test_medsam_takes_box_prompts_only():
    prompter = SamPrompter(tiny_sam(), family="medsam")
    emb = prompter.embed(np.random.default_rng(0).random((40, 40)).astype(np.float32))
    assert emb.resized == (SIZE, SIZE)
    with pytest.raises(ValueError, match="box"):
        prompter.predict(emb, [p.Prompt(box=None, points=np.array([[5.0, 5.0]]), labels=np.array([1]))])


def test_tiny_sam_runs_one_strategy_end_to_end():
    from sap.slice2d.bench import BenchSlice, run_prompt_bench

    images, masks = disc_batch(2, size=48)
    labels = [m.astype(np.int64) for m in masks]
    labels[1][2:8, 2:8] = 2  # a second class in the second slice
    slices = [BenchSlice("case", k, images[k], labels[k], (0.8, 0.8)) for k in range(2)]

    class CountingPrompter(SamPrompter):
        embeds = 0

        def embed(self, image):
            CountingPrompter.embeds += 1
            return super().embed(image)

    prompter = CountingPrompter(tiny_sam())
    rows, summary = run_prompt_bench(prompter, slices, ["box+center_5C"], seed=0)
    assert CountingPrompter.embeds == 2  # one image embedding per slice, reused for both classes
    assert [(r["slice"], r["class"]) for r in rows] == [(0, 1), (1, 1), (1, 2)]
    assert all(r["strategy"] == "box+center_5C" and r["n_components"] == 1 for r in rows)
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)
    (s,) = summary
    assert s["n"] == 3 and s["seconds_per_slice"] > 0
    assert s["dice"] == pytest.approx(np.mean([r["dice"] for r in rows]))


# ----------------------------------------------------------------------------------- hybrid
def test_box_expansion_and_detector_boxes():
    assert expand_box((10, 10, 19, 19), 2.0, (100, 100)) == (5, 5, 24, 24)
    assert expand_box((0, 0, 9, 9), 2.0, (12, 100)) == (0, 0, 11, 14)  # clipped at the image edge
    assert expand_box((3, 4, 8, 9), 1.0, (50, 50)) == (3, 4, 8, 9)
    mask = np.zeros((30, 30), bool)
    mask[2:5, 2:6] = True
    mask[10:20, 15:18] = True
    assert boxes_from_mask(mask) == [(2, 2, 4, 5), (10, 15, 19, 17)]
    instances = np.zeros((30, 30), np.int64)
    instances[2:5, 2:6] = 7
    instances[6:8, 2:6] = 7  # one 3D component, two pieces in this slice: one box
    assert boxes_from_instances(instances) == [(2, 2, 7, 5)]


def test_hybrid_refinement_pastes_crops_back_inside_their_region():
    prompter = SamPrompter(tiny_sam())
    images, _ = disc_batch(1, size=48)
    box = (20, 20, 25, 25)
    refined = refine_with_sam(prompter, images[0], [box], expansion=1.2, crop_factor=2.0)
    r0, c0, r1, c1 = expand_box(expand_box(box, 1.2, (48, 48)), 2.0, (48, 48))
    outside = refined.copy()
    outside[r0 : r1 + 1, c0 : c1 + 1] = False
    assert refined.shape == (48, 48) and not outside.any()
    assert not refine_with_sam(prompter, images[0], []).any()


# ----------------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def ct_cohort(tmp_path_factory) -> Path:
    """Three patients (one a second exam of the same subject) with CT, lesion mask and skeleton."""
    root = tmp_path_factory.mktemp("ct_cohort")
    rng = np.random.default_rng(0)
    shape = (40, 36, 6)
    geometry = make_geometry(shape, (2.0, 2.5, 4.0), axcodes="LPS")
    xx, yy, zz = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    for i, case in enumerate(("p0", "p1", "p2")):
        bone = (xx - 20) ** 2 + (yy - 18) ** 2 < 100
        lesion = ((xx - 18 - i) ** 2 + (yy - 16) ** 2 < 12) & (zz >= 1) & (zz <= 4)
        hu = np.where(bone, 700, 0) + np.where(lesion, -300, 0) + rng.normal(0, 20, shape)
        folder = root / "patients" / case
        folder.mkdir(parents=True)
        write_image(hu.astype(np.int16), geometry, folder / "CT.nii.gz")
        write_image(lesion.astype(np.uint8), geometry, folder / "GT.nii.gz")
        write_image((bone * (4 + (xx > 25))).astype(np.uint8), geometry, folder / "skeleton.nii.gz")
    (root / "patients" / "subjects.csv").write_text("case_id,subject_id\np0,a\np1,a\np2,b\n")
    return root


def test_train_predict_and_refuse_to_overwrite(ct_cohort, tmp_path, capsys):
    import json

    run = tmp_path / "unet"
    args = ["slice2d", "train", "--config", "tiny", "--data", str(ct_cohort), "--out", str(run),
            "--set", "slice2d.max_steps=2", "--set", "slice2d.val_fraction=0.5"]  # fmt: skip
    assert main(args) == 0
    split = json.loads((run / "split.json").read_text())
    assert split["level"] == "patient"
    assert {"p0", "p1"} <= set(split["train"]) or {"p0", "p1"} <= set(split["val"])  # subject a never split
    assert {"best.pt", "last.pt", "config.yaml", "log.csv", "summary.json"} <= {p.name for p in run.iterdir()}
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(args) == 2  # exists: refused, nothing overwritten
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before

    out = tmp_path / "pred"
    assert main(["slice2d", "predict", "--model-dir", str(run), "-i", str(ct_cohort), "-o", str(out)]) == 0
    ct = read_image(ct_cohort / "patients" / "p1" / "CT.nii.gz")
    prob = read_image(out / "p1_prob.nii.gz")
    assert prob.geometry.same_grid(ct.geometry) is None
    assert prob.array.dtype == np.float32 and 0.0 <= prob.array.min() and prob.array.max() <= 1.0
    assert (out / "p1_lesions.nii.gz").is_file() and (out / "p2_prob.nii.gz").is_file()
    written = (out / "p1_prob.nii.gz").read_bytes()
    assert main(["slice2d", "predict", "--model-dir", str(run), "-i", str(ct_cohort), "-o", str(out)]) == 2
    assert (out / "p1_prob.nii.gz").read_bytes() == written

    # restacked volumes scored with the 3D rules of sap.metrics
    from sap.slice2d.predict import score_restacked_volumes

    gt = read_image(ct_cohort / "patients" / "p1" / "GT.nii.gz")
    results, summary = score_restacked_volumes([("p1", prob.array, gt.array, gt.spacing)])
    assert summary["n_cases"] == 1 and results[0].row["n_gt"] == 1

    # the files are what `sap evaluate` reads: 2D and 3D models in one table
    import csv

    report = tmp_path / "evaluate"
    assert main(["evaluate", "--pred", str(out), "--gt", str(ct_cohort / "patients"), "--out", str(report), "--no-progress"]) == 0
    rows = {r["case"]: r for r in csv.DictReader((report / "patients.csv").open())}
    assert set(rows) == {"p0", "p1", "p2"} and rows["p1"]["n_gt"] == "1"
    assert float(rows["p1"]["volume_pred_ml"] or 0) == pytest.approx(results[0].row["volume_pred_ml"])


def test_foundation_and_sam_train_from_local_folders_only(ct_cohort, tmp_path):
    from transformers import DINOv3ViTModel, SamModel

    dino_dir, sam_dir = tmp_path / "dino", tmp_path / "sam"
    DINOv3ViTModel(tiny_dino_config()).save_pretrained(dino_dir)
    SamModel(tiny_sam_config()).save_pretrained(sam_dir)
    for kind, folder in (("foundation", dino_dir), ("sam", sam_dir)):
        run = tmp_path / kind
        assert main(["slice2d", "train", "--config", "tiny", "--data", str(ct_cohort), "--out", str(run),
                     "--model", kind, "--checkpoint", str(folder), "--target", "bone",
                     "--set", "slice2d.max_steps=1"]) == 0  # fmt: skip
        from sap.slice2d.predict import load_model_dir

        loaded = load_model_dir(run)  # rebuilt from the stored spec, without the source folder
        assert loaded.spec.kind == kind and loaded.target == "bone"
    from sap.slice2d.models import load_hf_model

    with pytest.raises(SapError, match="config.json"):
        load_hf_model(tmp_path, "sam")
    with pytest.raises(SapError, match="missing"):  # DINO weights are no SAM: never a silent random init
        load_hf_model(dino_dir, "sam")
    assert main(["slice2d", "train", "--config", "tiny", "--data", str(ct_cohort), "--out", str(tmp_path / "x"),
                 "--model", "sam"]) == 2  # fmt: skip


def test_prompt_bench_and_hybrid_commands(ct_cohort, tmp_path):
    import csv

    from transformers import SamModel

    sam_dir = tmp_path / "sam"
    torch.manual_seed(0)
    SamModel(tiny_sam_config()).save_pretrained(sam_dir)
    out = tmp_path / "bench"
    assert main(["slice2d", "prompt-bench", "--config", "tiny", "--checkpoint", str(sam_dir), "--data", str(ct_cohort),
                 "--out", str(out), "--strategies", "box_1C,pos1+neg1_5C",
                 "--max-slices", "3"]) == 0  # fmt: skip
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["strategy"] for r in summary] == ["box_1C", "pos1+neg1_5C"]
    rows = list(csv.DictReader((out / "prompt_bench.csv").open()))
    assert {r["class"] for r in rows} == {"4", "5"} and len({(r["case"], r["slice"]) for r in rows}) == 3
    assert main(["slice2d", "prompt-bench", "--config", "tiny", "--checkpoint", str(sam_dir), "--data", str(ct_cohort),
                 "--out", str(out), "--family", "medsam", "--strategies", "center_1C"]) == 2  # fmt: skip

    # detector → SAM: boxes from a "3D model's" instance map
    pred3d = tmp_path / "pred3d"
    gt = read_image(ct_cohort / "patients" / "p0" / "GT.nii.gz")
    write_image(gt.array.astype(np.uint16), gt.geometry, pred3d / "p0_lesions.nii.gz")
    hybrid = tmp_path / "hybrid"
    assert main(["slice2d", "predict", "--boxes-from", str(pred3d), "--sam-refine", str(sam_dir),
                 "-i", str(ct_cohort / "patients" / "p0"), "-o", str(hybrid)]) == 0  # fmt: skip
    refined = read_image(hybrid / "p0_prob.nii.gz")
    assert refined.geometry.same_grid(gt.geometry) is None
    assert set(np.unique(refined.array)) <= {0.0, 1.0}
    slices_without_boxes = ~gt.array.reshape(-1, gt.array.shape[2]).any(axis=0)
    assert not refined.array[:, :, slices_without_boxes].any()  # nothing where there is no box


def test_resume_after_a_kill_reaches_the_same_weights(ct_cohort, tmp_path, monkeypatch):
    import sap.slice2d.train as train_module

    args = ["slice2d", "train", "--config", "tiny", "--data", str(ct_cohort), "--set", "slice2d.max_steps=4",
            "--set", "slice2d.val_every_steps=2", "--set", "slice2d.val_fraction=0.5"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0

    real_step = train_module.batch_loss
    calls = {"n": 0}

    def killed_at_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(train_module, "batch_loss", killed_at_step_3)
    assert main([*args, "--out", str(tmp_path / "killed")]) == 130
    monkeypatch.setattr(train_module, "batch_loss", real_step)
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["step"] == 2
    assert main([*args, "--out", str(tmp_path / "killed"), "--resume"]) == 0

    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert resumed["step"] == straight["step"] == 4
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert (tmp_path / "killed" / "log.csv").read_text() == (tmp_path / "straight" / "log.csv").read_text()
    assert main([*args, "--out", str(tmp_path / "nothing"), "--resume"]) == 2


def test_predict_a_real_dicom_series_and_the_2d_detector_hybrid(shared_data, ct_cohort, tmp_path):
    from transformers import SamModel

    run = tmp_path / "unet"
    assert main(["slice2d", "train", "--config", "tiny", "--data", str(ct_cohort), "--out", str(run),
                 "--set", "slice2d.max_steps=1"]) == 0  # fmt: skip
    series = shared_data / "ct_upper_abdomen_dicom" / "dicom"
    out = tmp_path / "dicom_pred"
    assert main(["slice2d", "predict", "--model-dir", str(run), "-i", str(series), "-o", str(out)]) == 0
    ct = read_image(series)
    prob = read_image(out / "dicom_prob.nii.gz")
    assert prob.geometry.same_grid(ct.geometry) is None and prob.array.shape == (512, 512, 20)

    # 2D detector → SAM: every refined voxel lies in a slice where the detector found something
    sam_dir = tmp_path / "sam"
    SamModel(tiny_sam_config()).save_pretrained(sam_dir)
    case = ct_cohort / "patients" / "p0"
    plain, hybrid = tmp_path / "plain", tmp_path / "hybrid"
    assert main(["slice2d", "predict", "--model-dir", str(run), "-i", str(case), "-o", str(plain), "--threshold", "0.3"]) == 0
    assert main(["slice2d", "predict", "--model-dir", str(run), "--sam-refine", str(sam_dir), "--crop-factor", "0",
                 "-i", str(case), "-o", str(hybrid), "--threshold", "0.3"]) == 0  # fmt: skip
    detected = read_image(plain / "p0_prob.nii.gz").array >= 0.3
    refined = read_image(hybrid / "p0_prob.nii.gz").array
    assert set(np.unique(refined)) <= {0.0, 1.0}
    empty_slices = ~detected.reshape(-1, detected.shape[2]).any(axis=0)
    assert not refined[:, :, empty_slices].any()


def test_refine_volume_prompts_only_slices_with_detections():
    from sap.slice2d.data import volume_to_slices
    from sap.slice2d.predict import refine_volume

    torch.manual_seed(1)
    prompter = SamPrompter(tiny_sam(1))
    hu = np.random.default_rng(0).normal(0, 300, (40, 36, 5))
    detector = np.zeros(hu.shape, bool)
    detector[10:20, 10:18, 1] = True  # one detection in axial slice 1
    detector[25:30, 5:9, 3] = True  # and one in slice 3
    refined = refine_volume(prompter, hu, (400.0, 1800.0), detector_mask=detector, expansion=1.0, crop_factor=2.0)
    assert refined.shape == hu.shape and refined.dtype == bool
    assert not refined[:, :, [0, 2, 4]].any()
    # with crops, each mask stays inside its crop (the box scaled by 2 about its centre)
    for k in (1, 3):
        box = boxes_from_mask(volume_to_slices(detector)[k])[0]
        r0, c0, r1, c1 = expand_box(box, 2.0, volume_to_slices(detector)[k].shape)
        shown = volume_to_slices(refined)[k].copy()
        shown[r0 : r1 + 1, c0 : c1 + 1] = False
        assert not shown.any()


def test_prompt_bench_skips_classes_without_a_kept_component():
    from sap.slice2d.bench import BenchSlice, run_prompt_bench

    labels = np.zeros((48, 48), np.int64)
    labels[5:25, 5:25] = 1  # 400 px: prompted
    labels[30:33, 30:34] = 2  # 12 px < 15 px: cannot be prompted
    image = np.random.default_rng(0).random((48, 48)).astype(np.float32)
    rows, summary = run_prompt_bench(SamPrompter(tiny_sam()), [BenchSlice("c", 0, image, labels, (1.0, 1.0))], ["box_1C"])
    assert [r["class"] for r in rows] == [1]
    assert summary[0]["n_unprompted"] == 1 and summary[0]["n"] == 1
    rows, summary = run_prompt_bench(
        SamPrompter(tiny_sam()), [BenchSlice("c", 0, image, (labels == 2).astype(np.int64), (1.0, 1.0))], ["box_1C"]
    )
    assert rows == [] and summary[0]["n"] == 0 and summary[0]["n_unprompted"] == 1


def test_predict_scores_2d_metrics_and_finishes_the_other_cases_when_one_fails(ct_cohort, tmp_path, capsys):
    import csv
    import shutil

    from sap.slice2d.metrics import dice_iou

    run = tmp_path / "unet"
    assert main(["slice2d", "train", "--config", "tiny", "--data", str(ct_cohort), "--out", str(run),
                 "--set", "slice2d.max_steps=1"]) == 0  # fmt: skip
    out = tmp_path / "pred"
    assert main(["slice2d", "predict", "--model-dir", str(run), "-i", str(ct_cohort), "-o", str(out),
                 "--gt", str(ct_cohort), "--threshold", "0.5"]) == 0  # fmt: skip
    rows = {r["case"]: r for r in csv.DictReader((out / "metrics2d.csv").open())}
    assert set(rows) == {"p0", "p1", "p2"}
    pred = read_image(out / "p1_prob.nii.gz").array >= 0.5
    gt = read_image(ct_cohort / "patients" / "p1" / "GT.nii.gz").array > 0
    per_slice = [dice_iou(pred[:, :, k], gt[:, :, k])[0] for k in range(gt.shape[2])]
    defined = [x for x in per_slice if not np.isnan(x)]
    assert float(rows["p1"]["dice"]) == pytest.approx(np.mean(defined))
    assert int(rows["p1"]["n_both_empty"]) == len(per_slice) - len(defined)
    assert float(rows["p1"]["volume_dice"]) == pytest.approx(dice_iou(pred, gt)[0])

    broken = tmp_path / "broken"
    shutil.copytree(ct_cohort, broken)
    ct = broken / "patients" / "p1" / "CT.nii.gz"
    ct.write_bytes(ct.read_bytes()[:200])  # truncated
    out2 = tmp_path / "pred2"
    assert main(["slice2d", "predict", "--model-dir", str(run), "-i", str(broken), "-o", str(out2)]) == 2
    err = capsys.readouterr().err
    assert "p1" in err and "1 of 3" in err
    assert (out2 / "p0_prob.nii.gz").is_file() and (out2 / "p2_prob.nii.gz").is_file()
    assert not (out2 / "p1_prob.nii.gz").exists()


def test_trains_on_a_sap_synth_ct_cohort(tmp_path):
    """The documented path: `sap synth --modality ct` → `sap slice2d train` → `predict --gt`."""
    import csv
    import json

    cohort = tmp_path / "cohort"
    assert main(["synth", "--out", str(cohort), "--preset", "tiny", "--modality", "ct"]) == 0
    run = tmp_path / "lesions"
    assert main(["slice2d", "train", "--config", "tiny", "--data", str(cohort), "--out", str(run), "--target", "lesions",
                 "--set", "slice2d.max_steps=2", "--set", "slice2d.slice_filter=foreground"]) == 0  # fmt: skip
    split = json.loads((run / "split.json").read_text())
    patients = sorted(p.name for p in (cohort / "patients").iterdir() if p.is_dir())
    assert sorted(split["train"] + split["val"]) == patients and split["val"] and split["train"]
    case = sorted((cohort / "patients").iterdir())[0]
    out = tmp_path / "pred"
    assert main(["slice2d", "predict", "--model-dir", str(run), "-i", str(case), "-o", str(out), "--gt", str(cohort)]) == 0
    (row,) = list(csv.DictReader((out / "metrics2d.csv").open()))
    assert row["case"] == case.name and 0.0 <= float(row["volume_dice"]) <= 1.0


def test_augmentation_moves_image_and_mask_together():
    from sap.slice2d.train import augment_batch

    _, masks = disc_batch(8)
    y = torch.as_tensor(np.stack(masks), dtype=torch.float32)[:, None]
    x = y.clone()  # an image equal to its mask: any misalignment shows
    ax, ay = augment_batch(x, y, torch.Generator().manual_seed(0), p_affine=1.0, p_intensity=0.0)
    assert not torch.equal(ay, y)  # moved
    assert set(torch.unique(ay).tolist()) <= {0.0, 1.0}  # masks stay binary (nearest)
    for a, b in zip(ax[:, 0] >= 0.5, ay[:, 0] > 0, strict=True):
        assert dice_iou(a.numpy(), b.numpy())[0] >= 0.95
    same = augment_batch(x, y, torch.Generator().manual_seed(0), p_affine=1.0, p_intensity=0.0)
    assert torch.equal(same[0], ax) and torch.equal(same[1], ay)  # seeded
    ix, iy = augment_batch(x, y, torch.Generator().manual_seed(0), p_affine=0.0, p_intensity=0.0)
    assert torch.equal(ix, x) and torch.equal(iy, y)
    jx, jy = augment_batch(x * 0.5 + 0.25, y, torch.Generator().manual_seed(1), p_affine=0.0, p_intensity=1.0)
    assert torch.equal(jy, y) and not torch.equal(jx, x * 0.5 + 0.25) and jx.min() >= 0 and jx.max() <= 1


def test_mirroring_flips_image_and_mask_left_right_together():
    from sap.slice2d.train import augment_batch

    x = torch.rand(16, 1, 12, 10, generator=torch.Generator().manual_seed(3))
    y = torch.zeros_like(x)
    y[:, :, 4:7, 1:3] = 1.0  # left of the midline: a mirrored mask is on the other side
    off = dict(p_affine=0.0, p_intensity=0.0)
    ax, ay = augment_batch(x, y, torch.Generator().manual_seed(0), p_mirror=1.0, **off)
    assert torch.equal(ax, x.flip(-1)) and torch.equal(ay, y.flip(-1)) and ay[:, :, 4:7, 7:9].all()
    hx, hy = augment_batch(x, y, torch.Generator().manual_seed(0), p_mirror=0.5, **off)
    flipped = [torch.equal(hx[i], x[i].flip(-1)) for i in range(16)]
    assert 0 < sum(flipped) < 16  # some mirrored, some not
    for i, was_flipped in enumerate(flipped):
        assert torch.equal(hy[i], y[i].flip(-1) if was_flipped else y[i])  # the mask follows its image
        assert was_flipped or torch.equal(hx[i], x[i])
    # without mirroring no random number is drawn for it: the other transforms repeat exactly
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    augment_batch(x, y, gen_a)
    augment_batch(x, y, gen_b, p_mirror=0.0)
    assert torch.equal(gen_a.get_state(), gen_b.get_state())


def test_the_unet_is_mirrored_and_not_jittered_by_default(monkeypatch, tmp_path):
    import sap.slice2d.train as T

    seen = []
    real_augment = T.augment_batch

    def recording(x, y, generator, **kw):
        seen.append(kw)
        return real_augment(x, y, generator, **kw)

    monkeypatch.setattr(T, "augment_batch", recording)
    images, masks = disc_batch(4)
    train = SliceSet(images=images, masks=masks, case_ids=["a"] * 4, slice_index=list(range(4)), spacing=[(1.0, 1.0)] * 4)
    cases = (
        ("unet", {}, {"p_mirror": 0.5, "p_intensity": 0.0}),
        ("unet", {"unet_mirror": False, "unet_intensity_jitter": True}, {"p_mirror": 0.0}),
        ("foundation", {}, {}),  # paper 000's recipe: the default jitter, no mirror
    )
    for kind, overrides, expected in cases:
        settings = Slice2DConfig(image_size=SIZE, max_steps=1, val_every_steps=1, batch_size=2, **overrides)
        spec = SPECS[kind][0]()
        T.fit(build_model(spec), spec, train, None, settings, tmp_path / f"{kind}_{len(seen)}", "lesions", progress=False)
        assert seen[-1] == expected, (kind, overrides)


def test_the_unet_averages_its_ce_over_the_hardest_pixels_when_asked(monkeypatch, tmp_path):
    import sap.slice2d.train as T

    asked = []  # the loss fit trains with: its kind and the top-k share its CE uses
    real_make_loss = T.make_loss

    def recording(kind, ce_topk_percent=None):
        loss = real_make_loss(kind, ce_topk_percent)
        asked.append((kind, loss.ce_topk_percent))
        return loss

    monkeypatch.setattr(T, "make_loss", recording)
    images, masks = disc_batch(4)
    train = SliceSet(images=images, masks=masks, case_ids=["a"] * 4, slice_index=list(range(4)), spacing=[(1.0, 1.0)] * 4)
    for kind, overrides in (("unet", {}), ("unet", {"unet_ce_topk_percent": 10.0}), ("foundation", {"unet_ce_topk_percent": 10.0})):
        settings = Slice2DConfig(image_size=SIZE, max_steps=1, val_every_steps=1, batch_size=2, **overrides)
        spec = SPECS[kind][0]()
        T.fit(build_model(spec), spec, train, None, settings, tmp_path / f"{kind}_{len(asked)}", "lesions", progress=False)
    assert asked == [("unet", None), ("unet", 10.0), ("foundation", None)]
