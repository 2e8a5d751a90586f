"""Open-set re-identification benchmark: every head, same data, same CPU budget.

    python scripts/bench_reid.py [--src ROOT] [--extra-train ROOT2 ...] [--heads softmax,siamese,triplet]
                                 [--minutes 4] [--seeds 0,1,2] [--boxes whole|subject]
                                 [--backbone EfficientNetLite0 --weights imagenet | --scratch] [--set K=V] ...

ROOT holds one folder per individual (../shared/data/nyala, ../shared/data/lion, or any catalogue).
`whaleid import-folders` turns it into the Kaggle layout with a solution.csv (--new-fraction of the
individuals held out entirely as new_whale); `whaleid preprocess` runs once (whole-photo boxes from
import-folders' boxes.csv); then for each head, in its own copy of that work folder: train (with
train.max_minutes = --minutes), evaluate --tune-threshold, predict, and the submission is scored
against solution.csv. Prints the settings, then one line per head:

    head=... MAP@5=... top-1(closed)=... baseline=... minutes=...

--extra-train ROOT2 (repeatable): ROOT2's individuals are learnt from only (import-folders
--train-only): never tested, and the ids held out to tune new_whale come from them first. --seeds
0,1,2: the whole benchmark once per seed (the seed draws the new individuals, the queries, the split
and the network's initialisation), then each head's mean and spread over the seeds:

    summary head=... seeds=3 MAP@5=mean ± sd top-1(closed)=mean ± sd minutes=mean

(MAP@5: open set, new individuals among the test photos; top-1(closed): for the test photos of known
individuals, is the best-ranked known id right (new_whale ignored), as published re-ID accuracies are
measured; baseline: the all-new_whale submission's MAP@5; minutes: training time.) Pretrained weights
(the default: EfficientNet-Lite0, ImageNet, offline) fine-tune: --head-epochs epochs with the backbone
frozen, then the whole network at --learning-rate; --scratch trains MobileNetV3Small from random
weights with the settings that work from scratch. The new_whale threshold is
tuned on validation sampled to the test's share of new whales (evaluate.new_whale_share). Everything is cached in
--work (default a folder in the system temp dir): a rerun retrains nothing that is up to date.
"""
from __future__ import annotations

import argparse
import json
import statistics
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from whaleid.learning import heads as head_registry  # noqa: E402
from whaleid.metrics import submission
from whaleid.datasets.import_folders import FolderError, import_folders  # noqa: E402
from whaleid.data.tables import NEW_WHALE  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
HEADS = head_registry.names()


def settings(args, seed: int) -> list[str]:
    common = [f"run.image_size={args.image_size}", f"run.seed={seed}", "model.pooling=global",
              "model.dropout=0.2", "split.unseen_ids=0.2", "train.batch_size=32", "train.photos_per_id=4",
              "train.epochs=1000", f"train.patience={args.patience}", "train.online_augment=true",
              "train.strategy=none", "train.precision=float32", f"train.max_minutes={args.minutes}",
              "predict.batch_size=64"]
    if args.scratch:
        model = ["model.backbone=MobileNetV3Small", "model.weights=none", "model.bn_momentum=0.9",
                 "train.learning_rate=0.001", "train.head_epochs=0"]
    else:
        model = [f"model.backbone={args.backbone}", f"model.weights={args.weights}", "model.bn_momentum=0.0",
                 f"model.freeze_bn={str(args.freeze_bn).lower()}", f"train.head_epochs={args.head_epochs}",
                 "train.head_learning_rate=0.001", f"train.learning_rate={args.learning_rate}"]
    return common + model + args.overrides


def closed_set_top1(submission_file: Path, solution_file: Path) -> tuple[float, int]:
    """(share, count) of the known individuals' test photos whose best-ranked known id is right."""
    sub = pd.read_csv(submission_file, dtype=str, keep_default_na=False).set_index("Image").Id
    sol = pd.read_csv(solution_file, dtype=str, keep_default_na=False)
    known = sol[sol.Id != NEW_WHALE]
    first = [next((label for label in sub[i].split() if label != NEW_WHALE), None) for i in known.Image]
    hits = [f == t for f, t in zip(first, known.Id)]
    return (sum(hits) / len(hits) if hits else float("nan")), len(hits)


def flagged_new(submission_file: Path, solution_file: Path) -> float:
    """Share of the known individuals' test photos answered new_whale first (a researcher told "new")."""
    sub = pd.read_csv(submission_file, dtype=str, keep_default_na=False).set_index("Image").Id
    sol = pd.read_csv(solution_file, dtype=str, keep_default_na=False)
    known = sol[sol.Id != NEW_WHALE]
    return float(sum(sub[i].split()[0] == NEW_WHALE for i in known.Image) / max(1, len(known)))


def whaleid(*args, log: Path) -> None:
    cmd = [sys.executable, "-m", "whaleid.cli", *map(str, args)]
    with open(log, "a") as f:
        f.write("$ whaleid " + " ".join(map(str, args)) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if proc.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"whaleid {args[0]} failed (see {log}):\n" + "\n".join(tail))


