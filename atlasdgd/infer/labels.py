"""Label transfer: calibrated per-label probabilities from nearest labelled cells and the mixture.

Two views of where a cell sits in the basal space: (a) the labels of its k nearest labelled
training cells (vote fractions), (b) the mixture posterior, each component carrying its majority
training label. Mixture posteriors in 20 dimensions are almost always 0 or 1, so on their own they
are confident even when wrong (Kang, cross-protocol mapping: mean confidence 1.0 on wrong labels);
neighbour votes are graded. The two are mixed with weight ``weight`` and sharpened or flattened by
a temperature; both are fitted on the validation cells (held out from the decoder's training) by
minimising the negative log-likelihood of their true labels. Cells whose calibrated confidence is
below ``unknown_below`` are labelled "unknown".

Neighbours and posterior both stay confident about a cell that a new batch places between or beside
the reference's clusters: on Kang with a held-out donor, the few wrongly labelled cells had all 15
neighbours agreeing (confidence ~0.99, AUROC right vs wrong 0.55). What sets them apart is distance:
their mean distance to their 15 nearest reference cells is larger than that of nearly all reference
cells (AUROC 0.93). So each cell's typicality q (the fraction of reference cells at least as far from
their own 15 neighbours) scales its label probabilities by min(1, q / ``atypical_tail``); the rest is
the probability of "unknown". With a 5% tail, donor 1016: mean confidence on wrong labels 0.998 ->
0.47, AUROC 0.55 -> 0.91, ECE 0.009 -> 0.015.

A batch from another protocol sits farther from the reference as a whole (simulated 4x batch effect:
every cell's distance above the reference's 5% tail, confidence 0.42 on labels 99.3% right, ECE
0.58). So distances are first divided by how much farther the query's median cell is than the
reference's median cell (never multiplied: a query nearer than the reference is left alone); what
stays atypical is atypical within its own batch. A query whose median cell is more than ``MAX_SHIFT``
times farther is not a shifted batch but a population the reference lacks: no correction. The simulated protocol
shift measured 1.8x (naive mapping) and 1.6x (new covariate class); with the correction its
confidence is 0.99 on right labels, ECE 0.011. Queries of fewer than ``SHIFT_MIN_CELLS`` cells are
not rescaled (a median of a handful of cells says nothing). A query made mostly of a population the
reference lacks that lies within 3x the reference's distances is rescaled away too:
:meth:`LabelTransfer.typicality` keeps the absolute view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNKNOWN_LABEL = "unknown"
DEFAULT_K = 15
MAX_REFERENCE_CELLS = 50_000  # neighbours are searched among at most this many training cells
SHIFT_MIN_CELLS = 50  # smallest query whose median distance is trusted to measure a batch shift
MAX_SHIFT = 3.0  # largest batch shift the typicality forgives (farther: a different population)
# cells whose neighbours are searched at a time: each block's distances and indices ([rows, k] float64
# and int64) are reduced before the next, so a large query (or the reference searched against itself)
# holds 16 B x k per cell of one block, not of all
NEIGHBOUR_BLOCK = 8192
_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
_TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(20.0), 61))


def transfer_labels(posterior: np.ndarray, component_labels: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Per cell, the label whose components hold the most posterior mass, and that mass.

    Components without a label (no labelled training cell) count for no label; a cell whose mass
    sits on those gets the best labelled one with its (low) confidence.
    """
    labels = sorted({lab for lab in component_labels if lab is not None})
    if not labels:
        raise ValueError("the model's components carry no labels: train with a label key to transfer labels")
    mass = posterior @ _membership(component_labels, labels)  # [N, L]
    best = mass.argmax(axis=1)
    return np.asarray(labels, dtype=object)[best], mass[np.arange(len(best)), best]


def _membership(component_labels: list[str | None], labels: list[str]) -> np.ndarray:
    membership = np.zeros((len(component_labels), len(labels)))
    for k, lab in enumerate(component_labels):
        if lab is not None and lab in labels:
            membership[k, labels.index(lab)] = 1.0
    return membership


