import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from atlasdgd.model.gmm import GaussianMixture
from atlasdgd.model.priors import SoftballPrior, dirichlet_log_prob, softball_log_normalizer


@pytest.fixture(autouse=True)
def _dtype():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _random_gmm(k=4, d=3, isotropic=False, seed=0):
    g = GaussianMixture(k, d, isotropic=isotropic, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        g.log_precision.copy_(torch.randn(g.log_precision.shape, generator=torch.Generator().manual_seed(seed + 1)))
        g.logits.copy_(torch.randn(k, generator=torch.Generator().manual_seed(seed + 2)))
    return g


@pytest.mark.parametrize("isotropic", [False, True])
def test_mixture_density_matches_scipy(isotropic):
    g = _random_gmm(isotropic=isotropic)
    z = torch.randn(10, 3, generator=torch.Generator().manual_seed(5))
    means = g.means.detach().numpy()
    var = np.exp(-g.log_precision.detach().expand(4, 3).numpy())
    pi = special.softmax(g.logits.detach().numpy())
    dens = sum(pi[k] * stats.multivariate_normal(means[k], np.diag(var[k])).pdf(z.numpy()) for k in range(4))
    np.testing.assert_allclose(g.log_prob(z).detach().numpy(), np.log(dens), rtol=1e-10)


def test_class_log_prob_is_the_joint_term_of_that_class():
    g = _random_gmm()
    z = torch.randn(6, 3)
    c = torch.tensor([0, 1, 2, 3, 1, 0])
    joint = g.joint_log_prob(z)
    torch.testing.assert_close(g.class_log_prob(z, c), joint[torch.arange(6), c])


def test_cluster_is_argmax_posterior_and_posterior_sums_to_one():
    g = _random_gmm()
    z = torch.randn(50, 3)
    post = g.posterior(z)
    torch.testing.assert_close(post.sum(1), torch.ones(50))
    assert torch.equal(g.cluster(z), post.argmax(1))


def test_softball_normaliser_integrates_to_one_in_2d():
    prior = SoftballPrior(2, radius=2.0, sharpness=5.0)
    f = lambda y, x: math.exp(prior.log_prob(torch.tensor([x, y])).item())  # noqa: E731
    total, _ = integrate.dblquad(f, -10, 10, -10, 10, epsabs=1e-8)
    assert total == pytest.approx(1.0, abs=1e-5)
    # the papers' normaliser (the R-ball's volume) would leave ~13% of mass unaccounted for here
    ball = math.exp(prior.log_norm) / (math.pi * 4.0)
    assert ball == pytest.approx(1.13, abs=0.01)


@pytest.mark.parametrize("dim", [1, 2, 5, 20])
def test_softball_normaliser_approaches_ball_volume_when_sharp(dim):
    # as a -> infinity the density is uniform on the ball: normaliser = log volume of the R-ball
    log_vol = 0.5 * dim * math.log(math.pi) + dim * math.log(2.0) - special.gammaln(1 + dim / 2)
    assert softball_log_normalizer(dim, 2.0, 2000.0) == pytest.approx(log_vol, abs=2e-2)


def test_softball_samples_lie_in_ball_and_fill_it():
    s = SoftballPrior(3, 2.0, 5.0).sample(20000, torch.Generator().manual_seed(0))
    r = torch.linalg.vector_norm(s, dim=1)
    assert r.max() <= 2.0
    # uniform in a 3-ball: P(r < R/2) = 1/8
    assert (r < 1.0).double().mean().item() == pytest.approx(1 / 8, abs=0.01)


def test_dirichlet_matches_scipy():
    w = torch.tensor([0.1, 0.5, 0.4])
    for alpha in (1.0, 2.0, 0.7):
        assert dirichlet_log_prob(torch.log(w), alpha).item() == pytest.approx(
            stats.dirichlet(np.full(3, alpha)).logpdf(w.numpy()), rel=1e-10
        )


def test_hyperprior_is_sum_of_independent_terms():
    g = _random_gmm(k=3, d=2)
    prior = SoftballPrior(2, 2.0, 5.0)
    expected = (
        prior.log_prob(g.means).sum().item()
        + stats.dirichlet(np.ones(3)).logpdf(special.softmax(g.logits.detach().numpy()))
        + stats.norm(-2 * math.log(g.sigma0), 1).logpdf(g.log_precision.detach().numpy()).sum()
    )
    assert g.hyperprior_log_prob().item() == pytest.approx(expected, rel=1e-10)


def test_sigma0_is_not_rounded_and_large_k_works():
    g = GaussianMixture(100, 4)
    assert g.sigma0 == pytest.approx(0.2 * 2.0 / 100)
    assert torch.isfinite(g.log_prob(torch.zeros(2, 4))).all()


def test_sampling_from_a_component_has_its_moments():
    g = _random_gmm(k=2, d=2)
    s = g.sample(40000, component=1, generator=torch.Generator().manual_seed(3))
    std = torch.exp(-0.5 * g.log_precision[1]).detach()
    torch.testing.assert_close(s.mean(0), g.means[1].detach(), atol=4 * std.max().item() / 200, rtol=0)
    torch.testing.assert_close(s.std(0), std, rtol=0.02, atol=0)


def _expected_complete_objective(gmm, z, r, w):
    """Q(phi) = sum_i sum_k r_ik [log pi_k + log N_k(z_i)] + w log p(phi), written out directly."""
    return (r * gmm.joint_log_prob(z)).sum() + w * gmm.hyperprior_log_prob()


@pytest.mark.parametrize("isotropic,w", [(False, 1.0), (False, 300.0), (True, 300.0)])
def test_m_step_is_the_maximum_of_the_expected_complete_objective(isotropic, w):
    torch.manual_seed(0)
    gmm = GaussianMixture(3, 2, isotropic=isotropic, alpha=1.5, sigma0=0.3).double()
    z = torch.cat([torch.randn(120, 2) * 0.2 + torch.tensor([0.8, 0.0]),
                   torch.randn(60, 2) * 0.4 + torch.tensor([-0.7, 0.5]),
                   torch.randn(120, 2) * 0.1 + torch.tensor([0.0, -1.2])]).double()
    r = gmm.posterior(z).detach()
    em = GaussianMixture(3, 2, isotropic=isotropic, alpha=1.5, sigma0=0.3).double()
    em.load_state_dict(gmm.state_dict())
    n, s1, s2, held = em.sufficient_statistics(z)
    np.testing.assert_array_equal(held.numpy(), np.bincount(gmm.cluster(z).numpy(), minlength=3))
    assert em.maximize(n, s1, s2, held, prior_weight=w) == []
    # independent: gradient ascent on Q over all parameters from the same start
    opt = torch.optim.LBFGS(gmm.parameters(), max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = -_expected_complete_objective(gmm, z, r, w)
        value.backward()
        return value

    opt.step(loss)
    with torch.no_grad():
        assert _expected_complete_objective(em, z, r, w) >= _expected_complete_objective(gmm, z, r, w) - 1e-6
        torch.testing.assert_close(em.means, gmm.means, atol=1e-4, rtol=0)
        torch.testing.assert_close(em.log_precision, gmm.log_precision, atol=1e-4, rtol=0)
        torch.testing.assert_close(em.log_weights(), gmm.log_weights(), atol=1e-4, rtol=0)


def test_m_steps_never_lower_the_map_objective():
    torch.manual_seed(1)
    gmm = GaussianMixture(4, 3, sigma0=0.3).double()
    z = (torch.randn(400, 3) * 0.3 + torch.randint(0, 3, (400, 1)) * 0.6 - 0.6).double()
    w = 400.0

    def objective():
        with torch.no_grad():
            return float(gmm.log_prob(z).sum() + w * gmm.hyperprior_log_prob())

    values = [objective()]
    for _ in range(10):
        gmm.maximize(*gmm.sufficient_statistics(z), prior_weight=w)
        values.append(objective())
    assert all(b >= a - 1e-6 for a, b in zip(values, values[1:])), values


def test_a_dead_component_is_reseeded_by_splitting_the_largest():
    gmm = GaussianMixture(3, 2, sigma0=0.2).double()
    with torch.no_grad():
        gmm.means.copy_(torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 1.9]]))
    torch.manual_seed(2)
    # two groups of cells, the larger one wide along its second axis; nothing near component 2
    z = torch.cat([torch.randn(300, 2) * torch.tensor([0.05, 0.3]) + torch.tensor([0.5, 0.0]),
                   torch.randn(100, 2) * 0.05 + torch.tensor([-0.5, 0.0])]).double()
    assert gmm.maximize(*gmm.sufficient_statistics(z), prior_weight=1.0) == [2]
    means = gmm.means.detach()
    # the two halves of component 0 sit on either side of its old centre along the wide axis
    assert abs(means[0, 0] - 0.5) < 0.02 and abs(means[2, 0] - 0.5) < 0.02
    assert means[2, 1] - means[0, 1] > 0.3
    weights = torch.exp(gmm.log_weights())
    assert abs(float(weights[0] - weights[2])) < 1e-9
    # and after another step both halves hold cells
    counts = torch.bincount(gmm.cluster(z), minlength=3)
    assert bool((counts > 50).all()), counts


def test_a_component_that_holds_no_cell_is_reseeded_even_with_responsibility_mass():
    gmm = GaussianMixture(2, 2, sigma0=0.3).double()
    with torch.no_grad():  # a narrow component under a broad one: it never wins a cell
        gmm.means.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.05]]))
        gmm.log_precision.copy_(torch.tensor([[0.0, 0.0], [2.0, 2.0]]))
        gmm.logits.copy_(torch.tensor([3.0, -3.0]))
    z = (torch.randn(500, 2, generator=torch.Generator().manual_seed(0)) * 0.6).double()
    n, s1, s2, held = gmm.sufficient_statistics(z)
    assert held[1] == 0 and n[1] > 1.0
    assert gmm.maximize(n, s1, s2, held, prior_weight=1.0) == [1]
    assert bool((torch.bincount(gmm.cluster(z), minlength=2) > 50).all())
