"""Settings: one typed config. The shipped configs/default.toml is the schema (every key a stage may
read, with the original pipeline's value for a GPU VM and, by its value, the key's type); a TOML file
(--config FILE, or a shipped name such as `cpu`) and `--set section.key=value` overrides change it.

Everything is checked when the settings are loaded, before any stage runs: an unknown section or key,
a value of another type (an int is accepted for a float), a string not in CHOICES (model.head: a name
in pipeline/head_names.py), a number outside RANGES (or NaN, inf), or an impossible combination of keys is a
one-line ConfigError naming the key, the value and what is allowed, e.g.
`setting train.margin = -1.0: must be > 0 and <= 4`.

API: load(name_or_path, overrides) -> dict, defaults(), resolve(name_or_path) -> Path, shipped(),
parse_overrides(texts) -> {"section.key": "raw value"}, check(key, value), get(cfg, "section.key").
"""
from __future__ import annotations

import copy
import functools
import importlib.resources
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from whaleid.pipeline import head_names


class ConfigError(ValueError):
    pass


# ---------------------------------------------------------------- the shipped configs

@functools.cache
def shipped() -> dict[str, Path]:
    """Shipped config name -> file: {"cpu": .../cpu.toml, "default": .../default.toml}.

    The repo's top-level configs/ installs as the data package whaleid.configs (pyproject.toml), read
    here with importlib.resources: an installed wheel has it as whaleid/configs/. A source tree or an
    editable install (`pip install -e .`: setuptools' editable finder does not map a package folder
    without __init__.py) reads configs/ where it is, beside the whaleid/ folder."""
    try:
        entries = list(importlib.resources.files("whaleid.configs").iterdir())
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parents[2] / "configs"
        entries = list(folder.iterdir()) if folder.is_dir() else []
    found = {e.name[: -len(".toml")]: Path(e) for e in entries if e.name.endswith(".toml") and e.is_file()}
    if "default" not in found:
        raise ConfigError("the shipped configs are missing (no default.toml in whaleid.configs): reinstall whaleid")
    return dict(sorted(found.items()))


def resolve(name_or_path) -> Path:
    """An existing file as given, else a shipped config's bare name (`cpu`, `default`: no .toml, no
    slash) from any working directory; anything else is a ConfigError that lists the shipped names."""
    text = str(name_or_path)
    path = Path(text)
    if path.is_file():
        return path
    names = shipped()
    bare = text and "/" not in text and "\\" not in text and not text.endswith(".toml")
    if bare and text in names:
        return names[text]
    if path.exists():
        raise ConfigError(f"config file {path} is not a file")
    raise ConfigError(f"config file {path} not found (or name a shipped config: {', '.join(names)})")


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot read it ({e})") from None


@functools.cache
def _defaults() -> dict:
    data = _read_toml(shipped()["default"])
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"shipped default.toml: [{section}] must be a table of settings")
        for key, value in values.items():
            if not isinstance(value, (bool, int, float, str)):
                raise ConfigError(f"shipped default.toml: {section}.{key} = {value!r}: expected a bool, "
                                  f"number or string")
    return data


def defaults() -> dict[str, dict]:
    """The schema and the default values: the shipped configs/default.toml (a fresh copy each call)."""
    return copy.deepcopy(_defaults())


# ---------------------------------------------------------------- what each key allows

CHOICES: dict[str, tuple[str, ...]] = {
    "model.pooling": ("avg2x2", "global", "gem"),
    "model.pair_features": ("l1", "rich"),
    "train.strategy": ("auto", "mirrored", "multiworker", "tpu", "none"),
    "train.precision": ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
    "predict.merge": ("vote", "mean"),
    "predict.sides": ("same", "any"),
    "train.background": ("none", "blur", "grey"),
    "boxes.detector": ("cnn", "subject", "grabcut", "dark", "hsv"),
    "train.lr_schedule": ("constant", "cosine"),
    "identify.boxes": ("auto", "detect", "whole"),
    "keypoints.method": ("sift", "orb", "xfeat", "aliked"),   # (AKAZE left OpenCV 5's main module: not offered)
    "rerank.matcher": ("ratio", "mutual", "lighterglue", "lightglue"),
    "rerank.method": ("none", "local"),
    "rerank.fusion": ("average", "local", "auto"),
    "rerank.geometry": ("homography", "similarity", "none"),
}
# model.head: the names in pipeline/head_names.py, asked when a value is checked (see choices()),
# so a head registered after import (a plugin, a test's toy head) is accepted.


def choices(key: str) -> tuple[str, ...] | None:
    """The allowed values of a string setting, or None when any string goes."""
    if key == "model.head":
        return head_names.names()
    return CHOICES.get(key)


