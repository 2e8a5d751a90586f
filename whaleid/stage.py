"""The stage cache, one mechanism for every stage (think DVC).

A Stage declares its inputs (files in the data folder, artifacts of upstream stages), the settings
it reads, and the artifacts it writes into WORK/<stage>/. After a successful run it writes
WORK/<stage>/manifest.json: fingerprints of inputs and settings, sha256 of every artifact, versions,
times and counts. A stage is up to date when its manifest matches what it would read now; "up to
date" is decided by these fingerprints only. Upstream artifacts enter a stage's fingerprint by
their sha256, so a changed upstream result reruns everything downstream, never anything upstream.

Crash safety: the old manifest is deleted before a stage starts, artifacts are written atomically
(temp file + rename) and the manifest is written last, so a killed run leaves nothing a rerun would
trust. A stage killed part way may resume its own per-item work when it reruns with exactly the same
fingerprint (`Run.resume`), e.g. training continues from its last checkpoint; it first deletes the
temp files of the writes the kill cut short.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import multiprocessing
import multiprocessing.pool
import pickle
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pandas as pd
from tqdm import tqdm

from .config import get as get_setting
from .files import (LOCK, StageError, atomic_path, clear_temp_files, digest_folder, fingerprint,  # noqa: F401
                    sha256_file, versions, work_lock, write_bytes, write_json)

MANIFEST = "manifest.json"
RUNNING = ".running.json"
SKIPPED = "skipped.csv"
SETTINGS_RECORD = "whaleid.json"   # WORK/whaleid.json: the data folder, config and --set a work folder was run with
TEXT_COLUMNS = {"Image": str, "Id": str, "File": str, "truth": str}


# ---------------------------------------------------------------- stages

@dataclass(frozen=True)
class Stage:
    """A stage's inputs + settings -> artifacts. `run` is the stage's function or its dotted path
    ("whaleid.train:run"), imported only when the stage runs: declaring stages stays light."""
    name: str
    run: Callable[["Run"], dict | None] | str
    artifacts: tuple[str, ...]            # names inside WORK/<name>/; a trailing "/" marks a folder
    settings: tuple[str, ...] = ()        # dotted config keys the stage reads; "section.*": all of a section
    data: tuple[str, ...] = ()            # files/folders inside the data folder
    upstream: tuple[str, ...] = ()        # stages whose artifacts this one reads
    extra_inputs: Callable[["Session"], list[Path]] | None = None  # inputs named by settings (a box CSV)

    def function(self) -> Callable[["Run"], dict | None]:
        if callable(self.run):
            return self.run
        module, name = self.run.split(":")
        return getattr(importlib.import_module(module), name)

    def setting_keys(self, cfg: dict) -> list[str]:
        keys = []
        for key in self.settings:
            section, name = key.split(".", 1)
            keys += [f"{section}.{k}" for k in cfg[section]] if name == "*" else [key]
        return keys

    def reads(self, key: str) -> bool:
        return key in self.settings or f"{key.split('.', 1)[0]}.*" in self.settings


@dataclass
class Status:
    state: str          # done | stale | missing | modified
    reason: str = ""
    manifest: dict | None = None

    @property
    def done(self) -> bool:
        return self.state == "done"


@dataclass
class Session:
    """What every stage run shares: settings, folders, workers, and the stage list (for lookups)."""
    cfg: dict
    work: Path
    data: Path | None
    stages: list[Stage]
    workers: int = 1
    progress: bool = True
    echo: Callable[[str], None] = print

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def dir(self, name: str) -> Path:
        return self.work / name

    def manifest(self, name: str) -> dict | None:
        try:
            return json.loads((self.dir(name) / MANIFEST).read_text())
        except (FileNotFoundError, ValueError):
            return None

    # -- fingerprints of what a stage would read now
    def inputs_of(self, stage: Stage) -> dict:
        fp = {}
        for rel in stage.data:
            if self.data is None:
                raise StageError(f"stage {stage.name} reads the data folder: pass --data DIR")
            fp[f"data/{rel}"] = fingerprint(self.data / rel)
        if stage.extra_inputs:
            for p in stage.extra_inputs(self):
                fp[f"file/{p}"] = fingerprint(p)
        for up in stage.upstream:
            m = self.manifest(up)
            fp[f"stage/{up}"] = m["artifacts"] if m else None
        return fp

    def settings_of(self, stage: Stage) -> dict:
        return {key: get_setting(self.cfg, key) for key in stage.setting_keys(self.cfg)}

    def artifact_digests(self, stage: Stage) -> dict:
        out = {}
        for name in stage.artifacts + (SKIPPED,):
            out[name.rstrip("/")] = fingerprint(self.dir(stage.name) / name.rstrip("/"))
        return out

    def status(self, stage: Stage, _seen: dict | None = None) -> Status:
        seen = {} if _seen is None else _seen
        if stage.name in seen:
            return seen[stage.name]
        m = self.manifest(stage.name)
        if m is None:
            running = (self.dir(stage.name) / RUNNING).exists()
            st = Status("missing", "interrupted run, will resume or restart" if running else "never run")
        else:
            st = self._compare(stage, m, seen)
        seen[stage.name] = st
        return st

    def _compare(self, stage: Stage, m: dict, seen: dict) -> Status:
        for up in stage.upstream:
            ust = self.status(self.stage(up), seen)
            if not ust.done:
                return Status("stale", f"upstream {up} is {ust.state}", m)
        now_settings = self.settings_of(stage)
        for key, value in now_settings.items():
            if m["settings"].get(key, "<absent>") != value:
                return Status("stale", f"setting {key} changed ({m['settings'].get(key)!r} -> {value!r})", m)
        try:
            now_inputs = self.inputs_of(stage)
        except StageError as e:
            return Status("stale", str(e), m)
        for key, value in now_inputs.items():
            if m["inputs"].get(key) != value:
                what = key.split("/", 1)
                label = f"upstream {what[1]} artifacts" if what[0] == "stage" else f"input {what[1]}"
                return Status("stale", f"{label} changed", m)
        for name, digest in m["artifacts"].items():
            path = self.dir(stage.name) / name
            if not path.exists():
                return Status("stale", f"artifact {path} is missing", m)
        for name, digest in m["artifacts"].items():
            if fingerprint(self.dir(stage.name) / name) != digest:
                return Status("modified", f"artifact {self.dir(stage.name) / name} was modified or "
                                          f"truncated after its run", m)
        return Status("done", "", m)

    def downstream(self, names: set[str]) -> set[str]:
        out = set(names)
        for s in self.stages:  # stages are listed in pipeline order
            if out & set(s.upstream):
                out.add(s.name)
        return out

    # -- running
    def run(self, targets: list[Stage], force: set[str] = frozenset()) -> dict[str, str]:
        """Run each target stage that is not up to date (and every forced one), in order."""
        forced = self.downstream(set(force))
        outcome = {}
        for stage in targets:
            st = self.status(stage)
            if st.done and stage.name not in forced:
                self.echo(f"[{stage.name}] up to date (cached) - {self.dir(stage.name)}")
                outcome[stage.name] = "cached"
                continue
            if st.state == "modified" and stage.name not in forced:
                raise StageError(f"[{stage.name}] {st.reason}; refusing to trust it. "
                                 f"Run again with --force {stage.name} to rebuild it.")
            why = "forced" if stage.name in forced else st.reason
            self.echo(f"[{stage.name}] running ({why})")
            self._execute(stage, resume_allowed=stage.name not in forced)
            outcome[stage.name] = "ran"
        return outcome

    def _execute(self, stage: Stage, resume_allowed: bool) -> None:
        d = self.dir(stage.name)
        key = {"settings": self.settings_of(stage), "inputs": self.inputs_of(stage)}
        for up in stage.upstream:
            if not self.status(self.stage(up)).done:
                raise StageError(f"[{stage.name}] needs upstream stage {up}, which is not up to date")
        resume = False
        try:
            resume = resume_allowed and json.loads((d / RUNNING).read_text()) == json.loads(json.dumps(key, default=str))
        except (FileNotFoundError, ValueError):
            pass
        with contextlib.suppress(FileNotFoundError):
            (d / MANIFEST).unlink()  # from here on, nothing in d is trusted until the new manifest
        if not resume and d.exists():
            shutil.rmtree(d)
        elif resume:
            clear_temp_files(d)
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / RUNNING, key)
        started = time.time()
        run = Run(self, stage, resume)
        counts = stage.function()(run) or {}
        for name in stage.artifacts:
            if not (d / name.rstrip("/")).exists():
                raise StageError(f"[{stage.name}] finished without writing its artifact {name} (a bug)")
        run.write_csv(SKIPPED, pd.DataFrame(run.skipped, columns=["Image", "reason"]))
        finished = time.time()
        manifest = {
            "stage": stage.name, **key,
            "artifacts": self.artifact_digests(stage),
            "counts": {**counts, "skipped": len(run.skipped)},
            "versions": versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(finished)),
            "seconds": round(finished - started, 3),
            "resumed": resume,
        }
        write_json(d / MANIFEST, manifest)
        (d / RUNNING).unlink()
        note = f", {len(run.skipped)} skipped (see {d / SKIPPED})" if run.skipped else ""
        self.echo(f"[{stage.name}] done in {finished - started:.1f}s{note}")


class Run:
    """One execution of one stage: where to write, how to read upstream results, what was skipped."""

    def __init__(self, session: Session, stage: Stage, resume: bool):
        self.session, self.stage, self.resume = session, stage, resume
        self.cfg, self.data, self.work = session.cfg, session.data, session.work
        self.workers, self.dir = session.workers, session.dir(stage.name)
        self.skipped: list[tuple[str, str]] = []

    def setting(self, dotted: str):
        if not self.stage.reads(dotted):
            raise KeyError(f"stage {self.stage.name} reads {dotted} without declaring it (a bug)")
        return get_setting(self.cfg, dotted)

    def path(self, name: str) -> Path:
        return self.dir / name

    def echo(self, msg: str) -> None:
        self.session.echo(f"[{self.stage.name}] {msg}")

    def skip(self, image: str, reason: str) -> None:
        self.skipped.append((image, reason))

    # -- reading upstream artifacts (checked against their manifest before use)
    def upstream(self, stage: str, name: str) -> Path:
        if stage not in self.stage.upstream:
            raise KeyError(f"stage {self.stage.name} reads {stage} without declaring it (a bug)")
        path = self.session.dir(stage) / name
        m = self.session.manifest(stage)
        if m is None or name not in m["artifacts"]:
            raise StageError(f"{path}: no manifest records it; run the {stage} stage again")
        if fingerprint(path) != m["artifacts"][name]:
            raise StageError(f"{path} does not match its manifest (modified or truncated); refusing to "
                             f"load it. Rerun with --force {stage}.")
        return path

    def load_pickle(self, stage: str, name: str):
        with open(self.upstream(stage, name), "rb") as f:
            return pickle.load(f)

    def read_csv(self, stage: str, name: str) -> pd.DataFrame:
        """An upstream table; names of photos and ids stay text (pandas would read ids that look like
        numbers, e.g. import-folders' folder names "10", as integers, and they would match nothing)."""
        return pd.read_csv(self.upstream(stage, name), keep_default_na=False, dtype=TEXT_COLUMNS)

    # -- writing this stage's artifacts, atomically
    def write_pickle(self, name: str, obj) -> Path:
        write_bytes(self.path(name), pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        return self.path(name)

    def write_csv(self, name: str, df: pd.DataFrame) -> Path:
        write_bytes(self.path(name), df.to_csv(index=False).encode())
        return self.path(name)

    def write_json(self, name: str, obj) -> Path:
        write_json(self.path(name), obj)
        return self.path(name)

    # -- per-item work over all cores
    def map(self, fn: Callable, items: Iterable, desc: str, total: int | None = None,
            chunksize: int = 16) -> Iterator:
        """fn over items in order, in `workers` processes, with a progress bar; results stream."""
        items = list(items) if total is None else items
        total = len(items) if total is None else total
        bar = dict(total=total, desc=f"[{self.stage.name}] {desc}", disable=not self.session.progress,
                   unit="img", dynamic_ncols=True, mininterval=0.5)
        if self.workers <= 1 or total < 2 * chunksize:
            yield from tqdm(map(fn, items), **bar)
            return
        if "tensorflow" in sys.modules:
            # TensorFlow's threads make fork unsafe and spawn costs seconds of imports; decoding and
            # OpenCV release the GIL, so threads keep the model fed (predict, evaluate).
            pool = multiprocessing.pool.ThreadPool(self.workers)
        else:
            pool = multiprocessing.get_context("fork").Pool(self.workers)
        with pool:
            yield from tqdm(pool.imap(fn, items, chunksize=chunksize), **bar)
