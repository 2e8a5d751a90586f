"""Files a stage writes and reads: atomic writes, fingerprints, and the work-folder lock.

Every artifact is written to a temp file beside it and renamed into place, so a killed run never
leaves a half-written file under the artifact's name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from . import __version__

LOCK = ".whaleid.lock"


class StageError(RuntimeError):
    """A problem the user must act on; the message says what to do."""


# ---------------------------------------------------------------- atomic files and fingerprints

@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_folder(path: Path) -> str:
    """Fingerprint of a folder of many files (images) from names, sizes and mtimes: reading 30k
    photos' bytes on every status check would cost minutes."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = os.path.join(root, name)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "files:" + h.hexdigest()


def fingerprint(path: Path) -> str | None:
    """sha256 for a file, a listing digest for a folder, None when absent."""
    path = Path(path)
    if path.is_dir():
        return digest_folder(path)
    if path.is_file():
        return sha256_file(path)
    return None


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
