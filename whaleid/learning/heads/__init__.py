"""The model heads: one class per file, found by name here. Light: importing this module does not
import Keras (config checks model.head against `names()`; `whaleid status` must stay fast).

Adding a head = one file in this folder with a Head subclass + one line in pipeline/head_names.py.
"""
from __future__ import annotations

import importlib

from whaleid.pipeline import head_names
from whaleid.pipeline.head_names import names, register  # noqa: F401 - the heads' public names


def head_class(name: str):
    try:
        entry = head_names.REGISTRY[name]
    except KeyError:
        raise KeyError(f"model.head = {name!r}: expected one of {', '.join(head_names.REGISTRY)}") from None
    if isinstance(entry, str):
        module, attr = entry.split(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry


def from_settings(get):
    """The head the settings name, with its settings; `get(dotted_key)` -> value."""
    return head_class(get("model.head")).from_settings(get)


def from_model(net):
    """The head a saved whaleid model was built with (recorded in its HeadTag layer)."""
    try:
        tag = net.get_layer("head")
    except ValueError:
        raise ValueError(f"model {net.name} records no head (made by an older whaleid): retrain it "
                         f"with --force train") from None
    return head_class(tag.head)(**tag.settings)
