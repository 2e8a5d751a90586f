"""format: every photo becomes 3-channel RGB, and new_whale leaves the classifier's table.

Inputs:    dedup/images.csv (every usable photo: folder, size, PIL mode), dedup/train.csv (CONV_TRAIN)
Artifacts: train.csv      the classifier's table: Image, Id, folder, width, height, mode, conversion
           new_whale.csv  the new_whale rows, kept for open-set evaluation
           test.csv       the test photos in sample_submission order

The conversion (greyscale replicated, palette and alpha flattened on white, CMYK, 16-bit scaled) is
decided here from each file's mode and applied by images.to_rgb wherever a photo is decoded, so no
stage writes a second full-size copy of 30k photos just to change its channel count.
"""
from __future__ import annotations


from whaleid.data import images
from whaleid.pipeline.stage import Run
from whaleid.data.tables import NEW_WHALE

COLUMNS = ["Image", "Id", "folder", "width", "height", "mode", "conversion"]


def run(run: Run) -> dict:
    photos = run.read_csv("dedup", "images.csv")
    photos["conversion"] = photos["mode"].map(images.conversion)
    train = run.read_csv("dedup", "train.csv").merge(photos[photos.folder == "train"], on="Image", how="inner")
    known = train[train.Id != NEW_WHALE][COLUMNS]
    new = train[train.Id == NEW_WHALE][COLUMNS]
    test = photos[photos.folder == "test"].assign(Id="")[COLUMNS]
    run.write_csv("train.csv", known)
    run.write_csv("new_whale.csv", new)
    run.write_csv("test.csv", test)
    not_rgb = photos[photos.conversion != "rgb"].conversion.value_counts().to_dict()
    if not_rgb:
        run.echo("converted to RGB on decode: " + ", ".join(f"{n} {c}" for c, n in not_rgb.items()))
    return {"train": len(known), "ids": int(known.Id.nunique()), "new_whale": len(new), "test": len(test),
            **{f"mode {c}": int(n) for c, n in not_rgb.items()}}
