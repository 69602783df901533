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
    # the loader hands the likelihood its CSR non-zeros (rows in order, any order within a row, stored
    # zeros included): same values and gradients as finding them in the dense counts
    x, frac, lib, _, r = sample
    x = torch.tensor(x)
    rows, cols = torch.nonzero(x, as_tuple=True)
    extra_zero = torch.nonzero(x == 0)[:3].T  # stored zeros
    rows, cols = torch.cat([rows, extra_zero[0]]), torch.cat([cols, extra_zero[1]])
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    perm = perm[torch.argsort(rows[perm], stable=True)]  # shuffled within rows
    given = (rows[perm], cols[perm], x[rows, cols][perm])
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
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_count_term_sums_match_lgamma_and_digamma_on_both_sides_of_the_table(table_counts, dtype):
    # the lgamma terms come from a per-feature table up to table_counts and from lgamma above it, summed
    # per row: values against scipy's gammaln, gradients in r against digamma (the closed form), with an
    # uneven upstream gradient; stored zeros add nothing; a row without entries sums to 0
    from scipy.special import digamma, gammaln

    from atlasdgd.model.nb import count_term_sums

    rng = np.random.default_rng(1)
    r = rng.uniform(0.5, 50.0, 30)
    n_rows = 12
    rows = np.sort(rng.integers(0, n_rows - 1, 500))  # the last row gets no entry
    cols = rng.integers(0, 30, 500)
    x = rng.choice([0, 1, 2, 3, 4, 7, 40, 1000], size=500).astype(float)
    rr = torch.tensor(r, dtype=dtype, requires_grad=True)
    got = count_term_sums(torch.tensor(x, dtype=dtype), torch.tensor(rows), torch.tensor(cols), rr, n_rows, table_counts)
    per_entry = gammaln(x + r[cols]) - gammaln(r[cols]) - gammaln(x + 1)
    tol = dict(rtol=1e-10, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-3)
    np.testing.assert_allclose(got.detach().numpy(), np.bincount(rows, per_entry, minlength=n_rows), **tol)
    assert got[-1] == 0
    weights = rng.uniform(0.5, 2.0, n_rows)
    (got * torch.tensor(weights, dtype=dtype)).sum().backward()
    slope = weights[rows] * (digamma(x + r[cols]) - digamma(r[cols]))
    np.testing.assert_allclose(rr.grad.numpy(), np.bincount(cols, slope, minlength=30), **tol)


def test_count_term_sums_pass_gradcheck_and_ignore_stored_zeros():
    from atlasdgd.model.nb import count_term_sums

    rr = torch.tensor([0.7, 3.0, 12.0], dtype=torch.float64, requires_grad=True)
    rows, cols = torch.tensor([0, 0, 1, 1, 3]), torch.tensor([0, 2, 1, 2, 0])
    x = torch.tensor([1.0, 5.0, 0.0, 40.0, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda r: count_term_sums(x, rows, cols, r, 4, 8), (rr,))
    keep = x > 0
    torch.testing.assert_close(count_term_sums(x, rows, cols, rr, 4, 8),
                               count_term_sums(x[keep], rows[keep], cols[keep], rr, 4, 8))


def test_count_term_sums_of_no_entries_are_zeros():
    from atlasdgd.model.nb import count_term_sums

    empty = torch.zeros(0, dtype=torch.long)
    out = count_term_sums(torch.zeros(0), empty, empty, torch.ones(4), 3)
    assert torch.equal(out, torch.zeros(3))


@pytest.mark.parametrize("n_features", [30, 40_000])  # width 32, and a width of 1 (wide ATAC-like modalities)
def test_count_terms_total_of_a_summary_matches_gammaln_and_digamma(n_features):
    # the training loss sums the lgamma terms over the batch from the loader's summary: value against
    # scipy's gammaln, gradient in r against digamma (closed forms), counts on both sides of the width,
    # stored zeros ignored
    from scipy.special import digamma, gammaln

    from atlasdgd.data.count_summary import summarize_counts, summary_width
    from atlasdgd.model.nb import count_terms_total

    rng = np.random.default_rng(4)
    r = rng.uniform(0.05, 50.0, n_features)
    cols = rng.integers(0, n_features, 2000).astype(np.int32)
    x = rng.choice([0, 1, 2, 3, 5, 31, 32, 33, 40, 1000], size=2000).astype(np.float32)
    summary = summarize_counts(cols, x, n_features)
    assert summary.width == summary_width(n_features) == (32 if n_features == 30 else 1)
    wide = summarize_counts(cols.astype(np.int64), x.astype(np.float64), n_features)  # other sources' dtypes
    for name in ("histogram", "large_cols", "large_values"):
        assert torch.equal(getattr(wide, name), getattr(summary, name))
    rr = torch.tensor(r, dtype=torch.float64, requires_grad=True)
    got = count_terms_total(summary, rr)
    xd, rc = x.astype(np.float64), r[cols]  # scipy in float64 (gammaln of float32 input is float32)
    np.testing.assert_allclose(float(got), (gammaln(xd + rc) - gammaln(rc) - gammaln(xd + 1)).sum(), rtol=1e-10)
    got.backward()
    want = np.bincount(cols, digamma(xd + rc) - digamma(rc), minlength=n_features)
    np.testing.assert_allclose(rr.grad.numpy(), want, rtol=1e-9, atol=1e-9)


def test_a_summary_of_no_entries_sums_to_zero():
    from atlasdgd.data.count_summary import summarize_counts
    from atlasdgd.model.nb import count_terms_total

    summary = summarize_counts(np.zeros(0, np.int32), np.zeros(0, np.float32), 5)
    assert summary.histogram.shape == (5, 32) and not summary.histogram.any() and summary.large_values.numel() == 0
    assert float(count_terms_total(summary, torch.ones(5))) == 0.0
