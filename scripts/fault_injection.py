"""Fault injection: does the stage cache keep its promises when runs are killed or the cache is tampered with?

    python scripts/fault_injection.py [--seed 0] [--kills 3] [--keep] [--only CASE,...] [--epochs 4]
                                      [--code worktree|head]

Everything goes through the real command line (`python -m whaleid.cli ...` in subprocesses, on a
frozen copy of the code, see --code) on a small synthetic set with configs/scratch.toml and a few epochs.
First an uninterrupted run (the baseline: every stage's running time and final artifacts) and a second
one (the control: the pipeline must be deterministic, or no comparison below means anything). Then:

  kill STAGE #k   a copy of the baseline work folder without STAGE and its downstream stages (as if the
                  run had got that far); the command that runs STAGE is started and its process group
                  SIGKILLed (a pre-empted VM) at a random moment of STAGE's running time (its manifest's
                  "seconds", the faster of baseline and control) after the stage's own marker
                  WORK/STAGE/.running.json appears (the cache's file, not a log line: rewording the
                  output moves no kill): kill k of n uniformly in the k-th n-th of that window, so early
                  and late moments are both hit (drawn again, at most twice, if the command finished
                  first); then preprocess, train, evaluate, predict are rerun. Expected reruns: exactly
                  the stages left without a manifest by the kill. The final artifacts must equal the
                  baseline's. Train's kills #2, #3, ... alternate instead between its fault points
                  (WHALEID_FAULT, whaleid/pipeline/files.py fault_point): "train.best_saved@e" (between the
                  e-th best-N.npz and its checkpoint.npz) and "train.epoch_saved@e" (right after the
                  e-th epoch's checkpoint), e drawn from the baseline's history.
  kill train mid-epoch  one more train kill at fault point "train.batch@N": batch b of epoch e >= 2
                  (steps per epoch from the baseline's split: train_files / train.batch_size): training
                  must resume from its checkpoint and end with the same history.
  A kill that did not land (the command finished first, or its fault point was never reached) is
  scored NOT KILLED, never PASS; the table is followed by the kills per stage: aimed at it, landed
  in it, landed elsewhere (between stages or in another stage), not killed.
  corrupt         boxes/BB_TRAIN.csv truncated: preprocess must refuse (naming the file and --force boxes)
                  and rerun nothing; `preprocess --force boxes` then the rest of the pipeline.
  delete          dedup/p2h.pickle deleted: dedup reruns.
  train image     one train photo changed (a copy of the data folder): the stages that read train/.
  test image      one test photo changed: the stages that read test/.
  config          augment.margin edited in a copy of the TOML file.
  kill STAGE in a chunk  dedup, boxes, augment: the command dies right after the stage committed its
                  2nd chunk of per-photo results (fault point STAGE.chunk); the rerun must keep every
                  committed chunk, compute only the rest, and end with the baseline's artifacts.
  copy            the baseline's work and data folders copied with `cp -r` to other paths: nothing reruns.
  touch           every photo of a copy of the data folder touched: nothing reruns.

For the cases, the expected reruns are worked out from the stage declarations (whaleid.stages.ALL:
data, settings, upstream) and the manifests before and after, by the rule the cache promises: a stage
reruns when it is forced or directly affected (its artifact is missing, its data or setting changed),
or when an upstream stage's artifacts now differ from the ones it recorded; never otherwise, so never
upstream of the change. The reruns observed are the CLI's "[stage] running (...)" lines. For the
changed image and config the final artifacts must equal a from-scratch run on the changed inputs.

"Equal artifacts" = for every stage, the sha256 of each artifact file (every file of a folder
artifact) equals the reference's, and the manifest's sha256 matches the file; except: train's
MODEL_TIME.pickle (wall time) is not compared; model.keras is compared by its weights (the zip's
model.weights.h5; the zip also holds a save date and Python object ids), and a file recording the
model file's sha256 (evaluate/metrics.json) with that digest masked. So a resumed training must end
with bit-identical weights, history, evaluation and predictions. Leftover temp files (.*.tmp) in a
finished work folder are a failure too.

Prints a table (case, detail, reruns observed (expected), result: PASS, FAIL or NOT KILLED) and the
kills per stage; exits 1 on any FAIL or when no kill landed in a stage that was to be killed. Takes
~15-25 minutes on 2 cores with the defaults. The temp folder is deleted unless --keep or a FAIL.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAIN = ["preprocess", "train", "evaluate", "predict"]
STAGES: list = []          # the stage declarations of the code under test (load_declarations)
ORDER: list[str] = []
COMMAND_OF: dict[str, str] = {}
PREPROCESS: set[str] = set()
CODE: Path | None = None   # the snapshot of the code under test


def snapshot_code(dest: Path, source: str) -> None:
    """The code under test, frozen for the whole run: the whaleid package and configs of the working
    tree ("worktree") or of the last commit ("head"). Others editing the checkout meanwhile (a new
    setting, a changed metric) would otherwise show up as unexplained reruns and differences."""
    dest.mkdir(parents=True)
    if source == "head":
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "whaleid", "configs"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    else:
        for folder in ("whaleid", "configs"):
            shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def load_declarations(code: Path) -> None:
    global STAGES, ORDER, COMMAND_OF, PREPROCESS, CODE
    CODE = code
    sys.path.insert(0, str(code))
    from whaleid.stages import ALL, BY_COMMAND  # stage declarations only; no TensorFlow
    import whaleid
    assert Path(whaleid.__file__).resolve().is_relative_to(code.resolve()), whaleid.__file__
    STAGES = ALL
    ORDER = [s.name for s in STAGES]
    COMMAND_OF = {s.name: cmd for cmd, stages in BY_COMMAND.items() for s in stages}
    PREPROCESS = {s.name for s in BY_COMMAND["preprocess"]}
NOT_COMPARED = {("train", "MODEL_TIME.pickle")}  # wall time
RUNNING = re.compile(r"^\[(\w+)\] running \((.*)\)\s*$")
CMD_TIMEOUT = 1800


def whaleid_cmd() -> list[str]:
    return [sys.executable, "-m", "whaleid.cli"]


def child_env() -> dict:
    path = os.pathsep.join(p for p in (str(CODE), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}


# ---------------------------------------------------------------- running the CLI

@dataclass
class Result:
    args: list
    code: int | None                      # None: killed by us (a fault point's own kill: -SIGKILL)
    lines: list = field(default_factory=list)   # (seconds since start, line)
    stderr: str = ""
    killed: bool = False                  # SIGKILLed: by us, or by itself at its fault point

    @property
    def ran(self) -> list[str]:
        return [m.group(1) for _, l in self.lines if (m := RUNNING.match(l))]

    @property
    def text(self) -> str:
        return "\n".join(l for _, l in self.lines)

    def tail(self, n: int = 6) -> str:
        out = [l for _, l in self.lines][-n:] + self.stderr.strip().splitlines()[-n:]
        return "\n    ".join(out)


class Runner:
    def __init__(self, root: Path, config: Path, epochs: int, workers: int):
        self.root, self.config, self.epochs, self.workers = root, config, epochs, workers
        self.log = open(root / "commands.log", "a")

    def common(self, data: Path, config: Path | None = None) -> list[str]:
        return ["--data", str(data), "--config", str(config or self.config), "--set", f"train.epochs={self.epochs}",
                "--workers", str(self.workers), "--quiet"]

    def run(self, command: str, work: Path, data: Path, *extra, config: Path | None = None,
            kill_after: tuple[str | Path, float] | None = None, fault: str | None = None) -> Result:
        """Run `whaleid command`; with kill_after=(anchor, seconds), SIGKILL its process group that many
        seconds after `anchor` appears: a file (Path), or the first output line matching a regex (str);
        if the command ends first, nothing. With `fault`, the command runs with WHALEID_FAULT=fault and
        kills itself there."""
        args = whaleid_cmd() + [command, "--work", str(work)] + self.common(data, config) + list(extra)
        note = (f"   # kill {kill_after}" if kill_after else "") + (f"   # WHALEID_FAULT={fault}" if fault else "")
        self.log.write(f"\n$ {' '.join(args)}{note}\n")
        self.log.flush()
        err = tempfile.TemporaryFile(mode="w+")
        t0 = time.monotonic()
        env = child_env()
        if fault:
            env["WHALEID_FAULT"] = fault
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                cwd=self.root, start_new_session=True)
        res = Result(args, None)
        seen = threading.Event()

        def read():
            for line in proc.stdout:
                line = line.rstrip("\n")
                res.lines.append((time.monotonic() - t0, line))
                self.log.write(line + "\n")
                if kill_after and isinstance(kill_after[0], str) and re.match(kill_after[0], line):
                    seen.set()
            seen.set()  # the process ended without the line: nothing to kill

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        killed = False
        if kill_after:
            if isinstance(kill_after[0], Path):  # the marker file: polled, the command may end first
                give_up = time.monotonic() + CMD_TIMEOUT
                while not kill_after[0].exists() and proc.poll() is None and time.monotonic() < give_up:
                    time.sleep(0.002)
            else:
                seen.wait(CMD_TIMEOUT)
            deadline = time.monotonic() + kill_after[1]
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))
            if proc.poll() is None:
                with_suppress(lambda: os.killpg(proc.pid, signal.SIGKILL))  # the process and its workers
                killed = True
        try:
            proc.wait(CMD_TIMEOUT)
        except subprocess.TimeoutExpired:
            with_suppress(lambda: os.killpg(proc.pid, signal.SIGKILL))
            proc.wait()
        if killed:  # workers of the group may outlive the leader by a moment; make sure none is left
            with_suppress(lambda: os.killpg(proc.pid, signal.SIGKILL))
        reader.join(30)
        err.seek(0)
        res.stderr = err.read()
        err.close()
        res.code = None if killed else proc.returncode
        res.killed = killed or proc.returncode == -signal.SIGKILL
        self.log.write(f"# exit {res.code}{' (killed)' if res.killed else ''}\n")
        self.log.flush()
        return res

    def chain(self, work: Path, data: Path, commands=CHAIN, config: Path | None = None) -> list[Result]:
        return [self.run(c, work, data, config=config) for c in commands]


def stage_times(work: Path) -> dict[str, float]:
    """Each stage's running time as its manifest records it ("seconds": from its .running.json marker
    to its manifest), read from the files, not from log lines."""
    return {s: float(m["seconds"]) for s in ORDER if (m := manifest(work, s)) and "seconds" in m}


def with_suppress(fn):
    try:
        fn()
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- reading a work folder

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_digest(path: Path, masks: dict[str, str] | None = None) -> str | None:
    """sha256 of a file; for a folder, of every file's relative name and sha256 (dot files skipped).
    A Keras model file: the sha256 of its weights (model.weights.h5 in the zip; the zip also holds its
    save date and Python object ids). `masks` {text: placeholder}: replaced in a file before hashing
    (evaluate's metrics.json records the model file's sha256)."""
    if path.is_file():
        if path.suffix == ".keras" and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if "model.weights.h5" in z.namelist():
                    return "weights:" + hashlib.sha256(z.read("model.weights.h5")).hexdigest()
        if masks:
            raw = path.read_bytes()
            for text, placeholder in masks.items():
                raw = raw.replace(text.encode(), placeholder.encode())
            return hashlib.sha256(raw).hexdigest()
        return sha256(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(f"{p.relative_to(path)}\0{sha256(p)}\n".encode())
    return h.hexdigest()


def manifest(work: Path, stage: str) -> dict | None:
    try:
        return json.loads((work / stage / "manifest.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def manifests(work: Path) -> dict:
    return {s: manifest(work, s) for s in ORDER}


def snapshot(work: Path) -> dict:
    """{stage/artifact: content digest} of every stage's artifacts, plus WORK/submission.csv."""
    out = {}
    model = ((manifest(work, "train") or {}).get("artifacts") or {}).get("model.keras")
    masks = {model: "<the model file's sha256>"} if model else None
    for s in ORDER:
        m = manifest(work, s)
        if m is None:
            out[f"{s}/manifest.json"] = None
            continue
        for name in m["artifacts"]:
            if (s, name) not in NOT_COMPARED:
                out[f"{s}/{name}"] = content_digest(work / s / name, masks)
    out["submission.csv"] = content_digest(work / "submission.csv")
    return out


