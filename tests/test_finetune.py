"""Fine-tuning pretrained weights: epochs with the backbone frozen (train.head_epochs), then the whole
network; batch-norm kept in inference mode (model.freeze_bn); both resumable across the phase
boundary. On test_train's tiny synthetic set, with the tiny backbone's weights from a file playing
the pretrained weights."""
from pathlib import Path

import numpy as np
import pytest

from test_train import BASE, ROOT, history, killed_at, manifest, run_train

from whaleid.pipeline import config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A weights file for the tiny backbone (random but fixed, non-trivial batch-norm statistics)."""
    from whaleid.learning import model as models
    path = tmp_path_factory.mktemp("weights") / "tiny.weights.h5"
    net = models.build_model(config.load(ROOT / "configs" / "scratch.toml", tuple(BASE)), 4)
    backbone = models.find_backbone(net)
    rng = np.random.default_rng(0)
    for layer in backbone.layers:
        if layer.weights and "bn" in layer.name:
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma, beta, rng.normal(0, 0.5, mean.shape), rng.uniform(0.5, 2, var.shape)])
    backbone.save_weights(path)
    return path


def backbone_weights(work) -> dict[str, list[np.ndarray]]:
    from whaleid.learning import model as models
    net = models.load_model(Path(work) / "train" / "model.keras")
    return {layer.name: layer.get_weights() for layer in models.find_backbone(net).layers if layer.weights}


def file_weights(path) -> dict[str, list[np.ndarray]]:
    from whaleid.learning import model as models
    net = models.build_model(config.load(ROOT / "configs" / "scratch.toml", tuple(BASE) + (f"model.weights={path}",)), 4)
    return {layer.name: layer.get_weights() for layer in models.find_backbone(net).layers if layer.weights}


def test_head_epochs_leave_the_backbone_untouched_then_the_whole_network_trains(tmp_path, pretrained):
    start = file_weights(pretrained)
    frozen = tmp_path / "frozen"
    lines = []
    run_train(frozen, [f"model.weights={pretrained}", "train.epochs=2", "train.head_epochs=2"], lines=lines)
    for name, arrays in backbone_weights(frozen).items():
        for a, b in zip(arrays, start[name]):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} changed while frozen")
    assert history(frozen)["loss"][-1] < history(frozen)["loss"][0], "the head learned"

    both = tmp_path / "both"
    lines = []
    # (no validation and a slow rate: the best epoch, whose weights are kept, is a whole-network one)
    run_train(both, [f"model.weights={pretrained}", "train.epochs=3", "train.head_epochs=1", "split.validation=0",
                     "train.head_learning_rate=0.002", "train.learning_rate=0.001"], lines=lines)
    assert any("epochs 1-1: head only (backbone frozen), learning rate 0.002" in x for x in lines), lines
    assert any("epochs 2-3: whole network, learning rate 0.001" in x for x in lines), lines
    assert manifest(both)["counts"]["best_epoch"] > 1, lines
    changed = [name for name, arrays in backbone_weights(both).items()
               if any(not np.array_equal(a, b) for a, b in zip(arrays, start[name]))]
    assert "tiny_conv0" in changed and "tiny_bn0" in changed
    assert manifest(both)["counts"]["epochs"] == 3


def test_freeze_bn_keeps_the_pretrained_batch_norm_statistics(tmp_path, pretrained):
    start = file_weights(pretrained)
    work = tmp_path / "w"
    run_train(work, [f"model.weights={pretrained}", "train.epochs=2", "model.freeze_bn=true"])
    trained = backbone_weights(work)
    for name in ("tiny_bn0", "tiny_bn1", "tiny_bn2"):
        mean, var = trained[name][2:4]
        np.testing.assert_array_equal(mean, start[name][2], err_msg=f"{name} moving mean moved")
        np.testing.assert_array_equal(var, start[name][3], err_msg=f"{name} moving variance moved")
    assert not np.array_equal(trained["tiny_conv1"][0], start["tiny_conv1"][0]), "the convolutions still train"


def test_finetune_fraction_trains_only_the_layers_nearest_the_output(tmp_path, pretrained):
    from whaleid.learning import model as models
    start = file_weights(pretrained)
    work = tmp_path / "w"
    run_train(work, [f"model.weights={pretrained}", "train.epochs=2", "train.head_epochs=0",
                     "model.finetune_fraction=0.5", "split.validation=0"])
    trained = backbone_weights(work)
    order = [layer.name for layer in models.find_backbone(models.load_model(work / "train" / "model.keras")).layers]
    cut = int(round(0.5 * len(order)))
    frozen = [n for n in order[:cut] if n in trained]
    free = [n for n in order[cut:] if n in trained]
    assert frozen and free
    for name in frozen:
        for a, b in zip(trained[name], start[name]):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} (in the frozen first half) changed")
    assert any(not np.array_equal(a, b) for n in free for a, b in zip(trained[n], start[n])), "the top half trains"


@pytest.mark.parametrize("point, resumed_from", [("train.epoch_saved@2", 2), ("train.epoch_saved@3", 3),
                                                 ("train.batch@5", 1)])
def test_a_kill_in_either_phase_resumes_and_matches_an_uninterrupted_run(tmp_path, pretrained, point, resumed_from):
    settings = [f"model.weights={pretrained}", "train.epochs=4", "train.head_epochs=2", "train.lr_schedule=cosine",
                "train.online_augment=true"]
    whole = tmp_path / "whole"
    run_train(whole, settings)
    killed = tmp_path / "killed"
    killed_at(killed, point, settings)
    lines = []
    run_train(killed, settings, lines=lines)
    assert manifest(killed)["counts"]["resumed_from_epoch"] == resumed_from
    a, b = history(killed), history(whole)
    assert a.keys() == b.keys()
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
