"""A living reference atlas: one URI holding the cells, the model and a history of versions.

    ATLAS/
      versions/0001.json     one record per version, created exclusively and never rewritten: the
      versions/0002.json     commit point. Latest version = the highest number. A record names the
                             segments and model files that make up that version.
      segments/0001-<id>.zarr   an atlas store of the cells a version added (written by ``ingest``)
      models/0001-<id>/         a model directory: weights and vocabularies of that version, and the
                                cell table of the cells it added only (older cells' representations
                                are stored once, in the version that added them)

An update writes its segment and model under fresh names, so nothing of an existing version is ever
touched; only the record makes them part of the atlas. A failure or a kill before the record exists
leaves the previous version as it was (unreferenced files stay behind; a rerun writes new ones).
Two updates at once: both build, one creates ``versions/000N.json`` first (an exclusive create,
``os.link`` on local disks), the other fails with a message. On object storage the create is an
existence check then a write: two updates racing within that window are not detected.

Fault injection for tests: ``ATLASDGD_ATLAS_FAULT=<stage>`` makes the process exit at that stage
(``append``, ``map``, ``finetune``, ``model``, ``commit``), as a kill would.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from atlasdgd.api import DGD
from atlasdgd.artifact import CELLS
from atlasdgd.data.adapters import read_input
from atlasdgd.errors import AtlasDGDError
from atlasdgd.infer.outputs import append_cells
from atlasdgd.io.uri import filesystem, is_remote
from atlasdgd.store.ingest import ingest

FORMAT, FORMAT_VERSION = "atlasdgd-atlas", 1
VERSION_KEY = "atlas_version"  # obs column: the version each cell arrived in
_REF = re.compile(r"^(?P<uri>.+?)@(?P<version>\d+)$")


class AtlasError(AtlasDGDError):
    """An atlas is missing, damaged, or an operation on it cannot proceed."""


@dataclass
class VersionRecord:
    """What one version of the atlas is made of (versions/NNNN.json)."""

    version: int
    time: str
    model: str  # model directory (relative to the atlas) holding this version's weights and vocabularies
    cell_parts: list[list]  # [[version that added them, model directory holding their cell table], ...]
    segments: list[str]  # atlas stores of the cells, in cell order
    n_cells: int
    n_added: int
    added: dict = field(default_factory=dict)  # batches, new classes, labels, metrics of the added cells
    finetuned: bool = False
    rollback_of: int | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict) -> "VersionRecord":
        if d.get("format") != FORMAT:
            raise AtlasError(f"not an atlasdgd atlas version record (format {d.get('format')!r})")
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise AtlasError(f"atlas version record of format {d['format_version']} was written by a newer atlasdgd: "
                             "upgrade atlasdgd to read it")
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def parse_reference(ref: str) -> tuple[str, int | None]:
    """``ATLAS`` -> (ATLAS, None: the latest); ``ATLAS@N`` -> (ATLAS, N)."""
    m = _REF.match(str(ref))
    return (m["uri"], int(m["version"])) if m else (str(ref), None)


def is_atlas(ref: str, storage_options: dict | None = None) -> bool:
    uri, _ = parse_reference(ref)
    fs, root = filesystem(uri, storage_options, error=AtlasError)
    return fs.isdir(f"{root}/versions") and bool(fs.glob(f"{root}/versions/[0-9]*.json"))


def _fault(stage: str) -> None:
    if os.environ.get("ATLASDGD_ATLAS_FAULT") == stage:
        os._exit(70)  # as abrupt as a kill: no cleanup, no exception handlers


class Atlas:
    """A versioned atlas at ``uri`` (any fsspec URI). See the module docstring for its layout."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri, self.storage_options = str(uri).rstrip("/"), storage_options
        self.fs, self.root = filesystem(self.uri, storage_options, error=AtlasError)

    # -- reading ---------------------------------------------------------------------------
    def versions(self) -> list[int]:
        names = self.fs.glob(f"{self.root}/versions/[0-9]*.json")
        return sorted(int(Path(n).stem) for n in names if Path(n).stem.isdigit())

    def latest(self) -> int:
        versions = self.versions()
        if not versions:
            raise AtlasError(f"{self.uri!r} is not an atlas (no committed version): create one with 'atlasdgd atlas create'")
        return versions[-1]

    def record(self, version: int | None = None) -> VersionRecord:
        version = self.latest() if version is None else int(version)
        path = f"{self.root}/versions/{version:04d}.json"
        if not self.fs.exists(path):
            raise AtlasError(f"{self.uri!r} has no version {version} (versions: {self.versions()})")
        with self.fs.open(path, "r") as f:
            return VersionRecord.from_dict(json.load(f))

    def log(self) -> list[dict]:
        """Every version's record, oldest first (what ``atlasdgd atlas log --json`` prints)."""
        return [asdict(self.record(v)) for v in self.versions()]

    def _path(self, relative: str) -> str:
        return f"{self.uri}/{relative}"

    def _make_folders(self) -> None:
        for folder in ("segments", "models", "versions"):
            self.fs.makedirs(f"{self.root}/{folder}", exist_ok=True)

    def model(self, version: int | None = None, device="auto") -> DGD:
        """The model of a version, with the cell table of every cell that version holds (each
        cell's arrival version in ``obs['atlas_version']``)."""
        rec = self.record(version)
        model = DGD.load(self._path(rec.model), storage_options=self.storage_options, device=device)
        parts = []
        for added_in, part in rec.cell_parts:
            table = model.cells if part == rec.model else self._cells(part)
            table = table.copy()
            if VERSION_KEY not in table.obs:  # a fine-tuned version's full table carries it per cell
                table.obs[VERSION_KEY] = int(added_in)
            parts.append(table)
        cells = ad.concat(parts, join="outer", merge="same") if len(parts) > 1 else parts[0]
        for col in cells.obs.columns:  # concat turns categoricals with different categories into objects
            if col != VERSION_KEY and cells.obs[col].dtype == object:
                cells.obs[col] = pd.Categorical(cells.obs[col].where(cells.obs[col].notna(), None))
        model.cells = cells
        return model

    def _cells(self, model_dir: str) -> ad.AnnData:
        uri = f"{self._path(model_dir)}/{CELLS}"
        if is_remote(uri):
            import zarr

            return ad.read_zarr(zarr.storage.FsspecStore.from_url(uri, storage_options=self.storage_options or {}))
        return ad.read_zarr(uri)

    # -- writing ---------------------------------------------------------------------------
    @classmethod
    def create(cls, uri: str, data: str | None = None, *, label_key: str | None = None,
               covariate_keys: list[str] | tuple[str, ...] = (), store: str | None = None, model: str | None = None,
               train_options: dict | None = None, model_options: dict | None = None, seed: int = 0,
               device="auto", storage_options: dict | None = None, progress: bool = True) -> "Atlas":
        """Ingest ``data`` (or adopt the atlas store ``store``), train version 1 (or adopt the trained
        model directory ``model``, which must have been trained on those cells) and commit it."""
        atlas = cls(uri, storage_options)
        if atlas.fs.exists(f"{atlas.root}/versions") and atlas.versions():
            raise AtlasError(f"{uri!r} already holds an atlas (latest version {atlas.latest()}): "
                             "use 'atlasdgd atlas update' to add cells")
        if (data is None) == (store is None):
            raise AtlasError("give the cells either as DATA (.h5ad/.h5mu/.zarr) or as an existing store (--store URI)")
        token = uuid.uuid4().hex[:8]
        atlas._make_folders()
        if store is None:
            segment = f"segments/0001-{token}.zarr"
            ingest(data, atlas._path(segment), label_key=label_key, covariate_keys=list(covariate_keys), seed=seed,
                   storage_options=storage_options, progress=progress)
            source = atlas._path(segment)
        else:  # adopted where it is
            segment = source = store if is_remote(store) else os.path.abspath(store)
        if model is not None:
            from atlasdgd.store.cells import open_store

            trained = DGD.load(model, storage_options=storage_options, device=device)
            stored = open_store(source, storage_options).obs_names.astype(str)
            if not trained.cells.obs_names.astype(str).equals(stored):
                raise AtlasError(f"the model {model!r} was not trained on the cells of this store (cell names or "
                                 "their order differ): train it on the store, let 'atlas create' train, or ingest the "
                                 "model's input with --order input (stores are [train | validation | test] by default)")
        else:
            trained = DGD(source, label_key=label_key, covariate_keys=list(covariate_keys), seed=seed, device=device,
                          storage_options=storage_options, **(model_options or {}))
            trained.train(progress=progress, **(train_options or {}))
        model_dir = f"models/0001-{token}"
        trained.save(atlas._path(model_dir), storage_options=storage_options)
        n = int(trained.cells.n_obs)
        atlas._commit(VersionRecord(version=1, time=_now(), model=model_dir, cell_parts=[[1, model_dir]],
                                    segments=[segment], n_cells=n, n_added=n,
                                    added={"labels": list(trained.vocab.labels),
                                           "batches": {k: list(v) for k, v in trained.vocab.covariates.items()}}))
        return atlas

    def update(self, data: str, *, epochs: int = 20, finetune: int = 0, device="auto", progress: bool = True) -> VersionRecord:
        """Add the cells of ``data`` as a new version: validate, append, map with the frozen model
        (new covariate classes get new components), commit. See the module docstring for what a
        failure leaves behind."""
        if finetune < 0:
            raise AtlasError(f"finetune must be >= 0 epochs, got {finetune}")
        base = self.record()
        model = self.model(base.version, device=device)
        query = read_input(data)
        aligned = model.align(query)  # features and classes checked before anything is written
        clash = aligned.obs.index.intersection(model.cells.obs.index)
        if len(clash):
            raise AtlasError(f"{len(clash)} new cells share names with cells already in the atlas (for example "
                             f"{clash[0]!r}): rename them (e.g. prefix the batch) and update again")
        for key in model.vocab.covariates:
            if key not in aligned.obs:
                raise AtlasError(f"the new cells have no obs column {key!r}, a covariate of this atlas: add it")
        label_key = model.vocab.label_key
        has_labels = label_key is not None and label_key in aligned.obs and aligned.obs[label_key].notna().any()
        version, token = base.version + 1, uuid.uuid4().hex[:8]

        segment = f"segments/{version:04d}-{token}.zarr"
        self._make_folders()
        # in the input's order: the segment's rows must line up with the mapped cells' table below
        ingest(data, self._path(segment), label_key=label_key if has_labels else None,
               covariate_keys=list(model.vocab.covariates), seed=model.train_config.seed, order="input",
               storage_options=self.storage_options, progress=progress)
        _fault("append")
        classes_before = {k: list(v) for k, v in model.vocab.covariates.items()}
        table = model.map(query, epochs=epochs, new_covariate_classes=True, progress=progress)
        _fault("map")
        new_classes = {k: [c for c in v if c not in classes_before[k]] for k, v in model.vocab.covariates.items()}
        part = append_cells(model.cells[:0], table, model.vocab, model.model_config.n_components)
        if VERSION_KEY in part.obs:
            del part.obs[VERSION_KEY]
        for key in ("dgd_label", "dgd_label_confidence"):  # what the transfer said, next to the kept labels
            if key in table.obs:
                part.obs[key] = table.obs[key].to_numpy()
        model_dir = f"models/{version:04d}-{token}"
        if finetune:
            self._finetune(model, [*base.segments, segment], part, finetune, version, progress)
            _fault("finetune")
            parts = [[version, model_dir]]  # every representation may have moved: one full table
        else:
            model.cells = part  # the version keeps the training history of the model it came from
            parts = [*base.cell_parts, [version, model_dir]]
        model.save(self._path(model_dir), storage_options=self.storage_options)
        _fault("model")
        added = {
            "batches": {k: sorted(map(str, aligned.obs[k].dropna().unique())) for k in model.vocab.covariates},
            "new_classes": new_classes,
            "labels": sorted(map(str, aligned.obs[label_key].dropna().unique())) if has_labels else [],
            "metrics": {"nll_per_feature": float(np.mean(table.obs["dgd_nll_per_feature"])),
                        **({"mean_label_confidence": float(np.mean(table.obs["dgd_label_confidence"]))}
                           if "dgd_label_confidence" in table.obs else {}),
                        **({"label_accuracy": float((table.obs["dgd_label"].astype(str).to_numpy()
                                                     == aligned.obs[label_key].astype(str).to_numpy()).mean())}
                           if has_labels and "dgd_label" in table.obs else {})},
        }
        n_added = int(part.n_obs)
        record = VersionRecord(version=version, time=_now(), model=model_dir,
                               cell_parts=parts, segments=[*base.segments, segment],
                               n_cells=base.n_cells + n_added, n_added=n_added, added=added,
                               finetuned=bool(finetune))
        _fault("commit")
        self._commit(record)
        return record

    def _segment_uri(self, segment: str) -> str:
        return segment if "://" in segment or segment.startswith("/") else self._path(segment)

    def _finetune(self, model: DGD, segments: list[str], part: ad.AnnData, epochs: int, version: int,
                  progress: bool) -> None:
        """Continue training on every cell of every segment from the current weights and
        representations (the new cells from where mapping put them); ``model.cells`` becomes the full
        table, each cell keeping its arrival version."""
        from atlasdgd.store.cells import StoreCells, open_store
        from atlasdgd.store.concat import ConcatStore

        vocab = model.vocab
        old = model.cells
        arrival = np.concatenate([old.obs[VERSION_KEY].to_numpy(), np.full(part.n_obs, version)]).astype(np.int64)
        stores = [open_store(self._segment_uri(s), self.storage_options).store for s in segments]
        joined = ConcatStore(stores, vocab.features)
        names = old.obs_names.append(part.obs_names)
        if not joined.obs.index.astype(str).equals(pd.Index(names.astype(str))):
            raise AtlasError("the atlas's segments and cell tables list different cells: the atlas is damaged; "
                             "roll back to an earlier version")
        for key, classes in vocab.covariates.items():
            joined.obs[key] = pd.Categorical(joined.obs[key].astype(str), categories=list(classes))
        label_key = vocab.label_key if vocab.label_key in joined.obs else None
        if label_key:
            values = joined.obs[label_key].astype(object)
            joined.obs[label_key] = pd.Categorical(values.where(values.isin(vocab.labels), None),
                                                   categories=list(vocab.labels))
        source = StoreCells(joined, label_key=label_key, covariate_keys=list(vocab.covariates))
        blocks = [f"X_dgd_{k}" for k in vocab.covariates]
        start = np.concatenate([np.hstack([t.obsm["X_dgd"], *[t.obsm[b] for b in blocks]]) for t in (old, part)])
        model.data = source
        model.train(start=start, progress=progress, max_epochs=epochs, min_epochs=0)
        model.cells.obs[VERSION_KEY] = arrival

    def rollback(self, version: int) -> VersionRecord:
        """Make ``version`` the latest again: a new version with its content (nothing is deleted)."""
        old, latest = self.record(version), self.latest()
        record = VersionRecord(**{**asdict(old), "version": latest + 1, "time": _now(), "rollback_of": int(version),
                                  "n_added": 0, "added": {}})
        self._commit(record)
        return record

    def _commit(self, record: VersionRecord) -> None:
        """Create versions/NNNN.json exclusively: the one write that makes a version exist."""
        text = json.dumps(asdict(record), indent=1)
        final = f"{self.root}/versions/{record.version:04d}.json"
        conflict = AtlasError(f"another update committed version {record.version} of {self.uri!r} first: "
                              "nothing of this update is visible; run it again to add the cells on top of it")
        self.fs.makedirs(f"{self.root}/versions", exist_ok=True)
        if not is_remote(self.uri):
            tmp = f"{final}.{uuid.uuid4().hex}.tmp"
            Path(tmp).write_text(text)
            try:
                os.link(tmp, final)  # atomic and exclusive: fails if the version exists
            except FileExistsError:
                raise conflict from None
            finally:
                os.unlink(tmp)
            return
        if self.fs.exists(final):
            raise conflict
        with self.fs.open(final, "w") as f:
            f.write(text)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
