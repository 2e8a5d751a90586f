import re
import tomllib

import numpy as np
import pytest

from whaleid.pipeline import config
from whaleid.learning import heads
from whaleid.pipeline import head_names
from whaleid.pipeline.config import ConfigError

from conftest import ROOT, cli


def _toml(name: str) -> dict:
    return tomllib.loads((ROOT / "configs" / name).read_text())


def test_defaults_are_exactly_default_toml():
    data = _toml("default.toml")
    assert config.defaults() == data
    assert config.load(None) == data
    assert config.load(ROOT / "configs/default.toml") == data
    assert not hasattr(config, "DEFAULTS")  # no Python copy of the values to drift from the file
    assert (data["run"]["image_size"], data["train"]["batch_size"], data["train"]["epochs"]) == (224, 100, 120)
    assert (data["split"]["validation"], data["new_whale"]["threshold"], data["predict"]["top_k"]) == (0.3, 0.276, 5)
    fresh = config.defaults()
    fresh["train"]["epochs"] = 1
    assert config.defaults()["train"]["epochs"] == 120  # a copy each call


@pytest.mark.parametrize("name, weights", [("cpu", "imagenet"), ("scratch", "none")])
def test_cpu_configs_are_small_and_valid(name, weights):
    cfg = config.load(ROOT / f"configs/{name}.toml")
    assert cfg["run"]["image_size"] <= 128 and cfg["model"]["backbone"] != "InceptionResNetV2"
    assert cfg["model"]["weights"] == weights  # cpu: the pip package's ImageNet weights, no download
    for section, values in _toml(f"{name}.toml").items():
        for key, value in values.items():
            assert cfg[section][key] == value


