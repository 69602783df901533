"""The user-facing model class: set up from data, train, save, load, embed.

    >>> import atlasdgd
    >>> data = atlasdgd.simulate(n_cells=2000, n_batches=2)
    >>> model = atlasdgd.DGD(data, label_key="cell_type", covariate_keys=["batch"])
    >>> model.train(max_epochs=100)
    >>> model.save("model_dir")
    >>> cells = atlasdgd.DGD.load("model_dir").embed()   # AnnData with obsm["X_dgd"]
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from atlasdgd.artifact import ModelFiles, Vocabulary, read_model, write_model
from atlasdgd.errors import AtlasDGDError, check_arguments
from atlasdgd.infer.library import LibraryModel
from atlasdgd.infer.mapping import MappingOptions, map_cells
from atlasdgd.infer.new_classes import learn_query_classes
from atlasdgd.infer.outputs import (EMBEDDING_KEY, append_cells, component_labels, fit_label_transfer,
                                    label_transfer, mapped_cells_table, predicted_modalities,
                                    training_cells_table)
from atlasdgd.infer.query import DEFAULT_MIN_OVERLAP, Query, align_query
from atlasdgd.model.config import ModelConfig
from atlasdgd.model.module import DGDModule
from atlasdgd.runtime.device import on_device_of, resolve_device, to_numpy
from atlasdgd.runtime.malloc import release_free_memory
from atlasdgd.store.sources import open_cells
from atlasdgd.train.config import TrainConfig
from atlasdgd.train.run import run_training

log = logging.getLogger(__name__)


def _named_parameters(function) -> set[str]:
    """The keyword names a method takes itself (for the list of valid ones in an error)."""
    import inspect

    return {name for name, p in inspect.signature(function).parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


class DGD:
    """A Deep Generative Decoder model and the representations of the cells it was trained on.

    Args:
        data: AnnData or MuData with raw counts (see :func:`atlasdgd.data.adapters.prepare` for
            ``modalities``, ``layer``, ``modality_key`` and ``split_key``), the path of an .h5ad,
            .h5mu or AnnData .zarr file, or the URI of an atlas store (``atlasdgd ingest``; zarr or
            TileDB-SOMA, where ``layer`` names the X layer), streamed from disk or object storage. A
            store carries its split, label and covariate columns (defaults for the keys).
        label_key: obs column of cell-type labels: sets the number of mixture components and
            gives each component a label.
        covariate_keys: obs columns of categorical covariates (batch, donor, ...) to model with
            their own 2-D supervised representations, keeping them out of the basal one.
        latent_dim: basal representation size.
        n_components: mixture components (default: number of labels, else 1).
        seed: seeds the split, initialisation and minibatch order.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; checked first.
        storage_options: fsspec options for a store URI (credentials, endpoint).
        **model_options: other :class:`~atlasdgd.model.config.ModelConfig` fields.
    """

    def __init__(
        self,
        data,
        *,
        label_key: str | None = None,
        covariate_keys: list[str] | tuple[str, ...] = (),
        modalities: list[str] | None = None,
        layer: str | dict[str, str] | None = None,
        modality_key: str | None = None,
        split_key: str | None = None,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        latent_dim: int = 20,
        n_components: int | None = None,
        seed: int = 0,
        device: str | torch.device = "auto",
        storage_options: dict | None = None,
        **model_options,
    ):
        check_arguments("DGD()", model_options, _named_parameters(DGD.__init__)
                        | set(ModelConfig.__dataclass_fields__) - {"modalities", "covariates"})
        self.device = resolve_device(device)  # before any work: a missing GPU fails here
        log.info("reading %s", data if isinstance(data, (str, Path)) else type(data).__name__)
        self.data = open_cells(data, label_key=label_key, covariate_keys=covariate_keys, modalities=modalities,
                               layer=layer, modality_key=modality_key, split_key=split_key,
                               split_fractions=split_fractions, seed=seed, storage_options=storage_options)
        label_key = self.data.label_key  # a store carries its own default
        labels = self.data.label_classes()
        if n_components is None:
            n_components = len(labels) if labels else 1
        if n_components < 1:
            raise AtlasDGDError(f"n_components must be >= 1, got {n_components}")
        self.model_config = ModelConfig(
            modalities={m: self.data.n_features(m) for m in self.data.modalities},
            latent_dim=latent_dim,
            n_components=n_components,
            covariates={k: len(v) for k, v in self.data.covariate_classes().items()},
            **model_options,
        )
        self.vocab = Vocabulary(
            features={m: list(map(str, f)) for m, f in self.data.feature_names.items()},
            label_key=label_key,
            labels=labels,
            covariates=self.data.covariate_classes(),
        )
        torch.manual_seed(seed)
        self.module = DGDModule(self.model_config, generator=torch.Generator().manual_seed(seed)).to(self.device)
        self.train_config = TrainConfig(seed=seed)
        self.cells: ad.AnnData | None = None
        self.history = pd.DataFrame()
        self.library_model: LibraryModel | None = None

    # -- training ------------------------------------------------------------------------
    def train(self, progress: bool = True, on_epoch=None, checkpoint_uri: str | None = None,
              storage_options: dict | None = None, resume: bool = False, checkpoint_every: int | None = None,
              checkpoint_seconds: float = 300.0, start: np.ndarray | None = None, **train_options) -> pd.DataFrame:
        """Fit decoder, mixtures and representations on the model's device; returns the per-epoch history.

        ``on_epoch`` is called with each epoch's history row (for logging). ``train_options`` are
        :class:`~atlasdgd.train.config.TrainConfig` fields (``max_epochs``, ``batch_size``, learning
        rates, ``hyperprior``, ``init``, ``precision``, ...). With ``checkpoint_uri`` a checkpoint is
        written every ``checkpoint_every`` epochs, or by default once ``checkpoint_seconds`` of wall
        time have passed since the last (:mod:`atlasdgd.train.checkpoint`); ``resume``
        continues from the latest complete one. Under torch.distributed (Ray Train workers) this is
        one worker's part (see :func:`atlasdgd.train.run.run_training`). ``start`` ``[N, D]``:
        continue from these representations and the current weights (fine-tuning; no PCA start).
        """
        if self.data is None:
            raise AtlasDGDError("this model has no training data attached (it was loaded): create DGD(data, ...) to train")
        check_arguments("DGD.train()", train_options, _named_parameters(DGD.train) | set(TrainConfig.__dataclass_fields__))
        cfg = TrainConfig(**{**self.train_config.to_dict(), **train_options})
        self.train_config = cfg
        labels = self.data.label_codes() if self.vocab.label_key else None
        result = run_training(self.module, self.data, cfg, label_codes=labels, n_labels=len(self.vocab.labels),
                              device=self.device,
                              checkpoint_uri=checkpoint_uri, storage_options=storage_options, resume=resume,
                              checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds,
                              progress=progress, on_epoch=on_epoch, start=start)
        self.history = pd.DataFrame(result.history)
        if result.values is None:  # a worker other than 0: worker 0 holds the model
            return self.history
        self.library_model = result.library_model
        self.cells = training_cells_table(self.module, self.data.obs, result.values)
        # the cell table's obsm are views of result.values (see training_cells_table); nothing else of the
        # run is held through the label transfer's fit (the peak of a 1M-cell run's last phase)
        del result
        self.vocab.component_labels = component_labels(self.cells, self.vocab.label_key, self.model_config.n_components)
        self.vocab.label_transfer = fit_label_transfer(self.module, self.vocab, self.cells, cfg.seed)
        release_free_memory()  # the output tables' and label transfer's scratch (see runtime/malloc.py)
        return self.history

    def to(self, device: str | torch.device) -> "DGD":
        """Move the model to ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``); returns self."""
        self.device = resolve_device(device)
        self.module.to(self.device)
        return self

    # -- results -------------------------------------------------------------------------
    def _require_trained(self) -> ad.AnnData:
        if self.cells is None:
            raise AtlasDGDError("the model is not trained yet: call train() first")
        return self.cells

    @property
    def representation(self) -> np.ndarray:
        """Full representations ``[cells, latent_dim + 2 x covariates]`` in the cells' order."""
        cells = self._require_trained()
        parts = [cells.obsm[EMBEDDING_KEY]] + [cells.obsm[f"{EMBEDDING_KEY}_{k}"] for k in self.model_config.covariates]
        return np.concatenate(parts, axis=1)

    def embed(self) -> ad.AnnData:
        """An AnnData of the cells (no counts): ``obsm['X_dgd']``, ``obsm['X_dgd_<covariate>']``,
        ``obs['dgd_cluster']``, ``obs['dgd_split']`` and the label and covariate columns."""
        return self._require_trained().copy()

    def cluster(self, basal: np.ndarray) -> np.ndarray:
        """Mixture component of each row of a basal representation."""
        with torch.no_grad():
            return to_numpy(self.module.basal.cluster(on_device_of(self.module, basal)))

    def log_fractions(self, representation: np.ndarray) -> dict[str, np.ndarray]:
        """Decoded log expression fractions per modality for full representations."""
        with torch.no_grad():
            out = self.module.log_fractions(on_device_of(self.module, representation))
        return {m: to_numpy(v) for m, v in out.items()}

    # -- the scvi-tools shaped calls -------------------------------------------------------
    def __repr__(self) -> str:
        mc = self.model_config
        mods = ", ".join(f"{m} ({n:,} features)" for m, n in mc.modalities.items())
        cells = "not trained" if self.cells is None else f"{self.cells.n_obs:,} cells, {len(self.history)} epochs trained"
        labels = (f"{len(self.vocab.labels)} labels from obs[{self.vocab.label_key!r}]" if self.vocab.label_key
                  else "no labels")
        covs = ", ".join(f"{k} ({len(v)} classes)" for k, v in self.vocab.covariates.items()) or "none"
        return (f"DGD model: {mods}\n"
                f"  cells: {cells}\n"
                f"  mixture: {mc.n_components} components in {mc.latent_dim} dimensions; {labels}\n"
                f"  covariates: {covs}\n"
                f"  device: {self.device}")

    def get_latent_representation(self, adata=None, *, covariates: bool = False, **map_options) -> np.ndarray:
        """``[cells, latent_dim]`` basal representations: of the training cells (``adata`` None, in
        the model's cell order) or of ``adata`` mapped with the frozen model (``map_options`` as
        :meth:`map`). ``covariates=True`` appends each covariate's block (the full representation)."""
        if adata is None:
            self._require_trained()
            return self.representation if covariates else self.cells.obsm[EMBEDDING_KEY].copy()
        table = self.map(adata, **map_options)
        parts = [table.obsm[EMBEDDING_KEY]]
        if covariates:
            parts += [table.obsm[f"{EMBEDDING_KEY}_{k}"] for k in self.model_config.covariates]
        return np.concatenate(parts, axis=1)

    def get_normalized_expression(self, adata=None, *, modality: str | None = None, library_size: float | None = None,
                                  gene_list: list[str] | None = None, return_numpy: bool = False, **map_options):
        """Decoded expression of every cell (training cells when ``adata`` is None, else ``adata``
        mapped with the frozen model): fractions that sum to 1 over a modality's features, or scaled
        to ``library_size`` counts. A cells x features DataFrame (``return_numpy``: an array), for
        ``modality`` (default: the first) and optionally only the features in ``gene_list``."""
        from atlasdgd.infer.expression import decoded_fractions

        modality = modality or next(iter(self.model_config.modalities))
        if modality not in self.model_config.modalities:
            raise AtlasDGDError(f"unknown modality {modality!r}: the model has {list(self.model_config.modalities)}")
        names = pd.Index(self.vocab.features[modality])
        features = None
        if gene_list is not None:
            features = names.get_indexer(list(gene_list))
            if (features < 0).any():
                missing = [g for g, i in zip(gene_list, features) if i < 0]
                raise AtlasDGDError(f"{len(missing)} of gene_list are not {modality} features of the model "
                                    f"(for example {missing[0]!r})")
            names = names[features]
        if library_size is not None and not library_size > 0:
            raise AtlasDGDError(f"library_size must be positive, got {library_size}")
        if adata is None:
            cells, z = self._require_trained().obs_names, self.representation
        else:
            cells, z = pd.Index(adata.obs_names), self.get_latent_representation(adata, covariates=True, **map_options)
        values = decoded_fractions(self.module, z, modality, features)
        if library_size is not None:
            values *= np.float32(library_size)
        return values if return_numpy else pd.DataFrame(values, index=cells, columns=names)

    def differential_expression(self, groupby: str, group1=None, group2=None, *, delta: float = 0.25,
                                n_samples: int = 5000, modality: str | list[str] | None = None,
                                reference: dict[str, str] | None = None, seed: int = 0) -> pd.DataFrame:
        """Differential expression between groups of the model's cells (an obs column ``groupby`` of
        :meth:`embed`), from the decoder with covariates fixed to ``reference`` classes (default: each
        covariate's first class), so batch differences between the groups do not count
        (:mod:`atlasdgd.infer.de`). ``group1`` (a value or a list of values; None: every group in
        turn, each against the rest) against ``group2`` (None: all other cells). Every modality
        unless ``modality`` names some. One row per comparison and feature: group1, group2,
        modality, feature, rank (by |log2fc|), log2fc (of the groups' mean fractions), lfc_mean,
        lfc_std, proba_de = P(|log2 fold change| > ``delta``), bayes_factor, scale1, scale2 (mean
        fractions)."""
        from atlasdgd.infer.de import differential_expression

        cells = self._require_trained()
        names = list(self.model_config.modalities)
        modalities = names if modality is None else ([modality] if isinstance(modality, str) else list(modality))
        missing = [m for m in modalities if m not in names]
        if missing:
            raise AtlasDGDError(f"unknown modality {missing[0]!r}: the model has {names}")
        pseudocount = {m: 0.5 / np.exp(self.library_model.median_log[m]) if self.library_model else 1e-6
                       for m in modalities}
        return differential_expression(self.module, cells.obs, cells.obsm[EMBEDDING_KEY], self.vocab, groupby, group1,
                                       group2, modalities=modalities, pseudocount=pseudocount, delta=delta,
                                       n_samples=n_samples, reference=reference, seed=seed)

    # -- new cells -------------------------------------------------------------------------
    def mapping_options(self, **overrides) -> MappingOptions:
        """Mapping settings: the model's representation learning rate and betas, then ``overrides``."""
        base = {"lr": self.train_config.lr_representation, "betas": self.train_config.betas,
                "seed": self.train_config.seed}
        return MappingOptions(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

    def align(self, query, *, layer=None, modality: str | None = None, modality_key: str | None = None,
              min_overlap: float = DEFAULT_MIN_OVERLAP) -> Query:
        """Check a query AnnData/MuData against the model and line up its features and classes."""
        return align_query(query, self.vocab.features, self.vocab.covariates, layer=layer, modality=modality,
                           modality_key=modality_key, min_overlap=min_overlap)

    def map(
        self,
        query,
        *,
        epochs: int = 20,
        new_covariate_classes: bool = False,
        two_step: int | None = None,
        memory_budget: int | None = None,
        batch_size: int | None = None,
        add_to_atlas: bool = False,
        layer=None,
        modality: str | None = None,
        modality_key: str | None = None,
        min_overlap: float = DEFAULT_MIN_OVERLAP,
        unknown_below: float = 0.0,
        progress: bool = True,
        inplace: bool = False,
    ) -> ad.AnnData | None:
        """Representations, clusters and (with a labelled model) transferred labels for new cells.

        Returns a new AnnData of the query's cells (obs and the results below, no counts); with
        ``inplace=True`` writes into the query (an AnnData, or a MuData's global obs/obsm) instead and
        returns None: ``obsm['X_dgd']``, ``obsm['X_dgd_<covariate>']``, ``obs['dgd_cluster']`` and, for
        a labelled model, ``obs['dgd_label']``, ``obs['dgd_label_confidence']`` and
        ``obsm['dgd_label_probabilities']``; nothing else in the query changes.

        Decoder and mixtures stay frozen. Covariate classes known to the model are used where the
        query's obs has them; other cells are searched over all classes ("naive" mapping). With
        ``new_covariate_classes`` every unseen class of every covariate gets its own new component
        (the model then knows those classes: save it to keep them). ``add_to_atlas`` appends the
        mapped cells to the model's cell table (split ``mapped``). Labels come with calibrated
        probabilities (``obsm['dgd_label_probabilities']``, :mod:`atlasdgd.infer.labels`); cells whose
        confidence is below ``unknown_below`` are labelled "unknown". ``memory_budget`` (bytes) sizes the
        candidate search's chunks and, unless ``batch_size`` is given, the cells per fitting step
        (each cell is fitted on its own, so these change speed and memory, not the result).
        """
        self._require_trained()
        aligned = self.align(query, layer=layer, modality=modality, modality_key=modality_key, min_overlap=min_overlap)
        options = self.mapping_options(epochs=epochs, two_step=two_step, memory_budget=memory_budget,
                                       batch_size=batch_size)
        if add_to_atlas:
            clash = aligned.obs.index.intersection(self.cells.obs.index)
            if len(clash):
                raise AtlasDGDError(f"{len(clash)} query cells share names with atlas cells (for example {clash[0]!r}): "
                                    "rename them before adding them to the atlas")
        if new_covariate_classes and aligned.unseen_classes:
            self._learn_new_classes(aligned, options, progress)
        mapping = map_cells(self.module, aligned, options, progress=progress)
        labeller = self._label_transfer()
        table = mapped_cells_table(self.module, self.vocab, aligned.obs, mapping, labeller, unknown_below)
        if add_to_atlas:
            self.cells = append_cells(self.cells, table, self.vocab, self.model_config.n_components)
        if inplace:
            from atlasdgd.infer.expression import write_into

            write_into(query, table, self.model_config.covariates)
            return None
        return table

    def _label_transfer(self):
        """The model's label transfer, built once per cell table and settings (it indexes up to 50k
        training cells: worth keeping between map and predict calls)."""
        key = (id(self.cells), repr({k: v for k, v in self.vocab.label_transfer.items() if k != "fit"}))
        if getattr(self, "_labeller_cache", (None,))[0] != key:
            self._labeller_cache = (key, label_transfer(self.module, self.vocab, self.cells, self.train_config.seed))
        return self._labeller_cache[1]

    def _learn_new_classes(self, aligned: Query, options: MappingOptions, progress: bool) -> None:
        weight = 1.0 if self.train_config.hyperprior == "cell" else 1.0 / max(1, self.cells.n_obs)
        self.module = learn_query_classes(self.module, self.vocab.covariates, aligned, options, weight, progress)
        self.model_config = self.module.config

    def predict(self, query, *, epochs: int = 20, two_step: int | None = None, memory_budget: int | None = None,
                layer=None, modality: str | None = None, modality_key: str | None = None,
                min_overlap: float = DEFAULT_MIN_OVERLAP, progress: bool = True) -> dict[str, ad.AnnData]:
        """Map the query from the modalities (and features) it has, then decode every modality.

        Returns one AnnData per model modality: ``X`` the predicted fractions, layer ``dgd_mean`` the
        predicted mean counts (fractions x library size), ``var['dgd_dispersion']``, obs
        ``dgd_library`` and ``dgd_library_source`` (``measured``, ``from <modality>`` or ``training
        median``: see :mod:`atlasdgd.infer.library`), plus the mapping's obs/obsm.
        """
        self._require_trained()
        if self.library_model is None:
            raise AtlasDGDError("this model has no library-size statistics (saved by an older atlasdgd): retrain it to predict counts")
        aligned = self.align(query, layer=layer, modality=modality, modality_key=modality_key, min_overlap=min_overlap)
        options = self.mapping_options(epochs=epochs, two_step=two_step, memory_budget=memory_budget)
        mapping = map_cells(self.module, aligned, options, progress=progress)
        labeller = self._label_transfer()
        table = mapped_cells_table(self.module, self.vocab, aligned.obs, mapping, labeller)
        return predicted_modalities(self.module, self.vocab, self.library_model, aligned, mapping.values, table)

    def perturb(self, query, genes: list[str], *, group_by: str | None = None, steps: int = 1,
                lr: float | None = None, epochs: int = 20, modality: str | None = None, layer=None,
                modality_key: str | None = None, min_overlap: float = DEFAULT_MIN_OVERLAP,
                progress: bool = True) -> pd.DataFrame:
        """In-silico knock-down of each gene in ``genes`` (spec 2.4) on the query's mapped cells.

        Returns a long table: gene, group, modality, feature, mean_delta, n_cells, and
        distance_to_tss when the query's var gives gene TSS (``chrom``, ``tss``) and feature
        coordinates (``chrom``/``start``/``end`` or names like ``chr1:100-600``).
        """
        from atlasdgd.infer.perturb import perturb_query

        self._require_trained()
        return perturb_query(self.module, self.vocab.features, query, genes, self.mapping_options(epochs=epochs),
                             group_by=group_by, steps=steps, lr=lr or self.train_config.lr_representation,
                             modality=modality, layer=layer, modality_key=modality_key, min_overlap=min_overlap,
                             covariates=self.vocab.covariates, progress=progress)

    def sample(self, n: int, component: int | str | None = None, covariates: dict[str, str] | None = None,
               library: dict[str, float] | None = None, seed: int = 0) -> dict[str, ad.AnnData]:
        """Synthetic cells: z from one basal component (index or label) or the whole mixture, covariate
        blocks at the given classes' means (default: each covariate's first class), NB counts at
        ``library`` (default: the training median per modality). One AnnData per modality."""
        from atlasdgd.infer.generate import sample_cells

        self._require_trained()
        return sample_cells(self, n, component, covariates or {}, library or {}, seed)

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False, storage_options: dict | None = None):
        """Write the model directory (a local path or a remote URI such as s3://bucket/model)."""
        self._require_trained()
        files = ModelFiles(self.module, self.model_config, self.train_config, self.vocab, self.cells, self.history,
                           self.library_model)
        log.info("writing the model to %s", path)
        return write_model(path, files, overwrite=overwrite, storage_options=storage_options)

    @classmethod
    def load(cls, path: str | Path, storage_options: dict | None = None, device: str | torch.device = "auto") -> "DGD":
        """Load a saved model (local path or remote URI) onto ``device``; the training data are not needed."""
        device = resolve_device(device)
        return cls._from_files(read_model(path, storage_options), device)

    @classmethod
    def _from_files(cls, files: ModelFiles, device: torch.device) -> "DGD":
        """A complete model object from a model directory's contents (no training data attached)."""
        model = cls.__new__(cls)
        model.device = device
        model.data = None
        model.module = files.module.to(device)
        model.model_config, model.train_config = files.model_config, files.train_config
        model.vocab, model.cells, model.history = files.vocab, files.cells, files.history
        model.library_model = files.library_model
        return model
