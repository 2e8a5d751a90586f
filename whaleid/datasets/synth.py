"""A synthetic data set in the exact Kaggle layout, with its ground truth.

    train.csv, sample_submission.csv, train/*.jpg, test/*.jpg     as Kaggle ships them
    solution.csv     Image,Id: the true id of each test photo (new_whale for individuals not in train)
    boxes.csv        Image,x0,y0,x1,y1: the true tail box of every photo (x1, y1 exclusive)
    duplicates.csv   group,Image,split,kind: every planted duplicate group (original/exact/resized/recompressed)

Each individual is a fluke with its own trailing-edge outline (scallops and notch) and pigment
(large white patches at fixed places on the underside), rendered once in fluke coordinates; each
photo warps it onto a sea-and-sky background with its own position, scale, rotation, aspect,
lighting, blur, noise, JPEG quality and image size (1050x700, wide panoramas, small crops), ~15%
saved greyscale. Every photo's randomness comes from (seed, its index): the files are the same for
any number of workers.
"""
from __future__ import annotations

import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

CANVAS_W, CANVAS_H = 512, 320
RIM = 10  # canvas pixels of dark outline around the pigment
SIZES = [((1050, 700), 30), ((1050, 450), 20), ((1050, 600), 12), ((1050, 525), 8), ((800, 500), 8),
         ((700, 500), 6), ((3621, 561), 4), ((1050, 350), 6), ((365, 102), 2), ((600, 400), 4)]


def _rng(seed: int, *key) -> np.random.Generator:
    return np.random.default_rng([seed, *[int(k) for k in key]])


# ---------------------------------------------------------------- an individual, in fluke coordinates

def identity(seed: int, ident: int) -> dict:
    r = _rng(seed, 1, ident)
    n_waves = r.integers(3, 7)
    return {
        "sweep": r.uniform(20, 75),            # how far the tips rise
        "power": r.uniform(1.3, 2.6),           # the trailing edge's curve
        "thick": r.uniform(80, 115),             # chord at the root
        "notch": r.uniform(10, 35),
        "waves": [(r.uniform(2, 9), r.uniform(3, 22), r.uniform(0, 2 * np.pi)) for _ in range(n_waves)],
        "scallops": r.uniform(0, 1, size=r.integers(2, 8)),  # positions (0..1) of deep bites
        "scallop_depth": r.uniform(8, 22),
        "patches": _patches(r),
        "base": r.uniform(15, 40),
    }


def _patches(r: np.random.Generator) -> list[tuple]:
    """White patches (u across the span -1..1, v down the chord 0..1, rx, ry, angle): the span is cut
    into 4-6 slots and each holds a patch or not (at least two), so individuals differ in where the
    white is, as real flukes do, and a patch is large enough to see in a 96 px crop."""
    slots = int(r.integers(4, 7))
    edges = np.linspace(-0.85, 0.85, slots + 1)
    used = r.random(slots) < 0.6
    used[r.choice(slots, size=2, replace=False)] = True
    half = 0.85 / slots
    return [(r.uniform(edges[k] + 0.3 * half, edges[k + 1] - 0.3 * half), r.uniform(0.3, 0.7),
             r.uniform(0.55, 0.95) * half, r.uniform(0.25, 0.5), r.uniform(0, 180))
            for k in range(slots) if used[k]]


