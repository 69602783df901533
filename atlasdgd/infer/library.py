"""Library sizes for modalities a cell was not measured on.

Decoded fractions are defined for every modality; counts need a library size s, which a cell lacking
a modality does not have. atlasdgd predicts it from the cell's measured modalities with a regression
fitted on the training cells that measured both (sequencing depth is shared across the modalities of
a cell, so log libraries correlate):

    log s_m = a_mo + b_mo log s_o      (least squares over training cells observing m and o)

A cell uses, among its measured modalities o, the one whose regression had the highest R^2 on the
training cells. With no usable pair (for example the training data never had m and o together) it
gets the median training library of m. The coefficients live in the model manifest
(``library_model``); ``obs['dgd_library_source_<m>']`` says which rule each cell got.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MIN_PAIR_CELLS = 10


@dataclass
class LibraryModel:
    median_log: dict[str, float]
    pairs: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # m -> o -> {a, b, r2, n}

    @classmethod
    def fit(cls, libraries: dict[str, np.ndarray], observed: dict[str, np.ndarray]) -> "LibraryModel":
        """Fit from per-modality library sizes and observed masks of the training cells."""
        logs = {m: np.log(np.maximum(s, 1.0)) for m, s in libraries.items()}
        median_log = {m: float(np.median(logs[m][observed[m]])) if observed[m].any() else 0.0 for m in logs}
        pairs: dict[str, dict[str, dict[str, float]]] = {}
        for m in logs:
            for o in logs:
                both = observed[m] & observed[o]
                if m == o or both.sum() < MIN_PAIR_CELLS:
                    continue
                x, y = logs[o][both], logs[m][both]
                if x.std() == 0:
                    continue
                b, a = np.polyfit(x, y, 1)
                resid = y - (a + b * x)
                r2 = 1.0 - resid.var() / max(y.var(), 1e-12)
                pairs.setdefault(m, {})[o] = {"a": float(a), "b": float(b), "r2": float(r2), "n": int(both.sum())}
        return cls(median_log, pairs)

    def predict(self, modality: str, libraries: dict[str, np.ndarray], observed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Library of ``modality`` for every cell, and a label of the rule used per cell.

        ``libraries``/``observed`` are the cells' measured libraries and masks of the other modalities.
        """
        n = len(next(iter(observed.values())))
        out = np.full(n, np.exp(self.median_log[modality]))
        source = np.full(n, "training median", dtype=object)
        candidates = sorted(self.pairs.get(modality, {}).items(), key=lambda kv: kv[1]["r2"])
        for o, c in candidates:  # ascending R^2: the best available pair is written last
            if o not in libraries:
                continue
            use = observed[o] & (libraries[o] > 0)
            out[use] = np.exp(c["a"] + c["b"] * np.log(libraries[o][use]))
            source[use] = f"from {o}"
        return out.astype(np.float32), source

    def to_dict(self) -> dict:
        return {"median_log": self.median_log, "pairs": self.pairs}

    @classmethod
    def from_dict(cls, d: dict) -> "LibraryModel":
        return cls(dict(d["median_log"]), {m: dict(v) for m, v in d.get("pairs", {}).items()})
