"""scripts/bench_reid.py --seeds: the benchmark once per seed, then each head's mean and spread; and
--extra-train: individuals learnt from, never tested."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_reid", ROOT / "scripts" / "bench_reid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_summary_mean_and_spread():
    bench = _bench()
    results = {0: [("arcface", {"map5": 0.70}, 2.0, 0.30), ("triplet", {"map5": 0.60}, 1.0, 0.20)],
               1: [("arcface", {"map5": 0.80}, 4.0, 0.50), ("triplet", {"map5": 0.60}, 1.0, 0.20)],
               2: [("arcface", {"map5": 0.90}, 3.0, 0.40), ("triplet", {"map5": 0.60}, 1.0, 0.20)]}
    lines = bench.seed_summary(results)
    assert len(lines) == 2 and lines[0].startswith("summary head=arcface seeds=3")
    assert "MAP@5=0.8000 ± 0.1000 (se 0.0577; 0.7000 0.8000 0.9000)" in lines[0]
    assert "top-1(closed)=0.4000 ± 0.1000" in lines[0] and lines[0].endswith("minutes=3.0")
    assert "MAP@5=0.6000 ± 0.0000" in lines[1]
    assert bench.parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("0,x", "1,1", ""):
        with pytest.raises(SystemExit):
            bench.parse_seeds(bad)


def _catalogue(root, names, photos, seed):
    rng = np.random.default_rng(seed)
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        colour = rng.integers(0, 255, 3)
        for j in range(photos):
            img = np.clip(colour + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{j}.png")
    return root


@pytest.mark.slow
def test_two_seeds_with_extra_individuals_print_a_summary(tmp_path, capsys):
    bench = _bench()
    src = _catalogue(tmp_path / "src", [f"t{i}" for i in range(6)], 4, 0)
    extra = _catalogue(tmp_path / "extra", [f"x{i}" for i in range(6)], 3, 1)
    results = bench.main(["--src", str(src), "--extra-train", str(extra), "--heads", "arcface", "--seeds", "0,1",
                          "--minutes", "0.05", "--backbone", "tiny", "--weights", "none", "--head-epochs", "0",
                          "--image-size", "32", "--work", str(tmp_path / "work"),
                          "--set", "predict.gallery_tta=false", "--set", "predict.tta=false"])
    out = capsys.readouterr().out
    assert sorted(results) == [0, 1] and all(len(r) == 1 for r in results.values())
    summary = [line for line in out.splitlines() if line.startswith("summary ")]
    assert len(summary) == 1 and re.search(r"summary head=arcface seeds=2 MAP@5=[0-9.]+ ± [0-9.]+", summary[0])
    assert out.count("train_only_individuals 6") == 2
    for seed in (0, 1):
        data = tmp_path / "work" / f"seed{seed}" / "data"
        solution = pd.read_csv(data / "solution.csv")
        assert not set(solution.Id) & {f"x{i}" for i in range(6)}
        split = pd.read_csv(tmp_path / "work" / f"seed{seed}" / "base" / "split" / "split.csv")
        assert set(split.Id[split.subset == "unseen"]) <= {f"x{i}" for i in range(6)}
