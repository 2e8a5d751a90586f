"""The bad-input sweep (issue 7): one data folder holding every kind of bad or odd input, walked through
the whole pipeline once (preprocess -> train, tiny -> predict). Each input gets its documented behaviour:
a photo that cannot be used is skipped and listed with its reason in dedup/skipped.csv; an odd but valid
photo (CMYK, 16-bit, RGBA, a PNG named .jpg, 1x1) is converted and used; a CSV problem stops the run with
one line naming the file, the row and what to do. The rest of the photos still give a valid submission,
and nothing is written into the data folder.

Single kinds are also tested on their own in test_images_tables.py, test_cli_preprocess.py and
test_predict_e2e.py; this is the one run with all of them at once, in both train/ and test/."""
import io
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from whaleid.metrics import submission
from whaleid.pipeline.stage import fingerprint

from conftest import ROOT, cli as whaleid

TINY = ["--config", str(ROOT / "configs/scratch.toml"), "--set", "model.backbone=tiny", "--set", "run.image_size=32",
        "--set", "train.epochs=1", "--quiet", "--workers", "2"]

# photo kinds: file name -> (how to write it, the reason it is skipped, or None when it must be used)
UNUSABLE = {"zero.jpg": "empty", "trunc.jpg": "cannot decode", "text.jpg": "not an image",
            "bomb.jpg": "pixel limit|decompression bomb"}
ODD = {"cmyk.jpg": "cmyk", "png_named.jpg": "rgb", "deep16.png": "16-bit", "rgba.png": "rgba-on-white",
       "one_pixel.jpg": "rgb"}


