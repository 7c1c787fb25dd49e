"""The one weight loader: every checkpoint format of SPEC §5, its report, and its refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import SwinUNETR

from sap.config import load_config
from sap.errors import SapError
from sap.models.swin import build_swin_unetr, patch_merging_layout, set_patch_merging
from sap.models.weights import (
    adapt_input_channels,
    load_checkpoint,
    load_weights,
    make_checkpoint,
    save_checkpoint,
)

SHAPE = (1, 2, 32, 32, 64)  # 32³ would leave a 1-voxel stage-4 map, which InstanceNorm refuses


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def source_model(cfg):
    torch.manual_seed(123)
    return build_swin_unetr(cfg.model, in_channels=2, out_channels=3).eval()


def _fresh(cfg, out_channels=3, in_channels=2, seed=7):
    torch.manual_seed(seed)
    return build_swin_unetr(cfg.model, in_channels=in_channels, out_channels=out_channels).eval()


def _same_tensors(a, b, prefix=""):
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(sa[k], sb[k]) for k in keys)


def _monai_ssl_file(model) -> dict:
    """The layout of MONAI's published SSL encoder (model_swinvit.pt), built from a model."""
    state = {}
    for key, value in model.state_dict().items():
        if not key.startswith("swinViT."):
            continue
        key = key.removeprefix("swinViT.").replace("mlp.linear1.", "mlp.fc1.").replace("mlp.linear2.", "mlp.fc2.")
        state["module." + key] = value.clone()
    return {"state_dict": state}


@pytest.mark.parametrize("prefix", ["module.", "backbone.", "module.backbone."])
def test_prefixed_state_dicts_load_completely(cfg, source_model, prefix):
    state = {prefix + k.replace("swinViT", "swin_vit"): v for k, v in source_model.state_dict().items()}
    for wrapped in (state, {"state_dict": state}, {"model": state}):
        model = _fresh(cfg)
        report = load_weights(model, wrapped, expect="full", verbose=False)
        assert len(report.loaded) == report.n_expected == len(model.state_dict())
        assert not report.missing and not report.unexpected and not report.mismatched
        assert _same_tensors(model, source_model)


def test_monai_ssl_layout_matches_monai_load_from(cfg, source_model):
    weights = _monai_ssl_file(source_model)
    ours = _fresh(cfg, seed=1)
    before = copy.deepcopy(ours.state_dict())
    report = load_weights(ours, weights, expect="ssl", verbose=False)
    assert report.source_format == "monai-ssl"
    assert report.source_layout == "legacy" and patch_merging_layout(ours) == "legacy"
    n_swin = sum(k.startswith("swinViT.") for k in ours.state_dict())
    assert len(report.loaded) == report.n_expected == n_swin
    # independent peer: MONAI's own reader of this layout
    peer = SwinUNETR(in_channels=2, out_channels=3, feature_size=cfg.model.feature_size,
                     num_heads=tuple(cfg.model.num_heads))
    peer.load_from(weights)
    peer_state = peer.state_dict()
    assert all(torch.equal(ours.state_dict()[k], peer_state[k]) for k in ours.state_dict() if k.startswith("swinViT."))
    # the skip blocks and decoder stay as they were (random)
    assert all(torch.equal(ours.state_dict()[k], before[k]) for k in before if k.startswith(("encoder1.", "decoder")))


def test_reference_sap_layout_loads_all_but_head(cfg, source_model):
    ckpt = {"state_dict": {"module." + k: v for k, v in source_model.state_dict().items()}, "epoch": 12}
    model = _fresh(cfg, out_channels=2)  # new 2-class head, as in fine-tuning
    report = load_weights(model, ckpt, expect="sap", verbose=False)
    assert report.source_format == "reference-sap" and report.source_layout == "legacy"
    assert len(report.loaded) == report.n_expected == len(model.state_dict()) - 2
    assert sorted(report.skipped) == ["out.conv.conv.bias", "out.conv.conv.weight"]
    assert _same_tensors(model, source_model, "decoder1.")


def test_unrelated_checkpoint_fails_with_counts(cfg, tmp_path):
    unrelated = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.ReLU(), torch.nn.Conv3d(4, 1, 1))
    path = tmp_path / "unet.pt"
    torch.save({"state_dict": unrelated.state_dict(), "epoch": 3}, path)
    model = _fresh(cfg)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SapError, match=r"unet\.pt.*loaded 0/\d+ .*unexpected 4.*does not look like"):
        load_weights(model, path, expect="sap", verbose=False)
    assert _same_tensors(model, _restore(model, before))  # nothing changed
    with pytest.raises(SapError, match="no state dict"):
        load_weights(model, {"epoch": 3, "note": "empty"}, verbose=False)
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SapError, match="garbage.pt"):
        load_weights(model, bad, verbose=False)


def _restore(model, state):
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    return twin


