"""The full per-cell objective: gradients against finite differences, terms against their definitions."""

import torch

from atlasdgd.model.config import ModelConfig
from atlasdgd.model.module import Batch, DGDModule
from atlasdgd.data.count_summary import summarize_counts
from atlasdgd.model.nb import nb_log_prob
from atlasdgd.train.compiled_step import _StepObjective


def _module_and_batch(dtype=torch.float64):
    cfg = ModelConfig(modalities={"rna": 30, "atac": 50}, latent_dim=4, n_components=3, covariates={"batch": 2, "site": 3})
    torch.manual_seed(0)
    module = DGDModule(cfg, generator=torch.Generator().manual_seed(0)).to(dtype)
    g = torch.Generator().manual_seed(1)
    counts = {m: torch.poisson(torch.rand(5, n, generator=g, dtype=dtype) * 3) for m, n in cfg.modalities.items()}
    batch = Batch(
        index=torch.arange(5),
        counts=counts,
        library={m: x.sum(1) for m, x in counts.items()},
        covariates=torch.tensor([[0, 2], [1, 0], [1, 1], [0, 0], [1, 2]]),
    )
    z = torch.randn(5, cfg.representation_dim, generator=g, dtype=dtype)
    return module, batch, z


def test_gradient_wrt_a_representation_row_matches_finite_differences():
    module, batch, z = _module_and_batch()
    z = z.requires_grad_(True)
    module.losses(batch, z).per_cell().sum().backward()
    eps = 1e-6
    for i in (0, 3):
        for d in range(z.shape[1]):
            zp, zm = z.detach().clone(), z.detach().clone()
            zp[i, d] += eps
            zm[i, d] -= eps
            fd = (module.losses(batch, zp).per_cell().sum() - module.losses(batch, zm).per_cell().sum()) / (2 * eps)
            assert abs(fd.item() - z.grad[i, d].item()) < 1e-5 * max(1.0, abs(fd.item())), (i, d)


def test_gradient_of_one_row_comes_only_from_its_own_cell():
    module, batch, z = _module_and_batch()
    z = z.requires_grad_(True)
    module.losses(batch, z).per_cell()[2].backward()
    assert torch.count_nonzero(z.grad[[0, 1, 3, 4]]) == 0
    assert torch.count_nonzero(z.grad[2]) > 0


def test_loss_terms_equal_their_definitions():
    module, batch, z = _module_and_batch()
    terms = module.losses(batch, z)
    log_y = module.decoder(z)
    for m, x in batch.counts.items():
        mu = torch.exp(log_y[m]) * batch.library[m][:, None]
        expected = -nb_log_prob(x, mu, module.dispersion(m)).sum(1)
        torch.testing.assert_close(terms.reconstruction[m], expected)
    basal, covs = module.split_representation(z)
    torch.testing.assert_close(terms.basal_prior, -module.basal.log_prob(basal))
    for q, (name, gmm) in enumerate(module.covariate_gmms.items()):
        torch.testing.assert_close(terms.covariate_prior[name], -gmm.class_log_prob(covs[name], batch.covariates[:, q]))
    assert covs["site"].shape == (5, 2)
    torch.testing.assert_close(covs["site"], z[:, 6:8])


def test_unobserved_modality_does_not_count():
    module, batch, z = _module_and_batch()
    batch.observed = {"rna": torch.tensor([True, False, True, True, True]), "atac": torch.ones(5, dtype=torch.bool)}
    terms = module.losses(batch, z)
    assert terms.reconstruction["rna"][1] == 0
    assert terms.reconstruction["atac"][1] != 0


def test_dispersion_starts_at_two():
    module, _, _ = _module_and_batch()
    torch.testing.assert_close(module.dispersion("rna"), torch.full((30,), 2.0, dtype=torch.float64))


def test_decoder_heads_are_softmax_over_each_modality():
    module, _, z = _module_and_batch()
    out = module.decoder(z)
    for m, n in module.config.modalities.items():
        assert out[m].shape == (5, n)
        torch.testing.assert_close(torch.exp(out[m]).sum(1), torch.ones(5, dtype=torch.float64))
    # last hidden layer width is max(100, round(sqrt(F)))
    assert module.decoder.heads["rna"][-1].in_features == 100


def test_the_compiled_steps_objective_equals_the_losses_in_values_and_gradients():
    # the objective the compiled training step traces (atlasdgd.train.compiled_step: DGDModule.smooth_terms,
    # count terms from histograms, the counts above the histogram width padded with entries at the
    # width) run eagerly, against the hand-written likelihood (losses + hyperprior_log_prob): same
    # objective, loss and gradients; with an unobserved modality and an unknown covariate
    module, batch, z = _module_and_batch()
    observed = torch.tensor([True, False, True, True, False])
    batch.observed = {"atac": observed}
    batch.covariates[2, 1] = -1
    summaries = {}
    for m, x in batch.counts.items():
        rows, cols = torch.nonzero(x, as_tuple=True)
        keep = observed[rows] if m == "atac" else torch.ones(len(rows), dtype=torch.bool)
        summaries[m] = summarize_counts(cols[keep].numpy(), x[rows, cols][keep].numpy(), x.shape[1], width=2)
    assert all(s.large_values.numel() > 0 for s in summaries.values())
    batch.count_summaries = summaries

    def run(compiled_form: bool):
        module.zero_grad()
        zz = z.clone().requires_grad_(True)
        if compiled_form:
            padded = {m: (torch.cat([s.large_cols, torch.tensor([0, 3])]), torch.cat([s.large_values, torch.full((2,), 2.0)]))
                      for m, s in summaries.items()}
            weight = torch.ones(5, dtype=z.dtype)
            loss, (objective, *_) = _StepObjective(module, 0.3, 0.0)(
                zz, batch.counts, batch.library, batch.covariates, weight,
                {"rna": weight, "atac": observed.to(z.dtype)}, {m: s.histogram for m, s in summaries.items()},
                {m: c for m, (c, _) in padded.items()}, {m: v for m, (_, v) in padded.items()},
                torch.tensor(0.2, dtype=z.dtype), 2)
        else:
            objective = module.losses(batch, zz, batch_sums=True).total()
            loss = objective * 0.2 - 0.3 * module.hyperprior_log_prob() / 2
        loss.backward()
        return [loss.detach(), objective.detach(), zz.grad.clone()] + [p.grad.clone() for p in module.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b)
