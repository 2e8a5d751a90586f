"""split: the validation set, by source photo.

The original split the augmented files, so copies of one photo landed on both sides and validation
accuracy was inflated. Here every file of a photo goes to the same side, only the original variant
is validated, ids with one photo stay in training (nothing to validate them against), and a
fraction of the ids (`unseen_ids`) is held out of training entirely: at evaluation they play the
new whales, as ~27% of the test set does, so the new_whale threshold can be tuned honestly.

Inputs:    augment/TRAINING_FILE_FINAL.csv
Artifacts: split.csv     Image, Id, subset (train | val | unseen | new_whale), one row per photo
           train_files.csv, val_files.csv   File, Image, Id  (what the train stage reads)
           split_report.json                class coverage
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .stage import Run
from .tables import NEW_WHALE


def assign(photos: pd.DataFrame, validation: float, unseen_ids: float, seed: int) -> pd.Series:
    """subset of each photo (Image, Id rows, one per photo); deterministic for a seed."""
    rng = np.random.default_rng(seed)
    subset = pd.Series("train", index=photos.index)
    subset[photos.Id == NEW_WHALE] = "new_whale"
    known = photos[photos.Id != NEW_WHALE]
    counts = known.Id.value_counts()
    multi = sorted(counts[counts >= 2].index)
    n_unseen = int(round(unseen_ids * len(multi)))
    unseen = set(rng.choice(multi, size=n_unseen, replace=False)) if n_unseen else set()
    subset[photos.Id.isin(unseen)] = "unseen"
    for ident in multi:
        if ident in unseen:
            continue
        idx = known.index[known.Id == ident].to_numpy()
        n_val = min(len(idx) - 1, max(1, int(round(validation * len(idx))))) if validation > 0 else 0
        if n_val:
            subset[rng.choice(np.sort(idx), size=n_val, replace=False)] = "val"
    return subset


def run(run: Run) -> dict:
    files = run.read_csv("augment", "TRAINING_FILE_FINAL.csv")
    photos = files.drop_duplicates("Image")[["Image", "Id"]].sort_values("Image").reset_index(drop=True)
    photos["subset"] = assign(photos, run.setting("split.validation"), run.setting("split.unseen_ids"),
                              run.setting("run.seed"))
    run.write_csv("split.csv", photos)
    side = files.merge(photos[["Image", "subset"]], on="Image")
    train = side[side.subset == "train"][["File", "Image", "Id"]]
    val = side[(side.subset == "val") & (side.variant == "original")][["File", "Image", "Id"]]
    run.write_csv("train_files.csv", train)
    run.write_csv("val_files.csv", val)
    n = photos.subset.value_counts().to_dict()
    ids_train = photos[photos.subset == "train"].Id.nunique()
    ids_val = photos[photos.subset == "val"].Id.nunique()
    report = {"photos": {k: int(v) for k, v in n.items()}, "ids_in_training": int(ids_train),
              "ids_validated": int(ids_val),
              "validated_fraction_of_ids": round(ids_val / ids_train, 4) if ids_train else 0.0,
              "single_photo_ids_train_only": int((photos[photos.subset == "train"].Id.value_counts() == 1).sum()),
              "unseen_ids": int(photos[photos.subset == "unseen"].Id.nunique()),
              "train_files": len(train), "val_files": len(val)}
    run.write_json("split_report.json", report)
    run.echo(f"{report['ids_validated']} of {ids_train} ids have validation photos; "
             f"{report['unseen_ids']} ids held out as unseen; {len(train)} training files, {len(val)} validation")
    return {"train_files": len(train), "val_files": len(val), "ids": int(ids_train), "ids_validated": int(ids_val)}