@dataclass(frozen=True)
class Range:
    """A finite x with lo <= x <= hi (either side open: < / >, or absent); `zero`: 0 is also allowed,
    meaning what `zero` says (an "off" value outside the range)."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    zero: str | None = None

    def __contains__(self, x) -> bool:
        if not math.isfinite(x):
            return False
        if self.zero is not None and x == 0:
            return True
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        if self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi):
            return False
        return True

    def __str__(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        text = " and ".join(parts)
        return f"0 ({self.zero}) or {text}" if self.zero is not None else text


def at_least(lo, *, open_: bool = False, zero: str | None = None) -> Range:
    return Range(lo=lo, lo_open=open_, zero=zero)


def between(lo, hi, *, lo_open: bool = False, hi_open: bool = False) -> Range:
    return Range(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)


RANGES: dict[str, Range] = {
    "run.seed": at_least(0),                         # NumPy's generators refuse a negative seed
    "run.image_size": at_least(16),
    "dedup.max_distance": between(0, 64),            # bits of a 64-bit phash
    "dedup.verify_mse": at_least(0),
    "boxes.max_side": at_least(32),
    "boxes.grabcut_side": at_least(16),
    "boxes.grabcut_max_iter": at_least(1),
    "boxes.min_fraction": between(0, 1),
    "boxes.open_size": at_least(1),                  # the opening's square kernel side
    "augment.margin": at_least(0),
    "augment.crop_max": at_least(1),                 # crops draw 1..crop_max px: 0 has nothing to draw
    "augment.blur_sigma_max": at_least(0),
    "augment.jpeg_quality": between(1, 100),
    "split.validation": between(0, 1, hi_open=True),
    "split.unseen_ids": between(0, 1, hi_open=True),
    "model.dropout": between(0, 1, hi_open=True),
    "model.embedding_size": at_least(2),
    "model.subcenters": at_least(1),
    "model.arcface_margin": between(0, 1.5),          # radians
    "model.arcface_scale": at_least(0, open_=True),
    "model.arcface_centre_weight": between(0, 1),
    "model.finetune_fraction": between(0, 1, lo_open=True),
    "model.bn_momentum": Range(lo=0, hi=1, lo_open=True, hi_open=True, zero="the backbone's own"),
    "train.batch_size": at_least(1),
    "train.epochs": at_least(1),
    "train.patience": at_least(0),
    "train.learning_rate": at_least(0, open_=True),
    "train.label_smoothing": between(0, 1, hi_open=True),
    "train.weight_decay": at_least(0),
    "train.photos_per_id": at_least(2),              # a photo needs a positive of its id in its batch
    "train.margin": between(0, 4, lo_open=True),     # squared distances of unit vectors lie in 0..4
    "train.hard_negatives": between(0, 1),
    "train.max_minutes": at_least(0),                # 0: no limit
    "train.head_epochs": at_least(0),                # 0: no frozen-backbone phase
    "train.head_learning_rate": at_least(0, open_=True),
    "train.validate_every": at_least(1),
    "train.checkpoint_every": at_least(1),
    "train.checkpoint_minutes": at_least(0),         # 0: by epochs only
    "predict.top_k": at_least(1),
    "identify.top": at_least(1),
    "predict.batch_size": at_least(1),
    "new_whale.threshold": between(0, 1.01),         # above every score: new_whale always first
    "new_whale.share": between(0, 1, hi_open=True),   # 0: off (use the threshold)
    "evaluate.new_whale_share": between(0, 1, hi_open=True),
    "evaluate.one_shot": at_least(2, zero="off"),
    "keypoints.side": at_least(32),
    "keypoints.max_points": at_least(8),
    "rerank.candidates": at_least(1),
    "rerank.glue_shortlist": at_least(0),
    "rerank.ratio": between(0, 1, lo_open=True),
    "rerank.min_similarity": between(-1, 1),
    "rerank.glue_confidence": between(0, 1, hi_open=True),
    "rerank.ransac_px": at_least(0, open_=True),
}

# Heads trained on batches of P ids x K photos (train.photos_per_id): a batch must hold 2 ids.
def shipped_default(key: str):
    """A setting's value in the shipped defaults (configs/default.toml); an unknown key is a
    ConfigError. A setting added to whaleid keeps, at this value, what whaleid did before it existed:
    a stage recorded by an earlier whaleid, without the key, is still up to date at this value."""
    section, _, name = key.partition(".")
    schema = _defaults()
    if section not in schema:
        raise ConfigError(f"unknown section [{section}] (known: {', '.join(schema)})")
    if name not in schema[section]:
        raise ConfigError(f"unknown setting {key}")
    return schema[section][name]


def _typed(key: str, value):
    """`value` coerced to the type of the key's default (int -> float allowed), else a ConfigError."""
    default = shipped_default(key)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"setting {key}: expected true or false, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"setting {key}: expected a number, got {value!r}")
        value = float(value)
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"setting {key}: expected an integer, got {value!r}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"setting {key}: expected a string, got {value!r}")
    return value


