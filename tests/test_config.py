from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sap.config import ConfigError, config_from_dict, load_config, preset_path, save_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny", "demo", "paper"])
def test_presets_load_and_mirror_configs_folder(name):
    cfg = load_config(name)
    assert cfg.scale == name
    shipped = preset_path(name).read_text()
    assert (REPO / "configs" / f"{name}.yaml").read_text() == shipped


def test_paper_scale_values():
    cfg = load_config("paper")
    assert cfg.model.feature_size == 48 and cfg.model.patch_size == [96, 96, 96]
    assert cfg.finetune.lr_sap_encoder == 2e-6 and cfg.finetune.lr_sap_decoder == 1e-5
    assert cfg.cv.k == 7


def test_unknown_keys_and_wrong_types_are_listed():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"feature_sise": 12, "patch_size": "big"}, "bogus": 1}, "x.yaml")
    message = str(info.value)
    assert "model.feature_sise: unknown key" in message
    assert "model.patch_size: expected" in message
    assert "bogus: unknown key" in message
    assert message.startswith("x.yaml")


def test_bool_is_not_an_int_and_choices_are_checked():
    with pytest.raises(ConfigError, match="finetune.max_steps"):
        config_from_dict({"finetune": {"max_steps": True}})
    with pytest.raises(ConfigError, match="finetune.sampler"):
        config_from_dict({"finetune": {"sampler": "random"}})
    with pytest.raises(ConfigError, match="divisible by 32"):
        config_from_dict({"model": {"patch_size": [64, 64, 48]}})


def test_set_overrides_parse_yaml_values():
    cfg = load_config("demo", ["finetune.max_steps=20", "evaluate.threshold=0.3", "data.channels=[CT]"])
    assert cfg.finetune.max_steps == 20
    assert cfg.evaluate.threshold == 0.3
    assert cfg.data.channels == ["CT"]
    with pytest.raises(ConfigError, match="unknown key"):
        load_config("demo", ["finetune.max_stepz=20"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("demo", ["finetune.max_steps"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("demo", ["cv.k=4"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(path)
    assert again == cfg and again.hash() == cfg.hash()
    assert yaml.safe_load(path.read_text())["cv"]["k"] == 4


def test_hash_ignores_paths_but_not_settings():
    a = load_config("demo")
    b = load_config("demo")
    b.out, b.data.root = "/elsewhere", "/data"
    assert a.hash() == b.hash()
    b.finetune.max_steps += 1
    assert a.hash() != b.hash()


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_allowed_values_live_beside_their_fields_and_every_offence_is_listed():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"finetune": {"sampler": "random"}, "cv": {"methods": ["sap", "imagenet"]},
                          "evaluate": {"connectivity": 8}, "model": {"feature_sise": 1}}, "x.yaml")  # fmt: skip
    message = str(info.value)
    assert len(message.splitlines()) == 1
    for part in ("finetune.sampler: 'random' is not one of instance, posneg",
                 "cv.methods: 'imagenet' is not one of baseline, scratch, ssl, sap",
                 "evaluate.connectivity: 8 is not one of 6, 18, 26", "model.feature_sise: unknown key"):  # fmt: skip
        assert part in message


@pytest.mark.parametrize("value", [0, -1, 150, float("nan")])
def test_the_unet_topk_share_must_be_a_percentage(value):
    with pytest.raises(ConfigError, match=r"slice2d.unet_ce_topk_percent: .* must be a percentage in \(0, 100\]"):
        config_from_dict({"slice2d": {"unet_ce_topk_percent": value}}, "x.yaml")
    assert config_from_dict({"slice2d": {"unet_ce_topk_percent": None}}).slice2d.unet_ce_topk_percent is None
    assert config_from_dict({"slice2d": {"unet_ce_topk_percent": 100}}).slice2d.unet_ce_topk_percent == 100
