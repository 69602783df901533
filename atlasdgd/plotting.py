"""Plots written next to models and demo outputs (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: pd.DataFrame, path: str | Path) -> None:
    """Training and validation reconstruction loss (NB NLL per feature) and the objective per epoch."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for col, style in (("train_recon", "-"), ("val_recon", "--")):
        if col in history:
            axes[0].plot(history["epoch"], history[col], style, label=col.replace("_", " "))
    if "best" in history and history["best"].any():
        best = history.loc[history["best"].astype(bool), "epoch"].iloc[0]
        axes[0].axvline(best, color="grey", lw=0.8, ls=":", label=f"best epoch {best}")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("NB NLL per feature")
    axes[0].legend()
    axes[1].plot(history["epoch"], history["train_loss"])
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("objective per cell")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_embedding(coords: np.ndarray, colours: dict[str, pd.Series], path: str | Path, title: str = "") -> None:
    """One scatter panel per categorical colouring of the same 2-D coordinates."""
    plt = _pyplot()
    n = len(colours)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], colours.items()):
        cats = pd.Categorical(values)
        cmap = plt.get_cmap("tab20" if len(cats.categories) > 10 else "tab10")
        for k, cat in enumerate(cats.categories):
            sel = cats.codes == k
            ax.scatter(coords[sel, 0], coords[sel, 1], s=2, color=cmap(k % cmap.N), label=str(cat), rasterized=True)
        ax.set_title(f"{title} {name}".strip())
        ax.set_xticks([])
        ax.set_yticks([])
        if len(cats.categories) <= 20:
            ax.legend(markerscale=4, fontsize=7, loc="best", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
