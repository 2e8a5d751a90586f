import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from whaleid.preprocess import boxes


def _sea_with_tail(w=800, h=500, box=(200, 150, 600, 330), grey=False, colour=(30, 30, 32)):
    y = np.linspace(0, 1, h)[:, None, None]
    img = np.broadcast_to(np.array([60, 110, 170]) * (0.9 + 0.2 * y), (h, w, 3)).copy()
    img += np.random.default_rng(0).normal(0, 4, img.shape)
    x0, y0, x1, y1 = box
    xs = np.arange(w)[None, :]
    ys = np.arange(h)[:, None]
    cx = (x0 + x1) / 2
    lobe = (np.abs(xs - cx) / ((x1 - x0) / 2)) ** 2 + ((ys - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2 <= 1
    img[lobe] = colour
    out = np.clip(img, 0, 255).astype(np.uint8)
    return out.mean(-1, keepdims=True).repeat(3, -1).astype(np.uint8) if grey else out


def test_dark_tail_on_blue_sea_is_found():
    rgb = _sea_with_tail()
    *box, method = boxes.detect_box(rgb, detector="grabcut")
    assert method == "grabcut" and boxes.iou(box, (200, 150, 600, 330)) > 0.8
    *box, method = boxes.detect_box(rgb, detector="dark")
    assert method == "dark" and boxes.iou(box, (200, 150, 600, 330)) > 0.8
    *box, method = boxes.detect_box(rgb, detector="hsv")
    assert method.startswith("hsv") and boxes.iou(box, (200, 150, 600, 330)) > 0.8


def test_white_underside_is_found_by_grabcut_not_by_darkness():
    rgb = _sea_with_tail(colour=(235, 235, 230))  # a fluke showing its white underside
    *box, method = boxes.detect_box(rgb, detector="grabcut")
    assert method == "grabcut" and boxes.iou(box, (200, 150, 600, 330)) > 0.8
    *box, method = boxes.detect_box(rgb, detector="dark")
    assert boxes.iou(box, (200, 150, 600, 330)) < 0.5


def test_grabcut_box_does_not_depend_on_opencvs_global_random_state():
    rgb = _sea_with_tail(colour=(200, 190, 150))
    rgb[::7, ::5] = 255  # speckle so k-means has choices to make
    first = boxes.detect_box(rgb, detector="grabcut")
    cv2.setRNGSeed(12345)
    cv2.randu(np.zeros((10, 10)), 0, 1)
    assert boxes.detect_box(rgb, detector="grabcut") == first


def test_greyscale_photo_gets_grabcut_or_the_grey_method():
    for detector, expected in (("grabcut", "grabcut"), ("dark", "grey"), ("hsv", "grey")):
        *box, method = boxes.detect_box(_sea_with_tail(grey=True), detector=detector)
        assert method == expected and boxes.iou(box, (200, 150, 600, 330)) > 0.8


def test_grabcut_iterates_until_its_mask_settles():
    # Once the mask is at a fixed point a higher cap changes nothing; the real-photo test below
    # shows what converging buys (0.856 vs 0.837 with 3 fixed iterations).
    rgb = _sea_with_tail(colour=(200, 190, 150))
    rgb[::7, ::5] = 255
    converged = boxes.grabcut_extent(rgb, max_iterations=10)
    assert converged == boxes.grabcut_extent(rgb, max_iterations=30)
    assert boxes.iou(converged, (200, 150, 600, 330)) > 0.8


def test_blank_image_falls_back_to_the_whole_image():
    for detector in ("grabcut", "dark", "hsv"):
        assert boxes.detect_box(np.full((100, 200, 3), 128, np.uint8), detector=detector) == (0, 0, 200, 100, "full-image")
        assert boxes.detect_box(np.full((1, 1, 3), 9, np.uint8), detector=detector) == (0, 0, 1, 1, "full-image")


def test_box_scaled_back_from_the_downscaled_copy(tmp_path):
    p = tmp_path / "big.jpg"
    Image.fromarray(_sea_with_tail(3000, 1200, (900, 300, 2100, 900))).save(p, quality=92)
    *box, method = boxes.detect_box_file(p, max_side=400, detector="grabcut")
    assert boxes.iou(box, (900, 300, 2100, 900)) > 0.85


def test_grabcut_on_the_real_photos_it_was_tuned_on(shared_data):
    # an in-sample figure (GrabCut's settings were chosen on these photos; 0.727 on 10 it had not seen,
    # issue 15); the default detector's cross-validated figure is tests/test_box_head.py's
    labels = pd.read_csv(shared_data / "whales/labels.csv").dropna(subset=["x0"])
    ious = []
    for r in labels.itertuples():
        *box, method = boxes.detect_box_file(shared_data / "whales/images" / r.Image, detector="grabcut")
        ious.append(boxes.iou(box, (r.x0, r.y0, r.x1, r.y1)))
        print(f"{r.Image} {r.mode} {method:<11} IoU {ious[-1]:.3f}")
    print(f"mean IoU over {len(ious)} real photos: {np.mean(ious):.3f}")
    # 0.856 with GrabCut run to convergence; 0.837 with 3 fixed iterations; 0.787 with the dark mask alone
    assert len(ious) == 29 and np.mean(ious) >= 0.85


def test_box_csv_import_reports_each_bad_row(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text("Image,x0,y0,x1,y1\n"
                 "ok.jpg,10,10,90,50\n"
                 "nan.jpg,10,,90,50\n"
                 "flat.jpg,10,50,90,50\n"
                 "out.jpg,10,10,500,50\n"
                 "gone.jpg,1,1,5,5\n"
                 "ok.jpg,0,0,5,5\n")
    sizes = {n: (100, 60) for n in ("ok.jpg", "nan.jpg", "flat.jpg", "out.jpg")}
    good, bad = boxes.read_box_csv(p, sizes)
    assert good.Image.tolist() == ["ok.jpg"] and tuple(good.iloc[0, 1:5]) == (10, 10, 90, 50)
    reasons = dict(zip(bad.Image + ":" + bad.row.astype(str), bad.reason))
    assert "non-numeric" in reasons["nan.jpg:3"] and "x0 < x1 and y0 < y1" in reasons["flat.jpg:4"]
    assert "outside" in reasons["out.jpg:5"] and "not used" in reasons["gone.jpg:6"]
    assert "twice" in reasons["ok.jpg:7"]
    p.write_text("Image,x0,y0,x1\n")
    with pytest.raises(ValueError, match=r"b.csv: missing column 'y1'"):
        boxes.read_box_csv(p, sizes)


def test_published_box_csv_covers_the_real_photos(shared_data):
    labels = pd.read_csv(shared_data / "whales/labels.csv")
    sizes = {r.Image: (int(r.width), int(r.height)) for r in labels.itertuples()}
    published = shared_data / "whales/kaggle2019_bounding_boxes.csv"
    good, bad = boxes.read_box_csv(published, sizes)
    mine = good[good.Image.isin(sizes)].set_index("Image")
    assert len(mine) >= 29 and (mine.method == "imported").all()
    # each imported box is the file's box (its first row for the photo), rounded and clipped to the photo
    cols = ["x0", "y0", "x1", "y1"]
    raw = pd.read_csv(published)
    raw = raw[raw.Image.isin(sizes)].drop_duplicates("Image").set_index("Image")
    for image, r in mine.iterrows():
        w, h = sizes[image]
        x0, y0, x1, y1 = (float(raw.loc[image, c]) for c in cols)
        want = (max(0, round(x0)), max(0, round(y0)), min(w, round(x1)), min(h, round(y1)))
        assert tuple(int(v) for v in r[cols]) == want, image
    # every photo the file lists is either imported or refused with a reason
    refused = set(bad.Image[bad.Image.isin(sizes)])
    assert set(raw.index) <= set(mine.index) | refused and not set(mine.index) & refused - set(mine.index)
    # labels.csv's reference boxes come from the same published detector: every one is imported as is
    ref = labels.dropna(subset=cols).set_index("Image")
    ious = [boxes.iou(tuple(mine.loc[i, cols]), tuple(ref.loc[i, cols])) for i in ref.index]
    print(f"imported vs reference boxes: mean IoU {np.mean(ious):.3f} over {len(ious)} photos")
    assert len(ious) == 29 and min(ious) > 0.95
