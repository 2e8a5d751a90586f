"""The learned tail box (boxes.detector = "cnn", box_head.py / box_train.py): cross-validated on the
real photos, its fit reproducible, its parts checked on pictures with known answers, on synthetic
flukes, in forked workers, and on the report's box sheet."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from whaleid.preprocess import box_head, box_train, boxes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real():
    shared = ROOT.parent / "shared" / "data" / "whales"
    if not shared.is_dir():
        pytest.skip(f"real data folder {shared} is absent (only in the whaleid workplace)")
    photos = box_train.load_labelled(shared / "images", shared / "labels.csv")
    return photos, box_train.photo_statistics(photos)


def test_leave_one_out_on_the_real_photos(real):
    """Every photo scored by a classifier fitted without it, its mirror image and its augmented copies,
    through the stage's code (boxes.detect_box, scaled back to the file). 0.890 mean, worst 0.731 here;
    GrabCut, hand-tuned on these same photos, 0.856 in-sample (worst 0.404)."""
    photos, stats = real
    weights = box_train.fold_weights(stats)
    found = [box_train.detect(p, w) for p, w in zip(photos, weights)]
    ious = [boxes.iou(f[:4], p.box) for f, p in zip(found, photos)]
    for p, f, v in zip(photos, found, ious):
        print(f"{p.name} {f[4]:<12} IoU {v:.3f}")
    print(f"leave-one-out mean IoU {np.mean(ious):.3f}, worst {np.min(ious):.3f} over {len(ious)} photos")
    assert len(ious) == 29
    assert np.mean(ious) >= 0.87 and min(ious) >= 0.6
    assert {f[4] for f in found} <= {"cnn+grabcut", "cnn"}


def test_leave_one_out_is_a_fit_without_the_photo(real):
    """Subtracting a photo's statistics from the total is the fit on the others, exactly: the photo
    (and its mirror image and copies) takes no part in the weights that score it."""
    _, stats = real
    total = box_train.combine(stats)
    for i in (0, 13, 28):
        others = [s for j, s in enumerate(stats) if j != i]
        by_subtraction = box_train.solve(box_train.combine([total, stats[i]], [1, -1]))
        refit = box_train.solve(box_train.combine(others))
        np.testing.assert_allclose(by_subtraction.w, refit.w, rtol=1e-5, atol=1e-9)
        assert abs(by_subtraction.b - refit.b) < 1e-6
    # fixed folds leave a whole fold out: both photos of a fold get the same weights, other folds others
    folds = box_train.fold_weights(stats, folds=3)
    assert folds[0] is folds[1] and folds[0] is not folds[-1]


def test_shipped_weights_are_the_fit_on_every_real_photo(real):
    """box_head_weights.py is what scripts/fit_box_head.py fits on the 29 photos (no hand edits): the
    tail probabilities it gives agree with a fresh fit on every photo's cells."""
    photos, stats = real
    fresh = box_train.solve(box_train.combine(stats))
    shipped = box_head.shipped_weights()
    assert shipped.parts == fresh.parts == box_head.DESIGN and len(shipped.w) == 4 * 112
    for st in stats:
        assert np.abs(box_head.probability(st["map"], shipped) - box_head.probability(st["map"], fresh)).max() < 0.01


def test_best_box_agrees_with_the_probabilities():
    p = np.zeros((8, 16), np.float32)
    p[2:6, 3:13] = 1.0
    x0, y0, x1, y1 = box_head.best_box(p)
    assert abs(x0 - 3 / 16) < 0.04 and abs(x1 - 13 / 16) < 0.04 and abs(y0 - 2 / 8) < 0.07 and abs(y1 - 6 / 8) < 0.07
    p[0, 0] = 0.9      # a lone confident cell far away does not stretch the box
    assert box_head.iou(box_head.best_box(p), (x0, y0, x1, y1)) > 0.95
    assert box_head.best_box(np.full((8, 16), 0.4, np.float32)) is None


def test_a_photo_with_nothing_tail_like_keeps_the_whole_photo():
    for rgb in (np.full((100, 200, 3), 128, np.uint8), np.full((1, 1, 3), 9, np.uint8)):
        h, w = rgb.shape[:2]
        assert boxes.detect_box(rgb, detector="cnn") == (0, 0, w, h, "full-image")


