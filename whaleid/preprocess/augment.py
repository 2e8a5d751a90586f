"""augment (offline): crop each training photo to its tail box, resize it to the model's input, and
write it with three variants beside it (design.md §4):
    0 original   1 left-right flip + Gaussian blur (sigma 0..blur_sigma_max)
    2 random crop of 1..crop_max px from each side, resized back   3 like 2, flipped

Inputs:    format/train.csv, format/new_whale.csv, boxes/BB_TRAIN.csv
Artifacts: images/  <stem>_<variant>.jpg, image_size x image_size, RGB
           TRAINING_FILE_FINAL.csv  File, Image, Id, variant (new_whale photos: variant 0 only,
                                    for open-set evaluation)

crop_max is in pixels of a 224 px image (the original's size) and scales with image_size, so a
96 px CPU run crops the same fraction of the tail. Each photo's randomness comes from (seed, name):
the result is the same for any --workers and when a killed run resumes (finished photos are kept).
"""
from __future__ import annotations

import zlib
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from whaleid.data import images
from whaleid.pipeline.stage import Run

def crop_to_box(rgb: np.ndarray, box, margin: float, size: int) -> np.ndarray:
    """Box plus `margin` (fraction of its size), clipped to the photo, resized to size x size."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = box
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    x0, y0 = max(0, int(round(x0 - mx))), max(0, int(round(y0 - my)))
    x1, y1 = min(w, int(round(x1 + mx))), min(h, int(round(y1 + my)))
    if x1 - x0 < 2 or y1 - y0 < 2:
        x0, y0, x1, y1 = 0, 0, w, h
    crop = rgb[y0:y1, x0:x1]
    interp = cv2.INTER_AREA if (x1 - x0) > size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


def random_crop(img: np.ndarray, rng: np.random.Generator, crop_max: int) -> np.ndarray:
    size = img.shape[0]
    scale = size / 224
    c = [max(1, int(round(rng.integers(1, crop_max + 1) * scale))) for _ in range(4)]
    c = [min(v, size // 4) for v in c]
    return cv2.resize(img[c[1]:size - c[3], c[0]:size - c[2]], (size, size), interpolation=cv2.INTER_CUBIC)


# A variant is (name, the variant it starts from, operations applied in order); the same operations
# serve the offline variants here and predict's test-time versions (design.md §4 and §7).
OFFLINE = (("original", None, ()), ("flip-blur", "original", ("flip", "blur")),
           ("crop", "original", ("crop",)), ("crop-flip", "original", ("crop", "flip")))
TTA = (("original", None, ()), ("flip", "original", ("flip",)),
       ("crop", "original", ("crop",)), ("crop-flip-blur", "crop", ("flip", "blur")))
VARIANTS = tuple(name for name, _, _ in OFFLINE)
FLIP = "_flip"  # train.flip_ids: a mirrored photo of <id> is a photo of <id>_flip


def mirrored(recipe) -> tuple[bool, ...]:
    """Per variant of the recipe: is it a mirror image of the photo (an odd number of flips)?"""
    flips = {}
    for name, start, operations in recipe:
        flips[name] = (flips[start] if start else 0) + operations.count("flip")
    return tuple(flips[name] % 2 == 1 for name, _, _ in recipe)


MIRRORED = {name for (name, _, _), m in zip(OFFLINE, mirrored(OFFLINE)) if m}


def flip_ids(files: pd.DataFrame, variant_of: dict[str, str]) -> pd.DataFrame:
    """train.flip_ids: the files of mirrored offline variants become photos of <id>_flip."""
    files = files.copy()
    mirror = files.File.map(variant_of).isin(MIRRORED).to_numpy()
    files.loc[mirror, "Id"] = files.Id[mirror] + FLIP
    return files


def variants(base: np.ndarray, rng: np.random.Generator, crop_max: int, sigma_max: float,
             recipe=OFFLINE) -> list[np.ndarray]:
    """The recipe's variants of `base`, in order; random draws come from `rng` (the photo's)."""
    made = {}
    for name, start, operations in recipe:
        img = base if start is None else made[start]
        for op in operations:
            if op == "crop":
                img = random_crop(img, rng, crop_max)
            elif op == "flip":
                img = img[:, ::-1]
            elif op == "blur":
                sigma = rng.uniform(0, sigma_max)
                img = cv2.GaussianBlur(img, (0, 0), sigma) if sigma > 0.05 else img
        made[name] = np.ascontiguousarray(img)
    return list(made.values())


def photo_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def decode_for_crop(path: Path, box, size: int) -> tuple[np.ndarray, tuple]:
    """Decode at the smallest JPEG draft scale that keeps the box >= size px; return pixels and the box
    in their coordinates. Decoding a 3600 px photo at 1/4 scale is most of this stage's speed."""
    w, h = images.image_size(path)
    bw, bh = max(1, box[2] - box[0]), max(1, box[3] - box[1])
    scale = min(1.0, max(size / bw, size / bh))
    img = images.to_rgb(images.open_image(path, draft_size=(int(w * scale) + 1, int(h * scale) + 1)))
    sx, sy = img.size[0] / w, img.size[1] / h
    return np.asarray(img), (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _one(job, out: Path, size: int, margin: float, crop_max: int, sigma_max: float, quality: int,
         seed: int, resume: bool):
    image, path, box, n_variants = job
    stem = Path(image).stem
    files = [f"{stem}_{k}.jpg" for k in range(n_variants)]
    if resume and all((out / f).exists() for f in files):
        return image, files, None
    try:
        rgb, local_box = decode_for_crop(path, box, size)
    except images.BadImage as e:
        return image, [], str(e)
    base = crop_to_box(rgb, local_box, margin, size)
    versions = variants(base, photo_rng(seed, image), crop_max, sigma_max)[:n_variants]
    for f, v in zip(files, versions):
        images.save_jpeg(out / f, v, quality)
    return image, files, None


def run(run: Run) -> dict:
    known = run.read_csv("format", "train.csv")
    new = run.read_csv("format", "new_whale.csv")
    boxes = run.read_csv("boxes", "BB_TRAIN.csv").set_index("Image")
    table = pd.concat([known.assign(n=len(VARIANTS)), new.assign(n=1)], ignore_index=True)
    table = table[table.Image.isin(boxes.index)]
    out = run.path("images")
    out.mkdir(exist_ok=True)
    jobs = [(r.Image, str(run.data / r.folder / r.Image),
             tuple(int(v) for v in boxes.loc[r.Image, ["x0", "y0", "x1", "y1"]]), int(r.n))
            for r in table.itertuples()]
    work = partial(_one, out=out, size=run.setting("run.image_size"), margin=run.setting("augment.margin"),
                   crop_max=run.setting("augment.crop_max"), sigma_max=run.setting("augment.blur_sigma_max"),
                   quality=run.setting("augment.jpeg_quality"), seed=run.setting("run.seed"), resume=run.resume)
    ids = dict(zip(table.Image, table.Id))
    rows = []
    # committed in chunks (a resumed run keeps them); within the chunk a kill cut short, photos whose
    # files were all written are kept too (each file is written atomically)
    for image, files, error in run.map_resumable(work, jobs, "crop + variants", key=lambda job: job[0], chunk=64):
        if error:
            run.skip(image, error)
        for k, f in enumerate(files):
            rows.append((f, image, ids[image], VARIANTS[k]))
    final = pd.DataFrame(rows, columns=["File", "Image", "Id", "variant"])
    run.write_csv("TRAINING_FILE_FINAL.csv", final)
    return {"photos": final.Image.nunique(), "files": len(final)}
