"""Label transfer: neighbour votes + mixture posterior, calibrated on held-out cells."""

import numpy as np
import pytest

from atlasdgd.evaluate.metrics import confidence_report, expected_calibration_error
from atlasdgd.infer.labels import UNKNOWN_LABEL, LabelTransfer


def test_ece_matches_a_histogram_computation():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 2000)
    correct = rng.uniform(size=2000) < conf ** 2  # over-confident on purpose
    counts, edges = np.histogram(conf, bins=15, range=(0, 1))
    which = np.digitize(conf, edges[1:-1])
    expected = sum(counts[b] * abs(correct[which == b].mean() - conf[which == b].mean())
                   for b in range(15) if counts[b]) / len(conf)
    assert expected_calibration_error(conf, correct) == pytest.approx(expected, rel=1e-12)
    assert expected_calibration_error(np.full(10, 0.7), np.array([1] * 7 + [0] * 3)) == pytest.approx(0.0)


def _cells(rng, n, spread):
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [1.5, 2.5]])
    codes = rng.integers(0, 3, n)
    basal = centres[codes] + rng.normal(scale=spread, size=(n, 2))
    d2 = ((basal[:, None, :] - centres[None]) ** 2).sum(-1)
    logits = -25.0 * d2  # a mixture posterior as sharp as a trained DGD's: 0 or 1 almost everywhere
    post = np.exp(logits - logits.max(1, keepdims=True))
    return basal, np.array(["a", "b", "c"])[codes], post / post.sum(1, keepdims=True)


def test_calibrated_transfer_is_right_where_neighbours_are_and_honest_about_doubt():
    rng = np.random.default_rng(1)
    ref_basal, ref_labels, _ = _cells(rng, 900, 0.9)
    transfer = LabelTransfer.from_cells(ref_basal, ref_labels, ["a", "b", "c"], ["a", "b", "c"])
    val_basal, val_labels, val_post = _cells(rng, 600, 0.9)
    report = transfer.calibrate(val_basal, val_post, val_labels)
    assert report["calibrated_on"] == 600 and transfer.weight > 0  # the votes carry information the posterior lacks
    basal, truth, post = _cells(rng, 2000, 0.9)
    labels, conf, probs = transfer.predict(basal, post)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(labels, np.array(["a", "b", "c"])[probs[:, :3].argmax(1)])
    np.testing.assert_allclose(conf, probs[:, :3].max(1))
    calibrated = confidence_report(labels, truth, conf)
    posterior_only = confidence_report(np.array(["a", "b", "c"])[post.argmax(1)], truth, post.max(1))
    assert calibrated["ece"] <= 0.05 < posterior_only["ece"]
    assert calibrated["mean_confidence_wrong"] < calibrated["mean_confidence_right"]
    assert calibrated["auroc_confidence"] > 0.75 and calibrated["accuracy"] >= posterior_only["accuracy"] - 0.01
    unsure, conf2, _ = transfer.predict(basal, post, unknown_below=0.8)
    assert set(unsure[conf2 < 0.8]) == {UNKNOWN_LABEL} and (unsure[conf2 >= 0.8] == labels[conf2 >= 0.8]).all()


def test_mapped_cells_carry_label_probabilities_that_survive_save_and_load(mapped_atlas, tmp_path):
    import atlasdgd

    model = atlasdgd.DGD.load(mapped_atlas.model_dir)
    settings = model.vocab.label_transfer
    assert {"weight", "temperature", "k"} <= set(settings) and settings["fit"]["calibrated_on"] > 0
    mapped = model.map(mapped_atlas.heldout[:200].copy(), epochs=3, progress=False)
    probs = mapped.obsm["dgd_label_probabilities"]
    assert list(probs.columns) == [*model.vocab.labels, UNKNOWN_LABEL] and (probs.index == mapped.obs_names).all()
    np.testing.assert_allclose(probs.to_numpy().sum(1), 1.0, rtol=1e-5)
    known = probs[model.vocab.labels].to_numpy()
    np.testing.assert_array_equal(mapped.obs["dgd_label"].astype(str), np.array(model.vocab.labels)[known.argmax(1)])
    np.testing.assert_allclose(mapped.obs["dgd_label_confidence"], known.max(1), rtol=1e-6)
    truth = mapped_atlas.heldout[:200].obs["cell_type"].astype(str).to_numpy()
    assert (mapped.obs["dgd_label"].astype(str).to_numpy() == truth).mean() > 0.9
    assert set(model.map(mapped_atlas.heldout[:20].copy(), epochs=1, unknown_below=1.01,
                         progress=False).obs["dgd_label"]) == {UNKNOWN_LABEL}
    mapped.write_h5ad(tmp_path / "mapped.h5ad")  # the probability table is an obsm DataFrame anndata can write


def test_cells_far_from_every_reference_cell_lose_confidence_to_unknown():
    rng = np.random.default_rng(2)
    ref_basal, ref_labels, _ = _cells(rng, 900, 0.5)
    transfer = LabelTransfer.from_cells(ref_basal, ref_labels, ["a", "b", "c"], ["a", "b", "c"], weight=1.0)
    inside, _, post_in = _cells(rng, 300, 0.5)
    outside = inside + np.array([0.0, -6.0])  # the same shapes, far below every cluster
    typical_in, typical_out = transfer.typicality(inside), transfer.typicality(outside)
    assert np.median(typical_in) > 0.3 and (typical_out <= 0.01).all()
    # typicality is the fraction of reference cells at least as far from their neighbours: ~uniform inside
    assert 0.02 < (typical_in < 0.05).mean() < 0.12
    _, conf_out, probs_out = transfer.predict(outside, post_in)
    assert conf_out.max() < 0.05 and (probs_out[:, -1] > 0.95).all()
    _, conf_in, _ = transfer.predict(inside, post_in)
    assert conf_in.mean() > 0.85