def integrity(work: Path) -> list[str]:
    """Problems: a manifest whose file sha256 does not match its artifact; leftover temp files."""
    bad = []
    for s in ORDER:
        m = manifest(work, s)
        for name, digest in (m or {}).get("artifacts", {}).items():
            p = work / s / name
            if p.is_file() and sha256(p) != digest:
                bad.append(f"{s}/{name} differs from its manifest")
    tmps = [str(p.relative_to(work)) for p in work.rglob(".*.tmp")]
    if tmps:
        bad.append(f"{len(tmps)} leftover temp file(s), e.g. {tmps[0]}")
    return bad


def compare(work: Path, ref: dict) -> list[str]:
    now = snapshot(work)
    return [k for k in sorted(set(now) | set(ref)) if now.get(k) != ref.get(k)]


def downstream(names: set[str]) -> set[str]:
    out = set(names)
    for s in STAGES:
        if out & set(s.upstream):
            out.add(s.name)
    return out


def oracle(before: dict, after: dict, direct: set[str], forced: set[str]) -> set[str]:
    """The stages the cache promises to rerun: forced or directly affected ones, and each stage whose
    recorded upstream artifacts differ from that stage's artifacts now."""
    reran = set()
    for s in STAGES:
        old = before.get(s.name)
        if s.name in direct or s.name in forced or old is None:
            reran.add(s.name)
            continue
        for up in s.upstream:
            if up in reran and (after.get(up) or {}).get("artifacts") != old["inputs"].get(f"stage/{up}"):
                reran.add(s.name)
                break
    return reran


