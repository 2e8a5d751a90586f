"""background: a copy of every training crop with the scene around the animal neutralised, which the
train stage adds to its training files (train.background), so that the embedding cannot learn an
individual by the place it was photographed in (constant within a sighting, different across them).

Inputs:    split/train_files.csv, augment/images/ (the training files only: validation, the gallery and
           every photo scored are augment's own files, never these)
Artifacts: images/               <file>.jpg: the training file with the background blurred (blur: a
                                 Gaussian of BLUR_SIGMA x the crop's size) or made flat grey (grey: the
                                 crop's mean colour) outside the animal's mask (preprocess/masks.py)
           background_files.csv  File, Image, Id (+ Encounter): one row per copy, as train_files.csv

Runs only when train.background is not none (stages.py: wanted); resumable per chunk of files.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import cv2
import numpy as np

from whaleid.data import images
from whaleid.pipeline.stage import Run
from whaleid.preprocess import masks

BLUR_SIGMA = 0.08   # of the crop's size: the scene's texture gone, its colours left
PREFIX = "bg-"      # copies are named bg-<file>: never the name of one of augment's files


def neutralised(rgb: np.ndarray, mask: np.ndarray, how: str) -> np.ndarray:
    """The crop with the pixels off the animal's mask blurred or flat grey."""
    h, w = rgb.shape[:2]
    on = masks.resized(mask, w, h)[..., None]
    if how == "grey":
        away = np.broadcast_to(rgb.reshape(-1, 3).mean(0).astype(np.uint8), rgb.shape)
    else:
        away = cv2.GaussianBlur(rgb, (0, 0), BLUR_SIGMA * max(h, w))
    return np.where(on, rgb, away).astype(np.uint8)


def _one(job, how: str, out: Path, quality: int):
    """Worker: (file, mask share or None, error)."""
    name, path = job
    try:
        rgb = images.load_rgb(Path(path))
    except images.BadImage as e:
        return name, None, str(e)
    mask, _ = masks.animal_mask(rgb, side=max(rgb.shape[:2]))
    images.save_jpeg(out / (PREFIX + name), neutralised(rgb, mask, how), quality)  # atomic: temp + rename
    return name, float(mask.mean()), None


def run(run: Run) -> dict:
    how = run.setting("train.background")
    train = run.read_csv("split", "train_files.csv")
    folder = run.upstream("augment", "images")
    out = run.path("images")
    out.mkdir(parents=True, exist_ok=True)
    from whaleid.preprocess import subject_box
    subject_box.network()  # the mask's network, once, before the files are shared out (threads)
    work = partial(_one, how=how, out=out, quality=run.setting("augment.jpeg_quality"))
    jobs = [(f, str(folder / f)) for f in train.File]
    shares, done = [], set()
    for name, share, error in run.map_resumable(work, jobs, "neutralise backgrounds", key=lambda j: j[0], chunk=64):
        if error:
            run.skip(name, error)
            continue
        shares.append(share)
        done.add(name)
    copies = train[train.File.isin(done)].assign(File=lambda t: PREFIX + t.File)
    run.write_csv("background_files.csv", copies)
    run.echo(f"{len(copies)} training files copied with the background {'blurred' if how == 'blur' else 'grey'} "
             f"(median mask share {np.median(shares) if shares else 0:.2f})")
    return {"files": len(copies), "median_mask_share": round(float(np.median(shares)), 3) if shares else 0.0}