def render_fluke(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """(grey texture, mask) of the fluke on a CANVAS_W x CANVAS_H canvas, peduncle at the bottom."""
    t = np.linspace(-1, 1, 400)
    x = CANVAS_W / 2 + t * (CANVAS_W / 2 - 12)
    top = 150 - p["sweep"] * np.abs(t) ** p["power"] + p["notch"] * np.exp(-(t / 0.04) ** 2)
    for amp, freq, phase in p["waves"]:
        top += amp * np.sin(freq * np.pi * t + phase) * (0.3 + 0.7 * np.abs(t))
    for pos in p["scallops"]:
        top += p["scallop_depth"] * np.exp(-((t - (2 * pos - 1)) / 0.03) ** 2)
    bottom = top + p["thick"] * (1 - np.abs(t) ** 2.5) + 8
    ped = np.abs(t) < 0.09
    poly_top = np.stack([x, top], 1)
    below = np.where(ped, CANVAS_H - 1, bottom)
    poly = np.concatenate([poly_top, np.stack([x, below], 1)[::-1]]).astype(np.int32)
    mask = np.zeros((CANVAS_H, CANVAS_W), np.uint8)
    cv2.fillPoly(mask, [poly], 255)
    stem = np.array([[CANVAS_W / 2 - 0.12 * CANVAS_W, bottom[200]], [CANVAS_W / 2 + 0.12 * CANVAS_W, bottom[200]],
                     [CANVAS_W / 2 + 0.06 * CANVAS_W, CANVAS_H - 1], [CANVAS_W / 2 - 0.06 * CANVAS_W, CANVAS_H - 1]], np.int32)
    cv2.fillPoly(mask, [stem], 255)
    tex = np.full((CANVAS_H, CANVAS_W), p["base"], np.float32)
    pig = np.zeros_like(tex)
    for (u, v, rx, ry, ang) in p["patches"]:
        cx = CANVAS_W / 2 + u * (CANVAS_W / 2 - 12)
        i = int(np.clip(200 + u * 200, 0, 399))
        cy = top[i] + v * (bottom[i] - top[i])
        cv2.ellipse(pig, (int(cx), int(cy)), (int(rx * CANVAS_W / 2), int(ry * p["thick"])), ang, 0, 360, 1.0, -1)
    # white patches inside a dark outline: the trailing edge and tips stay dark (what a dark-body
    # detector outlines); the pigment is clipped to the fluke shrunk by RIM canvas pixels
    inner = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * RIM + 1, 2 * RIM + 1)))
    pig = cv2.GaussianBlur(pig * (inner > 0), (0, 0), 2.0)
    tex = tex + pig * (225 - p["base"])
    tex[:, int(CANVAS_W / 2) - 2:int(CANVAS_W / 2) + 2] *= 0.8  # the midline ridge
    return tex, mask


# ---------------------------------------------------------------- a photo

