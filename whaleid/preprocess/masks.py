"""The animal's mask in a photo's box crop (keypoints.mask): which pixels are the animal, so that local
features are taken on its marks, not on the branches, rocks and water around it.

    crop (RGB) -> copy of SIDE px (longer side) -> the subject map (subject_box.subject_map: the CAM of
    ImageNet's animal classes, or the colour contrast with the border when no animal is seen), scaled
    0..1 -> GrabCut seeded by it (>= CORE: surely animal, >= SURE: probably, < AWAY: surely
    background, the rest probably background), ITERATIONS rounds -> the largest region (and any of comparable size)

The map is coarse (10 x 10 cells for the CAM) and GrabCut draws its edge along the colours; when
GrabCut keeps less than MIN_SHARE of the crop, the map's own region (>= subject_box.THRESHOLD) is the
mask, and when that is empty too, the whole crop (never no mask at all: a photo keeps its features).
Masks are stored packed, one bit a pixel, at SIDE px (keypoints.npz), and resized to whatever grid
uses them (the keypoints' crop, a report's picture).
"""
from __future__ import annotations

import cv2
import numpy as np

from whaleid.preprocess import subject_box
from whaleid.preprocess.box_head import main_extent

SIDE = 160          # px, longer side of the copy GrabCut works on (and of the stored mask)
CORE = 0.7          # subject map >= CORE: the animal for sure (GrabCut cannot give it up)
SURE = 0.3          # subject map >= SURE: probably the animal
AWAY = 0.08         # subject map < AWAY: background for sure
ITERATIONS = 5
MIN_SHARE = 0.03    # GrabCut's mask under this share of the crop: the map's own region instead


def animal_mask(rgb: np.ndarray, side: int = SIDE) -> tuple[np.ndarray, str]:
    """(bool mask of `side` px on the longer side, how it was made: grabcut | map | whole)."""
    h, w = rgb.shape[:2]
    s = side / max(h, w)
    small = cv2.resize(rgb, (max(8, round(w * s)), max(8, round(h * s))), interpolation=cv2.INTER_AREA)
    hh, ww = small.shape[:2]
    m, _ = subject_box.subject_map(np.ascontiguousarray(rgb))
    m = cv2.resize(m.astype(np.float32), (ww, hh), interpolation=cv2.INTER_LINEAR)
    seed = np.where(m >= SURE, cv2.GC_PR_FGD, np.where(m < AWAY, cv2.GC_BGD, cv2.GC_PR_BGD)).astype(np.uint8)
    seed[m >= CORE] = cv2.GC_FGD
    mask = None
    if (seed == cv2.GC_FGD).any() and ((seed == cv2.GC_BGD) | (seed == cv2.GC_PR_BGD)).any():
        cv2.setRNGSeed(0)  # GrabCut's k-means: the same mask for the same crop in any worker
        bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
        try:
            cv2.grabCut(np.ascontiguousarray(small[..., ::-1]), seed, None, bgd, fgd, ITERATIONS, cv2.GC_INIT_WITH_MASK)
            mask = main_region((seed == cv2.GC_FGD) | (seed == cv2.GC_PR_FGD))
        except cv2.error:  # a flat crop: no colour model to fit
            mask = None
    if mask is not None and mask.mean() >= MIN_SHARE:
        return mask, "grabcut"
    region = main_region(m >= subject_box.THRESHOLD)
    if region is not None and region.any():
        return region, "map"
    return np.ones((hh, ww), bool), "whole"


def main_region(mask: np.ndarray) -> np.ndarray | None:
    """The mask's pixels inside its main extent (the largest component and any of comparable size),
    holes of the animal's own texture closed."""
    if not mask.any():
        return None
    box = main_extent(mask, 3)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return cv2.morphologyEx(out.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8)).astype(bool)


def resized(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """The mask on another grid of the same crop (nearest neighbour)."""
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)


def inside(mask: np.ndarray, points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Which (x, y) points of a width x height crop fall on the mask (made on the same crop)."""
    if len(points) == 0:
        return np.zeros(0, bool)
    mh, mw = mask.shape
    ix = np.clip((np.asarray(points[:, 0], np.float64) * mw / width).astype(int), 0, mw - 1)
    iy = np.clip((np.asarray(points[:, 1], np.float64) * mh / height).astype(int), 0, mh - 1)
    return mask[iy, ix]


def pack(masks: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Masks -> the npz's arrays: shapes (n, 2) and one bit per pixel, concatenated with offsets."""
    bits = [np.packbits(m.ravel()) for m in masks]
    return {"mask_shapes": np.array([m.shape for m in masks], np.int32).reshape(-1, 2),
            "mask_offsets": np.concatenate([[0], np.cumsum([len(b) for b in bits])]).astype(np.int64),
            "mask_bits": np.concatenate(bits) if bits else np.zeros(0, np.uint8)}


def unpack(arrays, i: int) -> np.ndarray:
    h, w = (int(v) for v in arrays["mask_shapes"][i])
    a, b = arrays["mask_offsets"][i:i + 2]
    return np.unpackbits(arrays["mask_bits"][a:b])[: h * w].reshape(h, w).astype(bool)
