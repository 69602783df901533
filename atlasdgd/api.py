"""The user-facing model class: set up from data, train, save, load, embed.

    >>> import atlasdgd
    >>> data = atlasdgd.simulate(n_cells=2000, n_batches=2)
    >>> model = atlasdgd.DGD(data, label_key="cell_type", covariate_keys=["batch"])
    >>> model.train(max_epochs=100)
    >>> model.save("model_dir")
    >>> cells = atlasdgd.DGD.load("model_dir").embed()   # AnnData with obsm["X_dgd"]
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from atlasdgd.artifact import ModelFiles, Vocabulary, read_model, write_model
from atlasdgd.data.adapters import prepare
from atlasdgd.data.cells import SPLIT_KEY
from atlasdgd.errors import AtlasDGDError
from atlasdgd.infer.library import LibraryModel
from atlasdgd.infer.new_classes import learn_new_classes
from atlasdgd.infer.outputs import CLUSTER_KEY, EMBEDDING_KEY, append_cells, mapped_cells_table, predicted_modalities
from atlasdgd.infer.query import DEFAULT_MIN_OVERLAP, Query, align_query
from atlasdgd.infer.mapping import MappingOptions, map_cells
from atlasdgd.model.config import ModelConfig
from atlasdgd.model.module import DGDModule
from atlasdgd.optim.row_adam import RepresentationTable
from atlasdgd.train.config import TrainConfig
from atlasdgd.train.init import mixture_start, pca_representations
from atlasdgd.train.trainer import Trainer



class DGD:
    """A Deep Generative Decoder model and the representations of the cells it was trained on.

    Args:
        data: AnnData or MuData with raw counts (see :func:`atlasdgd.data.adapters.prepare` for
            ``modalities``, ``layer``, ``modality_key`` and ``split_key``), or the URI of an atlas store
            (``atlasdgd ingest``; zarr or TileDB-SOMA), streamed from disk or object storage. A store
            carries its split, label and covariate columns (defaults for the keys).
        label_key: obs column of cell-type labels: sets the number of mixture components and
            gives each component a label.
        covariate_keys: obs columns of categorical covariates (batch, donor, ...) to model with
            their own 2-D supervised representations, keeping them out of the basal one.
        latent_dim: basal representation size.
        n_components: mixture components (default: number of labels, else 1).
        seed: seeds the split, initialisation and minibatch order.
        **model_options: other :class:`~atlasdgd.model.config.ModelConfig` fields.
    """

    def __init__(
        self,
        data=None,
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
        **model_options,
    ):
        self.cells: ad.AnnData | None = None
        self.history = pd.DataFrame()
        self.library_model: LibraryModel | None = None
        self.train_config = TrainConfig(seed=seed)
        if data is None:  # filled by load()
            return
        if isinstance(data, (str, Path)):  # an atlas store (zarr or TileDB-SOMA) at a URI
            from atlasdgd.store.cells import open_store

            data = open_store(str(data), label_key=label_key, covariate_keys=list(covariate_keys) or None,
                              modalities=modalities)
        if _is_store(data):
            self.data = data
            label_key = data.label_key
        else:
            self.data = prepare(data, label_key=label_key, covariate_keys=list(covariate_keys), modalities=modalities,
                                layer=layer, modality_key=modality_key, split_key=split_key,
                                split_fractions=split_fractions, seed=seed)
        labels = self.data.label_classes()
        if n_components is None:
            n_components = len(labels) if labels else 1
        if n_components < 1:
            raise AtlasDGDError(f"n_components must be >= 1, got {n_components}")
        self.model_config = ModelConfig(
            modalities={m: len(self.data.feature_names[m]) for m in self.data.modalities},
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
        self.module = DGDModule(self.model_config, generator=torch.Generator().manual_seed(seed))

    # -- training ------------------------------------------------------------------------
    def train(self, progress: bool = True, on_epoch=None, checkpoint_uri: str | None = None,
              storage_options: dict | None = None, resume: bool = False, checkpoint_every: int = 1,
              **train_options) -> pd.DataFrame:
        """Fit decoder, mixtures and representations; returns the per-epoch history.

        ``on_epoch`` is called with each epoch's history row (for logging). ``train_options`` are
        :class:`~atlasdgd.train.config.TrainConfig` fields (``max_epochs``, ``batch_size``, learning
        rates, ``hyperprior``, ``init``, ...). With ``checkpoint_uri`` a checkpoint is written every
        ``checkpoint_every`` epochs (:mod:`atlasdgd.distributed.checkpoint`); ``resume`` continues from
        the latest complete one. Under torch.distributed (Ray Train workers) this is one worker's part:
        it trains the representation rows of its own cells only (see :mod:`atlasdgd.distributed`).
        """
        from atlasdgd.distributed import sync
        from atlasdgd.distributed.checkpoint import Checkpoints, read_final_rows, write_final_rows
        from atlasdgd.store.loader import shard_rows

        if getattr(self, "data", None) is None:
            raise AtlasDGDError("this model has no training data attached (it was loaded): create DGD(data, ...) to train")
        cfg = TrainConfig(**{**self.train_config.to_dict(), **train_options})
        rank, world = sync.rank(), sync.world_size()
        if world > 1 and checkpoint_uri is None:
            raise AtlasDGDError("several workers need a checkpoint_uri (the model URI) to assemble the model")
        if checkpoint_every < 1:
            raise AtlasDGDError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.train_config = cfg
        torch.manual_seed(cfg.seed)
        data, module = self.data, self.module
        rows = {s: data.split_rows(s) for s in ("train", "validation", "test")}
        init = self._initial_representations(cfg)  # every cell, the same on every worker
        if cfg.init == "pca":
            self._start_mixture(init[rows["train"], : self.model_config.latent_dim], rows["train"], cfg)
        sync.broadcast_module(module)
        mine = {s: shard_rows(r, rank, world) for s, r in rows.items()}  # this worker's cells

        def loader(split: str, shuffle: bool = True):
            return data.loader(rows[split], cfg.batch_size, shuffle=shuffle, seed=cfg.seed, rank=rank, world_size=world)

        tables = {s: RepresentationTable(torch.from_numpy(init[mine[s]]), cfg.lr_representation, cfg.betas) for s in rows}
        del init  # the tables hold this worker's rows from here on
        has_val = len(rows["validation"]) > 0
        trainer = Trainer(module, cfg, tables["train"], tables["validation"] if has_val else None,
                          n_train_total=len(rows["train"]))
        checkpoints = Checkpoints(checkpoint_uri, storage_options) if checkpoint_uri else None
        if checkpoints is not None and not resume:
            checkpoints.clear()
        resume_state = None
        if checkpoints is not None and resume and (latest := checkpoints.latest()) is not None:
            state, best = checkpoints.load(latest, trainer, mine)
            resume_state = {"epoch": state["epoch"], "history": state["history"], "stopper": state["stopper"],
                            "snapshot": None if best is None else
                            {"module": best["module"], "train": best.get("train"), "val": best.get("validation")}}

        def after_epoch(epoch, history, stopper):
            if checkpoints is None or (epoch + 1) % checkpoint_every:
                return
            snap = None if stopper is None else stopper.snapshot
            best = None if snap is None else {"module": snap["module"], "train": snap["train"], "validation": snap["val"]}
            checkpoints.save(epoch, trainer, mine, {"history": history,
                                                    "stopper": None if stopper is None else stopper.state_dict()}, best)

        history = trainer.fit(loader("train"), loader("validation") if has_val else None,
                              progress=progress and rank == 0, on_epoch=on_epoch, resume=resume_state,
                              after_epoch=after_epoch)
        module.eval()
        values = {s: tables[s].values.numpy() for s in rows}
        if len(mine["test"]):  # held-out cells are mapped the way new cells are
            values["test"] = map_cells(module, data, self.mapping_options(epochs=cfg.heldout_epochs), rows=mine["test"],
                                       progress=progress and rank == 0).values
        dim = self.model_config.representation_dim
        if world > 1:  # rows travel once, through the model URI, to worker 0
            write_final_rows(checkpoint_uri, storage_options, np.concatenate([mine[s] for s in rows]),
                             np.concatenate([values[s].reshape(-1, dim) for s in rows]))
            if rank != 0:
                self.history = pd.DataFrame(history)
                return self.history
            all_values = read_final_rows(checkpoint_uri, storage_options, data.n_cells, dim)
        else:
            all_values = np.zeros((data.n_cells, dim), dtype=np.float32)
            for s in rows:
                all_values[mine[s]] = values[s]
        train_rows = rows["train"]
        self.library_model = LibraryModel.fit({m: data.library(m)[train_rows] for m in data.modalities},
                                              {m: o[train_rows] for m, o in data.observed.items()})
        self.history = pd.DataFrame(history)
        self.cells = self._cells_table(all_values)
        self.vocab.component_labels = self._component_labels()
        return self.history

    def _start_mixture(self, z: np.ndarray, train_rows: np.ndarray, cfg: TrainConfig) -> None:
        """Basal mixture means, variances and weights from a partition of the start positions."""
        k = self.model_config.n_components
        method = cfg.gmm_init
        if method == "auto":
            method = "labels" if self.vocab.label_key and len(self.vocab.labels) == k else "kmeans"
        labels = self.data.label_codes()[train_rows] if self.vocab.label_key else None
        means, variances, weights = mixture_start(z, k, method, labels, cfg.seed)
        if self.model_config.sigma0 is None:
            # the log-precision prior at the data's within-cluster scale, not at 0.2 R / K: with 15
            # components (SNARE-seq) 0.2 R / K is 7x tighter than the clusters and one component
            # swallows the others within five epochs
            sigma0 = float(np.sqrt((weights[:, None] * variances).sum(0).mean()))
            self.model_config.sigma0 = sigma0
            self.module.basal.set_sigma0(sigma0)
        with torch.no_grad():
            self.module.basal.means.copy_(torch.from_numpy(means))
            self.module.basal.log_precision.copy_(-torch.log(torch.from_numpy(variances)))
            self.module.basal.logits.copy_(torch.log(torch.from_numpy(weights).clamp_min(1e-3)))

    def _initial_representations(self, cfg: TrainConfig) -> np.ndarray:
        """Basal part from PCA (or zeros); covariate parts at their class means."""
        data, mc = self.data, self.model_config
        values = np.zeros((data.n_cells, mc.representation_dim), dtype=np.float32)
        codes = data.covariate_codes()
        if cfg.init == "pca":
            groups = np.zeros(data.n_cells, dtype=np.int64)
            for q in range(codes.shape[1]):
                groups = groups * (codes[:, q].max() + 1) + codes[:, q]
            train_mask = (data.obs[SPLIT_KEY] == "train").to_numpy()
            if _is_store(data):  # fitted on a sample, every cell projected block by block
                values[:, : mc.latent_dim] = data.pca_start(groups, mc.latent_dim, mc.radius, cfg.seed, train_mask)
            else:
                values[:, : mc.latent_dim] = pca_representations(
                    data.counts, groups, mc.latent_dim, mc.radius, seed=cfg.seed, fit_mask=train_mask
                )
        with torch.no_grad():
            for q, name in enumerate(mc.covariates):
                block = slice(mc.latent_dim + q * mc.covariate_dim, mc.latent_dim + (q + 1) * mc.covariate_dim)
                values[:, block] = self.module.covariate_gmms[name].means.detach().numpy()[codes[:, q]]
        return values

    def _cells_table(self, values: np.ndarray) -> ad.AnnData:
        data, mc = self.data, self.model_config
        obs = data.obs.copy()
        z = torch.from_numpy(values)
        with torch.no_grad():
            obs[CLUSTER_KEY] = pd.Categorical(self.module.cluster(z).numpy(), categories=range(mc.n_components))
        basal, covs = self.module.split_representation(z)
        obsm = {EMBEDDING_KEY: basal.numpy().copy()}
        obsm.update({f"{EMBEDDING_KEY}_{k}": v.numpy().copy() for k, v in covs.items()})
        return ad.AnnData(obs=obs, obsm=obsm)

    def _component_labels(self) -> list[str | None]:
        """Majority training-cell label of each mixture component (None where it has no labelled cell)."""
        if not self.vocab.label_key:
            return []
        obs = self.cells.obs
        train = obs[(obs[SPLIT_KEY] == "train") & obs[self.vocab.label_key].notna()]
        out: list[str | None] = []
        for k in range(self.model_config.n_components):
            labels = train.loc[train[CLUSTER_KEY] == k, self.vocab.label_key]
            out.append(str(labels.value_counts().idxmax()) if len(labels) else None)
        return out

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
            return self.module.basal.cluster(torch.as_tensor(basal, dtype=torch.float32)).numpy()

    def log_fractions(self, representation: np.ndarray) -> dict[str, np.ndarray]:
        """Decoded log expression fractions per modality for full representations."""
        with torch.no_grad():
            out = self.module.log_fractions(torch.as_tensor(representation, dtype=torch.float32))
        return {m: v.numpy() for m, v in out.items()}

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
        two_step: int = 0,
        memory_budget: int | None = None,
        add_to_atlas: bool = False,
        layer=None,
        modality: str | None = None,
        modality_key: str | None = None,
        min_overlap: float = DEFAULT_MIN_OVERLAP,
        progress: bool = True,
    ) -> ad.AnnData:
        """Representations, clusters and (with a labelled model) transferred labels for new cells.

        Decoder and mixtures stay frozen. Covariate classes known to the model are used where the
        query's obs has them; other cells are searched over all classes ("naive" mapping). With
        ``new_covariate_classes`` every unseen class of every covariate gets its own new component
        (the model then knows those classes: save it to keep them). ``add_to_atlas`` appends the
        mapped cells to the model's cell table (split ``mapped``).
        """
        self._require_trained()
        aligned = self.align(query, layer=layer, modality=modality, modality_key=modality_key, min_overlap=min_overlap)
        options = self.mapping_options(epochs=epochs, two_step=two_step, memory_budget=memory_budget)
        if add_to_atlas:
            clash = aligned.obs.index.intersection(self.cells.obs.index)
            if len(clash):
                raise AtlasDGDError(f"{len(clash)} query cells share names with atlas cells (for example {clash[0]!r}): "
                                    "rename them before adding them to the atlas")
        if new_covariate_classes and aligned.unseen_classes:
            self._learn_new_classes(aligned, options, progress)
        mapping = map_cells(self.module, aligned, options, progress=progress)
        table = mapped_cells_table(self.module, self.vocab, aligned.obs, mapping)
        if add_to_atlas:
            self.cells = append_cells(self.cells, table, self.vocab, self.model_config.n_components)
        return table

    def _learn_new_classes(self, aligned: Query, options: MappingOptions, progress: bool) -> None:
        values = {k: np.array([None if pd.isna(v) else str(v) for v in aligned.obs[k]], dtype=object)
                  for k in aligned.unseen_classes}
        weight = 1.0 if self.train_config.hyperprior == "cell" else 1.0 / max(1, self.cells.n_obs)
        self.module, _ = learn_new_classes(self.module, aligned, aligned.unseen_classes, values, options,
                                           hyperprior_weight=weight, progress=progress)
        self.model_config = self.module.config
        for key, names in aligned.unseen_classes.items():
            self.vocab.covariates[key] = list(self.vocab.covariates[key]) + list(names)
        aligned.unseen_classes = {}

    def predict(self, query, *, epochs: int = 20, two_step: int = 0, memory_budget: int | None = None,
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
        table = mapped_cells_table(self.module, self.vocab, aligned.obs, mapping)
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
        from atlasdgd.infer.perturb import add_tss_distance, perturb_genes

        self._require_trained()
        if isinstance(genes, str):
            genes = [genes]
        if group_by is not None and group_by not in query.obs.columns:
            raise AtlasDGDError(f"group-by key {group_by!r} is not a column of the query's obs "
                                f"(columns: {list(query.obs.columns)[:20]})")
        gene_modality = modality or next((m for m, f in self.vocab.features.items() if genes and genes[0] in f),
                                         next(iter(self.vocab.features)))
        aligned = self.align(query, layer=layer, modality=gene_modality, modality_key=modality_key,
                             min_overlap=min_overlap)
        mapping = map_cells(self.module, aligned, self.mapping_options(epochs=epochs), progress=progress)
        groups = None if group_by is None else aligned.obs[group_by].astype(str).to_numpy()
        table = perturb_genes(self.module, aligned, mapping.values, list(genes), self.vocab.features, groups,
                              modality=gene_modality, steps=steps, lr=lr or self.train_config.lr_representation,
                              betas=self.train_config.betas)
        feature_var = _query_vars(query, gene_modality)
        if gene_modality in feature_var:
            table = add_tss_distance(table, feature_var[gene_modality], feature_var)
        return table

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
        return write_model(path, files, overwrite=overwrite, storage_options=storage_options)

    @classmethod
    def load(cls, path: str | Path, storage_options: dict | None = None) -> "DGD":
        """Load a saved model (local path or remote URI); the training data are not needed."""
        files = read_model(path, storage_options)
        model = cls()
        model.data = None
        model.module, model.model_config, model.train_config = files.module, files.model_config, files.train_config
        model.vocab, model.cells, model.history = files.vocab, files.cells, files.history
        model.library_model = files.library_model
        return model


def _query_vars(query, modality: str) -> dict[str, pd.DataFrame]:
    """Feature annotations (var) per modality of a query AnnData/MuData."""
    if hasattr(query, "mod"):
        return {m: a.var for m, a in query.mod.items()}
    return {modality: query.var}


def _is_store(data) -> bool:
    from atlasdgd.store.cells import StoreCells

    return isinstance(data, StoreCells)
