"""The stage runner (sap.models.training.run_stage) with a toy stage: no Swin UNETR, fast.

A stage supplies its model, batches, step and validation; folder policy, resume (and its
refusals), best/last checkpoints, logs, summary.json and the progress bar come from the runner.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from sap.config import load_config
from sap.errors import SapError
from sap.models.training import StageContext, StageParts, StageSpec, run_stage
from sap.models.weights import load_checkpoint, save_checkpoint


# ------------------------------------------------------------------------------------ the toy stage
class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.dropout(torch.relu(self.body(x)), 0.2, self.training))


def toy_stage(out, cfg, max_steps=6, identity=None) -> tuple[StageSpec, object]:
    spec = StageSpec(
        kind="toy", out_dir=out, config=cfg, max_steps=max_steps, val_every=2, metric="val_loss",
        lower_is_better=True, columns=["lr", "loss", "val_loss", "val_empty"], warmup_fraction=0.2,
        amp=False, identity=identity or {"fold": 1}, channels=["x"], out_channels=1,
    )  # fmt: skip

    def setup(ctx: StageContext) -> StageParts:
        model = Toy()
        x_val = torch.linspace(-1, 1, 24).reshape(8, 3)

        def draw():  # numpy generator and torch RNG (dropout): both saved by the runner
            x = torch.from_numpy(ctx.generator.normal(size=(4, 3))).float()
            return x, x.sum(1, keepdim=True)

        def step(net, batch):
            loss = F.mse_loss(net(batch[0]), batch[1])
            return loss, {"loss": float(loss.detach())}

        def validate(net):
            return {"val_loss": float(F.mse_loss(net(x_val), x_val.sum(1, keepdim=True))), "val_empty": math.nan}

        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        # the checkpoint's weights are the body; the head goes to extra_state (as SSL's heads)
        body = lambda net: {k: v for k, v in net.state_dict().items() if k.startswith("body.")}  # noqa: E731
        return StageParts(model, optimizer, draw, step, validate, export=body, summary=lambda: {"toy": True})

    return spec, setup


# ------------------------------------------------------------------------------------ tests
def _weights(path):
    ckpt = load_checkpoint(path)
    return {**ckpt["state_dict"], **ckpt["extra_state"]}


def _rows(folder):
    with (folder / "log.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_toy_stage_gets_folder_checkpoints_logs_and_summary_from_the_runner(tmp_path, capsys):
    cfg = load_config("tiny")
    full = run_stage(*toy_stage(tmp_path / "full", cfg), progress=False)
    folder = full.out_dir
    assert capsys.readouterr().err == ""  # progress=False: no bar
    for name in ("last.pt", "best.pt", "log.csv", "config.yaml", "summary.json"):
        assert (folder / name).is_file(), name
    assert any((folder / "tensorboard").iterdir())
    best, last = load_checkpoint(folder / "best.pt"), load_checkpoint(folder / "last.pt")
    assert best.keys() == last.keys() and "optimizer" in best["training"]
    assert last["run"] == {"fold": 1} and last["kind"] == "toy" and last["patch_merging"] is None
    assert set(last["state_dict"]) == {"body.weight", "body.bias"} and set(last["extra_state"]) == {"head.weight", "head.bias"}
    assert [int(r["step"]) for r in _rows(folder)] == [1, 2, 3, 4, 5, 6]
    assert _rows(folder)[1]["val_loss"] and not _rows(folder)[0]["val_loss"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["fold"] == 1 and summary["toy"] is True
    assert summary["final"]["val_empty"] is None  # NaN written as null
    assert summary["best_val_loss"] == pytest.approx(min(float(r["val_loss"]) for r in _rows(folder) if r["val_loss"]))
    assert best["step"] == summary["best_step"] == full.best_step

    # outputs exist: refused; killed after step 3 and resumed: the uninterrupted run, bit for bit
    spec, setup = toy_stage(tmp_path / "split", cfg)
    run_stage(spec, setup, progress=False, stop_after=3)
    with pytest.raises(SapError, match="outputs exist"):
        run_stage(spec, setup, progress=False)
    assert run_stage(spec, setup, progress=False, resume=True).steps == 6
    for key, value in _weights(folder / "last.pt").items():
        assert torch.equal(value, _weights(spec.out_dir / "last.pt")[key]), key
    assert [r["loss"] for r in _rows(spec.out_dir)] == [r["loss"] for r in _rows(folder)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="deterministic kernels are a CPU-only setting")
def test_cpu_stages_train_with_deterministic_kernels_and_restore_the_setting(tmp_path):
    spec, make_parts = toy_stage(tmp_path / "run", load_config("tiny"), max_steps=2)
    seen = []

    def setup(ctx):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return make_parts(ctx)

    assert not torch.are_deterministic_algorithms_enabled()
    run_stage(spec, setup, progress=False)
    assert seen == [True]  # two CPU runs of the same fine-tune drifted apart without it
    assert not torch.are_deterministic_algorithms_enabled()  # a notebook's own setting comes back


def test_resume_is_refused_for_other_settings_or_another_run(tmp_path):
    cfg = load_config("tiny")
    spec, setup = toy_stage(tmp_path / "run", cfg)
    with pytest.raises(SapError, match="nothing to resume"):
        run_stage(spec, setup, progress=False, resume=True)
    run_stage(spec, setup, progress=False, stop_after=2)
    changed = load_config("tiny", ["model.feature_size=24", "finetune.num_workers=3"])
    changed.out, changed.data.root = "/elsewhere", "/moved"  # paths and worker counts may change
    with pytest.raises(SapError, match=r"config differs .*\(model.feature_size\)"):
        run_stage(*toy_stage(spec.out_dir, changed), progress=False, resume=True)
    with pytest.raises(SapError, match="written by a run with fold 1, not fold 2"):
        run_stage(*toy_stage(spec.out_dir, cfg, identity={"fold": 2}), progress=False, resume=True)
    moved = load_config("tiny", ["finetune.num_workers=3"])
    moved.out = "/elsewhere"
    assert run_stage(*toy_stage(spec.out_dir, moved), progress=False, resume=True).steps == 6


def test_best_exists_when_validation_never_gives_a_finite_metric(tmp_path, capsys):
    spec, setup = toy_stage(tmp_path / "run", load_config("tiny"), max_steps=4)
    spec.metric, spec.val_every = "val_empty", 2
    result = run_stage(spec, setup)
    assert "training: 100%" in capsys.readouterr().err  # the runner's bar, on by default
    # nothing to choose by: best.pt follows the latest weights (a stage without validation cases)
    assert result.best.is_file() and result.best_step == 4 and math.isnan(result.best_metric)
    assert torch.load(result.best, weights_only=True)["step"] == 4


def as_v1(ckpt: dict) -> dict:
    """A checkpoint as sap wrote it before the stage runner (format v1)."""
    old = {k: v for k, v in ckpt.items() if k not in ("run", "extra_state")}
    old.update(ckpt["run"], format="sap-checkpoint-v1")
    if ckpt["extra_state"]:
        old["ssl_heads"] = ckpt["extra_state"]
    return old


def test_a_v1_checkpoint_resumes_and_an_unknown_format_is_refused_by_name(tmp_path):
    cfg = load_config("tiny")
    full = run_stage(*toy_stage(tmp_path / "full", cfg), progress=False)
    spec, setup = toy_stage(tmp_path / "old", cfg)
    run_stage(spec, setup, progress=False, stop_after=2)
    save_checkpoint(as_v1(load_checkpoint(spec.out_dir / "last.pt")), spec.out_dir / "last.pt")
    with pytest.raises(SapError, match="written by a run with fold 1, not fold 3"):
        run_stage(*toy_stage(spec.out_dir, cfg, identity={"fold": 3}), progress=False, resume=True)
    run_stage(spec, setup, progress=False, resume=True)
    for key, value in _weights(full.last).items():
        assert torch.equal(value, _weights(spec.out_dir / "last.pt")[key]), key
    future = {**load_checkpoint(full.last), "format": "sap-checkpoint-v9"}
    torch.save(future, tmp_path / "future.pt")
    with pytest.raises(SapError, match="format sap-checkpoint-v9 is not one this sap reads"):
        load_checkpoint(tmp_path / "future.pt")


def test_numpy_generator_state_travels_in_the_checkpoint(tmp_path):
    spec, setup = toy_stage(tmp_path / "run", load_config("tiny"), max_steps=2)
    run_stage(spec, setup, progress=False)
    state = load_checkpoint(spec.out_dir / "last.pt")["training"]["rng"]["numpy_generator"]
    generator = np.random.default_rng(0)
    generator.normal(size=(8, 3))  # two batches drawn from the seeded generator
    assert state == generator.bit_generator.state


# ------------------------------------------------------------------------------------ every stage
#: what best.pt and last.pt of every training stage hold
STAGE_KEYS = {
    "format", "kind", "state_dict", "config", "channels", "in_channels", "out_channels", "monai_version",
    "patch_merging", "threshold", "min_volume_ml", "step", "metrics", "training", "run", "extra_state",
}  # fmt: skip


def test_every_stage_writes_the_same_keys_and_old_checkpoints_still_load(tmp_path, capsys):
    from sap.cli import main
    from sap.infer.model import load_model
    from sap.models.swin import build_swin_unetr
    from sap.models.weights import load_weights
    from sap.pretrain import run_pretrain
    from tests.test_finetune import micro_cohort
    from tests.test_pretrain import _cfg, _write_exam

    healthy = tmp_path / "healthy_cohort"
    rng = np.random.default_rng(0)
    for i in range(3):
        _write_exam(healthy / "healthy" / f"h{i}", rng)
    one_step = {"pretrain.max_steps": 1, "pretrain.val_every_steps": 1, "pretrain.ssl.crops_per_batch": 2}
    folders = {s: run_pretrain(_cfg(healthy, tmp_path / "run", **one_step), s, progress=False).out_dir
               for s in ("skeletal", "ssl")}  # fmt: skip
    # fine-tuning through the command line, from a skeletal checkpoint of the old format
    old_skeletal = tmp_path / "old_skeletal.pt"
    save_checkpoint(as_v1(load_checkpoint(folders["skeletal"] / "best.pt")), old_skeletal)
    capsys.readouterr()
    args = [
        "finetune", "--config", "tiny", "--data", str(micro_cohort(tmp_path / "patients")), "--out", str(tmp_path / "run"),
        "--init", "sap", "--fold", "1", "--pretrained", str(old_skeletal), "--no-progress",
        "--set", "model.patch_size=[64,64,64]", "--set", "finetune.max_steps=1", "--set", "finetune.batch_size=1",
        "--set", "finetune.val_fraction=0.34", "--set", "cv.k=3", "--set", "infer.overlap=0.0",
    ]  # fmt: skip
    assert main(args) == 0
    assert "finetune sap fold 1" not in capsys.readouterr().err  # --no-progress: no training bar
    folders["finetune"] = tmp_path / "run" / "sap" / "fold_1"
    folders["slice2d"] = _train_slice2d_unet(tmp_path / "slice2d")
    for stage, folder in folders.items():
        best, last = load_checkpoint(folder / "best.pt"), load_checkpoint(folder / "last.pt")
        assert best.keys() == last.keys() == STAGE_KEYS, stage
        assert best["training"].keys() == last["training"].keys() and "cursor" in best["training"], stage

    # checkpoints of the old format still load for --init ssl and for sap infer
    old_ssl, old_lesion = tmp_path / "old_ssl.pt", tmp_path / "old_lesion.pt"
    save_checkpoint(as_v1(load_checkpoint(folders["ssl"] / "best.pt")), old_ssl)
    save_checkpoint(as_v1(load_checkpoint(folders["finetune"] / "last.pt")), old_lesion)
    cfg = load_config("tiny")
    assert load_weights(build_swin_unetr(cfg.model, 2, 2), old_ssl, expect="ssl", verbose=False).complete
    model = load_model(old_lesion, expect_kind="lesion")
    for a, b in zip(model.networks[0].state_dict().values(), load_checkpoint(old_lesion)["state_dict"].values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)


def _train_slice2d_unet(folder):
    """One step of a tiny 2D U-Net through ``sap.slice2d.train.fit`` on four synthetic slices."""
    from sap.config import Slice2DConfig
    from sap.slice2d.data import SliceSet
    from sap.slice2d.models import ModelSpec, build_model, unet_filters
    from sap.slice2d.train import fit

    yy, xx = np.mgrid[:32, :32]
    slices = SliceSet()
    for i in range(4):
        mask = ((yy - 10 - 3 * i) ** 2 + (xx - 16) ** 2 < 16).astype(np.uint8) * (i % 2)
        slices.images.append((0.3 + 0.5 * mask).astype(np.float32))
        slices.masks.append(mask)
    spec = ModelSpec("unet", 32, {"filters": unet_filters(32, 4, 8)})
    settings = Slice2DConfig(image_size=32, max_steps=1, val_every_steps=1, batch_size=2)
    fit(build_model(spec), spec, slices, slices, settings, folder, "lesions", progress=False)
    return folder


def test_slice2d_model_folders_of_the_old_format_still_load_for_predict(tmp_path):
    from sap.slice2d.predict import load_model_dir

    folder = _train_slice2d_unet(tmp_path / "new")
    new = load_model_dir(folder)
    ckpt = load_checkpoint(folder / "best.pt")
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"version": 1, "spec": ckpt["run"]["spec"], "state_dict": ckpt["state_dict"], "target": "lesions",
                "window": [40.0, 400.0], "threshold": 0.3, "step": 1}, old / "model.pt")  # fmt: skip
    loaded = load_model_dir(old)
    assert loaded.source.endswith("model.pt") and loaded.window == (40.0, 400.0) and loaded.threshold == 0.3
    assert new.source.endswith("best.pt") and new.window == (400.0, 1800.0) and new.threshold == 0.5
    for a, b in zip(new.model.state_dict().values(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(SapError, match="not a sap slice2d model"):
        load_model_dir(_a_toy_checkpoint(tmp_path))  # a checkpoint of another stage


def _a_toy_checkpoint(tmp_path):
    spec, setup = toy_stage(tmp_path / "toy", load_config("tiny"), max_steps=2)
    return run_stage(spec, setup, progress=False).best

