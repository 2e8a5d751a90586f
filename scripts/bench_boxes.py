"""Tail boxes on the real Kaggle photos of ../shared/data/whales against the published detector's boxes.

    python scripts/bench_boxes.py [--data ../shared/data/whales] [--max-side 512]
Prints IoU per photo, the mean, counts per method and milliseconds per photo.
"""
import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from whaleid import boxes  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/whales")
    ap.add_argument("--max-side", type=int, default=512)
    args = ap.parse_args()
    labels = pd.read_csv(args.data / "labels.csv")
    labels = labels.dropna(subset=["x0"])
    out = {}
    for detector in ("hsv", "dark", "grabcut"):
        rows, t0 = [], time.perf_counter()
        for r in labels.itertuples():
            *box, method = boxes.detect_box_file(args.data / "images" / r.Image, max_side=args.max_side,
                                                 detector=detector)
            rows.append((r.Image, r.mode, method, boxes.iou(box, (r.x0, r.y0, r.x1, r.y1))))
        ms = (time.perf_counter() - t0) * 1000 / len(rows)
        df = pd.DataFrame(rows, columns=["Image", "mode", "method", "iou"])
        print(f"\n== detector {detector} (max_side {args.max_side}, grabcut_side 160, grabcut_max_iter 10, min_fraction 0.10, open_size 5)")
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"detector {detector}: mean IoU vs reference boxes over {len(df)} real photos: {df.iou.mean():.3f}")
        print(f"detector {detector}: methods", df.method.value_counts().to_dict())
        print(f"detector {detector}: {ms:.1f} ms per photo (decode + detect, one process)")
        out[detector] = df
    return out


if __name__ == "__main__":
    main()
