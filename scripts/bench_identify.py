"""How long `whaleid identify` takes for a catalogue of 25,000 photos and a batch of 1,000 new photos
on this machine (issue 24), on a synthetic catalogue, measured on a fraction and extrapolated.

    python scripts/bench_identify.py --dir /tmp/bench_identify [--config cpu] [--batch 1000] [--workers 2]

Setup (not timed, kept in --dir for a rerun): `whaleid synth` (--ids x uniform:--photos), preprocess and
a one-epoch training with --config (a model's quality does not change its speed). Then, timed:
  1. the gallery stage (the catalogue's vectors, computed once per model) on the synthetic catalogue's
     files: seconds per file, times the files of a 25,000-photo catalogue (4 per photo with
     predict.gallery_tta = true, as configs/cpu.toml has it; 1 otherwise); with --gallery-files N, the
     embedding alone (the stage's work) is also timed on N files (the catalogue's, cycled), a larger
     fraction, and that rate is the one extrapolated;
  2. one batch of --batch new photos (the synthetic test photos, copied under new names until there are
     enough): the whole identify batch stage (boxes, crops, TTA scores, best matching photos, review.html),
     against the small catalogue;
  3. what the batch costs more against 25,000 photos than against the small catalogue: the head's
     similarity and the per-id maximum for every TTA version, and the best-photo search, on random unit
     vectors of the model's embedding size (the only parts of a batch that grow with the catalogue).
Total for a first batch = 1 (extrapolated) + 2 (extrapolated to 1,000 photos when --batch is smaller) + 3;
a later batch with the same model = 2 + 3 (the gallery is cached). Prints each part with its inputs.
With --rerank, on a copy of the work folder evaluated with rerank.method = local (keypoints stage and
the fusion, not timed): the batch re-ranked by local features. Matching a query with a candidate id
costs per photo of that id, not per catalogue photo: it grows with photos per id, not with the catalogue.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
CATALOGUE, BATCH = 25_000, 1_000


def whaleid(*args) -> str:
    cmd = [sys.executable, "-m", "whaleid.cli", *map(str, args)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def setup(d: Path, args) -> Path:
    data, work = d / "data", d / "work"
    if not (data / ".complete").exists():
        shutil.rmtree(data, ignore_errors=True)
        whaleid("synth", "--out", data, "--ids", args.ids, "--photos", f"uniform:{args.photos}", "--seed", 0,
                "--workers", args.workers, "--quiet")
        (data / ".complete").touch()
    whaleid("train", "--data", data, "--work", work, "--config", args.config, "--set", "train.epochs=1",
            "--set", "train.head_epochs=0", "--set", "split.unseen_ids=0.0", "--workers", args.workers, "--quiet")
    return work


def batch_folder(d: Path, n: int) -> Path:
    folder = d / f"batch{n}"
    if not folder.is_dir():
        tests = sorted((d / "data" / "test").iterdir())
        tmp = d / f".batch{n}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for i in range(n):
            shutil.copyfile(tests[i % len(tests)], tmp / f"{i // len(tests)}_{tests[i % len(tests)].name}")
        tmp.rename(folder)
    return folder


def growth(work: Path, gallery_files: int, small: int, photos: int, versions: int, top: int) -> tuple[float, int]:
    """Seconds the batch's catalogue-sized parts take at `gallery_files` minus at `small` files."""
    from whaleid.pipeline.files import quiet_native_startup
    with quiet_native_startup():  # TensorFlow's load-time lines
        from whaleid.inference.ranking import best_photos
        from whaleid.learning import model as models
        from whaleid.similarity.gallery import GalleryScorer
        from whaleid.inference.embedding import Embedder
    embedder = Embedder(models.load_model(work / "train" / "model.keras"))
    dim = int(np.load(work / "gallery" / "vectors.npy").shape[1])
    rng = np.random.default_rng(0)

    def timed(n: int) -> float:
        G = rng.normal(size=(n, dim)).astype(np.float32)
        G /= np.linalg.norm(G, axis=1, keepdims=True)
        ids = np.array([f"id{i // 5}" for i in range(n)])  # ~5 files per id
        Q = rng.normal(size=(photos * versions, dim)).astype(np.float32)
        Q /= np.linalg.norm(Q, axis=1, keepdims=True)
        scorer = GalleryScorer(lambda x: x, embedder.similarity, G, ids)
        t = time.perf_counter()
        for s in range(0, len(Q), 256):  # predict.batch_size x 4 versions per call
            scores = scorer.scores(Q[s:s + 256])
            np.argsort(-scores, axis=1)[:, :top]
        cands = [list(scorer.classes[:top])] * photos
        best_photos(embedder.similarity, Q[:photos], G, ids, cands)
        return time.perf_counter() - t

    return timed(gallery_files) - timed(small), dim


