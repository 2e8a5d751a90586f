"""Read a PyTorch *legacy* (pre-1.6, zip-less) ``torch.save`` file with pickle + numpy, without torch.

The legacy layout is five things one after another in a single file:

    1. a pickle of the magic number 0x1950a86a20f9469cfc6c
    2. a pickle of the protocol version (1001)
    3. a pickle of sys info: {"protocol_version", "little_endian", "type_sizes"}
    4. the main pickle (here a state dict). Each tensor is ``torch._utils._rebuild_tensor_v2(storage,
       storage_offset, size, stride, requires_grad, backward_hooks)``; each storage is a persistent
       id ``("storage", torch.<Type>Storage, key, location, numel, view_metadata)``
    5. a pickle of the list of storage keys, then for each key in that order: an int64 element count
       followed by the storage's raw bytes

Unpickling runs code: every pickle here goes through a restricted Unpickler whose find_class knows
only an explicit allow-list of globals (mapped to small stand-ins defined below); any other global
raises UnsafePickle before anything is called. The file's sha256 can be checked against a known
value before a single byte is unpickled (the bytes hashed are the bytes parsed).
"""
from __future__ import annotations

import collections
import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class TorchPickleError(ValueError):
    """The file is not a legacy torch.save file this reader understands, or it is damaged."""


class UnsafePickle(TorchPickleError, pickle.UnpicklingError):
    """The pickle references a global outside the allow-list (refused, nothing executed)."""


class ChecksumMismatch(TorchPickleError):
    """The file's sha256 is not the expected one."""


# ---------------------------------------------------------------- stand-ins for torch's globals

@dataclass(frozen=True)
class StorageType:
    """Stand-in for ``torch.<Name>Storage`` (only used as a tag inside persistent ids)."""
    name: str
    dtype: str  # numpy dtype without byte order

    def __call__(self, *args, **kwargs):
        raise UnsafePickle(f"refusing to call torch.{self.name} from a pickle")

    def __reduce__(self):  # never pickled by us; keeps it out of any accidental re-pickling
        raise TypeError("StorageType is not picklable")


STORAGE_TYPES = {t.name: t for t in (
    StorageType("FloatStorage", "f4"),
    StorageType("DoubleStorage", "f8"),
    StorageType("HalfStorage", "f2"),
    StorageType("LongStorage", "i8"),
    StorageType("IntStorage", "i4"),
    StorageType("ShortStorage", "i2"),
    StorageType("CharStorage", "i1"),
    StorageType("ByteStorage", "u1"),
    StorageType("BoolStorage", "b1"),
)}


class _Storage:
    """A storage declared by a persistent id; its bytes are read after the main pickle."""

    def __init__(self, key: str, stype: StorageType, numel: int):
        self.key, self.stype, self.numel = key, stype, numel
        self.data: np.ndarray | None = None


@dataclass
class _View:
    """An old-style storage view (view_metadata in the persistent id): elements [offset, offset+numel)."""
    root: _Storage
    offset: int
    numel: int


@dataclass
class _PendingTensor:
    storage: _Storage | _View
    storage_offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: records the arguments; the array is made once
    the storages' bytes have been read."""
    if not isinstance(storage, (_Storage, _View)):
        raise TorchPickleError(f"_rebuild_tensor_v2: storage is a {type(storage).__name__}, not a storage")
    for name, value in (("size", size), ("stride", stride)):
        if not isinstance(value, tuple) or not all(isinstance(v, int) and v >= 0 for v in value):
            raise TorchPickleError(f"_rebuild_tensor_v2: bad {name} {value!r}")
    if len(size) != len(stride):
        raise TorchPickleError(f"_rebuild_tensor_v2: size {size} and stride {stride} differ in length")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise TorchPickleError(f"_rebuild_tensor_v2: bad storage offset {storage_offset!r}")
    return _PendingTensor(storage, storage_offset, size, stride)


# (module, name) -> object. Nothing else can be named by the pickles this module reads.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    **{("torch", name): stype for name, stype in STORAGE_TYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """find_class answers only from `allowed`; persistent ids only when a handler is given."""

    def __init__(self, file, allowed: dict[tuple[str, str], object] | None = None, persistent_load=None):
        super().__init__(file)
        self._allowed = allowed or {}
        self._persistent = persistent_load

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickle(f"refusing to unpickle global {module}.{name}: not in the allow-list "
                               f"(unpickling runs code; this reader only accepts torch tensor state dicts)") from None

    def persistent_load(self, pid):
        if self._persistent is None:
            raise UnsafePickle(f"unexpected persistent id {pid!r}")
        return self._persistent(pid)


# ---------------------------------------------------------------- reading

def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _small_pickle(f: io.BytesIO, what: str):
    try:
        return RestrictedUnpickler(f).load()
    except UnsafePickle:
        raise
    except Exception as e:
        raise TorchPickleError(f"cannot read the {what} pickle: {e}") from None