def test_augmented_copies_move_the_box_with_the_fluke():
    """Zoomed out, cropped, mirrored: the box returned is where the fluke's pixels went."""
    rgb = np.full((200, 400, 3), (60, 110, 170), np.uint8)
    box = (100, 60, 300, 140)
    rgb[60:140, 100:300] = (255, 0, 255)        # the "fluke", in a colour nothing else has
    rel = (box[0] / 400, box[1] / 200, box[2] / 400, box[3] / 200)
    rng = np.random.default_rng(0)
    for k in range(12):
        out, (x0, y0, x1, y1) = box_train.augment(rgb, rel, rng, zoom_out=k % 2 == 0)
        h, w = out.shape[:2]
        mask = (out[..., 0].astype(int) - out[..., 1] > 60) & (out[..., 2].astype(int) - out[..., 1] > 60)
        if (out[..., 0] == out[..., 1]).all():   # a greyscale copy: the fluke is the lightest part
            mask = out[..., 0] > out[..., 0].mean() + 20
        ys, xs = np.nonzero(mask)
        seen = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
        assert box_head.iou(seen, (x0, y0, x1, y1)) > 0.85, (k, seen, (x0, y0, x1, y1))


def test_synthetic_flukes(tiny_set):
    """The classifier never saw a synthetic fluke (they are not real enough to train on: with them the
    real-photo figure drops); on the generator's photos its box still holds the tail: most of the true
    box inside it and its centre on the tail. Its boxes are looser than the generator's tight ones (it
    learned the published detector's margin), so IoU is lower than the coverage."""
    truth = pd.read_csv(tiny_set / "boxes.csv")
    cover, centre, ious, methods = [], [], [], []
    for r in truth.itertuples():
        path = tiny_set / "train" / r.Image
        path = path if path.exists() else tiny_set / "test" / r.Image
        *b, method = boxes.detect_box_file(path, detector="cnn")
        t = (r.x0, r.y0, r.x1, r.y1)
        inter = max(0, min(b[2], t[2]) - max(b[0], t[0])) * max(0, min(b[3], t[3]) - max(b[1], t[1]))
        cover.append(inter / ((t[2] - t[0]) * (t[3] - t[1])))
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        centre.append(t[0] <= cx <= t[2] and t[1] <= cy <= t[3])
        ious.append(boxes.iou(b, t))
        methods.append(method)
    print(f"synthetic: {len(ious)} photos, coverage of the true box {np.mean(cover):.3f} (worst {min(cover):.3f}), "
          f"centre on the tail {np.mean(centre):.3f}, IoU {np.mean(ious):.3f}; {pd.Series(methods).value_counts().to_dict()}")
    # coverage 0.912 (worst 0.718), centre 0.953, IoU 0.647 on this set (IoU 0.731 with photos decoded at 512 px)
    assert np.mean(cover) >= 0.85 and min(cover) >= 0.5 and np.mean(centre) >= 0.9 and np.mean(ious) >= 0.6


FORKED = """
import json, multiprocessing, sys
sys.path.insert(0, sys.argv[1])
from whaleid.preprocess import boxes
assert "tensorflow" not in sys.modules        # the stage cache forks only a TensorFlow-free parent
paths = sys.argv[2:]
with multiprocessing.get_context("fork").Pool(2) as pool:
    found = pool.map(boxes.detect_box_file, paths, chunksize=1)
print(json.dumps([list(f) for f in found]))
"""


def test_forked_workers_find_the_boxes_found_in_process(tiny_set):
    """A forked worker of a parent without TensorFlow builds its own network (one thread) and finds the
    same boxes as the main process: what the boxes stage does with --workers 2."""
    paths = sorted(str(p) for p in (tiny_set / "train").glob("*.jpg"))[:6]
    out = subprocess.run([sys.executable, "-c", FORKED, str(ROOT), *paths], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    import json
    forked = [tuple(f) for f in json.loads(out.stdout.strip().splitlines()[-1])]
    assert forked == [boxes.detect_box_file(p) for p in paths]


def test_the_report_names_the_cnn_methods(tmp_path):
    """The report's box sheet shows each photo's method: the learned detector's two are on it."""
    from whaleid.report import page as report
    assert {"cnn+grabcut", "cnn"} <= set(boxes.METHODS)
    data, work = tmp_path / "data", tmp_path / "work"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    (work / "boxes").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(np.full((100, 200, 3), 120, np.uint8)).save(data / "train" / name)
    pd.DataFrame({"Image": ["a.jpg", "b.jpg"], "x0": 20, "y0": 10, "x1": 180, "y1": 90,
                  "method": ["cnn+grabcut", "cnn"]}).to_csv(work / "boxes" / "BB_TRAIN.csv", index=False)
    pd.DataFrame(columns=["Image", "x0", "y0", "x1", "y1", "method"]).to_csv(work / "boxes" / "BB_TEST.csv", index=False)
    index = report.write_report(work, data, sample=4)
    html = index.read_text()
    assert "cnn+grabcut" in html and (index.parent / "boxes_cnn_grabcut.png").is_file()
    assert (index.parent / "boxes_cnn.png").is_file()