@dataclass
class LabelTransfer:
    """Calibrated label probabilities (see the module docstring).

    ``reference`` ``[M, L]`` basal positions of labelled training cells, ``reference_codes`` their
    label codes into ``labels``.
    """

    labels: list[str]
    component_labels: list[str | None]
    reference: np.ndarray
    reference_codes: np.ndarray
    weight: float = 0.0  # of the neighbour votes (1 - weight: the mixture posterior)
    temperature: float = 1.0
    k: int = DEFAULT_K
    atypical_tail: float = 0.05  # typicality below this scales the probabilities down (0: off)
    shift_corrected: bool = True  # typicality relative to the query's own median distance

    def __post_init__(self):
        from atlasdgd.infer.neighbours import Neighbours

        self._index = Neighbours(self.reference)  # (not scikit-learn's: see atlasdgd.infer.neighbours)
        self._k = min(self.k, len(self.reference))
        self._membership = _membership(self.component_labels, self.labels)
        # each reference cell's mean distance to its k nearest other reference cells, sorted (the same
        # index, asked for k + 1 neighbours of the reference's own points; the first is the point itself)
        k = min(self.k, len(self.reference) - 1)
        if k < 1:
            self._reference_spread = np.zeros(1)
        else:
            spread = [self._index.query(self.reference[i : i + NEIGHBOUR_BLOCK], k + 1)[0][:, 1:].mean(1)
                      for i in range(0, len(self.reference), NEIGHBOUR_BLOCK)]
            self._reference_spread = np.sort(np.concatenate(spread))

    @classmethod
    def from_cells(cls, basal: np.ndarray, labels: np.ndarray, label_names: list[str],
                   component_labels: list[str | None], seed: int = 0, rows: np.ndarray | None = None,
                   **params) -> "LabelTransfer":
        """From training cells' basal positions and labels (str or None); unlabelled cells are left out.
        ``rows``: the training cells' rows of ``basal`` and ``labels`` (all rows when None), so that a
        whole cell table's arrays are indexed once, for the reference cells only (indexing the
        training cells first copied all of them: ~13 MB at 200k cells, at the last phase's peak)."""
        rows = np.arange(len(labels)) if rows is None else np.asarray(rows)
        codes = _codes(np.asarray(labels, dtype=object)[rows], label_names)
        keep = np.flatnonzero(codes >= 0)
        if len(keep) == 0:
            raise ValueError("no labelled training cells to transfer labels from")
        if len(keep) > MAX_REFERENCE_CELLS:
            keep = np.sort(np.random.default_rng(seed).choice(keep, MAX_REFERENCE_CELLS, replace=False))
        return cls(list(label_names), list(component_labels), np.asarray(basal[rows[keep]], dtype=np.float32),
                   codes[keep], **params)

    # -- the two views ---------------------------------------------------------------------
    def neighbour_votes(self, basal: np.ndarray) -> np.ndarray:
        """``[N, L]`` label fractions among each cell's k nearest reference cells (smoothed: never 0)."""
        return self._neighbours(basal)[0]

    def typicality(self, basal: np.ndarray) -> np.ndarray:
        """``[N]`` fraction of reference cells whose mean distance to their k nearest reference cells
        is at least each cell's (1: as central as any; near 0: farther than almost all); absolute,
        without the shift correction :meth:`probabilities` applies."""
        return self._neighbours(basal, shift_corrected=False)[1]

    def _neighbours(self, basal: np.ndarray, shift_corrected: bool = False) -> tuple[np.ndarray, np.ndarray]:
        n_labels = len(self.labels)
        basal = np.asarray(basal, dtype=np.float32)
        distance = np.empty(len(basal))
        votes = np.empty((len(basal), n_labels))
        for start in range(0, len(basal), NEIGHBOUR_BLOCK):  # see NEIGHBOUR_BLOCK
            dist, idx = self._index.query(basal[start : start + NEIGHBOUR_BLOCK], self._k)
            distance[start : start + len(idx)] = dist.mean(axis=1)
            cell_label = np.repeat(np.arange(len(idx)), idx.shape[1]) * n_labels + self.reference_codes[idx].ravel()
            votes[start : start + len(idx)] = np.bincount(cell_label, minlength=len(idx) * n_labels).reshape(len(idx), n_labels)
        spread = self._reference_spread
        if shift_corrected and len(distance) >= SHIFT_MIN_CELLS:
            shift = float(np.median(distance) / max(np.median(spread), 1e-12))
            if 1.0 < shift <= MAX_SHIFT:
                distance = distance / shift
        # (count + 1) / (n + 1): never exactly 0, so no confidence is 0
        typical = (len(spread) - np.searchsorted(spread, distance, side="left") + 1.0) / (len(spread) + 1.0)
        k = self._k
        return (votes + 1.0 / n_labels) / (k + 1.0), typical

    def posterior_mass(self, posterior: np.ndarray) -> np.ndarray:
        """``[N, L]`` mixture posterior mass per label, renormalised over labelled components."""
        mass = posterior @ self._membership
        total = mass.sum(axis=1, keepdims=True)
        uniform = np.full_like(mass, 1.0 / mass.shape[1])
        return np.where(total > 0, mass / np.maximum(total, 1e-300), uniform)

    def _mix(self, votes: np.ndarray, mass: np.ndarray, weight: float, temperature: float) -> np.ndarray:
        p = np.clip(weight * votes + (1.0 - weight) * mass, 1e-12, 1.0)
        logits = np.log(p) / temperature
        logits -= logits.max(axis=1, keepdims=True)
        q = np.exp(logits)
        return q / q.sum(axis=1, keepdims=True)

    # -- use -------------------------------------------------------------------------------
    def probabilities(self, basal: np.ndarray, posterior: np.ndarray) -> np.ndarray:
        """``[N, L + 1]``: calibrated probabilities of each label (``labels`` order) and, last, of
        "unknown" (the cell is unlike the reference: see the module docstring). Rows sum to 1."""
        votes, typical = self._neighbours(basal, shift_corrected=self.shift_corrected)
        probs = self._mix(votes, self.posterior_mass(posterior), self.weight, self.temperature)
        scale = np.ones(len(probs)) if self.atypical_tail <= 0 else np.minimum(1.0, typical / self.atypical_tail)
        return np.concatenate([probs * scale[:, None], (1.0 - scale)[:, None]], axis=1)

    @property
    def columns(self) -> list[str]:
        """Column names of :meth:`probabilities`."""
        return [*self.labels, UNKNOWN_LABEL]

    def predict(self, basal: np.ndarray, posterior: np.ndarray, unknown_below: float = 0.0):
        """(labels, confidence, probabilities): the most probable label (never "unknown" unless its
        confidence is below ``unknown_below``), its probability, and :meth:`probabilities`."""
        probs = self.probabilities(basal, posterior)
        best = probs[:, :-1].argmax(axis=1)
        confidence = probs[np.arange(len(best)), best]
        labels = np.asarray(self.labels, dtype=object)[best]
        labels[confidence < unknown_below] = UNKNOWN_LABEL
        return labels, confidence, probs

    def calibrate(self, basal: np.ndarray, posterior: np.ndarray, labels: np.ndarray) -> dict:
        """Fit ``weight`` and ``temperature`` on labelled held-out cells (validation cells) by their
        labels' negative log-likelihood; returns what was measured (NLL, accuracy per weight)."""
        codes = _codes(labels, self.labels)
        keep = codes >= 0
        if keep.sum() == 0:
            return {"calibrated_on": 0}
        votes, mass, codes = self.neighbour_votes(basal[keep]), self.posterior_mass(posterior[keep]), codes[keep]
        rows = np.arange(len(codes))
        report = {"calibrated_on": int(len(codes))}
        best = (np.inf, self.weight, self.temperature)
        for w in _WEIGHTS:
            nll = [float(-np.log(self._mix(votes, mass, w, t)[rows, codes]).mean()) for t in _TEMPERATURES]
            i = int(np.argmin(nll))
            report[f"weight_{w}"] = {"nll": nll[i], "temperature": float(_TEMPERATURES[i]),
                                     "accuracy": float((self._mix(votes, mass, w, 1.0).argmax(1) == codes).mean())}
            if nll[i] < best[0]:
                best = (nll[i], w, float(_TEMPERATURES[i]))
        _, self.weight, self.temperature = best
        return report

    def to_dict(self) -> dict:
        """The fitted settings (the reference cells are the model's own training cells)."""
        return {"weight": float(self.weight), "temperature": float(self.temperature), "k": int(self.k),
                "atypical_tail": float(self.atypical_tail), "shift_corrected": bool(self.shift_corrected)}


def _codes(labels: np.ndarray, names: list[str]) -> np.ndarray:
    """int codes into ``names``; -1 for missing or unknown labels."""
    lookup = {name: i for i, name in enumerate(names)}
    return np.array([lookup.get(None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v), -1)
                     for v in np.asarray(labels, dtype=object)], dtype=np.int64)
