"""Fit the learned tail-box classifier (whaleid/preprocess/box_head.py) on every labelled real photo and write
its weights to whaleid/preprocess/box_head_weights.py (a plain Python module: it ships with the package).

    python scripts/fit_box_head.py [--images DIR --labels CSV] [--out whaleid/preprocess/box_head_weights.py]

The photos are read, never written. What this fit scores on photos it has not seen is what
scripts/bench_boxes.py measures by leave-one-out.
"""
import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from whaleid.preprocess import box_head, box_train  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/whales/images")
    ap.add_argument("--labels", type=Path, default=ROOT.parent / "shared/data/whales/labels.csv")
    ap.add_argument("--out", type=Path, default=ROOT / "whaleid/preprocess/box_head_weights.py")
    args = ap.parse_args()
    photos = box_train.load_labelled(args.images, args.labels)
    stats = box_train.photo_statistics(photos)
    w, b, parts = box_train.solve(box_train.combine(stats))
    digest = hashlib.sha256(args.labels.read_bytes()).hexdigest()[:16]
    lines = [f'"""Weights of the tail-box classifier of box_head.py, written by scripts/fit_box_head.py: ridge',
             f'(alpha {box_head.RIDGE_ALPHA} per cell) on {len(photos)} real photos, their mirror images and '
             f'{box_head.AUGMENT_COPIES} augmented',
             f'copies each ({args.labels.name} sha256 {digest}...); {len(w)} weights over box_head.design()."""',
             f"DESIGN = {tuple(parts)!r}", f"B = {b!r}", "W = ("]
    values = [f"{v:.7g}," for v in w.astype(float)]
    for i in range(0, len(values), 8):
        lines.append("    " + " ".join(values[i:i + 8]))
    lines.append(")")
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}: {len(w)} weights + bias from {len(photos)} photos; "
          f"|w| max {np.abs(w).max():.4f}, b {b:.4f}")


if __name__ == "__main__":
    main()
