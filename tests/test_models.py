"""Swin UNETR construction, parameter groups and the legacy patch-merging layout (SPEC §5)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import PatchMerging

from sap.config import load_config
from sap.errors import SapError
from sap.models.swin import (
    LegacyPatchMerging,
    build_swin_unetr,
    encoder_features,
    init_output_prior,
    parameter_groups,
    patch_merging_layout,
    resolve_layout,
    set_patch_merging,
)


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config("tiny")


def _legacy_merge_reference(x: torch.Tensor, merging: torch.nn.Module) -> torch.Tensor:
    """MONAI < 1.5 patch merging written out by hand (issue #8284): x2/x5 and x3/x6 repeat."""
    x0 = x[:, 0::2, 0::2, 0::2, :]
    x1 = x[:, 1::2, 0::2, 0::2, :]
    x2 = x[:, 0::2, 1::2, 0::2, :]
    x3 = x[:, 0::2, 0::2, 1::2, :]
    x4 = x[:, 1::2, 0::2, 1::2, :]
    x5 = x[:, 0::2, 1::2, 0::2, :]
    x6 = x[:, 0::2, 0::2, 1::2, :]
    x7 = x[:, 1::2, 1::2, 1::2, :]
    return merging.reduction(merging.norm(torch.cat([x0, x1, x2, x3, x4, x5, x6, x7], -1)))


def test_legacy_merging_matches_pre_1_5_indexing_and_differs_from_current():
    torch.manual_seed(0)
    current = PatchMerging(dim=6)
    legacy = LegacyPatchMerging(dim=6)
    legacy.load_state_dict(current.state_dict())
    x = torch.randn(2, 4, 6, 8, 6)
    with torch.no_grad():
        torch.testing.assert_close(legacy(x), _legacy_merge_reference(x, legacy))
        assert not torch.allclose(legacy(x), current(x), atol=1e-4)
        # odd sizes are padded like MONAI does
        odd = torch.randn(1, 3, 5, 7, 6)
        padded = F.pad(odd, (0, 0, 0, 1, 0, 1, 0, 1))
        torch.testing.assert_close(legacy(odd), _legacy_merge_reference(padded, legacy))


def test_build_layouts_and_switching_keep_weights(tiny_cfg):
    torch.manual_seed(0)
    model = build_swin_unetr(tiny_cfg.model, in_channels=2, out_channels=3)
    assert patch_merging_layout(model) == "current"
    state = copy.deepcopy(model.state_dict())
    set_patch_merging(model, "legacy")
    assert patch_merging_layout(model) == "legacy"
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], state[k]) for k in state)
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.patch_merging = "legacy"
    assert patch_merging_layout(build_swin_unetr(cfg.model, 2, 3)) == "legacy"
    # explicit config beats the weights' layout; auto follows it
    cfg.model.patch_merging = "current"
    assert patch_merging_layout(build_swin_unetr(cfg.model, 2, 3, patch_merging="legacy")) == "current"
    cfg.model.patch_merging = "auto"
    assert patch_merging_layout(build_swin_unetr(cfg.model, 2, 3, patch_merging="legacy")) == "legacy"
    assert resolve_layout("auto") == "current"
    with pytest.raises(SapError):
        resolve_layout("sideways")


def test_forward_shapes_and_layout_changes_output(tiny_cfg):
    torch.manual_seed(1)
    model = build_swin_unetr(tiny_cfg.model, in_channels=2, out_channels=4).eval()
    x = torch.randn(1, 2, 32, 32, 64)
    with torch.no_grad():
        y_current = model(x)
        set_patch_merging(model, "legacy")
        y_legacy = model(x)
        feats = encoder_features(model, x)
    assert y_current.shape == (1, 4, 32, 32, 64)
    assert feats.shape == (1, 16 * tiny_cfg.model.feature_size)
    assert not torch.allclose(y_current, y_legacy, atol=1e-5)


def test_parameter_groups_follow_patterns(tiny_cfg):
    model = build_swin_unetr(tiny_cfg.model, in_channels=2, out_channels=2)
    encoder, decoder = parameter_groups(model, tiny_cfg.model.encoder_patterns)
    names = dict((id(p), n) for n, p in model.named_parameters())
    enc_names = {names[id(p)] for p in encoder}
    dec_names = {names[id(p)] for p in decoder}
    assert len(encoder) + len(decoder) == len(list(model.parameters()))
    assert all(n.startswith(("swinViT.", "encoder")) for n in enc_names)
    assert any(n.startswith("encoder10.") for n in enc_names)
    assert all(n.startswith(("decoder", "out.")) for n in dec_names)
    assert "out.conv.conv.weight" in dec_names
    # only the transformer as encoder
    encoder2, decoder2 = parameter_groups(model, ["swinViT."])
    assert len(encoder2) < len(encoder) and len(decoder2) > len(decoder)
    with pytest.raises(SapError, match="encoder_patterns"):
        parameter_groups(model, ["nothing_matches."])


def test_output_prior_makes_the_untrained_network_predict_the_label_frequencies(tiny_cfg):
    torch.manual_seed(0)
    model = build_swin_unetr(tiny_cfg.model, in_channels=1, out_channels=3).eval()
    bias = init_output_prior(model, [960, 40, 0])
    expected = torch.log(torch.tensor([0.96, 0.04, 1e-4]))
    assert torch.allclose(bias, expected, atol=1e-6)
    with torch.no_grad():
        probs = torch.softmax(model(torch.randn(1, 1, 64, 64, 64)), dim=1).mean(dim=(0, 2, 3, 4))
    # random weights add noise around the prior, but background dominates as in the labels
    assert probs[0] > 0.8 and probs[2] < probs[1] < probs[0]
    with pytest.raises(SapError, match="2 counts for 3 output channels"):
        init_output_prior(model, [1, 1])


def test_num_heads_must_divide_the_stage_widths(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.num_heads = [5, 2, 4, 8]
    with pytest.raises(SapError, match="num_heads"):
        build_swin_unetr(cfg.model, in_channels=1, out_channels=2)
    cfg.model.num_heads = [3, 6, 12, 24]
    model = build_swin_unetr(cfg.model, in_channels=1, out_channels=2)
    assert model.swinViT.layers1[0].blocks[0].attn.num_heads == 3
