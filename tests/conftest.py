import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).parent))


def cli(*args) -> tuple[int, str]:
    """(exit code, output) of the whaleid command line run in-process."""
    from click.testing import CliRunner
    from whaleid.cli import main
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def whaleid(*args) -> str:
    """The output of a whaleid command that must succeed."""
    code, output = cli(*args)
    assert code == 0, output
    return output


@pytest.fixture
def shared_data():
    """../shared/data (real photos); users' checkouts lack it, so tests that need it skip."""
    if not SHARED.is_dir():
        pytest.skip(f"real data folder {SHARED} is absent (only in the whaleid workplace)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    """A small synthetic data set (Kaggle layout + ground truth), built once; tests must not modify it."""
    from whaleid.datasets import synth
    out = tmp_path_factory.mktemp("synth") / "data"
    synth.generate(out, ids=8, seed=3, workers=2, photos="uniform:5", size_scale=0.3,
                   duplicate_fraction=0.08, progress=False)
    return out
