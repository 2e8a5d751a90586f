"""report: a look at a run's artifacts, as PNG contact sheets and plots plus an index.html that shows them.

    write_report(work, data) -> WORK/report/index.html

Sections (each reads its stage's CSV/JSON artifacts directly; a stage that has not run is one line
of the page, never an error; nothing is unpickled):

  1. boxes        boxes/BB_TRAIN.csv, BB_TEST.csv   -> boxes_<method>.png: a sample of train and test
                  photos per box method with the box drawn, and every full-image fallback (48 a sheet,
                  up to 960)
  2. duplicates   dedup/dedup_report.csv            -> dedup_<page>.png: groups side by side, conflicts first
  3. training     train/history.csv                 -> training_curves.png: loss and accuracy, train vs
                  validation, best epoch marked
  4. threshold    evaluate/threshold_sweep.csv, metrics.json -> threshold_map5.png: MAP@5 against the
                  new_whale threshold, configured / best threshold and the all-new_whale baseline
  5. predictions  predict/predictions.csv, format/train.csv, boxes/ -> predictions.png: query photo
                  (cropped to its box) beside one training photo of each of its top-3 known ids, with
                  new_whale shown at its rank when the submission puts it before them

This module has the page and the two plot sections (3, 4); the photo sheets (1, 2, 5) and the artifact
reading all sections share are in whaleid.report.sheets (the predictions sheet in whaleid.report.predictions), the matplotlib charts in whaleid.report.charts.

Photos are decoded at reduced size (JPEG draft mode) through whaleid.pipeline.images; an unreadable photo is
left out and counted. Drawing uses Pillow only. Every PNG and the page are written atomically; PNGs a
previous report wrote that this one did not (a section gone) are removed, so the folder matches the page.
"""
from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from whaleid.data import images
from whaleid.report import charts
from whaleid.report.predictions import section_predictions
from whaleid.report.sheets import Missing, figure, join_html, note, read_table, section_boxes, section_dedup, unfinished_note
from whaleid.pipeline.stage import MANIFEST, SETTINGS_RECORD, atomic_path

PREFIXES = ("boxes_", "dedup_", "training_curves", "threshold_map5", "predictions")  # the PNGs a report writes


# ---------------------------------------------------------------- what write_report hands the sections

class Writer:
    """Writes the report's files atomically and world-readable, and keeps their names (write_report
    removes the PNGs an earlier report wrote that this one did not)."""

    def __init__(self, out: Path):
        self.out = out
        self.written: list[str] = []

    def png(self, name: str, img: Image.Image) -> str:
        return self._write(name, lambda tmp: img.save(tmp, format="PNG"))

    def figure(self, name: str, fig) -> str:
        """A matplotlib Figure as a PNG."""
        return self._write(name, lambda tmp: fig.savefig(tmp, format="png", dpi=100))

    def text(self, name: str, text: str) -> str:
        return self._write(name, lambda tmp: tmp.write_bytes(text.encode("utf-8")))

    def _write(self, name: str, save) -> str:
        with atomic_path(self.out / name) as tmp:
            save(tmp)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared report from its readers
        self.written.append(name)
        return name


def _load(path: Path, want: int):
    """(RGB image, x scale, y scale) from file pixels to the decoded image, or None if unreadable."""
    try:
        img = images.open_image(path, draft_size=(want, want))
    except images.BadImage:
        return None
    fw, fh = img.info.get("file_size", img.size)
    img = images.to_rgb(img)
    if max(img.size) > 2 * want:
        img.thumbnail((2 * want, 2 * want), Image.Resampling.BILINEAR)
    return img, img.width / fw, img.height / fh


class Photos:
    """Where each photo is (DATA/<folder>/<Image>), from the format/dedup tables when present; loads
    them and keeps the names of those that could not be read."""

    def __init__(self, work: Path, data: Path | None):
        self.data = data
        self.folder: dict[str, str] = {}
        for stage, name in (("dedup", "images.csv"), ("format", "test.csv"), ("format", "new_whale.csv"),
                            ("format", "train.csv")):
            try:
                df = read_table(work, stage, name, ("Image", "folder"))
            except Missing:
                continue
            self.folder.update(zip(df.Image.astype(str), df.folder.astype(str)))
        self.unreadable: set[str] = set()

    def path(self, name: str, default: str) -> Path | None:
        if self.data is None:
            return None
        first = self.folder.get(name, default)
        for folder in (first, "train", "test"):
            p = self.data / folder / name
            if p.is_file():
                return p
        return self.data / first / name

    def load(self, name: str, default: str, want: int):
        p = self.path(name, default)
        loaded = _load(p, want) if p is not None else None
        if loaded is None:
            self.unreadable.add(name)
        return loaded


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _has_values(table: pd.DataFrame, column: str) -> bool:
    return column in table.columns and np.isfinite(table[column].to_numpy(float)).any()


