import numpy as np
import pandas as pd
import pytest

from atlasdgd.data.split import split_from_column, stratified_split
from atlasdgd.errors import InputError


def test_stratified_split_keeps_shares_in_every_stratum():
    strata = pd.Series(np.repeat(["a", "b", "c"], [500, 300, 200]))
    split = stratified_split(strata, 1000, (0.8, 0.1, 0.1), seed=0)
    for s, n in (("a", 500), ("b", 300), ("c", 200)):
        part = split[strata.to_numpy() == s]
        assert (part == "validation").sum() == round(0.1 * n)
        assert (part == "test").sum() == round(0.1 * n)
        assert (part == "train").sum() == n - 2 * round(0.1 * n)


def test_split_is_reproducible_and_seed_dependent():
    strata = pd.Series(np.repeat(["a", "b"], [100, 100]))
    a = stratified_split(strata, 200, seed=3)
    assert (a == stratified_split(strata, 200, seed=3)).all()
    assert (a != stratified_split(strata, 200, seed=4)).any()


def test_tiny_strata_go_to_training():
    strata = pd.Series(["rare", "common"] + ["common"] * 50)
    split = stratified_split(strata, 52, seed=0)
    assert split[0] == "train"


def test_fractions_are_checked():
    with pytest.raises(InputError, match="sum"):
        stratified_split(None, 10, (0.5, 0.2, 0.2))


def test_user_split_column_aliases():
    out = split_from_column(pd.Series(["Train", "val", "test", "validation"]))
    assert out.tolist() == ["train", "validation", "test", "validation"]