def _background(r: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Sky, horizon and waves, with light that varies across the photo in its own way (distinct
    photos get distinct perceptual hashes). Drawn at a quarter of the size and enlarged: it is
    smooth, and this is most of a photo's rendering time."""
    sw, sh = max(8, w // 4), max(8, h // 4)
    horizon = r.uniform(0.05, 0.35)
    sky = np.array([r.uniform(170, 235), r.uniform(190, 240), r.uniform(215, 255)], np.float32)
    sea = np.array([r.uniform(60, 110), r.uniform(110, 150), r.uniform(150, 200)], np.float32)
    ys, xs = np.mgrid[0:sh, 0:sw].astype(np.float32)
    ys /= sh
    xs /= sw
    above = (ys < horizon)[..., None]
    img = np.where(above, sky * (0.9 + 0.1 * ys / horizon)[..., None],
                   sea * (0.9 + 0.2 * (ys - horizon))[..., None])
    px, py = xs * w, ys * h
    waves = np.sin(px / r.uniform(8, 30) + np.sin(py / r.uniform(3, 9)) * 2) * np.sin(py / r.uniform(2, 6))
    img += (waves * r.uniform(6, 20) * ~above[..., 0])[..., None]
    fx, fy, phase = r.uniform(-1.5, 1.5), r.uniform(-1.5, 1.5), r.uniform(0, 2 * np.pi)
    light = 1 + r.uniform(0.04, 0.1) * np.cos(2 * np.pi * (fx * xs + fy * ys) + phase)
    img = (img * light[..., None]).astype(np.float32)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)


def render_photo(job) -> tuple[str, tuple[int, int, int, int]]:
    """Worker: draw photo `index` of individual `params` into `path` atomically; return its box."""
    path, seed, index, params, size, grey, quality = job
    r = _rng(seed, 2, index)
    w, h = size
    img = _background(r, w, h)
    tex, mask = render_fluke(params)
    # the fluke's width: at most what the photo's height allows, and at least enough for its box to
    # cover ~15% of the photo (a wide panorama gets a large fluke, not a speck in the sea)
    most = 0.95 * min(w, h * CANVAS_W / CANVAS_H)
    span = r.uniform(min(most, max(0.6 * most, np.sqrt(0.35 * w * h))), most)
    s = span / CANVAS_W
    aspect = r.uniform(0.8, 1.15)
    ang = np.deg2rad(r.uniform(-10, 10))
    cx = r.uniform(0.5 * span + 2, w - 0.5 * span - 2) if w > span + 4 else w / 2
    cy = r.uniform(0.35, 0.75) * h
    a = np.array([[s * np.cos(ang), -s * aspect * np.sin(ang)], [s * np.sin(ang), s * aspect * np.cos(ang)]])
    offset = np.array([cx, cy]) - a @ np.array([CANVAS_W / 2, CANVAS_H * 0.45])
    m = np.hstack([a, offset[:, None]]).astype(np.float32)
    warped = cv2.warpAffine(tex, m, (w, h), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(mask.astype(np.float32) / 255, m, (w, h), flags=cv2.INTER_LINEAR)
    # the peduncle sinks into the water: fade the lowest part of the body
    light = r.uniform(0.8, 1.15)
    tint = np.array([r.uniform(0.9, 1.05), 1.0, r.uniform(0.95, 1.1)])
    fluke = cv2.merge([warped * np.float32(t * light) for t in tint])
    img = cv2.blendLinear(img, fluke, 1 - alpha, alpha)  # OpenCV, not numpy: most of the time is here
    contrast, brightness = r.uniform(0.8, 1.2), r.uniform(-20, 20)
    noise = r.standard_normal((max(8, h // 2), max(8, w // 2), 3), dtype=np.float32)
    noise = cv2.resize(noise, (w, h), interpolation=cv2.INTER_NEAREST)
    img = cv2.addWeighted(img, contrast, noise, r.uniform(1, 6), 128 * (1 - contrast) + brightness)
    sigma = r.uniform(0, 1.5) * max(w, h) / 1050
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    out = cv2.convertScaleAbs(cv2.max(img, 0.0))  # saturating cast to uint8
    x, y, bw, bh = cv2.boundingRect((alpha > 0.5).astype(np.uint8))
    box = (x, y, x + bw, y + bh) if bw and bh else (0, 0, w, h)
    pil = Image.fromarray(out)
    if grey:
        pil = pil.convert("L")
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    pil.save(tmp, "JPEG", quality=int(quality))
    os.replace(tmp, path)
    return str(path), box


# ---------------------------------------------------------------- the data set

def photo_counts(r: np.random.Generator, ids: int, photos: str, real_train_csv: Path | None) -> np.ndarray:
    if photos.startswith("uniform:"):
        return np.full(ids, int(photos.split(":", 1)[1]))
    if photos == "real":
        if real_train_csv is None:
            raise ValueError("--photos real needs --real-train-csv (a real train.csv, e.g. "
                             "../shared/data/whales/kaggle2019_train.csv)")
        real = pd.read_csv(real_train_csv)
        counts = real[real.Id != "new_whale"].Id.value_counts().to_numpy()
        return r.choice(counts, size=ids, replace=True)
    if photos == "longtail":
        return np.minimum(1 + r.zipf(1.9, size=ids) - 1 + (r.random(ids) < 0.6), 40).astype(int)
    raise ValueError(f"--photos {photos!r}: expected longtail, real or uniform:K")


def _names(r: np.random.Generator, n: int) -> list[str]:
    names, seen = [], set()
    while len(names) < n:
        v = f"{int(r.integers(0, 16 ** 9)):09x}.jpg"
        if v not in seen:
            seen.add(v)
            names.append(v)
    return names


def generate(out: Path, ids: int = 50, seed: int = 0, workers: int = 1, *, photos: str = "longtail",
             real_train_csv: Path | None = None, new_whale_train: float = 0.38, new_whale_test: float = 0.27,
             test_fraction: float = 0.25, grey_fraction: float = 0.15, duplicate_fraction: float = 0.03,
             size_scale: float = 1.0, progress: bool = True) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: choose a new folder (synth never overwrites data)")
    r = _rng(seed, 0)
    counts = photo_counts(r, ids, photos, real_train_csv)
    id_names = [f"w_{v[:7]}" for v in _names(r, ids)]
    n_known = int(counts.sum())
    n_new_train = int(round(new_whale_train / (1 - new_whale_train) * n_known))
    test_ids = r.choice(ids, size=max(1, int(round(test_fraction * n_known))), p=counts / counts.sum())
    n_unseen = int(round(new_whale_test / (1 - new_whale_test) * len(test_ids)))
    # individuals: 0..ids-1 known, then one per new_whale train photo, then one per unseen test photo
    plan = [(ident, "train", id_names[ident]) for ident in range(ids) for _ in range(counts[ident])]
    plan += [(ids + k, "train", "new_whale") for k in range(n_new_train)]
    plan += [(int(i), "test", id_names[int(i)]) for i in test_ids]
    plan += [(ids + n_new_train + k, "test", "new_whale") for k in range(n_unseen)]
    order = r.permutation(len(plan))
    plan = [plan[i] for i in order]
    names = _names(r, len(plan) + int(len(plan) * duplicate_fraction) + 8)
    sizes, weights = zip(*SIZES)
    weights = np.array(weights, float) / sum(weights)
    (out / "train").mkdir(parents=True)
    (out / "test").mkdir()
    params_cache: dict[int, dict] = {}
    jobs, rows = [], []
    for k, (ident, split, label) in enumerate(plan):
        pr = _rng(seed, 3, k)
        w, h = sizes[pr.choice(len(sizes), p=weights)]
        size = (max(32, int(w * size_scale)), max(24, int(h * size_scale)))
        params = params_cache.setdefault(ident, identity(seed, ident))
        jobs.append((str(out / split / names[k]), seed, k, params, size, pr.random() < grey_fraction,
                     int(pr.integers(60, 96))))
        rows.append((names[k], split, label))
    boxes = {}
    chunk = max(1, len(jobs) // (workers * 8) or 1)
    bar = tqdm(total=len(jobs), desc="synth photos", disable=not progress, unit="img")
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for path, box in pool.map(render_photo, jobs, chunksize=chunk):
                boxes[Path(path).name] = box
                bar.update()
    else:
        for job in jobs:
            path, box = render_photo(job)
            boxes[Path(path).name] = box
            bar.update()
    bar.close()
    table = pd.DataFrame(rows, columns=["Image", "split", "Id"])
    dups = _plant_duplicates(out, r, table, boxes, names[len(plan):], duplicate_fraction)
    table = pd.concat([table, dups[dups.kind != "original"][["Image", "split", "Id"]]], ignore_index=True)
    train = table[table.split == "train"][["Image", "Id"]]
    test = table[table.split == "test"]
    train_ids = set(train.Id) - {"new_whale"}
    solution = pd.DataFrame({"Image": test.Image, "Id": [i if i in train_ids else "new_whale" for i in test.Id]})
    train.to_csv(out / "train.csv", index=False)
    pd.DataFrame({"Image": test.Image, "Id": "new_whale w_23a388d w_9b5109b w_9c506f6 w_0369a5c"}).to_csv(
        out / "sample_submission.csv", index=False)
    solution.to_csv(out / "solution.csv", index=False)
    pd.DataFrame([(n, *b) for n, b in boxes.items()], columns=["Image", "x0", "y0", "x1", "y1"]).sort_values(
        "Image").to_csv(out / "boxes.csv", index=False)
    dups[["group", "Image", "split", "kind"]].to_csv(out / "duplicates.csv", index=False)
    grey = sum(1 for j in jobs if j[5])
    return {"train": len(train), "test": len(test), "ids": ids, "new_whale_train": int((train.Id == "new_whale").sum()),
            "new_whale_test": int((solution.Id == "new_whale").sum()), "grey": grey,
            "duplicate_groups": int(dups.group.nunique()) if len(dups) else 0}


def _plant_duplicates(out: Path, r, table: pd.DataFrame, boxes: dict, spare: list[str], fraction: float) -> pd.DataFrame:
    """Copies of some train photos: exact bytes and resized inside train, recompressed into test."""
    train = table[table.split == "train"].reset_index(drop=True)
    n = min(len(spare), int(round(fraction * len(table))))
    if n == 0:
        return pd.DataFrame(columns=["group", "Image", "split", "kind", "Id"])
    picks = r.choice(len(train), size=min(n, len(train)), replace=False)
    rows = []
    for g, (i, name) in enumerate(zip(picks, spare)):
        src = train.iloc[int(i)]
        kind = ("exact", "resized", "recompressed")[g % 3]
        split = "test" if kind == "recompressed" else "train"
        dst = out / split / name
        with Image.open(out / "train" / src.Image) as im:
            if kind == "exact":
                shutil.copyfile(out / "train" / src.Image, dst)
                box = boxes[src.Image]
            elif kind == "resized":
                f = r.uniform(0.5, 0.9)
                nw, nh = max(8, int(im.width * f)), max(8, int(im.height * f))
                im.resize((nw, nh), Image.Resampling.LANCZOS).save(dst, "JPEG", quality=90)
                x0, y0, x1, y1 = boxes[src.Image]
                sx, sy = nw / im.width, nh / im.height
                box = (int(x0 * sx), int(y0 * sy), max(int(x0 * sx) + 1, min(nw, int(round(x1 * sx)))),
                       max(int(y0 * sy) + 1, min(nh, int(round(y1 * sy)))))
            else:
                im.save(dst, "JPEG", quality=int(r.integers(55, 75)))
                box = boxes[src.Image]
        boxes[name] = box
        rows.append((g, src.Image, "train", "original", src.Id))
        rows.append((g, name, split, kind, src.Id))
    return pd.DataFrame(rows, columns=["group", "Image", "split", "kind", "Id"])