# ---------------------------------------------------------------- sections 3 and 4: plots

def _kept_epoch(work: Path, hist: pd.DataFrame) -> tuple[int, str] | None:
    """(1-based epoch whose weights training kept, the metric early stopping followed): from the train
    manifest (counts best_epoch and best_<monitor>); without one, early stopping's rule on the first
    history column present of val_map5, val_accuracy, accuracy (the last of the maximal values: a tie
    keeps the later epoch), val_loss, loss (the first minimum)."""
    m = _read_json(work / "train" / MANIFEST) or {}
    counts = m.get("counts", {}) if isinstance(m.get("counts"), dict) else {}
    recorded = [k[5:] for k in counts if k.startswith("best_") and k != "best_epoch"]
    monitor = next((c for c in recorded if _has_values(hist, c)), None)
    monitor = monitor or next((c for c in ("val_map5", "val_accuracy", "accuracy", "val_loss", "loss")
                               if _has_values(hist, c)), None)
    if monitor is None:
        return None
    best = counts.get("best_epoch")
    if isinstance(best, int) and 1 <= best <= len(hist):
        return best, monitor
    v = hist[monitor].to_numpy(float)
    maximise = "loss" not in monitor
    v = np.where(np.isfinite(v), v, -np.inf if maximise else np.inf)
    return int(len(v) - 1 - np.argmax(v[::-1]) if maximise else np.argmin(v)) + 1, monitor


def section_training(work: Path, w: Writer) -> str:
    hist = read_table(work, "train", "history.csv", ())
    if not len(hist):
        raise Missing(f"{work / 'train' / 'history.csv'} has no epochs yet.")
    for c in hist.columns:
        hist[c] = pd.to_numeric(hist[c], errors="coerce")
    epochs = (hist["epoch"].to_numpy(float) + 1) if "epoch" in hist.columns else np.arange(1, len(hist) + 1, dtype=float)
    kept = _kept_epoch(work, hist)
    parts = [unfinished_note(work, "train")]
    if not any(_has_values(hist, c) for c in hist.columns if c != "epoch"):
        raise Missing("history.csv has no loss or metric columns.")
    fig = charts.training_curves(epochs, hist, kept and kept[1], kept and kept[0])
    if not any(c.startswith("val_") for c in hist.columns):
        parts.append(note("No validation columns in history.csv (no validation data): training curves only."))
    title = f"Training curves ({len(hist)} epochs" + (f", kept epoch {kept[0]}: best {kept[1]})" if kept else ")")
    name = w.figure("training_curves.png", fig)
    parts.append(figure(name, title))
    return join_html(parts)


def section_threshold(work: Path, w: Writer) -> str:
    sweep = read_table(work, "evaluate", "threshold_sweep.csv", ("threshold", "map5"))
    sweep = sweep.apply(pd.to_numeric, errors="coerce").dropna(subset=["threshold", "map5"]).sort_values("threshold")
    if not len(sweep):
        raise Missing(f"{work / 'evaluate' / 'threshold_sweep.csv'} has no rows.")
    metrics = _read_json(work / "evaluate" / "metrics.json") or {}
    num = lambda k: float(metrics[k]) if isinstance(metrics.get(k), (int, float)) else None
    thr, map5, base = num("threshold"), num("map5"), num("all_new_whale_map5")
    bthr, bmap5 = num("best_threshold"), num("best_map5")
    tuned = (_read_json(work / "tuned_threshold.json") or {}).get("threshold")
    parts = [unfinished_note(work, "evaluate")]
    if not metrics:
        parts.append(note("evaluate/metrics.json is missing: the configured threshold and baseline are not marked."))
    fig = charts.threshold_sweep(sweep, threshold=thr, map5=map5, baseline=base,
                                 best=(bthr, bmap5) if bthr is not None and bmap5 is not None else None,
                                 tuned=float(tuned) if isinstance(tuned, (int, float)) else None)
    name = w.figure("threshold_map5.png", fig)
    keys = [("map5", "MAP@5"), ("top1", "top-1"), ("threshold", "threshold"), ("all_new_whale_map5", "all-new_whale MAP@5"),
            ("best_threshold", "best threshold"), ("best_map5", "best MAP@5"), ("images", "images"),
            ("new_whale_share", "new_whale share")]
    rows = "".join(f"<tr><td>{label}</td><td>{html.escape(str(metrics[k]))}</td></tr>" for k, label in keys if k in metrics)
    if rows:
        parts.append(f"<table>{rows}</table>")
    parts.append(figure(name, "MAP@5 against the new_whale threshold"))
    return join_html(parts)


