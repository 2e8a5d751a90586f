"""Is the train stage's input pipeline ever the bottleneck? Prints, with the settings used:

    pipeline alone    images/s of whaleid.learning.inputs.train_dataset (read, parallel decode, shuffle, batch,
                      prefetch), iterated without a model
    train step alone  images/s of the compiled model's training step (whaleid.learning.phases.compiled_model) on
                      batches already in memory
    fit from pipeline images/s of model.fit reading the pipeline, as the stage trains
    ratio             pipeline / train step (target >= 3x)

    .venv/bin/python scripts/bench_input.py                      # synthetic 96 px set, configs/scratch.toml
    .venv/bin/python scripts/bench_input.py --work WORK          # a preprocessed work folder's images
    .venv/bin/python scripts/bench_input.py --set train.online_augment=true --set run.image_size=128
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from whaleid.pipeline import config  # noqa: E402


def synthetic_set(folder: Path, n: int, ids: int, size: int, quality: int) -> tuple[list[str], list[int]]:
    """n JPEGs (size x size) of `ids` classes: a colour and a blob per class plus noise."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colours = rng.integers(30, 230, (ids, 3))
    yy, xx = np.mgrid[:size, :size]
    paths, labels = [], []
    for i in range(n):
        c = i % ids
        img = rng.normal(100, 25, (size, size, 3))
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2
        img[mask] = colours[c] + rng.normal(0, 15, (int(mask.sum()), 3))
        p = folder / f"img{i:05d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=quality)
        paths.append(str(p))
        labels.append(c)
    return paths, labels


def work_set(work: Path) -> tuple[list[str], list[int]]:
    import pandas as pd
    files = pd.read_csv(work / "split" / "train_files.csv", keep_default_na=False)
    classes = {c: i for i, c in enumerate(sorted(files.Id.unique()))}
    return [str(work / "augment" / "images" / f) for f in files.File], [classes[c] for c in files.Id]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="a work folder preprocessed by whaleid (split/, augment/images/)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "scratch.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--images", type=int, default=640, help="synthetic set size (without --work)")
    ap.add_argument("--ids", type=int, default=40, help="synthetic classes (without --work)")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps")
    args = ap.parse_args()
    cfg = config.load(args.config, tuple(args.overrides))
    get = lambda key: config.get(cfg, key)  # noqa: E731
    size, batch, seed = get("run.image_size"), get("train.batch_size"), get("run.seed")

    with tempfile.TemporaryDirectory(prefix="whaleid-bench-") as tmp:
        if args.work:
            paths, labels = work_set(args.work)
            source = f"{len(paths)} training images of {args.work}"
        else:
            t = time.perf_counter()
            paths, labels = synthetic_set(Path(tmp) / "images", args.images, args.ids, size,
                                          get("augment.jpeg_quality"))
            source = f"{len(paths)} synthetic {size} px JPEGs, {args.ids} classes ({time.perf_counter() - t:.1f}s to write)"
        n_classes = max(labels) + 1

        from whaleid.learning import devices, heads, inputs, phases
        strategy = devices.make_strategy(get("train.strategy"))
        precision = devices.choose_precision(get("train.precision"), strategy)
        deterministic = not devices.accelerated(strategy)
        devices.seed_everything(seed, deterministic)
        steps_per_epoch = inputs.steps(len(paths), batch)
        print(f"source: {source}")
        print(f"settings: {get('model.backbone')} ({get('model.pooling')} pooling) at {size} px, batch {batch}, "
              f"online_augment {get('train.online_augment')}, {precision}, xla {get('train.xla')}, "
              f"strategy {get('train.strategy')} ({strategy.num_replicas_in_sync} replica(s)), "
              f"op determinism {deterministic}, {os.cpu_count()} CPU cores")

        # 1. the pipeline alone: three epochs, the first one's start-up excluded
        ds = inputs.train_dataset(paths, labels, size, batch, seed, 0, 3)
        it = iter(ds)
        for _ in range(min(5, steps_per_epoch)):
            next(it)
        t, seen = time.perf_counter(), 0
        for images, _ in it:
            seen += int(images.shape[0])
        pipeline = seen / (time.perf_counter() - t)
        print(f"pipeline alone:    {pipeline:8.0f} images/s  ({seen} images)")

        # 2. the train step alone, on batches in memory; 3. fit reading the pipeline, as the stage does.
        # Both timed from batch to batch, past the first few (tracing, fit's own start-up)
        import keras

        class Clock(keras.callbacks.Callback):
            def __init__(self, skip):
                super().__init__()
                self.skip, self.times = skip, []

            def on_train_batch_end(self, batch, logs=None):
                self.times.append(time.perf_counter())

            def rate(self):
                times = self.times[self.skip:]
                return (len(times) - 1) * batch / (times[-1] - times[0])

        with devices.dtype_policy(precision):
            with strategy.scope():
                net = phases.compiled_model(get, heads.from_settings(get), n_classes)
            k = min(8, steps_per_epoch)
            memory = inputs.train_dataset(paths, labels, size, batch, seed, 0, 1).take(k).cache().repeat()
            t = time.perf_counter()
            net.fit(memory, epochs=1, steps_per_epoch=k, verbose=0, shuffle=False)  # traces, fills the cache
            trace = time.perf_counter() - t
            clock = Clock(skip=2)
            net.fit(memory, epochs=1, steps_per_epoch=args.steps + 2, verbose=0, shuffle=False, callbacks=[clock])
            step = clock.rate()
            print(f"train step alone:  {step:8.0f} images/s  ({args.steps} steps; the first fit, with tracing, "
                  f"took {trace:.1f}s)")

            epochs = max(1, -(-(args.steps + 2) // steps_per_epoch))
            ds = inputs.train_dataset(paths, labels, size, batch, seed, 0, epochs)
            clock = Clock(skip=2)
            net.fit(ds, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=0, shuffle=False, callbacks=[clock])
            fit = clock.rate()
            print(f"fit from pipeline: {fit:8.0f} images/s  ({len(clock.times) - 2} steps over {epochs} epoch(s))")
        print(f"ratio pipeline / train step: {pipeline / step:.1f}x (target >= 3x); "
              f"fit from pipeline reaches {fit / step:.0%} of the train step alone")


if __name__ == "__main__":
    main()
