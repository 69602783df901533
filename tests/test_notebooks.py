"""The notebooks run from top to bottom (small sizes: ATLASDGD_NOTEBOOK_SMALL=1), in a scratch folder."""

import os
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _data_dir() -> Path:
    return Path(os.environ.get("ATLASDGD_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_executes(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if name.startswith("02_") and not (_data_dir() / "snareseq_mouse_cortex_10309cells_scmomat.h5mu").exists():
        pytest.skip(f"the SNARE-seq data is not in {_data_dir()} (set ATLASDGD_DATA)")
    if name.startswith("03_"):
        pytest.importorskip("moto")
        pytest.importorskip("ray")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks with outputs stripped"
    monkeypatch.setenv("ATLASDGD_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("ATLASDGD_DATA", str(_data_dir()))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
