"""identify --accept: the decisions a person made on review.html join the catalogue.

    whaleid identify --work WORK --accept decisions.csv [--into DATA]

decisions.csv: photo, decision (same | new | skip), id (the known id for same, the new individual's
name for new), and batch (the identify batch the photo came from; optional when only one batch holds
that photo). The whole file is checked before anything is written, and refused with every bad row
named: an unknown photo, a photo named twice or accepted before, an unknown decision, "same" as an
id the catalogue lacks, "new" under a name the catalogue already has.

Where the catalogue grows. whaleid never writes into a data folder unless told to:
  default      WORK/catalogue/: train/ (copies of the accepted photos), crops/ (their crops, which
               the next identify embeds: gallery_added), added.csv (Image, Id, batch, photo, crop,
               decided), train.csv (the data folder's train.csv that WORK was run with + the accepted
               rows: the grown catalogue). The next identify compares new photos with them too; the
               model itself learns them only from a data folder that holds them (--into, then train).
  --into DATA  the photos are copied into DATA/train/ and their rows appended to DATA/train.csv
               (written to a temp file and renamed), so the next `whaleid train --data DATA` trains on
               them; WORK/catalogue/ records them (added.csv, crops/) for identify until then.
Accepted photos are named <sha1 of batch/photo, 16 hex><suffix>, unique across batches.
"""
from __future__ import annotations

import csv
import hashlib
import io
import shutil
import time
from pathlib import Path

import pandas as pd

from whaleid.pipeline.files import StageError, atomic_path, work_lock, write_bytes
from whaleid.data.tables import NEW_WHALE
from whaleid.pipeline.workfolder import read_record
from whaleid.preprocess.augment import FLIP
from whaleid.stages import ADDED, BATCHES, CATALOGUE

DECISIONS = ("same", "new", "skip")


def added_files(work: Path) -> pd.DataFrame:
    """WORK/catalogue/added.csv, empty when nothing was accepted."""
    path = Path(work) / CATALOGUE / ADDED
    if not path.is_file():
        return pd.DataFrame(columns=["Image", "Id", "batch", "photo", "crop"])
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _batches(work: Path) -> dict[str, pd.DataFrame]:
    """Finished identify batches of WORK: name -> photos.csv."""
    out = {}
    for manifest in sorted((Path(work) / BATCHES).glob("*/manifest.json")):
        out[manifest.parent.name] = pd.read_csv(manifest.parent / "photos.csv", dtype=str, keep_default_na=False)
    return out


def catalogue_ids(work: Path) -> set[str]:
    path = Path(work) / "gallery" / "gallery.csv"
    ids = set(pd.read_csv(path, dtype=str, keep_default_na=False).Id) if path.is_file() else set()
    return {i[: -len(FLIP)] if i.endswith(FLIP) else i for i in ids} | set(added_files(work).Id)


def image_name(batch: str, photo: str) -> str:
    suffix = Path(photo).suffix.lower()
    return hashlib.sha1(f"{batch}/{photo}".encode()).hexdigest()[:16] + (suffix if len(suffix) <= 6 else "")