def test_partial_checkpoint_fails(cfg, source_model):
    state = dict(source_model.state_dict())
    dropped = next(k for k in state if k.startswith("swinViT.layers3"))
    del state[dropped]
    with pytest.raises(SapError, match=r"missing 1,"):
        load_weights(_fresh(cfg), state, expect="ssl", verbose=False)
    # the same gap is fine when that part is not expected
    state_no_out = {k: v for k, v in source_model.state_dict().items() if not k.startswith("out.")}
    report = load_weights(_fresh(cfg), state_no_out, expect="sap", verbose=False)
    assert report.complete
    with pytest.raises(SapError, match="missing 2"):
        load_weights(_fresh(cfg), state_no_out, expect="full", verbose=False)


def test_channel_mismatch_fails_unless_adapted(cfg):
    torch.manual_seed(5)
    ct_model = build_swin_unetr(cfg.model, in_channels=1, out_channels=3).eval()
    with pytest.raises(SapError, match="mismatched 1.*adapt"):
        load_weights(_fresh(cfg), ct_model.state_dict(), expect="ssl", verbose=False)
    model = _fresh(cfg)
    report = load_weights(model, ct_model.state_dict(), expect="sap", adapt_channels=True, verbose=False)
    assert report.complete and len(report.adapted) == 3
    # an image repeated over both channels gives the source's patch embedding
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.swinViT.patch_embed(x.repeat(1, 2, 1, 1, 1)), ct_model.swinViT.patch_embed(x), atol=1e-5, rtol=1e-4
        )
    w = torch.randn(4, 1, 2, 2, 2)
    adapted = adapt_input_channels(w, 3)
    assert adapted.shape == (4, 3, 2, 2, 2)
    torch.testing.assert_close(adapted.sum(dim=1, keepdim=True), w)


def test_legacy_checkpoint_identical_only_under_legacy_layout(cfg, source_model):
    legacy_source = copy.deepcopy(source_model)
    set_patch_merging(legacy_source, "legacy")
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        expected = legacy_source(x)
    ckpt = {"state_dict": legacy_source.state_dict(), "epoch": 50}  # a pre-1.5 reference-SAP file
    auto = _fresh(cfg)
    report = load_weights(auto, ckpt, expect="full", verbose=False)
    assert report.model_layout == "legacy"
    forced = _fresh(cfg)
    load_weights(forced, ckpt, expect="full", layout="current", verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(auto(x), expected)
        assert not torch.allclose(forced(x), expected, atol=1e-5)


def test_sap_checkpoint_roundtrip(cfg, source_model, tmp_path):
    ckpt = make_checkpoint(
        source_model, config=cfg.to_dict(), channels=["T1", "b1000"], kind="skeletal", out_channels=3, step=4
    )
    path = save_checkpoint(ckpt, tmp_path / "best.pt")
    meta = load_checkpoint(path)
    assert meta["channels"] == ["T1", "b1000"] and meta["threshold"] == 0.5 and meta["min_volume_ml"] == 0.0
    assert meta["patch_merging"] == "current" and meta["monai_version"] and meta["config"]["scale"] == "tiny"
    model = _fresh(cfg, seed=99)
    set_patch_merging(model, "legacy")  # the file's recorded layout wins under auto
    report = load_weights(model, path, expect="full", verbose=False)
    assert report.source_format == "sap" and report.model_layout == "current"
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source_model(x), rtol=0, atol=0)
    with pytest.raises(SapError, match="not a sap checkpoint"):
        torch.save(source_model.state_dict(), tmp_path / "raw.pt")
        load_checkpoint(tmp_path / "raw.pt")


def test_report_is_printed(cfg, source_model, capsys):
    load_weights(_fresh(cfg), source_model.state_dict(), expect="sap")
    out = capsys.readouterr().out
    assert "loaded" in out and "missing 0" in out and "expect sap" in out


def test_other_shapes_name_the_tensors_and_the_config_key(cfg, tmp_path):
    """Trained with other attention heads or another width: the error says which setting to change."""
    from sap.models.weights import restore_model

    heads = load_config("tiny", ["model.num_heads=[3,6,12,24]"])
    torch.manual_seed(0)
    trained = build_swin_unetr(heads.model, 2, 2)
    path = save_checkpoint(
        make_checkpoint(trained, config=heads.to_dict(), channels=["T1", "b1000"], kind="lesion", out_channels=2),
        tmp_path / "heads.pt",
    )
    with pytest.raises(SapError, match=r"relative_position_bias_table \[2197, 3\] vs model \[2197, 1\].*"
                                       r"set model.num_heads as the checkpoint was trained: model.num_heads=\[3, 6, 12, 24\]"):
        load_weights(_fresh(cfg, out_channels=2), path, expect="full", verbose=False)
    with pytest.raises(SapError, match=r"shape-mismatched.*set model.num_heads"):
        restore_model(_fresh(cfg, out_channels=2), load_checkpoint(path))
    wide = load_config("tiny", ["model.feature_size=24"])
    torch.manual_seed(0)
    wider = make_checkpoint(build_swin_unetr(wide.model, 2, 2), config=wide.to_dict(), channels=["T1", "b1000"],
                            kind="lesion", out_channels=2)  # fmt: skip
    with pytest.raises(SapError, match=r"set model.feature_size as the checkpoint was trained: model.feature_size=24"):
        load_weights(_fresh(cfg, out_channels=2), wider, expect="sap", verbose=False)