def fmt(stages) -> str:
    """Stages in pipeline order; three or more consecutive ones as first..last."""
    idx = sorted(ORDER.index(s) for s in set(stages))
    if not idx:
        return "none"
    runs, out = [[idx[0]]], []
    for i in idx[1:]:
        if i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    for r in runs:
        out.append(f"{ORDER[r[0]]}..{ORDER[r[-1]]}" if len(r) >= 3 else ",".join(ORDER[i] for i in r))
    return ",".join(out)


# ---------------------------------------------------------------- cases

@dataclass
class Row:
    case: str
    detail: str
    observed: str
    expected: str
    ok: bool
    why: str = ""
    stage: str = ""             # kill rows: the stage the kill aimed at
    landed: str | None = None   # kill rows: where it landed (a stage, "between stages"); None: not killed

    @property
    def result(self) -> str:
        """FAIL when a check failed; NOT KILLED when a kill row's kill never landed (whatever its checks
        say: nothing was tested); else PASS."""
        if not self.ok:
            return "FAIL"
        if self.stage and self.landed is None:
            return "NOT KILLED"
        return "PASS"


class Suite:
    def __init__(self, args, root: Path):
        self.args = args
        self.root = root
        self.rng = random.Random(args.seed)
        self.rows: list[Row] = []
        self.data = self.root / "data"
        self.config = self.root / "cpu.toml"
        shutil.copy(CODE / "configs" / "scratch.toml", self.config)
        self.r = Runner(self.root, self.config, args.epochs, args.workers)
        self.base = self.root / "base"
        self.durations: dict[str, float] = {}

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.say(f"  -> {row.case}: {row.result}  reruns {row.observed} (expected "
                 f"{row.expected}); {row.detail}" + (f"; {row.why}" if row.why else ""))

    def copy_work(self, name: str, src: Path | None = None) -> Path:
        dst = self.root / name
        shutil.copytree(src or self.base, dst, symlinks=True)
        return dst

    def check_chain(self, results: list[Result]) -> str:
        failed = [r for r in results if r.code != 0]
        return "" if not failed else (f"'{failed[0].args[len(whaleid_cmd())]}' exited {failed[0].code}: "
                                      f"{failed[0].tail()}")

    # -- baseline and control
    def baseline(self) -> None:
        self.say(f"work in {self.root}")
        t = time.monotonic()
        synth = subprocess.run(whaleid_cmd() + ["synth", "--out", str(self.data), "--ids", str(self.args.ids),
                                                "--photos", "uniform:6", "--seed", "1", "--quiet"],
                               capture_output=True, text=True, cwd=self.root, env=child_env())
        if synth.returncode:
            sys.exit(f"synth failed: {synth.stderr}")
        self.say(synth.stdout.strip())
        results = self.r.chain(self.base, self.data)
        if err := self.check_chain(results):
            sys.exit(f"the uninterrupted baseline run failed: {err}")
        self.durations = stage_times(self.base)
        self.train_plan()
        self.ref = snapshot(self.base)
        self.say(f"baseline in {time.monotonic() - t:.0f}s; stage times (manifests): "
                 + ", ".join(f"{s} {self.durations.get(s, 0):.2f}s" for s in ORDER)
                 + f"; train: {self.train_epochs} epochs of {self.train_steps} batches, "
                   f"{self.train_bests} new best(s)")
        problems = integrity(self.base)
        if problems:
            sys.exit(f"the baseline work folder is inconsistent: {problems}")

    def control(self) -> None:
        self.say("control: a second uninterrupted run")
        work = self.root / "control"
        results = self.r.chain(work, self.data)
        err = self.check_chain(results)
        diff = compare(work, self.ref)
        observed = {s for r in results for s in r.ran}
        for stage, d in stage_times(work).items():  # the kill windows: the faster of the two runs
            self.durations[stage] = min(d, self.durations.get(stage, d))
        self.add(Row("control (no fault)", "second run from scratch", fmt(observed), fmt(ORDER),
                     not err and not diff and observed == set(ORDER),
                     err or (f"differs from the baseline: {', '.join(diff[:4])}" if diff else "")))
        self.cleanup(work)

    # -- SIGKILL at random moments
    def train_plan(self) -> None:
        """What train's fault points can aim at, from the baseline's files: epochs run, batches per
        epoch (split's train_files / train.batch_size) and how often a new best was saved."""
        train = (manifest(self.base, "train") or {}).get("counts", {})
        split = (manifest(self.base, "split") or {}).get("counts", {})
        self.train_epochs = int(train.get("epochs", self.args.epochs))
        import tomllib
        batch = tomllib.loads(self.config.read_text()).get("train", {}).get("batch_size", 32)
        self.train_steps = max(1, -(-int(split.get("train_files", batch)) // int(batch)))
        monitor = next((k[5:] for k in train if k.startswith("best_") and k != "best_epoch"), None)
        self.train_bests = 1
        try:
            import csv
            with open(self.base / "train" / "history.csv") as f:
                values = [float(r[monitor]) for r in csv.DictReader(f)] if monitor else []
            sign = -1.0 if monitor and "loss" in monitor else 1.0
            best, bests = None, 0
            for v in values:
                if best is None or sign * v > sign * best:
                    best, bests = v, bests + 1
            self.train_bests = max(1, bests)
        except (OSError, KeyError, ValueError):
            pass

    def kill_moment(self, stage: str, k: int, resume_case: bool, work: Path):
        """(kill_after, fault, description) of kill k of `stage`: train's fault points for its kills
        after the first and the mid-epoch case, else a random moment after the stage's marker."""
        if stage == "train" and resume_case:  # batch b of epoch e >= 2: a checkpoint exists to resume from
            e = self.rng.randint(min(2, self.train_epochs), self.train_epochs)
            b = self.rng.randint(1, max(1, self.train_steps - 1))
            return None, f"train.batch@{(e - 1) * self.train_steps + b}", \
                f"fault point train.batch: batch {b}/{self.train_steps} of epoch {e}"
        if stage == "train" and k > 0:
            if k % 2 == 1:
                e = self.rng.randint(1, self.train_bests)
                return None, f"train.best_saved@{e}", f"fault point train.best_saved: new best #{e} written, " \
                                                       f"its checkpoint not yet"
            e = self.rng.randint(1, self.train_epochs)
            return None, f"train.epoch_saved@{e}", f"fault point train.epoch_saved: after epoch {e}'s checkpoint"
        d = self.durations.get(stage, 0.0)
        n = max(1, self.args.kills)  # stratified: kill k of n falls in the k-th n-th of the window
        at = self.rng.uniform(k * d / n, (k + 1) * d / n)
        return (work / stage / ".running.json", at), None, f"+{at:.2f}s of {d:.2f}s after its .running.json"

    def without(self, name: str, stage: str) -> Path:
        """A copy of the baseline work folder without `stage` and its downstream stages (as if the run
        had got just that far)."""
        work = self.root / name
        shutil.rmtree(work, ignore_errors=True)
        self.copy_work(work.name)
        for s in downstream({stage}):
            shutil.rmtree(work / s, ignore_errors=True)
        if "predict" in downstream({stage}):
            (work / "submission.csv").unlink(missing_ok=True)
        return work

    def kill(self, stage: str, k: int, resume_case: bool = False) -> None:
        """Kill `stage` (see the module doc) and check the rerun. resume_case: at a batch of an epoch
        after the first, so training must resume from a checkpoint."""
        for draw in range(1, 4):  # a command that finished before its kill moment: draw again (twice)
            work = self.without(f"kill-{stage}-{k}", stage)
            kill_after, fault, when = self.kill_moment(stage, k, resume_case, work)
            res = self.r.run(COMMAND_OF[stage], work, self.data, kill_after=kill_after, fault=fault)
            if res.killed or fault:  # a fault point is where it is: drawing again would not move it
                break
        time.sleep(0.5)  # workers of a self-killed command finish the item they are on and exit
        after_kill = manifests(work)
        running = [s for s in ORDER if after_kill[s] is None and (work / s / ".running.json").exists()]
        landed = None
        if not res.killed:
            where = (f"NOT KILLED: finished first (exit {res.code})" if not fault
                     else f"NOT KILLED: fault point {fault} never reached (exit {res.code})")
        elif running:
            landed = running[0]
            where = f"killed in {running[0]}"
            epochs = [int(m.group(1)) for _, l in res.lines if (m := re.match(r"\[train\] epoch (\d+)/", l))]
            if running[0] == "train" and not fault:
                where += f" after epoch {max(epochs)}" if epochs else " before epoch 1"
        else:
            landed = "between stages"
            where = "killed between stages"
        expected = {s for s in ORDER if after_kill[s] is None}
        results = self.r.chain(work, self.data)
        observed = [s for r in results for s in r.ran]
        err = self.check_chain(results)
        diff = compare(work, self.ref)
        problems = integrity(work)
        notes, resumed_epoch = [], None
        for s in running:  # per-item resumption (train: from its checkpoint; augment: finished photos kept)
            m = manifest(work, s) or {}
            frm = m.get("counts", {}).get("resumed_from_epoch")
            if frm is not None:
                notes.append(f"{s} resumed after epoch {frm}")
                resumed_epoch = frm
            elif m.get("resumed"):
                notes.append(f"{s} resumed")
        if resume_case and landed and resumed_epoch is None and not err:
            problems.append("training did not resume from its checkpoint")
        detail = (f"{when}{f' (draw {draw})' if draw > 1 else ''}, {where}"
                  + (f" ({'; '.join(notes)})" if notes else ""))
        why = err or "; ".join(([f"artifacts differ: {', '.join(diff[:4])}"] if diff else []) + problems
                               + ([f"{fmt(set(observed))} ran more than once"] if len(observed) != len(set(observed)) else []))
        name = f"kill {stage} #{k + 1}" + (" mid-epoch" if resume_case else "")
        self.add(Row(name, detail, fmt(observed), fmt(expected), not why and set(observed) == expected, why,
                     stage=stage, landed=landed))
        self.cleanup(work)

    # -- tampering with the cache and the inputs
    def corrupt(self) -> None:
        work = self.copy_work("corrupt")
        target = work / "boxes" / "BB_TRAIN.csv"
        raw = target.read_bytes()
        target.write_bytes(raw[: len(raw) // 2])
        before = manifests(work)
        first = self.r.run("preprocess", work, self.data)
        refused = (first.code not in (0, None) and str(target) in first.stderr and "--force boxes" in first.stderr
                   and not first.ran)
        forced = self.r.run("preprocess", work, self.data, "--force", "boxes")
        rest = self.r.chain(work, self.data, CHAIN[1:])
        results = [forced] + rest
        observed = [s for r in [first] + results for s in r.ran]
        expected = oracle(before, manifests(work), set(), downstream({"boxes"}) & PREPROCESS)
        err = self.check_chain(results)
        diff = compare(work, self.ref)
        why = ("" if refused else f"preprocess did not refuse the truncated file clearly: exit {first.code}, "
                                  f"{first.tail(3)}") or err or "; ".join(
            ([f"artifacts differ: {', '.join(diff[:4])}"] if diff else []) + integrity(work))
        self.add(Row("corrupt boxes/BB_TRAIN.csv", "refused, then --force boxes" if refused else "not refused",
                     fmt(observed), fmt(expected), not why and set(observed) == expected, why))
        self.cleanup(work)

    def delete(self) -> None:
        work = self.copy_work("delete")
        (work / "dedup" / "p2h.pickle").unlink()
        before = manifests(work)
        results = self.r.chain(work, self.data)
        observed = [s for r in results for s in r.ran]
        expected = oracle(before, manifests(work), {"dedup"}, set())
        err = self.check_chain(results)
        diff = compare(work, self.ref)
        why = err or "; ".join(([f"artifacts differ: {', '.join(diff[:4])}"] if diff else []) + integrity(work))
        self.add(Row("delete dedup/p2h.pickle", "rerun the pipeline", fmt(observed), fmt(expected),
                     not why and set(observed) == expected, why))
        self.cleanup(work)

    def changed_input(self, folder: str) -> None:
        """Change one photo of data/<folder>/ in a copy of the data folder; incremental == from scratch."""
        from PIL import Image, ImageDraw
        data = self.root / f"data-{folder}"
        shutil.copytree(self.data, data)
        photo = sorted((data / folder).iterdir())[self.rng.randrange(len(list((data / folder).iterdir())))]
        with Image.open(photo) as im:
            im = im.convert(im.mode)
        ImageDraw.Draw(im).rectangle([0, 0, im.width // 3, im.height // 3], fill=(255, 255, 255) if im.mode == "RGB" else 255)
        im.save(photo, "JPEG", quality=90)
        clean = self.root / f"clean-{folder}"
        clean_results = self.r.chain(clean, data)
        work = self.copy_work(f"changed-{folder}")
        before = manifests(work)
        results = self.r.chain(work, data)
        observed = [s for r in results for s in r.ran]
        direct = {s.name for s in STAGES if f"{folder}/" in s.data}
        expected = oracle(before, manifests(work), direct, set())
        err = self.check_chain(clean_results) or self.check_chain(results)
        diff = compare(work, snapshot(clean))
        why = err or "; ".join(([f"differs from a from-scratch run: {', '.join(diff[:4])}"] if diff else [])
                               + integrity(work))
        self.add(Row(f"changed {folder} image", f"{photo.name} edited; compared with a from-scratch run",
                     fmt(observed), fmt(expected), not why and set(observed) == expected, why))
        self.cleanup(work, clean, data)

    def config_edit(self) -> None:
        key, value = "augment.margin", 0.12
        section, name = key.split(".")
        cfg = self.root / "cpu-edited.toml"
        import tomllib
        text = self.config.read_text()
        has_key = name in tomllib.loads(text).get(section, {})
        lines, current = [], None
        for line in text.splitlines():
            if m := re.match(r"\s*\[(\w+)\]", line):
                current = m.group(1)
            elif has_key and current == section and re.match(rf"\s*{name}\s*=", line):
                line = f"{name} = {value}"  # the file sets it: edit that line
            lines.append(line)
            if not has_key and line.strip() == f"[{section}]":
                lines.append(f"{name} = {value}")  # the file leaves it at its default: set it
                has_key = True
        if not has_key:
            lines += ["", f"[{section}]", f"{name} = {value}"]
        cfg.write_text("\n".join(lines) + "\n")
        assert tomllib.loads(cfg.read_text())[section][name] == value, cfg.read_text()
        clean = self.root / "clean-config"
        clean_results = self.r.chain(clean, self.data, config=cfg)
        work = self.copy_work("config")
        before = manifests(work)
        results = self.r.chain(work, self.data, config=cfg)
        observed = [s for r in results for s in r.ran]
        direct = {s.name for s in STAGES if key in s.settings}
        expected = oracle(before, manifests(work), direct, set())
        err = self.check_chain(clean_results) or self.check_chain(results)
        diff = compare(work, snapshot(clean))
        why = err or "; ".join(([f"differs from a from-scratch run: {', '.join(diff[:4])}"] if diff else [])
                               + integrity(work))
        self.add(Row(f"config {key}={value}", f"edited in the TOML file; compared with a from-scratch run",
                     fmt(observed), fmt(expected), not why and set(observed) == expected, why))
        self.cleanup(work, clean)

    # -- kills inside the per-photo stages, and copies (issue 16)
    def kill_chunk(self, stage: str, nth: int = 2) -> None:
        """The command running `stage` dies (SIGKILL, fault point <stage>.chunk) right after the stage
        committed its nth chunk of per-photo results; the rerun must keep every committed chunk
        (manifest "partial": kept == the chunk files the kill left), compute only the others, and end
        with the baseline's artifacts."""
        work = self.without(f"chunk-{stage}", stage)
        os.environ["WHALEID_FAULT"] = f"{stage}.chunk@{nth}"
        try:
            res = self.r.run(COMMAND_OF[stage], work, self.data)
        finally:
            del os.environ["WHALEID_FAULT"]
        time.sleep(1.0)  # the killed command's workers finish the chunk they are on and exit
        committed = len(list((work / stage / ".partial").glob("*.pickle")))
        after_kill = manifests(work)
        expected = {s for s in ORDER if after_kill[s] is None}
        results = self.r.chain(work, self.data)
        observed = [s for r in results for s in r.ran]
        err = self.check_chain(results)
        diff = compare(work, self.ref)
        problems = integrity(work)
        parts = (manifest(work, stage) or {}).get("partial", {})
        kept, computed, chunks = (sum(p[k] for p in parts.values()) for k in ("kept", "computed", "chunks"))
        if res.code != -signal.SIGKILL:
            problems.append(f"the fault point was not reached (exit {res.code})")
        elif kept != committed or kept < nth or computed != chunks - kept:
            problems.append(f"resume kept {kept} of {committed} committed chunks, computed {computed} of {chunks}")
        detail = (f"killed after chunk {nth}; {committed} chunk file(s) left; rerun kept {kept}, computed "
                  f"{computed} of {chunks}")
        why = err or "; ".join(([f"artifacts differ: {', '.join(diff[:4])}"] if diff else []) + problems)
        self.add(Row(f"kill {stage} in a chunk", detail, fmt(observed), fmt(expected),
                     not why and set(observed) == expected, why,
                     stage=stage, landed=stage if res.code == -signal.SIGKILL else None))
        self.cleanup(work)

    def copied(self) -> None:
        """The baseline's work and data folders copied with `cp -r` to other paths (new inodes, times and
        absolute paths, as a bucket sync to a new VM): the whole chain must find every stage up to date."""
        where = self.root / "copied"
        where.mkdir()
        for name, src in (("work", self.base), ("data", self.data)):
            subprocess.run(["cp", "-r", str(src), str(where / name)], check=True)
        results = self.r.chain(where / "work", where / "data")
        observed = [s for r in results for s in r.ran]
        err = self.check_chain(results)
        diff = compare(where / "work", self.ref)
        why = err or "; ".join(([f"artifacts differ: {', '.join(diff[:4])}"] if diff else []) + integrity(where / "work"))
        self.add(Row("copy work + data (cp -r)", "both folders at new paths; every photo's mtime new",
                     fmt(observed), "none", not why and not observed, why))
        self.cleanup(where)

    def touched(self) -> None:
        """Every photo touched (a copy of the data folder): content unchanged, nothing may rerun."""
        data = self.root / "data-touched"
        shutil.copytree(self.data, data)
        for p in list((data / "train").iterdir()) + list((data / "test").iterdir()):
            os.utime(p)
        work = self.copy_work("touched")
        results = self.r.chain(work, data)
        observed = [s for r in results for s in r.ran]
        why = self.check_chain(results) or "; ".join(integrity(work))
        self.add(Row("touch every photo", "mtimes changed, content not", fmt(observed), "none",
                     not why and not observed, why))
        self.cleanup(work, data)

    def cleanup(self, *paths: Path) -> None:
        if not self.args.keep and all(r.ok for r in self.rows):
            for p in paths:
                shutil.rmtree(p, ignore_errors=True)

    # -- all
    def run(self) -> int:
        only = set(self.args.only.split(",")) if self.args.only else None
        want = lambda name: only is None or name in only
        t = time.monotonic()
        self.baseline()
        if want("control"):
            self.control()
        for stage in ORDER:
            if want(stage) or want("kills"):
                for k in range(self.args.kills):
                    self.say(f"kill {stage} #{k + 1}")
                    self.kill(stage, k)
            if stage == "train" and (want("train") or want("kills") or want("train-resume")) and self.args.epochs > 1:
                self.say(f"kill train #{self.args.kills + 1} mid-epoch")
                self.kill("train", self.args.kills, resume_case=True)
        for stage in ("dedup", "boxes", "augment"):
            if want(f"{stage}-chunk") or want("chunks"):
                self.say(f"kill {stage} in a chunk")
                self.kill_chunk(stage)
        for name, fn in (("corrupt", self.corrupt), ("delete", self.delete),
                         ("train-image", lambda: self.changed_input("train")),
                         ("test-image", lambda: self.changed_input("test")), ("config", self.config_edit),
                         ("copy", self.copied), ("touch", self.touched)):
            if want(name) or want("cases"):
                self.say(name)
                fn()
        self.table(time.monotonic() - t)
        failed = [r for r in self.rows if not r.ok]
        unkilled = self.kills_per_stage()
        if self.args.keep or failed:
            self.say(f"work folders kept in {self.root} (commands and their output: {self.root / 'commands.log'})")
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        return 1 if failed or unkilled else 0

    def kills_per_stage(self) -> list[str]:
        """Print, per stage, the kills aimed at it, landed in it, landed elsewhere and not landed; return
        the stages that were to be killed and got no kill at all (a hole in what this run tested)."""
        rows = [r for r in self.rows if r.stage]
        if not rows:
            return []
        print()
        print("kills per stage: aimed at it | landed in it | landed elsewhere | NOT KILLED")
        holes = []
        for stage in ORDER:
            aimed = [r for r in rows if r.stage == stage]
            if not aimed:
                continue
            inside = sum(r.landed == stage for r in aimed)
            missed = sum(r.landed is None for r in aimed)
            print(f"  {stage:<9} {len(aimed):>3} | {inside:>3} | {len(aimed) - inside - missed:>3} | {missed:>3}")
            if inside == 0:
                holes.append(stage)
        if holes:
            print(f"no kill landed in: {', '.join(holes)}")
        return holes

    def table(self, seconds: float) -> None:
        heads = ("case", "detail", "reruns observed (expected)", "result")
        rows = [(r.case, r.detail, f"{r.observed} ({r.expected})", r.result) for r in self.rows]
        widths = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(heads)] if rows else [len(h) for h in heads]
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
        print()
        print(f"fault injection: seed {self.args.seed}, {self.args.kills} kill(s) per stage, "
              f"{self.args.epochs} epochs, {seconds / 60:.1f} min")
        print(line(heads))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in rows:
            print(line(r))
        for r in self.rows:
            if not r.ok:
                print(f"FAIL {r.case}: {r.why}")
        n_fail = sum(r.result == "FAIL" for r in self.rows)
        n_missed = sum(r.result == "NOT KILLED" for r in self.rows)
        print(f"{len(self.rows) - n_fail - n_missed} passed, {n_fail} failed, {n_missed} not killed "
              f"(a kill that did not land tests nothing: never counted as passed)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments and the changed photos")
    ap.add_argument("--kills", type=int, default=3, help="kills per stage")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (work folders, commands.log)")
    ap.add_argument("--only", default="", help="comma-separated: control, kills, cases, a stage name "
                                               "(its kills), train-resume, corrupt, delete, train-image, "
                                               "test-image, config, copy, touch, chunks (or dedup-chunk, "
                                               "boxes-chunk, augment-chunk)")
    ap.add_argument("--epochs", type=int, default=4, help="train.epochs")
    ap.add_argument("--ids", type=int, default=10, help="individuals in the synthetic set (6 photos each)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--code", choices=("worktree", "head"), default="worktree",
                    help="test the working tree's code (default) or the last commit's (git archive HEAD)")
    args = ap.parse_args()
    if args.kills < 0 or args.epochs < 1:
        ap.error("--kills >= 0, --epochs >= 1")
    os.nice(5)  # two shared cores: let interactive work go first (children inherit it)
    root = Path(tempfile.mkdtemp(prefix="whaleid-faults-"))
    snapshot_code(root / "code", args.code)
    load_declarations(root / "code")
    print(f"code under test: {args.code} of {ROOT} (a copy in {root / 'code'})", flush=True)
    return Suite(args, root).run()


if __name__ == "__main__":
    sys.exit(main())