def seed_summary(results: dict[int, list[tuple]]) -> list[str]:
    """One line per head: mean and spread (sample sd, and the standard error of the mean) of MAP@5 and
    closed-set top-1 over the seeds. results: seed -> [(head, score, minutes, top1), ...]."""
    lines = []
    heads = list(dict.fromkeys(r[0] for rows in results.values() for r in rows))
    for head in heads:
        rows = [r for seed in sorted(results) for r in results[seed] if r[0] == head]
        parts = [f"summary head={head} seeds={len(rows)}"]
        for name, values in (("MAP@5", [r[1]["map5"] for r in rows]), ("top-1(closed)", [r[3] for r in rows])):
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            parts.append(f"{name}={statistics.fmean(values):.4f} ± {sd:.4f} (se {sd / len(values) ** 0.5:.4f}; "
                         f"{' '.join(f'{v:.4f}' for v in values)})")
        parts.append(f"minutes={statistics.fmean(r[2] for r in rows):.1f}")
        lines.append(" ".join(parts))
    return lines


SIGHTING = r"^(\d+)_"  # nyala: <sighting>_leftphoto.jpg and <sighting>_rightphoto.jpg, taken together
FLANK = r"_(left|right)photo"  # nyala: the flank a photo shows


def side_pattern(value: str, roots: list[Path]) -> str | None:
    """--side: a regex as given ("" or none: no sides), or with "auto" FLANK when some photo's name has it."""
    if value != "auto":
        return None if value in ("", "none") else value
    names = [p.name for r in roots for p in Path(r).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    return FLANK if any(re.search(FLANK, n) for n in names) else None


def encounter_pattern(value: str, roots: list[Path]) -> str | None:
    """--encounter: a regex as given, or with "auto" SIGHTING when every photo's name matches it."""
    if value != "auto":
        return value or None
    names = [p.name for r in roots for p in Path(r).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    return SIGHTING if names and all(re.match(SIGHTING, n) for n in names) else None


def forgotten(work: Path, sets: list[str]) -> list[str]:
    """--unset for every --set value WORK remembers from an earlier benchmark run that this run does not
    pass (a work folder remembers them), so each run's settings are exactly the ones it prints; the
    box table (import-folders' boxes.csv) and the head stay."""
    record = work / "whaleid.json"
    if not record.is_file():
        return []
    keep = {s.split("=", 1)[0] for s in sets} | {"boxes.import_csv", "model.head"}
    old = [s.split("=", 1)[0] for s in json.loads(record.read_text()).get("set", [])]
    return [a for k in old if k not in keep for a in ("--unset", k)]


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {text}: expected integers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {text}: expected distinct integers, e.g. 0,1,2")
    return seeds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=SHARED / "nyala", help="ROOT/<individual>/*.jpg|png")
    ap.add_argument("--extra-train", type=Path, action="append", default=[], metavar="ROOT2",
                    help="more individuals to learn from, never tested (repeatable)")
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--minutes", type=float, default=4.0, help="training budget per head (train.max_minutes)")
    ap.add_argument("--new-fraction", type=float, default=0.3)
    ap.add_argument("--query-fraction", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=None, help="one seed (as --seeds N)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds: each runs the whole benchmark")
    ap.add_argument("--boxes", choices=("whole", "subject"), default="whole",
                    help="whole photos (import-folders' boxes.csv) or boxes.detector=subject")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--backbone", default="EfficientNetLite0")
    ap.add_argument("--weights", default="imagenet", help="imagenet | none | a weights file")
    ap.add_argument("--scratch", action="store_true", help="MobileNetV3Small from random weights instead")
    ap.add_argument("--head-epochs", type=int, default=2, help="pretrained: epochs with the backbone frozen")
    ap.add_argument("--learning-rate", type=float, default=0.0003, help="pretrained: the whole network's rate")
    ap.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=True,
                    help="pretrained: batch-norm layers keep the ImageNet statistics")
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--encounter", default="auto", metavar="REGEX",
                    help="photos' encounters, as import-folders --encounter takes them; auto: '^(\\d+)_' when every "
                         "file name matches it (nyala's <sighting>_leftphoto.jpg), else none")
    ap.add_argument("--side", default="auto", metavar="REGEX",
                    help="photos' sides, as import-folders --side takes them; auto: '_(left|right)photo' when names "
                         "have it (nyala); none: no sides")
    ap.add_argument("--leaky", action="store_true",
                    help="the protocol before encounters: queries chosen photo by photo, so a query may meet its own "
                         "sighting's other photo in the gallery")
    ap.add_argument("--work", type=Path, default=None, help="default: <tmp>/whaleid-bench-reid-<src name>")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="any other whaleid setting for every head, e.g. --set model.pair_features=rich")
    args = ap.parse_args(argv)
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    bad = [h for h in heads if h not in HEADS]
    if bad:
        raise SystemExit(f"--heads {', '.join(bad)}: expected some of {', '.join(HEADS)}")
    seeds = [args.seed] if args.seed is not None else parse_seeds(args.seeds)
    args.encounter = None if args.leaky else encounter_pattern(args.encounter, [args.src, *args.extra_train])
    args.side = side_pattern(args.side, [args.src, *args.extra_train])
    print(f"protocol: {'leaky (photo by photo)' if args.encounter is None else 'across encounters, ' + repr(args.encounter)}"
          f"; sides: {repr(args.side) + ' (predict.sides decides their use)' if args.side else 'unknown'}")
    kind = "scratch" if args.scratch else f"{args.backbone}-{Path(args.weights).name}"
    work = args.work or Path(tempfile.gettempdir()) / f"whaleid-bench-reid-{args.src.resolve().name}-{kind}"
    results = {}
    for seed in seeds:
        results[seed] = run_seed(args, heads, seed, work if len(seeds) == 1 else work / f"seed{seed}")
    if len(seeds) > 1:
        for line in seed_summary(results):
            print(line, flush=True)
    return results


