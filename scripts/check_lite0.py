"""Is the EfficientNet-Lite0 port faithful? Classify real photos with the converted ImageNet weights.

    .venv/bin/python scripts/check_lite0.py [--data ../shared/data] [--size 224] [--limit N]

Prints, per photo set, the share of top-1 predictions in the expected ImageNet classes:
    lion/{train,val}/<name>/*.png   -> 291 (lion)
    whales/images/*.jpg             -> 147 (grey whale) or 148 (killer whale); the humpback flukes are
                                       classified whole and cropped to their reference box in
                                       whales/labels.csv (x0,y0,x1,y1; blank for two photos, kept whole)
Two resizes: "center" (ImageNet evaluation: centre square crop of 224/256 of the shorter side,
bicubic to size x size) and "squash" (the whole photo bicubic to size x size, aspect not kept).
Then the time per image (batch 1 and batch 32) on this machine. Reads only; writes nothing but the
weights cache ($WHALEID_CACHE, default ~/.cache/whaleid).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from whaleid.backbones import efficientnet_lite as lite  # noqa: E402

LION, GREY_WHALE, KILLER_WHALE = 291, 147, 148
CROP_FRACTION = 224 / 256


def prepare(img: Image.Image, size: int, mode: str) -> np.ndarray:
    img = img.convert("RGB")
    if mode == "center":
        w, h = img.size
        side = max(1, round(min(w, h) * CROP_FRACTION))
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def top1(model, images: list[np.ndarray], batch: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        x = lite.preprocess_input(np.stack(images[i:i + batch]))
        out.append(np.argmax(np.asarray(model.predict_on_batch(x)), axis=1))
    return np.concatenate(out) if out else np.zeros(0, int)


def lion_photos(data: Path, limit: int | None) -> list[Path]:
    paths = sorted((data / "lion").glob("*/*/*.png"))
    if limit and len(paths) > limit:        # an even spread over the sorted list, reproducible
        paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, limit)]
    return paths


def whale_rows(data: Path) -> list[tuple[Path, tuple[float, float, float, float] | None]]:
    rows = []
    with open(data / "whales" / "labels.csv", newline="") as f:
        for r in csv.DictReader(f):
            box = None
            if all(r.get(k, "").strip() for k in ("x0", "y0", "x1", "y1")):
                box = tuple(float(r[k]) for k in ("x0", "y0", "x1", "y1"))
            rows.append((data / "whales" / "images" / r["Image"], box))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--limit", type=int, default=None, help="at most this many lion photos (default all)")
    args = ap.parse_args()
    data = Path(args.data).resolve()
    if not (data / "lion").is_dir() or not (data / "whales").is_dir():
        sys.exit(f"no lion/ and whales/ under {data}")

    t = time.perf_counter()
    model = lite.build(args.size, weights="imagenet", include_top=True)
    print(f"model: {lite.NAME}, ImageNet weights from {lite.PIP_NAME} ({lite.PTH_NAME}), "
          f"cache {lite.cache_dir() / lite.CACHE_FILE}; built in {time.perf_counter() - t:.1f} s")
    print(f"settings: {args.size} px, bicubic, preprocess (x - {lite.INPUT_MEAN:g}) / {lite.INPUT_STD:g}, "
          f"RGB; 'center' = centre crop {CROP_FRACTION:.3f} of the shorter side, 'squash' = whole photo")

    lions = lion_photos(data, args.limit)
    whales = whale_rows(data)
    for mode in ("center", "squash"):
        lion_imgs = [prepare(Image.open(p), args.size, mode) for p in lions]
        pred = top1(model, lion_imgs)
        print(f"[{mode}] lion  {len(lions):3d} photos: {np.mean(pred == LION):6.1%} top-1 in 291 (lion)")
        for crop in (False, True):
            imgs = []
            for p, box in whales:
                img = Image.open(p).convert("RGB")
                if crop and box:
                    x0, y0, x1, y1 = box
                    img = img.crop((round(x0), round(y0), round(x1), round(y1)))
                imgs.append(prepare(img, args.size, mode))
            pred = top1(model, imgs)
            hit = np.isin(pred, (GREY_WHALE, KILLER_WHALE))
            what = "cropped to box" if crop else "whole photo   "
            print(f"[{mode}] whale {len(whales):3d} photos, {what}: {np.mean(hit):6.1%} top-1 in 147/148 "
                  f"(147: {np.sum(pred == GREY_WHALE)}, 148: {np.sum(pred == KILLER_WHALE)})")

    x1 = lite.preprocess_input(np.stack(lion_imgs[:1]))
    x32 = lite.preprocess_input(np.stack((lion_imgs * 32)[:32]))
    for x in (x1, x32):
        model.predict_on_batch(x)                      # warm-up
        reps = 20 if len(x) == 1 else 3
        t = time.perf_counter()
        for _ in range(reps):
            model.predict_on_batch(x)
        per = (time.perf_counter() - t) / reps / len(x)
        print(f"time: {per * 1000:.1f} ms per {args.size}-px image at batch {len(x)} "
              f"({os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    main()