def read_decisions(path: Path, work: Path) -> pd.DataFrame:
    """The accepted rows (same / new) of a decision file: photo, decision, Id, batch, Image, source,
    crop; a StageError naming every bad row otherwise."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.EmptyDataError) as e:
        raise StageError(f"decision file {path}: unreadable ({e})") from None
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in ("photo", "decision", "id") if c not in table.columns]
    if missing:
        raise StageError(f"decision file {path}: no column {', '.join(missing)} (expected photo,decision,id[,batch], "
                         f"as review.html exports)")
    batches = _batches(work)
    if not batches:
        raise StageError(f"{work} holds no identify batch: run whaleid identify --work {work} --photos DIR first")
    known_ids, before = catalogue_ids(work), added_files(work)
    accepted_before = dict(zip(zip(before.batch, before.photo), before.Image))
    new_names = {r.id.strip() for r in table.itertuples() if r.decision.strip().lower() == "new"}
    errors, seen, rows = [], {}, []
    for i, r in enumerate(table.itertuples(index=False), start=2):
        photo, decision, ident = r.photo.strip(), r.decision.strip().lower(), r.id.strip()
        batch = getattr(r, "batch", "").strip()
        where = f"row {i} ({photo or 'no photo'})"
        holders = [batch] if batch else [b for b, t in batches.items() if photo in set(t.photo)]
        if batch and batch not in batches:
            errors.append(f"{where}: batch {batch!r} is not an identify batch of {work} ({', '.join(batches)})")
            continue
        if not holders or photo not in set(batches[holders[0]].photo):
            errors.append(f"{where}: unknown photo (in no identify batch{' ' + batch if batch else ''} of {work})")
            continue
        if len(holders) > 1:
            errors.append(f"{where}: the photo is in batches {', '.join(holders)}: add a batch column")
            continue
        batch = holders[0]
        if (batch, photo) in seen:
            errors.append(f"{where}: the photo is named twice (rows {seen[batch, photo]} and {i})")
            continue
        seen[batch, photo] = i
        if decision not in DECISIONS:
            errors.append(f"{where}: decision {r.decision!r} (expected {', '.join(DECISIONS)})")
            continue
        if decision == "skip":
            continue
        if (batch, photo) in accepted_before:
            errors.append(f"{where}: accepted before (as {accepted_before[batch, photo]}); remove the row")
            continue
        if not ident or ident == NEW_WHALE or any(c in ident for c in "/\\\n\r,\""):
            errors.append(f"{where}: id {ident!r} is not a usable individual's name (no empty name, new_whale, "
                          f"slash, comma or quote)")
            continue
        if decision == "same" and ident not in known_ids and ident not in new_names:
            errors.append(f"{where}: same as {ident!r}, which is not a catalogue id")
            continue
        if decision == "new" and ident in known_ids:
            errors.append(f"{where}: new individual {ident!r} is already a catalogue id: use decision same")
            continue
        found = batches[batch].set_index("photo").loc[photo]
        if not Path(found.source).is_file():
            errors.append(f"{where}: its file {found.source} is gone (identify read it there)")
            continue
        rows.append((photo, decision, ident, batch, image_name(batch, photo), found.source,
                     str(Path(work) / BATCHES / batch / found.crop)))
    if errors:
        shown = "\n  ".join(errors[:20]) + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
        raise StageError(f"decision file {path} refused, nothing was added:\n  {shown}")
    return pd.DataFrame(rows, columns=["photo", "decision", "Id", "batch", "Image", "source", "crop"])


def _copy(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def _csv_rows(rows) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _append_train_csv(path: Path, rows: pd.DataFrame) -> None:
    """DATA/train.csv + rows, written whole to a temp file beside it and renamed over it."""
    text = path.read_bytes().decode()
    if text and not text.endswith("\n"):
        text += "\n"
    write_bytes(path, (text + _csv_rows(zip(rows.Image, rows.Id))).encode())


def _base_train(work: Path) -> pd.DataFrame:
    """The train.csv the catalogue grows from: the data folder's WORK was run with, else format's copy."""
    data = read_record(work).get("data")
    for path in ([Path(data) / "train.csv"] if data else []) + [Path(work) / "format" / "train.csv"]:
        if path.is_file():
            return pd.read_csv(path, dtype=str, keep_default_na=False)[["Image", "Id"]]
    return pd.DataFrame(columns=["Image", "Id"])


def accept(work: Path, decisions: Path, into: Path | None = None, echo=print) -> dict:
    work = Path(work)
    if not work.is_dir():
        raise StageError(f"no such work folder: {work}")
    with work_lock(work, "identify --accept"):
        rows = read_decisions(decisions, work)
        if into is not None:
            into = Path(into)
            if not (into / "train.csv").is_file() or not (into / "train").is_dir():
                raise StageError(f"--into {into}: not a data folder (no train.csv and train/)")
            have = set(pd.read_csv(into / "train.csv", dtype=str, keep_default_na=False).Image)
            clash = [i for i in rows.Image if i in have or (into / "train" / i).exists()]
            if clash:
                raise StageError(f"--into {into}: {clash[0]} is already in its train.csv or train/; nothing was added")
        folder = work / CATALOGUE
        for r in rows.itertuples():  # photos first: a row never names a photo that is not there
            _copy(Path(r.crop), folder / "crops" / (Path(r.Image).stem + ".jpg"))
            _copy(Path(r.source), (into / "train" if into is not None else folder / "train") / r.Image)
        if into is not None:
            _append_train_csv(into / "train.csv", rows)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        new = pd.DataFrame({"Image": rows.Image, "Id": rows.Id, "batch": rows.batch, "photo": rows.photo,
                            "crop": ["crops/" + Path(i).stem + ".jpg" for i in rows.Image], "decided": stamp,
                            "into": str(into.resolve()) if into is not None else ""})
        added = pd.concat([added_files(work), new], ignore_index=True)
        write_bytes(folder / ADDED, added.to_csv(index=False).encode())
        if into is None:
            grown = pd.concat([_base_train(work), added[["Image", "Id"]]], ignore_index=True)
            write_bytes(folder / "train.csv", grown.to_csv(index=False).encode())
    out = {"accepted": len(rows), "same": int((rows.decision == "same").sum()),
           "new_individuals": int(rows[rows.decision == "new"].Id.nunique()), "catalogue_added": len(added)}
    where = f"{into / 'train'} and {into / 'train.csv'}" if into is not None else f"{folder} (train.csv, train/)"
    echo(f"accepted {out['accepted']} photos ({out['same']} of known individuals, {out['new_individuals']} new "
         f"individuals) into {where}; the next whaleid identify compares new photos with them too")
    return out
