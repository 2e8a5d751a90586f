"""whaleid.report.page (with sheets, predictions and charts): the PNG sheets and plots and the index.html that shows
them, on a tiny real run and on hand-made work folders (a stage not run, a history without validation, a box
at a known place); and the plot axes' tick and scale arithmetic."""
import json
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from whaleid.report import drawing, page as report, sheets as report_sheets
from whaleid.datasets import synth
from whaleid.cli import main

from conftest import whaleid
from whaleid.pipeline.stage import fingerprint

CPU = Path(__file__).parents[1] / "configs/scratch.toml"
TINY = ["--config", str(CPU), "--set", "model.backbone=tiny", "--set", "run.image_size=48",
        "--set", "train.epochs=2", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "data"
    synth.generate(out, ids=6, seed=1, workers=2, photos="uniform:4", size_scale=0.3, progress=False)
    return out


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    work = tmp_path_factory.mktemp("report") / "work"
    whaleid("predict", "--data", data, "--work", work, *TINY)
    whaleid("evaluate", "--work", work, "--quiet")
    return work


def referenced(index: Path) -> list[str]:
    return [unquote(s) for s in re.findall(r'<img src="([^"]+)"', index.read_text())]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.verify()  # a valid, complete PNG
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert 300 <= w <= 4000 and 100 <= h <= 6000, (path.name, im.size)
        return np.asarray(im.convert("RGB")).astype(int)


def count(a: np.ndarray, rgb: tuple, tol: int = 40) -> int:
    return int((np.abs(a - np.array(rgb)).max(axis=2) <= tol).sum())


def folder_state(folder: Path) -> dict:
    return {str(p.relative_to(folder)): fingerprint(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_full_run_report_shows_every_section(data, full_run, tmp_path):
    before = folder_state(data)
    out = tmp_path / "report"
    index = report.write_report(full_run, data, out=out, sample=8, seed=0)
    assert index == out / "index.html" and index.is_file()
    assert folder_state(data) == before  # nothing written into (or changed in) the data folder

    html = index.read_text()
    assert "Not shown" not in html
    refs = referenced(index)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert sorted(refs) == pngs and len(set(refs)) == len(refs)  # every PNG shown, once, by a relative link
    assert all("/" not in r and ":" not in r for r in refs)

    boxes = pd.concat([pd.read_csv(full_run / "boxes" / f) for f in ("BB_TRAIN.csv", "BB_TEST.csv")])
    expected = {f"boxes_{m}.png" for m in boxes.method.unique()}
    expected |= {"training_curves.png", "threshold_map5.png", "predictions.png"}
    if len(pd.read_csv(full_run / "dedup" / "dedup_report.csv")):
        expected.add("dedup_1.png")
    assert set(pngs) == expected

    for name in pngs:
        a = pixels(out / name)
        assert a.std() > 15, f"{name} looks blank"
        if name.startswith("boxes_"):
            assert count(a, drawing.RED) > 300, f"{name}: no box drawn"
        if name in ("training_curves.png", "threshold_map5.png"):
            assert count(a, drawing.BLUE) > 600, f"{name}: no curve drawn"
        if name == "training_curves.png":
            assert count(a, drawing.ORANGE) > 600, "no validation curve"  # more than legend + marker
        if name in ("predictions.png", "dedup_1.png") or name.startswith("boxes_"):
            assert a.std() > 30, f"{name}: no photos on the sheet?"

    # the tiles of the full-image sheet: every fallback, one tile each (4 columns, 1 row when <= 4)
    n_full = int((boxes.method == "full-image").sum())
    if n_full:
        assert f"all {n_full}" in html

    # the best epoch marked is the one training kept
    best = json.loads((full_run / "train" / "manifest.json").read_text())["counts"]["best_epoch"]
    assert f"kept epoch {best}: best val_accuracy" in html

    # predictions: sample rows, each one query + 3 ids; the sheet's height grows with the sample
    n_test = len(pd.read_csv(full_run / "predict" / "predictions.csv"))
    assert f"Test predictions: {min(8, n_test)} of {n_test} photos" in html
    small = report.write_report(full_run, data, out=tmp_path / "small", sample=2, seed=0)
    h_small = Image.open(small.parent / "predictions.png").size[1]
    assert h_small < Image.open(out / "predictions.png").size[1]


def test_report_of_a_preprocessed_work_folder_names_the_missing_stages(data, tmp_path):
    work = tmp_path / "work"
    whaleid("preprocess", "--data", data, "--work", work, *TINY)
    out = tmp_path / "report"
    out.mkdir()
    Image.new("RGB", (400, 200), "white").save(out / "training_curves.png")  # left by an older report
    Image.new("RGB", (400, 200), "white").save(out / "mine.png")             # not the report's
    index = report.write_report(work, None, out=out)  # the data folder comes from WORK/whaleid.json
    html = index.read_text()
    for stage in ("train", "evaluate", "predict"):
        assert f"Not shown: the {stage} stage has not run" in html
    assert "the boxes stage has not run" not in html and "the dedup stage has not run" not in html
    pngs = {p.name for p in out.glob("*.png")}
    assert not pngs & {"training_curves.png", "threshold_map5.png", "predictions.png"}
    assert "mine.png" in pngs
    assert set(referenced(index)) == pngs - {"mine.png"}
    assert any(p.startswith("boxes_") for p in pngs)
    for name in pngs - {"mine.png"}:
        assert pixels(out / name).std() > 30


def test_an_empty_work_folder_reports_every_section_missing(tmp_path):
    (tmp_path / "work").mkdir()
    index = report.write_report(tmp_path / "work", None)
    assert index == tmp_path / "work" / "report" / "index.html"
    html = index.read_text()
    assert html.count("Not shown:") == 5
    assert not list(index.parent.glob("*.png"))


def test_box_lands_on_the_tail_and_partial_stages_are_noted(tmp_path):
    """A 2000x1000 JPEG (decoded at reduced size) with a black tail at a known box: the red box drawn must
    frame the black region. Also: a history without validation columns, a dedup report with a conflict,
    a train stage without manifest (still running)."""
    data, work = tmp_path / "data", tmp_path / "work"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        a = np.full((1000, 2000, 3), 200, np.uint8)
        a[...] += rng.integers(0, 20, size=(1000, 2000, 1), dtype=np.uint8)
        a[300:700, 500:1500] = (0, 200, 0)  # the "tail", in a colour nothing else on the sheet has
        Image.fromarray(a).save(data / "train" / name, "JPEG", quality=90)
    (data / "test" / "broken.jpg").write_bytes(b"not a jpeg")
    (work / "boxes").mkdir(parents=True)
    pd.DataFrame({"Image": ["a.jpg", "b.jpg"], "x0": 500, "y0": 300, "x1": 1500, "y1": 700, "method": ["dark", "grey"]}) \
        .to_csv(work / "boxes" / "BB_TRAIN.csv", index=False)
    pd.DataFrame({"Image": ["broken.jpg"], "x0": 0, "y0": 0, "x1": 10, "y1": 10, "method": "full-image"}) \
        .to_csv(work / "boxes" / "BB_TEST.csv", index=False)
    (work / "dedup").mkdir()
    pd.DataFrame({"group": [0, 1], "images": ["a.jpg b.jpg", "c.jpg a.jpg"], "folders": ["train train", "train train"],
                  "ids": ["w_1 w_1", "w_1 w_2"], "preferred": ["a.jpg", "c.jpg"], "conflict": [False, True],
                  "action": ["kept a.jpg", "conflict: different ids, left unchanged"]}) \
        .to_csv(work / "dedup" / "dedup_report.csv", index=False)
    (work / "train").mkdir()
    pd.DataFrame({"epoch": [0, 1, 2, 3], "loss": [2.0, 1.5, 1.2, 1.1], "accuracy": [0.2, 0.5, 0.5, 0.4]}) \
        .to_csv(work / "train" / "history.csv", index=False)

    index = report.write_report(work, data, sample=4)
    html = index.read_text()
    out = index.parent
    # boxes: the broken test photo is left out and said so; its method has no sheet
    assert "1 photo(s) could not be read" in html and "broken.jpg" in html
    assert not (out / "boxes_full-image.png").exists()
    a = pixels(out / "boxes_dark.png")
    red = np.argwhere(np.abs(a - np.array(drawing.RED)).max(axis=2) <= 40)
    tail = np.argwhere(np.abs(a - np.array([0, 200, 0])).max(axis=2) <= 50)
    assert len(red) > 300 and len(tail) > 1000
    (ry0, rx0), (ry1, rx1) = red.min(axis=0), red.max(axis=0)
    (ty0, tx0), (ty1, tx1) = tail.min(axis=0), tail.max(axis=0)
    # the red frame hugs the tail: just outside it on every side (3 px line, drawn outside the box)
    assert ry0 < ty0 and rx0 < tx0 and ry1 > ty1 and rx1 > tx1, ((ry0, rx0, ry1, rx1), (ty0, tx0, ty1, tx1))
    for r, t in ((ry0, ty0), (rx0, tx0), (ry1, ty1), (rx1, tx1)):
        assert abs(int(r) - int(t)) <= 5, ((ry0, rx0, ry1, rx1), (ty0, tx0, ty1, tx1))
    assert (tx1 - tx0) > 100  # half of a 240 px tile: the photo was fitted to the tile, not left small
    assert (out / "boxes_grey.png").is_file()
    # dedup: conflicts first, counted
    assert "2 duplicate groups, 1 with conflicting ids" in html
    assert pixels(out / "dedup_1.png").std() > 30
    # training: no validation, kept epoch by training accuracy (the last of the tied maxima, 1-based)
    assert "No validation columns" in html
    assert "kept epoch 3: best accuracy" in html
    assert "the train stage has no manifest" in html
    assert count(pixels(out / "training_curves.png"), drawing.BLUE) > 300
    for stage in ("evaluate", "predict"):
        assert f"Not shown: the {stage} stage has not run" in html


def test_refuses_to_write_into_the_data_folder(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match="inside the data folder"):
        report.write_report(tmp_path / "work", tmp_path / "data", out=tmp_path / "data" / "report")
    assert not (tmp_path / "data" / "report").exists()
    with pytest.raises(ValueError):
        report.write_report(tmp_path / "work", tmp_path / "data", sample=0)


def test_cli_report_writes_the_page_and_refuses_bad_folders(full_run, tmp_path):
    out = tmp_path / "cli_report"
    text = whaleid("report", "--work", full_run, "--out", out, "--sample", 3, "--seed", 2)
    assert f"report: {(out / 'index.html').resolve().as_uri()}" in text
    refs = referenced(out / "index.html")
    assert refs and all((out / r).is_file() for r in refs)
    assert "predictions.png" in refs and "training_curves.png" in refs
    bad = CliRunner().invoke(main, ["report", "--work", str(tmp_path / "nowhere")])
    assert bad.exit_code != 0 and "nowhere" in bad.output and "not found" in bad.output


def _photo(path: Path, rng, size=(300, 200)):
    a = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path, "JPEG", quality=80)


def test_every_full_image_fallback_is_drawn_and_new_whale_keeps_three_id_photos(tmp_path, monkeypatch):
    """More fallbacks than one sheet holds: every one is on some sheet. A prediction with new_whale first
    still shows three known ids' photos (so four tiles beside the query); one without new_whale, three."""
    monkeypatch.setattr(report_sheets, "FULL_IMAGE_PER_PAGE", 8)
    data, work = tmp_path / "data", tmp_path / "work"
    for d in (data / "train", data / "test", work / "boxes", work / "format", work / "predict"):
        d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = [f"t{i:02d}.jpg" for i in range(19)]
    for name in train:
        _photo(data / "train" / name, rng)
    for name in ("q1.jpg", "q2.jpg"):
        _photo(data / "test" / name, rng)
    bb = pd.DataFrame({"Image": train, "x0": 0, "y0": 0, "x1": 300, "y1": 200, "method": "full-image"})
    bb.to_csv(work / "boxes" / "BB_TRAIN.csv", index=False)
    pd.DataFrame({"Image": ["q1.jpg", "q2.jpg"], "x0": 10, "y0": 10, "x1": 200, "y1": 150, "method": "dark"}) \
        .to_csv(work / "boxes" / "BB_TEST.csv", index=False)
    pd.DataFrame({"Image": train[:5], "Id": [f"w_{i}" for i in range(5)], "folder": "train"}) \
        .to_csv(work / "format" / "train.csv", index=False)
    pd.DataFrame({"Image": ["q1.jpg", "q2.jpg"], "Id": ["new_whale w_0 w_1 w_2 w_3", "w_4 w_3 w_2 w_1 new_whale"],
                  "source": "model", "top_score": [0.1, 0.9]}).to_csv(work / "predict" / "predictions.csv", index=False)

    def sheet(sample, seed=0):
        out = tmp_path / f"r{sample}"
        index = report.write_report(work, data, out=out, sample=sample, seed=seed)
        return index.read_text(), out

    html, out = sheet(2)
    sheets = sorted(p.name for p in out.glob("boxes_full-image*.png"))
    assert sheets == ["boxes_full-image.png", "boxes_full-image_2.png", "boxes_full-image_3.png"]  # 8 + 8 + 3
    assert "full-image fallbacks (all 19), sheet 3 of 3" in html
    heights = [Image.open(out / s).size[1] for s in sheets]
    assert heights[2] < heights[0] == heights[1]  # the last sheet holds one row of 3, the others two of 4
    assert all(pixels(out / s).std() > 30 for s in sheets)

    # one query at a time: the sheet's width counts the tiles beside it
    preds = pd.read_csv(work / "predict" / "predictions.csv")
    widths = []
    for i in range(2):
        preds.iloc[[i]].to_csv(work / "predict" / "predictions.csv", index=False)
        html, out = sheet(1)
        assert "Test predictions: 1 of 1 photos" in html
        widths.append(Image.open(out / "predictions.png").size[0])
    assert widths[0] - widths[1] == report_sheets.TILE[0] + 8  # new_whale first: one more tile, three ids' photos still


# ---------------------------------------------------------------- charts: matplotlib, the metric early stopping followed

def test_arcface_curves_show_the_monitored_validation_metric_and_the_kept_epoch(tmp_path):
    """A retrieval head (arcface) stops on val_map5: its curves show val_map5, mark the epoch training kept
    (the manifest's, not the best training accuracy), and the PNG is a real matplotlib image."""
    work = tmp_path / "work"
    (work / "train").mkdir(parents=True)
    hist = pd.DataFrame({"epoch": range(6), "loss": [9.0, 7.0, 5.5, 4.0, 3.2, 2.5],
                         "accuracy": [0.1, 0.3, 0.5, 0.7, 0.8, 0.95],          # best at the last epoch
                         "val_map5": [0.30, 0.45, 0.62, 0.58, 0.55, 0.50],     # best at epoch 3 (1-based)
                         "val_top1": [0.20, 0.35, 0.50, 0.52, 0.49, 0.40]})
    hist.to_csv(work / "train" / "history.csv", index=False)
    (work / "train" / "manifest.json").write_text(json.dumps(
        {"counts": {"epochs": 6, "best_epoch": 3, "best_val_map5": 0.62}, "artifacts": {}}))
    index = report.write_report(work, None, out=tmp_path / "r")
    html = index.read_text()
    assert "kept epoch 3: best val_map5" in html and "by accuracy" not in html
    png = index.parent / "training_curves.png"
    a = pixels(png)
    assert b"matplotlib" in png.read_bytes()  # the Software tag matplotlib writes
    assert count(a, drawing.ORANGE, tol=25) > 400, "no monitored validation curve"
    assert count(a, drawing.RED, tol=40) > 40, "the kept epoch's dot is missing"
    assert _kept_epoch_of(work, hist) == (3, "val_map5")
    # without a manifest (a run still going), the rule early stopping uses picks the same epoch
    (work / "train" / "manifest.json").unlink()
    assert _kept_epoch_of(work, hist) == (3, "val_map5")


def _kept_epoch_of(work, hist):
    return report._kept_epoch(work, hist)


def test_threshold_sweep_png_is_drawn_by_matplotlib(tmp_path):
    from whaleid.report import charts
    sweep = pd.DataFrame({"threshold": np.linspace(0, 1, 21), "map5": np.sin(np.linspace(0, 3, 21)) * 0.4 + 0.3})
    fig = charts.threshold_sweep(sweep, threshold=0.5, map5=None, baseline=0.276, best=(0.45, 0.69), tuned=0.45)
    fig.savefig(tmp_path / "t.png")
    a = pixels(tmp_path / "t.png")
    assert count(a, drawing.BLUE, tol=25) > 400 and count(a, drawing.RED, tol=25) > 100
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(l.startswith("configured threshold 0.500") for l in labels) and "tuned threshold 0.45 (predict uses it)" in labels
