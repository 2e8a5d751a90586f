"""The predictions sheet's view of re-ranking (similarity/local.py): a test photo and its candidate id's
best-matching gallery photo side by side, the RANSAC inliers joined by lines, so a user sees which
pattern points made the match (and can tell a fluke's notch from a matched wave).

Read from the work folder as predict left it: its recorded rerank settings, the keypoint stages'
features, boxes and format tables, and the data folder's encounters (never a photo of the query's
own); the photos are cropped exactly as the keypoint stages cropped them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from whaleid.data.tables import read_encounters
from whaleid.preprocess.keypoints import Store, crop_photo
from whaleid.report.drawing import pair_image
from whaleid.similarity.local import reranker


class Pairs:
    """draw(test photo, id) -> (image, caption) or None, for a work folder whose predict re-ranked."""

    def __init__(self, work: Path, data: Path, settings: dict, margin: float, side: int):
        self.data, self.margin, self.side = Path(data), margin, side
        store = Store(work / "keypoints" / "keypoints.npz", work / "test_keypoints" / "keypoints.npz")
        train = pd.read_csv(work / "format" / "train.csv", dtype=str, keep_default_na=False)
        self.reranker = reranker(settings.get, store, train, read_encounters(data))  # as predict built it
        self.boxes = {}
        for name in ("BB_TRAIN.csv", "BB_TEST.csv"):
            df = pd.read_csv(work / "boxes" / name, dtype={"Image": str})
            self.boxes.update({r.Image: (int(r.x0), int(r.y0), int(r.x1), int(r.y1)) for r in df.itertuples()})

    def draw(self, query: str, ident: str):
        n, photo, mirrored, qxy, gxy = self.reranker.best(query, ident)
        if photo is None or query not in self.boxes or photo not in self.boxes:
            return None
        try:
            q = crop_photo(self.data / "test" / query, self.boxes[query], self.margin, self.side)
            g = crop_photo(self.data / "train" / photo, self.boxes[photo], self.margin, self.side)
        except Exception:  # noqa: BLE001 - a photo that no longer decodes: the sheet shows the plain tile
            return None
        return pair_image(q[:, ::-1] if mirrored else q, g, qxy, gxy), \
            f"{n} inliers with {photo}" + (" (query mirrored)" if mirrored else "")


def for_work(work: Path, data: Path | None) -> Pairs | None:
    """Pairs when predict re-ranked by local features and its inputs are still there, else None."""
    try:
        settings = json.loads((Path(work) / "predict" / "manifest.json").read_text())["settings"]
        if data is None or settings.get("rerank.method", "none") == "none":
            return None
        kp = json.loads((Path(work) / "keypoints" / "manifest.json").read_text())["settings"]
        return Pairs(Path(work), Path(data), settings, kp["augment.margin"], kp["keypoints.side"])
    except (OSError, ValueError, KeyError):
        return None
