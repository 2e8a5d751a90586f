"""What a new user hits first (issue 16, points 3-9): ids and tables refused with the row named,
missing test photos said out loud, an open-set validation without new whales repaired, every option
mistake a one-line error, TensorFlow's start-up lines hidden, and the smaller points of 9."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from whaleid.pipeline import files

from conftest import ROOT, cli, whaleid

CPU = str(ROOT / "configs/scratch.toml")


def one_line_error(code: int, out: str, *needles: str) -> str:
    """The command failed with a single 'Error: ...' line (click may print its usage above it) naming
    every needle, and no traceback."""
    assert code != 0 and "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and out.rstrip().endswith(errors[0]), out
    for needle in needles:
        assert needle in errors[0], (needle, out)
    return errors[0]


def copy_data(tiny_set, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_set, tmp_path / "data"))


# ---------------------------------------------------------------- 3. ids, 9. tables

@pytest.mark.parametrize("bad_id, needle", [("w_68c 1464", "contains whitespace"), ("w_1\tx", "contains whitespace"),
                                            ("", "empty value in column 'Id'")])
def test_a_bad_id_stops_preprocess_naming_the_row(tiny_set, tmp_path, bad_id, needle):
    data = copy_data(tiny_set, tmp_path)
    train = pd.read_csv(data / "train.csv")
    train.loc[3, "Id"] = bad_id
    train.to_csv(data / "train.csv", index=False)
    code, out = cli("preprocess", "--data", data, "--work", tmp_path / "w", "--config", CPU, "--quiet")
    one_line_error(code, out, str(data / "train.csv"), "row 5", needle)
    assert "[format]" not in out


def test_a_header_only_or_all_new_whale_train_csv_stops_preprocess(tiny_set, tmp_path):
    data = copy_data(tiny_set, tmp_path)
    (data / "train.csv").write_text("Image,Id\n")
    code, out = cli("preprocess", "--data", data, "--work", tmp_path / "w", "--config", CPU, "--quiet")
    one_line_error(code, out, "train.csv", "no rows below the header")
    train = pd.read_csv(tiny_set / "train.csv").assign(Id="new_whale")
    train.to_csv(data / "train.csv", index=False)
    code, out = cli("preprocess", "--data", data, "--work", tmp_path / "w", "--config", CPU, "--quiet")
    one_line_error(code, out, "every row is new_whale")


# ---------------------------------------------------------------- 4. missing test photos

def test_missing_and_unreadable_test_photos_are_a_loud_warning_and_strict_an_error(tiny_set, tmp_path):
    data = copy_data(tiny_set, tmp_path)
    photos = sorted((data / "test").iterdir())
    photos[0].unlink()
    photos[1].write_bytes(b"")
    total = len(pd.read_csv(data / "sample_submission.csv"))
    work = tmp_path / "w"
    out = whaleid("preprocess", "--data", data, "--work", work, "--config", CPU, "--quiet")
    line = next(x for x in out.splitlines() if x.startswith("WARNING"))
    assert f"2 of {total} test photos are missing or unreadable" in line and str(work / "dedup" / "skipped.csv") in line
    code, out = cli("preprocess", "--work", work, "--quiet", "--strict")
    one_line_error(code, out, f"2 of {total} test photos", "skipped.csv")
    shutil.rmtree(data / "test")  # the whole folder gone: every one of them, said as loudly
    code, out = cli("preprocess", "--work", work, "--quiet")
    assert code == 0 and f"WARNING: {total} of {total} test photos" in out, out


# ---------------------------------------------------------------- 5. open-set validation without new whales

def test_a_catalogue_without_new_whales_gets_held_out_ids_and_the_recipe_says_so(tiny_set, tmp_path):
    src = tmp_path / "catalogue"
    train = pd.read_csv(tiny_set / "train.csv")
    for r in train[train.Id != "new_whale"].itertuples():
        (src / r.Id).mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_set / "train" / r.Image, src / r.Id / r.Image)
    out = whaleid("import-folders", "--src", src, "--out", tmp_path / "data", "--new-fraction", "0.25", "--quiet")
    assert "split.unseen_ids" in out and "whaleid train" in out and "evaluate --submission" in out, out
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o777 & ~files.umask()
    work = tmp_path / "w"
    out = whaleid("preprocess", "--data", tmp_path / "data", "--boxes", tmp_path / "data" / "boxes.csv",
                  "--work", work, "--config", "scratch", "--quiet")
    assert "no new_whale rows and split.unseen_ids = 0" in out and "holding out" in out, out
    report = json.loads((work / "split" / "split_report.json").read_text())
    assert report["unseen_ids"] >= 1
    # the data folder moves (with its boxes.csv) and the work folder with it: nothing reruns, and the
    # remembered box file follows the data folder
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "data", moved / "data")
    shutil.copytree(work, moved / "w")
    out = whaleid("preprocess", "--work", moved / "w", "--data", moved / "data", "--quiet")
    assert "boxes.import_csv follows the data folder" in out and "running" not in out, out
    (moved / "data" / "boxes.csv").unlink()
    code, out = cli("preprocess", "--work", moved / "w", "--quiet")
    one_line_error(code, out, "boxes.csv", "not found", "--boxes FILE")
    # with the threshold placed by the expected share of new whales nothing is tuned on held-out ids
    out = whaleid("preprocess", "--work", work, "--set", "new_whale.share=0.3", "--quiet")
    assert "new_whale.share = 0.3 places the threshold, so no ids are held out" in out, out
    assert json.loads((work / "split" / "split_report.json").read_text())["unseen_ids"] == 0


# ---------------------------------------------------------------- 6. option mistakes

@pytest.mark.parametrize("args, needles", [
    (["preprocess", "--set", "augment.margin"], ["--set 'augment.margin'", "section.key=value"]),
    (["preprocess", "--set", "nosuch.key=1"], ["unknown section [nosuch]"]),
    (["preprocess", "--set", "augment.margin=wide"], ["augment.margin", "expected a number"]),
    (["train", "--set", "train.epochs=-1"], ["train.epochs"]),
    (["preprocess", "--unset", "augment.nosuch"], ["--unset augment.nosuch", "unknown setting"]),
    (["preprocess", "--config", "gpu"], ["config file gpu not found"]),
    (["preprocess", "--workers", "0"], ["--workers"]),
    (["preprocess", "--force", "nosuch"], ["--force nosuch", "no such stage"]),
    (["preprocess", "--force", "train"], ["train is not a stage of whaleid preprocess", "whaleid train --force train"]),
    (["predict", "--check", "sub.csv"], ["--check needs --data"]),
    (["evaluate", "--submission", "sub.csv"], ["--submission and --solution go together"]),
    (["status", "--set", "x"], ["--set 'x'"]),
    (["report", "--sample", "0"], ["--sample"]),
])
def test_every_option_mistake_is_a_one_line_error(tiny_set, tmp_path, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    code, out = cli(*args[:1], "--work", tmp_path / "w", *(["--data", tiny_set] if args[0] == "preprocess" else []),
                    *args[1:])
    one_line_error(code, out, *needles)
    assert not (tmp_path / "w").exists() and not (tmp_path / "work").exists()


def test_a_damaged_settings_record_is_a_one_line_error(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "whaleid.json").write_text("{not json")
    code, out = cli("status", "--work", tmp_path / "w")
    one_line_error(code, out, "whaleid.json is unreadable", "delete it")


# ---------------------------------------------------------------- 9. the smaller points

def test_missing_folders_are_named_and_nothing_is_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(*cli("status", "--work", "typo"), "no such work folder: typo")
    one_line_error(*cli("report", "--work", "nonexistent", "--out", tmp_path / "r"), "nonexistent not found")
    one_line_error(*cli("train"), "needs the data folder", "pass --data")
    one_line_error(*cli("predict", "--config", "scratch"), "pass --data")
    assert sorted(os.listdir(tmp_path)) == []


def test_remembered_settings_can_be_unset_and_reset(tiny_set, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `--config cpu` names the shipped config from any folder
    work = tmp_path / "w"
    whaleid("preprocess", "--data", tiny_set, "--work", work, "--config", "scratch", "--quiet",
            "--set", "augment.margin=0.2", "--set", "split.validation=0.25")
    record = lambda: json.loads((work / "whaleid.json").read_text())  # noqa: E731
    assert record()["config"] == "scratch" and record()["set"] == ["augment.margin=0.2", "split.validation=0.25"]
    out = whaleid("preprocess", "--work", work, "--quiet", "--unset", "augment.margin")
    assert "augment.margin unset" in out and "[augment] running (setting augment.margin changed" in out, out
    assert record()["set"] == ["split.validation=0.25"] and record()["config"] == "scratch"
    out = whaleid("preprocess", "--work", work, "--quiet", "--reset-settings")
    assert "forgot the remembered config" in out and record() == {"data": str(tiny_set.resolve()), "config": None, "set": []}
    out = whaleid("preprocess", "--work", work, "--quiet", "--config", "scratch")
    assert "[dedup] up to date" in out


def test_the_top_level_help_is_whole_sentences_and_says_predict_runs_what_it_needs():
    out = whaleid("--help")
    commands = out.split("Commands:")[1]
    assert "..." not in commands
    assert "runs each stage it needs" in out and "`whaleid predict --data DATA` alone runs the whole pipeline" \
        in " ".join(out.split())
    assert "running every stage it needs first" in " ".join(commands.split())


# ---------------------------------------------------------------- 7. TensorFlow's start-up lines

NOISE = ("I0000", "E0000", "W0000", "cuInit", "oneDNN", "absl::InitializeLog", "cuda drivers")


def test_train_shows_no_tensorflow_start_up_lines_and_a_progress_bar_inside_each_epoch(tiny_set, tmp_path):
    work = tmp_path / "w"
    whaleid("preprocess", "--data", tiny_set, "--work", work, "--config", CPU, "--quiet")
    args = [sys.executable, "-m", "whaleid.cli", "train", "--work", str(work), "--set", "model.backbone=tiny",
            "--set", "run.image_size=48", "--set", "train.epochs=1", "--set", "train.batch_size=16"]
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", files.VERBOSE)}
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)], proc.stderr
    assert "[train] epoch 1/1" in proc.stderr and "step" in proc.stderr and "img/s" in proc.stderr, proc.stderr
    assert "[train] epoch 1/1:" in proc.stdout  # the epoch's line stays
    quiet = subprocess.run(args + ["--quiet", "--force"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert quiet.returncode == 0 and "step" not in quiet.stderr, quiet.stderr


def test_native_start_up_lines_are_filtered_unless_verbose():
    code = ("import os, sys\nsys.path.insert(0, sys.argv[1])\nfrom whaleid.pipeline.files import quiet_native_startup\n"
            "with quiet_native_startup():\n"
            "    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n')\n"
            "    os.write(2, b'I0000 00:00:1796084729.912986   31398 port.cc:153] oneDNN custom operations are on.\\n')\n"
            "    os.write(2, b'a real problem\\n')\n")
    quiet = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != files.VERBOSE})
    assert quiet.stderr == "a real problem\n"
    verbose = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True,
                             env={**os.environ, files.VERBOSE: "1"})
    assert "oneDNN" in verbose.stderr and "InitializeLog" in verbose.stderr and "a real problem" in verbose.stderr
