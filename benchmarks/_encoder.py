"""A post-hoc encoder: normalised counts -> learned representations, as a start for mapping.

Experimental, kept here for benchmarks/encoder_start.py only: measured on Kang PBMC and SNARE-seq it
did not beat the candidate search as a mapping start (see that script and the README), so it is not
part of the package.

The DGD papers suggest training an encoder after the decoder, on the learned representations, to
replace the candidate search when mapping. Input: per modality log1p(counts / library x 1e4) over
the model's features (unmeasured features and modalities are 0) plus an observed flag per modality;
two ReLU layers; output the full representation. Loss: mean squared error to the trained cells'
representations. It is only a start: refinement follows as after the candidate search.
"""

from __future__ import annotations

import atlasdgd  # noqa: F401  (before torch: OpenMP's wait policy)
import torch
from torch import nn

from atlasdgd.model.module import Batch


class Encoder(nn.Module):
    def __init__(self, modalities: dict[str, int], out_dim: int, hidden: int = 256):
        super().__init__()
        self.modalities = dict(modalities)
        in_dim = sum(self.modalities.values()) + len(self.modalities)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, out_dim))

    def features(self, batch: Batch) -> torch.Tensor:
        b = len(batch)
        parts = []
        for m, f in self.modalities.items():
            x = torch.zeros(b, f)
            flag = torch.zeros(b, 1)
            if m in batch.counts:
                counts = batch.counts[m]
                lib = batch.library[m].clamp_min(1.0)[:, None]
                norm = torch.log1p(counts / lib * 1e4)
                if batch.features is not None and m in batch.features:
                    x[:, batch.features[m]] = norm
                else:
                    x = norm
                observed = torch.ones(b) if batch.observed is None or m not in batch.observed else batch.observed[m].float()
                x = x * observed[:, None]
                flag = observed[:, None]
            parts += [x, flag]
        return torch.cat(parts, dim=1)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.net(self.features(batch))


def train_encoder(modalities: dict[str, int], loader, targets: torch.Tensor, epochs: int = 30, lr: float = 1e-3,
                  seed: int = 0, hidden: int = 256) -> tuple[Encoder, list[float]]:
    """Fit an encoder to ``targets`` (the representation table rows of ``loader``'s cells)."""
    torch.manual_seed(seed)
    enc = Encoder(modalities, targets.shape[1], hidden)
    opt = torch.optim.Adam(enc.parameters(), lr=lr)
    curve = []
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        total, n = 0.0, 0
        for batch in loader:
            loss = ((enc(batch) - targets[batch.index]) ** 2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(batch)
            n += len(batch)
        curve.append(total / max(n, 1))
    enc.eval()
    return enc, curve


@torch.no_grad()
def encode(enc: Encoder, loader, n_cells: int) -> torch.Tensor:
    out = torch.zeros(n_cells, enc.net[-1].out_features)
    for batch in loader:
        out[batch.index] = enc(batch)
    return out
