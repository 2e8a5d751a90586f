import tomllib

import pytest

from whaleid import config
from whaleid.config import ConfigError

from conftest import ROOT


def test_default_toml_holds_exactly_the_schema_and_the_original_values():
    data = tomllib.loads((ROOT / "configs/default.toml").read_text())
    assert {s: dict(v) for s, v in data.items()} == config.DEFAULTS
    cfg = config.load(ROOT / "configs/default.toml")
    assert (cfg["run"]["image_size"], cfg["train"]["batch_size"], cfg["train"]["epochs"]) == (224, 100, 120)
    assert (cfg["split"]["validation"], cfg["new_whale"]["threshold"], cfg["predict"]["top_k"]) == (0.3, 0.276, 5)


def test_cpu_config_is_small_and_valid():
    cfg = config.load(ROOT / "configs/cpu.toml")
    assert cfg["run"]["image_size"] <= 128 and cfg["model"]["backbone"] != "InceptionResNetV2"
    assert cfg["model"]["weights"] == "none"


@pytest.mark.parametrize("text, message", [
    ("[train]\nepochz = 3\n", "unknown setting train.epochz"),
    ("[trian]\nepochs = 3\n", r"unknown section \[trian\]"),
    ("[train]\nepochs = 'three'\n", "train.epochs: expected an integer"),
    ("[train]\nepochs = 2.5\n", "train.epochs: expected an integer"),
    ("[dedup]\nverify = 1\n", "dedup.verify: expected true or false"),
    ("[model]\nhead = 'arcface'\n", "model.head: 'arcface' is not one of"),
    ("[train\n", "config file"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load(p)


def test_overrides_are_typed_and_checked():
    cfg = config.load(None, ("train.epochs=5", "split.validation=1", "model.backbone=MobileNetV3Small",
                             "dedup.verify=false"))
    assert cfg["train"]["epochs"] == 5 and cfg["split"]["validation"] == 1.0
    assert cfg["model"]["backbone"] == "MobileNetV3Small" and cfg["dedup"]["verify"] is False
    with pytest.raises(ConfigError, match="train.epochs"):
        config.load(None, ("train.epochs=many",))
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(None, ("epochs=5",))
    with pytest.raises(ConfigError, match="not found"):
        config.load("/nonexistent.toml")
