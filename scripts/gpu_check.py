"""One command for a machine with an NVIDIA GPU: does whaleid's GPU path work, and how fast is it?

    python scripts/gpu_check.py [--work DIR] [--ids 200] [--photos 10] [--epochs 3] [--weights none|imagenet]

Builds a synthetic set (~2,000 photos: --ids x --photos, plus new whales and test photos), then runs
the real pipeline in this process: preprocess, train with configs/default.toml's backbone
(InceptionResNetV2) at 224 px, train.precision = auto (mixed float16 on a GPU) and the default
strategy (MirroredStrategy when there are several GPUs) for --epochs epochs, evaluate, predict, and
scores the submission. Prints one PASS/FAIL line per check and the numbers:

    train img/s, predict img/s (TTA versions per second), peak GPU memory, MAP@5

Unattended: no prompt, exits non-zero on any failure; about 5 minutes on one recent GPU. It cannot
run on a machine without a GPU (it says so and exits 2). --weights none by default: the check needs
no download (imagenet: keras' download, which needs the internet).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    RESULTS.append((name, bool(ok), detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return bool(ok)


def whaleid(*args) -> None:
    """A whaleid command in this process (so GPU memory statistics cover it); raises on failure."""
    from whaleid.cli import main
    main([str(a) for a in args], standalone_mode=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="default: a new folder in the temp dir")
    ap.add_argument("--ids", type=int, default=200)
    ap.add_argument("--photos", type=int, default=10, help="photos per id")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--weights", default="none", help="none | imagenet | a weights file")
    ap.add_argument("--batch", type=int, default=100, help="train.batch_size (default.toml's)")
    args = ap.parse_args(argv)

    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        print("FAIL no GPU visible to TensorFlow (tf.config.list_physical_devices('GPU') is empty): "
              "run this on a machine with an NVIDIA GPU and a CUDA build of TensorFlow", flush=True)
        return 2
    print(f"GPUs: {len(gpus)} ({', '.join(g.name for g in gpus)}); TensorFlow {tf.__version__}", flush=True)

    root = args.work or Path(tempfile.mkdtemp(prefix="whaleid-gpu-check-"))
    data, work = root / "data", root / "work"
    sets = [f"train.epochs={args.epochs}", f"train.patience={args.epochs}", f"train.batch_size={args.batch}",
            f"model.weights={args.weights}", "train.precision=auto", "train.strategy=auto", "run.image_size=224"]
    common = ["--work", work, "--config", "default", "--quiet"] + [a for s in sets for a in ("--set", s)]
    t0 = time.time()
    try:
        from whaleid import submission, synth
        if not (data / ".complete").exists():
            synth.generate(data, ids=args.ids, seed=0, workers=os.cpu_count() or 1,
                           photos=f"uniform:{args.photos}", progress=False)
            (data / ".complete").touch()
        t = time.time()
        whaleid("preprocess", "--data", data, *common)
        check("preprocess", True, f"{time.time() - t:.0f}s")

        t = time.time()
        whaleid("train", *common)
        m = json.loads((work / "train" / "manifest.json").read_text())
        counts = m["counts"]
        check("train", counts.get("epochs", 0) >= 1,
              f"{time.time() - t:.0f}s, {counts.get('epochs')} epochs, {counts.get('images_per_second')} img/s, "
              f"{counts.get('replicas')} replica(s)")
        mixed = "mixed_float16" in (work / "train" / "manifest.json").read_text() or _policy_used(work)
        check("mixed precision on the GPU", mixed, "train.precision = auto chose mixed_float16")

        t = time.time()
        whaleid("evaluate", *common, "--tune-threshold")
        check("evaluate", True, f"{time.time() - t:.0f}s")
        t = time.time()
        whaleid("predict", *common)
        p = json.loads((work / "predict" / "manifest.json").read_text())
        versions = p["counts"]["images"] * 4
        check("predict", True, f"{time.time() - t:.0f}s, {versions / max(p['seconds'], 1e-9):.0f} TTA versions/s "
                               f"(model load and trace included)")
        score = submission.score_files(work / "submission.csv", data / "solution.csv")
        check("submission", score["map5"] > score["all_new_whale_map5"],
              f"MAP@5 {score['map5']:.4f} vs all-new_whale {score['all_new_whale_map5']:.4f}")
        peak = max(tf.config.experimental.get_memory_info(f"GPU:{i}")["peak"] for i in range(len(gpus)))
        check("peak GPU memory", True, f"{peak / 2 ** 30:.2f} GiB")
    except Exception as e:  # noqa: BLE001  (unattended: every failure is a FAIL line and a non-zero exit)
        traceback.print_exc()
        check("pipeline", False, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    total = time.time() - t0
    check("within 8 minutes", total < 480, f"{total / 60:.1f} min")
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"gpu_check: {len(RESULTS) - len(failed)} PASS, {len(failed)} FAIL; work folder {root}", flush=True)
    return 1 if failed else 0


def _policy_used(work: Path) -> bool:
    """Whether the saved model's layers compute in float16 (mixed precision was on)."""
    from whaleid import model as models
    net = models.load_model(work / "train" / "model.keras")
    return any(getattr(layer, "compute_dtype", "") == "float16" for layer in models.find_backbone(net).layers)


if __name__ == "__main__":
    sys.exit(main())
