"""Tail boxes on the real Kaggle photos of ../shared/data/whales against the published detector's boxes.

    python scripts/bench_boxes.py [--data ../shared/data/whales] [--max-side 512] [--grabcut-max-iter 10,3]
Prints IoU per photo, the mean, counts per method and milliseconds per photo, for each detector and
each cap on GrabCut's iterations (what converging buys, and costs).
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
    ap.add_argument("--grabcut-max-iter", default="10,3", help="comma-separated caps to compare")
    args = ap.parse_args()
    labels = pd.read_csv(args.data / "labels.csv")
    labels = labels.dropna(subset=["x0"])
    out = {}
    runs = [("hsv", 10), ("dark", 10)] + [("grabcut", int(n)) for n in args.grabcut_max_iter.split(",")]
    for detector, max_iter in runs:
        rows, t0 = [], time.perf_counter()
        for r in labels.itertuples():
            *box, method = boxes.detect_box_file(args.data / "images" / r.Image, max_side=args.max_side,
                                                 detector=detector, grabcut_max_iter=max_iter)
            rows.append((r.Image, r.mode, method, boxes.iou(box, (r.x0, r.y0, r.x1, r.y1))))
        ms = (time.perf_counter() - t0) * 1000 / len(rows)
        df = pd.DataFrame(rows, columns=["Image", "mode", "method", "iou"])
        name = f"{detector} max_iter {max_iter}" if detector == "grabcut" else detector
        print(f"\n== detector {name} (max_side {args.max_side}, other settings as configs/default.toml)")
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"detector {name}: mean IoU vs reference boxes over {len(df)} real photos: {df.iou.mean():.3f}")
        print(f"detector {name}: methods", df.method.value_counts().to_dict())
        print(f"detector {name}: {ms:.1f} ms per photo (decode + detect, one process)")
        out[name] = df
    return out


if __name__ == "__main__":
    main()