def _allowed(key: str, value) -> None:
    allowed = choices(key)
    if allowed is not None and value not in allowed:
        raise ConfigError(f"setting {key}: {value!r} is not one of {', '.join(allowed)}")
    if key in RANGES and value not in RANGES[key]:
        raise ConfigError(f"setting {key} = {value!r}: must be {RANGES[key]}")


def check(key: str, value):
    """`value` for setting `key` ("section.key"), coerced to its type (int -> float allowed); else a
    one-line ConfigError naming the key: unknown, wrong type, not one of its choices, out of range."""
    value = _typed(key, value)
    _allowed(key, value)
    return value


# impossible combinations: (keys, the combination is allowed?, what to do)
RELATIONS = [
    (("rerank.matcher", "keypoints.method"), lambda m, k: not (m == "lighterglue" and k != "xfeat"),
     "LighterGlue matches XFeat's keypoints: set keypoints.method = xfeat"),
    (("rerank.matcher", "keypoints.method"), lambda m, k: not (m == "lightglue" and k != "aliked"),
     "rerank.matcher = lightglue matches ALIKED's keypoints: set keypoints.method = aliked"),
    (("rerank.matcher", "keypoints.method"), lambda m, k: not (m == "mutual" and k == "orb"),
     "mutual nearest neighbours compare descriptor vectors: use sift, xfeat or aliked, or rerank.matcher = ratio for orb"),
]


def validate(cfg: dict) -> dict:
    """Every value of merged settings against its choices and range, then the RELATIONS between keys."""
    for section, values in cfg.items():
        for key, value in values.items():
            _allowed(f"{section}.{key}", value)
    for keys, allowed, advice in RELATIONS:
        values = [get(cfg, k) for k in keys]
        if not allowed(*values):
            named = ", ".join(f"{k} = {v!r}" for k, v in zip(keys, values))
            raise ConfigError(f"settings {named} do not go together: {advice}")
    return cfg


# ---------------------------------------------------------------- reading, overriding, loading

def merge(cfg: dict, updates: dict, source: str) -> dict:
    """Set each updates[section][key] in cfg, checking its name and type. Choices and ranges are
    checked by validate() once every source is merged (a later --set may repair an earlier value)."""
    schema = _defaults()
    for section, values in updates.items():
        if section not in schema:
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(schema)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of settings")
        for key, value in values.items():
            if key not in schema[section]:
                raise ConfigError(f"{source}: unknown setting {section}.{key}")
            cfg[section][key] = _typed(f"{section}.{key}", value)
    return cfg


def _split_override(text: str) -> tuple[str, str, str]:
    """'train.epochs = 5' -> ('train', 'epochs', '5'), else a one-line ConfigError."""
    text = str(text)
    full, eq, raw = text.partition("=")
    section, dot, key = full.strip().partition(".")
    if not eq or not dot or not section.strip() or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.epochs=5")
    return section.strip(), key.strip(), raw.strip()


def parse_overrides(texts) -> dict[str, str]:
    """--set strings -> {"section.key": raw value}, in order (a later --set of a key wins). Raises a
    one-line ConfigError for a string that is not section.key=value; names and values are checked by
    load(), which takes the result back as [f"{k}={v}" ...]."""
    out: dict[str, str] = {}
    for text in texts:
        section, key, raw = _split_override(text)
        full = f"{section}.{key}"
        out.pop(full, None)  # keep the order of the last setting of each key
        out[full] = raw
    return out


def parse_override(text: str) -> tuple[str, str, object]:
    """'train.epochs=5' -> ('train', 'epochs', 5); the value is read as TOML, bare words as strings."""
    section, key, raw = _split_override(text)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def layers(path: Path, seen: tuple = ()) -> list[tuple[dict, str]]:
    """A config file's tables, after those of the config it `extends` (a shipped name or a file; top
    level `extends = "cpu"`): a config says only what it changes."""
    table = _read_toml(path)
    base = table.pop("extends", None)
    if base is None:
        return [(table, str(path))]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends must name a config (a shipped name such as cpu, or a file)")
    near = path.parent / base
    base_path = resolve(near if near.is_file() else base)
    if base_path.resolve() in seen or len(seen) > 8:
        raise ConfigError(f"{path}: extends {base!r} goes round in a circle")
    return layers(base_path, seen + (path.resolve(),)) + [(table, str(path))]


def load(path=None, overrides=()) -> dict:
    """The shipped defaults, then the TOML file `path` (a path, or a shipped name such as "cpu"; None:
    defaults only), then the `section.key=value` overrides; every value checked (see validate)."""
    cfg = defaults()
    if path is not None:
        for table, source in layers(resolve(path)):
            merge(cfg, table, source)
    for text in overrides:
        section, key, value = parse_override(text)
        merge(cfg, {section: {key: value}}, f"--set {text}")
    return validate(cfg)


def get(cfg: dict, dotted: str):
    section, key = dotted.split(".", 1)
    return cfg[section][key]