def _materialize(t: _PendingTensor) -> np.ndarray:
    base = t.storage.root.data if isinstance(t.storage, _View) else t.storage.data
    start = t.storage.offset if isinstance(t.storage, _View) else 0
    avail = t.storage.numel
    if base is None:
        raise TorchPickleError("a tensor's storage bytes were never read")
    if any(s == 0 for s in t.size):
        return np.zeros(t.size, dtype=base.dtype.newbyteorder("="))
    last = t.storage_offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if last >= avail:
        raise TorchPickleError(f"tensor of size {t.size}, stride {t.stride}, offset {t.storage_offset} "
                               f"reaches past its storage of {avail} elements")
    flat = base[start + t.storage_offset:]
    item = base.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(flat, shape=t.size, strides=tuple(s * item for s in t.stride),
                                           writeable=False)
    # np.array, not np.ascontiguousarray: the latter turns a 0-dim tensor into shape (1,)
    return np.array(view, dtype=base.dtype.newbyteorder("="), order="C", copy=True)


def _convert(obj, memo: dict):
    """Replace pending tensors by arrays in the (nested) unpickled object."""
    if isinstance(obj, _PendingTensor):
        if id(obj) not in memo:
            memo[id(obj)] = _materialize(obj)
        return memo[id(obj)]
    if isinstance(obj, dict):
        return {k: _convert(v, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_convert(v, memo) for v in obj)
    return obj


def load_legacy(data: bytes):
    """Parse the bytes of a legacy torch.save file; tensors come back as contiguous numpy arrays."""
    f = io.BytesIO(data)
    magic = _small_pickle(f, "magic number")
    if magic != LEGACY_MAGIC:
        if data[:2] == b"PK":
            raise TorchPickleError("this is a zip-format torch.save file (torch >= 1.6), not the legacy format")
        raise TorchPickleError("not a legacy torch.save file (bad magic number)")
    protocol = _small_pickle(f, "protocol version")
    if protocol != LEGACY_PROTOCOL:
        raise TorchPickleError(f"unsupported legacy protocol version {protocol!r} (expected {LEGACY_PROTOCOL})")
    sys_info = _small_pickle(f, "sys info")
    if not isinstance(sys_info, dict) or "little_endian" not in sys_info:
        raise TorchPickleError(f"bad sys info {sys_info!r}")
    order = "<" if sys_info["little_endian"] else ">"

    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise TorchPickleError(f"unsupported persistent id {pid!r}")
        _, stype, key, _location, numel, view_metadata = pid
        if not isinstance(stype, StorageType):
            raise TorchPickleError(f"persistent id names {stype!r}, not a storage type")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise TorchPickleError(f"bad persistent id {pid!r}")
        root = storages.get(key)
        if root is None:
            root = storages[key] = _Storage(key, stype, numel)
        elif root.stype != stype or root.numel != numel:
            raise TorchPickleError(f"storage {key} declared twice with different types or sizes")
        if view_metadata is None:
            return root
        view_key, offset, view_numel = view_metadata
        if not (isinstance(offset, int) and isinstance(view_numel, int) and 0 <= offset
                and offset + view_numel <= numel):
            raise TorchPickleError(f"bad storage view {view_metadata!r} of storage {key}")
        return _View(root, offset, view_numel)

    try:
        obj = RestrictedUnpickler(f, ALLOWED_GLOBALS, persistent_load).load()
    except TorchPickleError:
        raise
    except Exception as e:
        raise TorchPickleError(f"cannot read the main pickle: {type(e).__name__}: {e}") from None
    keys = _small_pickle(f, "storage keys")
    if not isinstance(keys, list) or set(keys) != set(storages) or len(keys) != len(storages):
        raise TorchPickleError("the storage key list does not match the storages the pickle uses")

    for key in keys:
        st = storages[key]
        head = f.read(8)
        if len(head) != 8:
            raise TorchPickleError(f"file ends before storage {key}")
        count = int(np.frombuffer(head, dtype=order + "i8")[0])
        if count != st.numel:
            raise TorchPickleError(f"storage {key}: {count} elements on disk, {st.numel} declared")
        dtype = np.dtype(order + st.stype.dtype) if st.stype.dtype != "b1" else np.dtype("?")
        raw = f.read(count * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise TorchPickleError(f"file ends inside storage {key} (truncated)")
        st.data = np.frombuffer(raw, dtype=dtype)
    if f.read(1):
        raise TorchPickleError("unexpected bytes after the last storage")
    return _convert(obj, {})


def checked_bytes(path: str | Path, expected_sha256: str | None) -> bytes:
    """The file's bytes, which must have `expected_sha256` (when given) before anything parses them."""
    data = Path(path).read_bytes()
    if expected_sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != expected_sha256.lower():
            raise ChecksumMismatch(f"{path}: sha256 {got} is not the expected {expected_sha256}"
                                   f" (damaged or different file)")
    return data


def read_state_dict(path: str | Path, expected_sha256: str | None = None) -> dict[str, np.ndarray]:
    """The tensors of a legacy torch.save state dict as {name: contiguous numpy array}.

    With `expected_sha256`, the file's sha256 must match before anything is unpickled
    (ChecksumMismatch otherwise). Globals outside ALLOWED_GLOBALS raise UnsafePickle."""
    obj = load_legacy(checked_bytes(path, expected_sha256))
    if not isinstance(obj, dict):
        raise TorchPickleError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, np.ndarray):
            raise TorchPickleError(f"{path}: entry {k!r} is not a named tensor")
        out[k] = v
    return out
