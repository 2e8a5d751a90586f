r"""import-folders: a catalogue laid out as ROOT/<individual>/*.jpg|png -> the Kaggle layout whaleid reads.

Re-identification sets (and users' own catalogues) come one folder per individual. This writes a new
data folder with the competition's shape and its answers, so the whole pipeline and its scoring run
on them: a share of the individuals (new_fraction) is held out entirely, their photos become test
photos whose answer is new_whale; every other individual keeps its photos in train (the gallery)
except a share (query_fraction, at most all but one photo) that become test queries with its id.
Catalogues given with train_only (`--train-only ROOT`, repeatable) add individuals to learn from and
nothing else: all their photos go to train, none is a test photo or new_whale, and train_only.csv
names them so that the split stage holds its "unseen" ids (which play the new whales when the
new_whale threshold is tuned) out of these first, and the tested individuals keep their gallery.

Output (a new folder; the source folder is only read):
    train.csv, sample_submission.csv, train/, test/   the Kaggle layout
    solution.csv   Image,Id: the answer for every test photo (an id, or new_whale)
    boxes.csv      Image,x0,y0,x1,y1: the whole photo, for `whaleid preprocess --boxes` (the tail-fluke
                   detector has nothing to find on other animals)
    sources.csv    Image, source (path under ROOT), individual, role (gallery | query | new | train-only)
    train_only.csv Id: the individuals of the train_only catalogues (read by the split stage)
    encounters.csv Image, Encounter: with --encounter REGEX, each photo's encounter (the regex's first
                   group on its file name, e.g. '^(\d+)_' for nyala's <sighting>_leftphoto.jpg): the
                   photos of one encounter are all gallery or all queries, never both, and the split
                   and scoring stages keep them apart in the same way
    sides.csv      Image, Side: with --side REGEX, each photo's side (left | right | unknown: the
                   regex's first group on its file name, e.g. '_(left|right)photo'); with
                   predict.sides = same a photo is compared only with photos of its own side
    skipped.csv    source, reason: files that are not readable photos (left out)
Photo names are a hash of the source path, so the name says nothing about the individual. The
individual is the name of the folder holding the photo (spaces become "_"); two folders of one name in
different places are an error rather than silently one individual. The folder is written under a
temporary name and renamed when complete.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from whaleid.data import images
from whaleid.pipeline.files import umask
from whaleid.data.tables import ENCOUNTERS, NEW_WHALE, SIDES, side_name

EXTENSIONS = {".jpg": ".jpg", ".jpeg": ".jpg", ".png": ".png"}


class FolderError(ValueError):
    """A problem with the source or output folder; the message names it."""


def _id_name(folder: Path) -> str:
    name = re.sub(r"\s+", "_", folder.name.strip())
    if not name or name == NEW_WHALE:
        raise FolderError(f"{folder}: folder name {folder.name!r} cannot be an individual's id")
    return name


def scan(src: Path, progress: bool = True) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """(photos: source, path, Id, width, height; skipped: (source, reason)) of every jpg/png under src."""
    src = Path(src)
    rows, skipped, owner = [], [], {}
    paths = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.startswith(".") and Path(f).suffix.lower() in EXTENSIONS:
                paths.append(Path(root) / f)
    for path in tqdm(paths, desc="import-folders: read photos", unit="img", disable=not progress or len(paths) < 200,
                     dynamic_ncols=True, mininterval=0.5):
        rel = path.relative_to(src).as_posix()
        if path.parent == src:
            raise FolderError(f"{path}: photo directly in {src}; put each individual's photos in {src}/<id>/")
        ident = _id_name(path.parent)
        if owner.setdefault(ident, path.parent) != path.parent:
            raise FolderError(f"two folders give the id {ident!r}: {owner[ident]} and {path.parent}; rename one, "
                               f"or import them separately")
        try:
            with images.open_image(path, draft_size=(64, 64)) as img:
                w, h = img.info["file_size"]
        except images.BadImage as e:
            skipped.append((rel, str(e)))
            continue
        rows.append((rel, str(path), ident, w, h))
    photos = pd.DataFrame(rows, columns=["source", "path", "Id", "width", "height"])
    return photos, skipped


def encounters_of(photos: pd.DataFrame, pattern: str | None) -> pd.Series | None:
    """Each photo's encounter: the first group of `pattern` on its file name (None without a pattern)."""
    if pattern is None:
        return None
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise FolderError(f"--encounter '{pattern}': not a regular expression ({e})") from None
    if rx.groups < 1:
        raise FolderError(f"--encounter '{pattern}': needs a group, the part of the file name that names the "
                          f"encounter, e.g. '^(\\d+)_'")
    out = []
    for source in photos.source:
        m = rx.search(Path(source).name)
        if m is None or not m.group(1):
            raise FolderError(f"{source}: --encounter '{pattern}' does not match its file name; every photo needs "
                              f"an encounter (rename the file, or use a pattern that matches every name)")
        out.append(m.group(1))
    return pd.Series(out, index=photos.index)


