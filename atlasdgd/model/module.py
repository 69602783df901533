"""The DGD module: decoder, dispersions and mixtures, and the loss of one minibatch.

Pure torch, no I/O. Representations are not owned here: they live in per-worker tables
(:mod:`atlasdgd.optim.row_adam`) and are passed in, so the same module serves training,
validation, mapping and many workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from atlasdgd.model.config import ModelConfig
from atlasdgd.model.decoder import Decoder
from atlasdgd.model.gmm import GaussianMixture
from atlasdgd.model.nb import CountSummary, count_terms_total, dense_terms, nb_log_prob_rows


@dataclass
class Batch:
    """One minibatch as the module consumes it (what every loader must produce)."""

    index: torch.Tensor  # [B] long: rows of the representation table
    counts: dict[str, torch.Tensor]  # modality -> [B, F_m] float counts
    library: dict[str, torch.Tensor]  # modality -> [B] total counts
    covariates: torch.Tensor | None = None  # [B, Q] long class codes in config.covariates order; -1 = unknown
    observed: dict[str, torch.Tensor] | None = None  # modality -> [B] bool; None = all observed
    # modality -> long indices of the model features that ``counts`` holds (query data measuring
    # only some features); None = all features. Fractions are renormalised over these features.
    features: dict[str, torch.Tensor] | None = None
    cells: torch.Tensor | None = None  # [B] global cell rows in a store (streaming loaders)
    # modality -> (rows, cols, values) of the non-zero counts (the loader has them from its CSR
    # blocks); None: the likelihood finds them in the dense counts
    nonzeros: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    # modality -> the non-zeros summarised for a training loss that sums their lgamma terms over the
    # batch (see LossTerms.reconstruction_batch); None: per cell from ``nonzeros``
    count_summaries: dict[str, CountSummary] | None = None

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def to(self, device: torch.device, non_blocking: bool = True) -> "Batch":
        """The batch on ``device`` (``cells`` stays on the CPU: it indexes host-side tables)."""

        def move(t):
            return t.to(device, non_blocking=non_blocking)

        return Batch(
            index=move(self.index),
            counts={m: move(v) for m, v in self.counts.items()},
            library={m: move(v) for m, v in self.library.items()},
            covariates=None if self.covariates is None else move(self.covariates),
            observed=None if self.observed is None else {m: move(v) for m, v in self.observed.items()},
            features=None if self.features is None else {m: move(v) for m, v in self.features.items()},
            cells=self.cells,
            nonzeros=None if self.nonzeros is None else {m: tuple(move(t) for t in v) for m, v in self.nonzeros.items()},
            count_summaries=None if self.count_summaries is None else
            {m: v.to(device, non_blocking) for m, v in self.count_summaries.items()},
        )


@dataclass
class LossTerms:
    """Per-cell negative log terms of the objective, each ``[B]``, and ``reconstruction_batch``: parts
    of a modality's reconstruction term summed over the batch's cells instead (the lgamma terms of the
    counts, which depend on the dispersions and counts but not on a cell's representation, so training
    needs only their sum: :class:`~atlasdgd.model.nb.CountSummary`)."""

    reconstruction: dict[str, torch.Tensor]
    basal_prior: torch.Tensor
    covariate_prior: dict[str, torch.Tensor]
    reconstruction_batch: dict[str, torch.Tensor] = field(default_factory=dict)

    def total(self) -> torch.Tensor:
        """The batch's summed objective: every cell's terms and the batch-level parts."""
        return sum(self.reconstruction_batch.values(), self.per_cell().sum())

    def reconstruction_total(self) -> torch.Tensor:
        return torch.stack(list(self.reconstruction.values())).sum(0)

    def per_cell(self) -> torch.Tensor:
        total = self.reconstruction_total() + self.basal_prior
        for v in self.covariate_prior.values():
            total = total + v
        return total


class DGDModule(nn.Module):
    """Decoder, dispersions and mixtures. ``autocast_dtype`` (runtime, not saved): run the decoder's
    matrix products in that dtype (bf16 mixed precision); likelihood and priors stay in fp32."""

    def __init__(self, config: ModelConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.autocast_dtype: torch.dtype | None = None
        self.decoder = Decoder(config.representation_dim, config.modalities, config.hidden, config.head_layers)
        self.log_dispersion = nn.ParameterDict({m: nn.Parameter(torch.zeros(n)) for m, n in config.modalities.items()})
        self.basal = GaussianMixture(
            config.n_components,
            config.latent_dim,
            radius=config.radius,
            sharpness=config.sharpness,
            alpha=config.dirichlet_alpha,
            sigma0=config.sigma0,
            generator=generator,
        )
        self.covariate_gmms = nn.ModuleDict(
            {
                name: GaussianMixture(
                    n_classes,
                    config.covariate_dim,
                    radius=config.covariate_radius,
                    sharpness=config.covariate_sharpness,
                    alpha=config.covariate_dirichlet_alpha,
                    isotropic=True,
                    generator=generator,
                )
                for name, n_classes in config.covariates.items()
            }
        )

    # -- parameter groups (each gets its own optimizer) ------------------------------------
    def decoder_parameters(self) -> list[nn.Parameter]:
        return [*self.decoder.parameters(), *self.log_dispersion.parameters()]

    def basal_parameters(self) -> list[nn.Parameter]:
        return list(self.basal.parameters())

    def covariate_parameters(self) -> list[nn.Parameter]:
        return list(self.covariate_gmms.parameters())

    # -- pieces of the model ---------------------------------------------------------------
    def dispersion(self, modality: str) -> torch.Tensor:
        return torch.exp(self.log_dispersion[modality]) + self.config.dispersion_floor

    def split_representation(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Full representation ``[B, L + 2Q]`` -> basal ``[B, L]`` and each covariate block ``[B, 2]``."""
        L, d = self.config.latent_dim, self.config.covariate_dim
        covs = {name: z[:, L + q * d : L + (q + 1) * d] for q, name in enumerate(self.config.covariates)}
        return z[:, :L], covs

    def log_fractions(self, z: torch.Tensor, modalities: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Decoded log fractions (fp32 whatever the decoder's precision)."""
        if self.autocast_dtype is None:
            return self.decoder(z, modalities)
        with torch.autocast(device_type=z.device.type, dtype=self.autocast_dtype):
            out = self.decoder(z, modalities)
        return out  # already fp32: the decoder's log-softmax runs in fp32

    def predicted_mean(self, z: torch.Tensor, library: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """mu = s * y for every modality in ``library``."""
        log_y = self.log_fractions(z, list(library))
        return {m: torch.exp(log_y[m]) * library[m][:, None] for m in library}

    def losses(self, batch: Batch, z: torch.Tensor, batch_sums: bool = False) -> LossTerms:
        """Negative log terms for the cells of ``batch`` at representations ``z``: per cell, or with
        ``batch_sums`` (training) the count terms of modalities the loader summarised summed over the
        batch (see :meth:`_count_summary`)."""
        log_y = self.log_fractions(z, list(batch.counts))
        recon, summed = {}, {}
        for m, x in batch.counts.items():
            log_fraction, r = log_y[m], self.dispersion(m)
            summary = self._count_summary(batch, m) if batch_sums else None
            if summary is not None:
                summed[m] = -count_terms_total(summary, r)
                recon[m] = self._masked(batch, m, -dense_terms(x, log_fraction, batch.library[m], r))
                continue
            if batch.features is not None and m in batch.features:
                # features the cell was not measured on are left out of the likelihood, not read as
                # zeros: the fractions are renormalised over the measured ones
                idx = batch.features[m]
                log_fraction = log_fraction.index_select(1, idx)
                log_fraction = log_fraction - torch.logsumexp(log_fraction, dim=1, keepdim=True)
                r = r.index_select(0, idx)
            nonzeros = None if batch.nonzeros is None else batch.nonzeros.get(m)
            recon[m] = self._masked(batch, m, -nb_log_prob_rows(x, log_fraction, batch.library[m], r, nonzeros))
        basal, _ = self.split_representation(z)
        return LossTerms(recon, -self.basal.log_prob(basal), self.covariate_terms(z, batch.covariates), summed)

    @staticmethod
    def _count_summary(batch: Batch, m: str) -> CountSummary | None:
        """The loader's summary of modality ``m``'s non-zeros, where it has one and every feature is
        measured: its count terms then enter the loss summed over the batch."""
        if batch.count_summaries is None or (batch.features is not None and m in batch.features):
            return None
        return batch.count_summaries.get(m)

    @staticmethod
    def _masked(batch: Batch, m: str, nll: torch.Tensor) -> torch.Tensor:
        """Cells without modality ``m`` add nothing to its reconstruction term."""
        if batch.observed is not None and m in batch.observed:
            return nll * batch.observed[m]
        return nll

    def covariate_terms(self, z: torch.Tensor, covariates: torch.Tensor, branch_free: bool = False) -> dict[str, torch.Tensor]:
        """Per covariate, the cells' negative supervised score (``[B]`` each; codes ``-1``: the mixture
        marginal). ``branch_free``: both scores for every cell and one kept, no branch on the data (for
        ``torch.compile``); otherwise only what the codes need (see :meth:`_covariate_log_prob`)."""
        _, covs = self.split_representation(z)
        cov_terms = {}
        for q, (name, gmm) in enumerate(self.covariate_gmms.items()):
            scale = gmm.n_components if self.config.covariate_loss_scale == "n_classes" else 1.0
            codes = covariates[:, q]
            if branch_free:
                score = torch.where(codes >= 0, gmm.class_log_prob(covs[name], codes.clamp_min(0)), gmm.log_prob(covs[name]))
            else:
                score = self._covariate_log_prob(gmm, covs[name], codes)
            cov_terms[name] = -scale * score
        return cov_terms

    def smooth_terms(self, z: torch.Tensor, counts: dict[str, torch.Tensor], log_library: dict[str, torch.Tensor],
                     covariates: torch.Tensor):
        """The shape-static part of a training step's loss in plain, branch-free torch operations, for
        ``torch.compile`` to fuse forward and backward (see :class:`~atlasdgd.train.trainer.Trainer`):
        per modality the negated NB terms that do not vanish at x = 0, ``-(x t - (x + r) softplus(t))``
        summed per cell (t = log(mu / r); the count terms are added by the caller,
        :mod:`atlasdgd.train.compiled_step`), ``-log p(basal z)``, the covariate terms and ``log p(phi)``.
        Eagerly, :meth:`losses` computes the same with the hand-written likelihood (tested equal)."""
        log_y = self.log_fractions(z, list(counts))
        dense = {}
        for m, x in counts.items():
            r = self.dispersion(m)
            t = log_y[m] + (log_library[m][:, None] - torch.log(r))
            sp = F.softplus(t)
            dense[m] = -((x * (t - sp)).sum(1) - sp @ r)
        basal, _ = self.split_representation(z)
        return (dense, -self.basal.log_prob(basal), self.covariate_terms(z, covariates, branch_free=True),
                self.hyperprior_log_prob())

    @staticmethod
    def _covariate_log_prob(gmm: GaussianMixture, z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Supervised score for cells whose class is known, the mixture marginal where it is not (-1)."""
        known = codes >= 0
        if bool(known.all()):
            return gmm.class_log_prob(z, codes)
        if not bool(known.any()):
            return gmm.log_prob(z)
        return torch.where(known, gmm.class_log_prob(z, codes.clamp_min(0)), gmm.log_prob(z))

    def hyperprior_log_prob(self) -> torch.Tensor:
        """log p(phi) of the basal and all covariate mixtures."""
        total = self.basal.hyperprior_log_prob()
        for gmm in self.covariate_gmms.values():
            total = total + gmm.hyperprior_log_prob()
        return total

    def cluster(self, z: torch.Tensor) -> torch.Tensor:
        basal, _ = self.split_representation(z)
        return self.basal.cluster(basal)