def run_seed(args, heads: list[str], seed: int, work: Path) -> list[tuple]:
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    extra = [r.resolve() for r in args.extra_train]
    print(f"src: {args.src} -> {work}; new-fraction {args.new_fraction}, query-fraction {args.query_fraction}, "
          f"seed {seed}" + "".join(f"; extra-train {r}" for r in extra))

    data = work / "data"
    wanted = {"src": str(args.src.resolve()), "new_fraction": args.new_fraction,
              "query_fraction": args.query_fraction, "seed": seed}
    if extra:
        wanted["train_only"] = [str(r) for r in extra]
    if args.encounter is not None:
        wanted["encounter"] = args.encounter
    if args.side is not None:
        wanted["side"] = args.side
    record = work / "import.json"
    if not (record.exists() and json.loads(record.read_text()) == wanted and data.is_dir()):
        shutil.rmtree(data, ignore_errors=True)
        try:
            summary = import_folders(args.src, data, args.new_fraction, args.query_fraction, seed, progress=False,
                                     train_only=extra, encounter=args.encounter, side=args.side)
        except FolderError as e:
            raise SystemExit(str(e))
        record.write_text(json.dumps(wanted))
        (work / "import_summary.json").write_text(json.dumps(summary))
    summary = json.loads((work / "import_summary.json").read_text())
    print("data: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    # the new_whale threshold is tuned on validation sampled to the test's share of new individuals'
    # photos (known from --new-fraction, as Kaggle's ~27% was known from the leaderboard)
    share = summary["test_new_whale"] / max(1, summary["test_new_whale"] + summary["test_queries"])
    sets = settings(args, seed) + [f"evaluate.new_whale_share={share:.2f}"]
    boxes = ["--boxes", data / "boxes.csv"] if args.boxes == "whole" else []
    if args.boxes == "subject":
        sets.append("boxes.detector=subject")
    print("settings: " + " ".join(sets) + f" (boxes: {args.boxes})")

    base = work / "base"
    t = time.time()
    whaleid("preprocess", "--data", data, "--work", base, *boxes, "--quiet",
            *[a for s in sets for a in ("--set", s)], *forgotten(base, sets), log=log)
    report = json.loads((base / "split" / "split_report.json").read_text())
    print(f"preprocess: {time.time() - t:.0f}s; split {report['photos']}, {report['ids_in_training']} ids trained, "
          f"{report['unseen_ids']} held out to tune new_whale")

    results = []
    for head in heads:
        hw = work / head
        if not hw.exists():
            shutil.copytree(base, hw, symlinks=True)  # copy2 keeps mtimes: the copied stages stay cached
        t = time.time()
        common = ["--work", hw, "--quiet", "--set", f"model.head={head}", *[a for s in sets for a in ("--set", s)]]
        common += forgotten(hw, sets)
        whaleid("train", *common, log=log)
        whaleid("evaluate", *common, "--tune-threshold", log=log)
        whaleid("predict", *common, log=log)
        score = submission.score_files(hw / "submission.csv", data / "solution.csv")
        minutes = pickle.loads((hw / "train" / "MODEL_TIME.pickle").read_bytes()) / 60
        counts = json.loads((hw / "train" / "manifest.json").read_text())["counts"]
        metrics = json.loads((hw / "evaluate" / "metrics.json").read_text())
        top1, n_known = closed_set_top1(hw / "submission.csv", data / "solution.csv")
        results.append((head, score, minutes, top1))
        print(f"head={head} MAP@5={score['map5']:.4f} top-1(closed)={top1:.4f} baseline={score['all_new_whale_map5']:.4f} "
              f"minutes={minutes:.1f}"
              f"  (open-set top-1 {score['top1']:.4f}, {score['images']} test photos, {n_known} of known ids; {counts['epochs']} epochs, best "
              f"{counts['best_epoch']}; validation MAP@5 {metrics['best_map5']:.4f} at threshold "
              f"{metrics['best_threshold']:.2f}, AUC {metrics['verification']['auc']}; known photos flagged new "
              f"{flagged_new(hw / 'submission.csv', data / 'solution.csv'):.3f}; wall {(time.time() - t) / 60:.1f} min)",
              flush=True)
    return results


if __name__ == "__main__":
    main()