# ---------------------------------------------------------------- the page

CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1700px;padding:0 1em;color:#222}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em} .note{color:#a33}
figure{margin:.8em 0} img{max-width:100%;border:1px solid #ccc} figcaption{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:2px 10px;text-align:left}
nav a{margin-right:1em} .meta{color:#666}"""


def _data_of(work: Path) -> Path | None:
    rec = _read_json(work / SETTINGS_RECORD) or {}
    return Path(rec["data"]) if rec.get("data") else None


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def write_report(work: Path, data: Path | None = None, out: Path | None = None, sample: int = 12, seed: int = 0) -> Path:
    """Write PNGs and index.html for the artifacts in `work` into `out` (default WORK/report/);
    return the index path. `data` defaults to the data folder recorded in WORK/whaleid.json.
    `sample` photos per box method and test predictions shown, chosen with `seed`."""
    work = Path(work)
    if not work.is_dir():
        raise ValueError(f"work folder {work} not found")
    if sample < 1:
        raise ValueError(f"sample must be at least 1, not {sample}")
    data = Path(data) if data is not None else _data_of(work)
    if data is not None and not data.is_dir():
        data = None  # photos unavailable; sections that need them say so
    out = Path(out) if out is not None else work / "report"
    if data is not None and _inside(out, data):
        raise ValueError(f"the report folder {out} is inside the data folder {data}; whaleid never writes there")
    out.mkdir(parents=True, exist_ok=True)
    w = Writer(out)
    photos = Photos(work, data)
    sections = [
        ("boxes", "1. Tail boxes", lambda: section_boxes(work, photos, w, sample, np.random.default_rng([seed, 1]))),
        ("duplicates", "2. Duplicate groups", lambda: section_dedup(work, photos, w)),
        ("training", "3. Training curves", lambda: section_training(work, w)),
        ("threshold", "4. MAP@5 vs new_whale threshold", lambda: section_threshold(work, w)),
        ("predictions", "5. Test predictions",
         lambda: section_predictions(work, data, photos, w, sample, np.random.default_rng([seed, 5]))),
    ]
    body = []
    for key, title, build in sections:
        try:
            content = build()
        except Missing as e:
            content = note(f"Not shown: {e}")
        body.append(f'<section id="{key}"><h2>{html.escape(title)}</h2>\n{content}\n</section>')
    if photos.unreadable:
        shown = ", ".join(sorted(photos.unreadable)[:20]) + (" ..." if len(photos.unreadable) > 20 else "")
        body.append(note(f"{len(photos.unreadable)} photo(s) could not be read and were left out: {shown}"))
    nav = " ".join(f'<a href="#{k}">{html.escape(t)}</a>' for k, t, _ in sections)
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>whaleid report: '
            f"{html.escape(str(work))}</title><style>{CSS}</style></head><body>\n<h1>whaleid report</h1>\n"
            f'<p class="meta">work {html.escape(str(work.resolve()))} &middot; data '
            f"{html.escape(str(data.resolve()) if data else 'unknown')} &middot; written "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} &middot; sample {sample}, seed {seed}</p>\n"
            f"<nav>{nav}</nav>\n" + "\n".join(body) + "\n</body></html>\n")
    index = out / w.text("index.html", page)
    for old in out.glob("*.png"):  # PNGs of an earlier report whose section is gone now
        if old.name not in w.written and old.name.startswith(PREFIXES):
            old.unlink()
    return index
