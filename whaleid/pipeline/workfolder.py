"""A work folder as the command line opens it: the settings and data folder it was last run with
(WORK/whaleid.json), what this command changes about them, and what its artifacts say about the
test photos. Nothing here imports TensorFlow.

WORK/whaleid.json holds {"data": absolute path, "config": a shipped config's name or a file's absolute
path, "set": ["section.key=value", ...]}: what a bare `whaleid train --work WORK` reuses. Whether a
stage is up to date never depends on it (manifests hold content fingerprints): a copied work folder
only needs --data when the remembered folder is not where it was.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from whaleid.pipeline import config
from whaleid.pipeline.files import StageError, write_json
from whaleid.pipeline.stage import SETTINGS_RECORD, TEXT_COLUMNS, Session


@dataclass
class Opened:
    session: Session
    record: dict                                   # what to write into WORK/whaleid.json if the command runs
    notes: list[str] = field(default_factory=list)  # what the user should hear about the settings


def read_record(work: Path) -> dict:
    path = Path(work) / SETTINGS_RECORD
    if not path.is_file():
        return {}
    try:
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict) or not isinstance(rec.get("set", []), list):
            raise ValueError("not a settings record")
    except (OSError, ValueError) as e:
        raise StageError(f"{path} is unreadable ({e}): delete it and pass --data and --config again") from None
    return rec


def config_label(path: Path | None) -> str | None:
    """How the record names a config: a shipped config by its name (found again on any machine and
    in any install), another file by its absolute path."""
    if path is None:
        return None
    path = Path(path).resolve()
    for name, shipped in config.shipped().items():
        try:
            if path.samefile(shipped):
                return name
        except OSError:
            continue
    return str(path)


def _remap(value: str, old: Path, new: Path) -> str | None:
    """A remembered path inside the old data folder, moved into the new one (a copied data folder)."""
    try:
        rel = Path(value).relative_to(old)
    except ValueError:
        return None
    return str(new / rel)


def open_work(work, data, config_file, overrides, workers: int, quiet: bool, stages: list, unset=(),
              reset: bool = False, echo=print) -> Opened:
    """Settings and data folder for WORK: what is given now, else what WORK was last run with.
    `unset` forgets remembered --set keys, `reset` every remembered --set and the remembered config."""
    work = Path(work)
    rec = read_record(work)
    notes = []
    remembered = config.parse_overrides(rec.get("set", []))
    if reset:
        if remembered or rec.get("config"):
            notes.append("settings: forgot the remembered config and --set values "
                         f"({', '.join(f'{k}={v}' for k, v in remembered.items()) or 'none'})")
        remembered, rec = {}, {**rec, "config": None}
    schema = config.defaults()
    for key in unset:
        section, _, name = str(key).partition(".")
        if section not in schema or name not in schema[section]:
            raise config.ConfigError(f"--unset {key}: unknown setting (expected section.key, e.g. --unset train.epochs)")
        if remembered.pop(key, None) is None:
            notes.append(f"settings: {key} was not set in {work / SETTINGS_RECORD}; nothing to unset")
        else:
            notes.append(f"settings: {key} unset (back to the config's value)")
    given = Path(data) if data is not None else None
    if given is not None and not given.is_dir():
        raise StageError(f"data folder {given} not found")
    old = Path(rec["data"]) if rec.get("data") else None
    if given is None and old is not None:
        if old.is_dir():
            given = old
        else:
            notes.append(f"the data folder {work} was run with ({old}) is not here: stages that read it are taken "
                         f"as recorded; pass --data DIR to check them or to run them")
    elif given is not None and old is not None and given.resolve() != old:
        for k, v in list(remembered.items()):
            text = config.parse_override(f"{k}={v}")[2]
            moved = _remap(text, old, given.resolve()) if isinstance(text, str) else None
            if moved is not None:
                remembered[k] = json.dumps(moved)
                notes.append(f"settings: {k} follows the data folder: {moved}")
    if config_file is None:
        config_file = _remembered_config(rec.get("config"), work)  # None: the shipped defaults
        sets = {**remembered, **config.parse_overrides(overrides)}
    else:
        config_file = config.resolve(config_file)  # a file, or a shipped config's name: --config cpu
        sets = config.parse_overrides(overrides)    # a malformed --set is a one-line error
        if remembered:
            notes.append(f"settings: --config {config_file} replaces the remembered config and --set values")
    set_list = [f"{k}={v}" for k, v in sets.items()]
    cfg = config.load(config_file, tuple(set_list))
    record = {"data": str(given.resolve()) if given else (str(old) if old else None),
              "config": config_label(config_file), "set": set_list}
    session = Session(cfg=cfg, work=work, data=given.resolve() if given else None, stages=stages,
                      workers=workers, progress=not quiet, echo=echo)
    return Opened(session, record, notes)


def _remembered_config(label: str | None, work: Path) -> Path | None:
    if not label:
        return None
    try:
        return config.resolve(label)
    except config.ConfigError:
        raise config.ConfigError(f"{work} was last run with the config {label}, which is not here: pass --config FILE "
                                 f"(or a shipped name: {', '.join(config.shipped())}), or --reset-settings") from None


def write_record(session: Session, record: dict) -> None:
    write_json(session.work / SETTINGS_RECORD, record)


# ---------------------------------------------------------------- what the artifacts say about test photos

def _table(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path, keep_default_na=False, dtype=TEXT_COLUMNS)
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return None


def unusable_test_photos(session: Session) -> tuple[list[str], int, list[Path]]:
    """(names of sample_submission.csv's photos that got no box, i.e. missing or unreadable; how many
    it lists; the skipped.csv files that give their reasons), from dedup's and boxes' artifacts."""
    from whaleid.data.tables import read_test
    if session.data is None or (session.dir("boxes") / "BB_TEST.csv").exists() is False:
        return [], 0, []
    try:
        order, _ = read_test(session.data / "sample_submission.csv")
    except ValueError:
        return [], 0, []
    boxed = _table(session.dir("boxes") / "BB_TEST.csv")
    if boxed is None:
        return [], 0, []
    missing = [i for i in order.Image if i not in set(boxed.Image)]
    files = []
    for stage in ("dedup", "boxes"):
        skipped = _table(session.dir(stage) / "skipped.csv")
        if skipped is not None and set(skipped.Image) & set(missing):
            files.append(session.dir(stage) / "skipped.csv")
    return missing, len(order), files


def test_photo_warning(missing: list[str], total: int, files: list[Path]) -> str:
    where = " and ".join(str(f) for f in files) or "the stages' skipped.csv files"
    return (f"WARNING: {len(missing)} of {total} test photos are missing or unreadable (e.g. {missing[0]}): "
            f"predict can only guess their rows (new_whale first). Their reasons: {where}. "
            f"--strict makes this an error.")


def fallback_rows(session: Session) -> tuple[int, int]:
    """(rows of the submission predict had to guess, rows) from predict/predictions.csv."""
    preds = _table(session.dir("predict") / "predictions.csv")
    if preds is None:
        return 0, 0
    return int((preds.source == "fallback").sum()), len(preds)


def is_dir_or_error(work: Path) -> None:
    if not Path(work).is_dir():
        hint = "" if os.path.isabs(str(work)) else f" (relative to {Path.cwd()})"
        raise StageError(f"no such work folder: {work}{hint}")
