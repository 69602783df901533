"""Any training input as a cell source: an AnnData/MuData object, a file (.h5ad, .h5mu, AnnData .zarr),
an atlas store (zarr at any fsspec URI) or a TileDB-SOMA experiment. The API and the CLI both open
their data here, so ``DGD("kang.h5ad")`` and ``atlasdgd train kang.h5ad`` take the same path.
"""

from __future__ import annotations

from pathlib import Path

from atlasdgd.data.source import CellSource
from atlasdgd.errors import InputError


def is_store_uri(target: str) -> bool:
    """A store rather than a file: a URI with a scheme, a directory holding a store manifest, or a
    TileDB-SOMA experiment."""
    from atlasdgd.store.format import MANIFEST
    from atlasdgd.store.soma import is_soma

    target = str(target)
    if "://" in target:
        return True
    p = Path(target)
    return (p / MANIFEST).exists() or is_soma(target)


def open_cells(data, *, label_key: str | None = None, covariate_keys=(), modalities: list[str] | None = None,
               layer: str | dict[str, str] | None = None, modality_key: str | None = None,
               split_key: str | None = None, split_fractions=(0.8, 0.1, 0.1), seed: int = 0,
               storage_options: dict | None = None):
    """A validated cell source for ``data`` (see the module docstring); problems raise InputError
    before any work starts."""
    from atlasdgd.data.adapters import prepare, read_input

    if isinstance(data, CellSource) and hasattr(data, "split_rows"):  # already a source (an opened store)
        return data
    if isinstance(data, (str, Path)):
        target = str(data)
        if is_store_uri(target):
            return _open_store(target, label_key, covariate_keys, modalities, layer, storage_options)
        if not Path(target).exists():
            raise InputError(f"input {target!r} does not exist: give an .h5ad, .h5mu or AnnData .zarr file, "
                             "or an atlas store URI")
        data = read_input(target)
    return prepare(data, label_key=label_key, covariate_keys=list(covariate_keys or ()), modalities=modalities,
                   layer=layer, modality_key=modality_key, split_key=split_key, split_fractions=split_fractions,
                   seed=seed)


def _open_store(uri: str, label_key, covariate_keys, modalities, layer, storage_options):
    from atlasdgd.store.cells import open_store
    from atlasdgd.store.soma import is_soma

    options: dict = {}
    if layer is not None:
        if not is_soma(uri):
            raise InputError(f"layer={layer!r}: an atlas store holds the counts chosen at ingest; layers apply to "
                             "AnnData/MuData files and TileDB-SOMA experiments (ingest again with --layer)")
        if not isinstance(layer, str):
            raise InputError("a TileDB-SOMA experiment takes one X layer name for every measurement, not a dict")
        options["layer"] = layer
    return open_store(uri, storage_options, label_key=label_key, covariate_keys=list(covariate_keys or ()) or None,
                      modalities=modalities, **options)
