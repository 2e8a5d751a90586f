"""Files a stage writes and reads: atomic writes, content fingerprints (with a stat cache), and the
work-folder lock.

Every artifact is written to a temp file beside it and renamed into place, so a killed run never
leaves a half-written file under the artifact's name. A file's fingerprint is the sha256 of its
content, a folder's the sha256 of its files' relative names and content hashes: nothing about where
a folder lives or when its files were written, so a copied work or data folder is up to date where
its contents are. HashState remembers hashes by stat so unchanged files are not read twice.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from whaleid import __version__
from whaleid.pipeline.fingerprints import BLOCK, LEGACY_TREE, STATE, TREE, HashState, digest_folder, file_digest, fingerprint, legacy_digest_folder, matches, sha256_file

LOCK = ".whaleid.lock"


class StageError(RuntimeError):
    """A problem the user must act on; the message says what to do."""


# ---------------------------------------------------------------- atomic files

def umask() -> int:
    """The process's umask (Linux reports it in /proc without changing it; elsewhere it is set and put back)."""
    try:
        return int(re.search(r"^Umask:\s*([0-7]+)", Path("/proc/self/status").read_text(), re.M).group(1), 8)
    except (OSError, AttributeError, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename. The file gets the
    mode a plain open() would (0666 less the umask: 0644 typically), not mkstemp's private 0600, so a
    teammate sharing the work folder can read every artifact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def clear_temp_files(folder: Path) -> int:
    """Delete the temp files of atomic writes a killed run never finished (".<name>.<random>.tmp" from
    atomic_path, ".<name>.tmp" from images.save_jpeg) under `folder`, which a resumed stage keeps; no
    live writer can own them (one run per work folder). Returns how many were deleted."""
    n = 0
    for p in Path(folder).rglob(".*.tmp"):
        if p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
    return n


def versions() -> dict:
    out = {"whaleid": __version__, "python": sys.version.split()[0]}
    for mod in ("numpy", "pandas", "PIL", "cv2", "skimage", "imagehash", "tensorflow", "keras"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "?")
    return out


# ---------------------------------------------------------------- the work-folder lock

@contextlib.contextmanager
def work_lock(work: Path, command: str):
    """Refuse a second concurrent run on the same work folder; take over a lock whose process died."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    lock = work / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
          "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            if _alive(holder):
                raise StageError(
                    f"{work} is in use by another whaleid run (pid {holder.get('pid')}, "
                    f"'{holder.get('command')}', since {holder.get('started')}). Wait for it to finish; "
                    f"if that process is gone, delete {lock}.") from None
            print(f"whaleid: taking over a stale lock left by pid {holder.get('pid')} (process is gone)",
                  file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise StageError(f"could not take the lock {lock}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(lock.read_text()).get("pid") == os.getpid():
                lock.unlink()


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or holder.get("host") not in (None, socket.gethostname()):
        return isinstance(pid, int)  # another host's lock (shared disk): we cannot tell, so respect it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed child not yet reaped) is dead for our purposes
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


# ---------------------------------------------------------------- TensorFlow's start-up lines

VERBOSE = "WHALEID_VERBOSE"  # set (by --verbose) to see TensorFlow's native log lines
NATIVE_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                        r"|[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] .*)$")  # glog/absl: I0000 00:00:17.. 31398 port.cc:153] ...


@contextlib.contextmanager
def quiet_native_startup() -> Iterator[None]:
    """Hide the lines TensorFlow's C++ side writes to stderr while it loads (oneDNN notes, "could not
    find cuda drivers", absl's pre-init warning), which TF_CPP_MIN_LOG_LEVEL does not reach: stderr
    (file descriptor 2) goes to a temp file for the duration, and every other line is passed on
    afterwards. Nothing is hidden with WHALEID_VERBOSE set (whaleid --verbose)."""
    if os.environ.get(VERBOSE):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines() if not NATIVE_LOG.match(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
        if "absl.logging" in sys.modules:  # Python-side absl warnings (e.g. on loading a model)
            sys.modules["absl.logging"].set_verbosity("error")


_FAULT_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A named moment where tests and scripts/fault_injection.py kill a run, as a pre-empted VM would:
    with WHALEID_FAULT="name" (or "name@k": the k-th time it is reached) this process SIGKILLs itself
    here. Unset (always, for users), it does nothing."""
    spec = os.environ.get("WHALEID_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] >= int(nth or 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