def test_a_whole_batch_shifted_a_little_farther_keeps_its_confidence():
    rng = np.random.default_rng(3)
    ref_basal, ref_labels, _ = _cells(rng, 900, 0.5)
    transfer = LabelTransfer.from_cells(ref_basal, ref_labels, ["a", "b", "c"], ["a", "b", "c"], weight=1.0)
    basal, truth, post = _cells(rng, 300, 0.5)
    shifted = basal + rng.normal(scale=0.6, size=basal.shape)  # every cell a bit off the reference manifold
    from sklearn.neighbors import NearestNeighbors  # an independent search

    dist, _ = NearestNeighbors(n_neighbors=transfer.k).fit(transfer.reference).kneighbors(shifted.astype(np.float32))
    shift = np.median(dist.mean(1)) / np.median(transfer._reference_spread)
    assert 1.3 < shift < 3.0  # the regime the correction is for
    labels, conf, _ = transfer.predict(shifted, post)
    absolute = np.minimum(1.0, transfer.typicality(shifted) / transfer.atypical_tail)
    assert (absolute < 1).mean() > 0.2  # without the correction a fifth or more would lose confidence
    corrected = 1.0 - transfer.probabilities(shifted, post)[:, -1]
    assert (corrected < 1).mean() < 0.5 * (absolute < 1).mean()
    right = labels == truth
    assert right.mean() > 0.9 and conf[right].mean() > 0.85
    # a handful of such cells is not enough to measure a shift: they keep the absolute typicality
    few_labels, few_conf, few_probs = transfer.predict(shifted[:10], post[:10])
    np.testing.assert_allclose(few_probs[:, -1], 1.0 - absolute[:10], atol=1e-12)


def test_reference_rows_of_a_whole_table_give_the_transfer_of_the_rows_taken_first(monkeypatch):
    # the model passes its whole cell table and the training rows, so only the reference cells are
    # copied: same reference, same subsample (more labelled cells than the cap), same probabilities
    from atlasdgd.infer import labels as labels_module

    monkeypatch.setattr(labels_module, "MAX_REFERENCE_CELLS", 300)
    rng = np.random.default_rng(3)
    basal, names, post = _cells(rng, 1000, 0.8)
    names = names.astype(object)
    names[rng.choice(1000, 50, replace=False)] = None  # unlabelled cells are left out either way
    rows = np.sort(rng.choice(1000, 700, replace=False))
    first = LabelTransfer.from_cells(basal[rows], names[rows], ["a", "b", "c"], ["a", "b", "c"], seed=4)
    whole = LabelTransfer.from_cells(basal, names, ["a", "b", "c"], ["a", "b", "c"], seed=4, rows=rows)
    assert len(whole.reference) == 300
    np.testing.assert_array_equal(whole.reference, first.reference)
    np.testing.assert_array_equal(whole.reference_codes, first.reference_codes)
    np.testing.assert_array_equal(whole.probabilities(basal[:50], post[:50]), first.probabilities(basal[:50], post[:50]))


def test_neighbours_searched_block_by_block_match_a_direct_count(monkeypatch):
    # votes, typicality and the reference's own spread are computed a block of cells at a time: with
    # blocks of 7 cells they equal a direct computation over all cells at once (sklearn's neighbours,
    # counted by hand)
    from sklearn.neighbors import NearestNeighbors

    import atlasdgd.infer.labels as labels_module

    rng = np.random.default_rng(3)
    ref = rng.normal(size=(60, 4)).astype(np.float32)
    codes = rng.integers(0, 3, 60)
    query = (rng.normal(size=(55, 4)) * 1.2).astype(np.float32)
    monkeypatch.setattr(labels_module, "NEIGHBOUR_BLOCK", 7)
    lt = labels_module.LabelTransfer(["a", "b", "c"], ["a", "b", "c"], ref, codes, k=5)
    votes, typical = lt._neighbours(query, shift_corrected=True)

    dist, idx = NearestNeighbors(n_neighbors=5).fit(ref).kneighbors(query)
    want_votes = np.stack([np.bincount(codes[row], minlength=3) for row in idx])
    np.testing.assert_allclose(votes, (want_votes + 1 / 3) / 6)
    own, _ = NearestNeighbors(n_neighbors=6).fit(ref).kneighbors(ref)
    spread = np.sort(own[:, 1:].mean(1))
    np.testing.assert_allclose(lt._reference_spread, spread, rtol=1e-6)
    distance = dist.mean(1)
    shift = np.median(distance) / np.median(spread)
    if 1.0 < shift <= labels_module.MAX_SHIFT:
        distance = distance / shift
    want_typical = (len(spread) - np.searchsorted(spread, distance, side="left") + 1.0) / (len(spread) + 1.0)
    np.testing.assert_allclose(typical, want_typical)
