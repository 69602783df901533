"""Query data: new cells lined up with a trained model's features, modalities and covariate classes.

A query rarely measures exactly the model's features. Features are matched by name: model features
the query lacks are left out of the likelihood (the decoded fractions are renormalised over the
measured ones), query features the model does not know are dropped. Modalities the query lacks are
marked unobserved for every cell (they can then be predicted); a MuData query may also lack a
modality for some cells only.

Covariate classes are taken from the query's obs where the column exists and the class is known to
the model; everything else (missing column, missing value, unseen class) is "unknown" (code -1)
and searched over, unless new classes are learned for it (:mod:`atlasdgd.infer.new_classes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import sparse

from atlasdgd.data import validate
from atlasdgd.data.adapters import read_modalities
from atlasdgd.data.source import LoadsBatches
from atlasdgd.errors import InputError

UNKNOWN = -1
DEFAULT_MIN_OVERLAP = 0.5


@dataclass
class Query(LoadsBatches):
    """Counts of the modalities the query measured, restricted to the model features it has.

    ``counts[m]`` has one column per entry of ``features[m]`` (indices into the model's features of
    modality ``m``). Modalities the query lacks are absent from ``counts``.
    """

    resident = True  # counts held in memory: the loader reads batches straight from them

    obs: pd.DataFrame
    counts: dict[str, sparse.csr_matrix]
    features: dict[str, np.ndarray]
    observed: dict[str, np.ndarray]
    covariates: np.ndarray  # [N, Q] codes in the model's covariate order, -1 = unknown
    unseen_classes: dict[str, list[str]] = field(default_factory=dict)
    n_model_features: dict[str, int] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return self.obs.shape[0]

    @property
    def modalities(self) -> list[str]:
        return list(self.counts)

    def library(self, modality: str) -> np.ndarray:
        """Total counts over the measured model features."""
        return np.asarray(self.counts[modality].sum(axis=1)).ravel().astype(np.float32)

    def covariate_codes(self) -> np.ndarray:
        return self.covariates

    def n_features(self, modality: str) -> int:
        """Measured model features (columns of ``counts``)."""
        return self.counts[modality].shape[1]

    def read_rows(self, modality: str, rows: np.ndarray) -> sparse.csr_matrix:
        return self.counts[modality][rows]

    def complete_features(self, modality: str) -> bool:
        return len(self.features[modality]) == self.n_model_features[modality]

    def feature_subsets(self) -> dict[str, np.ndarray] | None:
        """Model feature indices of the modalities measured on only some features (None: all complete)."""
        return {m: idx for m, idx in self.features.items() if m in self.counts and not self.complete_features(m)} or None


def _best_matching_modality(data, features: dict[str, list[str]], modality_key: str | None) -> str:
    """The model modality whose feature names an AnnData query shares most (MuData: irrelevant)."""
    if hasattr(data, "mod") or modality_key is not None or len(features) == 1:
        return next(iter(features))
    names = pd.Index(np.asarray(data.var_names).astype(str))
    shared = {m: len(names.intersection(pd.Index(f))) for m, f in features.items()}
    return max(shared, key=shared.get)


def align_query(
    data,
    features: dict[str, list[str]],
    covariates: dict[str, list[str]],
    *,
    layer: str | dict[str, str] | None = None,
    modality: str | None = None,
    modality_key: str | None = None,
    min_overlap: float = DEFAULT_MIN_OVERLAP,
) -> Query:
    """Check a query AnnData/MuData against a model's vocabulary and line it up.

    Args:
        data: AnnData (one modality, or several with ``modality_key``) or MuData with raw counts.
        features: the model's feature names per modality.
        covariates: the model's covariate classes per covariate key.
        modality: which model modality a single-modality AnnData holds (default: the one whose
            feature names it shares most).
        min_overlap: smallest fraction of a modality's model features the query must measure.
    """
    if modality is None:
        modality = _best_matching_modality(data, features, modality_key)
    mods, observed = read_modalities(data, layer, modality_key, modality)
    unknown = [m for m in mods if m not in features]
    if unknown and len(unknown) == len(mods):
        raise InputError(
            f"the query's modalities {unknown} are not in the model (it has {list(features)}): "
            "name the query's modality after one of those (for AnnData pass modality=..., CLI --modality)"
        )
    counts, feats, obs_mask = {}, {}, {}
    n = data.n_obs
    for m in features:
        if m not in mods:
            obs_mask[m] = np.zeros(n, dtype=bool)
            continue
        x, names = mods[m]
        validate.check_counts(m, x)
        names = pd.Index(np.asarray(names).astype(str))
        if names.duplicated().any():
            raise InputError(f"query modality {m!r} has duplicate feature names: make them unique (var_names_make_unique())")
        model_names = pd.Index(features[m])
        pos = names.get_indexer(model_names)  # query column of each model feature, -1 if absent
        have = np.flatnonzero(pos >= 0)
        overlap = len(have) / len(model_names)
        if len(have) == 0:
            raise InputError(
                f"the query's {m!r} features share no names with the model's (model: {model_names[0]!r}, ...; "
                f"query: {names[0]!r}, ...): use the same feature naming (for example gene symbols vs Ensembl ids)"
            )
        if overlap < min_overlap:
            raise InputError(
                f"the query measures only {len(have)} of the model's {len(model_names)} {m!r} features "
                f"({overlap:.0%} < {min_overlap:.0%}): check the feature naming, or lower the threshold "
                "(min_overlap=..., CLI --min-overlap) if the query really is that different"
            )
        counts[m] = sparse.csr_matrix(x[:, pos[have]])
        feats[m] = have.astype(np.int64)
        obs_mask[m] = np.ones(n, dtype=bool) if observed is None else np.asarray(observed[m], dtype=bool)

    obs_names = pd.Index(data.obs_names.astype(str))
    libraries = {m: np.asarray(x.sum(axis=1)).ravel() for m, x in counts.items()}
    validate.check_cells(obs_names, libraries)

    obs = data.obs.copy()
    obs.index = obs_names
    codes = np.full((n, len(covariates)), UNKNOWN, dtype=np.int64)
    unseen: dict[str, list[str]] = {}
    for q, (key, classes) in enumerate(covariates.items()):
        if key not in obs.columns:
            continue
        values = obs[key].astype(object).where(obs[key].notna(), None)
        known = pd.Index(classes)
        as_str = np.array([None if v is None else str(v) for v in values], dtype=object)
        idx = known.get_indexer(pd.Index(as_str))
        codes[:, q] = idx
        new = pd.unique(as_str[(idx < 0) & pd.notna(as_str)])
        if len(new):
            unseen[key] = [str(c) for c in new]
    return Query(obs, counts, feats, obs_mask, codes, unseen, {m: len(f) for m, f in features.items()})
