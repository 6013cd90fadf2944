"""Test-wide environment: quiet Paddle logs, fixed thread count, the shared read-only fixtures."""

import os
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("PYTHONWARNINGS", "ignore:No ccache found")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """`../shared/fixtures` (read-only inputs written by real mxnet / InsightFace); skip if absent."""
    path = SHARED / "fixtures"
    if not path.is_dir():
        pytest.skip("../shared/fixtures is not beside the project")
    return path
