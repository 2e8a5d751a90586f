"""The ArcFace head and GeM pooling on constructed numbers (hand-worked values)."""
import math

import numpy as np
import pytest


def test_arcface_logits_add_the_margin_to_the_true_class_angle_only():
    from whaleid.heads.arcface import arcface_logits
    # two classes; the photo's cosine to class 0 (its own) is cos 60 deg, to class 1 cos 80 deg
    cos = np.array([[math.cos(math.radians(60)), math.cos(math.radians(80))]], "float32")
    out = np.asarray(arcface_logits(cos, np.array([0]), np.array([0.5, 0.5], "float32"), 10.0))
    assert out[0, 0] == pytest.approx(10 * math.cos(math.radians(60) + 0.5), abs=1e-4)
    assert out[0, 1] == pytest.approx(10 * math.cos(math.radians(80)), abs=1e-4)
    # per-class margins: class 1 is the true one now, with its own margin 0.2
    out = np.asarray(arcface_logits(cos, np.array([1]), np.array([0.5, 0.2], "float32"), 10.0))
    assert out[0, 1] == pytest.approx(10 * math.cos(math.radians(80) + 0.2), abs=1e-4)
    assert out[0, 0] == pytest.approx(10 * math.cos(math.radians(60)), abs=1e-4)
    # past pi - m the logit keeps falling with the angle (cos - m sin m), never rises again
    cos = np.array([[math.cos(math.radians(170))]], "float32")
    out = float(np.asarray(arcface_logits(cos, np.array([0]), np.array([0.5], "float32"), 1.0))[0, 0])
    assert out == pytest.approx(math.cos(math.radians(170)) - 0.5 * math.sin(0.5), abs=1e-5)


def test_arcface_loss_is_cross_entropy_of_the_margin_logits():
    from whaleid.heads.arcface import ArcFaceLoss
    cos = np.array([[0.9, 0.1, -0.2], [0.3, 0.8, 0.0]], "float32")
    y = np.array([0, 1], "float32")
    loss = float(ArcFaceLoss(np.array([0.5, 0.5, 0.5]), 30.0)(y, cos))
    expected = []
    for row, label in zip(cos, (0, 1)):
        z = 30 * row.astype(np.float64)
        z[label] = 30 * math.cos(math.acos(row[label]) + 0.5)
        expected.append(-z[label] + math.log(np.exp(z).sum()))
    assert loss == pytest.approx(np.mean(expected), rel=1e-4)


def test_subcentres_give_each_id_its_nearest_centre():
    from whaleid.heads.arcface import CosineCentres
    layer = CosineCentres(2, subcenters=2)
    layer.build((None, 2))
    # id 0: centres at 0 and 90 degrees; id 1: at 180 and 270 (columns: id-major, then sub-centre)
    layer.centres.assign(np.array([[1, 0, -1, 0], [0, 1, 0, -1]], "float32") * 3.0)  # any length: normalised
    x = np.array([[0.0, 1.0], [math.cos(math.radians(200)), math.sin(math.radians(200))]], "float32")
    out = np.asarray(layer(x))
    np.testing.assert_allclose(out[0], [1.0, 0.0], atol=1e-6)        # at 90: id 0's second centre
    np.testing.assert_allclose(out[1], [math.cos(math.radians(110)), math.cos(math.radians(20))], atol=1e-6)


def test_dynamic_margins_grow_as_the_photo_count_falls():
    from whaleid.heads.arcface import id_margins
    m = id_margins([1, 16, 81], 0.5, dynamic=True)
    assert m[0] == pytest.approx(0.5) and m[2] == pytest.approx(0.25)
    # 16^-1/4 = 0.5 lies between 1 (rarest) and 81^-1/4 = 1/3 (most common): (0.5 - 1/3) / (2/3) = 0.25
    assert m[1] == pytest.approx(0.25 + 0.25 * 0.25)
    np.testing.assert_allclose(id_margins([1, 16, 81], 0.5, dynamic=False), 0.5)


def test_gem_pooling_against_a_hand_computed_value():
    from whaleid.model import GeM
    x = np.array([1.0, 2.0, 3.0, 4.0], "float32").reshape(1, 2, 2, 1)
    layer = GeM(p=3.0)
    out = float(np.asarray(layer(x))[0, 0])
    assert out == pytest.approx(((1 + 8 + 27 + 64) / 4) ** (1 / 3), rel=1e-5)
    layer.p.assign(1.0)
    assert float(np.asarray(layer(x))[0, 0]) == pytest.approx(2.5, rel=1e-5)
    assert len(layer.trainable_weights) == 1, "p is learned"
