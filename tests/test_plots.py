"""The figures show what they say: truth.png's example trials come from different conditions."""

import numpy as np

from src.plots import distinct_trials


def test_truth_figure_draws_trials_of_different_conditions():
    # six trials of condition A, then two of B and two of C: the first three trials are all A,
    # and the figure drew the same line three times; the pick takes one of each
    rng = np.random.default_rng(0)
    shapes = {c: rng.random((20, 4)) for c in "ABC"}
    labels = list("AAAAAABBCC")
    true = np.stack([shapes[c] + 0.01 * rng.random((20, 4)) for c in labels])
    picked = distinct_trials(true)
    assert len(picked) == 3
    assert sorted(labels[i] for i in picked) == ["A", "B", "C"]
    assert distinct_trials(true[:2]) == [0, 1]  # fewer trials than asked: all of them
