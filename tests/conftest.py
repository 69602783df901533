import os
import warnings
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", category=FutureWarning)

DATA_DIR = Path(os.environ.get("ATLASDGD_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def shared_data(name: str) -> Path:
    """Path of a shared real data set; skips the test (saying why) when it is absent."""
    path = DATA_DIR / name
    if not path.exists():
        pytest.skip(f"shared data set {name} not found in {DATA_DIR} (set ATLASDGD_DATA)")
    return path
