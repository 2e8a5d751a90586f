"""Whole `whaleid preprocess` on a Kaggle-scale synthetic set: wall time per stage and peak RSS, then
the cached rerun (every stage up to date) with the stat cache warm and cold.

    python scripts/bench_preprocess.py [--images 33321] [--workers 2] [--data DIR] [--work DIR]
                                       [--size-scale 1.0] [--config configs/default.toml]

The set follows the real per-id photo counts (../shared/data/whales/kaggle2019_train.csv when
present, else the long tail) with ~38% new_whale train rows and a test set, ~--images photos in all.
Peak RSS is the largest of this process and any one worker (ru_maxrss).

Cached rerun: a new session checks every stage as `whaleid preprocess` would a second time (data
folder and artifacts fingerprinted, nothing to run): "warm" with WORK/.whaleid_state as the first run
left it (a stat per file), "cold" with it deleted (every photo and artifact file read and hashed: the
cost after a copy of the work folder, or on a new VM).
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
from whaleid.pipeline import config  # noqa: E402
from whaleid.datasets import synth
from whaleid.pipeline.stage import STATE, Session  # noqa: E402
from whaleid.stages import BY_COMMAND  # noqa: E402

REAL = ROOT.parent / "shared/data/whales/kaggle2019_train.csv"


def du(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def session(cfg, work, data, workers):
    return Session(cfg=cfg, work=work, data=data, stages=BY_COMMAND["preprocess"], workers=workers,
                   progress=True, echo=print)


def cached_rerun(cfg, work, data, workers) -> tuple[float, dict]:
    s = session(cfg, work, data, workers)
    t = time.perf_counter()
    outcome = s.run(s.stages)
    s.close()
    return time.perf_counter() - t, outcome


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=33321)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", type=Path, help="reuse a data folder made by an earlier run")
    ap.add_argument("--work", type=Path, help="work folder (default: a new temp folder; an existing one is reused)")
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
    work = args.work or tmp / "work"
    n = len(list((data / "train").iterdir())) + len(list((data / "test").iterdir()))
    cfg = config.load(args.config)
    s = session(cfg, work, data, args.workers)
    t = time.perf_counter()
    s.run(s.stages)
    s.close()
    wall = time.perf_counter() - t
    print(f"\npreprocess of {n} photos ({data}, {du(data / 'train') + du(data / 'test'):.2f} GB), "
          f"config {args.config.name}, workers {args.workers}:")
    for st in s.stages:
        m = s.manifest(st.name)
        print(f"  {st.name:<8} {m['seconds']:8.1f} s   {json.dumps(m['counts'])}")
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print(f"total wall time: {wall / 60:.1f} min; peak RSS {peak:.0f} MiB")

    images = work / "augment" / "images"
    print(f"\ncached rerun ({n} photos, {sum(1 for _ in images.iterdir())} augment files, "
          f"{du(images):.2f} GB of them):", flush=True)
    warm, outcome = cached_rerun(cfg, work, data, args.workers)
    assert set(outcome.values()) == {"cached"}, outcome
    (work / STATE).unlink(missing_ok=True)
    cold, outcome = cached_rerun(cfg, work, data, args.workers)
    assert set(outcome.values()) == {"cached"}, outcome
    again, _ = cached_rerun(cfg, work, data, args.workers)
    print(f"  stat cache warm: {warm:.1f} s")
    print(f"  stat cache cold (WORK/{STATE} deleted: every file hashed, {args.workers} threads): {cold:.1f} s")
    print(f"  warm again after the cold run: {again:.1f} s")
    print(f"(data {data} and work {work} are kept: --data / --work reuse them)")


if __name__ == "__main__":
    main()
