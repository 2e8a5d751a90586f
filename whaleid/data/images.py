"""Reading photos safely: every stage decodes through here, so a bad file is one clear reason, not a crash.

Real catalogues hold greyscale, palette, CMYK and 16-bit files, truncated downloads and the odd
decompression bomb; the stages skip such a file and record the reason instead of aborting a long run.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

# 20000x20000 (a bomb in the bad-input sweep) is 4e8 pixels; the largest real photo is ~3621x2000.
MAX_PIXELS = 120_000_000
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """The file cannot be used as a photo; the message says why (shown in stage reports)."""


def open_image(path: Path, draft_size: tuple[int, int] | None = None, grey: bool = False) -> Image.Image:
    """Open and fully decode `path`; with `draft_size`, let JPEG decode at a reduced scale (>= that size),
    and with `grey` too, decode only the luma of a colour JPEG (what a perceptual hash reads).
    img.info["file_size"] / ["file_mode"] keep the file's own size and mode.

    Raises BadImage for a missing, empty, non-image, truncated or oversized file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImage("file not found") from None
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise BadImage(f"image is {w}x{h} pixels, over the {MAX_PIXELS:,} pixel limit (decompression bomb?)")
            file_mode = img.mode
            if draft_size is not None and img.format == "JPEG":
                img.draft(("L" if grey else img.mode) if img.mode in ("RGB", "L") else None, draft_size)
            img.load()
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except Image.DecompressionBombWarning as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"cannot decode: {e}") from None
    if img.size[0] < 1 or img.size[1] < 1:
        raise BadImage("image has no pixels")
    img.info["file_size"], img.info["file_mode"] = (w, h), file_mode  # before any draft reduction
    return img


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header only; raises BadImage if unreadable."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"cannot read header: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """3-channel RGB for every PIL mode: L, LA, P, RGBA (on white), CMYK, I;16, I, F, 1."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = a.max() if a.size else 0
        scale = 255.0 / 65535.0 if hi > 255 else 1.0
        a = np.clip(a * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def is_grey(img: Image.Image) -> bool:
    """True for single-channel photos and for colour files whose channels are (nearly) equal."""
    if img.mode in ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "F"):
        return True
    if img.mode != "RGB":
        return False
    return channels_equal(np.asarray(img.resize((64, 64)) if max(img.size) > 64 else img))


def channels_equal(rgb: np.ndarray, tolerance: int = 8) -> bool:
    """An RGB array whose channels differ nowhere by more than `tolerance`: a greyscale photo saved
    as colour (JPEG chroma noise stays within a few levels)."""
    a = np.asarray(rgb, dtype=np.int16)
    return bool(np.abs(a[..., 0] - a[..., 1]).max() <= tolerance and np.abs(a[..., 1] - a[..., 2]).max() <= tolerance)


def load_rgb(path: Path, max_side: int | None = None) -> np.ndarray:
    """Decode `path` as an RGB uint8 array; with `max_side`, downscaled so its longer side is at most that."""
    img = open_image(path, draft_size=(max_side, max_side) if max_side else None)
    img = to_rgb(img)
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return np.asarray(img)


def save_jpeg(path: Path, rgb: np.ndarray, quality: int = 95) -> None:
    """Write atomically (temp + rename): a killed run never leaves a truncated JPEG under the real name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(rgb).save(tmp, "JPEG", quality=quality)
    tmp.replace(path)


CONVERSIONS = {"RGB": "rgb", "L": "grey", "LA": "grey+alpha", "1": "bilevel", "P": "palette",
               "PA": "palette+alpha", "RGBA": "rgba-on-white", "CMYK": "cmyk", "YCbCr": "ycbcr",
               "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "32-bit", "F": "float"}


def conversion(mode: str) -> str:
    """How to_rgb turns a file of this PIL mode into 3-channel RGB (recorded by the format stage)."""
    return CONVERSIONS.get(mode, f"convert-{mode}")
