"""Every stage whaleid runs, declared in one place: the pipeline's (preprocess, train, the keypoint
stages, evaluate, predict) and identify's (gallery, gallery_added, identify/<batch>). Each states its
inputs (data files, upstream stages, files named by settings), the settings it reads and the
artifacts it writes (pipeline/stage.py is the engine that caches them). Each stage's code lives in
its own module, named by a dotted path and imported only when the stage runs, so `whaleid status`
reads this page without loading TensorFlow.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from whaleid.pipeline.config import get as get_setting
from whaleid.pipeline.stage import Stage
from whaleid.pipeline.workfolder import read_record

from whaleid.similarity.fusion import CALIBRATION  # WORK/evaluate/calibration.json: re-ranking's fusion
from whaleid.similarity.threshold import TUNED  # WORK/tuned_threshold.json: `evaluate --tune-threshold`

CATALOGUE = "catalogue"          # WORK/catalogue/: the photos `identify --accept` added so far
ADDED = "added.csv"              # WORK/catalogue/added.csv: Image, Id, batch, photo, crop, decided, into
BATCHES = "identify"             # WORK/identify/<batch>/: identify's batches
# the settings boxes.detect_box_file takes, by the same names: the stage passes them on and fingerprints them
DETECT_SETTINGS = ("boxes.max_side", "boxes.detector", "boxes.grabcut_side", "boxes.grabcut_max_iter",
                   "boxes.min_fraction", "boxes.open_size")
TTA_SETTINGS = ("run.image_size", "run.seed", "augment.margin", "augment.crop_max", "augment.blur_sigma_max",
                "model.head", "predict.top_k", "predict.tta", "predict.merge", "predict.batch_size",
                "predict.gallery_tta", "new_whale.threshold", "new_whale.share", "train.flip_ids",
                "predict.mirror_is_same", "predict.sides")


def _box_file(value: str) -> Path | None:
    """A box CSV named by boxes.import_csv is an input by its content: a changed file reruns boxes, the
    same file at another path (a copied data folder) does not."""
    return Path(value).expanduser() if value else None


def _weights_file(value: str) -> Path | None:
    """A weights file named by model.weights is an input by its content: a changed file retrains."""
    return None if value.lower() == "none" or value == "imagenet" else Path(value).expanduser()


def _box_model(session) -> dict[str, Path]:
    """The cnn detector's fitted weights are an input by their content: weights refitted by
    scripts/fit_box_head.py rerun boxes, as a changed setting would."""
    if get_setting(session.cfg, "boxes.detector") != "cnn":
        return {}
    return {"box_head_weights.py": Path(__file__).parent / "preprocess" / "box_head_weights.py"}


def _tuned_file(session) -> dict[str, Path]:
    return {TUNED: session.work / TUNED} if (session.work / TUNED).exists() else {}


def _calibration_and_tuned(session) -> dict[str, Path]:
    """rerank.method = local fuses scores by evaluate's calibration (fitted on validation, never on
    test photos): its content is an input of predict."""
    out = _tuned_file(session)
    if get_setting(session.cfg, "rerank.method") != "none":
        out[CALIBRATION] = session.work / "evaluate" / CALIBRATION
    return {**out, **_keypoints(session, KEYPOINTS, TEST_KEYPOINTS)}


def _keypoints(session, *stages) -> dict[str, Path]:
    """Re-ranking reads the keypoint stages' features: by their content, as input files."""
    if get_setting(session.cfg, "rerank.method") == "none":
        return {}
    return {f"{s.name}.npz": session.work / s.name / s.artifacts[0] for s in stages}


def wanted(cfg: dict, needed: set[str]) -> set[str]:
    """The stages that the `needed` ones read by their settings, not as upstream stages: the keypoint
    stages when re-ranking (preprocess computes both ahead, as it does everything before training),
    the background stage when training on neutralised backgrounds."""
    out = {BACKGROUND.name} if get_setting(cfg, "train.background") != "none" and needed & {"split", "train"} else set()
    if get_setting(cfg, "rerank.method") == "none":
        return out
    return out | ({KEYPOINTS.name} if needed & {"split", "evaluate", "predict"} else set()) | \
        ({TEST_KEYPOINTS.name} if needed & {"split", "predict"} else set())


OPTIONAL = ("keypoints", "test_keypoints", "background")  # stages only some settings run


def unused(cfg: dict) -> set[str]:
    """The optional stages these settings never run (status says so instead of "missing")."""
    return set(OPTIONAL) - wanted(cfg, {"split", "train", "predict"})


def status_line(name: str, status, cfg: dict) -> str:
    """`whaleid status`'s line for one stage; an optional stage these settings never run says so
    rather than "missing"."""
    if status.done:
        m = status.manifest
        counts = ", ".join(f"{k} {v}" for k, v in m.get("counts", {}).items())
        return f"{name:<10} {status.state:<8} {m['finished']} ({m['seconds']:.1f}s) {counts}"
    if name in unused(cfg):
        why = "train.background is not none" if name == "background" else "rerank.method = local"
        return f"{name:<10} {'unused':<8} {status.reason}; runs only with {why}"
    return f"{name:<10} {status.state:<8} {status.reason}"