def sides_of(photos: pd.DataFrame, pattern: str | None) -> pd.Series | None:
    """Each photo's side (left | right | unknown): the first group of `pattern` on its file name read as
    a side (left, l, right, r in any case); a name the pattern does not match is of unknown side."""
    if pattern is None:
        return None
    try:
        rx = re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise FolderError(f"--side '{pattern}': not a regular expression ({e})") from None
    if rx.groups < 1:
        raise FolderError(f"--side '{pattern}': needs a group, the part of the file name that names the side, "
                          f"e.g. '_(left|right)'")
    out = []
    for source in photos.source:
        m = rx.search(Path(source).name)
        side = side_name(m.group(1) or "") if m else "unknown"
        if side is None:
            raise FolderError(f"{source}: --side '{pattern}' reads the side {m.group(1)!r} from its file name; the "
                              f"group must be left, right, l or r")
        out.append(side)
    return pd.Series(out, index=photos.index)


def assign(photos: pd.DataFrame, new_fraction: float, query_fraction: float, seed: int,
           encounter: pd.Series | None = None) -> pd.Series:
    """role per photo: new (held-out individual), query (test photo of a known one) or gallery. With
    encounters, whole encounters become queries (about query_fraction of the photos, one encounter
    always staying in the gallery)."""
    if not 0 <= new_fraction < 1:
        raise FolderError(f"--new-fraction {new_fraction}: expected 0 <= fraction < 1")
    if not 0 <= query_fraction < 1:
        raise FolderError(f"--query-fraction {query_fraction}: expected 0 <= fraction < 1")
    rng = np.random.default_rng(seed)
    ids = sorted(photos.Id.unique())
    n_new = int(round(new_fraction * len(ids)))
    if len(ids) - n_new < 2:
        raise FolderError(f"{len(ids)} individuals with --new-fraction {new_fraction} leave {len(ids) - n_new} "
                           f"known: at least 2 are needed")
    new = set(rng.choice(ids, size=n_new, replace=False)) if n_new else set()
    role = pd.Series("gallery", index=photos.index)
    role[photos.Id.isin(new)] = "new"
    for ident in ids:
        if ident in new:
            continue
        idx = np.sort(photos.index[photos.Id == ident].to_numpy())
        if encounter is not None:
            role[query_encounters(encounter[idx], query_fraction, rng)] = "query"
            continue
        n_query = min(len(idx) - 1, int(round(query_fraction * len(idx))))
        if n_query > 0:
            role[rng.choice(idx, size=n_query, replace=False)] = "query"
    return role


def query_encounters(encounter: pd.Series, fraction: float, rng: np.random.Generator) -> list:
    """The photos (index labels) of one individual's encounters chosen as queries: encounters in a random
    order until `fraction` of its photos, never its last encounter."""
    groups = sorted(set(encounter))
    if len(groups) < 2:
        return []
    want, out = fraction * len(encounter), []
    for g in rng.permutation(groups)[:-1]:
        members = list(encounter.index[encounter == g])
        if len(out) + len(members) / 2 > want:
            break
        out += members
    return out


