import numpy as np
import pytest
import torch
from scipy import stats

from atlasdgd.model.nb import nb_log_prob, nb_log_prob_rows


def scipy_nb(x, mu, r):
    # scipy's nbinom(n, p) counts failures before n successes: mean n (1 - p) / p, so n = r, p = r / (r + mu)
    return stats.nbinom.logpmf(x, r, r / (r + mu))


@pytest.fixture
def sample():
    rng = np.random.default_rng(0)
    b, f = 7, 40
    r = rng.uniform(1.0, 6.0, f)
    frac = rng.dirichlet(np.ones(f), size=b)
    lib = rng.uniform(50, 3000, b)
    mu = frac * lib[:, None]
    x = rng.poisson(rng.gamma(r, mu / r)).astype(float)
    x[rng.random(x.shape) < 0.5] = 0  # make it sparse like real counts
    return x, frac, lib, mu, r


def test_dense_matches_scipy(sample):
    x, _, _, mu, r = sample
    got = nb_log_prob(torch.tensor(x), torch.tensor(mu), torch.tensor(r)).numpy()
    np.testing.assert_allclose(got, scipy_nb(x, mu, r), rtol=1e-5, atol=1e-5)


def test_sparse_row_sums_match_scipy(sample):
    x, frac, lib, mu, r = sample
    got = nb_log_prob_rows(torch.tensor(x), torch.log(torch.tensor(frac)), torch.tensor(lib), torch.tensor(r)).numpy()
    np.testing.assert_allclose(got, scipy_nb(x, mu, r).sum(1), rtol=1e-5, atol=1e-5)


def test_sparse_path_float32_close_to_scipy(sample):
    x, frac, lib, mu, r = sample
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    got = nb_log_prob_rows(f32(x), torch.log(f32(frac)), f32(lib), f32(r)).numpy()
    np.testing.assert_allclose(got, scipy_nb(x, mu, r).sum(1), rtol=1e-5)


def test_zero_counts_with_zero_mean_are_certain():
    # a feature with mu = 0 and x = 0 has probability one; the dense path must not give NaN
    out = nb_log_prob(torch.zeros(3), torch.zeros(3), torch.full((3,), 2.0))
    assert torch.equal(out, torch.zeros(3))


def test_sparse_and_dense_gradients_agree(sample):
    x, frac, lib, _, r = sample
    logits = torch.tensor(np.log(frac), requires_grad=True)
    rr = torch.tensor(r, requires_grad=True)
    log_y = torch.log_softmax(logits, 1)
    nb_log_prob_rows(torch.tensor(x), log_y, torch.tensor(lib), rr).sum().backward()
    g_sparse = (logits.grad.clone(), rr.grad.clone())
    logits.grad, rr.grad = None, None
    log_y = torch.log_softmax(logits, 1)
    nb_log_prob(torch.tensor(x), torch.exp(log_y) * torch.tensor(lib)[:, None], rr).sum().backward()
    torch.testing.assert_close(g_sparse[0], logits.grad)
    torch.testing.assert_close(g_sparse[1], rr.grad)


def test_given_nonzeros_match_the_search_values_and_gradients(sample):
    # the loader hands the likelihood its CSR non-zeros (any order, stored zeros included): same values
    # and gradients as finding them in the dense counts
    x, frac, lib, _, r = sample
    x = torch.tensor(x)
    rows, cols = torch.nonzero(x, as_tuple=True)
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    extra_zero = torch.nonzero(x == 0)[:3].T  # stored zeros
    given = (torch.cat([rows[perm], extra_zero[0]]), torch.cat([cols[perm], extra_zero[1]]),
             torch.cat([x[rows, cols][perm], torch.zeros(3, dtype=x.dtype)]))
    given32 = (given[0].int(), given[1].int(), given[2])  # the loader's index dtype
    grads = []
    for nonzeros in (None, given, given32):
        logits = torch.tensor(np.log(frac), requires_grad=True)
        rr = torch.tensor(r, requires_grad=True)
        out = nb_log_prob_rows(x, torch.log_softmax(logits, 1), torch.tensor(lib), rr, nonzeros)
        out.sum().backward()
        grads.append((out.detach(), logits.grad, rr.grad))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b)


def test_hand_written_dense_backward_passes_gradcheck(sample):
    # the dense terms' backward is written out (atlasdgd.model.nb._DenseTerms): check it against
    # finite differences in float64, for log-fractions and dispersions, with an uneven upstream gradient
    from atlasdgd.model.nb import _DenseTerms

    x, frac, lib, _, r = sample
    lf = torch.tensor(np.log(frac), requires_grad=True)
    rr = torch.tensor(r, requires_grad=True)
    weights = torch.linspace(0.5, 2.0, len(lib), dtype=torch.float64)

    def f(lf, rr):
        return _DenseTerms.apply(lf, torch.log(torch.tensor(lib)), rr, torch.tensor(x)) * weights

    assert torch.autograd.gradcheck(f, (lf, rr), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("table_counts", [1, 3, 16])
def test_count_terms_match_lgamma_and_digamma_on_both_sides_of_the_table(table_counts):
    # the lgamma terms come from a per-feature table up to table_counts and from lgamma above it:
    # values against scipy's gammaln, gradients in r against digamma (the closed form), stored zeros give 0
    from scipy.special import digamma, gammaln

    from atlasdgd.model.nb import count_terms

    rng = np.random.default_rng(1)
    r = rng.uniform(0.5, 50.0, 30)
    cols = rng.integers(0, 30, 500)
    x = rng.choice([0, 1, 2, 3, 4, 7, 40, 1000], size=500).astype(float)
    rr = torch.tensor(r, requires_grad=True)
    got = count_terms(torch.tensor(x), torch.tensor(cols), rr, table_counts)
    want = gammaln(x + r[cols]) - gammaln(r[cols]) - gammaln(x + 1)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10, atol=1e-9)
    weights = rng.uniform(0.5, 2.0, 500)
    (got * torch.tensor(weights)).sum().backward()
    want_grad = np.bincount(cols, weights * (digamma(x + r[cols]) - digamma(r[cols])), minlength=30)
    np.testing.assert_allclose(rr.grad.numpy(), want_grad, rtol=1e-9, atol=1e-9)
    assert torch.all(got.detach()[torch.tensor(x) == 0] == 0)


def test_count_terms_of_no_entries_are_empty():
    from atlasdgd.model.nb import count_terms

    out = count_terms(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.ones(4))
    assert out.shape == (0,)