DEDUP = Stage(
    "dedup", "whaleid.preprocess.dedup:run",
    artifacts=("p2h.pickle", "h2ps.pickle", "h2p.pickle", "p2size.pickle", "images.csv", "train.csv",
               "known_answers.csv", "dedup_report.csv"),
    settings=("dedup.max_distance", "dedup.verify", "dedup.verify_mse"),
    data=("train.csv", "sample_submission.csv", "train/", "test/"))

FORMAT = Stage(
    "format", "whaleid.preprocess.formatting:run",
    artifacts=("train.csv", "new_whale.csv", "test.csv"),
    upstream=("dedup",))

BOXES = Stage(
    "boxes", "whaleid.preprocess.boxes:run",
    artifacts=("BB_TRAIN.csv", "BB_TEST.csv", "import_report.csv"),
    settings=DETECT_SETTINGS + ("boxes.import_csv",),
    data=("train/", "test/"), upstream=("format",), files=(("boxes.import_csv", _box_file),),
    extra_inputs=_box_model)

AUGMENT = Stage(
    "augment", "whaleid.preprocess.augment:run",
    artifacts=("images/", "TRAINING_FILE_FINAL.csv"),
    settings=("run.image_size", "run.seed", "augment.margin", "augment.crop_max", "augment.blur_sigma_max",
              "augment.jpeg_quality"),
    data=("train/",), upstream=("format", "boxes"))

SPLIT = Stage(
    "split", "whaleid.preprocess.split:run",
    artifacts=("split.csv", "train_files.csv", "val_files.csv", "split_report.json"),
    settings=("split.validation", "split.unseen_ids", "run.seed", "new_whale.share"),
    data=("train_only.csv", "encounters.csv"), upstream=("augment",))

# training crops with the background neutralised (preprocess/background.py), for train.background only
BACKGROUND = Stage(
    "background", "whaleid.preprocess.background:run",
    artifacts=("images/", "background_files.csv"), settings=("train.background", "augment.jpeg_quality"),
    upstream=("split", "augment"))


def _train_extras(session) -> dict[str, Path]:
    """train.background: the background stage's table; train.side_classes: the data folder's sides.csv
    (read by content, and only with those settings: a work folder without them is not made stale)."""
    out = {}
    if get_setting(session.cfg, "train.background") != "none":
        out["background_files.csv"] = session.dir(BACKGROUND.name) / "background_files.csv"
    data = session.data or (Path(d) if (d := read_record(session.work).get("data")) else None)
    if get_setting(session.cfg, "train.side_classes") and data is not None and (Path(data) / "sides.csv").is_file():
        out["sides.csv"] = Path(data) / "sides.csv"
    return out


TRAIN = Stage(
    "train", "whaleid.learning.train:run",
    artifacts=("model.keras", "classes.json", "HISTORY.pickle", "history.csv", "MODEL_TIME.pickle"),
    settings=("run.seed", "run.image_size", "model.*", "train.*"),
    upstream=("split", "augment"), files=(("model.weights", _weights_file),), extra_inputs=_train_extras)

# local features for rerank.method = local (preprocess/keypoints.py): the training photos' (gallery and
# validation queries, read by evaluate and predict) and the test photos' (predict only), apart so that
# a changed test photo never reruns evaluate. Neither is an upstream stage: evaluate and predict read
# them as input files only when re-ranking (and `wanted` has the commands run them first), so without
# re-ranking nothing changes for a work folder made before they existed.
KEYPOINT_SETTINGS = ("keypoints.*", "augment.margin", "train.flip_ids", "predict.mirror_is_same")
KEYPOINTS = Stage(
    "keypoints", "whaleid.preprocess.keypoints:run_train",
    artifacts=("keypoints.npz",), settings=KEYPOINT_SETTINGS, data=("train/",), upstream=("format", "boxes"))

TEST_KEYPOINTS = Stage(
    "test_keypoints", "whaleid.preprocess.keypoints:run_test",
    artifacts=("keypoints.npz",), settings=KEYPOINT_SETTINGS, data=("test/",), upstream=("format", "boxes"))

EVALUATE = Stage(
    "evaluate", "whaleid.inference.evaluate:run",
    artifacts=("metrics.json", "threshold_sweep.csv", "val_predictions.csv", CALIBRATION),
    settings=TTA_SETTINGS + ("evaluate.new_whale_share", "evaluate.one_shot", "rerank.*"),
    # read here, not through the split: sides need no retraining; train-only ids are never an answer
    data=("sides.csv", "train_only.csv"),
    upstream=("split", "augment", "train"), extra_inputs=lambda session: _keypoints(session, KEYPOINTS))

