"""Predict's overhead: wall time of the predict stage vs the bare model forward pass over the same
number of TTA images, in one run (target <= 1.10x).

    python scripts/bench_predict.py --work WORK [--workers 2] [--repeat 3]
    python scripts/bench_predict.py --kaggle-rerank [--gallery 2000 --queries 200 ...]  (bench_rerank.py)
WORK must hold a trained model (e.g. demo/work after `make demo`). The forward pass is timed on
random uint8 images of the model's input size, in the same batch size as predict uses. Also timed:
the decode floor (decode, box crop, resize and TTA of every test photo in --workers threads, no
model). On a CPU with a small model the decode floor, not the forward pass, bounds the stage: the
last line compares the stage with the larger of the two.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from whaleid.pipeline import config  # noqa: E402
from whaleid.stages import ALL  # noqa: E402
from whaleid.pipeline.stage import Session  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "demo/work")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kaggle-rerank", nargs=argparse.REMAINDER, default=None, metavar="ARGS",
                    help="instead: re-ranking's cost at Kaggle size, extrapolated (scripts/bench_rerank.py ARGS)")
    ap.add_argument("--no-gallery-cache", action="store_true",
                    help="embed the gallery on every run, as before similarity/gallery_cache.py")
    args = ap.parse_args()
    if args.no_gallery_cache:
        from whaleid.similarity import gallery_cache
        gallery_cache.key = lambda run: None
    if args.kaggle_rerank is not None:
        import bench_rerank
        return bench_rerank.main(args.kaggle_rerank)
    rec = json.loads((args.work / "whaleid.json").read_text())
    cfg = config.load(rec["config"], tuple(rec.get("set", [])))
    s = Session(cfg=cfg, work=args.work, data=Path(rec["data"]), stages=ALL, workers=args.workers,
                progress=False, echo=lambda m: None)
    predict = s.stage("predict")
    s.run([predict], force={"predict"})  # warm-up: imports, model load, tracing
    stage_times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        s.run([predict], force={"predict"})
        stage_times.append(time.perf_counter() - t)
    n = s.manifest("predict")["counts"]["images"]
    versions = 4 if cfg["predict"]["tta"] else 1
    batch = cfg["predict"]["batch_size"]
    from whaleid.learning import model as models
    size = cfg["run"]["image_size"]
    x = np.random.default_rng(0).integers(0, 255, (batch * versions, size, size, 3)).astype(np.float32)
    t = time.perf_counter()
    net = models.load_model(args.work / "train/model.keras")
    net.predict_on_batch(x)
    fixed = time.perf_counter() - t  # once per run, whatever the number of photos
    total = n * versions
    forward = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        done = 0
        while done < total:
            net.predict_on_batch(x)  # predict pads its last batch to full size too
            done += batch * versions
        forward.append(time.perf_counter() - t)
    import multiprocessing.pool
    from functools import partial
    import pandas as pd
    from whaleid.inference.predict import photo_jobs
    from whaleid.inference.embedding import prepare
    jobs = photo_jobs(pd.read_csv(args.work / "format/test.csv", dtype={"Image": str}),
                      pd.read_csv(args.work / "boxes/BB_TEST.csv", dtype={"Image": str}).set_index("Image"),
                      Path(rec["data"]) / "test")
    work = partial(prepare, size=size, margin=cfg["augment"]["margin"], crop_max=cfg["augment"]["crop_max"],
                   sigma_max=cfg["augment"]["blur_sigma_max"], seed=cfg["run"]["seed"], tta=cfg["predict"]["tta"])
    decode = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        with multiprocessing.pool.ThreadPool(args.workers) as pool:
            for _ in pool.imap(work, jobs, chunksize=8):
                pass
        decode.append(time.perf_counter() - t)
    st, fw, dec = min(stage_times), min(forward), min(decode)
    print(f"predict stage: {n} test photos x {versions} TTA versions, batch {batch} photos, "
          f"{size} px, {cfg['model']['backbone']}, workers {args.workers}; best of {args.repeat}")
    print(f"predict stage wall time: {st:.2f}s (model load, decode, boxes crop, TTA, merge, validation, write)")
    print(f"bare forward pass over {total} images: {fw:.2f}s")
    print(f"decode floor (decode, crop, resize, TTA; {args.workers} threads, no model): {dec:.2f}s")
    print(f"predict vs bare forward pass: {st / fw:.2f}x")
    print(f"model load + first trace (once per run, in the stage time): {fixed:.2f}s")
    print(f"predict vs max(forward pass, decode floor): {st / max(fw, dec):.2f}x; "
          f"without the once-per-run load + trace: {(st - fixed) / max(fw, dec):.2f}x")


if __name__ == "__main__":
    main()
