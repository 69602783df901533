"""The model directory: an explicit, versioned, pickle-free on-disk format.

    MODEL_DIR/
      atlasdgd.json         manifest: format + version, model and training settings, vocabularies
                            (feature names per modality, label and covariate classes, the majority
                            label of each mixture component); written last
      weights.safetensors   decoder, dispersions, basal and covariate mixtures
      cells.zarr            AnnData (zarr v3), no X: obs = split, label, covariates, dgd_cluster;
                            obsm = X_dgd (basal) and X_dgd_<covariate>
      history.csv           one row per epoch
      loss_curve.png        the history as a plot

A directory is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written model where a complete one is expected.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from atlasdgd.errors import ModelFileError
from atlasdgd.io.atomic import atomic_directory
from atlasdgd.io.manifest import ManifestKind
from atlasdgd.io.manifest import read_manifest as read_versioned
from atlasdgd.io.uri import filesystem, is_remote
from atlasdgd.infer.library import LibraryModel
from atlasdgd.model.config import ModelConfig
from atlasdgd.model.module import DGDModule
from atlasdgd.train.config import TrainConfig

FORMAT = "atlasdgd-model"
FORMAT_VERSION = 1
MANIFEST, WEIGHTS, CELLS, HISTORY, LOSS_PLOT = "atlasdgd.json", "weights.safetensors", "cells.zarr", "history.csv", "loss_curve.png"


@dataclass
class Vocabulary:
    """Names that give meaning to the model's indices."""

    features: dict[str, list[str]]
    label_key: str | None = None
    labels: list[str] = field(default_factory=list)
    covariates: dict[str, list[str]] = field(default_factory=dict)
    component_labels: list[str | None] = field(default_factory=list)
    label_transfer: dict = field(default_factory=dict)  # fitted LabelTransfer settings (infer/labels.py)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ModelFiles:
    module: DGDModule
    model_config: ModelConfig
    train_config: TrainConfig
    vocab: Vocabulary
    cells: ad.AnnData
    history: pd.DataFrame
    library_model: LibraryModel | None = None


def write_model(path: str | Path, files: ModelFiles, overwrite: bool = False, plot: bool = True,
                storage_options: dict | None = None):
    """Write a model directory; ``path`` may be a remote fsspec URI (s3://...): the model is written
    locally, then uploaded with its manifest last, so an interrupted upload is never complete."""
    if is_remote(path):
        import tempfile

        fs, root = filesystem(str(path), storage_options, error=ModelFileError)
        if fs.exists(f"{root}/{MANIFEST}") and not overwrite:
            raise ModelFileError(f"{str(path)!r} already holds a model: choose another URI or pass overwrite (--overwrite)")
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            write_model(local, files, plot=plot)
            if fs.exists(root):
                fs.rm(root, recursive=True)
            for item in sorted(local.iterdir()):
                if item.name != MANIFEST:
                    fs.put(str(item), f"{root}/{item.name}", recursive=item.is_dir())
            fs.put(str(local / MANIFEST), f"{root}/{MANIFEST}")
        return str(path)
    return _write_local(path, files, overwrite, plot)


def _write_local(path: str | Path, files: ModelFiles, overwrite: bool, plot: bool) -> Path:
    from atlasdgd import __version__

    with atomic_directory(path, overwrite) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in files.module.state_dict().items()}  # loads on any device
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        with ad.settings.override(zarr_write_format=3), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
            files.cells.write_zarr(tmp / CELLS)
        files.history.to_csv(tmp / HISTORY, index=False)
        if plot and len(files.history):
            from atlasdgd.plotting import plot_history

            plot_history(files.history, tmp / LOSS_PLOT)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "atlasdgd_version": __version__,
            "model": files.model_config.to_dict(),
            "training": files.train_config.to_dict(),
            "vocabulary": files.vocab.to_dict(),
            "n_cells": int(files.cells.n_obs),
            "library_model": None if files.library_model is None else files.library_model.to_dict(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return Path(path)


MODEL_MANIFEST = ManifestKind(MANIFEST, FORMAT, FORMAT_VERSION, "atlasdgd model", ModelFileError,
                              incomplete="was training interrupted? Train again, or --resume from its checkpoints",
                              outdated="use the atlasdgd version that wrote it")


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ModelFileError(f"no model directory at {str(path)!r}: pass the --out folder of 'atlasdgd train'")
    fs, root = filesystem(str(path), error=ModelFileError)
    return read_versioned(fs, root, MODEL_MANIFEST, where=str(path))


def read_model(path: str | Path, storage_options: dict | None = None) -> ModelFiles:
    if is_remote(path):  # download, then read like a local directory
        import tempfile

        fs, root = filesystem(str(path), storage_options, error=ModelFileError)
        read_versioned(fs, root, MODEL_MANIFEST, where=str(path))  # complete and readable before downloading
        with tempfile.TemporaryDirectory() as tmp:
            fs.get(root.rstrip("/") + "/", f"{tmp}/model/", recursive=True)
            files = read_model(Path(tmp) / "model")
            files.cells = files.cells.to_memory() if hasattr(files.cells, "to_memory") else files.cells
            return files
    path = Path(path)
    manifest = read_manifest(path)
    model_config = ModelConfig.from_dict(manifest["model"])
    train_config = TrainConfig.from_dict(manifest["training"])
    vocab = Vocabulary(**manifest["vocabulary"])
    module = DGDModule(model_config)
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"cannot read the weights in {str(path / WEIGHTS)!r} ({e}): the file is missing or corrupted") from e
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ModelFileError(f"the weights in {str(path / WEIGHTS)!r} do not fit the model described in {MANIFEST}: {e}") from e
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise ModelFileError(f"weight {name!r} in {str(path / WEIGHTS)!r} has non-finite values: the file is corrupted")
    try:
        cells = ad.read_zarr(path / CELLS)
    except Exception as e:  # zarr raises several types for a damaged store
        raise ModelFileError(f"cannot read {str(path / CELLS)!r} ({e}): the model directory is damaged") from e
    history = pd.read_csv(path / HISTORY) if (path / HISTORY).exists() else pd.DataFrame()
    module.eval()
    library = manifest.get("library_model")
    library_model = None if library is None else LibraryModel.from_dict(library)
    return ModelFiles(module, model_config, train_config, vocab, cells, history, library_model)