def _train_only(roots, main: pd.DataFrame, progress: bool) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The photos of the train_only catalogues (role train-only, a `key` to name them by), and their skips."""
    parts, skipped, owner = [], [], {i: "--src" for i in main.Id.unique()}
    for k, root in enumerate(roots):
        photos, bad = scan(root, progress)
        if photos.empty:
            raise FolderError(f"--train-only {root}: no readable .jpg/.jpeg/.png photos in its sub-folders")
        for ident in sorted(photos.Id.unique()):
            if owner.setdefault(ident, f"--train-only {root}") != f"--train-only {root}":
                raise FolderError(f"individual {ident!r} is in both {owner[ident]} and --train-only {root}: an "
                                  f"individual learnt from must not be one tested (rename or remove one folder)")
        photos["key"] = [f"train-only/{k}/{s}" for s in photos.source]
        photos["source"] = [f"{root}/{s}" for s in photos.source]
        parts.append(photos.assign(role="train-only"))
        skipped += [(f"{root}/{s}", reason) for s, reason in bad]
    return (pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()), skipped


def import_folders(src: Path, out: Path, new_fraction: float = 0.3, query_fraction: float = 0.3,
                   seed: int = 0, progress: bool = True, train_only=(), encounter: str | None = None,
                   side: str | None = None) -> dict:
    src, out, roots = Path(src), Path(out), [Path(r) for r in train_only]
    for flag, folder in [("--src", src)] + [("--train-only", r) for r in roots]:
        if not folder.is_dir():
            raise FolderError(f"{flag} {folder}: not a folder")
        if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
            raise FolderError(f"--out {out} is inside {flag} {folder}: whaleid never writes into a data folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FolderError(f"--out {out} exists and is not empty: choose a new folder (import never overwrites)")
    photos, skipped = scan(src, progress)
    if photos.empty:
        raise FolderError(f"--src {src}: no readable .jpg/.jpeg/.png photos in its sub-folders")
    photos["role"] = assign(photos, new_fraction, query_fraction, seed, encounters_of(photos, encounter))
    photos["key"] = photos.source
    extra, extra_skipped = _train_only(roots, photos, progress)
    photos = pd.concat([photos, extra], ignore_index=True)
    if encounter is not None:
        photos["Encounter"] = encounters_of(photos, encounter)
    if side is not None:
        photos["Side"] = sides_of(photos, side)
    skipped += extra_skipped
    names = [hashlib.sha1(s.encode()).hexdigest()[:12] + EXTENSIONS[Path(s).suffix.lower()] for s in photos.key]
    if len(set(names)) != len(names):
        raise FolderError("two photos hash to the same name (astronomically unlikely): rename one")
    photos["Image"] = names
    photos = photos.sort_values("Image").reset_index(drop=True)
    in_train = photos.role.isin(["gallery", "train-only"])
    train, test = photos[in_train], photos[~in_train]
    known = sorted(train.Id.unique())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would hide the data folder from a teammate
    try:
        (tmp / "train").mkdir()
        (tmp / "test").mkdir()
        for r in tqdm(photos.itertuples(), total=len(photos), desc="import-folders: copy", unit="img",
                      disable=not progress, dynamic_ncols=True, mininterval=0.5):
            shutil.copyfile(r.path, tmp / ("test" if r.role in ("query", "new") else "train") / r.Image)
        train[["Image", "Id"]].to_csv(tmp / "train.csv", index=False)
        placeholder = " ".join([NEW_WHALE] + known[:4])
        pd.DataFrame({"Image": test.Image, "Id": placeholder}).to_csv(tmp / "sample_submission.csv", index=False)
        pd.DataFrame({"Image": test.Image, "Id": [NEW_WHALE if r == "new" else i for i, r in zip(test.Id, test.role)]}
                     ).to_csv(tmp / "solution.csv", index=False)
        pd.DataFrame({"Image": photos.Image, "x0": 0, "y0": 0, "x1": photos.width, "y1": photos.height}
                     ).to_csv(tmp / "boxes.csv", index=False)
        photos.rename(columns={"Id": "individual"})[["Image", "source", "individual", "role"]].to_csv(
            tmp / "sources.csv", index=False)
        pd.DataFrame(skipped, columns=["source", "reason"]).to_csv(tmp / "skipped.csv", index=False)
        pd.DataFrame({"Id": sorted(photos[photos.role == "train-only"].Id.unique())}).to_csv(
            tmp / "train_only.csv", index=False)
        if encounter is not None:
            photos[["Image", "Encounter"]].to_csv(tmp / ENCOUNTERS, index=False)
        if side is not None:
            photos[["Image", "Side"]].to_csv(tmp / SIDES, index=False)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"individuals": int(photos.Id.nunique()), "known": len(known),
            "new": int(photos[photos.role == "new"].Id.nunique()), "train_photos": len(train),
            "test_queries": int((photos.role == "query").sum()), "test_new_whale": int((photos.role == "new").sum()),
            "train_only_individuals": int(photos[photos.role == "train-only"].Id.nunique()),
            "train_only_photos": int((photos.role == "train-only").sum()), "skipped": len(skipped),
            **({"encounters": int(photos.Encounter.nunique())} if encounter is not None else {}),
            **({f"side_{k}": int(v) for k, v in photos.Side.value_counts().items()} if side is not None else {})}


def next_steps(out: Path) -> list[str]:
    """What to run on the new data folder (import-folders prints it)."""
    out = Path(out)
    return ["  next (no new_whale rows in train.csv: split.unseen_ids holds ids out to play the new whales):",
            f"    whaleid preprocess --data {out} --work WORK --config cpu --set boxes.detector=subject "
            f"--set split.unseen_ids=0.2",
            f"  (boxes.detector=subject boxes the animal in each photo; --boxes {out / 'boxes.csv'} keeps whole photos)",
            "    whaleid train --work WORK",
            "    whaleid evaluate --work WORK --tune-threshold",
            "    whaleid predict --work WORK",
            f"    whaleid evaluate --submission WORK/submission.csv --solution {out / 'solution.csv'}"]
