"""split: the validation set, by source photo.

The original split the augmented files, so copies of one photo landed on both sides and validation
accuracy was inflated. Here every file of a photo goes to the same side, only the original variant
is validated, ids with one photo stay in training (nothing to validate them against), and a
fraction of the ids (`unseen_ids`) is held out of training entirely: at evaluation they play the
new whales, as ~27% of the test set does, so the new_whale threshold can be tuned honestly. When
the data folder names train-only individuals (train_only.csv, from `import-folders --train-only`:
individuals to learn from that are never tested), the unseen ids are drawn from them first, so the
individuals being tested keep all their photos in the gallery. When the data folder gives encounters
(encounters.csv, or an Encounter column of train.csv: photos taken together), validation takes whole
encounters: a validation photo never has a photo of its own encounter in training, where it would
be matched by the shared background, and only ids with two or more encounters are validated.

Inputs:    augment/TRAINING_FILE_FINAL.csv, the data folder's train_only.csv (Id) and encounters.csv
           when they exist
Artifacts: split.csv     Image, Id, subset (train | val | unseen | new_whale), one row per photo; and
                         Encounter when encounters are known (evaluate keeps them apart too)
           train_files.csv, val_files.csv   File, Image, Id  (what the train stage reads; train_files.csv
                                            with Encounter too when encounters are known)
           split_report.json                class coverage
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from whaleid.pipeline.stage import Run
from whaleid.data.tables import NEW_WHALE, read_encounters, read_train_only


def assign(photos: pd.DataFrame, validation: float, unseen_ids: float, seed: int,
           unseen_first=frozenset(), encounter: pd.Series | None = None) -> pd.Series:
    """subset of each photo (Image, Id rows, one per photo); deterministic for a seed. The unseen ids
    come from `unseen_first` (train-only individuals) as far as it has ids with 2+ photos. With
    `encounter` (per photo), validation takes whole encounters of ids with 2+ of them."""
    rng = np.random.default_rng(seed)
    subset = pd.Series("train", index=photos.index)
    subset[photos.Id == NEW_WHALE] = "new_whale"
    known = photos[photos.Id != NEW_WHALE]
    counts = known.Id.value_counts()
    multi = sorted(counts[counts >= 2].index)
    n_unseen = int(round(unseen_ids * len(multi)))
    first = [i for i in multi if i in unseen_first]
    rest = [i for i in multi if i not in unseen_first]
    n_first = min(n_unseen, len(first))
    unseen = set(rng.choice(first, size=n_first, replace=False)) if n_first else set()
    if n_unseen > n_first:
        unseen |= set(rng.choice(rest, size=n_unseen - n_first, replace=False))
    subset[photos.Id.isin(unseen)] = "unseen"
    for ident in multi:
        if ident in unseen:
            continue
        idx = known.index[known.Id == ident].to_numpy()
        if encounter is not None:
            groups = sorted(set(encounter[idx]))
            n_val = min(len(groups) - 1, max(1, int(round(validation * len(groups))))) if validation > 0 else 0
            if n_val:
                chosen = set(rng.choice(groups, size=n_val, replace=False))
                subset[idx[encounter[idx].isin(chosen).to_numpy()]] = "val"
            continue
        n_val = min(len(idx) - 1, max(1, int(round(validation * len(idx))))) if validation > 0 else 0
        if n_val:
            subset[rng.choice(np.sort(idx), size=n_val, replace=False)] = "val"
    return subset


REPAIR_UNSEEN = 0.2  # split.unseen_ids used when it is 0 and train.csv has no new_whale rows


def unseen_fraction(photos: pd.DataFrame, unseen_ids: float, share: float = 0.0) -> tuple[float, str | None]:
    """(split.unseen_ids to use, a note): with unseen_ids 0 and no new_whale rows (a catalogue from
    import-folders with configs/cpu.toml) the open-set validation would have no new whales, and
    evaluate would tune a threshold that never predicts new_whale; hold out REPAIR_UNSEEN of the ids
    (at least one) instead, and say so. Not when new_whale.share places the threshold (`share` > 0):
    nothing is tuned on new whales then, and every id trains."""
    if unseen_ids > 0 or (photos.Id == NEW_WHALE).any():
        return unseen_ids, None
    if share > 0:
        return unseen_ids, (f"train.csv has no new_whale rows; new_whale.share = {share:g} places the threshold, "
                            f"so no ids are held out (split.unseen_ids = 0): every id trains")
    counts = photos.Id.value_counts()
    multi = int((counts >= 2).sum())
    if multi < 3:  # too few ids to hold one out and still validate the others
        return unseen_ids, (f"train.csv has no new_whale rows and split.unseen_ids = 0: the validation has no new "
                            f"whales ({multi} ids with 2+ photos are too few to hold any out)")
    fraction = max(REPAIR_UNSEEN, 1.0 / multi)
    return fraction, (f"train.csv has no new_whale rows and split.unseen_ids = 0, so the validation would have no "
                      f"new whales: holding out {round(fraction * multi)} of {multi} ids instead (split.unseen_ids "
                      f"{fraction:g}) to play them; set split.unseen_ids > 0 to choose the share")


def run(run: Run) -> dict:
    files = run.read_csv("augment", "TRAINING_FILE_FINAL.csv")
    photos = files.drop_duplicates("Image")[["Image", "Id"]].sort_values("Image").reset_index(drop=True)
    unseen, note = unseen_fraction(photos, run.setting("split.unseen_ids"), run.setting("new_whale.share"))
    if note:
        run.echo(note)
    known = read_encounters(run.data)
    encounter = photos.Image.map(lambda i: known.get(i, i)) if known else None
    photos["subset"] = assign(photos, run.setting("split.validation"), unseen, run.setting("run.seed"),
                              read_train_only(run.data / "train_only.csv" if run.data is not None else None), encounter)
    if encounter is not None:
        photos["Encounter"] = encounter
        run.echo(f"encounters: {encounter.nunique()} for {len(photos)} photos; validation takes whole encounters")
    run.write_csv("split.csv", photos)
    known_encounters = ["Encounter"] if encounter is not None else []  # train's P x K batches use them
    side = files.merge(photos[["Image", "subset"] + known_encounters], on="Image")
    train = side[side.subset == "train"][["File", "Image", "Id"] + known_encounters]
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
