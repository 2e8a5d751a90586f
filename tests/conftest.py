import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def shared_data():
    """../shared/data (real photos); users' checkouts lack it, so tests that need it skip."""
    if not SHARED.is_dir():
        pytest.skip(f"real data folder {SHARED} is absent (only in the whaleid workplace)")
    return SHARED