def embed_rate(work: Path, settings: dict, n: int) -> float:
    """Seconds per file of the catalogue's embedding (the gallery stage's work) over n files."""
    import pandas as pd
    from whaleid.pipeline.files import quiet_native_startup
    with quiet_native_startup():
        from whaleid.learning import model as models
        from whaleid.inference.embedding import Embedder
    files = pd.read_csv(work / "gallery" / "gallery.csv", dtype=str).File
    paths = [str(work / "augment" / "images" / files[i % len(files)]) for i in range(n)]
    embedder = Embedder(models.load_model(work / "train" / "model.keras"))
    t = time.perf_counter()
    embedder.encode_files(paths, settings["run"]["image_size"], settings["predict"]["batch_size"], progress=False)
    return (time.perf_counter() - t) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_identify"))
    ap.add_argument("--config", default="cpu")
    ap.add_argument("--ids", type=int, default=50)
    ap.add_argument("--photos", type=int, default=10, help="photos per synthetic individual")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gallery-files", type=int, default=0, help="also time the embedding of this many files")
    ap.add_argument("--rerank", action="store_true", help="batches re-ranked by local features (rerank.method = local)")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    work = setup(args.dir, args)
    if args.rerank:
        copy = args.dir / "work_rerank"
        if not copy.is_dir():
            shutil.copytree(work, copy)
        whaleid("evaluate", "--work", copy, "--set", "rerank.method=local", "--workers", args.workers, "--quiet")
        work = copy
    print(f"setup (synth + preprocess + 1 epoch, not part of the timing): {time.perf_counter() - t0:.0f} s")
    folder = batch_folder(args.dir, args.batch)
    shutil.rmtree(work / "identify", ignore_errors=True)
    shutil.rmtree(work / "gallery", ignore_errors=True)
    shutil.rmtree(work / "gallery_cache", ignore_errors=True)  # vectors evaluate embedded: time the embedding
    t = time.perf_counter()
    whaleid("identify", "--work", work, "--photos", folder, "--workers", args.workers, "--quiet")
    wall = time.perf_counter() - t
    gallery = json.loads((work / "gallery" / "manifest.json").read_text())
    batch = json.loads((work / "identify" / folder.name / "manifest.json").read_text())
    cfg = json.loads((work / "whaleid.json").read_text())
    from whaleid.pipeline import config
    settings = config.load(config.resolve(cfg["config"]), tuple(cfg["set"]))
    per_photo_files = 4 if settings["predict"]["gallery_tta"] else 1
    files = gallery["counts"]["files"]
    g_rate = stage_rate = gallery["seconds"] / files
    if args.gallery_files:
        g_rate = embed_rate(work, settings, args.gallery_files)
    g_full = g_rate * CATALOGUE * per_photo_files
    photos = batch["counts"]["photos"]
    b_full = batch["seconds"] / photos * BATCH
    versions = 4 if settings["predict"]["tta"] else 1
    extra, dim = growth(work, CATALOGUE * per_photo_files, files, BATCH, versions, settings["identify"]["top"])
    size = (work / "identify" / folder.name / "review.html").stat().st_size / 1e6
    print(f"config {cfg['config']} ({settings['model']['backbone']}, {settings['run']['image_size']} px, "
          f"rerank.method {settings['rerank']['method']}, "
          f"{settings['boxes']['detector']} boxes, gallery_tta {settings['predict']['gallery_tta']}), "
          f"--workers {args.workers}, {subprocess.check_output(['nproc']).decode().strip()} cores")
    print(f"1. gallery stage: {files} files in {gallery['seconds']:.1f} s ({stage_rate * 1000:.1f} ms/file)"
          + (f"; the embedding alone on {args.gallery_files:,} files: {g_rate * 1000:.1f} ms/file"
             if args.gallery_files else "")
          + f" -> {CATALOGUE:,} photos x {per_photo_files} files: {g_full / 60:.1f} min (extrapolated)")
    print(f"2. batch stage: {photos} photos in {batch['seconds']:.1f} s ({batch['seconds'] / photos:.3f} s/photo) -> "
          f"{BATCH:,} photos: {b_full / 60:.1f} min" + (" (extrapolated)" if photos < BATCH else "")
          + f"; identify command wall time {wall:.1f} s; review.html {size:.1f} MB")
    print(f"3. catalogue-size growth of a batch ({versions} TTA versions, {dim}-d vectors, "
          f"{CATALOGUE * per_photo_files:,} vs {files} gallery files): +{extra:.1f} s")
    print(f"total, first batch of {BATCH:,} against {CATALOGUE:,} photos: {(g_full + b_full + extra) / 60:.1f} min; "
          f"a later batch (gallery cached): {(b_full + extra) / 60:.1f} min")


if __name__ == "__main__":
    main()
