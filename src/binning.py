"""Binning: spike times into trial-aligned counts, and a continuous signal into the same bins;
the train/valid split and the count dtype that src/ibl/prep.py and src/prep_nwb.py share.

The two binnings work on windows [start, start + n_bins * bin_size), one per trial (or per
chopped segment); everything here is plain numpy: the IBL preparation runs without torch.

Legend: K windows (trials or segments), T bins per window, N units, D signal dimensions.
"""

import numpy as np


def bin_spikes(times, clusters, unit_ids, starts, n_bins: int, bin_size: float,
               chunk_spikes: int = 2_000_000, chunk_cells: int = 4_000_000) -> np.ndarray:
    """Spike counts (trials, n_bins, units) of units `unit_ids` in windows [start, start + n_bins
    * bin_size), column n counting cluster unit_ids[n].

    Time and memory scale with the spikes inside the windows, never with recording length x
    units: each window's spikes are found by binary search in the sorted spike times, and
    counted with one bincount on flat (trial, bin, unit) indices, a chunk of trials at a time
    (at most chunk_spikes spikes and chunk_cells output cells, so 16 + 32 MB of temporaries).
    """
    times = np.asarray(times)
    clusters = np.asarray(clusters)
    starts = np.asarray(starts, dtype=np.float64)
    unit_ids = np.asarray(unit_ids, dtype=np.int64)
    if times.size > 1 and np.any(times[1:] < times[:-1]):  # ALF spikes.times are sorted; be safe
        order = np.argsort(times, kind="stable")
        times, clusters = times[order], clusters[order]
    n_trials, n_units = starts.size, unit_ids.size
    column = np.full(max(int(clusters.max(initial=0)), int(unit_ids.max(initial=0))) + 1, -1,
                     dtype=np.int64)
    column[unit_ids] = np.arange(n_units)  # cluster id -> output column, -1 for other units
    lo = np.searchsorted(times, starts, side="left")
    hi = np.searchsorted(times, starts + n_bins * bin_size, side="left")
    counts = np.zeros((n_trials, n_bins, n_units), dtype=np.uint16)
    k0 = 0
    max_trials = max(1, chunk_cells // max(1, n_bins * n_units))
    while k0 < n_trials:
        n_in = np.cumsum(hi[k0:] - lo[k0:])
        k1 = k0 + max(1, int(np.searchsorted(n_in, chunk_spikes, side="right")))
        k1 = min(k1, k0 + max_trials, n_trials)
        per = hi[k0:k1] - lo[k0:k1]
        trial = np.repeat(np.arange(k1 - k0), per)
        idx = np.repeat(lo[k0:k1] - np.cumsum(per) + per, per) + np.arange(per.sum())
        col = column[clusters[idx]]
        keep = col >= 0
        trial, idx, col = trial[keep], idx[keep], col[keep]
        b = ((times[idx] - starts[k0 + trial]) / bin_size).astype(np.int64)
        np.clip(b, 0, n_bins - 1, out=b)  # a spike a rounding error inside the last edge
        flat = (trial * n_bins + b) * n_units + col
        chunk = np.bincount(flat, minlength=(k1 - k0) * n_bins * n_units)
        counts[k0:k1] = chunk.reshape(k1 - k0, n_bins, n_units)
        del chunk  # before the next bincount allocates its own
        k0 = k1
    return counts


def bin_signal(t, x, starts, n_bins: int, bin_size: float) -> np.ndarray:
    """A sampled signal x (S, D) at times t (S,) in the bins of bin_spikes: (K, T, D) float32.

    A bin holding samples gets their mean (NaN samples ignored): a signal sampled faster than
    the bins is averaged, never subsampled. A bin holding none (a signal slower than the bins,
    or a gap) gets the signal linearly interpolated at the bin's centre, held constant past
    its first and last sample. Memory is O(S x D + K x T x D).
    """
    t = np.asarray(t, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64).reshape(len(t), -1)  # (S, D)
    order = np.argsort(t, kind="stable")
    t, x = t[order], x[order]
    ok = np.isfinite(x)  # (S, D)
    csum = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(np.where(ok, x, 0), 0)])
    cnum = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(ok, 0)])  # (S + 1, D)
    edges = np.asarray(starts, np.float64)[:, None] + np.arange(n_bins + 1) * bin_size  # (K, T+1)
    idx = np.searchsorted(t, edges, side="left")  # samples in [edge_j, edge_j+1)
    total = csum[idx[:, 1:]] - csum[idx[:, :-1]]  # (K, T, D)
    count = cnum[idx[:, 1:]] - cnum[idx[:, :-1]]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total / count
    centres = (edges[:, :-1] + edges[:, 1:]) / 2  # (K, T)
    for d in range(x.shape[1]):
        empty = count[:, :, d] == 0
        if empty.any():
            if not ok[:, d].any():
                raise ValueError(f"signal dimension {d} has no finite sample")
            out[:, :, d][empty] = np.interp(centres[empty], t[ok[:, d]], x[ok[:, d], d])
    return out.astype(np.float32)


def split_trials(n: int, valid_frac: float, rng) -> tuple:
    """(train, valid) sorted indices of n windows: a valid_frac share at random, at least one
    window in each split."""
    n_valid = min(n - 1, max(1, int(round(valid_frac * n))))
    perm = rng.permutation(n)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def smallest_uint(a: np.ndarray):
    """The smallest unsigned integer dtype that holds every value of `a`."""
    top = int(a.max(initial=0))
    return next(t for t in (np.uint8, np.uint16, np.uint32) if top <= np.iinfo(t).max)