def test_every_numeric_setting_has_a_range():
    numeric = {f"{s}.{k}" for s, values in config.defaults().items() for k, v in values.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric == set(config.RANGES)


@pytest.mark.parametrize("text, message", [
    ("[train]\nepochz = 3\n", "unknown setting train.epochz"),
    ("[trian]\nepochs = 3\n", r"unknown section \[trian\]"),
    ("[train]\nepochs = 'three'\n", "train.epochs: expected an integer"),
    ("[train]\nepochs = 2.5\n", "train.epochs: expected an integer"),
    ("[dedup]\nverify = 1\n", "dedup.verify: expected true or false"),
    ("[model]\nhead = 'cosface'\n", "model.head: 'cosface' is not one of softmax, siamese, triplet, arcface"),
    ("[train]\nmargin = -1\n", re.escape("setting train.margin = -1.0: must be > 0 and <= 4")),
    ("[train\n", "config file"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load(p)


@pytest.mark.parametrize("override, message", [
    ("train.margin=-1", "setting train.margin = -1.0: must be > 0 and <= 4"),
    ("train.margin=4.5", "setting train.margin = 4.5: must be > 0 and <= 4"),
    ("train.hard_negatives=1.5", "setting train.hard_negatives = 1.5: must be >= 0 and <= 1"),
    ("train.epochs=0", "setting train.epochs = 0: must be >= 1"),
    ("train.batch_size=0", "setting train.batch_size = 0: must be >= 1"),
    ("train.max_minutes=-1", "setting train.max_minutes = -1.0: must be >= 0"),
    ("train.photos_per_id=1", "setting train.photos_per_id = 1: must be >= 2"),
    ("train.learning_rate=0", "setting train.learning_rate = 0.0: must be > 0"),
    ("train.label_smoothing=1", "setting train.label_smoothing = 1.0: must be >= 0 and < 1"),
    ("model.bn_momentum=1", "setting model.bn_momentum = 1.0: must be 0 (the backbone's own) or > 0 and < 1"),
    ("model.bn_momentum=-0.5", "setting model.bn_momentum = -0.5: must be 0 (the backbone's own) or > 0 and < 1"),
    ("model.dropout=1", "setting model.dropout = 1.0: must be >= 0 and < 1"),
    ("model.embedding_size=1", "setting model.embedding_size = 1: must be >= 2"),
    ("evaluate.one_shot=1", "setting evaluate.one_shot = 1: must be 0 (off) or >= 2"),
    ("evaluate.one_shot=-2", "setting evaluate.one_shot = -2: must be 0 (off) or >= 2"),
    ("evaluate.new_whale_share=1", "setting evaluate.new_whale_share = 1.0: must be >= 0 and < 1"),
    ("split.validation=1", "setting split.validation = 1.0: must be >= 0 and < 1"),
    ("split.unseen_ids=-0.1", "setting split.unseen_ids = -0.1: must be >= 0 and < 1"),
    ("dedup.max_distance=65", "setting dedup.max_distance = 65: must be >= 0 and <= 64"),
    ("augment.jpeg_quality=0", "setting augment.jpeg_quality = 0: must be >= 1 and <= 100"),
    ("augment.crop_max=0", "setting augment.crop_max = 0: must be >= 1"),
    ("run.image_size=8", "setting run.image_size = 8: must be >= 16"),
    ("new_whale.threshold=1.5", "setting new_whale.threshold = 1.5: must be >= 0 and <= 1.01"),
    ("predict.top_k=0", "setting predict.top_k = 0: must be >= 1"),
    ("boxes.min_fraction=2", "setting boxes.min_fraction = 2.0: must be >= 0 and <= 1"),
    ("train.margin=nan", "setting train.margin = nan: must be > 0 and <= 4"),
    ("train.learning_rate=inf", "setting train.learning_rate = inf: must be > 0"),
])
def test_out_of_range_fails_at_load_naming_key_value_and_range(override, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        config.load(None, (override,))
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load("cpu", (override,))


@pytest.mark.parametrize("override", ["train.margin=4", "model.bn_momentum=0", "model.bn_momentum=0.99",
                                      "evaluate.one_shot=0", "evaluate.one_shot=2", "new_whale.threshold=1.01",
                                      "split.validation=0", "train.hard_negatives=1", "dedup.max_distance=64",
                                      "augment.jpeg_quality=100", "train.max_minutes=0", "train.photos_per_id=2"])
def test_range_edges_that_are_allowed(override):
    key, value = override.split("=")
    assert config.get(config.load(None, (override,)), key) == tomllib.loads(f"v = {value}")["v"]


def test_a_later_source_may_repair_an_earlier_value(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nmargin = -1\n")
    assert config.load(p, ("train.margin=0.5",))["train"]["margin"] == 0.5


def test_overrides_are_typed_and_checked():
    cfg = config.load(None, ("train.epochs=5", "split.validation=0.5", "model.backbone=MobileNetV3Small",
                             "dedup.verify=false", " train.margin = 2 "))
    assert cfg["train"]["epochs"] == 5 and cfg["split"]["validation"] == 0.5 and cfg["train"]["margin"] == 2.0
    assert cfg["model"]["backbone"] == "MobileNetV3Small" and cfg["dedup"]["verify"] is False
    with pytest.raises(ConfigError, match="train.epochs"):
        config.load(None, ("train.epochs=many",))
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(None, ("epochs=5",))
    with pytest.raises(ConfigError, match="not found"):
        config.load("/nonexistent.toml")


@pytest.mark.parametrize("bad", ["augment.margin", "a=b", "=5", ".x=1", "train.=1", "train.epochs"])
def test_parse_overrides_refuses_malformed_strings(bad):
    with pytest.raises(ConfigError, match=re.escape(f"--set {bad!r}: expected section.key=value")):
        config.parse_overrides(["train.epochs=5", bad])


def test_parse_overrides_keeps_the_last_value_of_a_key():
    assert config.parse_overrides(["train.epochs=5", "run.seed = 7", "train.epochs=9", "model.weights=a=b"]) == \
        {"run.seed": "7", "train.epochs": "9", "model.weights": "a=b"}


@pytest.mark.parametrize("bad, message", [
    ("augment.margin", "--set 'augment.margin': expected section.key=value"),
    ("a=b", "--set 'a=b': expected section.key=value"),
])
def test_malformed_set_is_a_one_line_cli_error(tmp_path, bad, message):
    work = tmp_path / "w"
    for extra in ([], ["--config", "cpu"]):
        code, out = cli("status", "--work", work, *extra, "--set", "train.epochs=2", "--set", bad)
        assert code != 0 and out.strip() == f"Error: {message}, e.g. --set train.epochs=5", out


def test_out_of_range_set_stops_preprocess_before_any_stage(tmp_path):
    work = tmp_path / "w"
    code, out = cli("preprocess", "--work", work, "--data", tmp_path, "--set", "train.margin=-1")
    assert code != 0 and out.strip() == "Error: setting train.margin = -1.0: must be > 0 and <= 4", out
    assert not work.exists()


def test_model_head_accepts_a_head_registered_later(monkeypatch):
    monkeypatch.setattr(head_names, "REGISTRY", dict(head_names.REGISTRY))  # register() below is undone after the test
    with pytest.raises(ConfigError, match="'toy' is not one of softmax, siamese, triplet, arcface$"):
        config.load(None, ("model.head=toy",))
    heads.register("toy", "tests.toy:Toy")
    assert config.load(None, ("model.head=toy",))["model"]["head"] == "toy"
    with pytest.raises(ConfigError, match="'toy2' is not one of softmax, siamese, triplet, arcface, toy$"):
        config.load(None, ("model.head=toy2",))


def test_shipped_config_names_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert set(config.shipped()) == {"cpu", "default", "photoid", "scratch"}
    # photoid: cpu's model, only re-ranking added
    photoid, cpu = config.load("photoid"), config.load("cpu")
    assert photoid["model"] == cpu["model"] and photoid["train"] == cpu["train"]
    assert (photoid["rerank"]["method"], photoid["rerank"]["fusion"], photoid["keypoints"]["mask"]) == ("local", "auto", True)
    assert (photoid["keypoints"]["method"], photoid["rerank"]["matcher"]) == ("aliked", "lightglue")
    assert photoid["rerank"]["glue_confidence"] == 0.7 > config.load("default")["rerank"]["glue_confidence"]
    assert config.resolve("cpu").read_text() == (ROOT / "configs/cpu.toml").read_text()
    assert config.resolve("default").read_text() == (ROOT / "configs/default.toml").read_text()
    assert config.load("cpu") == config.load(ROOT / "configs/cpu.toml") != config.load(None)
    for bad in ("gpu", "cpu.toml", "configs/cpu.toml"):
        with pytest.raises(ConfigError, match=re.escape(f"config file {bad} not found (or name a shipped config: cpu, default, photoid, scratch)")):
            config.resolve(bad)
    (tmp_path / "cpu").write_text("[train]\nepochs = 3\n")  # a file of that name wins over the shipped name
    assert config.resolve("cpu").samefile(tmp_path / "cpu") and config.load("cpu")["train"]["epochs"] == 3


def test_cli_config_by_name_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()  # (status refuses a work folder that does not exist)
    code, out = cli("status", "--work", tmp_path / "w", "--config", "cpu", "--set", "train.margin=-1")
    assert code != 0 and "train.margin = -1.0" in out  # cpu.toml was found and loaded
    code, out = cli("status", "--work", tmp_path / "w", "--config", "cpu")
    assert code == 0 and "dedup" in out, out
    code, out = cli("status", "--work", tmp_path / "w", "--config", "gpu")
    assert code != 0 and "name a shipped config: cpu, default, photoid, scratch" in out, out


def test_pyproject_ships_the_configs_and_every_subpackage():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["whaleid.configs"] == "configs"
    assert "*.toml" in setuptools["package-data"]["whaleid.configs"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "whaleid").rglob("__init__.py")}
    assert set(setuptools["packages"]) == found | {"whaleid.configs"}


def test_average_ranks_with_ties_by_hand():
    from whaleid.metrics.verification import average_ranks, roc_auc
    # sorted: 10 10 | 20 20 20 | 30 -> ranks 1,2 -> 1.5; 3,4,5 -> 4; 6
    assert average_ranks([10, 20, 10, 30, 20, 20]).tolist() == [1.5, 4.0, 1.5, 6.0, 4.0, 4.0]
    assert average_ranks([3.0, 1.0, 2.0]).tolist() == [3.0, 1.0, 2.0]
    assert average_ranks([7, 7, 7, 7]).tolist() == [2.5] * 4
    assert average_ranks([]).tolist() == []
    assert np.isnan(average_ranks([1.0, np.nan])).all()
    # positives 0.5 and 0.9, negatives 0.5 and 0.1: pairs (0.5,0.5) tie 1/2, (0.5,0.1) 1, (0.9,*) 2 -> 3.5/4
    assert roc_auc([True, False, True, False], [0.5, 0.5, 0.9, 0.1]) == 0.875


def test_average_ranks_match_counting():
    from whaleid.metrics.verification import average_ranks
    rng = np.random.default_rng(0)
    for n, distinct in [(1, 1), (9, 2), (40, 5), (200, 1000)]:
        x = rng.integers(0, distinct, n).astype(float)
        below, equal = (x[None, :] < x[:, None]).sum(1), (x[None, :] == x[:, None]).sum(1)
        assert np.array_equal(average_ranks(x), below + (equal + 1) / 2)


def test_a_config_extends_another_and_says_only_what_it_changes(tmp_path):
    child = tmp_path / "child.toml"
    child.write_text('extends = "cpu"\n[train]\nepochs = 3\n')
    cfg, cpu = config.load(child), config.load("cpu")
    assert config.get(cfg, "train.epochs") == 3 and config.get(cpu, "train.epochs") != 3
    assert {k: v for k, v in cfg["model"].items()} == cpu["model"]  # the rest is cpu's
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(config.ConfigError, match="goes round in a circle"):
        config.load(tmp_path / "a.toml")
