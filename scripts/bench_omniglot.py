"""Omniglot one-shot benchmark (Koch et al. 2015: 92% 20-way one-shot with a siamese net, 30 alphabets, GPU).

    python scripts/bench_omniglot.py [--train small1] [--minutes 12] [--runs DIR] [--make-runs DIR] ...

Trains whaleid's train stage (--head, siamese by default; the pretrained EfficientNet-Lite0 unless
--weights none; CPU) on the characters of the
background sets named by --train (each character an "individual", its 20 drawers its photos; drawers
17-20 validate), then scores N-way one-shot runs in the format of the original Omniglot one-shot
runs (runNN/training/classNN.png, runNN/test/itemNN.png, runNN/class_labels.txt with lines
"runNN/test/itemNN.png runNN/training/classNN.png"): every test item against the run's N training
classes, the most similar one is the answer. Without --runs the runs are built as Lake et al. built
theirs, from alphabets never trained on (--eval's alphabets that are not in the training sets, or
--holdout's): one alphabet, N of its characters, two drawers, one for the classes and one for the
items. --make-runs DIR writes those runs there (the original format) before scoring them.

Note: images_background_small2's Greek and Latin are the same files as small1's; an alphabet found
in a training set (same name and same files) is trained once and never evaluated.

Defaults (printed): EfficientNet-Lite0 (ImageNet) at 105 px fine-tuned (--head-epochs frozen, then
all of it), batches of 16 characters x 4 drawers, online
augmentation, half of the negative pairs the batch's hardest (the runs are within one alphabet, where
random negatives from other alphabets are too easy: 48% vs 40% 20-way on a quiet 2-core machine).

The training goes through the stage cache in --work (default a folder in the system temp dir): run the
same command again and it is not retrained. --minutes is train.max_minutes (the budget, over resumed
runs too). Prints the settings, then accuracy and training minutes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from whaleid.pipeline import config  # noqa: E402
from whaleid.pipeline.stage import Session, Stage, StageError  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "omniglot"
VAL_DRAWERS = 4  # the last drawers of each training character validate (early stopping)


# ---------------------------------------------------------------- the data

def alphabets(data: Path, sets: list[str]) -> dict[str, Path]:
    """{alphabet: folder} over the background sets, an alphabet seen twice (same files) kept once."""
    out: dict[str, Path] = {}
    for s in sets:
        folder = data / f"images_background_{s}"
        if not folder.is_dir():
            raise SystemExit(f"{folder}: no such background set (choose from "
                             f"{', '.join(p.name.split('_')[-1] for p in sorted(data.glob('images_background_*')))})")
        for a in sorted(p for p in folder.iterdir() if p.is_dir()):
            if a.name in out:
                if _listing(out[a.name]) != _listing(a):
                    raise SystemExit(f"{a} and {out[a.name]}: two different alphabets of one name")
                continue
            out[a.name] = a
    return out


def _listing(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.png")):
        h.update(f"{p.relative_to(folder)}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()


def drawer(path: Path) -> int:
    return int(path.stem.split("_")[-1])


def prepare(path: Path, size: int) -> np.ndarray:
    """A character as the model sees it: strokes bright on black, image_size, 3 channels."""
    with Image.open(path) as im:
        grey = 255 - np.asarray(im.convert("L"), np.uint8)
    if grey.shape != (size, size):
        grey = cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA)
    return np.repeat(grey[:, :, None], 3, axis=2)


def write_jpeg(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(path, "JPEG", quality=95)


# ---------------------------------------------------------------- stand-in upstream stages for train

def make_stages(data: Path, train_alphabets: dict[str, Path], record: Path):
    from whaleid.stages import TRAIN

    def augment(run):
        out = run.path("images")
        out.mkdir(exist_ok=True)
        size = run.setting("run.image_size")
        rows = []
        for a, folder in train_alphabets.items():
            for c in sorted(p for p in folder.iterdir() if p.is_dir()):
                ident = f"{a}/{c.name}"
                for png in sorted(c.glob("*.png")):
                    name = f"{a}_{c.name}_{png.stem}"
                    write_jpeg(out / f"{name}_0.jpg", prepare(png, size))
                    rows.append((f"{name}_0.jpg", f"{name}.png", ident, "original", drawer(png)))
        run.write_csv("TRAINING_FILE_FINAL.csv", pd.DataFrame(rows, columns=["File", "Image", "Id", "variant", "drawer"]))
        return {"files": len(rows), "characters": len({r[2] for r in rows})}

    def split(run):
        files = run.read_csv("augment", "TRAINING_FILE_FINAL.csv")
        last = files.groupby("Id").drawer.transform(lambda d: d.rank(method="first", ascending=False) <= VAL_DRAWERS)
        run.write_csv("train_files.csv", files[~last][["File", "Image", "Id"]])
        run.write_csv("val_files.csv", files[last][["File", "Image", "Id"]])
        return {"train_files": int((~last).sum()), "val_files": int(last.sum())}

    return [Stage("augment", augment, artifacts=("images/", "TRAINING_FILE_FINAL.csv"), settings=("run.image_size",),
                  extra_inputs=lambda session: [record]),
            Stage("split", split, artifacts=("train_files.csv", "val_files.csv"), upstream=("augment",)),
            TRAIN]


# ---------------------------------------------------------------- one-shot runs (the original format)

def build_runs(out: Path, eval_alphabets: dict[str, Path], n_runs: int, n_way: int, seed: int) -> list[str]:
    """Lake et al.'s within-alphabet runs: an alphabet with >= n_way characters, n_way of them, two
    drawers (classes from one, items from the other, items in a random order). Returns notes."""
    rng = np.random.default_rng(seed)
    chars = {a: sorted(p for p in f.iterdir() if p.is_dir()) for a, f in eval_alphabets.items()}
    eligible = sorted(a for a, cs in chars.items() if len(cs) >= n_way)
    notes = []
    if not eligible:
        raise SystemExit(f"no held-out alphabet has {n_way} characters for within-alphabet runs "
                         f"({', '.join(f'{a}: {len(c)}' for a, c in chars.items())})")
    small = sorted(set(chars) - set(eligible))
    if small:
        notes.append(f"alphabets with fewer than {n_way} characters are not used: {', '.join(small)}")
    out.mkdir(parents=True, exist_ok=True)
    for r in range(1, n_runs + 1):
        a = eligible[r % len(eligible)] if n_runs >= len(eligible) else str(rng.choice(eligible))
        picked = [chars[a][i] for i in rng.choice(len(chars[a]), size=n_way, replace=False)]
        d1, d2 = (int(x) for x in rng.choice(np.arange(1, 21), size=2, replace=False))
        run = out / f"run{r:02d}"
        (run / "training").mkdir(parents=True, exist_ok=True)
        (run / "test").mkdir(exist_ok=True)
        order = rng.permutation(n_way)
        lines = []
        for k, c in enumerate(picked, start=1):
            src = next(p for p in c.glob("*.png") if drawer(p) == d1)
            Image.open(src).save(run / "training" / f"class{k:02d}.png")
        for j, k in enumerate(order, start=1):
            src = next(p for p in picked[k].glob("*.png") if drawer(p) == d2)
            Image.open(src).save(run / "test" / f"item{j:02d}.png")
            lines.append(f"run{r:02d}/test/item{j:02d}.png run{r:02d}/training/class{k + 1:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")
        (run / "alphabet.txt").write_text(a + "\n")
    return notes


def read_runs(folder: Path) -> list[tuple[Path, list[tuple[Path, Path]]]]:
    """[(run folder, [(item, its class), ...])] from runNN/class_labels.txt; a bad line is an error naming it."""
    runs = []
    for run in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("run")):
        labels = run / "class_labels.txt"
        if not labels.is_file():
            raise SystemExit(f"{labels}: missing (expected lines 'runNN/test/itemNN.png runNN/training/classNN.png')")
        pairs = []
        for i, line in enumerate(labels.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise SystemExit(f"{labels}, line {i}: expected two paths, got {line!r}")
            item, cls = (folder / p for p in parts)
            for p in (item, cls):
                if not p.is_file():
                    raise SystemExit(f"{labels}, line {i}: {p} does not exist")
            pairs.append((item, cls))
        runs.append((run, pairs))
    if not runs:
        raise SystemExit(f"{folder}: no runNN folders")
    return runs


def score_runs(runs, embedder, size: int, scratch: Path, batch: int) -> tuple[float, int, list[float]]:
    """(accuracy, trials, per-run accuracy): each item against all of its run's training classes."""
    scratch.mkdir(parents=True, exist_ok=True)
    per_run, hits = [], 0
    for run, pairs in runs:
        classes = sorted(p for p in (run / "training").glob("*.png"))
        items = [item for item, _ in pairs]
        paths = []
        for k, p in enumerate(classes + items):
            jpg = scratch / f"{run.name}_{k:03d}.jpg"
            write_jpeg(jpg, prepare(p, size))
            paths.append(str(jpg))
        vectors = embedder.encode_files(paths, size, batch, progress=False)
        S = embedder.similarity(vectors[len(classes):], vectors[:len(classes)])
        answer = [classes[i] for i in np.argmax(S, axis=1)]
        right = [a.resolve() == c.resolve() for a, (_, c) in zip(answer, pairs)]
        per_run.append(float(np.mean(right)))
        hits += sum(right)
    trials = sum(len(p) for _, p in runs)
    return hits / trials, trials, per_run


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="the omniglot folder (images_background_small1/2)")
    ap.add_argument("--train", default="small1", help="background sets to train on, e.g. small1 or small1,small2")
    ap.add_argument("--eval", default="small2", help="background set whose held-out alphabets make the runs")
    ap.add_argument("--holdout", default="", help="alphabets kept out of training and evaluated (comma-separated)")
    ap.add_argument("--runs", type=Path, help="score these runs (original one-shot format) instead of building them")
    ap.add_argument("--make-runs", type=Path, help="write the built runs here (original format), then score them")
    ap.add_argument("--n-runs", type=int, default=20)
    ap.add_argument("--n-way", type=int, default=20)
    ap.add_argument("--minutes", type=float, default=12.0, help="CPU training budget (train.max_minutes)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "whaleid-bench-omniglot")
    ap.add_argument("--image-size", type=int, default=105)
    ap.add_argument("--head", default="siamese", help="any whaleid head (siamese, triplet, arcface, ...)")
    ap.add_argument("--backbone", default="EfficientNetLite0", help="tiny: from scratch, the earlier default")
    ap.add_argument("--weights", default="imagenet", help="imagenet | none | a weights file")
    ap.add_argument("--head-epochs", type=int, default=2, help="pretrained: epochs with the backbone frozen")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="any other whaleid setting, e.g. --set train.learning_rate=0.0005")
    args = ap.parse_args(argv)

    trained_sets = [s.strip() for s in args.train.split(",") if s.strip()]
    train_alpha = alphabets(args.data, trained_sets)
    holdout = [h.strip() for h in args.holdout.split(",") if h.strip()]
    unknown = [h for h in holdout if h not in train_alpha and h not in alphabets(args.data, [args.eval])]
    if unknown:
        raise SystemExit(f"--holdout {', '.join(unknown)}: not an alphabet of the training or --eval sets")
    eval_alpha = {a: f for a, f in alphabets(args.data, [args.eval]).items()
                  if a not in train_alpha or a in holdout}
    eval_alpha.update({a: train_alpha[a] for a in holdout if a in train_alpha})
    for a in holdout:
        train_alpha.pop(a, None)
    if not args.runs and not eval_alpha:
        raise SystemExit(f"every alphabet of {args.eval} is trained on: keep some out with --holdout A,B or score "
                         f"--runs DIR")
    pretrained = args.weights != "none"
    overrides = [
        f"model.head={args.head}", f"model.backbone={args.backbone}", f"model.weights={args.weights}",
        "model.pooling=global" if pretrained else "model.pooling=avg2x2",
        "model.dropout=0.0", "model.embedding_size=256", f"model.bn_momentum={0.0 if pretrained else 0.9}",
        f"model.freeze_bn={str(pretrained).lower()}", f"train.head_epochs={args.head_epochs if pretrained else 0}",
        f"run.image_size={args.image_size}", f"run.seed={args.seed}",
        "train.batch_size=64", "train.photos_per_id=4", "train.epochs=1000", "train.patience=15",
        f"train.learning_rate={0.0002 if pretrained else 0.001}", "train.hard_negatives=0.5", "train.online_augment=true", "train.strategy=none", "train.precision=float32",
        f"train.max_minutes={args.minutes}", "predict.batch_size=128", *args.overrides]
    cfg = config.load(None, tuple(overrides))
    shown = {k: config.get(cfg, k) for k in ("model.head", "model.backbone", "model.weights", "train.head_epochs",
                                              "model.pair_features", "model.embedding_size",
                                              "run.image_size", "train.batch_size", "train.photos_per_id",
                                              "train.learning_rate", "train.hard_negatives", "train.online_augment",
                                              "train.patience", "train.max_minutes")}
    print("settings: " + " ".join(f"{k}={v}" for k, v in shown.items()))
    print(f"train alphabets ({'+'.join(trained_sets)}): {', '.join(train_alpha)}")
    print(f"evaluation: {'runs in ' + str(args.runs) if args.runs else f'{args.n_runs} within-alphabet {args.n_way}-way runs from ' + ', '.join(eval_alpha)}")

    args.work.mkdir(parents=True, exist_ok=True)
    record = args.work / "bench_omniglot.json"
    new = json.dumps({"train": sorted(str(p) for p in train_alpha.values())}, indent=1)
    if not record.exists() or record.read_text() != new:
        record.write_text(new)
    stages = make_stages(args.data, train_alpha, record)
    session = Session(cfg=cfg, work=args.work, data=args.data, stages=stages, workers=1, progress=False,
                      echo=lambda m: print(m, flush=True))
    t0 = time.time()
    try:
        session.run(stages)
    except StageError as e:
        raise SystemExit(f"StageError: {e}")
    m = session.manifest("train")
    minutes = pickle.loads((args.work / "train" / "MODEL_TIME.pickle").read_bytes()) / 60

    from whaleid.learning import model as models
    from whaleid.inference.embedding import Embedder
    embedder = Embedder(models.load_model(args.work / "train" / "model.keras"))
    if args.runs:
        runs_dir, notes = args.runs, []
    else:
        runs_dir = args.make_runs or args.work / f"runs-{args.eval}-{args.n_way}way-seed{args.seed}"
        if runs_dir.exists() and any(runs_dir.iterdir()) and not args.make_runs:
            shutil.rmtree(runs_dir)
        elif args.make_runs and runs_dir.exists() and any(runs_dir.iterdir()):
            raise SystemExit(f"--make-runs {runs_dir} exists and is not empty")
        notes = build_runs(runs_dir, eval_alpha, args.n_runs, args.n_way, args.seed)
    for n in notes:
        print("note: " + n)
    runs = read_runs(runs_dir)
    acc, trials, per_run = score_runs(runs, embedder, args.image_size, args.work / "scored", 128)
    n_way = len(list((runs[0][0] / "training").glob("*.png")))
    counts = m["counts"]
    print(f"train: {counts['epochs']} epochs (best {counts['best_epoch']}, val_map5 {counts.get('best_val_map5')}), "
          f"{counts.get('images_per_second')} img/s")
    print(f"runs: {runs_dir} ({len(runs)} runs, {trials} trials, per run {min(per_run):.2f}..{max(per_run):.2f})")
    print(f"RESULT head={args.head} one_shot_{n_way}way_accuracy={acc:.4f} chance={1 / n_way:.4f} "
          f"training_minutes={minutes:.1f} wall_minutes={(time.time() - t0) / 60:.1f}")
    return acc


if __name__ == "__main__":
    main()
