import io

import numpy as np
import pytest
from PIL import Image

from whaleid.data import images, tables
from whaleid.data.images import BadImage


def _save(path, img, fmt=None, **kw):
    img.save(path, fmt, **kw)
    return path


def _colours() -> np.ndarray:
    """30 x 40 RGB whose channels differ everywhere: R rises left to right, G top to bottom, B falls
    left to right (a channel swap or an inversion moves pixels by ~80-120 levels on average)."""
    y, x = np.mgrid[0:30, 0:40]
    return np.stack([x * 6, y * 8, 255 - x * 6], -1).astype(np.uint8)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "RGB"])
def test_every_mode_becomes_3_channel_rgb(tmp_path, mode):
    rgb = _colours()
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        assert img.mode.startswith("I;16")
    elif mode != "RGB":
        img = img.convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK", "RGB") else "PNG"
    path = _save(tmp_path / f"x.{fmt.lower()}", img, fmt)
    out = images.load_rgb(path)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    if mode == "I;16":  # 16-bit is scaled to 8 bit, not clipped to white
        assert 0 < out.mean() < 250 and np.abs(out[..., 0].astype(int) - rgb[..., 0]).max() <= 1
    if mode in ("L", "LA", "I;16", "1"):
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    # the pixels: what the saved image shows (grey levels, the palette's colours, the bilevel dots),
    # exactly for PNG and within JPEG's loss (mean ~2, max 12 levels here) for JPEG
    shown = np.asarray(img.convert("RGB") if mode != "I;16" else Image.fromarray(rgb[..., 0]).convert("RGB"), int)
    err = np.abs(out.astype(int) - shown)
    if fmt == "PNG":
        assert err.max() <= (1 if mode == "I;16" else 0), (mode, err.max())
    else:
        assert err.mean() < 3 and err.max() <= 16, (mode, err.mean(), err.max())
    if mode in ("RGB", "RGBA", "CMYK"):  # colour files keep the colours of the source, channel by channel
        for c in range(3):
            assert np.abs(out[..., c].astype(int) - rgb[..., c]).mean() < 3, (mode, c)
    if mode == "P":  # the web palette with dithering: near the source colours, not a grey or swapped image
        for c in range(3):
            assert np.abs(out[..., c].astype(int) - rgb[..., c]).mean() < 25, (mode, c)


def test_partly_transparent_pixels_are_composited_on_white(tmp_path):
    rgb = _colours()
    alpha = np.tile(np.linspace(0, 255, 40).round().astype(np.uint8), (30, 1))
    path = _save(tmp_path / "a.png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG")
    out = images.load_rgb(path).astype(float)
    a = alpha[..., None] / 255.0
    expected = rgb * a + 255 * (1 - a)
    assert np.abs(out - expected).max() <= 1.5


def test_rgba_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert (np.asarray(images.to_rgb(img)) == 255).all()


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"this is not an image at all", "not an image"),
])
def test_bad_files_raise_badimage_with_reason(tmp_path, content, reason):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(BadImage, match=reason):
        images.open_image(p)


def test_truncated_jpeg_and_missing_file_and_bomb(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(buf, "JPEG")
    p = tmp_path / "trunc.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImage, match="cannot decode"):
        images.open_image(p)
    with pytest.raises(BadImage, match="not found"):
        images.open_image(tmp_path / "nope.jpg")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # tiny file, 4e8 pixels
    with pytest.raises(BadImage, match="bomb|pixel limit"):
        images.open_image(bomb)


def test_draft_decode_is_reduced_and_max_side_respected(tmp_path):
    p = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1000), (0, 90, 200)).save(p, "JPEG")
    img = images.open_image(p, draft_size=(250, 125))
    assert 250 <= img.size[0] < 2000
    assert max(images.load_rgb(p, max_side=300).shape[:2]) <= 300


def test_train_csv_checks_name_file_row_and_column(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text("Image,Label\na.jpg,w_1\n")
    with pytest.raises(tables.TableError, match=r"train.csv: missing column 'Id'"):
        tables.read_train(p)
    p.write_text("Image,Id\na.jpg,w_1\nb.jpg,\n")
    with pytest.raises(tables.TableError, match=r"row 3: empty value in column 'Id'"):
        tables.read_train(p)
    p.write_text("Image,Id\na.jpg,w_1\na.jpg,w_2\n")
    with pytest.raises(tables.TableError, match=r"rows \[2, 3\].*a.jpg"):
        tables.read_train(p)
    p.write_text("Image,Id\na.jpg,w_1\na.jpg,w_1\nb.jpg,new_whale\n")
    df, notes = tables.read_train(p)
    assert list(df.Image) == ["a.jpg", "b.jpg"] and "1 repeated rows dropped" in notes[0]
    p.write_text("")
    with pytest.raises(tables.TableError, match="empty"):
        tables.read_train(p)
    with pytest.raises(tables.TableError, match="not found"):
        tables.read_train(tmp_path / "missing.csv")
    s = tmp_path / "sample_submission.csv"
    s.write_text("Image,Id\nx.jpg,new_whale w_1\ny.jpg,new_whale\nx.jpg,a\n")
    df, notes = tables.read_test(s)
    assert list(df.Image) == ["x.jpg", "y.jpg"] and notes
