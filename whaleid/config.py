"""Settings: one TOML file (configs/default.toml or --config) plus `--set section.key=value` overrides.

DEFAULTS is the schema: every key a stage may read, with the original pipeline's value (a GPU VM).
A key not in DEFAULTS, or a value of another type, is an error naming the key, so a typo never
silently falls back to a default.
"""
from __future__ import annotations

import copy
import tomllib
from pathlib import Path

DEFAULTS: dict[str, dict] = {
    "run": {"seed": 42, "image_size": 224},
    "dedup": {"max_distance": 6, "verify": True, "verify_mse": 0.1},
    "format": {},
    "boxes": {"max_side": 512, "detector": "grabcut", "grabcut_side": 160, "grabcut_max_iter": 10, "min_fraction": 0.10, "open_size": 5, "import_csv": ""},
    "augment": {"margin": 0.05, "crop_max": 20, "blur_sigma_max": 1.0, "jpeg_quality": 95},
    "split": {"validation": 0.3, "unseen_ids": 0.1},
    "model": {"head": "softmax", "backbone": "InceptionResNetV2", "weights": "imagenet",
              "pooling": "avg2x2", "dropout": 0.4, "embedding_size": 256, "bn_momentum": 0.0,
              "pair_features": "l1"},
    "train": {"batch_size": 100, "epochs": 120, "patience": 10, "learning_rate": 0.001,
              "online_augment": True, "strategy": "auto", "precision": "auto", "xla": False,
              "lr_schedule": "constant", "label_smoothing": 0.0, "weight_decay": 0.0,
              "photos_per_id": 4, "margin": 1.0, "hard_negatives": 0.0, "max_minutes": 0.0},
    "predict": {"top_k": 5, "tta": True, "merge": "vote", "batch_size": 100, "gallery_tta": False},
    "new_whale": {"threshold": 0.276},
    "evaluate": {"new_whale_share": 0.27, "one_shot": 0},
}

CHOICES = {
    "model.head": ("softmax", "siamese", "triplet"),
    "model.pooling": ("avg2x2", "global"),
    "model.pair_features": ("l1", "rich"),
    "train.strategy": ("auto", "mirrored", "multiworker", "tpu", "none"),
    "train.precision": ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
    "predict.merge": ("vote", "mean"),
    "boxes.detector": ("grabcut", "dark", "hsv"),
    "train.lr_schedule": ("constant", "cosine"),
}


class ConfigError(ValueError):
    pass


def _check(key: str, value, default):
    """Return `value` coerced to the type of `default` (int -> float allowed), else raise naming `key`."""
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
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"setting {key}: {value!r} is not one of {', '.join(CHOICES[key])}")
    return value


def merge(cfg: dict, updates: dict, source: str) -> dict:
    for section, values in updates.items():
        if section not in DEFAULTS:
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(DEFAULTS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of settings")
        for key, value in values.items():
            full = f"{section}.{key}"
            if key not in DEFAULTS[section]:
                raise ConfigError(f"{source}: unknown setting {full}")
            cfg[section][key] = _check(full, value, DEFAULTS[section][key])
    return cfg


def parse_override(text: str) -> tuple[str, str, object]:
    """'train.epochs=5' -> ('train', 'epochs', 5); the value is read as TOML, bare words as strings."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.epochs=5")
    full, raw = text.split("=", 1)
    section, key = full.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def load(path: Path | None = None, overrides: tuple[str, ...] = ()) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        merge(cfg, data, str(path))
    for text in overrides:
        section, key, value = parse_override(text)
        merge(cfg, {section: {key: value}}, f"--set {text}")
    return cfg


def get(cfg: dict, dotted: str):
    section, key = dotted.split(".", 1)
    return cfg[section][key]
