"""Where the shared real data sets live (../shared/data beside the checkout, or $ATLASDGD_DATA)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DATA_DIR = Path(os.environ.get("ATLASDGD_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
KANG = DATA_DIR / "kang2018_ctrl_5donors_muscat.h5ad"
SNARE = DATA_DIR / "snareseq_mouse_cortex_10309cells_scmomat.h5mu"


def require(path: Path) -> Path:
    if not path.exists():
        sys.exit(f"skipped: {path} not found (set ATLASDGD_DATA to the folder holding the shared data sets)")
    return path
