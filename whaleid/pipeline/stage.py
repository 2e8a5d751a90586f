"""The stage cache, one mechanism for every stage (think DVC).

A Stage declares its inputs (files in the data folder, artifacts of upstream stages), the settings
it reads, and the artifacts it writes into WORK/<stage>/. After a successful run it writes
WORK/<stage>/manifest.json: fingerprints of inputs and settings, sha256 of every artifact, versions,
times and counts. A stage is up to date when its manifest matches what it would read now; "up to
date" is decided by these fingerprints only. Upstream artifacts enter a stage's fingerprint by
their sha256, so a changed upstream result reruns everything downstream, never anything upstream.
Fingerprints are content hashes (files.py) and name no absolute path: a settings value that names a
file (a box CSV, a weights file) enters by that file's content, so a work folder copied anywhere,
or run against a copy of its data folder, is up to date where its contents are.
A setting that a newer whaleid added, and that the manifest therefore lacks, counts as unchanged
while it holds its shipped default (config.shipped_default: a new setting's default keeps the old
behaviour), so upgrading whaleid does not retrain a model that took hours (**).

Crash safety: the old manifest is deleted before a stage starts, artifacts are written atomically
(temp file + rename) and the manifest is written last, so a killed run leaves nothing a rerun would
trust. A stage killed part way may resume its own per-item work when it reruns with exactly the same
fingerprint (`Run.resume`), e.g. training continues from its last checkpoint; it first deletes the
temp files of the writes the kill cut short. Per-photo work goes through `Run.map_resumable`, which
commits results in chunks (WORK/<stage>/.partial/): a kill loses at most the chunk each worker was on.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from whaleid.pipeline.config import get as get_setting, shipped_default
from whaleid.pipeline.files import LOCK, STATE, HashState, StageError, atomic_path, clear_temp_files, digest_folder, fault_point, fingerprint, matches, quiet_native_startup, sha256_file, versions, work_lock, write_bytes, write_json
from whaleid.pipeline.workers import PARTIAL, PhotoWork

MANIFEST = "manifest.json"
RUNNING = ".running.json"
SKIPPED = "skipped.csv"
SETTINGS_RECORD = "whaleid.json"   # WORK/whaleid.json: the data folder, config and --set a work folder was run with
FILE_SETTING = "<a file: its content is input file/KEY>"  # a setting naming a file, in the settings fingerprint
TEXT_COLUMNS = {"Image": str, "Id": str, "File": str, "truth": str}


# ---------------------------------------------------------------- stages

@dataclass(frozen=True)
class Stage:
    """A stage's inputs + settings -> artifacts. `run` is the stage's function or its dotted path
    ("whaleid.learning.train:run"), imported only when the stage runs: declaring stages stays light."""
    name: str
    run: Callable[["Run"], dict | None] | str
    artifacts: tuple[str, ...]            # names inside WORK/<name>/; a trailing "/" marks a folder
    settings: tuple[str, ...] = ()        # dotted config keys the stage reads; "section.*": all of a section
    data: tuple[str, ...] = ()            # files/folders inside the data folder
    upstream: tuple[str, ...] = ()        # stages whose artifacts this one reads
    # settings whose value names a file: (key, value -> Path or None); the file's content is the input
    # file/KEY, and the settings fingerprint records FILE_SETTING instead of the path
    files: tuple[tuple[str, Callable[[Any], Path | None]], ...] = ()
    extra_inputs: Callable[["Session"], dict[str, Path]] | None = None  # other files: {label: path} -> file/label

    def function(self) -> Callable[["Run"], dict | None]:
        if callable(self.run):
            return self.run
        module, name = self.run.split(":")
        with quiet_native_startup():  # a stage module may load TensorFlow
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
    state: HashState | None = field(default=None, repr=False)   # WORK/.whaleid_state, opened on first use
    _memo: dict = field(default_factory=dict, repr=False)        # data-folder fingerprints of this session

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

    # -- content fingerprints, through the work folder's stat cache
    def hash_state(self) -> HashState:
        if self.state is None:
            self.state = HashState(self.work / STATE if self.work.is_dir() else None)
        elif self.state.path is None and self.work.is_dir():  # the work folder was created since
            learnt, self.state = self.state, HashState(self.work / STATE)
            self.state.adopt(learnt)
        return self.state

    def _report(self, text: str) -> None:
        self.echo(f"[cache] {text}")

    def fingerprint(self, path: Path) -> str | None:
        return fingerprint(path, self.hash_state(), self.workers, self._report)

    def matches(self, recorded, path: Path) -> bool:
        return matches(recorded, path, self.hash_state(), self.workers, self._report)

    def close(self) -> None:
        """Write what the stat cache learnt (call at the end of a command)."""
        if self.state is not None:
            self.state.close()
            self.state = None

    # -- fingerprints of what a stage would read now
    def file_settings(self, stage: Stage) -> dict[str, Path | None]:
        """{setting key: the file its value names, or None} for the stage's file-naming settings."""
        return {key: to_path(get_setting(self.cfg, key)) for key, to_path in stage.files}

    def input_paths(self, stage: Stage, need_data: bool = True) -> dict[str, Path]:
        """{input key: path} of the data files and other files a stage reads (not upstream stages).
        Without a data folder (not given, not where WORK remembers it): an error, or with need_data
        False, no data inputs (a status check then takes them as recorded)."""
        paths = {}
        for rel in stage.data:
            if self.data is None and not need_data:
                continue
            if self.data is None:
                raise StageError(f"stage {stage.name} reads the data folder: pass --data DIR (a folder with "
                                 f"train.csv, sample_submission.csv, train/, test/)")
            paths[f"data/{rel}"] = self.data / rel
        for key, p in self.file_settings(stage).items():
            if p is not None:
                paths[f"file/{key}"] = Path(p)
        if stage.extra_inputs:
            extra = stage.extra_inputs(self)
            if not isinstance(extra, dict):  # a list of paths: labelled by file name
                extra = {Path(p).name: p for p in extra}
            for label, p in extra.items():
                paths[f"file/{label}"] = Path(p)
        return paths

    def _input_fingerprint(self, key: str, path: Path) -> str | None:
        if key.startswith("data/"):  # the data folder is never written by whaleid: once per session
            memo = str(path)
            if memo not in self._memo:
                self._memo[memo] = self.fingerprint(path)
            return self._memo[memo]
        return self.fingerprint(path)

    def inputs_of(self, stage: Stage) -> dict:
        fp = {key: self._input_fingerprint(key, p) for key, p in self.input_paths(stage).items()}
        for up in stage.upstream:
            m = self.manifest(up)
            fp[f"stage/{up}"] = m["artifacts"] if m else None
        return fp

    def settings_of(self, stage: Stage) -> dict:
        named = self.file_settings(stage)
        return {key: FILE_SETTING if named.get(key) is not None else get_setting(self.cfg, key)
                for key in stage.setting_keys(self.cfg)}

    def artifact_digests(self, stage: Stage) -> dict:
        out = {}
        for name in stage.artifacts + (SKIPPED,):
            out[name.rstrip("/")] = self.fingerprint(self.dir(stage.name) / name.rstrip("/"))
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
            if key not in m["settings"] and value == shipped_default(key):
                continue  # (**)
            was = m["settings"].get(key, "<absent>")
            if was != value and not (value == FILE_SETTING and was == get_setting(self.cfg, key)):  # (*)
                return Status("stale", f"setting {key} changed ({was!r} -> {value!r})", m)
        paths = self.input_paths(stage, need_data=False)
        recorded = m["inputs"]
        for key, path in paths.items():
            # (*) a manifest of an earlier whaleid keyed a named file by its path: file/<path>
            was = recorded[key] if key in recorded else recorded.get(f"file/{path}")
            if key.startswith("data/") and not str(was).startswith("files:"):
                same = was == self._input_fingerprint(key, path)
            else:
                same = self.matches(was, path)
            if not same:
                if key.startswith("file/") and not path.exists():
                    return Status("stale", f"input {path} ({key[5:]}) is missing", m)
                return Status("stale", f"input {key.split('/', 1)[1]} changed", m)
        for up in stage.upstream:
            now = self.manifest(up)
            if recorded.get(f"stage/{up}") != (now["artifacts"] if now else None):
                return Status("stale", f"upstream {up} artifacts changed", m)
        for name, digest in m["artifacts"].items():
            path = self.dir(stage.name) / name
            if not path.exists():
                return Status("stale", f"artifact {path} is missing", m)
        for name, digest in m["artifacts"].items():
            if not self.matches(digest, self.dir(stage.name) / name):
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
        outcome, seen = {}, {}
        for stage in targets:
            st = self.status(stage, seen)  # shared: each stage's artifacts are fingerprinted once
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
            seen.clear()  # this stage's status, and its downstream stages', changed
        if self.state is not None:
            self.state.flush()
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
        except (OSError, ValueError):
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
        run = Run(self, stage, resume, run_key=hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest())
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
        if run.partial_stats:
            manifest["partial"] = run.partial_stats
        write_json(d / MANIFEST, manifest)
        (d / RUNNING).unlink()
        shutil.rmtree(d / PARTIAL, ignore_errors=True)  # the committed chunks served their purpose
        note = f", {len(run.skipped)} skipped (see {d / SKIPPED})" if run.skipped else ""
        self.echo(f"[{stage.name}] done in {finished - started:.1f}s{note}")


class Run(PhotoWork):
    """One execution of one stage: where to write, how to read upstream results, what was skipped;
    per-photo work over all cores (map, map_resumable: workers.py)."""

    def __init__(self, session: Session, stage: Stage, resume: bool, run_key: str = ""):
        self.session, self.stage, self.resume = session, stage, resume
        self.cfg, self.data, self.work = session.cfg, session.data, session.work
        self.workers, self.dir = session.workers, session.dir(stage.name)
        self.skipped: list[tuple[str, str]] = []
        self.run_key = run_key                       # digest of the fingerprint this run was started with
        self.partial_stats: dict[str, dict] = {}     # map_resumable: chunks per map, and how many were kept

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
        if not self.session.matches(m["artifacts"][name], path):
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
