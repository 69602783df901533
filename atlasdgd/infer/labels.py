"""Label transfer through the mixture: each component carries its majority training label."""

from __future__ import annotations

import numpy as np


def transfer_labels(posterior: np.ndarray, component_labels: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Per cell, the label whose components hold the most posterior mass, and that mass.

    Components without a label (no labelled training cell) count for no label; a cell whose mass
    sits on those gets the best labelled one with its (low) confidence.
    """
    labels = sorted({lab for lab in component_labels if lab is not None})
    if not labels:
        raise ValueError("the model's components carry no labels: train with a label key to transfer labels")
    membership = np.zeros((len(component_labels), len(labels)))
    for k, lab in enumerate(component_labels):
        if lab is not None:
            membership[k, labels.index(lab)] = 1.0
    mass = posterior @ membership  # [N, L]
    best = mass.argmax(axis=1)
    return np.asarray(labels, dtype=object)[best], mass[np.arange(len(best)), best]
