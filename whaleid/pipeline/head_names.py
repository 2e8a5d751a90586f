"""The model heads by name, kept beside the settings: config checks `model.head` against these names
without importing the learning code (learning/heads/ turns a name into its class)."""
from __future__ import annotations

REGISTRY: dict[str, str | type] = {
    "softmax": "whaleid.learning.heads.softmax:Softmax",
    "siamese": "whaleid.learning.heads.siamese:Siamese",
    "triplet": "whaleid.learning.heads.triplet:Triplet",
    "arcface": "whaleid.learning.heads.arcface:ArcFace",
}


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def register(name: str, cls) -> None:
    """Add a head at run time (a plugin, or a test's toy head): a Head subclass or "module:Class"."""
    REGISTRY[name] = cls
