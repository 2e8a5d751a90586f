"""Whole `whaleid preprocess` on a Kaggle-scale synthetic set: wall time per stage and peak RSS.

    python scripts/bench_preprocess.py [--images 33321] [--workers 2] [--data DIR] [--size-scale 1.0]

The set follows the real per-id photo counts (../shared/data/whales/kaggle2019_train.csv when
present, else the long tail) with ~38% new_whale train rows and a test set, ~--images photos in all.
Peak RSS is the largest of this process and any one worker (ru_maxrss).
"""
import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from whaleid import config, synth  # noqa: E402
from whaleid.cli import pipeline  # noqa: E402
from whaleid.stage import Session  # noqa: E402

REAL = ROOT.parent / "shared/data/whales/kaggle2019_train.csv"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=33321)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", type=Path, help="reuse a data folder made by an earlier run")
    ap.add_argument("--size-scale", type=float, default=1.0)
    ap.add_argument("--config", type=Path, default=ROOT / "configs/default.toml")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="whaleid-bench-pre-"))
    data = args.data
    if data is None:
        data = tmp / "data"
        # photos = known (ids * mean count) / (1 - 0.38) * (1 + 0.25 test) -> ids for ~args.images
        ids = max(10, int(args.images / (3.13 / 0.62 * 1.25 * 1.03)))
        t = time.perf_counter()
        summary = synth.generate(data, ids=ids, seed=0, workers=args.workers,
                                 photos="real" if REAL.exists() else "longtail",
                                 real_train_csv=REAL if REAL.exists() else None,
                                 size_scale=args.size_scale, progress=True)
        print(f"synth: {summary} in {time.perf_counter() - t:.0f}s", flush=True)
    n = len(list((data / "train").iterdir())) + len(list((data / "test").iterdir()))
    s = Session(cfg=config.load(args.config), work=tmp / "work", data=data, stages=pipeline()["preprocess"],
                workers=args.workers, progress=True, echo=print)
    t = time.perf_counter()
    s.run(s.stages)
    wall = time.perf_counter() - t
    print(f"\npreprocess of {n} photos ({data}), config {args.config.name}, workers {args.workers}:")
    for st in s.stages:
        m = s.manifest(st.name)
        print(f"  {st.name:<8} {m['seconds']:8.1f} s   {json.dumps(m['counts'])}")
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print(f"total wall time: {wall / 60:.1f} min; peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