PREDICT = Stage(
    "predict", "whaleid.inference.predict:run",
    artifacts=("submission.csv", "predictions.csv"),
    settings=TTA_SETTINGS + ("rerank.*",),
    data=("sample_submission.csv", "test/", "train_only.csv", "encounters.csv", "sides.csv"),
    upstream=("dedup", "format", "boxes", "augment", "train"),
    extra_inputs=_calibration_and_tuned)

BY_COMMAND = {"preprocess": [DEDUP, FORMAT, BOXES, AUGMENT, SPLIT],
              "train": [TRAIN],
              "evaluate": [EVALUATE],
              "predict": [PREDICT]}
ALL = BY_COMMAND["preprocess"] + [BACKGROUND, TRAIN, KEYPOINTS, TEST_KEYPOINTS, EVALUATE, PREDICT]  # pipeline order


# ---------------------------------------------------------------- identify's stages (inference/identify.py)
# A researcher's batch of new photos against the catalogue the model was trained on. They come after
# every pipeline stage and are not a command's own stages: `whaleid identify` runs them on a trained
# work folder, without its data folder.
EMBED_SETTINGS = ("run.image_size", "predict.batch_size", "model.head")


def _catalogue_inputs(session) -> dict[str, Path]:
    folder = session.work / CATALOGUE
    return {f"{CATALOGUE}/{n}": folder / n for n in (ADDED, "crops") if (folder / n).exists()}


def train_only_file(work: Path) -> Path | None:
    """The train_only.csv of the data folder WORK was run with (`import-folders --train-only`: individuals
    learnt from only), when it is there: as in predict, they are never a candidate."""
    data = read_record(work).get("data")
    path = Path(data) / "train_only.csv" if data else None
    return path if path is not None and path.is_file() else None


def _train_only_file(session) -> dict[str, Path]:
    path = train_only_file(session.work)
    return {"train_only.csv": path} if path is not None else {}


def _batch_inputs(photos: Path, session) -> dict[str, Path]:
    """A batch reads its photos, what was accepted since training, the tuned threshold, the train-only
    ids, evaluate's calibration of the scores (review page), the catalogue's encounters and sides when
    the batch gives its own (DIR/encounters.csv, DIR/sides.csv), and with re-ranking the fusion and the catalogue's local features."""
    out = {"photos": photos, **_catalogue_inputs(session), **_tuned_file(session), **_train_only_file(session)}
    for name in ("metrics.json", "val_predictions.csv"):  # the scores' meaning (review.calibration)
        if (session.dir("evaluate") / name).exists():
            out[f"evaluate/{name}"] = session.dir("evaluate") / name
    if (photos / "encounters.csv").is_file() and (session.dir("split") / "split.csv").is_file():
        out["split.csv"] = session.dir("split") / "split.csv"  # the catalogue photos' encounters
    data = read_record(session.work).get("data")
    if (photos / "sides.csv").is_file() and data and (Path(data) / "sides.csv").is_file():
        out["sides.csv"] = Path(data) / "sides.csv"  # the catalogue photos' sides
    if get_setting(session.cfg, "rerank.method") == "local":
        out[CALIBRATION] = session.work / "evaluate" / CALIBRATION
        out["keypoints.npz"] = session.work / KEYPOINTS.name / KEYPOINTS.artifacts[0]
    return out


GALLERY = Stage(
    "gallery", "whaleid.inference.identify:gallery_run",
    artifacts=("gallery.csv", "vectors.npy"),
    settings=EMBED_SETTINGS + ("predict.gallery_tta", "train.flip_ids"), upstream=("augment", "train"))

GALLERY_ADDED = Stage(
    "gallery_added", "whaleid.inference.identify:added_run",
    artifacts=("gallery.csv", "vectors.npy"),
    settings=EMBED_SETTINGS, upstream=("train", "gallery"), extra_inputs=_catalogue_inputs)


def identify_batch(batch: str, photos: Path) -> Stage:
    """identify/<batch>: the photos under `photos` (an input folder, by content) ranked against the
    catalogue; rerank.method = local re-ranks them as predict does."""
    return Stage(
        f"{BATCHES}/{batch}", "whaleid.inference.identify:batch_run",
        artifacts=("photos.csv", "matches.csv", "vectors.npy", "crops/", "review.html"),
        settings=TTA_SETTINGS + DETECT_SETTINGS + ("rerank.*", "keypoints.*", "augment.jpeg_quality",
                                                   "boxes.import_csv", "identify.*"),
        upstream=("boxes", "augment", "train", "gallery", "gallery_added"),
        extra_inputs=partial(_batch_inputs, Path(photos)))


def identify_stages(batch: str | None = None, photos: Path | None = None) -> tuple[list[Stage], list[Stage]]:
    """(every stage, for a session's upstream lookups; identify's own, to run) for one batch."""
    own = [GALLERY, GALLERY_ADDED] + ([identify_batch(batch, photos)] if batch else [])
    return ALL + own, own