def header_bomb() -> bytes:
    """A 1 KB JPEG whose header claims 20000x20000 pixels (4e8: a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 90, 90)).save(buf, "JPEG")
    b = bytearray(buf.getvalue())
    sof = b.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    b[sof + 5:sof + 9] = (20000).to_bytes(2, "big") * 2
    return bytes(b)


def write_kinds(folder, prefix: str, rng) -> list[str]:
    """Every kind of photo into `folder`, names prefixed; returns the names. Each photo has its own
    pixels (identical ones would be grouped as duplicates by dedup)."""
    def fresh():
        photo = rng.integers(0, 255, (120, 180, 3), dtype=np.uint8)
        photo[40:80, 40:140] = 10  # a dark "tail", so boxes has something to find
        return photo

    photo = fresh()
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=90)
    files = {
        "zero.jpg": b"",
        "trunc.jpg": buf.getvalue()[: len(buf.getvalue()) // 2],
        "text.jpg": b"Image,Id\nthis is a text file, not a photo\n",
        "bomb.jpg": header_bomb(),
    }
    for name, content in files.items():
        (folder / f"{prefix}{name}").write_bytes(content)
    Image.fromarray(fresh()).convert("CMYK").save(folder / f"{prefix}cmyk.jpg", "JPEG")
    Image.fromarray(fresh()).save(folder / f"{prefix}png_named.jpg", "PNG")
    Image.fromarray(fresh()[..., 0].astype(np.uint16) * 257).save(folder / f"{prefix}deep16.png")
    photo = fresh()
    rgba = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
    rgba[:20, :, 3] = 0  # a transparent band
    Image.fromarray(rgba, "RGBA").save(folder / f"{prefix}rgba.png")
    Image.new("RGB", (1, 1), (40, 50, 60)).save(folder / f"{prefix}one_pixel.jpg", "JPEG")
    return [f"{prefix}{n}" for n in list(UNUSABLE) + list(ODD)]


def state(folder):
    return {str(p.relative_to(folder)): fingerprint(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def bad_data(tiny_set, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_set, data)
    rng = np.random.default_rng(7)
    train = pd.read_csv(data / "train.csv")
    known = train[train.Id != "new_whale"].Id.value_counts().index[0]
    names = write_kinds(data / "train", "tr_", rng)
    extra = pd.DataFrame({"Image": names + ["tr_missing.jpg"], "Id": known})
    repeat = train.iloc[[0, 1]]  # two exact repeated rows
    pd.concat([train, extra, repeat]).to_csv(data / "train.csv", index=False)
    sample = pd.read_csv(data / "sample_submission.csv")
    test_names = write_kinds(data / "test", "te_", rng)
    pd.concat([sample, pd.DataFrame({"Image": test_names + ["te_absent.jpg"], "Id": sample.Id.iloc[0]})]) \
        .to_csv(data / "sample_submission.csv", index=False)
    return data


def test_every_bad_input_is_handled_and_the_pipeline_still_submits(bad_data, tmp_path):
    before = state(bad_data)
    work = tmp_path / "work"
    code, out = whaleid("preprocess", "--data", bad_data, "--work", work, *TINY)
    assert code == 0, out
    assert "2 repeated rows dropped (rows [" in out  # the exact repeats of train.csv, with their row numbers
    assert "skipped (see" in out and str(work / "dedup" / "skipped.csv") in out

    skipped = pd.read_csv(work / "dedup/skipped.csv").set_index("Image").reason
    for prefix in ("tr_", "te_"):
        for name, reason in UNUSABLE.items():
            assert f"{prefix}{name}" in skipped.index, (name, skipped.to_dict())
            assert pd.Series([skipped[f"{prefix}{name}"]]).str.contains(reason).all(), (name, skipped[f"{prefix}{name}"])
        for name in ODD:
            assert f"{prefix}{name}" not in skipped.index, (name, skipped.get(f"{prefix}{name}"))
    assert "train/tr_missing.jpg does not exist" in skipped["tr_missing.jpg"]
    assert "test/te_absent.jpg does not exist" in skipped["te_absent.jpg"]
    assert len(skipped) == 2 * len(UNUSABLE) + 2  # nothing else was lost

    # the odd photos are read as 3-channel RGB and trained on
    fmt = pd.concat([pd.read_csv(work / "format/train.csv"), pd.read_csv(work / "format/test.csv")]).set_index("Image")
    for prefix in ("tr_", "te_"):
        for name, conversion in ODD.items():
            assert fmt.loc[f"{prefix}{name}", "conversion"] == conversion, name
    files = pd.read_csv(work / "augment/TRAINING_FILE_FINAL.csv")
    for name in ODD:
        made = files[files.Image == f"tr_{name}"].File
        assert len(made) == 4, name  # the original and 3 variants
        with Image.open(work / "augment/images" / made.iloc[0]) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
    rgba = np.asarray(Image.open(work / "augment/images" / files[files.Image == "tr_rgba.png"].File.iloc[0]))
    assert rgba.mean() > 20  # transparency became white, not black

    code, out = whaleid("train", "--work", work, *TINY)
    assert code == 0, out
    code, out = whaleid("predict", "--work", work, *TINY)
    assert code == 0, out
    sub = pd.read_csv(work / "submission.csv")
    order = list(pd.read_csv(bad_data / "sample_submission.csv").Image)
    submission.validate(sub, order)  # every listed image, in order, 5 distinct labels
    preds = pd.read_csv(work / "predict/predictions.csv").set_index("Image")
    for name in list(UNUSABLE) + ["absent.jpg"]:
        assert preds.loc[f"te_{name}", "source"] == "fallback", name
    for name in ODD:  # read and used: by the model, or as a known answer when dedup matched a train photo
        assert preds.loc[f"te_{name}", "source"] in ("model", "known"), name
    # (the two 1x1 photos have equal perceptual hashes, as any two one-colour photos do, so dedup groups them)
    assert state(bad_data) == before  # nothing written into the data folder


@pytest.mark.parametrize("table, content, message", [
    ("train.csv", "Image,Label\na.jpg,w_1\n", "train.csv: missing column 'Id' (header is Image,Label; expected Image,Id)"),
    ("train.csv", "Image,Id\na.jpg,w_1\nb.jpg,w_2\na.jpg,w_3\n", "train.csv: rows [2, 4]: image a.jpg is listed with different ids"),
    ("train.csv", "Image,Id\na.jpg,w_1\nb.jpg,\n", "train.csv: row 3: empty value in column 'Id'"),
    ("train.csv", "Image,Id\n../secret.jpg,w_1\n", "train.csv: row 2: column 'Image' must be a file name"),
    ("sample_submission.csv", "Name,Id\nx.jpg,new_whale\n", "sample_submission.csv: missing column 'Image'"),
])
def test_csv_problems_stop_with_one_line_naming_file_and_row(tiny_set, tmp_path, table, content, message):
    data = tmp_path / "data"
    shutil.copytree(tiny_set, data)
    (data / table).write_text(content)
    code, out = whaleid("preprocess", "--data", data, "--work", tmp_path / "work", *TINY)
    assert code == 1 and message in out, out
    error = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and str(data / table) in error[0] and "Traceback" not in out
    assert not (tmp_path / "work" / "dedup" / "manifest.json").exists()
