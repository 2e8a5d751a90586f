"""Read a PyTorch zip-format (torch >= 1.6) ``torch.save`` file with pickle + numpy, without torch.

The file is a zip archive whose entries all sit under one folder, whatever the saver named it
(``archive/``, ``xfeat/``, ``aliked-n16/``...): ``<folder>/data.pkl`` is the main pickle, and each
storage it names by a persistent id ``("storage", torch.<Type>Storage, key, location, numel)`` is the
raw little-endian bytes of ``<folder>/data/<key>``. The pickle goes through torch_pickle's restricted
Unpickler (an allow-list of globals, nothing else is ever called), and the file's sha256 can be
checked before a byte is unpickled. A legacy (pre-1.6) file is handed to torch_pickle.
"""
from __future__ import annotations

from collections.abc import Mapping
import io
import zipfile
from pathlib import Path

import numpy as np

from whaleid.backbones.torch_pickle import (ALLOWED_GLOBALS, RestrictedUnpickler, StorageType, checked_bytes,
                                            TorchPickleError, _convert, _Storage, load_legacy)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Stand-in for torch._utils._rebuild_parameter: a parameter is its tensor."""
    return data


ZIP_GLOBALS = {**ALLOWED_GLOBALS,
               ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
               ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
               ("builtins", "set"): set}


def _folder(names: list[str]) -> str:
    """The one folder every entry sits under (the saver's name for the archive)."""
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise TorchPickleError(f"expected one <folder>/data.pkl in the archive, found {pickles or 'none'}")
    return pickles[0].split("/")[0]


def load_zip(data: bytes):
    """Parse the bytes of a zip-format torch.save file; tensors come back as numpy arrays."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise TorchPickleError(f"not a zip-format torch.save file: {e}") from None
    folder = _folder(archive.namelist())
    order = "<"
    if f"{folder}/byteorder" in archive.namelist():
        order = "<" if archive.read(f"{folder}/byteorder").strip() == b"little" else ">"
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchPickleError(f"unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise TorchPickleError(f"bad persistent id {pid!r}")
        if key not in storages:
            st = storages[key] = _Storage(key, stype, numel)
            try:
                raw = archive.read(f"{folder}/data/{key}")
            except KeyError:
                raise TorchPickleError(f"storage {key} is named by the pickle but missing from the archive") from None
            dtype = np.dtype(order + stype.dtype) if stype.dtype != "b1" else np.dtype("?")
            if len(raw) != numel * dtype.itemsize:
                raise TorchPickleError(f"storage {key}: {len(raw)} bytes, {numel} elements of {dtype} declared")
            st.data = np.frombuffer(raw, dtype=dtype)
        return storages[key]

    try:
        obj = RestrictedUnpickler(io.BytesIO(archive.read(f"{folder}/data.pkl")), ZIP_GLOBALS, persistent_load).load()
    except TorchPickleError:
        raise
    except Exception as e:
        raise TorchPickleError(f"cannot read the main pickle: {type(e).__name__}: {e}") from None
    return _convert(obj, {})


def read_state_dict(path: str | Path, expected_sha256: str | None = None) -> dict[str, np.ndarray]:
    """{name: numpy array} of a torch.save state dict in either format; with `expected_sha256` the
    file must match it before anything is unpickled (ChecksumMismatch otherwise)."""
    data = checked_bytes(path, expected_sha256)
    obj = load_zip(data) if data[:2] == b"PK" else load_legacy(data)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise TorchPickleError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if isinstance(v, np.ndarray) and isinstance(k, str):
            out[k] = v
    if not out:
        raise TorchPickleError(f"{path}: no named tensors in its state dict")
    return out
