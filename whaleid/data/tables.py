"""The data folder's tables (train.csv, sample_submission.csv): schema checks with messages that
name the file, row and column, so a user can fix the CSV instead of reading a traceback."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

NEW_WHALE = "new_whale"
WHITESPACE = r"\s+"


class TableError(ValueError):
    pass


def _read(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: file not found (expected the Kaggle layout: train.csv, "
                         f"sample_submission.csv, train/, test/)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise TableError(f"{path}: not a readable CSV ({e})") from None
    except pd.errors.EmptyDataError:
        raise TableError(f"{path}: the file is empty; expected a header line {','.join(required)}") from None
    df.columns = [c.strip() for c in df.columns]
    for col in required:
        if col not in df.columns:
            raise TableError(f"{path}: missing column '{col}' (header is {','.join(df.columns)}; "
                             f"expected {','.join(required)})")
    df = df[list(required)].copy()
    for col in required:
        df[col] = df[col].str.strip()
        empty = df.index[df[col] == ""]
        if len(empty):
            raise TableError(f"{path}: row {empty[0] + 2}: empty value in column '{col}'"
                             + (" (every training photo needs an id, or new_whale)" if col == "Id" else ""))
    bad = df.index[df["Image"].str.contains(r"[/\\]|^\.\.?$", regex=True)]
    if len(bad):
        raise TableError(f"{path}: row {bad[0] + 2}: column 'Image' must be a file name, "
                         f"got {df.at[bad[0], 'Image']!r}")
    return df


def read_train(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """train.csv as (table, notes). Exact repeated rows are dropped with a note; one image listed with
    two different ids is an error (which one is right cannot be guessed)."""
    df = _read(path, ("Image", "Id"))
    if df.empty:
        raise TableError(f"{path}: no rows below the header: nothing to train on (expected one row Image,Id per "
                         f"training photo)")
    spaced = df.index[df["Id"].str.contains(r"\s", regex=True)]
    if len(spaced):
        bad = df.at[spaced[0], "Id"]
        raise TableError(f"{path}: row {spaced[0] + 2}: Id {bad!r} contains whitespace; an id must be one word "
                         f"(a submission separates ids by spaces): write it without, e.g. {re.sub(WHITESPACE, '_', bad)!r}")
    notes = []
    dup = df.duplicated(keep="first")
    if dup.any():
        rows = [int(i) + 2 for i in df.index[dup]]
        notes.append(f"{path}: {int(dup.sum())} repeated rows dropped (rows {rows[:10]}{'...' if len(rows) > 10 else ''})")
        df = df[~dup]
    clash = df["Image"].duplicated(keep=False)
    if clash.any():
        first = df[clash].iloc[0]["Image"]
        rows = [int(i) + 2 for i in df.index[df["Image"] == first]]
        ids = df.loc[df["Image"] == first, "Id"].tolist()
        raise TableError(f"{path}: rows {rows}: image {first} is listed with different ids {ids}; "
                         f"keep one row per image")
    return df.reset_index(drop=True), notes


def read_test(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """sample_submission.csv's Image column, in its order (the order of the submission)."""
    df = _read(path, ("Image",))
    notes = []
    dup = df["Image"].duplicated(keep="first")
    if dup.any():
        rows = [int(i) + 2 for i in df.index[dup]]
        notes.append(f"{path}: {int(dup.sum())} repeated images dropped (rows {rows[:10]})")
        df = df[~dup]
    return df.reset_index(drop=True), notes


def read_train_only(path: Path | None) -> set[str]:
    """The ids a data folder's train_only.csv names (`import-folders --train-only`: individuals only
    learnt from, never an answer); none without the file."""
    if path is None or not Path(path).is_file():
        return set()
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "Id" not in table.columns:
        raise TableError(f"{path}: expected a column Id (the train-only individuals, as import-folders writes)")
    return set(table.Id)


ENCOUNTERS = "encounters.csv"  # DATA/encounters.csv: Image, Encounter (import-folders --encounter writes it)


def read_encounters(data: Path | None) -> dict[str, str]:
    """Image -> encounter (photos taken together: one animal, one place, minutes apart) from the data
    folder's encounters.csv, else from an Encounter column of its train.csv; {} when neither says:
    then every photo is its own encounter (Kaggle's layout)."""
    if data is None:
        return {}
    path = Path(data) / ENCOUNTERS
    if not path.is_file():
        train = Path(data) / "train.csv"
        if not train.is_file():
            return {}
        table = pd.read_csv(train, dtype=str, keep_default_na=False)
        if "Encounter" not in table.columns:
            return {}
        path = train
    else:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("Image", "Encounter") if c not in table.columns]
    if missing:
        raise TableError(f"{path}: expected columns Image, Encounter (missing {', '.join(missing)})")
    blank = table[table.Encounter.str.strip() == ""]
    if len(blank):
        raise TableError(f"{path}, row {blank.index[0] + 2}: photo {blank.Image.iloc[0]} has no encounter; give every "
                         f"photo one (its own name when it was taken alone)")
    return dict(zip(table.Image, table.Encounter))


SIDES = "sides.csv"  # DATA/sides.csv: Image, Side (left | right | unknown; import-folders --side writes it)
SIDE_NAMES = {"left": "left", "l": "left", "right": "right", "r": "right", "unknown": "unknown", "": "unknown"}


def side_name(text: str) -> str | None:
    """left, right or unknown for a side as people write it (L, Left, right...); None if it is none."""
    return SIDE_NAMES.get(str(text).strip().lower())


def read_sides(data: Path | None, path: Path | None = None) -> dict[str, str]:
    """Image -> left | right (photos of unknown side left out) from the data folder's sides.csv (or
    `path`), else from a Side column of its train.csv; {} when neither says: every side unknown,
    matched with all."""
    if data is None and path is None:
        return {}
    path = Path(path) if path is not None else Path(data) / SIDES
    if not path.is_file():
        path = Path(data) / "train.csv"
        if not path.is_file():
            return {}
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "Side" not in table.columns:
            return {}
    else:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("Image", "Side") if c not in table.columns]
    if missing:
        raise TableError(f"{path}: expected columns Image, Side (missing {', '.join(missing)})")
    names = [side_name(v) for v in table.Side]
    bad = [i for i, n in enumerate(names) if n is None]
    if bad:
        raise TableError(f"{path}, row {bad[0] + 2}: photo {table.Image.iloc[bad[0]]} has side {table.Side.iloc[bad[0]]!r}; "
                         f"write left, right or unknown (or L, R, or leave it blank)")
    return {i: n for i, n in zip(table.Image, names) if n != "unknown"}

